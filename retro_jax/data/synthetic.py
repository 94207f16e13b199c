"""A synthetic batch source for tests and benchmarks (not for real training).

``SyntheticRetroSource`` makes examples where retrieval is genuinely useful. Chunk u of
an example draws its m tokens from a small random token set S_u (``tokens_per_chunk``
ids); the sets of different chunks are independent. Neighbor 0 of chunk u is, as in
RETRO, chunk u followed by its continuation (chunk u+1, i.e. tokens from S_{u+1});
neighbor 1 is a distractor from unrelated sets. A GPT can only infer S_{u+1} from the
tokens of chunk u+1 it has already seen; a Retro model can read it from the neighbor
from the chunk's first token on, so its loss falls further (towards
log(tokens_per_chunk)). Every batch is a pure function of (seed, step, shard).
"""

from __future__ import annotations

import jax
import numpy as np


class SyntheticRetroSource:
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
    self.seed = seed
    self.shard_id = jax.process_index() if shard_id is None else shard_id
    self.num_shards = jax.process_count() if num_shards is None else num_shards
    if batch_size % self.num_shards:
      raise ValueError(f"batch_size={batch_size} must be divisible by num_shards="
                       f"{self.num_shards}")
    if seq_len % chunk_length:
      raise ValueError(f"seq_len={seq_len} must be a multiple of chunk_length={chunk_length}")
    self.local_batch = batch_size // self.num_shards
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
    start = (step * self.num_shards + self.shard_id) * self.local_batch
    examples = [self._example(start + i) for i in range(self.local_batch)]
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
