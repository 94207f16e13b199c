"""Synthetic batch sources for tests and benchmarks (not for real training).

``SyntheticRetroSource`` makes examples where retrieval is genuinely useful. Chunk u of
an example draws its m tokens from a small random token set S_u (``tokens_per_chunk``
ids); the sets of different chunks are independent. Neighbor 0 of chunk u is, as in
RETRO, chunk u followed by its continuation (chunk u+1, i.e. tokens from S_{u+1});
neighbor 1 is a distractor from unrelated sets. A GPT can only infer S_{u+1} from the
tokens of chunk u+1 it has already seen; a Retro model can read it from the neighbor
from the chunk's first token on, so its loss falls further (towards
log(tokens_per_chunk)). Every batch is a pure function of (seed, step, shard).

``KeyValueRecallSource`` asks for a lookup only CCA can do: chunk 0's neighbors hold
key-value pairs, and chunk 1 asks for the values of some of those keys
(``retro_jax.bench.cca_recall``).
"""

from __future__ import annotations

import jax
import numpy as np


class _ShardedExamples:
  """This host's share of every batch: example i of a run is a pure function of
  (seed, i); step s of host h holds examples (s * hosts + h) * local_batch onwards."""

  def __init__(self, batch_size: int, seed: int, shard_id: int | None,
               num_shards: int | None):
    self.seed = seed
    self.shard_id = jax.process_index() if shard_id is None else shard_id
    self.num_shards = jax.process_count() if num_shards is None else num_shards
    if batch_size % self.num_shards:
      raise ValueError(f"batch_size={batch_size} must be divisible by num_shards="
                       f"{self.num_shards}")
    self.local_batch = batch_size // self.num_shards

  def example_indices(self, step: int) -> range:
    start = (step * self.num_shards + self.shard_id) * self.local_batch
    return range(start, start + self.local_batch)


