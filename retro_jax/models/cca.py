"""Chunked cross-attention (CCA): the one place that knows RETRO's causal shift.

A sequence of n tokens holds L = n // m complete chunks; chunk u is tokens
[u*m, (u+1)*m). Its neighbors were retrieved with chunk u's tokens, so they may only
be seen by tokens that come after all of chunk u: token t attends to the neighbors of
chunk ``j = (t + 1) // m - 1`` (Megatron InstructRetro). That is, the last token of
chunk u and the first m-1 tokens of chunk u+1 see chunk u's neighbors; tokens
0..m-2 see none. A trailing partial chunk (n % m != 0) has no neighbors of its own; its
first tokens see the previous chunk's neighbors, as the rule says.

Implementation: drop the first m-1 tokens, pad the end to L*m, reshape to [L, m]
query blocks, attend each block to the k*r encoded tokens of its chunk's neighbors
(no causal mask, no positions), then undo the reshape and prepend m-1 zeros.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from retro_jax.models import decoding
from retro_jax.models import layers
from retro_jax.models.config import RetroConfig

Array = jax.Array


def neighbor_chunk_of_token(position: Any, chunk_length: int) -> Any:
  """Index of the chunk whose neighbors token ``position`` attends to (-1: none)."""
  return (position + 1) // chunk_length - 1


def tokens_to_query_chunks(x: Array, chunk_length: int, num_chunks: int) -> Array:
  """Shifts tokens into CCA query blocks.

  Args:
    x: [batch, n, ...] with num_chunks == n // chunk_length.
  Returns:
    [batch, num_chunks, chunk_length, ...]; block j holds tokens
    j*m + m-1 ... j*m + 2m-2 (zero-padded past the end of the sequence).
  """
  m = chunk_length
  tail = x[:, m - 1:]
  pad = num_chunks * m - tail.shape[1]
  widths = [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)
  tail = jnp.pad(tail, widths)
  return tail.reshape(x.shape[0], num_chunks, m, *x.shape[2:])


def query_chunks_to_tokens(y: Array, length: int) -> Array:
  """Inverse of ``tokens_to_query_chunks``: [batch, L, m, ...] -> [batch, length, ...].

  The first m-1 positions (which attend to nothing) are zeros.
  """
  batch, num_chunks, m = y.shape[:3]
  flat = y.reshape(batch, num_chunks * m, *y.shape[3:])[:, :length - (m - 1)]
  widths = [(0, 0), (m - 1, 0)] + [(0, 0)] * (y.ndim - 3)
  return jnp.pad(flat, widths)


def tokens_to_chunks(x: Array, chunk_length: int, num_chunks: int) -> Array:
  """The complete chunks of a sequence, unshifted: [batch, n, ...] -> [batch, L, m, ...].

  These are the decoder states the Retro encoder conditions on (chunk u is the text
  that retrieved chunk u's neighbors).
  """
  m = chunk_length
  return x[:, :num_chunks * m].reshape(x.shape[0], num_chunks, m, *x.shape[2:])


def completes_chunk(position: Any, chunk_length: int) -> Any:
  """True where the token at ``position`` is the last token of its chunk: decoding
  retrieves that chunk's neighbors before the step whose input it is."""
  return (position + 1) % chunk_length == 0


class ChunkedCrossAttention(nn.Module):
  """CCA from decoder tokens to the encoded neighbors of their causal chunk.

  Parameters: an ``Attention`` named ``attention`` (query from the decoder width,
  key/value from the encoder width, output to the decoder width).
  """

  config: RetroConfig

  @nn.compact
  def __call__(self, x: Array, encoded_neighbors: Optional[Array],
               neighbor_mask: Optional[Array], *, deterministic: bool = True,
               decode: Optional[decoding.DecodeInputs] = None) -> Array:
    """Computes the CCA update (the caller adds it to the residual stream).

    Args:
      x: normed decoder states [batch, n, d].
      encoded_neighbors: [batch, L, k, r, e], L = n // m. Decode step: the encoded
        new neighbors [S, 1, k, r, e] of ``decode.rows``, or None (no boundary).
      neighbor_mask: bool [batch, L, k]; False = this neighbor is absent. A chunk
        with no neighbor present contributes exactly zero. Decode step: [S, k] or None.
      decode: decode mode (``retro_jax.models.decoding``); prefill also caches the
        keys/values of each example's last complete prompt chunk.
    Returns:
      [batch, n, d]; zero at positions with no causal neighbors.
    """
    cfg = self.config
    m = cfg.chunk_length
    attention = layers.Attention(
        num_heads=cfg.num_heads, num_kv_heads=cfg.num_heads, head_dim=cfg.dim_per_head,
        out_features=x.shape[-1], use_bias=cfg.use_bias, qkv_bias=cfg.has_qkv_bias,
        init_std=cfg.init_std, out_init_std=cfg.init_std / (2 * cfg.num_layers) ** 0.5,
        dropout_rate=cfg.attention_dropout_rate, implementation=cfg.attention_impl,
        dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype, name="attention")
    if decode is not None and not decode.prefill:
      return self._decode_step(attention, x, encoded_neighbors, neighbor_mask, decode)
    batch, n, d = x.shape
    _, num_chunks, k, r, e = encoded_neighbors.shape
    if num_chunks == 0:
      if decode is not None:
        self._cache((batch, k, attention.head_dim))
      return jnp.zeros_like(x)
    queries = tokens_to_query_chunks(x, m, num_chunks)  # [b, L, m, d]
    keys = encoded_neighbors.reshape(batch * num_chunks, k * r, e)
    key_mask = jnp.repeat(neighbor_mask.reshape(batch * num_chunks, k), r, axis=1)
    query = attention.project_query(queries.reshape(batch * num_chunks, m, d))
    key, value = attention.project_key_value(keys)
    out = attention.attend(query, key, value, mask=key_mask[:, None, None, :],
                           deterministic=deterministic)
    out = out.reshape(batch, num_chunks, m, d)
    chunk_has_neighbors = jnp.any(neighbor_mask, axis=-1)  # [b, L]
    out = jnp.where(chunk_has_neighbors[:, :, None, None], out, jnp.zeros_like(out))
    if decode is not None:
      # The last complete prompt chunk of each example is what its next tokens see.
      last = decode.lengths // m - 1
      cached_key, cached_value, cached_mask = self._cache((batch, k, attention.head_dim))
      cached_key.value = decoding.gather_chunk(
          key.reshape(batch, num_chunks, *key.shape[1:]), last).astype(cached_key.value.dtype)
      cached_value.value = decoding.gather_chunk(
          value.reshape(batch, num_chunks, *value.shape[1:]), last
      ).astype(cached_value.value.dtype)
      cached_mask.value = decoding.gather_chunk(neighbor_mask, last) & (last >= 0)[:, None]
    return query_chunks_to_tokens(out, n)

  def _cache(self, shape: Optional[tuple[int, int, int]] = None):
    """The CCA caches: keys/values [batch, k*r, heads, head_dim], mask bool [batch, k].

    ``shape`` = (batch, k, head_dim) creates them (prefill); None reads them (step).
    """
    cfg = self.config
    names = ("cached_key", "cached_value", "neighbor_mask")
    if shape is None:
      return tuple(decoding.existing_cache_variable(self, name) for name in names)
    batch, k, head_dim = shape
    kv_shape = (batch, k * cfg.neighbor_length, cfg.num_heads, head_dim)
    return (decoding.cache_variable(self, names[0], kv_shape, cfg.compute_dtype),
            decoding.cache_variable(self, names[1], kv_shape, cfg.compute_dtype),
            decoding.cache_variable(self, names[2], (batch, k), bool))

  def _decode_step(self, attention: layers.Attention, x: Array,
                   encoded_neighbors: Optional[Array], neighbor_mask: Optional[Array],
                   decode: decoding.DecodeInputs) -> Array:
    """One token per example (x: [batch, 1, d]) against the cached neighbors; at a
    boundary, the rows' new encoded neighbors replace their cache first."""
    cached_key, cached_value, cached_mask = self._cache()
    if decode.has_boundary:
      rows_count, _, k, r, e = encoded_neighbors.shape
      key, value = attention.project_key_value(
          encoded_neighbors.reshape(rows_count, k * r, e))
      cached_key.value = decoding.write_rows(cached_key.value, key, decode.rows)
      cached_value.value = decoding.write_rows(cached_value.value, value, decode.rows)
      cached_mask.value = decoding.write_rows(cached_mask.value, neighbor_mask, decode.rows)
    mask = cached_mask.value  # [batch, k]
    r = self.config.neighbor_length
    key_mask = jnp.repeat(mask, r, axis=1)[:, None, None, :]
    out = attention.attend(attention.project_query(x), cached_key.value,
                           cached_value.value, mask=key_mask)
    return jnp.where(jnp.any(mask, axis=-1)[:, None, None], out, jnp.zeros_like(out))
