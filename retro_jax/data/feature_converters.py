r"""Task features -> model features for Retro and GPT (t5x style, unpacked).

Task features (what every task of ``retro_jax.data.tasks`` yields per example)::

    targets          int32   [n + 1]            the example's tokens: n that the model
                                                reads and the one after them
    loss_weights     float32 [n + 1]            weight of token j as a prediction target
                                                (0 for pad, prompt and token 0)
    neighbor_tokens  int32   [n // m, k, r]     Retro tasks only: each chunk's k neighbors
    neighbor_mask    bool    [n // m, k]        Retro tasks only: False = missing neighbor

Model features (the batch contract of ``retro_jax.models.lm``)::

    decoder_input_tokens   int32   [n]  = targets[:-1]
    decoder_target_tokens  int32   [n]  = targets[1:]
    decoder_loss_weights   float32 [n]  = loss_weights[1:]
    neighbor_tokens, neighbor_mask      passed through (Retro only)

Why ``n + 1`` tokens and not seqio's shift-right: RETRO retrieves chunk u's neighbors
with the tokens the decoder *reads* at positions ``u*m .. u*m+m-1`` (Megatron samples
``seq_length + 1`` tokens for the same reason). With seqio's usual
``decoder_input_tokens = shift_right(targets)`` the chunk would contain the token that
position ``u*m+m-1`` must predict, and its neighbors could leak it. So task lengths
count ``n + 1`` tokens: ``task_feature_lengths(n, m)`` gives them.

``model_features`` (numpy) is the one definition of the conversion; the seqio
``RetroFeatureConverter`` / ``GPTFeatureConverter`` call it inside ``tf.data``, the
trainer's batch source calls it directly, so both paths give identical batches.
Packing is not supported (it would break chunk / neighbor alignment).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import seqio
import tensorflow as tf

TOKEN_TASK_FEATURES = ("targets", "loss_weights")
NEIGHBOR_FEATURES = ("neighbor_tokens", "neighbor_mask")
MODEL_TOKEN_FEATURES = ("decoder_input_tokens", "decoder_target_tokens",
                        "decoder_loss_weights")


def task_feature_lengths(seq_len: int, chunk_length: int = 64, *,
                         with_neighbors: bool = True) -> dict[str, int]:
  """seqio ``task_feature_lengths`` of n-token examples (``targets`` holds n + 1)."""
  if seq_len <= 0 or seq_len % chunk_length:
    raise ValueError(f"seq_len={seq_len} must be a positive multiple of chunk_length="
                     f"{chunk_length}")
  lengths = {"targets": seq_len + 1, "loss_weights": seq_len + 1}
  if with_neighbors:
    lengths.update(neighbor_tokens=seq_len // chunk_length,
                   neighbor_mask=seq_len // chunk_length)
  return lengths


def validate_task_features(features: Mapping[str, np.ndarray], *, with_neighbors: bool,
                           where: str = "task features") -> None:
  """Checks presence, dtypes, ranks and agreement of a batch of task features.

  Args:
    features: ``targets [B, n+1]``, ``loss_weights [B, n+1]`` and (``with_neighbors``)
      ``neighbor_tokens [B, l, k, r]``, ``neighbor_mask [B, l, k]`` with n divisible
      by l.
  Raises:
    ValueError naming ``where`` and the feature.
  """
  needed = TOKEN_TASK_FEATURES + (NEIGHBOR_FEATURES if with_neighbors else ())
  for key in needed:
    if key not in features:
      raise ValueError(f"{where}: missing feature {key!r} (has {sorted(features)})")
  targets, weights = (np.asarray(features[k]) for k in TOKEN_TASK_FEATURES)
  if targets.ndim != 2 or targets.dtype.kind not in "iu" or targets.shape[1] < 2:
    raise ValueError(f"{where}: targets must be int [batch, n + 1] with n >= 1, got "
                     f"{targets.dtype}{list(targets.shape)}")
  if weights.shape != targets.shape or weights.dtype.kind != "f":
    raise ValueError(f"{where}: loss_weights must be float {list(targets.shape)} like "
                     f"targets, got {weights.dtype}{list(weights.shape)}")
  if not with_neighbors:
    return
  b, n = targets.shape[0], targets.shape[1] - 1
  tokens, mask = (np.asarray(features[k]) for k in NEIGHBOR_FEATURES)
  if tokens.ndim != 4 or tokens.dtype.kind not in "iu" or tokens.shape[0] != b:
    raise ValueError(f"{where}: neighbor_tokens must be int [{b}, chunks, k, r], got "
                     f"{tokens.dtype}{list(tokens.shape)}")
  chunks = tokens.shape[1]
  if chunks == 0 or n % chunks:
    raise ValueError(f"{where}: neighbor_tokens has {chunks} chunks, which does not "
                     f"divide the n={n} input tokens (expected n // m chunks)")
  if mask.shape != tokens.shape[:3] or mask.dtype != np.bool_:
    raise ValueError(f"{where}: neighbor_mask must be bool {list(tokens.shape[:3])}, "
                     f"got {mask.dtype}{list(mask.shape)}")


def model_features(features: Mapping[str, np.ndarray], *, with_neighbors: bool,
                   where: str = "task features") -> dict[str, np.ndarray]:
  """Batched task features -> the trainer's model features (see the module docstring).

  Args:
    features: ``targets [B, n+1]``, ``loss_weights [B, n+1]`` (+ neighbor features).
  Returns:
    ``decoder_input_tokens``, ``decoder_target_tokens`` int32 ``[B, n]``,
    ``decoder_loss_weights`` float32 ``[B, n]`` (+ ``neighbor_tokens`` int32
    ``[B, n//m, k, r]``, ``neighbor_mask`` bool ``[B, n//m, k]``).
  """
  validate_task_features(features, with_neighbors=with_neighbors, where=where)
  targets = np.asarray(features["targets"], np.int32)
  out = {
      "decoder_input_tokens": np.ascontiguousarray(targets[:, :-1]),
      "decoder_target_tokens": np.ascontiguousarray(targets[:, 1:]),
      "decoder_loss_weights": np.ascontiguousarray(
          np.asarray(features["loss_weights"], np.float32)[:, 1:]),
  }
  if with_neighbors:
    out["neighbor_tokens"] = np.asarray(features["neighbor_tokens"], np.int32)
    out["neighbor_mask"] = np.asarray(features["neighbor_mask"], np.bool_)
  return out


_Spec = seqio.FeatureConverter.FeatureSpec


class RetroFeatureConverter(seqio.LMFeatureConverter):
  """seqio converter for Retro tasks: the five model features, unpacked.

      ds = seqio.get_dataset("retro_demo_train",
                             task_feature_lengths=task_feature_lengths(512, 64),
                             feature_converter=RetroFeatureConverter())
  """

  WITH_NEIGHBORS = True
  TASK_FEATURES = {
      "targets": _Spec(dtype=tf.int32),
      "loss_weights": _Spec(dtype=tf.float32),
      "neighbor_tokens": _Spec(dtype=tf.int32, rank=3),
      "neighbor_mask": _Spec(dtype=tf.bool, rank=2),
  }
  MODEL_FEATURES = {
      "decoder_input_tokens": _Spec(dtype=tf.int32),
      "decoder_target_tokens": _Spec(dtype=tf.int32),
      "decoder_loss_weights": _Spec(dtype=tf.float32),
      "neighbor_tokens": _Spec(dtype=tf.int32, rank=3),
      "neighbor_mask": _Spec(dtype=tf.bool, rank=2),
  }
  PACKING_FEATURE_DTYPES = None

  def __init__(self, pack: bool = False, **kwargs):
    if pack:
      raise ValueError(f"{type(self).__name__}: packing is not supported (it would "
                       "break the alignment of chunks and neighbors); use pack=False")
    super().__init__(pack=False, **kwargs)

  def _convert_example(self, features: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    keys = TOKEN_TASK_FEATURES + (NEIGHBOR_FEATURES if self.WITH_NEIGHBORS else ())
    out_keys = MODEL_TOKEN_FEATURES + (NEIGHBOR_FEATURES if self.WITH_NEIGHBORS else ())

    def convert(*arrays):
      batch = {k: a[None] for k, a in zip(keys, arrays)}
      converted = model_features(batch, with_neighbors=self.WITH_NEIGHBORS)
      return [converted[k][0] for k in out_keys]

    dtypes = [self.MODEL_FEATURES[k].dtype for k in out_keys]
    values = tf.numpy_function(convert, [features[k] for k in keys], dtypes,
                               stateful=False)
    out = {}
    for key, value in zip(out_keys, values):
      source = "targets" if key in MODEL_TOKEN_FEATURES else key
      shape = features[source].shape.as_list()
      if source == "targets":
        shape = [None if shape[0] is None else shape[0] - 1]
      value.set_shape(shape)
      out[key] = value
    return out

  def _convert_features(self, ds: tf.data.Dataset,
                        task_feature_lengths: Mapping[str, int]) -> tf.data.Dataset:
    ds = self._pack_or_pad(ds, task_feature_lengths)
    return ds.map(self._convert_example, num_parallel_calls=tf.data.AUTOTUNE)

  def get_model_feature_lengths(self, task_feature_lengths: Mapping[str, int]
                                ) -> dict[str, int]:
    n = task_feature_lengths["targets"] - 1
    if task_feature_lengths["loss_weights"] != n + 1:
      raise ValueError(f"task_feature_lengths: loss_weights="
                       f"{task_feature_lengths['loss_weights']} must equal targets={n + 1}"
                       " (see task_feature_lengths())")
    lengths = {k: n for k in MODEL_TOKEN_FEATURES}
    if self.WITH_NEIGHBORS:
      chunks = task_feature_lengths["neighbor_tokens"]
      if chunks <= 0 or n % chunks or task_feature_lengths["neighbor_mask"] != chunks:
        raise ValueError(f"task_feature_lengths: neighbor_tokens={chunks} and "
                         f"neighbor_mask={task_feature_lengths['neighbor_mask']} must both"
                         f" be n // m for targets = n + 1 = {n + 1}")
      lengths.update(neighbor_tokens=chunks, neighbor_mask=chunks)
    return lengths


class GPTFeatureConverter(RetroFeatureConverter):
  """seqio converter for GPT tasks (the Retro tasks' twins without neighbors)."""

  WITH_NEIGHBORS = False
  TASK_FEATURES = {k: v for k, v in RetroFeatureConverter.TASK_FEATURES.items()
                   if k in TOKEN_TASK_FEATURES}
  MODEL_FEATURES = {k: v for k, v in RetroFeatureConverter.MODEL_FEATURES.items()
                    if k in MODEL_TOKEN_FEATURES}