class SyntheticRetroSource(_ShardedExamples):
  """``get_batch(step)`` -> the trainer's features for this host's share of a batch.

  Args:
    vocab_size: Token ids are drawn from [1, vocab_size).
    seq_len: n, a multiple of chunk_length.
    batch_size: Global batch size (split over ``num_shards`` hosts).
    chunk_length, num_neighbors, neighbor_length: m, k, r (r = 2m).
    seed: Base seed.
    shard_id, num_shards: This host's slice; default jax.process_index/count.
    with_neighbors: False gives GPT batches (no neighbor features).
  """

  def __init__(self, vocab_size: int, seq_len: int, batch_size: int, *,
               chunk_length: int = 64, num_neighbors: int = 2,
               neighbor_length: int | None = None, seed: int = 0,
               shard_id: int | None = None, num_shards: int | None = None,
               with_neighbors: bool = True, tokens_per_chunk: int = 4):
    self.vocab_size = vocab_size
    self.seq_len = seq_len
    self.chunk_length = chunk_length
    self.num_neighbors = num_neighbors
    self.neighbor_length = neighbor_length or 2 * chunk_length
    super().__init__(batch_size, seed, shard_id, num_shards)
    if seq_len % chunk_length:
      raise ValueError(f"seq_len={seq_len} must be a multiple of chunk_length={chunk_length}")
    self.with_neighbors = with_neighbors
    self.tokens_per_chunk = tokens_per_chunk

  def _chunks(self, rng: np.random.Generator, count: int) -> np.ndarray:
    """[count, m] chunks, each drawn from its own random set of token ids."""
    sets = np.stack([rng.choice(np.arange(1, self.vocab_size), self.tokens_per_chunk,
                                replace=False) for _ in range(count)])
    picks = rng.integers(0, self.tokens_per_chunk, (count, self.chunk_length))
    return np.take_along_axis(sets, picks, axis=1).astype(np.int32)

  def _example(self, index: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([self.seed, index])
    m, r, k = self.chunk_length, self.neighbor_length, self.num_neighbors
    chunks = self.seq_len // m
    text = self._chunks(rng, chunks + 2)                      # [chunks + 2, m]
    tokens = text.reshape(-1)[:self.seq_len + 1]
    neighbors = np.zeros((chunks, k, r), np.int32)
    for u in range(chunks):
      retrieved = np.concatenate([text[u], text[u + 1]])      # chunk + continuation
      neighbors[u, 0] = retrieved[:r]
      if k > 1:
        neighbors[u, 1:] = self._chunks(rng, 2 * (k - 1)).reshape(k - 1, -1)[:, :r]
    return tokens, neighbors

  def get_batch(self, step: int) -> dict[str, np.ndarray]:
    examples = [self._example(i) for i in self.example_indices(step)]
    tokens = np.stack([t for t, _ in examples])
    batch = {
        "decoder_input_tokens": tokens[:, :-1],
        "decoder_target_tokens": tokens[:, 1:],
        "decoder_loss_weights": np.ones((self.local_batch, self.seq_len), np.float32),
    }
    if self.with_neighbors:
      neighbors = np.stack([n for _, n in examples])
      batch["neighbor_tokens"] = neighbors
      batch["neighbor_mask"] = np.ones(neighbors.shape[:3], bool)
    return batch


class KeyValueRecallSource(_ShardedExamples):
  """Associative recall through the neighbors: the answers are only in the encoder.

  An example is two chunks (n = 2m). Each of chunk 0's k neighbors holds
  ``pairs_per_neighbor`` (key, value) pairs, ``key value key value ...``, then filler;
  keys are distinct within an example, values are drawn independently. Chunk 0 is
  filler up to its last token, which is a key; from there on the text alternates
  ``key value``, every key one of the example's (drawn with replacement). Loss is
  weighted on the values only: positions m-1, m+1, ..., 2m-3 (the tokens before a
  value), all of which read chunk 0's neighbors under RETRO's shift. Chunk 1's own
  neighbors are filler.

  ``pairs_in='prompt'`` is the control: the same pairs (all k neighbors' worth) open
  chunk 0 instead, and every neighbor is filler, so the lookup is the decoder's
  self-attention's (in-context recall) at the same positions.

  Token ids: 0 is never drawn, filler is [1, 16), keys are the next ``num_keys`` ids,
  values the rest of the vocabulary. With no neighbors, a value is a guess among all
  values (log of their count) until a key repeats in chunk 1 (the decoder can then
  copy the earlier answer); with them read as a bag of values but no lookup, a guess
  among the example's k * pairs_per_neighbor values.

  Args:
    vocab_size: Vocabulary; needs room for filler, ``num_keys`` keys and values.
    batch_size: Global batch size (split over ``num_shards`` hosts).
    chunk_length, num_neighbors, neighbor_length: m, k, r (r = 2m by default).
    pairs_per_neighbor: Pairs in each neighbor (2 * pairs <= r).
    num_keys: Ids keys are drawn from; None = a third of the ids above the filler.
    pairs_in: 'neighbors' (the lookup is CCA's) or 'prompt' (self-attention's).
    seed, shard_id, num_shards: as ``SyntheticRetroSource``.
  """

  FILLER = (1, 16)

  def __init__(self, vocab_size: int, batch_size: int, *, chunk_length: int = 64,
               num_neighbors: int = 2, neighbor_length: int | None = None,
               pairs_per_neighbor: int = 4, num_keys: int | None = None,
               pairs_in: str = "neighbors", seed: int = 0,
               shard_id: int | None = None, num_shards: int | None = None):
    if pairs_in not in ("neighbors", "prompt"):
      raise ValueError(f"pairs_in={pairs_in!r}: 'neighbors' or 'prompt'")
    if pairs_in == "prompt" and 2 * num_neighbors * pairs_per_neighbor > chunk_length - 1:
      raise ValueError(f"pairs_in='prompt': {num_neighbors} x {pairs_per_neighbor} pairs "
                       f"do not fit before chunk 0's last token (m = {chunk_length})")
    self.pairs_in = pairs_in
    self.chunk_length = chunk_length
    self.num_neighbors = num_neighbors
    self.neighbor_length = neighbor_length or 2 * chunk_length
    self.pairs_per_neighbor = pairs_per_neighbor
    super().__init__(batch_size, seed, shard_id, num_shards)
    if not 1 <= pairs_per_neighbor <= self.neighbor_length // 2:
      raise ValueError(f"pairs_per_neighbor={pairs_per_neighbor}: need 1 <= pairs <= "
                       f"neighbor_length // 2 = {self.neighbor_length // 2}")
    free = vocab_size - self.FILLER[1]
    self.num_keys = free // 3 if num_keys is None else num_keys
    self.key_start = self.FILLER[1]
    self.value_start = self.key_start + self.num_keys
    self.num_values = vocab_size - self.value_start
    if self.num_keys < num_neighbors * pairs_per_neighbor or self.num_values < 2:
      raise ValueError(f"vocab_size={vocab_size} leaves {self.num_keys} key ids and "
                       f"{self.num_values} value ids; need >= "
                       f"{num_neighbors * pairs_per_neighbor} keys and 2 values")

  @property
  def seq_len(self) -> int:
    return 2 * self.chunk_length

  def value_positions(self) -> np.ndarray:
    """Positions whose target is a value: m-1, m+1, ..., 2m-3."""
    m = self.chunk_length
    return np.arange(m - 1, 2 * m - 2, 2)

  def _example(self, index: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([self.seed, index])
    m, r, k, p = (self.chunk_length, self.neighbor_length, self.num_neighbors,
                  self.pairs_per_neighbor)
    keys = rng.choice(self.num_keys, k * p, replace=False) + self.key_start
    values = rng.integers(0, self.num_values, k * p) + self.value_start
    neighbors = rng.integers(*self.FILLER, (2, k, r))
    pairs = np.stack([keys, values], axis=1).reshape(k, 2 * p)   # [k, key value ...]
    prompt = rng.integers(*self.FILLER, m - 1)
    if self.pairs_in == "neighbors":
      neighbors[0, :, :2 * p] = pairs
    else:
      prompt[:2 * k * p] = pairs.reshape(-1)
    asked = rng.integers(0, k * p, m // 2 + 1)
    text = np.concatenate([prompt, np.stack([keys[asked], values[asked]], 1).reshape(-1)])
    return text[:2 * m + 1].astype(np.int32), neighbors.astype(np.int32)

  def get_batch(self, step: int) -> dict[str, np.ndarray]:
    """The trainer's features: tokens [b, 2m], neighbors [b, 2, k, r], weights on values."""
    examples = [self._example(i) for i in self.example_indices(step)]
    tokens = np.stack([t for t, _ in examples])
    neighbors = np.stack([nb for _, nb in examples])
    weights = np.zeros((self.local_batch, self.seq_len), np.float32)
    weights[:, self.value_positions()] = 1.0
    return {
        "decoder_input_tokens": tokens[:, :-1],
        "decoder_target_tokens": tokens[:, 1:],
        "decoder_loss_weights": weights,
        "neighbor_tokens": neighbors,
        "neighbor_mask": np.ones(neighbors.shape[:3], bool),
    }
