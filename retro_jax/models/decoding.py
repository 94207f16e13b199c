"""Incremental decoding of the Retro model: what a decoding call needs and its caches.

Generation (``retro_jax.inference``) runs the model in two decode modes, through the
same modules and parameters as the full forward pass:

* ``prefill``: the full forward pass over right-padded prompts ``[batch, P]`` (each
  with the neighbors of its complete chunks) that also fills the caches, allocated
  for ``cache_length`` positions. Logits are those of the full pass.
* ``step``: one token per example, ``tokens [batch, 1]`` at per-example absolute
  ``positions [batch, 1]`` (prompts of different lengths decode side by side).

The caches live in the flax ``'cache'`` collection (``mutable=['cache']``):

    layers_{i}/cached_key, cached_value     [batch, cache_length, kv_heads, head_dim]
        self-attention keys (RoPE'd at their positions) and values
    layers_{first CCA}/chunk_states         [batch, m, d]
        normed post-self-attention states of the chunk being written (a ring indexed
        by position % m): the encoder's conditioning once the chunk completes
    layers_{CCA}/cca/cached_key, cached_value   [batch, k*r, heads, head_dim]
    layers_{CCA}/cca/neighbor_mask              bool [batch, k]
        CCA keys/values of the encoded neighbors of the last completed chunk

The chunk rule (``retro_jax.models.cca``): the input token at position p completes
chunk j = (p + 1) // m - 1 when (p + 1) % m == 0. The caller retrieves that chunk's
neighbors before the step and passes them for the examples at such a boundary only
(``rows``); inside the step the first CCA layer writes the token's state, runs the
encoder once for those rows on their completed chunk, and every CCA layer projects
the encoded neighbors into its cache. Tokens p .. p + m - 1 then attend to them. A
step without boundary rows (``rows=None``) never runs the encoder; a boundary step
runs it on ``len(rows)`` rows (pad ``rows`` with ``batch``: those entries are dropped).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp

Array = jax.Array

PREFILL = "prefill"
STEP = "step"


@dataclasses.dataclass(frozen=True)
class DecodeInputs:
  """The decode-mode arguments of ``Retro.__call__`` (see the module docstring).

  Attributes:
    mode: 'prefill' or 'step'.
    retrieval: CCA on (the caches hold neighbors) or off (decoder alone).
    cache_length: prefill: positions the self-attention caches hold (>= prompt
      length + new tokens).
    lengths: prefill: int [batch] prompt lengths (positions >= length are padding).
    rows: step: int [S] batch rows whose input token completes a chunk, or None;
      entries equal to batch are padding (their results are dropped).
    neighbor_tokens: step: int [S, k, r] the new neighbors of those rows' chunks.
    neighbor_mask: step: bool [S, k] (False: absent neighbor).
  """

  mode: str
  retrieval: bool = True
  cache_length: int = 0
  lengths: Optional[Array] = None
  rows: Optional[Array] = None
  neighbor_tokens: Optional[Array] = None
  neighbor_mask: Optional[Array] = None

  def __post_init__(self):
    if self.mode not in (PREFILL, STEP):
      raise ValueError(f"DecodeInputs.mode={self.mode!r}: must be 'prefill' or 'step'")
    if self.mode == PREFILL and (self.lengths is None or self.cache_length <= 0):
      raise ValueError("DecodeInputs: prefill needs lengths [batch] and cache_length > 0")
    if self.mode == STEP and self.rows is not None and (
        self.neighbor_tokens is None or self.neighbor_mask is None):
      raise ValueError("DecodeInputs: boundary rows need neighbor_tokens [S, k, r] and "
                       "neighbor_mask [S, k]")

  @property
  def prefill(self) -> bool:
    return self.mode == PREFILL

  @property
  def has_boundary(self) -> bool:
    return self.mode == STEP and self.rows is not None


def cache_dtype(dtype: Any) -> jnp.dtype:
  """The dtype a cache of ``dtype`` values is held in.

  bfloat16 caches are held in float32 on XLA:CPU (the values are bf16-exact, so the
  attention reads what a bf16 cache holds): XLA:CPU has no bf16 scatter, so writing one
  position converts the whole cache to float32 and back, and its reads convert it
  again, every step and layer. With float32 caches and bf16 weights a decoding step is
  faster than all-float32 (docs/benchmarks.md, "bfloat16 decoding on CPU").
  """
  dtype = jnp.dtype(dtype)
  if dtype == jnp.bfloat16 and jax.default_backend() == "cpu":
    return jnp.dtype(jnp.float32)
  return dtype


def params_for_decoding(params: Any, dtype: Any) -> Any:
  """``params`` with every matrix (kernels, embedding tables: 2 or more dims) held in
  the compute ``dtype`` when that is narrower; vectors (norm scales and biases) keep
  theirs.

  Every use of a matrix casts it to the compute dtype (``layers.matmul``, ``Embed``), so
  the logits are bit-identical, while a decoding step reads half the weight bytes and no
  longer converts every weight, every step (with float32 weights and bf16 compute, a
  100m step at batch 1 on CPU was ~4x slower than all-float32). Weights narrower than
  the compute dtype are the caller's choice (``param_dtype``: memory) and stay.
  """
  dtype = jnp.dtype(dtype)

  def hold(leaf):
    if (getattr(leaf, "ndim", 0) >= 2 and jnp.issubdtype(leaf.dtype, jnp.floating)
        and leaf.dtype.itemsize > dtype.itemsize):
      return leaf.astype(dtype)
    return leaf

  return jax.tree_util.tree_map(hold, params)


def cache_variable(module: Any, name: str, shape: tuple[int, ...], dtype: Any):
  """A zero-initialised variable of the 'cache' collection (created by prefill), for
  values of ``dtype`` (held in ``cache_dtype(dtype)``)."""
  return module.variable("cache", name, jnp.zeros, shape, cache_dtype(dtype))


def existing_cache_variable(module: Any, name: str):
  """A 'cache' variable that prefill created; a clear error when there is none."""
  if not module.has_variable("cache", name):
    raise ValueError(f"{module.name}: no '{name}' in the decoding cache; run the prefill "
                     "call first (with the same retrieval setting) and pass its 'cache'")
  return module.variable("cache", name)


def write_positions(cache: Array, values: Array, positions: Array) -> Array:
  """cache [batch, T, ...] with values [batch, q, ...] written at positions [batch, q]."""
  batch = jnp.arange(cache.shape[0])[:, None]
  return cache.at[batch, positions].set(values.astype(cache.dtype), mode="drop")


def write_rows(cache: Array, values: Array, rows: Array) -> Array:
  """cache [batch, ...] with rows [S] replaced by values [S, ...] (row == batch: dropped)."""
  return cache.at[rows].set(values.astype(cache.dtype), mode="drop")


def read_rows(cache: Array, rows: Array) -> Array:
  """cache [batch, ...] -> [S, ...] (padding rows read a clipped row)."""
  return jnp.take(cache, rows, axis=0, mode="clip")


def gather_chunk(x: Array, chunk: Array) -> Array:
  """x [batch, L, ...] -> [batch, ...]: chunk[b] of each example (clipped to [0, L))."""
  index = jnp.clip(chunk, 0, x.shape[1] - 1).reshape((-1,) + (1,) * (x.ndim - 1))
  return jnp.take_along_axis(x, index, axis=1)[:, 0]


def gather_positions(x: Array, positions: Array) -> Array:
  """x [batch, n, ...] at positions [batch, q] (clipped to [0, n)) -> [batch, q, ...]."""
  index = positions.reshape(positions.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, index, axis=1, mode="clip")


def current_chunk_positions(lengths: Array, chunk_length: int) -> Array:
  """int [batch, m]: the positions of the chunk after each prompt's complete chunks.

  Prefill keeps the states of its first ``lengths % m`` positions (the rest is written
  by the steps that follow, before the chunk completes).
  """
  start = (lengths // chunk_length) * chunk_length
  return start[:, None] + jnp.arange(chunk_length)[None, :]
