"""The Retro language model: a GPT decoder with a Retro encoder and chunked cross-attention.

    logits = Retro(config).apply(variables, tokens, neighbor_tokens,
                                 neighbor_mask=..., deterministic=True)

* ``tokens``: int [batch, n]. n need not be a multiple of m.
* ``neighbor_tokens``: int [batch, n // m, k, r] (chunk + continuation of each of the
  k neighbors of each complete chunk), or None: retrieval off, and the model is
  exactly its GPT decoder (same parameters, same logits; InstructRetro's "encoder
  ablated" mode and the GPT baseline of retro-fitting).
* ``neighbor_mask``: bool, [batch], [batch, n // m] or [batch, n // m, k]; False marks
  an absent neighbor (e.g. a -1 id in the neighbor map, or an SFT example without
  retrieval). A chunk whose neighbors are all absent skips CCA (residual only).

Parameter tree (decoder names do not depend on retrieval, so GPT checkpoints load
into Retro unchanged)::

    token_embedding/embedding                [vocab, embed]
    position_embedding/embedding             [max_length, embed]   (learned positions)
    layers_{i}/pre_attention_norm, self_attention/{query,key,value,out}, pre_mlp_norm,
              mlp/{wi | wi_0, wi_1, wo}
    layers_{i}/pre_cca_norm, cca/attention/...                     (CCA layers)
    layers_{first}/retro_encoder/layers_{j}/...                     (first CCA layer)
    final_norm                                                      (unless final_norm=False)
    output_layer/kernel                      [embed, vocab]        (untied output)

The loss, the batch contract, which parameters are Retro's and initialisation live in
``retro_jax.models.lm`` (``RetroLM``); this module is the pure Flax module.

Incremental decoding (KV cache, chunk-wise retrieval) uses the same parameters:
``Retro.prefill`` and ``Retro.decode_step`` with ``mutable=['cache']``; see
``retro_jax.models.decoding`` and ``retro_jax.inference``.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from retro_jax.models import blocks
from retro_jax.models import decoding
from retro_jax.models import layers
from retro_jax.models.config import RetroConfig

Array = jax.Array

_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_with_no_batch_dims": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def _shape_str(shape) -> str:
  return "[" + ", ".join(str(s) for s in shape) + "]"


def canonical_neighbor_mask(neighbor_mask: Optional[Any], batch: int, num_chunks: int,
                            k: int) -> Array:
  """Broadcasts a neighbor mask to bool [batch, L, k], naming the argument on error."""
  if neighbor_mask is None:
    return jnp.ones((batch, num_chunks, k), bool)
  mask = jnp.asarray(neighbor_mask)
  shapes = ((batch,), (batch, num_chunks), (batch, num_chunks, k))
  if mask.shape not in shapes:
    raise ValueError(
        f"neighbor_mask has shape {_shape_str(mask.shape)}; expected [batch]={list(shapes[0])}"
        f", [batch, chunks]={list(shapes[1])} or [batch, chunks, k]={list(shapes[2])}")
  mask = mask.astype(bool)
  mask = mask.reshape(mask.shape + (1,) * (3 - mask.ndim))
  return jnp.broadcast_to(mask, (batch, num_chunks, k))


class Retro(nn.Module):
  """RETRO decoder LM (see the module docstring for the call contract)."""

  config: RetroConfig

  def _check_inputs(self, tokens, neighbor_tokens, positions):
    cfg = self.config
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f"tokens must be int [batch, n]; got {tokens.dtype} "
                       f"{_shape_str(tokens.shape)}")
    batch, n = tokens.shape
    if cfg.position_embedding == "learned" and n > cfg.max_length:
      raise ValueError(f"tokens has length n={n} > RetroConfig.max_length="
                       f"{cfg.max_length} (learned positions)")
    if positions is not None and positions.shape != tokens.shape:
      raise ValueError(f"positions must have the shape of tokens {_shape_str(tokens.shape)}"
                       f"; got {_shape_str(positions.shape)}")
    if neighbor_tokens is None:
      return
    m, r = cfg.chunk_length, cfg.neighbor_length
    expected = f"[batch={batch}, n//m={n // m}, k, r={r}]"
    if neighbor_tokens.ndim != 4 or not jnp.issubdtype(neighbor_tokens.dtype, jnp.integer):
      raise ValueError(f"neighbor_tokens must be int {expected}; got "
                       f"{neighbor_tokens.dtype} {_shape_str(neighbor_tokens.shape)}")
    b, num_chunks, k, rr = neighbor_tokens.shape
    if b != batch or num_chunks != n // m or rr != r or k < 1:
      raise ValueError(f"neighbor_tokens has shape {_shape_str(neighbor_tokens.shape)}; "
                       f"expected {expected} for tokens {_shape_str(tokens.shape)} with "
                       f"chunk_length m={m}")

  @nn.compact
  def __call__(self, tokens: Array, neighbor_tokens: Optional[Array] = None, *,
               neighbor_mask: Optional[Array] = None, positions: Optional[Array] = None,
               deterministic: bool = True,
               decode: Optional[decoding.DecodeInputs] = None) -> Array:
    """Returns float32 logits [batch, n, vocab].

    ``decode`` runs a decode mode (``prefill`` / ``decode_step`` below); the full
    forward pass is ``decode=None``.
    """
    cfg = self.config
    tokens = jnp.asarray(tokens)
    if neighbor_tokens is not None:
      neighbor_tokens = jnp.asarray(neighbor_tokens)
    self._check_inputs(tokens, neighbor_tokens, positions)
    batch, n = tokens.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (batch, n))

    embed = layers.Embed(cfg.vocab_size, cfg.hidden_size, init_std=cfg.init_std,
                         dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype,
                         name="token_embedding")
    position_embed = None
    if cfg.position_embedding == "learned":
      position_embed = layers.Embed(cfg.max_length, cfg.hidden_size, init_std=cfg.init_std,
                                    axes=(None, "embed"), dtype=cfg.compute_dtype,
                                    param_dtype=cfg.params_dtype, name="position_embedding")
    x = embed(tokens)
    if position_embed is not None:
      x = x + position_embed(positions)
    x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)

    neighbor_embeds = mask = None
    if decode is not None and decode.has_boundary:
      # A decode step where some rows complete a chunk: [S, k, r] -> [S, 1, k, r, d].
      neighbor_tokens = jnp.asarray(decode.neighbor_tokens)[:, None]
      mask = jnp.asarray(decode.neighbor_mask, bool)
    if neighbor_tokens is not None:
      _, num_chunks, k, r = neighbor_tokens.shape
      if mask is None:
        mask = canonical_neighbor_mask(neighbor_mask, batch, num_chunks, k)
      # Neighbors share the decoder's word embedding (Megatron).
      neighbor_embeds = embed(neighbor_tokens)
      if cfg.encoder_position_embedding == "learned":
        neighbor_embeds = neighbor_embeds + position_embed(jnp.arange(r))

    layer_cls = blocks.DecoderLayer
    if cfg.remat_policy != "none" and decode is None:
      layer_cls = nn.remat(layer_cls, policy=_REMAT_POLICIES[cfg.remat_policy],
                           static_argnums=(6,))
    retro_layers = set(cfg.retro_layers)
    encoded = None
    for i in range(cfg.num_layers):
      number = i + 1
      owns = number == cfg.first_retro_layer
      layer = layer_cls(cfg, has_cca=number in retro_layers, owns_encoder=owns,
                        name=f"layers_{i}")
      args = (x, positions, neighbor_embeds if owns else None, mask, encoded, deterministic)
      x, encoded = layer(*args) if decode is None else layer(*args, decode=decode)

    if cfg.final_norm:
      x = blocks.make_norm(cfg, "final_norm")(x)
    if cfg.tie_embeddings:
      logits = embed.attend(x)
    else:
      logits = layers.DenseGeneral(features=(cfg.vocab_size,), kernel_axes=("embed", "vocab"),
                                   init_std=cfg.init_std, dtype=cfg.compute_dtype,
                                   param_dtype=cfg.params_dtype, name="output_layer")(x)
    logits = layers.constrain(logits, ("activation_batch", "activation_length",
                                       "activation_vocab"))
    return logits.astype(jnp.float32)

  # Incremental decoding (apply with ``mutable=['cache']``; see models/decoding.py) --

  def prefill(self, tokens: Array, neighbor_tokens: Optional[Array] = None, *,
              lengths: Array, cache_length: int,
              neighbor_mask: Optional[Array] = None) -> Array:
    """The full pass over right-padded prompts that also fills the decoding caches.

    Args:
      tokens: int [batch, P], example b's prompt in ``tokens[b, :lengths[b]]``.
      neighbor_tokens: int [batch, P // m, k, r] (neighbors of every complete prompt
        chunk; mask the rest), or None: decoder alone.
      lengths: int [batch] prompt lengths (1 <= length <= P).
      cache_length: positions the caches hold (prompt + new tokens).
      neighbor_mask: as in ``__call__``.
    Returns:
      logits [batch, P, vocab] (example b's next-token logits at lengths[b] - 1).
    """
    cfg = self.config
    if cache_length < tokens.shape[1]:
      raise ValueError(f"prefill: cache_length={cache_length} is shorter than the prompts "
                       f"[batch, P]={list(tokens.shape)}")
    if cfg.position_embedding == "learned" and cache_length > cfg.max_length:
      raise ValueError(f"prefill: cache_length={cache_length} > RetroConfig.max_length="
                       f"{cfg.max_length} (learned positions)")
    decode = decoding.DecodeInputs(decoding.PREFILL, retrieval=neighbor_tokens is not None,
                                   cache_length=cache_length, lengths=jnp.asarray(lengths))
    return self(tokens, neighbor_tokens, neighbor_mask=neighbor_mask, decode=decode)

  def decode_step(self, tokens: Array, positions: Array, *, retrieval: bool,
                  rows: Optional[Array] = None, neighbor_tokens: Optional[Array] = None,
                  neighbor_mask: Optional[Array] = None) -> Array:
    """One token per example against the caches.

    Args:
      tokens: int [batch, 1], the token at ``positions`` [batch, 1] of each example.
      retrieval: as in the prefill that made the caches.
      rows: int [S] rows whose token completes a chunk (pad with ``batch``), or None.
      neighbor_tokens: int [S, k, r] the neighbors of those rows' completed chunks.
      neighbor_mask: bool [S, k].
    Returns:
      logits [batch, 1, vocab].
    Raises:
      ValueError: a position outside ``[0, cache_length)`` (the caches' length from
        prefill), when ``positions`` are concrete (an eager call). Under ``jit`` the
        positions are traced and cannot be checked on the host: the logits of such
        rows are NaN instead of silently wrong (their key/value would be dropped),
        and the caller checks first, as ``retro_jax.inference.Generator`` does.
    """
    cache_length = self._cache_length()
    if cache_length is not None:
      try:
        host = np.asarray(positions)
      except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        host = None
      if host is not None and host.size and (host.min() < 0 or
                                             host.max() >= cache_length):
        bad = int(host.max()) if host.max() >= cache_length else int(host.min())
        raise ValueError(f"decode_step: position {bad} is outside the decoding cache "
                         f"[0, {cache_length}) that prefill allocated (cache_length="
                         f"{cache_length}); prefill with a longer cache_length")
    decode = decoding.DecodeInputs(decoding.STEP, retrieval=retrieval, rows=rows,
                                   neighbor_tokens=neighbor_tokens,
                                   neighbor_mask=neighbor_mask)
    logits = self(tokens, positions=positions, decode=decode)
    if cache_length is not None:   # traced positions: out of range -> NaN, not garbage
      outside = (positions < 0) | (positions >= cache_length)      # [batch, 1]
      logits = jnp.where(outside[..., None], jnp.nan, logits)
    return logits

  def _cache_length(self) -> Optional[int]:
    """Positions the self-attention caches hold (static: an array shape), or None."""
    if not self.has_variable("cache", "layers_0"):
      return None
    key = self.variables["cache"]["layers_0"].get("cached_key")
    return None if key is None else int(key.shape[1])
