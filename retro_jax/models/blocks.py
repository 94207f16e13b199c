"""Layers built from a `RetroConfig`: the decoder layer and the Retro encoder.

Decoder layer (pre-norm; a CCA layer adds the middle step):

    x = x + self_attention(pre_attention_norm(x))          causal, RoPE or none
    y = pre_cca_norm(x)                                      CCA layers only
    [first CCA layer: encoded = retro_encoder(neighbors, chunks(y))]
    x = x + cca(y, encoded)                                  zero where no neighbors
    x = x + mlp(pre_mlp_norm(x))

The MLP norm has the same name in CCA and plain layers, so a GPT checkpoint maps onto
a Retro decoder one to one, and with CCA off the layer is exactly the GPT layer.
(Megatron names: input_norm, post_attention_norm (= our pre_cca_norm in a retro
layer), post_inter_attention_norm (= our pre_mlp_norm in a retro layer).)

Retro encoder layer (bidirectional; first layer only has the cross-attention):

    x = x + self_attention(pre_attention_norm(x))
    x = x + cross_attention(pre_cross_attention_norm(x), decoder chunk states)
    x = x + mlp(pre_mlp_norm(x))

The cross-attention residual is the pre-norm stream, as in the legacy Megatron code
that trained the released InstructRetro checkpoints; with
``encoder_cross_attention_residual='normed'`` it is the normed input (megatron-core):
``x = norm(x) + cross_attention(norm(x), ...)``.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from retro_jax.models import cca as cca_lib
from retro_jax.models import decoding
from retro_jax.models import layers
from retro_jax.models.config import RetroConfig

Array = jax.Array


def make_norm(cfg: RetroConfig, name: str) -> layers.Norm:
  return layers.Norm(norm_type=cfg.norm_type, eps=cfg.norm_eps,
                     zero_centered_gamma=cfg.norm_zero_centered_gamma,
                     dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype, name=name)


def out_init_std(cfg: RetroConfig) -> float:
  """Megatron's scaled init for projections that write into the residual stream."""
  return cfg.init_std / (2 * cfg.num_layers) ** 0.5


def make_attention(cfg: RetroConfig, *, width: int, heads: int, kv_heads: int,
                   rotary: bool, dropout_rate: float, name: str,
                   decoder_self_attention: bool = False) -> layers.Attention:
  """An attention layer of the decoder or the Retro encoder.

  ``decoder_self_attention`` applies the decoder-only settings: the output-projection
  bias ``cfg.attention_out_bias`` and ``cfg.sliding_window``; the encoder keeps
  ``use_bias`` and full attention.
  """
  head_dim = cfg.dim_per_head if width == cfg.hidden_size and heads == cfg.num_heads \
      else width // heads
  return layers.Attention(
      num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, out_features=width,
      use_bias=cfg.use_bias, qkv_bias=cfg.has_qkv_bias,
      out_bias=cfg.has_attention_out_bias if decoder_self_attention else cfg.use_bias,
      init_std=cfg.init_std, out_init_std=out_init_std(cfg),
      rotary_dims=int(head_dim * cfg.rotary_fraction) // 2 * 2 if rotary else 0,
      rope_theta=cfg.rope_theta,
      sliding_window=cfg.sliding_window if decoder_self_attention else None,
      dropout_rate=dropout_rate,
      implementation=cfg.attention_impl, dtype=cfg.compute_dtype,
      param_dtype=cfg.params_dtype, name=name)


def make_mlp(cfg: RetroConfig, mlp_dim: int, name: str = "mlp") -> layers.Mlp:
  return layers.Mlp(mlp_dim=mlp_dim, activation=cfg.mlp_activation, gated=cfg.mlp_gated,
                    use_bias=cfg.use_bias, init_std=cfg.init_std,
                    out_init_std=out_init_std(cfg), dtype=cfg.compute_dtype,
                    param_dtype=cfg.params_dtype, name=name)


