r"""Per-component forward and forward+backward times (issue 18: where the backward goes).

    python -m retro_jax.bench.backward [--components=a,b] [--repeats=3]

At RETRO-pytorch's default architecture (``bench.peers.DEFAULT_ARCH``), batch 2, n = 512,
k = 2, float32. Each component is a Flax module applied to random inputs; ``fwd`` is
``jit(apply)``, ``fwd+bwd`` is ``jit(grad)`` of ``<out, cotangent>`` with respect to the
parameters and every float input (what a train step computes). Median of ``--repeats``.
"""

from __future__ import annotations


from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from retro_jax.bench.peers import DEFAULT_ARCH, median_seconds, retro_jax_config
from retro_jax.models import Retro, blocks, cca as cca_lib, layers

BATCH, N, K = 2, 512, 2


def _time(fn, *args, repeats: int) -> float:
  return median_seconds(lambda: jax.block_until_ready(fn(*args)), repeats)


def measure(module, inputs: tuple, kwargs: dict, repeats: int):
  """(fwd s, fwd+bwd s, fwd fn, grad fn, params, arrays) of ``module.apply``; inputs
  that are not arrays (None, flags) are closed over."""
  key = jax.random.PRNGKey(0)
  params = jax.jit(lambda k: module.init(k, *inputs, **kwargs))(key)
  slots = [i for i, x in enumerate(inputs) if isinstance(x, jax.Array)]
  arrays = tuple(inputs[i] for i in slots)
  float_args = tuple(j for j, x in enumerate(arrays) if jnp.issubdtype(x.dtype, jnp.floating))

  def fwd(p, *xs):
    full = list(inputs)
    for i, x in zip(slots, xs):
      full[i] = x
    y = module.apply(p, *full, **kwargs)
    return y[0] if isinstance(y, tuple) else y

  out = jax.eval_shape(fwd, params, *arrays)
  ct = jax.random.normal(jax.random.PRNGKey(1), out.shape, out.dtype)

  def loss(p, ct, *xs):  # the cotangent is an argument, as in a real backward pass
    return jnp.vdot(fwd(p, *xs), ct)

  fwd_j = jax.jit(fwd)
  grad_j = jax.jit(jax.grad(loss, argnums=(0,) + tuple(2 + i for i in float_args)))
  return (_time(fwd_j, params, *arrays, repeats=repeats),
          _time(grad_j, params, ct, *arrays, repeats=repeats), fwd_j, grad_j, params,
          (ct,) + arrays)


class Core(layers.nn.Module):
  """The attention core alone: q, k, v [b, n, h, hd] -> [b, n, h, hd]."""
  implementation: str = "jax"  # "jax": jax.nn.dot_product_attention; "einsum"
  causal: bool = True

  @layers.nn.compact
  def __call__(self, q, k, v):
    if self.implementation == "einsum":
      logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(q.shape[-1]).astype(q.dtype)
      if self.causal:
        mask = jnp.tril(jnp.ones((q.shape[1], k.shape[1]), bool))
        logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
      probs = jax.nn.softmax(logits, axis=-1)
      return jnp.einsum("bhqk,bkhd->bqhd", probs, v)
    return layers.dot_product_attention(q, k, v, is_causal=self.causal)


class Projections(layers.nn.Module):
  """q, k, v projections and the output projection, no attention core."""
  cfg: object

  @layers.nn.compact
  def __call__(self, x):
    a = blocks.make_attention(self.cfg, width=self.cfg.hidden_size,
                              heads=self.cfg.num_heads, kv_heads=self.cfg.kv_heads,
                              rotary=self.cfg.position_embedding == "rope",
                              dropout_rate=0.0, name="self_attention",
                              decoder_self_attention=True)
    positions = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
    q = a.project_query(x, positions)
    k, v = a.project_key_value(x, positions)
    return a.out(q + k + v)


class Logits(layers.nn.Module):
  cfg: object

  @layers.nn.compact
  def __call__(self, x):
    embed = layers.Embed(self.cfg.vocab_size, self.cfg.hidden_size, name="token_embedding")
    return embed.attend(x)


def components(cfg, names=None):
  key = jax.random.PRNGKey(2)
  d, h, hd = cfg.hidden_size, cfg.num_heads, cfg.dim_per_head
  m, r, L = cfg.chunk_length, cfg.neighbor_length, N // cfg.chunk_length
  e = cfg.encoder_width
  x = jax.random.normal(key, (BATCH, N, d))
  q = jax.random.normal(key, (BATCH, N, h, hd))
  pos = jnp.broadcast_to(jnp.arange(N, dtype=jnp.int32), (BATCH, N))
  nb = jax.random.normal(key, (BATCH, L, K, r, d))
  enc = jax.random.normal(key, (BATCH, L, K, r, e))
  states = jax.random.normal(key, (BATCH, L, m, d))
  mask = jnp.ones((BATCH, L, K), bool)
  tokens = jax.random.randint(key, (BATCH, N), 0, cfg.vocab_size)
  ntokens = jax.random.randint(key, (BATCH, L, K, r), 0, cfg.vocab_size)
  attention = blocks.make_attention(cfg, width=d, heads=h, kv_heads=cfg.kv_heads,
                                    rotary=cfg.position_embedding == "rope",
                                    dropout_rate=0.0, name="a",
                                    decoder_self_attention=True)
  table = {
      "norm": (blocks.make_norm(cfg, "n"), (x,), {}),
      "mlp": (blocks.make_mlp(cfg, cfg.mlp_dim), (x,), {}),
      "attn projections (q,k,v,out + rope)": (Projections(cfg), (x,), {}),
      "attn core jax.nn.dpa (causal)": (Core("jax"), (q, q, q), {}),
      "attn core einsum (causal)": (Core("einsum"), (q, q, q), {}),
      "self-attention (whole)": (attention, (x,), dict(positions=pos, is_causal=True)),
      "logits (tied, 28996)": (Logits(cfg), (x,), {}),
      "cca": (cca_lib.ChunkedCrossAttention(cfg), (x, enc, mask), {}),
      "retro encoder": (blocks.RetroEncoder(cfg), (nb, states), {}),
      "decoder layer (plain)": (blocks.DecoderLayer(cfg), (x, pos, None, None, None, True),
                                {}),
      "decoder layer (cca + encoder)": (
          blocks.DecoderLayer(cfg, has_cca=True, owns_encoder=True),
          (x, pos, nb, mask, None, True), {}),
      "whole model (no retrieval)": (Retro(cfg), (tokens,), {}),
      "whole model (retrieval)": (Retro(cfg), (tokens, ntokens), {}),
  }
  return {k: v for k, v in table.items() if not names or any(n in k for n in names)}


_COMPONENTS = flags.DEFINE_list("components", [], "Substrings of component names.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs (median).")


def main(argv):
  del argv
  cfg = retro_jax_config(DEFAULT_ARCH, K)
  print(f"batch {BATCH}, n {N}, k {K}, float32, {jax.devices()[0].device_kind}")
  print("| component | fwd (ms) | fwd+bwd (ms) | (fwd+bwd)/fwd |\n|---|---|---|---|")
  for name, (module, inputs, kwargs) in components(cfg, _COMPONENTS.value).items():
    f, g, *_ = measure(module, inputs, kwargs, _REPEATS.value)
    print(f"| {name} | {1e3 * f:.1f} | {1e3 * g:.1f} | {g / f:.2f} |", flush=True)


if __name__ == "__main__":
  app.run(main)
