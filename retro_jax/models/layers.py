"""Building blocks shared by the decoder, the Retro encoder and CCA.

One attention (``Attention``, over ``dot_product_attention``), one norm, one MLP, one
embedding, one RoPE. Every parameter carries logical axis names; the mesh mapping
lives in ``retro_jax.models.partitioning``.

Logical axis names used here:
  parameters:  'vocab', 'embed', 'heads', 'kv_heads', 'head_dim', 'mlp', 'norm',
               'encoder_embed'
  activations: 'activation_batch', 'activation_length', 'activation_embed',
               'activation_heads', 'activation_kv', 'activation_mlp', 'activation_vocab'
"""

from __future__ import annotations

import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
DType = Any

BATCH_LENGTH_EMBED = ("activation_batch", "activation_length", "activation_embed")
BATCH_LENGTH_HEADS_KV = ("activation_batch", "activation_length", "activation_heads",
                         "activation_kv")


def constrain(x: Array, axes: tuple[Optional[str], ...]) -> Array:
  """Names the sharding of an activation by logical axes (no-op outside a mesh)."""
  return nn.with_logical_constraint(x, axes)


def normal_init(std: float, axes: tuple[Optional[str], ...]):
  return nn.with_logical_partitioning(nn.initializers.normal(stddev=std), axes)


def zeros_init(axes: tuple[Optional[str], ...]):
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), axes)


def ones_init(axes: tuple[Optional[str], ...]):
  return nn.with_logical_partitioning(nn.initializers.ones_init(), axes)


# Norms -----------------------------------------------------------------------------


class Norm(nn.Module):
  """LayerNorm or RMSNorm over the last axis, computed in float32.

  ``zero_centered_gamma`` is Megatron's LayerNorm-1p: the stored scale is gamma - 1.
  """

  norm_type: str = "layernorm"
  eps: float = 1e-5
  zero_centered_gamma: bool = False
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    features = x.shape[-1]
    init = zeros_init(("norm",)) if self.zero_centered_gamma else ones_init(("norm",))
    scale = self.param("scale", init, (features,), self.param_dtype).astype(jnp.float32)
    if self.zero_centered_gamma:
      scale = scale + 1.0
    xf = x.astype(jnp.float32)
    if self.norm_type == "rmsnorm":
      y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps)
      return (y * scale).astype(self.dtype)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
    bias = self.param("bias", zeros_init(("norm",)), (features,), self.param_dtype)
    return (y * scale + bias.astype(jnp.float32)).astype(self.dtype)


# Matmul ----------------------------------------------------------------------------


def matmul(x: Array, w: Array, dtype: DType, *, transpose_w: bool = False) -> Array:
  """x [rows, in] times w [in, out] (w [out, in] with ``transpose_w``) -> [rows, out],
  operands and result in ``dtype``; the one weight matmul of the models.

  bfloat16 on XLA:CPU takes its fast path (AMX / AVX512-BF16 units where the CPU has
  them): the dot accumulates into a float32 result that is then rounded, as the
  bf16-output dot does internally, but without its ~2x slower kernel, and a single row
  is padded to two, because XLA:CPU's bf16 matrix-vector product is ~10x slower than
  its two-row matmul (``python -m retro_jax.bench.matvec``; decoding at batch 1).
  """
  x, w = x.astype(dtype), w.astype(dtype)
  dims = (((1,), (1 if transpose_w else 0,)), ((), ()))
  if jnp.dtype(dtype) != jnp.bfloat16 or jax.default_backend() != "cpu":
    return jax.lax.dot_general(x, w, dims)
  rows = x.shape[0]
  if rows == 1:
    x = jnp.concatenate([x, jnp.zeros_like(x)])
  y = jax.lax.dot_general(x, w, dims, preferred_element_type=jnp.float32)
  return y[:rows].astype(dtype)


# Embedding -------------------------------------------------------------------------


class Embed(nn.Module):
  """Token (or position) embedding table ``[num_embeddings, features]``."""

  num_embeddings: int
  features: int
  init_std: float = 0.02
  axes: tuple[Optional[str], Optional[str]] = ("vocab", "embed")
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32

  def setup(self):
    self.embedding = self.param("embedding", normal_init(self.init_std, self.axes),
                                (self.num_embeddings, self.features), self.param_dtype)

  def __call__(self, ids: Array) -> Array:
    """ids: int [batch, ...] -> [batch, ..., features]."""
    # Gather from the all-gathered table (as FSDP does for every weight): a gather from
    # a sharded table makes the SPMD partitioner rematerialise it inefficiently.
    table = nn.with_logical_constraint(self.embedding, (None, None))
    out = jnp.take(table, ids, axis=0).astype(self.dtype)
    return constrain(out, ("activation_batch",) + (None,) * (ids.ndim - 1)
                     + ("activation_embed",))

  def attend(self, x: Array) -> Array:
    """Tied output layer: x [..., features] -> logits [..., num_embeddings]."""
    # One 2-D matmul (see DenseGeneral): the "...d,vd->...v" einsum made XLA:CPU
    # transpose the [batch, length, vocab] cotangent for the table's gradient.
    y = matmul(x.reshape(-1, x.shape[-1]), self.embedding, self.dtype, transpose_w=True)
    return y.reshape(*x.shape[:-1], self.num_embeddings)


