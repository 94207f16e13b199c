r"""The deterministic example stream: a seeded bijection per epoch, a period blend.

Stream position p maps to an example directly (``ExampleStream``). With several sources
(a Mixture) position p falls in slot ``p % P`` of a fixed period of P = 1000 slots that
holds each source in proportion to its rate (Megatron's greedy blend), and source s's
local position follows from the period count. Within a source, local position q is
example ``permute(q % N, key(seed, s, q // N))``: a seeded Feistel bijection of [0, N)
that is different every epoch, computed per index with O(1) memory. Host h of H
(``seqio.ShardInfo``) takes the positions ``e * H + h`` for its elements e = 0, 1, ...;
the batch of step s on host h is elements ``[s*b, (s+1)*b)`` (b = global batch / H), so
the hosts of a step read positions ``[s*B, (s+1)*B)`` of one global stream: disjoint,
and covering it. **Resuming at step s** therefore needs no state: the batch source
(``retro_jax.data.batches``) computes those positions and reads them; nothing before
them is replayed. With ``num_epochs`` set (evaluation), positions past the end are
padding examples of weight 0, so a fixed number of batches scores every example exactly
once. ``stream_dataset`` serves a shard of the stream as ``tf.data`` (the same
positions, from any element on).
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import seqio
import tensorflow as tf

from retro_jax.data import feature_converters as fc
from retro_jax.data.sources import ExampleSource, empty_features

BLEND_PERIOD = 1000
_TF_BLOCK = 32                        # examples per numpy call inside tf.data

_U64 = np.uint64


def _mix64(x: np.ndarray) -> np.ndarray:
  """splitmix64's finaliser on uint64 arrays (wrapping arithmetic)."""
  x = x ^ (x >> _U64(30))
  x = x * _U64(0xBF58476D1CE4E5B9)
  x = x ^ (x >> _U64(27))
  x = x * _U64(0x94D049BB133111EB)
  return x ^ (x >> _U64(31))


