r"""Dataset leakage (RETRO §2.6 / §4.4): how much of an evaluated chunk its neighbors hold.

    overlap = chunk_overlaps(batch, chunk_length, pad_id)      # [batch, L]
    classes = overlap_classes()     # name -> mask_fn(batch) over target tokens

Which neighbors condition a chunk. With RETRO's shifted chunked cross-attention
(``retro_jax.models.cca``), the decoder input at position t attends to the neighbors of
chunk ``j = (t + 1) // m - 1``; that input predicts the target at t, the sequence token
t + 1, which lies in chunk ``v = (t + 1) // m = j + 1``. So every token of the
*evaluated chunk* ``C_v`` (sequence tokens ``[v*m, (v+1)*m)``, target positions
``[v*m - 1, v*m + m - 1)``) is predicted with exactly the neighbors retrieved for
``C_{v-1}`` (each a DB chunk and its continuation, 2m tokens), and only with them: the
overlap of ``C_v`` is measured against those neighbors, not against its own, whose
retrieval the model never sees while predicting ``C_v``.

The overlap of ``C_v`` is the length of the longest run of consecutive scored tokens of
``C_v`` that occurs, contiguously, in any present neighbor of ``C_{v-1}`` (masked
neighbors, and pad tokens inside a neighbor, match nothing), divided by the number of
scored tokens of ``C_v`` (m, except where a document's padding ends the chunk; pad
targets are not scored). A chunk whose neighbors are all masked has overlap 0.

Not bucketed: chunk 0 (target positions ``0 .. m-2``: no neighbors condition it; its own
row) and each example's last target (position n - 1, the first token of the next
chunk, which the example does not hold; the rest of ``'all'``).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np

from retro_jax.models import cca

OVERLAP_FEATURE = "target_overlap"       # float [batch, n]; NaN: not bucketed
CHUNK_ZERO = "chunk 0 (no neighbors)"
BUCKET_EDGES = (0.0, 0.125, 0.25, 0.5, 0.75, 1.0)
THRESHOLDS = (0.125, 0.25, 0.5)
ALL_CHUNKS = "chunks 1.. (any overlap)"
UNBUCKETED = "last target of each example"


def evaluated_chunk_of_target(n: int, chunk_length: int) -> np.ndarray:
  """The evaluated chunk ``v`` of every target position ``[n]`` (0: before any
  neighbors; ``n // m``: the last target, the next chunk's first token)."""
  return np.asarray(cca.neighbor_chunk_of_token(np.arange(n), chunk_length)) + 1


def longest_common_run(chunks: np.ndarray, chunk_valid: np.ndarray,
                       neighbors: np.ndarray, neighbor_valid: np.ndarray) -> np.ndarray:
  """Longest run of consecutive valid chunk tokens found contiguously in a neighbor.

  Args:
    chunks: int [..., m]; chunk_valid: bool [..., m] (invalid tokens match nothing).
    neighbors: int [..., k, r]; neighbor_valid: bool [..., k, r].
  Returns:
    int64 [...]: the longest common substring length over the k neighbors.
  """
  a = np.where(chunk_valid, chunks, -1)
  b = np.where(neighbor_valid, neighbors, -2)
  lead = a.shape[:-1]
  k, r = b.shape[-2:]
  best = np.zeros(lead + (k,), np.int64)
  run = np.zeros(lead + (k, r), np.int64)        # run[..., j]: common suffix ending at (i, j)
  for i in range(a.shape[-1]):
    matches = a[..., None, i:i + 1] == b                                  # [..., k, r]
    shifted = np.concatenate([np.zeros(lead + (k, 1), np.int64), run[..., :-1]], -1)
    run = np.where(matches, shifted + 1, 0)
    best = np.maximum(best, run.max(-1, initial=0))
  return best.max(-1, initial=0)


def chunk_overlaps(batch: Mapping[str, Any], chunk_length: int, pad_id: int
                   ) -> np.ndarray:
  """Overlap of every evaluated chunk of a batch with the neighbors that condition it.

  Args:
    batch: model features: ``decoder_target_tokens``/``decoder_loss_weights [b, n]``,
      ``neighbor_tokens [b, L, k, r]``, ``neighbor_mask [b, L, k]``.
  Returns:
    float64 [b, L]: entry v (1 <= v < L) is the overlap of chunk ``C_v`` with the
    neighbors of ``C_{v-1}``; NaN for v = 0 and for chunks with no scored token.
  """
  m = chunk_length
  targets = np.asarray(batch["decoder_target_tokens"])
  weights = np.asarray(batch["decoder_loss_weights"]) > 0
  neighbors = np.asarray(batch["neighbor_tokens"])
  present = np.asarray(batch["neighbor_mask"], bool)
  b, n = targets.shape
  num_chunks = n // m
  out = np.full((b, num_chunks), np.nan)
  if num_chunks < 2:
    return out
  positions = (np.arange(1, num_chunks)[:, None] * m - 1) + np.arange(m)   # [L-1, m]
  chunks, valid = targets[:, positions], weights[:, positions]             # [b, L-1, m]
  conditioning = neighbors[:, :num_chunks - 1]                             # C_{v-1}'s
  neighbor_valid = present[:, :num_chunks - 1, :, None] & (conditioning != pad_id)
  longest = longest_common_run(chunks, valid, conditioning, neighbor_valid)
  scored = valid.sum(-1)
  with np.errstate(invalid="ignore", divide="ignore"):
    out[:, 1:] = np.where(scored > 0, longest / scored, np.nan)
  return out


def target_overlaps(batch: Mapping[str, Any], chunk_length: int, pad_id: int
                    ) -> np.ndarray:
  """``chunk_overlaps`` spread over target positions: float [b, n], the overlap of the
  evaluated chunk of each target; NaN for chunk 0 and the last target."""
  overlap = chunk_overlaps(batch, chunk_length, pad_id)
  n = np.asarray(batch["decoder_target_tokens"]).shape[1]
  v = evaluated_chunk_of_target(n, chunk_length)
  padded = np.concatenate([overlap, np.full((overlap.shape[0], 1), np.nan)], 1)
  return padded[:, v]


def bucket_name(lo: float, hi: float, last: bool) -> str:
  return f"overlap [{lo:.1%}, {hi:.1%}{']' if last else ')'}"


def overlap_classes(edges: Sequence[float] = BUCKET_EDGES,
                    thresholds: Sequence[float] = THRESHOLDS, chunk_length: int = 64
                    ) -> dict[str, Callable[[Mapping[str, Any]], np.ndarray]]:
  """Token classes of a batch that carries ``OVERLAP_FEATURE`` (``target_overlaps``):
  chunk 0, one bucket per ``[edges[i], edges[i+1])`` (the last one closed), one
  filter per threshold (overlap strictly below it) and every bucketed chunk."""
  if list(edges) != sorted(edges) or len(edges) < 2:
    raise ValueError(f"overlap bucket edges must be increasing, got {list(edges)}")

  def overlap(batch):
    if OVERLAP_FEATURE not in batch:
      raise ValueError(f"leakage classes need the batch feature {OVERLAP_FEATURE!r} "
                       "(leakage.target_overlaps)")
    return np.asarray(batch[OVERLAP_FEATURE])

  def chunk_zero(batch):
    n = np.asarray(batch["decoder_target_tokens"]).shape[1]
    return np.broadcast_to(evaluated_chunk_of_target(n, chunk_length) == 0,
                           overlap(batch).shape)

  classes = {CHUNK_ZERO: chunk_zero}
  for i, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
    last = i == len(edges) - 2
    classes[bucket_name(lo, hi, last)] = (
        lambda batch, lo=lo, hi=hi, last=last: (overlap(batch) >= lo) & (
            (overlap(batch) <= hi) if last else (overlap(batch) < hi)))
  for t in thresholds:
    classes[f"overlap < {t:.1%}"] = lambda batch, t=t: overlap(batch) < t
  classes[ALL_CHUNKS] = lambda batch: ~np.isnan(overlap(batch))
  return classes


def chunk_counts(overlaps: np.ndarray, edges: Sequence[float] = BUCKET_EDGES,
                 thresholds: Sequence[float] = THRESHOLDS) -> dict[str, int]:
  """Evaluated chunks (with a scored token) per class of ``overlap_classes``, from
  ``chunk_overlaps`` rows ``[..., L]``."""
  o = np.asarray(overlaps)
  o = o[..., 1:]
  known = ~np.isnan(o)
  counts = {}
  for i, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
    last = i == len(edges) - 2
    counts[bucket_name(lo, hi, last)] = int(np.sum(known & (o >= lo) & (
        (o <= hi) if last else (o < hi))))
  for t in thresholds:
    counts[f"overlap < {t:.1%}"] = int(np.sum(known & (o < t)))
  counts[ALL_CHUNKS] = int(np.sum(known))
  return counts