# RoPE ------------------------------------------------------------------------------


def apply_rope(x: Array, positions: Array, rotary_dims: int, theta: float) -> Array:
  """Rotary position embedding on the first ``rotary_dims`` dims of each head.

  Uses the "rotate half" pairing of GPT-NeoX / Llama / Megatron: dimension i is
  rotated with dimension i + rotary_dims/2.

  Args:
    x: [batch, length, heads, head_dim].
    positions: int [batch, length].
  """
  half = rotary_dims // 2
  inv_freq = 1.0 / (theta ** (jnp.arange(0, rotary_dims, 2, dtype=jnp.float32) / rotary_dims))
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [b, t, half]
  cos = jnp.cos(angles)[:, :, None, :]
  sin = jnp.sin(angles)[:, :, None, :]
  xf = x.astype(jnp.float32)
  x1, x2, rest = xf[..., :half], xf[..., half:rotary_dims], xf[..., rotary_dims:]
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)
  return rotated.astype(x.dtype)


# Attention -------------------------------------------------------------------------


# Cache elements ([batch, kv_length, kv_heads, head_dim]) from which one-query attention
# reduces in the cache's own layout instead of copying it for a dot (docs/benchmarks.md,
# "Batch 16 after the decoding-attention fix").
ONE_QUERY_REDUCE_MIN = 1 << 20