class EncoderLayer(nn.Module):
  """One bidirectional layer of the Retro encoder."""

  config: RetroConfig
  cross_attention: bool

  @nn.compact
  def __call__(self, x: Array, chunk_states: Array, positions: Array,
               deterministic: bool) -> Array:
    """x: [batch*L, k, r, e] neighbors; chunk_states: [batch*L, m, d]."""
    cfg = self.config
    rate = cfg.encoder_dropout_rate
    dropout = nn.Dropout(rate)
    width, heads = cfg.encoder_width, cfg.encoder_heads
    bl, k, r, e = x.shape
    flat = x.reshape(bl * k, r, e)
    h = make_norm(cfg, "pre_attention_norm")(flat)
    rotary = cfg.encoder_position_embedding == "rope"
    h = make_attention(cfg, width=width, heads=heads, kv_heads=heads, rotary=rotary,
                       dropout_rate=cfg.attention_dropout_rate,
                       name="self_attention")(
                           h, positions=positions if rotary else None,
                           deterministic=deterministic)
    flat = flat + dropout(h, deterministic=deterministic)
    if self.cross_attention:
      # All k neighbors of a chunk attend to the same m chunk states with no mask,
      # so they share one attention call with k*r queries.
      normed = make_norm(cfg, "pre_cross_attention_norm")(flat)
      h = make_attention(cfg, width=width, heads=heads, kv_heads=heads, rotary=False,
                         dropout_rate=cfg.attention_dropout_rate,
                         name="cross_attention")(normed.reshape(bl, k * r, e), chunk_states,
                                                 deterministic=deterministic)
      residual = normed if cfg.encoder_cross_attention_residual == "normed" else flat
      flat = residual + dropout(h.reshape(bl * k, r, e), deterministic=deterministic)
    h = make_mlp(cfg, cfg.encoder_mlp)(make_norm(cfg, "pre_mlp_norm")(flat))
    flat = flat + dropout(h, deterministic=deterministic)
    return flat.reshape(bl, k, r, e)


class RetroEncoder(nn.Module):
  """Bidirectional transformer over each neighbor, conditioned on its chunk.

  Computed once per forward pass, at the first CCA layer.
  """

  config: RetroConfig

  @nn.compact
  def __call__(self, neighbor_embeds: Array, chunk_states: Array, *,
               deterministic: bool = True) -> Array:
    """Encodes neighbors.

    Args:
      neighbor_embeds: [batch, L, k, r, d] neighbor tokens through the shared embedding.
      chunk_states: [batch, L, m, d] normed decoder states of each retrieving chunk.
    Returns:
      [batch, L, k, r, e] encoded neighbors.
    """
    cfg = self.config
    batch, num_chunks, k, r, d = neighbor_embeds.shape
    x = neighbor_embeds
    if cfg.encoder_width != d:
      x = layers.DenseGeneral(features=(cfg.encoder_width,),
                              kernel_axes=("embed", "encoder_embed"), init_std=cfg.init_std,
                              dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype,
                              name="input_projection")(x)
    x = x.reshape(batch * num_chunks, k, r, cfg.encoder_width)
    x = nn.with_logical_constraint(
        x, ("activation_batch", None, "activation_length", "activation_embed"))
    states = chunk_states.reshape(batch * num_chunks, *chunk_states.shape[2:])
    positions = jnp.broadcast_to(jnp.arange(r, dtype=jnp.int32), (batch * num_chunks * k, r))
    for i in range(cfg.encoder_num_layers):
      x = EncoderLayer(cfg, cross_attention=(i == 0), name=f"layers_{i}")(
          x, states, positions, deterministic)
    if cfg.encoder_final_norm:
      x = make_norm(cfg, "final_norm")(x)
    return x.reshape(batch, num_chunks, k, r, cfg.encoder_width)


