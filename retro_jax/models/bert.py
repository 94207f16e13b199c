"""The BERT encoder of sentence-transformers checkpoints, and their pooling.

``BertEncoder`` is BERT (token + position + token-type embeddings, LayerNorm, post-LN
layers) composed of the shared layers of ``retro_jax.models.layers`` (``Attention``,
``Norm``, ``Mlp``, ``Embed``); ``pool`` computes sentence vectors from its token states
as sentence-transformers' Pooling (+ Normalize) modules do. Parameter tree::

    word_embeddings, position_embeddings, token_type_embeddings   {embedding}
    embeddings_norm                                               {scale, bias}
    layers_<i>: attention {query, key, value, out}, attention_norm, mlp {wi, wo}, mlp_norm

Hugging Face checkpoints are read into this tree by
``retro_jax.convert.sentence_encoder``; ``retro_jax.retrieval.embedders`` runs it.

    hidden = BertEncoder(config).apply({"params": params}, input_ids, attention_mask)
    vectors = pool(hidden, attention_mask, ("mean",), normalize=True)   # [batch, hidden]
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from retro_jax.models.layers import Attention, Embed, Mlp, Norm

# sentence-transformers' pooling modes.
POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """A BERT encoder's hyper-parameters (the fields of a Hugging Face ``config.json``)."""

  vocab_size: int = 30522
  hidden_size: int = 384
  num_layers: int = 6
  num_heads: int = 12
  intermediate_size: int = 1536
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  activation: str = "gelu"     # our Mlp's name: 'gelu' (erf), 'gelu_tanh', 'relu', 'silu'

  def __post_init__(self):
    if self.hidden_size % self.num_heads:
      raise ValueError(f"BertConfig: hidden_size={self.hidden_size} is not divisible by "
                       f"num_heads={self.num_heads}")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads


class BertLayer(nn.Module):
  """A post-LN BERT layer: ``x = LN(x + Attn(x)); x = LN(x + MLP(x))``."""

  config: BertConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    """x: [batch, length, hidden]; mask: bool [batch, 1, 1, length] (True = attend)."""
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = Attention(num_heads=c.num_heads, num_kv_heads=c.num_heads, head_dim=c.head_dim,
                  out_features=c.hidden_size, use_bias=True, qkv_bias=True,
                  implementation="xla", name="attention", **kw)(x, mask=mask)
    x = Norm(eps=c.layer_norm_eps, name="attention_norm", **kw)(x + h)
    h = Mlp(mlp_dim=c.intermediate_size, activation=c.activation, use_bias=True, name="mlp",
            **kw)(x)
    return Norm(eps=c.layer_norm_eps, name="mlp_norm", **kw)(x + h)


class BertEncoder(nn.Module):
  """BERT: token + position + token-type embeddings, LayerNorm, post-LN layers."""

  config: BertConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """input_ids, attention_mask: int [batch, length] -> hidden [batch, length, hidden]."""
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    batch, length = input_ids.shape
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    x = Embed(c.vocab_size, c.hidden_size, name="word_embeddings", **kw)(input_ids)
    x = x + Embed(c.max_position_embeddings, c.hidden_size, axes=(None, "embed"),
                  name="position_embeddings", **kw)(positions)
    x = x + Embed(c.type_vocab_size, c.hidden_size, axes=(None, "embed"),
                  name="token_type_embeddings", **kw)(jnp.zeros_like(input_ids))
    x = Norm(eps=c.layer_norm_eps, name="embeddings_norm", **kw)(x)
    mask = attention_mask.astype(bool)[:, None, None, :]
    for i in range(c.num_layers):
      x = BertLayer(c, name=f"layers_{i}", **kw)(x, mask)
    return x


def pool(hidden: jax.Array, attention_mask: jax.Array, modes: Sequence[str],
         normalize: bool) -> jax.Array:
  """Sentence vectors as sentence-transformers' Pooling (+ Normalize) computes them.

  Args:
    hidden: [batch, length, hidden] token states (right-padded).
    attention_mask: int/bool [batch, length], 1 on real tokens.
    modes: pooling modes (``POOLING_MODES``), concatenated in the given order.
    normalize: L2-normalise the result (sentence-transformers' Normalize module).
  Returns:
    float32 [batch, hidden * len(modes)].
  """
  h = hidden.astype(jnp.float32)
  m = attention_mask.astype(jnp.float32)[..., None]            # [batch, length, 1]
  count = jnp.maximum(jnp.sum(m, axis=1), 1e-9)
  outs = []
  for mode in modes:
    if mode == "cls":
      outs.append(h[:, 0])
    elif mode == "max":
      outs.append(jnp.max(jnp.where(m > 0, h, -jnp.inf), axis=1))
    elif mode == "mean":
      outs.append(jnp.sum(h * m, axis=1) / count)
    elif mode == "mean_sqrt_len_tokens":
      outs.append(jnp.sum(h * m, axis=1) / jnp.sqrt(count))
    elif mode == "weightedmean":                                 # weights 1, 2, ... per token
      w = m * jnp.arange(1, h.shape[1] + 1, dtype=jnp.float32)[None, :, None]
      outs.append(jnp.sum(h * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1e-9))
    elif mode == "lasttoken":
      last = jnp.maximum(jnp.sum(attention_mask.astype(jnp.int32), axis=1) - 1, 0)
      outs.append(jnp.take_along_axis(h, last[:, None, None], axis=1)[:, 0])
    else:
      raise ValueError(f"pooling mode {mode!r} is not supported; known: {POOLING_MODES}")
  out = jnp.concatenate(outs, axis=-1)
  if normalize:   # torch.nn.functional.normalize: x / max(||x||, 1e-12)
    out = out / jnp.maximum(jnp.linalg.norm(out, axis=-1, keepdims=True), 1e-12)
  return out
