"""Analytic FLOP counts for MFU: matmul FLOPs of one example, forward and training.

Conventions (PaLM appendix B, as MaxText): a [a, b] x [b, c] matmul is 2abc FLOPs;
self-attention scores and values count the full n x n square (no causal discount);
training = 3 x forward (backward is twice the forward); norms, softmax and
elementwise ops are ignored.

Retro adds (per example of n tokens, L = n // m chunks, k neighbors of r tokens):
  * the encoder over L*k*r tokens (= 2kn for r = 2m, i.e. 4n at k = 2): self-attention
    and MLP in every encoder layer, cross-attention to the m chunk states in the first;
  * CCA in each CCA layer: L*m query tokens against k*r encoded tokens.
So an encoder as wide as the decoder (Megatron) costs about 2k * encoder_layers decoder
layers of compute; a narrower encoder (DeepMind RETRO) costs quadratically less.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from retro_jax.models.config import RetroConfig


@dataclasses.dataclass(frozen=True)
class FlopCount:
  """Forward FLOPs of one example, by part."""

  decoder: float
  logits: float
  encoder: float
  cca: float

  @property
  def forward(self) -> float:
    return self.decoder + self.logits + self.encoder + self.cca

  @property
  def train(self) -> float:
    return 3.0 * self.forward


def _attention_block(q_tokens: float, kv_tokens_per_query_block: float, q_width: int,
                     kv_width: int, heads: int, kv_heads: int, head_dim: int,
                     kv_proj_tokens: float) -> float:
  """FLOPs of q/k/v/out projections plus scores and weighted values."""
  proj_q_out = 2 * q_tokens * (2 * q_width * heads * head_dim)
  proj_kv = 2 * kv_proj_tokens * (2 * kv_width * kv_heads * head_dim)
  scores_values = 2 * 2 * q_tokens * kv_tokens_per_query_block * heads * head_dim
  return proj_q_out + proj_kv + scores_values


def _mlp(tokens: float, width: int, mlp_dim: int, gated: bool) -> float:
  return 2 * tokens * width * mlp_dim * (3 if gated else 2)


def count_flops(config: RetroConfig, seq_len: int, *, num_neighbors: Optional[int] = None,
                retrieval: bool = True) -> FlopCount:
  """FLOPs of one forward pass over one example of ``seq_len`` tokens."""
  c = config
  n, d = seq_len, c.hidden_size
  per_layer = (_attention_block(n, n, d, d, c.num_heads, c.kv_heads, c.dim_per_head, n)
               + _mlp(n, d, c.mlp_dim, c.mlp_gated))
  decoder = c.num_layers * per_layer
  logits = 2 * n * d * c.vocab_size
  encoder = cca = 0.0
  chunks = n // c.chunk_length
  if retrieval and chunks:
    k = c.num_neighbors if num_neighbors is None else num_neighbors
    r, m, e, eh = c.neighbor_length, c.chunk_length, c.encoder_width, c.encoder_heads
    ehd = c.dim_per_head if (e == d and eh == c.num_heads) else e // eh
    enc_tokens = chunks * k * r
    encoder = c.encoder_num_layers * (
        _attention_block(enc_tokens, r, e, e, eh, eh, ehd, enc_tokens)
        + _mlp(enc_tokens, e, c.encoder_mlp, c.mlp_gated))
    encoder += _attention_block(enc_tokens, m, e, d, eh, eh, ehd, chunks * m)
    if e != d:
      encoder += 2 * enc_tokens * d * e
    cca = len(c.retro_layers) * _attention_block(
        chunks * m, k * r, d, e, c.num_heads, c.num_heads, c.dim_per_head, enc_tokens)
  return FlopCount(decoder=decoder, logits=logits, encoder=encoder, cca=cca)


# Dense peak TFLOP/s by device kind (bf16), for MFU. Keys match `device.device_kind`.
PEAK_TFLOPS = {
    "NVIDIA H100 80GB HBM3": 989.0,
    "NVIDIA H100": 989.0,
    "NVIDIA H200": 989.0,
    "NVIDIA A100-SXM4-80GB": 312.0,
    "NVIDIA A100-SXM4-40GB": 312.0,
    "TPU v4": 275.0,
    "TPU v5 lite": 197.0,
    "TPU v5": 459.0,
}


def peak_tflops(device_kind: str) -> Optional[float]:
  """Peak bf16 TFLOP/s of a device kind, or None when unknown (e.g. CPU)."""
  if device_kind in PEAK_TFLOPS:
    return PEAK_TFLOPS[device_kind]
  for kind, value in PEAK_TFLOPS.items():
    if device_kind.startswith(kind):
      return value
  return None