class DecoderLayer(nn.Module):
  """A decoder layer; with ``has_cca`` it also holds chunked cross-attention, and
  with ``owns_encoder`` (the first CCA layer) the Retro encoder."""

  config: RetroConfig
  has_cca: bool = False
  owns_encoder: bool = False

  @nn.compact
  def __call__(self, x: Array, positions: Array, neighbor_embeds: Optional[Array],
               neighbor_mask: Optional[Array], encoded: Optional[Array],
               deterministic: bool, decode: Optional[decoding.DecodeInputs] = None
               ) -> tuple[Array, Optional[Array]]:
    """One layer.

    Args:
      x: [batch, n, d] residual stream.
      positions: int [batch, n].
      neighbor_embeds: [batch, L, k, r, d] (used by the encoder owner) or None.
      neighbor_mask: bool [batch, L, k] or None (retrieval off).
      encoded: [batch, L, k, r, e] from the encoder owner, or None.
      decode: decode mode and its caches (``retro_jax.models.decoding``); in a step,
        ``neighbor_embeds``/``neighbor_mask`` are those of ``decode.rows`` ([S, 1, k,
        r, d] / [S, k]) or None, and ``encoded`` is [S, 1, k, r, e] or None.
    Returns:
      (x, encoded): the new residual stream and the encoded neighbors.
    """
    cfg = self.config
    dropout = nn.Dropout(cfg.dropout_rate)
    x = layers.constrain(x, layers.BATCH_LENGTH_EMBED)
    h = make_norm(cfg, "pre_attention_norm")(x)
    attention = make_attention(cfg, width=cfg.hidden_size, heads=cfg.num_heads,
                               kv_heads=cfg.kv_heads,
                               rotary=cfg.position_embedding == "rope",
                               dropout_rate=cfg.attention_dropout_rate,
                               name="self_attention", decoder_self_attention=True)
    if decode is None:
      h = attention(h, positions=positions, is_causal=True, deterministic=deterministic)
    else:
      h = self._cached_self_attention(attention, h, positions, decode)
    x = x + dropout(h, deterministic=deterministic)
    with_cca = neighbor_mask is not None if decode is None else decode.retrieval
    if self.has_cca and with_cca:
      y = make_norm(cfg, "pre_cca_norm")(x)
      if self.owns_encoder:
        encoder = RetroEncoder(cfg, name="retro_encoder")
        if decode is not None and not decode.prefill:
          encoded = self._encode_completed_chunks(encoder, y, positions, neighbor_embeds,
                                                  decode)
        else:
          num_chunks = neighbor_embeds.shape[1]
          chunk_states = cca_lib.tokens_to_chunks(y, cfg.chunk_length, num_chunks)
          encoded = encoder(neighbor_embeds, chunk_states, deterministic=deterministic)
          if decode is not None:  # Prefill: the states of each prompt's open chunk.
            self._chunk_states(y).value = decoding.gather_positions(
                y, decoding.current_chunk_positions(decode.lengths, cfg.chunk_length))
      h = cca_lib.ChunkedCrossAttention(cfg, name="cca")(
          y, encoded, neighbor_mask, deterministic=deterministic, decode=decode)
      if cfg.cca_gate != 1.0:
        h = h * jnp.asarray(cfg.cca_gate, h.dtype)
      x = x + dropout(h, deterministic=deterministic)
    h = make_mlp(cfg, cfg.mlp_dim)(make_norm(cfg, "pre_mlp_norm")(x))
    x = x + dropout(h, deterministic=deterministic)
    return layers.constrain(x, layers.BATCH_LENGTH_EMBED), encoded

  def _cached_self_attention(self, attention: layers.Attention, h: Array,
                             positions: Array, decode: decoding.DecodeInputs) -> Array:
    """Causal self-attention that reads and writes the key/value cache.

    Prefill attends within the prompt exactly as the full pass does and stores its
    keys/values; a step writes its key/value at its position and attends to the
    cache up to it.
    """
    cfg = self.config
    query = attention.project_query(h, positions)
    key, value = attention.project_key_value(h, positions)
    if decode.prefill:
      shape = (h.shape[0], decode.cache_length, cfg.kv_heads, attention.head_dim)
      cached_key = decoding.cache_variable(self, "cached_key", shape, cfg.compute_dtype)
      cached_value = decoding.cache_variable(self, "cached_value", shape, cfg.compute_dtype)
      cached_key.value = decoding.write_positions(cached_key.value, key, positions)
      cached_value.value = decoding.write_positions(cached_value.value, value, positions)
      return attention.attend(query, key, value, is_causal=True)
    cached_key = decoding.existing_cache_variable(self, "cached_key")
    cached_value = decoding.existing_cache_variable(self, "cached_value")
    cached_key.value = decoding.write_positions(cached_key.value, key, positions)
    cached_value.value = decoding.write_positions(cached_value.value, value, positions)
    slots = jnp.arange(cached_key.value.shape[1])[None, None, :]
    visible = slots <= positions[:, :, None]  # [batch, q, cache_length]
    if cfg.sliding_window is not None:  # As in the full pass: i - window < j <= i.
      visible = jnp.logical_and(visible, slots > positions[:, :, None] - cfg.sliding_window)
    return attention.attend(query, cached_key.value, cached_value.value,
                            mask=visible[:, None])

  def _chunk_states(self, like: Optional[Array] = None):
    """Cache of the normed states of the chunk being written: [batch, m, d]; created
    (prefill) with the batch, width and dtype of ``like`` [batch, n, d]."""
    if like is None:
      return decoding.existing_cache_variable(self, "chunk_states")
    shape = (like.shape[0], self.config.chunk_length, like.shape[-1])
    return decoding.cache_variable(self, "chunk_states", shape, like.dtype)

  def _encode_completed_chunks(self, encoder: "RetroEncoder", y: Array, positions: Array,
                               neighbor_embeds: Optional[Array],
                               decode: decoding.DecodeInputs) -> Optional[Array]:
    """Decode step of the encoder owner: records this token's state in its chunk and,
    for the rows whose chunk completes here, encodes the chunk's new neighbors."""
    m = self.config.chunk_length
    states = self._chunk_states()
    states.value = decoding.write_positions(states.value, y, positions % m)
    if not decode.has_boundary:
      return None
    chunk_states = decoding.read_rows(states.value, decode.rows)[:, None]  # [S, 1, m, d]
    return encoder(neighbor_embeds, chunk_states, deterministic=True)
