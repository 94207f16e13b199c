"""`RetroConfig`: every architectural knob of the Retro model in one dataclass.

The defaults describe a GPT-2-small-sized decoder with the Megatron InstructRetro
retrieval settings (m = 64, k = 2, r = 2m, a 2-layer encoder, CCA from layer 6 then
every 3rd layer). Named sizes live in ``gin/models/*.gin``; the InstructRetro
architecture (1p LayerNorm, SwiGLU, untied output, half-RoPE, no biases) is
``gin/models/instructretro_8b.gin``.

Layer numbers in ``cca_layers`` are 1-based, as in Megatron and the papers
(layer 6 is ``layers_5`` in the parameter tree).
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Optional, Sequence

import gin
import jax.numpy as jnp

_NORMS = ("layernorm", "rmsnorm")
_POSITIONS = ("rope", "learned", "none")
_ENCODER_POSITIONS = ("none", "rope", "learned")
_ENCODER_RESIDUALS = ("stream", "normed")
_ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu")
_REMAT = ("none", "full", "dots", "dots_with_no_batch_dims")
_ATTENTION_IMPLS = (None, "xla", "cudnn", "einsum")
DTYPES = ("float32", "bfloat16", "float16")   # dtype / param_dtype


def default_cca_layers(num_layers: int) -> tuple[int, ...]:
  """Megatron's RETRO schedule: 1-based layers 6, 9, ... (<= 15 layers) or 9, 12, ...

  >>> default_cca_layers(12)
  (6, 9, 12)
  >>> default_cca_layers(32)
  (9, 12, 15, 18, 21, 24, 27, 30)
  """
  start = 6 if num_layers <= 15 else 9
  if num_layers < start:  # Tiny test models: keep one CCA layer, the last one.
    return (num_layers,)
  return tuple(range(start, num_layers + 1, 3))


@gin.configurable
@dataclasses.dataclass(frozen=True)
class RetroConfig:
  """Architecture of a Retro model (decoder, retrieval encoder, CCA).

  Decoder:
    vocab_size: Rows of the token embedding (and of the output layer).
    hidden_size: Decoder width d.
    num_layers: Decoder layers.
    num_heads: Query heads of decoder self-attention and CCA.
    num_kv_heads: Key/value heads of self-attention (grouped-query attention);
      None means ``num_heads`` (multi-head attention).
    head_dim: Per-head width; None means ``hidden_size // num_heads``.
    mlp_dim: Hidden width of the MLP.
    mlp_activation: 'gelu' (erf), 'gelu_tanh' (GPT-2's gelu_new), 'relu', 'silu'.
    mlp_gated: True for GLU MLPs (SwiGLU = gated + 'silu').
    norm_type: 'layernorm' or 'rmsnorm'.
    norm_eps: Epsilon of every norm.
    norm_zero_centered_gamma: Megatron's "LayerNorm-1p": y = norm(x) * (1 + w) + b,
      stored w = gamma - 1.
    use_bias: Biases in the linear layers (GPT-2: yes; Llama and InstructRetro: no).
    qkv_bias: Biases on q/k/v only (Qwen2-style); None means ``use_bias``.
    attention_out_bias: Bias on the output projection of decoder self-attention
      (Llama ``attention_bias=True`` has q/k/v and output biases, Qwen2 q/k/v only);
      None means ``use_bias``. The Retro encoder and CCA follow ``use_bias``.
    position_embedding: 'rope', 'learned' (absolute, ``max_length`` rows) or 'none'.
    max_length: Rows of the learned position table (unused with RoPE).
    rope_theta: RoPE base.
    rotary_fraction: Fraction of each head's dims that RoPE rotates (InstructRetro: 0.5).
    sliding_window: Decoder self-attention of query i sees keys j with
      i - sliding_window < j <= i (Mistral); None = all earlier keys. The Retro
      encoder and CCA are unaffected.
    tie_embeddings: Output layer is the transposed token embedding.
    init_std: Std of the normal initialiser; output projections get
      ``init_std / sqrt(2 * num_layers)`` (Megatron's scaled init).
  Retrieval:
    chunk_length: m, tokens per chunk.
    num_neighbors: k, neighbors per chunk (the model accepts any k at call time).
    retrieved_length: r, tokens per neighbor (the chunk and its continuation); None = 2m.
    cca_layers: 1-based decoder layers with chunked cross-attention; None = Megatron's
      schedule (``default_cca_layers``).
    encoder_num_layers: Layers of the bidirectional Retro encoder.
    encoder_hidden_size, encoder_num_heads, encoder_mlp_dim: encoder width, heads and
      MLP width; None means the decoder's value (Megatron shares them). A smaller
      encoder gets an input projection from the shared embedding.
    encoder_position_embedding: 'none' (InstructRetro), 'rope', or 'learned' (reuses the
      decoder's learned position table, as Megatron's mcore example does).
    encoder_dropout_rate: Hidden dropout in the encoder (Megatron default 0.1).
    encoder_final_norm: Megatron has none.
    encoder_cross_attention_residual: what the encoder's cross-attention adds its output
      to: 'stream' (the residual stream before the norm: Megatron-LM's legacy code,
      which trained the released InstructRetro checkpoints) or 'normed' (the normed
      input: megatron-core's ``RetroEncoderCrossAttention``).
    final_norm: a norm after the last decoder layer (Megatron legacy, GPT-2, Llama);
      megatron-core's Retro decoder (0.12) has none.
    cca_gate: CCA's update is multiplied by this before the residual add (Megatron
      legacy ``--retro-attention-gate``; 1 = on). Retrieval off (``neighbor_tokens=None``)
      is the gate-0 model without running the encoder.
  Numerics and memory:
    dropout_rate: Decoder hidden dropout. attention_dropout_rate: dropout on attention
      probabilities (disables the fused attention kernels when training).
    dtype: Compute dtype ('float32', 'bfloat16', 'float16'); params stay ``param_dtype``.
    remat_policy: rematerialise each decoder layer in the backward pass: 'none',
      'full' (save only layer inputs), 'dots' or 'dots_with_no_batch_dims' (save
      matmul outputs; jax.checkpoint_policies of the same names).
    attention_impl: None (best available: 'einsum' on CPU, cuDNN flash on GPU when it
      applies), 'xla' or 'cudnn' (``jax.nn.dot_product_attention``), or 'einsum'
      (``layers.dot_product_attention``).
  """

  vocab_size: int = 50304
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  num_kv_heads: Optional[int] = None
  head_dim: Optional[int] = None
  mlp_dim: int = 3072
  mlp_activation: str = "gelu"
  mlp_gated: bool = False
  norm_type: str = "layernorm"
  norm_eps: float = 1e-5
  norm_zero_centered_gamma: bool = False
  use_bias: bool = False
  qkv_bias: Optional[bool] = None
  attention_out_bias: Optional[bool] = None
  position_embedding: str = "rope"
  max_length: int = 2048
  rope_theta: float = 10000.0
  rotary_fraction: float = 1.0
  sliding_window: Optional[int] = None
  tie_embeddings: bool = True
  init_std: float = 0.02

  chunk_length: int = 64
  num_neighbors: int = 2
  retrieved_length: Optional[int] = None
  cca_layers: Optional[Sequence[int]] = None
  encoder_num_layers: int = 2
  encoder_hidden_size: Optional[int] = None
  encoder_num_heads: Optional[int] = None
  encoder_mlp_dim: Optional[int] = None
  encoder_position_embedding: str = "none"
  encoder_dropout_rate: float = 0.1
  encoder_final_norm: bool = False
  encoder_cross_attention_residual: str = "stream"
  final_norm: bool = True
  cca_gate: float = 1.0

  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat_policy: str = "none"
  attention_impl: Optional[str] = None

  def __post_init__(self):
    # gin passes lists; keep the dataclass hashable and comparable.
    if self.cca_layers is not None:
      object.__setattr__(self, "cca_layers", tuple(int(i) for i in self.cca_layers))
    if (isinstance(self.sliding_window, numbers.Integral)
        and not isinstance(self.sliding_window, bool)):
      object.__setattr__(self, "sliding_window", int(self.sliding_window))
    self.validate()

  # Derived values -------------------------------------------------------------

  @property
  def kv_heads(self) -> int:
    return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

  @property
  def dim_per_head(self) -> int:
    return self.hidden_size // self.num_heads if self.head_dim is None else self.head_dim

  @property
  def neighbor_length(self) -> int:
    """r: tokens per retrieved neighbor (chunk + continuation)."""
    return 2 * self.chunk_length if self.retrieved_length is None else self.retrieved_length

  @property
  def retro_layers(self) -> tuple[int, ...]:
    """1-based decoder layers that hold chunked cross-attention."""
    if self.cca_layers is None:
      return default_cca_layers(self.num_layers)
    return tuple(self.cca_layers)

  @property
  def first_retro_layer(self) -> int:
    return min(self.retro_layers)

  @property
  def encoder_width(self) -> int:
    return self.hidden_size if self.encoder_hidden_size is None else self.encoder_hidden_size

  @property
  def encoder_heads(self) -> int:
    return self.num_heads if self.encoder_num_heads is None else self.encoder_num_heads

  @property
  def encoder_mlp(self) -> int:
    if self.encoder_mlp_dim is not None:
      return self.encoder_mlp_dim
    if self.encoder_hidden_size is None:
      return self.mlp_dim
    return self.mlp_dim * self.encoder_width // self.hidden_size

  @property
  def has_qkv_bias(self) -> bool:
    return self.use_bias if self.qkv_bias is None else self.qkv_bias

  @property
  def has_attention_out_bias(self) -> bool:
    """Bias on the output projection of decoder self-attention."""
    return self.use_bias if self.attention_out_bias is None else self.attention_out_bias

  @property
  def compute_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.dtype)

  @property
  def params_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.param_dtype)

  def replace(self, **changes) -> "RetroConfig":
    return dataclasses.replace(self, **changes)

  def gin_bindings(self) -> str:
    """gin bindings (``RetroConfig.field = value`` lines) of every field that differs
    from the dataclass default: a model directory's ``model.gin``."""
    lines = [f"RetroConfig.{f.name} = {getattr(self, f.name)!r}"
             for f in dataclasses.fields(self) if getattr(self, f.name) != f.default]
    return "\n".join(lines) + "\n"

  # Validation ------------------------------------------------------------------

  def validate(self) -> None:
    """Raises ValueError naming the field for any inconsistent setting."""

    def fail(field: str, msg: str):
      raise ValueError(f"RetroConfig.{field}={getattr(self, field)!r}: {msg}")

    for field in ("vocab_size", "hidden_size", "num_layers", "num_heads", "mlp_dim",
                  "chunk_length", "num_neighbors", "encoder_num_layers", "max_length"):
      if int(getattr(self, field)) <= 0:
        fail(field, "must be a positive integer")
    if self.sliding_window is not None and (
        isinstance(self.sliding_window, bool)
        or not isinstance(self.sliding_window, numbers.Integral)
        or self.sliding_window <= 0):
      fail("sliding_window", "must be None or a positive integer")
    if self.head_dim is None and self.hidden_size % self.num_heads:
      fail("num_heads", f"must divide hidden_size={self.hidden_size} (or set head_dim)")
    if self.num_heads % self.kv_heads:
      fail("num_kv_heads", f"must divide num_heads={self.num_heads}")
    if self.norm_type not in _NORMS:
      fail("norm_type", f"must be one of {_NORMS}")
    if self.position_embedding not in _POSITIONS:
      fail("position_embedding", f"must be one of {_POSITIONS}")
    if self.encoder_position_embedding not in _ENCODER_POSITIONS:
      fail("encoder_position_embedding", f"must be one of {_ENCODER_POSITIONS}")
    if (self.encoder_position_embedding == "learned"
        and self.position_embedding != "learned"):
      fail("encoder_position_embedding",
           "'learned' reuses the decoder's learned position table, so it needs "
           "position_embedding='learned'")
    if (self.encoder_position_embedding == "learned"
        and self.neighbor_length > self.max_length):
      fail("encoder_position_embedding",
           f"needs max_length >= retrieved_length={self.neighbor_length}")
    if self.encoder_cross_attention_residual not in _ENCODER_RESIDUALS:
      fail("encoder_cross_attention_residual", f"must be one of {_ENCODER_RESIDUALS}")
    if self.mlp_activation not in _ACTIVATIONS:
      fail("mlp_activation", f"must be one of {_ACTIVATIONS}")
    if self.remat_policy not in _REMAT:
      fail("remat_policy", f"must be one of {_REMAT}")
    if self.attention_impl not in _ATTENTION_IMPLS:
      fail("attention_impl", f"must be one of {_ATTENTION_IMPLS}")
    for field in ("dtype", "param_dtype"):
      if getattr(self, field) not in DTYPES:
        fail(field, f"must be one of {DTYPES}")
    if not 0.0 < self.rotary_fraction <= 1.0:
      fail("rotary_fraction", "must be in (0, 1]")
    rot = int(self.dim_per_head * self.rotary_fraction)
    if self.position_embedding == "rope" and (rot < 2 or rot % 2):
      fail("rotary_fraction",
           f"rotates {rot} of {self.dim_per_head} head dims; must be an even number >= 2")
    if self.neighbor_length < self.chunk_length:
      fail("retrieved_length", f"must be >= chunk_length={self.chunk_length}")
    layers = self.retro_layers
    if not layers:
      fail("cca_layers", "must name at least one layer (use neighbor_tokens=None for "
           "a decoder-only forward pass)")
    if len(set(layers)) != len(layers) or any(
        not 1 <= i <= self.num_layers for i in layers):
      fail("cca_layers", f"must be distinct 1-based layer numbers in [1, {self.num_layers}]")
    if self.encoder_width % self.encoder_heads:
      fail("encoder_num_heads", f"must divide encoder width {self.encoder_width}")
    for field in ("dropout_rate", "attention_dropout_rate", "encoder_dropout_rate"):
      if not 0.0 <= getattr(self, field) < 1.0:
        fail(field, "must be in [0, 1)")