def dot_product_attention(query: Array, key: Array, value: Array, *,
                          mask: Optional[Array] = None, is_causal: bool = False,
                          sliding_window: Optional[int] = None,
                          implementation: Optional[str] = None,
                          dropout_rate: float = 0.0,
                          dropout_rng: Optional[Array] = None) -> Array:
  """Scaled dot-product attention; the one attention kernel of the project.

  ``implementation``: 'xla' or 'cudnn' is ``jax.nn.dot_product_attention`` with that
  implementation; 'einsum' is the same math written as two einsums and a float32
  softmax (``jax.nn.dot_product_attention``'s XLA path without its grouped-head
  reshapes, whose gradients XLA:CPU lowers with transposed copies of every
  [heads, q, kv] matrix: issue 18); None picks 'einsum' on CPU and
  ``jax.nn.dot_product_attention``'s best (cuDNN flash for bf16/fp16 on GPU)
  elsewhere. Attention-probability dropout (training only) always takes 'einsum'.
  With one query per example (a decoding step) over a large cache, 'einsum' multiplies
  and reduces instead of two dots: a dot would first copy each [batch, kv_length,
  heads, head_dim] cache to a heads-major layout, every step and layer (issue 18;
  below ``ONE_QUERY_REDUCE_MIN`` elements the copy is cheaper than the reduction).

  Args:
    query: [batch, q_length, heads, head_dim].
    key, value: [batch, kv_length, kv_heads, head_dim]; kv_heads divides heads (GQA).
    mask: bool, broadcastable to [batch, heads, q_length, kv_length]; True = attend.
    is_causal: lower-triangular mask (query i sees keys <= i).
    sliding_window: with ``is_causal``, query i sees only keys j with
      i - sliding_window < j <= i (Mistral's window); None = no window.
  Returns:
    [batch, q_length, heads, head_dim].
  """
  if sliding_window is not None and not is_causal:
    raise ValueError("sliding_window needs is_causal=True (a caller with its own mask "
                     "builds the window into it)")
  dropout = dropout_rate > 0.0 and dropout_rng is not None
  if implementation is None and jax.default_backend() == "cpu":
    implementation = "einsum"
  if dropout or implementation == "einsum":
    heads, kv_heads = query.shape[2], key.shape[2]
    if heads != kv_heads:
      key = jnp.repeat(key, heads // kv_heads, axis=2)
      value = jnp.repeat(value, heads // kv_heads, axis=2)
    one_query = (query.shape[1] == 1 and not dropout
                 and math.prod(key.shape) >= ONE_QUERY_REDUCE_MIN)
    if one_query:   # [b, 1, h, d] x [b, k, h, d] -> [b, h, 1, k], reading the cache once
      logits = jnp.sum(query.astype(jnp.float32) * key.astype(jnp.float32), axis=-1)
      logits = jnp.transpose(logits, (0, 2, 1))[:, :, None, :]
    else:
      logits = jnp.einsum("bqhd,bkhd->bhqk", query, key,
                          preferred_element_type=jnp.float32)
    logits = logits * jnp.float32(1.0 / math.sqrt(query.shape[-1]))
    if is_causal:
      causal = jnp.tril(jnp.ones((query.shape[1], key.shape[1]), bool))
      if sliding_window is not None:  # The same mask as local_window_size below.
        causal = jnp.logical_and(
            causal, jnp.triu(jnp.ones_like(causal), -(sliding_window - 1)))
      mask = causal if mask is None else jnp.logical_and(mask, causal)
    if mask is not None:
      logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    if dropout:
      keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs.shape)
      probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
    if one_query:   # sum_k p[b, h, k] v[b, k, h, d] -> [b, 1, h, d]
      weights = jnp.transpose(probs[:, :, 0, :], (0, 2, 1))[..., None]   # [b, k, h, 1]
      out = jnp.sum(weights * value.astype(jnp.float32), axis=1, keepdims=True)
      return out.astype(value.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs.astype(value.dtype), value)
  if mask is not None:
    mask = jnp.broadcast_to(
        mask, (query.shape[0], query.shape[2], query.shape[1], key.shape[1]))
  window = None if sliding_window is None else (sliding_window - 1, 0)
  return jax.nn.dot_product_attention(query, key, value, mask=mask, is_causal=is_causal,
                                      local_window_size=window,
                                      implementation=implementation)


class DenseGeneral(nn.Module):
  """``y = x . kernel + bias`` contracting the trailing ``num_contract`` axes of x.

  The kernel is created at its true shape ``[*x.shape[-num_contract:], *features]`` (so
  its logical axes apply to every dimension, also under a mesh).
  """

  features: tuple[int, ...]
  kernel_axes: tuple[Optional[str], ...]
  num_contract: int = 1
  use_bias: bool = False
  init_std: float = 0.02
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    n = self.num_contract
    shape = tuple(x.shape[-n:]) + tuple(self.features)
    kernel = self.param("kernel", normal_init(self.init_std, self.kernel_axes), shape,
                        self.param_dtype)
    # One 2-D matmul [tokens, in] x [in, out] (reshapes of contiguous axes are free):
    # its gradients are plain NN/NT/TN dots. A dot_general over [batch, length, ...]
    # makes the kernel gradient contract two axes, which XLA:CPU lowers to a
    # transposed copy and a TT dot at ~half the matmul rate (issue 18: 1.9x on the
    # MLP's fwd+bwd).
    lead = x.shape[:x.ndim - n]
    fan_in = math.prod(shape[:n])
    y = matmul(x.reshape(math.prod(lead), fan_in),
               kernel.reshape(fan_in, math.prod(self.features)), self.dtype)
    y = y.reshape(*lead, *self.features)
    if self.use_bias:
      bias_axes = self.kernel_axes[n:]
      bias = self.param("bias", zeros_init(bias_axes), tuple(self.features),
                        self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


class Attention(nn.Module):
  """Multi-head / grouped-query attention with optional RoPE.

  Self-attention when ``inputs_kv`` is None; cross-attention otherwise (used by the
  Retro encoder, over decoder chunk states, and by CCA, over encoded neighbors).

  Parameters: ``query`` [embed, heads, head_dim], ``key``/``value``
  [kv_embed, kv_heads, head_dim], ``out`` [heads, head_dim, out_features]. Biases:
  ``qkv_bias`` on query/key/value, ``out_bias`` on ``out`` (None = ``use_bias``).

  ``sliding_window`` restricts causal attention (``is_causal=True``) to the last
  ``sliding_window`` keys; callers that pass their own mask instead (KV-cache decode
  steps) build the window into it.

  ``__call__`` is ``project_query`` + ``project_key_value`` + ``attend``; decoding
  (``retro_jax.models.decoding``) calls the three steps itself to cache keys/values.
  """

  num_heads: int
  num_kv_heads: int
  head_dim: int
  out_features: int
  use_bias: bool = False
  qkv_bias: bool = False
  out_bias: Optional[bool] = None
  init_std: float = 0.02
  out_init_std: float = 0.02
  rotary_dims: int = 0
  rope_theta: float = 10000.0
  sliding_window: Optional[int] = None
  dropout_rate: float = 0.0
  implementation: Optional[str] = None
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32

  def setup(self):
    self.query = self._proj(self.num_heads, "query")
    self.key = self._proj(self.num_kv_heads, "key")
    self.value = self._proj(self.num_kv_heads, "value")
    self.out = DenseGeneral(features=(self.out_features,),
                            kernel_axes=("heads", "head_dim", "embed"), num_contract=2,
                            use_bias=self.use_bias if self.out_bias is None
                            else self.out_bias, init_std=self.out_init_std,
                            dtype=self.dtype, param_dtype=self.param_dtype, name="out")

  def _proj(self, heads: int, name: str) -> DenseGeneral:
    head_axis = "heads" if name == "query" else "kv_heads"
    return DenseGeneral(features=(heads, self.head_dim),
                        kernel_axes=("embed", head_axis, "head_dim"),
                        use_bias=self.qkv_bias, init_std=self.init_std, dtype=self.dtype,
                        param_dtype=self.param_dtype, name=name)

  def _rope(self, x: Array, positions: Optional[Array]) -> Array:
    if not self.rotary_dims:
      return x
    if positions is None:
      raise ValueError("Attention with RoPE needs positions [batch, length]")
    return apply_rope(x, positions, self.rotary_dims, self.rope_theta)

  def project_query(self, inputs_q: Array, positions: Optional[Array] = None) -> Array:
    """[batch, q_len, q_features] -> queries [batch, q_len, heads, head_dim] (RoPE'd)."""
    query = constrain(self.query(inputs_q), BATCH_LENGTH_HEADS_KV)
    return self._rope(query, positions)

  def project_key_value(self, inputs_kv: Array, positions: Optional[Array] = None
                        ) -> tuple[Array, Array]:
    """[batch, kv_len, kv_features] -> keys and values [batch, kv_len, kv_heads, head_dim].

    Decoding caches these (keys already RoPE'd at their absolute positions).
    """
    key = constrain(self.key(inputs_kv), BATCH_LENGTH_HEADS_KV)
    value = constrain(self.value(inputs_kv), BATCH_LENGTH_HEADS_KV)
    return self._rope(key, positions), value

  def attend(self, query: Array, key: Array, value: Array, *,
             mask: Optional[Array] = None, is_causal: bool = False,
             deterministic: bool = True) -> Array:
    """Attention of projected queries to projected keys/values, then the output
    projection: [batch, q_len, heads, head_dim] -> [batch, q_len, out_features]."""
    dropout_rng = None
    if self.dropout_rate > 0.0 and not deterministic:
      dropout_rng = self.make_rng("dropout")
    out = dot_product_attention(query, key, value, mask=mask, is_causal=is_causal,
                                sliding_window=self.sliding_window if is_causal else None,
                                implementation=self.implementation,
                                dropout_rate=self.dropout_rate, dropout_rng=dropout_rng)
    return self.out(constrain(out, BATCH_LENGTH_HEADS_KV))

  def __call__(self, inputs_q: Array, inputs_kv: Optional[Array] = None, *,
               positions: Optional[Array] = None, mask: Optional[Array] = None,
               is_causal: bool = False, deterministic: bool = True) -> Array:
    """inputs_q: [batch, q_len, q_features]; inputs_kv: [batch, kv_len, kv_features].

    ``positions`` (int [batch, q_len]) drive RoPE and are used for both queries and
    keys, so RoPE applies to self-attention only. Returns [batch, q_len, out_features].
    """
    if self.rotary_dims and inputs_kv is not None:
      raise ValueError("RoPE applies to self-attention only (inputs_kv must be None)")
    kv_in = inputs_q if inputs_kv is None else inputs_kv
    query = self.project_query(inputs_q, positions)
    key, value = self.project_key_value(kv_in, positions)
    return self.attend(query, key, value, mask=mask, is_causal=is_causal,
                       deterministic=deterministic)


# MLP -------------------------------------------------------------------------------


_ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


class Mlp(nn.Module):
  """Position-wise MLP; gated (GLU: ``act(x W_0) * (x W_1)``, SwiGLU with silu) or not.

  Parameters: ``wi`` [embed, mlp] (or ``wi_0`` gate and ``wi_1`` up), ``wo`` [mlp, embed].
  """

  mlp_dim: int
  activation: str = "gelu"
  gated: bool = False
  use_bias: bool = False
  init_std: float = 0.02
  out_init_std: float = 0.02
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32

  def _dense(self, features: int, axes, std: float, name: str) -> DenseGeneral:
    return DenseGeneral(features=(features,), kernel_axes=axes, use_bias=self.use_bias,
                        init_std=std, dtype=self.dtype, param_dtype=self.param_dtype,
                        name=name)

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x: [batch, length, embed] -> [batch, length, embed]."""
    act = _ACTIVATIONS[self.activation]
    if self.gated:
      gate = self._dense(self.mlp_dim, ("embed", "mlp"), self.init_std, "wi_0")(x)
      up = self._dense(self.mlp_dim, ("embed", "mlp"), self.init_std, "wi_1")(x)
      h = act(gate) * up
    else:
      h = act(self._dense(self.mlp_dim, ("embed", "mlp"), self.init_std, "wi")(x))
    h = constrain(h, ("activation_batch", "activation_length", "activation_mlp"))
    return self._dense(x.shape[-1], ("mlp", "embed"), self.out_init_std, "wo")(h)