def permute(indices, size: int, key: Sequence[int], rounds: int = 4) -> np.ndarray:
  """A seeded bijection of [0, size), evaluated at ``indices`` (int64 array).

  A balanced Feistel network on the smallest even-bit power-of-two domain >= size
  (<= 4 * size), with cycle walking back into [0, size): O(1) memory, any index.
  """
  if size <= 0:
    raise ValueError(f"size must be positive, got {size}")
  x = np.asarray(indices, np.int64)
  if x.size and (x.min() < 0 or x.max() >= size):
    raise IndexError(f"indices outside [0, {size})")
  if size == 1:
    return np.zeros_like(x)
  half = max(1, ((size - 1).bit_length() + 1) // 2)
  mask = _U64((1 << half) - 1)
  keys = np.random.SeedSequence(list(key)).generate_state(rounds, np.uint64)

  def once(v: np.ndarray) -> np.ndarray:
    left, right = v >> _U64(half), v & mask
    for round_key in keys:
      left, right = right, left ^ (_mix64(right ^ round_key) & mask)
    return (left << _U64(half)) | right

  with np.errstate(over="ignore"):
    out = once(x.astype(np.uint64))
    todo = out >= _U64(size)
    while todo.any():
      out[todo] = once(out[todo])
      todo = out >= _U64(size)
  return out.astype(np.int64)


def blend_schedule(rates: Sequence[float], period: int = BLEND_PERIOD
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Slots of one blend period: ``(slot_source [P], slot_rank [P], counts [S])``.

  Source s gets ``counts[s]`` of the P slots (its rate share, rounded by largest
  remainder, at least 1), spread by Megatron's greedy rule (each slot goes to the source
  furthest behind its share); ``slot_rank[t]`` numbers source ``slot_source[t]``'s slots.
  """
  rates = np.asarray(rates, np.float64)
  if (rates.ndim != 1 or not rates.size or (rates <= 0).any()
      or not np.isfinite(rates).all()):
    raise ValueError(f"rates must be positive numbers, got {rates.tolist()}")
  if len(rates) == 1:
    return np.zeros(1, np.int64), np.zeros(1, np.int64), np.ones(1, np.int64)
  if period < len(rates):
    raise ValueError(f"a blend period of {period} cannot hold {len(rates)} sources")
  share = rates / rates.sum() * period
  counts = np.floor(share).astype(np.int64)
  remainder = period - counts.sum()
  counts[np.argsort(-(share - np.floor(share)), kind="stable")[:remainder]] += 1
  for s in np.flatnonzero(counts == 0):          # every source keeps at least one slot
    counts[np.argmax(counts)] -= 1
    counts[s] = 1
  slot_source = np.empty(period, np.int64)
  slot_rank = np.empty(period, np.int64)
  assigned = np.zeros(len(rates), np.int64)
  for t in range(period):
    s = int(np.argmax(counts * (t + 1) / period - assigned))
    slot_source[t], slot_rank[t] = s, assigned[s]
    assigned[s] += 1
  return slot_source, slot_rank, counts


class ExampleStream:
  """The global example stream over sources with rates (see the module docstring).

  Args:
    sources: ``ExampleSource``s with the same n (and m, k, r when neighbors are used).
    rates: Mixing rates (default equal).
    seed: Seed of the per-epoch permutations.
    shuffle: False: source s's local position q is example q % N (no permutation).
    num_epochs: None = endless; else positions past ``num_epochs`` epochs of a source
      are padding examples (weight 0).
  """

  def __init__(self, sources: Sequence[ExampleSource],
               rates: Optional[Sequence[float]] = None, *, seed: int = 0,
               shuffle: bool = True, num_epochs: Optional[int] = None,
               period: int = BLEND_PERIOD):
    if not sources:
      raise ValueError("a stream needs at least one source")
    if seed < 0:
      raise ValueError(f"seed must be >= 0, got {seed}")
    if num_epochs is not None and num_epochs < 1:
      raise ValueError(f"num_epochs must be None or >= 1, got {num_epochs}")
    self.sources = list(sources)
    first = self.sources[0]
    for s in self.sources[1:]:
      if s.seq_len != first.seq_len:
        raise ValueError(f"sources of one stream must share n: {first.describe()} vs "
                         f"{s.describe()}")
    self.rates = [1.0] * len(sources) if rates is None else list(rates)
    if len(self.rates) != len(self.sources):
      raise ValueError(f"{len(self.rates)} rates for {len(self.sources)} sources")
    self.slot_source, self.slot_rank, self.counts = blend_schedule(self.rates, period)
    self.period = len(self.slot_source)
    self.seed, self.shuffle, self.num_epochs = seed, shuffle, num_epochs
    self.sizes = np.asarray([s.num_examples for s in self.sources], np.int64)

  @property
  def num_positions(self) -> Optional[int]:
    """Finite length (one source with ``num_epochs``), else None (endless)."""
    if self.num_epochs is None or len(self.sources) > 1:
      return None
    return int(self.sizes[0]) * self.num_epochs

  def locate(self, positions) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(source [P], example [P], valid [P])`` of stream positions ``[P]``."""
    p = np.asarray(positions, np.int64).reshape(-1)
    if p.size and p.min() < 0:
      raise IndexError(f"stream positions must be >= 0, got {p.min()}")
    period, slot = np.divmod(p, self.period)
    source = self.slot_source[slot]
    local = period * self.counts[source] + self.slot_rank[slot]
    epoch, within = np.divmod(local, self.sizes[source])
    valid = np.ones(p.shape, bool) if self.num_epochs is None else epoch < self.num_epochs
    example = within.copy()
    if self.shuffle:
      for s, e in np.unique(np.stack([source, epoch], 1), axis=0):
        sel = (source == s) & (epoch == e)
        example[sel] = permute(within[sel], int(self.sizes[s]), (self.seed, int(s), int(e)))
    return source, example, valid

  def features(self, positions, *, with_neighbors: bool) -> dict[str, np.ndarray]:
    """Task features of stream positions ``[P]`` (stacked, ``[P, ...]``)."""
    source, example, valid = self.locate(positions)
    out = empty_features(self.sources[0], len(source), with_neighbors)
    for s in np.unique(source[valid]):
      sel = valid & (source == s)
      got = self.sources[s].examples(example[sel], with_neighbors=with_neighbors)
      for key, value in out.items():
        if got[key].shape[1:] != value.shape[1:]:
          raise ValueError(f"{self.sources[s].describe()}: feature {key} has shape "
                           f"{list(got[key].shape[1:])}, but the stream's is "
                           f"{list(value.shape[1:])} (sources of a mixture must agree)")
        value[sel] = got[key]
    return out


def shard_positions(elements, shard_info: seqio.ShardInfo) -> np.ndarray:
  """Stream positions of a shard's elements: ``e * num_shards + index``."""
  return np.asarray(elements, np.int64) * shard_info.num_shards + shard_info.index


def stream_dataset(stream: ExampleStream, *, with_neighbors: bool,
                   shard_info: Optional[seqio.ShardInfo] = None,
                   start: int = 0) -> tf.data.Dataset:
  """The shard's task features from element ``start`` on, as a ``tf.data.Dataset``."""
  shard = shard_info or seqio.ShardInfo(0, 1)
  total = stream.num_positions
  stop = (np.iinfo(np.int64).max // max(shard.num_shards, 1) - _TF_BLOCK if total is None
          else max(0, -(-(total - shard.index) // shard.num_shards)))
  keys = ["targets", "loss_weights"] + (list(fc.NEIGHBOR_FEATURES) if with_neighbors
                                        else [])
  template = empty_features(stream.sources[0], 0, with_neighbors)
  dtypes = [tf.as_dtype(template[k].dtype) for k in keys]

  def load(elements: np.ndarray) -> list[np.ndarray]:
    got = stream.features(shard_positions(elements, shard), with_neighbors=with_neighbors)
    return [got[k] for k in keys]

  def to_features(elements):
    values = tf.numpy_function(load, [elements], dtypes, stateful=False)
    out = {}
    for key, value in zip(keys, values):
      value.set_shape([None] + list(template[key].shape[1:]))
      out[key] = value
    return out

  ds = tf.data.Dataset.range(start, max(start, stop)).batch(_TF_BLOCK)
  return ds.map(to_features).unbatch()
