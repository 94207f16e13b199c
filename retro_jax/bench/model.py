r"""Train-step time of Retro vs its GPT decoder alone, at the same size.

    python -m retro_jax.bench.model                      # tiny and ~100M, CPU-sized
    python -m retro_jax.bench.model --sizes=100m,1b --batch=8 --seq_len=2048 \
        --dtype=bfloat16                                 # on a GPU

For each size it times a jitted AdamW train step (forward, backward, update) of
  * GPT:  the decoder alone (retrieval off; only decoder parameters),
  * Retro: decoder + encoder + CCA with k neighbors per chunk (encoder as wide as the
    decoder, as Megatron does),
  * Retro-small-enc: the same with an encoder of half the width (DeepMind RETRO style),
and prints step time, tokens/s, analytic TFLOP/s (``retro_jax.models.flops``), MFU when
the device's peak is known, and the Retro / GPT step-time ratio measured in the same run.
"""

from __future__ import annotations

import statistics
import time
from typing import Optional

from absl import app
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from retro_jax.models import Retro, RetroConfig, param_count
from retro_jax.models.flops import count_flops, peak_tflops

SIZES = {
    "tiny": dict(vocab_size=1024, hidden_size=128, num_layers=4, num_heads=4, mlp_dim=512),
    "100m": dict(vocab_size=32000, hidden_size=768, num_layers=12, num_heads=12,
                 mlp_dim=3072),
    "1b": dict(vocab_size=32000, hidden_size=2048, num_layers=16, num_heads=16,
               mlp_dim=8192),
}

_SIZES = flags.DEFINE_list("sizes", ["tiny", "100m"], f"Model sizes from {sorted(SIZES)}.")
_BATCH = flags.DEFINE_integer("batch", 2, "Examples per step.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 512, "Tokens per example (a multiple of 64).")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps (after 2 warm-up steps).")
_DTYPE = flags.DEFINE_string("dtype", "float32", "Compute dtype: float32 or bfloat16.")
_REMAT = flags.DEFINE_string("remat_policy", "none", "RetroConfig.remat_policy.")
_NEIGHBORS = flags.DEFINE_integer("num_neighbors", 2, "k neighbors per chunk.")


def _train_step(config: RetroConfig, retrieval: bool):
  model = Retro(config)
  optimizer = optax.adamw(1e-4)

  def loss_fn(params, tokens, neighbors):
    logits = model.apply({"params": params}, tokens, neighbors if retrieval else None)
    labels = jnp.roll(tokens, -1, axis=1)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], labels[:, :-1])
    return losses.mean()

  def step(params, opt_state, tokens, neighbors):
    loss, grads = jax.value_and_grad(loss_fn)(params, tokens, neighbors)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return optimizer, jax.jit(step, donate_argnums=(0, 1))


def time_train_step(config: RetroConfig, *, batch: int, seq_len: int, steps: int,
                    retrieval: bool, num_neighbors: int, seed: int = 0) -> dict:
  """Median step time and derived figures of one configuration."""
  rng = np.random.RandomState(seed)
  tokens = rng.randint(0, config.vocab_size, (batch, seq_len)).astype(np.int32)
  neighbors = rng.randint(0, config.vocab_size,
                          (batch, seq_len // config.chunk_length, num_neighbors,
                           config.neighbor_length)).astype(np.int32)
  init_inputs = (tokens[:1], neighbors[:1] if retrieval else None)
  params = nn.unbox(jax.jit(Retro(config).init)(jax.random.PRNGKey(seed),
                                                 *init_inputs))["params"]
  optimizer, step = _train_step(config, retrieval)
  opt_state = optimizer.init(params)
  times = []
  for i in range(steps + 2):
    start = time.perf_counter()
    params, opt_state, loss = step(params, opt_state, tokens, neighbors)
    jax.block_until_ready(loss)
    if i >= 2:
      times.append(time.perf_counter() - start)
  step_time = statistics.median(times)
  flops = count_flops(config, seq_len, num_neighbors=num_neighbors, retrieval=retrieval)
  achieved = flops.train * batch / step_time
  peak = peak_tflops(jax.devices()[0].device_kind)
  return dict(params=param_count(params), step_s=step_time, tokens_s=batch * seq_len / step_time,
              tflops=achieved / 1e12, mfu=None if peak is None else achieved / (peak * 1e12),
              train_flops=flops.train, loss=float(loss))


def run(sizes, *, batch: int, seq_len: int, steps: int, dtype: str, remat_policy: str,
        num_neighbors: int, print_fn=print) -> list[dict]:
  device = jax.devices()[0]
  print_fn(f"device: {device.device_kind} x{jax.device_count()} ({jax.default_backend()}), "
           f"batch={batch}, seq_len={seq_len}, k={num_neighbors}, dtype={dtype}, "
           f"remat={remat_policy}, steps={steps}")
  print_fn("| size | model | params | step (s) | tokens/s | TFLOP/s | MFU | step / GPT "
           "| FLOPs / GPT |")
  print_fn("|---|---|---|---|---|---|---|---|---|")
  rows = []
  for size in sizes:
    base = RetroConfig(**SIZES[size], dtype=dtype, remat_policy=remat_policy,
                       encoder_dropout_rate=0.0)
    variants = [("GPT", base, False), ("Retro", base, True),
                ("Retro-small-enc", base.replace(encoder_hidden_size=base.hidden_size // 2,
                                                 encoder_num_heads=base.num_heads // 2),
                 True)]
    gpt: Optional[dict] = None
    for name, config, retrieval in variants:
      r = time_train_step(config, batch=batch, seq_len=seq_len, steps=steps,
                          retrieval=retrieval, num_neighbors=num_neighbors)
      gpt = r if name == "GPT" else gpt
      r.update(size=size, model=name, ratio=r["step_s"] / gpt["step_s"],
               flop_ratio=r["train_flops"] / gpt["train_flops"])
      rows.append(r)
      mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
      print_fn(f"| {size} | {name} | {r['params'] / 1e6:.1f}M | {r['step_s']:.4f} | "
               f"{r['tokens_s']:.0f} | {r['tflops']:.3f} | {mfu} | {r['ratio']:.2f}x | "
               f"{r['flop_ratio']:.2f}x |")
  return rows


def main(argv):
  del argv
  for size in _SIZES.value:
    if size not in SIZES:
      raise app.UsageError(f"--sizes: unknown size {size!r}; known: {sorted(SIZES)}")
  if _SEQ_LEN.value % 64:
    raise app.UsageError(f"--seq_len={_SEQ_LEN.value} must be a multiple of 64")
  run(_SIZES.value, batch=_BATCH.value, seq_len=_SEQ_LEN.value, steps=_STEPS.value,
      dtype=_DTYPE.value, remat_policy=_REMAT.value, num_neighbors=_NEIGHBORS.value)


if __name__ == "__main__":
  app.run(main)
