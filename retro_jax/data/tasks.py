r"""seqio Tasks and Mixtures for retro-fitting and instruction tuning, and the batch source.

Training data reaches the model through registered seqio Tasks, as t5x users expect,
but every task is backed by a *random-access* example source, so the stream is a pure
function of (seed, position) and a run resumes at any step without replaying it::

    names = register_retro_tasks("/data/retro", "train", seq_len=2048)
    names.retro, names.gpt            # 'retro_retro_train', 'gpt_retro_train'
    source = TaskBatchSource(names.retro, batch_size=256, seed=0)
    batch = source.get_batch(step)    # this host's share of global batch `step`

Example sources (numpy, memory-mapped; nothing is loaded whole):

* ``PretrainSource``: example i of a split is the n = l*m tokens of query-DB chunks
  ``[i*l, (i+1)*l)`` plus the next token (``targets [n+1]``; a trailing chunk count that
  does not fill an example is dropped). Documents are padded to a multiple of m in the
  chunk DB, so an example may span documents (as Megatron's samples do) while chunk u
  of the example is always query chunk ``i*l + u``: its neighbors are the neighbor map's
  row for that chunk, each ``[2m]`` = the retrieval-DB chunk and its continuation
  (``neighbor_tokens [l, k, 2m]``); -1 ids are masked (``neighbor_mask`` False, tokens
  = pad), never wrapped to a real chunk, and so are neighbors from any document of the
  example when the split's documents are the retrieval DB's first ones (Megatron's
  rule; the map only excludes a chunk's own document). Pad targets have loss weight 0;
  the EOD token that ends a document is a target like any other, also where the
  vocabulary pads with EOD (Megatron's: pad == EOD): there only the first EOD of a run
  is weighted, the rest of the run is padding.
  The GPT twin task reads the *same* source without neighbors: identical tokens.
* ``SFTSource``: instruction examples (``retro_jax.data.instructions``), tokenized on
  access; loss on the final answer + EOS only; no neighbors by default (tokens = pad,
  mask False: CCA is skipped and only decoder weights learn, as InstructRetro), or
  neighbors from a ``retriever`` over the prompt's complete chunks.

Order, sharding and seeking (``ExampleStream``): stream position p maps to an example
directly. With several sources (a Mixture) position p falls in slot ``p % P`` of a fixed
period of P = 1000 slots that holds each source in proportion to its rate (Megatron's
greedy blend), and source s's local position follows from the period count. Within a
source, local position q is example ``permute(q % N, key(seed, s, q // N))``: a seeded
Feistel bijection of [0, N) that is different every epoch, computed per index with O(1)
memory. Host h of H (``seqio.ShardInfo``) takes the positions ``e * H + h`` for its
elements e = 0, 1, ...; the batch of step s on host h is elements ``[s*b, (s+1)*b)``
(b = global batch / H), so the hosts of a step read positions ``[s*B, (s+1)*B)`` of one
global stream: disjoint, and covering it. **Resuming at step s** therefore needs no
state: ``get_batch(s)`` (and ``TaskBatchSource.dataset(start_step=s)`` for a tf.data
pipeline) computes those positions and reads them; nothing before them is replayed.
With ``num_epochs`` set (evaluation), positions past the end are padding examples of
weight 0, so a fixed number of batches scores every example exactly once.

The seqio view: ``RandomAccessDataSource`` (a ``seqio.DataSource``) serves any example
source as ``tf.data`` (the same positions: ``shuffle=False`` means position = example
index, one pass), with the rank-3 neighbor feature declared through
``seqio.PassThroughVocabulary`` (``add_eos=False``); ``feature_converters`` turns task
features into model features. Tasks register with ``shuffle_buffer_size=None`` (the
source shuffles), so ``seqio.get_dataset`` gives the stream in the same order.
seqio's own Mixture sampling (``sample_from_datasets``) is seeded but not seekable; the
batch source replaces it by the period blend above with the Mixture's rates.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any, Callable, Mapping, Optional, Protocol, Sequence

from absl import logging
import gin
import numpy as np
import seqio
import tensorflow as tf

from retro_jax.data import feature_converters as fc
from retro_jax.data import instructions
from retro_jax.data import vocab as vocab_lib
from retro_jax.retrieval import formats
from retro_jax.retrieval.layout import RetrievalLayout

BLEND_PERIOD = 1000
_VALIDATE_ROWS_LIMIT = 1 << 24        # full neighbor-map scan on open up to this many ids
_TF_BLOCK = 32                        # examples per numpy call inside tf.data

Retrieve = Callable[[np.ndarray], Sequence[np.ndarray]]


class ExampleSource(Protocol):
  """A random-access source of fixed-length task features (see feature_converters)."""

  seq_len: int
  chunk_length: int
  num_neighbors: int
  retrieved_length: int
  pad_id: int
  num_examples: int

  def examples(self, indices: np.ndarray, *, with_neighbors: bool
               ) -> dict[str, np.ndarray]:
    ...

  def describe(self) -> str:
    ...


def empty_features(source: ExampleSource, count: int, with_neighbors: bool
                   ) -> dict[str, np.ndarray]:
  """``count`` padding examples of ``source``'s shapes (all pad tokens, weight 0)."""
  n, l = source.seq_len, source.seq_len // source.chunk_length
  out = {"targets": np.full((count, n + 1), source.pad_id, np.int32),
         "loss_weights": np.zeros((count, n + 1), np.float32)}
  if with_neighbors:
    out["neighbor_tokens"] = np.full(
        (count, l, source.num_neighbors, source.retrieved_length), source.pad_id, np.int32)
    out["neighbor_mask"] = np.zeros((count, l, source.num_neighbors), bool)
  return out


def _check_indices(indices: np.ndarray, count: int, what: str) -> np.ndarray:
  indices = np.asarray(indices, np.int64).reshape(-1)
  if indices.size and (indices.min() < 0 or indices.max() >= count):
    raise IndexError(f"{what}: example indices {indices.min()}..{indices.max()} outside "
                     f"[0, {count})")
  return indices


# ----------------------------------------------------------------------------------
# Pretraining / retro-fitting examples
# ----------------------------------------------------------------------------------


def _open_db(db) -> formats.ChunkDB:
  return db if isinstance(db, formats.ChunkDB) else formats.ChunkDB(db)


class PretrainSource:
  """Examples of n tokens over a split's query chunk DB, with their neighbors.

  Args:
    query_db: The split's chunk DB (training flavour; prefix or ``ChunkDB``).
    neighbor_map: Its KNN map (path or ``NeighborMap``): one row per query chunk.
      None for a GPT-only source.
    retrieval_db: The retrieval DB (retrieval flavour) the map's ids point into.
    seq_len: n, a multiple of the chunk size m.
    num_neighbors: k <= the map's k (its first k columns); None = all of them.
    pad_id: The DB's pad token (loss weight 0; fills missing neighbors). Default: the
      pad id its chunk-stage build recorded (``chunk_db.built_ids``), else ours
      (``vocab_lib.PAD_ID``, for DBs written without a manifest).
    eod_id: The DB's end-of-document token, needed only where it equals ``pad_id``
      (a vocabulary without a pad piece pads with EOD): then the first pad of each run
      after a real token is the document's EOD and keeps weight 1. Default: the build's
      record, as ``pad_id``.
    validate: Scan the whole neighbor map on open for ids outside the retrieval DB:
      True, False or 'auto' (when it holds at most 2**24 ids). Batches are checked
      either way (the ids they use).
    exclude_example_documents: Mask neighbors that come from any document of the
      example (Megatron's rule; the neighbor map itself only excludes each chunk's own
      document, and an example may span several). Needs query document d to be
      retrieval document d (the layout the neighbor stage's exclusion requires).
      'auto': on when sampled documents of both DBs are identical.
  Raises:
    ValueError naming the file: mismatched chunk sizes, a map whose rows do not match
    the query DB's chunks, ids outside the retrieval DB, too few chunks for an example.
  """

  def __init__(self, query_db, neighbor_map=None, retrieval_db=None, *, seq_len: int,
               num_neighbors: Optional[int] = None, pad_id: Optional[int] = None,
               eod_id: Optional[int] = None, validate: bool | str = "auto",
               exclude_example_documents: bool | str = "auto"):
    self.query_db = _open_db(query_db)
    q = self.query_db
    m = self.chunk_length = q.chunk_size
    if q.stride != m:
      raise ValueError(f"{q.idx_path}: stride {q.stride} != chunk_size {m}; examples need "
                       "non-overlapping query chunks")
    if seq_len <= 0 or seq_len % m:
      raise ValueError(f"seq_len={seq_len} must be a positive multiple of the chunk size "
                       f"m={m} of {q.idx_path}")
    if pad_id is None or eod_id is None:
      from retro_jax.retrieval.chunk_db import built_ids  # pylint: disable=g-import-not-at-top
      built_pad, built_eod = built_ids(q.prefix)
      pad_id = pad_id if pad_id is not None else (
          built_pad if built_pad is not None else vocab_lib.PAD_ID)
      eod_id = eod_id if eod_id is not None else built_eod
    self.seq_len, self.pad_id = seq_len, int(pad_id)
    self.eod_id = None if eod_id is None else int(eod_id)
    self.chunks_per_example = seq_len // m
    self.num_examples = q.num_chunks // self.chunks_per_example
    if self.num_examples == 0:
      raise ValueError(f"{q.idx_path}: {q.num_chunks} chunks, fewer than the "
                       f"{self.chunks_per_example} of one {seq_len}-token example")
    self.retrieved_length = 2 * m
    self.neighbor_map = self.retrieval_db = None
    self.num_neighbors = 0
    self.exclude_example_documents = False
    if neighbor_map is None:
      return
    if retrieval_db is None:
      raise ValueError("a neighbor map needs the retrieval DB its ids point into")
    knn = neighbor_map if isinstance(neighbor_map, formats.NeighborMap) else (
        formats.NeighborMap(neighbor_map))
    db = _open_db(retrieval_db)
    if not db.is_retrieval_db:
      raise ValueError(f"{db.idx_path}: a training-flavour DB; neighbors come from a "
                       "retrieval DB (chunk + continuation)")
    if db.chunk_size != m:
      raise ValueError(f"{db.idx_path}: chunk size {db.chunk_size} differs from the "
                       f"query DB's {m} ({q.idx_path})")
    if knn.chunk_start_id != 0 or knn.num_chunks != q.num_chunks:
      raise ValueError(f"{knn.path}: rows cover query chunks [{knn.chunk_start_id}, "
                       f"{knn.chunk_end_id}), but {q.idx_path} has {q.num_chunks} chunks "
                       "(a map of another split or build, or an unmerged shard)")
    k = knn.k if num_neighbors is None else num_neighbors
    if not 0 < k <= knn.k:
      raise ValueError(f"num_neighbors={num_neighbors}: {knn.path} holds k={knn.k} "
                       "neighbors per chunk")
    if validate is True or (validate == "auto" and
                            knn.num_chunks * knn.k <= _VALIDATE_ROWS_LIMIT):
      knn.validate_against(db, query_db=q)
    self.neighbor_map, self.retrieval_db, self.num_neighbors = knn, db, k
    aligned = documents_align(q, db)
    if exclude_example_documents is True and not aligned:
      raise ValueError(f"exclude_example_documents: the documents of {q.idx_path} are not "
                       f"the first documents of {db.idx_path}")
    self.exclude_example_documents = bool(exclude_example_documents) and aligned

  @classmethod
  def from_layout(cls, root: str | RetrievalLayout, split: str, *, seq_len: int,
                  with_neighbors: bool = True, **kwargs) -> "PretrainSource":
    """The source of ``split`` in a prepared retrieval directory (RetrievalLayout)."""
    layout = root if isinstance(root, RetrievalLayout) else RetrievalLayout(root)
    prefix = layout.split_db_prefix(split)
    if not formats.chunk_db_exists(prefix):
      raise FileNotFoundError(f"{prefix}.idx: no query DB for split {split!r} in "
                              f"{layout.root} (splits: {layout.splits()})")
    from retro_jax.retrieval.chunk_db import layout_ids  # pylint: disable=g-import-not-at-top
    kwargs.update({k: v for k, v in layout_ids(layout).items()
                   if kwargs.get(k) is None and v is not None})
    if not with_neighbors:
      return cls(prefix, seq_len=seq_len, **kwargs)
    knn = layout.neighbor_map_path(split)
    if not os.path.exists(knn):
      raise FileNotFoundError(f"{knn}: no neighbor map for split {split!r} (build it "
                              "with `python -m retro_jax.preprocess`)")
    return cls(prefix, knn, layout.retrieval_db_prefix, seq_len=seq_len, **kwargs)

  @property
  def has_neighbors(self) -> bool:
    return self.neighbor_map is not None

  def describe(self) -> str:
    return (f"PretrainSource({self.query_db.prefix}, n={self.seq_len}, "
            f"examples={self.num_examples}, k={self.num_neighbors}, exclude example "
            f"documents={self.exclude_example_documents})")

  def examples(self, indices, *, with_neighbors: bool = True) -> dict[str, np.ndarray]:
    """Task features of examples ``indices [B]``: ``targets``/``loss_weights [B, n+1]``
    and, with neighbors, ``neighbor_tokens [B, l, k, 2m]``, ``neighbor_mask [B, l, k]``.
    """
    idx = _check_indices(indices, self.num_examples, self.query_db.idx_path)
    l, q = self.chunks_per_example, self.query_db
    chunk_ids = idx[:, None] * l + np.arange(l)                         # [B, l]
    tokens = q.get_chunks(chunk_ids, with_continuation=False)           # [B, l, m]
    following = idx * l + l
    has_next = following < q.num_chunks
    next_token = np.full(idx.shape, self.pad_id, np.int32)
    if has_next.any():
      next_token[has_next] = q.get_chunks(following[has_next],
                                          with_continuation=False)[:, 0]
    targets = np.concatenate([tokens.reshape(len(idx), -1), next_token[:, None]], 1)
    weights = loss_weights(targets, self.pad_id, self.eod_id)
    weights[~has_next, -1] = 0.0                         # no next token: padding
    out = {"targets": targets, "loss_weights": weights}
    if with_neighbors:
      out.update(self._neighbors(chunk_ids))
    return out

  def _neighbors(self, chunk_ids: np.ndarray) -> dict[str, np.ndarray]:
    if self.neighbor_map is None:
      raise ValueError(f"{self.query_db.prefix}: this source has no neighbor map "
                       "(GPT only)")
    ids = self.neighbor_map[chunk_ids][..., :self.num_neighbors]       # [B, l, k]
    db = self.retrieval_db
    bad = (ids < -1) | (ids >= db.num_chunks)
    if bad.any():
      b, u, j = np.argwhere(bad)[0]
      raise ValueError(f"{self.neighbor_map.path}: neighbors: query chunk "
                       f"{chunk_ids[b, u]} neighbor {j} is {ids[b, u, j]}, outside [-1, "
                       f"{db.num_chunks}) of {db.idx_path}")
    if self.exclude_example_documents:
      example_docs = self.query_db.doc_of_chunk(chunk_ids)               # [B, l]
      neighbor_docs = db.doc_of_chunk(np.maximum(ids, 0))                # [B, l, k]
      same = (neighbor_docs[..., None] == example_docs[:, None, None, :]).any(-1)
      ids = np.where(same, -1, ids)
    return {"neighbor_tokens": db.get_chunks(ids, with_continuation=True,
                                             missing_value=self.pad_id),
            "neighbor_mask": ids >= 0}


def loss_weights(targets: np.ndarray, pad_id: int, eod_id: Optional[int]) -> np.ndarray:
  """Loss weights of pretraining ``targets [B, n+1]``: 0 on padding and on token 0.

  Padding is ``pad_id``; where the vocabulary pads with EOD (``eod_id == pad_id``, a
  vocabulary without a pad piece, as Megatron's) the first EOD after a real token ends
  the document and is weighted, the EOD tokens after it are padding.
  """
  is_pad = targets == pad_id
  if eod_id is not None and eod_id == pad_id:
    is_pad[:, 1:] = is_pad[:, 1:] & is_pad[:, :-1]       # a run's first is the EOD
  weights = (~is_pad).astype(np.float32)
  weights[:, 0] = 0.0                                    # token 0 is never a target
  return weights


def documents_align(query_db: formats.ChunkDB, retrieval_db: formats.ChunkDB,
                    samples: int = 8) -> bool:
  """Whether query document d is retrieval document d (checked on sampled documents)."""
  if not 0 < query_db.num_docs <= retrieval_db.num_docs:
    return False
  docs = np.unique(np.linspace(0, query_db.num_docs - 1, min(samples, query_db.num_docs)
                               ).astype(np.int64))
  return all(np.array_equal(query_db.get_document(int(d)), retrieval_db.get_document(int(d)))
             for d in docs)


# ----------------------------------------------------------------------------------
# Instruction-tuning examples
# ----------------------------------------------------------------------------------


class SFTSource:
  """Instruction examples as task features (tokenized on access).

  Args:
    examples: ``instructions.SFTExample`` records (``instructions.read_sft``).
    vocab: SentencePiece model path, processor or seqio vocabulary (the model's).
    seq_len: n; an example holds at most n + 1 tokens (see instructions' truncation
      rule), the rest is pad with weight 0.
    chunk_length, num_neighbors, retrieved_length: m, k, r of the neighbor features.
    retriever: Optional ``retriever(chunks [c, m]) -> (tokens [c, k, r], mask [c, k],
      ...)`` (e.g. ``retro_jax.retrieval.retriever.Retriever``): neighbors for the
      prompt's complete chunks; the other chunks (those holding answer tokens) get none.
      Default: no neighbors at all (InstructRetro).
    pad_id: Padding of targets (weight 0) and of missing neighbors; default the
      vocabulary's (``vocab_lib.special_ids``: its EOS where it has no pad piece, as
      Megatron pads neighbors with EOD). Examples end with the vocabulary's EOS.
    name: For messages.
  """

  def __init__(self, examples: Sequence[instructions.SFTExample], vocab: Any, *,
               seq_len: int, chunk_length: int = 64, num_neighbors: int = 2,
               retrieved_length: Optional[int] = None, pad_id: Optional[int] = None,
               retriever: Optional[Retrieve] = None, name: str = "sft"):
    from retro_jax.retrieval.chunk_db import Tokenizer  # pylint: disable=g-import-not-at-top
    if not examples:
      raise ValueError(f"{name}: no instruction examples")
    if seq_len <= 0 or seq_len % chunk_length:
      raise ValueError(f"seq_len={seq_len} must be a positive multiple of chunk_length="
                       f"{chunk_length}")
    self.records = list(examples)
    tokenizer = Tokenizer(vocab)
    self.processor = tokenizer.processor
    self.seq_len, self.chunk_length = seq_len, chunk_length
    self.num_neighbors = num_neighbors
    self.retrieved_length = retrieved_length or 2 * chunk_length
    # The vocabulary's pad (its EOS where it has no pad piece); weight 0 either way.
    self.pad_id = pad_id if pad_id is not None else tokenizer.pad_id
    self.eos_id = tokenizer.eos_id
    self.retriever = retriever
    self.num_examples = len(self.records)
    self.name = name

  def describe(self) -> str:
    return f"SFTSource({self.name}, examples={self.num_examples}, n={self.seq_len})"

  def encode(self, index: int) -> tuple[np.ndarray, np.ndarray, int]:
    """``(tokens [L], loss_weights [L], prompt_length)`` of example ``index``."""
    prompt, answer = self.records[index].render()
    return instructions.encode_sft(prompt, answer, self.processor, self.seq_len + 1,
                                   eos_id=self.eos_id)

  def examples(self, indices, *, with_neighbors: bool = True) -> dict[str, np.ndarray]:
    idx = _check_indices(indices, self.num_examples, self.name)
    out = empty_features(self, len(idx), with_neighbors)
    m = self.chunk_length
    queries, slots = [], []                     # prompt chunks of all rows: one search
    for row, i in enumerate(idx):
      tokens, weights, prompt_len = self.encode(int(i))
      out["targets"][row, :tokens.size] = tokens
      out["loss_weights"][row, :tokens.size] = weights
      complete = prompt_len // m                # chunks made of prompt tokens only
      if with_neighbors and self.retriever is not None and complete:
        queries.append(tokens[:complete * m].reshape(complete, m))
        slots += [(row, u) for u in range(complete)]
    if queries:
      got = self.retriever(np.concatenate(queries))
      nb_tokens, nb_mask = np.asarray(got[0]), np.asarray(got[1], bool)
      expected = (len(slots), self.num_neighbors, self.retrieved_length)
      if nb_tokens.shape != expected or nb_mask.shape != expected[:2]:
        raise ValueError(f"{self.name}: the retriever returned neighbor tokens "
                         f"{list(nb_tokens.shape)} and mask {list(nb_mask.shape)} for "
                         f"{len(slots)} chunks; expected {list(expected)}")
      rows, chunks = np.asarray(slots).T
      out["neighbor_tokens"][rows, chunks] = nb_tokens
      out["neighbor_mask"][rows, chunks] = nb_mask
    return out


# ----------------------------------------------------------------------------------
# Deterministic order: a seeded bijection per epoch, a period blend across sources
# ----------------------------------------------------------------------------------

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


# ----------------------------------------------------------------------------------
# seqio: data source, features, registration
# ----------------------------------------------------------------------------------


class RandomAccessDataSource(seqio.DataSource):
  """A ``seqio.DataSource`` over an ``ExampleSource`` (one split).

  ``get_dataset(shuffle=True, seed=s)`` is the endless permuted stream (new
  permutation every epoch); ``shuffle=False`` is one pass in example order. Extra
  keyword ``start``: begin at that element of the shard (seek without replay).
  ``num_input_examples`` is None on purpose: seqio would otherwise cache a small
  endless stream in memory.
  """

  def __init__(self, source: ExampleSource, split: str, *, with_neighbors: bool):
    super().__init__(splits=[split], num_input_examples=None, caching_permitted=False,
                     performs_internal_shuffling=True)
    self.source, self.split, self.with_neighbors = source, split, with_neighbors

  @property
  def supports_arbitrary_sharding(self) -> bool:
    return True

  def list_shards(self, split: str) -> Sequence[str]:
    return [self.source.describe()]

  def num_examples(self) -> int:
    return self.source.num_examples

  def get_dataset(self, split: str = "train", shuffle: bool = True,  # pytype: disable=signature-mismatch
                  seed: Optional[int] = None, shard_info: Optional[seqio.ShardInfo] = None,
                  *, sequence_length=None, use_cached: bool = False,
                  num_epochs: Optional[int] = 1, start: int = 0) -> tf.data.Dataset:
    del sequence_length, use_cached, num_epochs  # The stream defines its epochs.
    if split != self.split:
      raise ValueError(f"{self.source.describe()} serves split {self.split!r}, not "
                       f"{split!r}")
    stream = ExampleStream([self.source], seed=seed or 0, shuffle=shuffle,
                           num_epochs=None if shuffle else 1)
    return stream_dataset(stream, with_neighbors=self.with_neighbors,
                          shard_info=shard_info, start=start)


def output_features(vocabulary: Optional[seqio.Vocabulary] = None, *,
                    with_neighbors: bool) -> dict[str, seqio.Feature]:
  """The task features (feature_converters) as seqio Features."""
  passthrough = seqio.PassThroughVocabulary(size=0)
  features = {
      "targets": seqio.Feature(vocabulary or passthrough, add_eos=False, dtype=tf.int32),
      "loss_weights": seqio.Feature(passthrough, add_eos=False, dtype=tf.float32),
  }
  if with_neighbors:
    features["neighbor_tokens"] = seqio.Feature(passthrough, add_eos=False,
                                                dtype=tf.int32, rank=3)
    features["neighbor_mask"] = seqio.Feature(passthrough, add_eos=False,
                                              dtype=tf.bool, rank=2)
  return features


@dataclasses.dataclass(frozen=True)
class TaskNames:
  """The registered names of a Retro task and its GPT twin (same examples)."""
  retro: Optional[str]
  gpt: str

  def get(self, with_neighbors: bool) -> str:
    if with_neighbors and self.retro is None:
      raise ValueError(f"{self.gpt} has no Retro twin (no neighbor map)")
    return self.retro if with_neighbors else self.gpt


_REGISTERED: dict[str, tuple] = {}


def _task_name(text: str) -> str:
  name = re.sub(r"[^0-9a-zA-Z_]+", "_", text).strip("_").lower()
  return name or "data"


def _register_task(name: str, spec: tuple, source: ExampleSource, split: str,
                   with_neighbors: bool, vocabulary) -> None:
  if name in seqio.TaskRegistry.names():
    logging.info("seqio task %s is registered again (new settings or files)", name)
    seqio.TaskRegistry.remove(name)
  seqio.TaskRegistry.add(
      name, source=RandomAccessDataSource(source, split, with_neighbors=with_neighbors),
      output_features=output_features(vocabulary, with_neighbors=with_neighbors),
      preprocessors=[], shuffle_buffer_size=None)
  _REGISTERED[name] = spec


def _is_registered(names: Sequence[str], spec: tuple) -> bool:
  return all(_REGISTERED.get(n) == spec and n in seqio.TaskRegistry.names() for n in names)


def _layout_vocabulary(layout: RetrievalLayout):
  if os.path.exists(layout.vocab_path):
    return vocab_lib.get_vocabulary(layout.vocab_path)
  return None


def register_retro_tasks(retrieval_dir: str, split: str, seq_len: int, *,
                         name: Optional[str] = None, num_neighbors: Optional[int] = None,
                         pad_id: Optional[int] = None, validate: bool | str = "auto"
                         ) -> TaskNames:
  """Registers ``retro_{name}_{split}`` and its GPT twin ``gpt_{name}_{split}``.

  Both read one ``PretrainSource`` (identical tokens); the Retro task adds the
  neighbor features. Without a neighbor map for the split only the GPT task exists.
  Registering the same settings again is a no-op; new settings replace the tasks.

  Args:
    retrieval_dir: A prepared directory (``RetrievalLayout`` root).
    split: 'train', 'valid', ... (its query DB ``<split>_db``).
    seq_len: n.
    name: Defaults to the directory's base name.
    num_neighbors, pad_id, validate: See ``PretrainSource``.
  """
  layout = RetrievalLayout(retrieval_dir)
  name = _task_name(name or os.path.basename(layout.root))
  has_map = os.path.exists(layout.neighbor_map_path(split))
  names = TaskNames(retro=f"retro_{name}_{split}" if has_map else None,
                    gpt=f"gpt_{name}_{split}")
  spec = ("pretrain", layout.root, split, seq_len, num_neighbors, pad_id, has_map)
  registered = [n for n in (names.retro, names.gpt) if n]
  if _is_registered(registered, spec):
    return names
  kwargs = {} if pad_id is None else {"pad_id": pad_id}
  source = PretrainSource.from_layout(layout, split, seq_len=seq_len, with_neighbors=has_map,
                                      num_neighbors=num_neighbors, validate=validate,
                                      **kwargs)
  vocabulary = _layout_vocabulary(layout)
  for task, with_neighbors in ((names.retro, True), (names.gpt, False)):
    if task:
      _register_task(task, spec, source, split, with_neighbors, vocabulary)
  logging.info("registered %s: %s", registered, source.describe())
  return names


def register_sft_tasks(name: str, path: str, vocab: str, seq_len: int, *,
                       format: str = "auto", chunk_length: int = 64,  # pylint: disable=redefined-builtin
                       num_neighbors: int = 2, retrieved_length: Optional[int] = None,
                       retriever: Optional[Retrieve] = None,
                       reader_kwargs: Optional[Mapping[str, Any]] = None) -> TaskNames:
  """Registers ``retro_sft_{name}`` (neighbor features) and ``gpt_sft_{name}``.

  Args:
    name: Dataset name.
    path: Instruction file (any ``instructions.FORMATS`` layout); a relative path
      not found is looked up in the shipped ``data/``.
    vocab: SentencePiece model path of the model.
    seq_len, chunk_length, num_neighbors, retrieved_length, retriever: See SFTSource.
    reader_kwargs: Passed to the reader (e.g. ``prompt_key``).
  """
  path = instructions.resolve_data_file(path)
  names = TaskNames(retro=f"retro_sft_{_task_name(name)}", gpt=f"gpt_sft_{_task_name(name)}")
  spec = ("sft", os.path.abspath(path), os.path.getmtime(path), os.path.abspath(vocab)
          if isinstance(vocab, str) else id(vocab), seq_len, chunk_length, num_neighbors,
          retrieved_length, id(retriever) if retriever else None, format,
          tuple(sorted((reader_kwargs or {}).items())))
  if _is_registered([names.retro, names.gpt], spec):
    return names
  records = instructions.read_sft(path, format, **(reader_kwargs or {}))
  source = SFTSource(records, vocab, seq_len=seq_len, chunk_length=chunk_length,
                     num_neighbors=num_neighbors, retrieved_length=retrieved_length,
                     retriever=retriever, name=f"{name} ({path})")
  vocabulary = vocab_lib.get_vocabulary(vocab) if isinstance(vocab, str) else None
  for task, with_neighbors in ((names.retro, True), (names.gpt, False)):
    _register_task(task, spec, source, "train", with_neighbors, vocabulary)
  return names


def register_mixture(name: str, tasks_and_rates: Sequence[tuple[str, float]]) -> str:
  """Registers (or replaces) a seqio Mixture of tasks with rates; returns its name."""
  for task, rate in tasks_and_rates:
    if task not in seqio.TaskRegistry.names():
      raise ValueError(f"mixture {name}: task {task!r} is not registered")
    if not rate > 0:
      raise ValueError(f"mixture {name}: rate of {task!r} must be positive, got {rate}")
  if name in seqio.MixtureRegistry.names():
    seqio.MixtureRegistry.remove(name)
  seqio.MixtureRegistry.add(name, [(t, float(r)) for t, r in tasks_and_rates])
  return name


DEFAULT_SFT_BLEND = (
    ("chat", "data/sft/chat.jsonl", 1.0),
    ("prompt_response", "data/sft/prompt_response.jsonl", 1.0),
    ("qa", "data/sft/qa.jsonl", 1.0),
)


def register_sft_mixture(name: str, datasets: Sequence[tuple[str, str, float]],
                         vocab: str, seq_len: int, **kwargs) -> TaskNames:
  """Registers each ``(dataset, path, rate)`` and the blends ``retro_sft_{name}`` /
  ``gpt_sft_{name}`` (seqio Mixtures with those rates)."""
  members = [(register_sft_tasks(d, path, vocab, seq_len, **kwargs), float(rate))
             for d, path, rate in datasets]
  if len(members) == 1:
    return members[0][0]
  mixture = _task_name(name)
  return TaskNames(
      retro=register_mixture(f"retro_sft_{mixture}", [(n.retro, r) for n, r in members]),
      gpt=register_mixture(f"gpt_sft_{mixture}", [(n.gpt, r) for n, r in members]))


def register_qa_task(name: str, path: str, vocab: str, *, num_passages: int = 5,
                     split: str = "validation") -> str:
  """Registers ``qa_{name}``: NQ / TriviaQA-style records as zero-shot QA prompts.

  Each example (file order, no shuffling) has ``inputs``: the tokens of
  ``chat.qa_prompt(question, ctxs, num_passages=...)`` (InstructRetro's evaluation
  prompt, ending "Assistant: The answer is"), ``targets``: the tokens of ``answers[0]``
  and EOS (with SentencePiece's dummy prefix these are the tokens that follow the
  prompt in ``prompt + " " + answer``), and the strings ``question`` and ``answers``
  (every gold alias, for exact match / F1). For generation and scoring, not training.
  """
  path = instructions.resolve_data_file(path)
  records = instructions.read_qa_examples(path)
  if not records:
    raise ValueError(f"{path}: no QA records")
  columns = {
      "inputs": [r.prompt(num_passages=num_passages) for r in records],
      "targets": [r.answers[0] if r.answers else "" for r in records],
      "question": [r.question for r in records],
      "answers": tf.ragged.constant([list(r.answers) for r in records], dtype=tf.string),
  }

  def dataset_fn(split: str, shuffle_files: bool, seed: Optional[int] = None):
    del split, shuffle_files, seed
    return tf.data.Dataset.from_tensor_slices(columns)

  vocabulary = vocab_lib.get_vocabulary(vocab)
  task = f"qa_{_task_name(name)}"
  if task in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(task)
  seqio.TaskRegistry.add(
      task, source=seqio.FunctionDataSource(dataset_fn, splits=[split],
                                            num_input_examples={split: len(records)}),
      output_features={"inputs": seqio.Feature(vocabulary, add_eos=False),
                       "targets": seqio.Feature(vocabulary, add_eos=True)},
      preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos],
      shuffle_buffer_size=None)
  return task


# ----------------------------------------------------------------------------------
# The trainer's batch source
# ----------------------------------------------------------------------------------


def _data_sources(name: str) -> tuple[list[RandomAccessDataSource], list[float]]:
  provider = seqio.get_mixture_or_task(name)
  if isinstance(provider, seqio.Mixture):
    tasks = list(provider.tasks)
    rates = [float(provider.get_rate(t)) for t in tasks]
  else:
    tasks, rates = [provider], [1.0]
  sources = []
  for task in tasks:
    if not isinstance(task.source, RandomAccessDataSource):
      raise ValueError(f"task {task.name!r} has a {type(task.source).__name__}; the batch "
                       "source needs tasks registered by retro_jax.data.tasks "
                       "(random access)")
    sources.append(task.source)
  return sources, rates


def _default_shard_info() -> seqio.ShardInfo:
  import jax  # pylint: disable=g-import-not-at-top
  return seqio.ShardInfo(jax.process_index(), jax.process_count())


@gin.configurable
class TaskBatchSource:
  """``get_batch(step)``: this host's share of global batch ``step`` of a Task/Mixture.

  Args:
    task_or_mixture: A name registered by this module.
    batch_size: Global batch size B (divided over the shards).
    seed, shuffle, num_epochs: The stream (``ExampleStream``).
    shard_info: This host's shard; default ``(jax.process_index(), process_count())``.
  Batches are model features (``feature_converters.model_features``); a Retro task gives
  neighbor features, its GPT twin does not.
  """

  def __init__(self, task_or_mixture: str, *, batch_size: int, seed: int = 0,
               shuffle: bool = True, num_epochs: Optional[int] = None,
               shard_info: Optional[seqio.ShardInfo] = None):
    self.name = task_or_mixture
    sources, rates = _data_sources(task_or_mixture)
    kinds = {s.with_neighbors for s in sources}
    if len(kinds) != 1:
      raise ValueError(f"{task_or_mixture}: mixes tasks with and without neighbors")
    self.with_neighbors = kinds.pop()
    self.stream = ExampleStream([s.source for s in sources], rates, seed=seed,
                                shuffle=shuffle, num_epochs=num_epochs)
    self.shard_info = shard_info or _default_shard_info()
    shards = self.shard_info.num_shards
    if batch_size <= 0 or batch_size % shards:
      raise ValueError(f"batch_size={batch_size} must be a positive multiple of the "
                       f"{shards} shards (hosts)")
    self.batch_size, self.local_batch_size = batch_size, batch_size // shards
    first = self.stream.sources[0]
    self.seq_len, self.chunk_length = first.seq_len, first.chunk_length
    logging.info("batch source %s: %s, global batch %d, shard %d/%d, seed %d",
                 task_or_mixture, [s.describe() for s in self.stream.sources], batch_size,
                 self.shard_info.index, shards, seed)

  def elements(self, step: int) -> np.ndarray:
    """This shard's element numbers of step ``step``."""
    if step < 0:
      raise ValueError(f"step must be >= 0, got {step}")
    b = self.local_batch_size
    return step * b + np.arange(b, dtype=np.int64)

  def positions(self, step: int) -> np.ndarray:
    """Global stream positions this shard reads at step ``step``."""
    return shard_positions(self.elements(step), self.shard_info)

  def task_features(self, step: int) -> dict[str, np.ndarray]:
    return self.stream.features(self.positions(step), with_neighbors=self.with_neighbors)

  def get_batch(self, step: int) -> dict[str, np.ndarray]:
    return fc.model_features(self.task_features(step), with_neighbors=self.with_neighbors,
                             where=f"{self.name} step {step}")

  def dataset(self, start_step: int = 0) -> tf.data.Dataset:
    """The same batches as a ``tf.data`` pipeline (seqio feature converter), from
    ``start_step`` on (seeked, not replayed)."""
    ds = stream_dataset(self.stream, with_neighbors=self.with_neighbors,
                        shard_info=self.shard_info,
                        start=start_step * self.local_batch_size)
    converter = (fc.RetroFeatureConverter() if self.with_neighbors
                 else fc.GPTFeatureConverter())
    ds = converter(ds, fc.task_feature_lengths(self.seq_len, self.chunk_length,
                                               with_neighbors=self.with_neighbors))
    return ds.batch(self.local_batch_size, drop_remainder=True)


def _check_vocab(vocab_path: str, model_config) -> None:
  """The model's embedding must cover the data's token ids."""
  if model_config is None or not os.path.exists(vocab_path):
    return
  pieces = vocab_lib.load_sentencepiece(vocab_path).get_piece_size()
  if pieces > model_config.vocab_size:
    raise ValueError(f"{vocab_path} has {pieces} pieces, more than the model's "
                     f"RetroConfig.vocab_size={model_config.vocab_size}")


def _model_shape(model_config) -> dict[str, int]:
  if model_config is None:
    return {}
  return {"chunk_length": model_config.chunk_length,
          "num_neighbors": model_config.num_neighbors,
          "retrieved_length": model_config.neighbor_length}


@gin.configurable
def pretraining_batch_source(retrieval_dir: str = gin.REQUIRED, *, split: str = "train",
                             seq_len: int = gin.REQUIRED, batch_size: int = gin.REQUIRED,
                             with_neighbors: bool = True,
                             num_neighbors: Optional[int] = None, seed: int = 0,
                             shuffle: bool = True, num_epochs: Optional[int] = None,
                             model_config: Any = None, name: Optional[str] = None,
                             missing_ok: bool = False) -> Optional[TaskBatchSource]:
  """Registers a split's tasks and returns the batch source of the Retro or GPT one.

  Args:
    retrieval_dir: The prepared directory (``RETRIEVAL_DIR``).
    split, seq_len, batch_size, seed, shuffle, num_epochs: The stream.
    with_neighbors: The Retro task (True) or its GPT twin (GPT pretraining,
      GPT-fitting).
    num_neighbors: k (default: the model's, else the map's).
    model_config: A ``RetroConfig`` to check the data against (chunk size, k).
    missing_ok: Return None (with a warning) if the split has no query DB, e.g. an
      optional held-out split.
  """
  layout = RetrievalLayout(retrieval_dir)
  if missing_ok and not formats.chunk_db_exists(layout.split_db_prefix(split)):
    logging.warning("no %r split in %s; no batch source", split, layout.root)
    return None
  knn = layout.neighbor_map_path(split)
  if with_neighbors and not os.path.exists(knn):
    raise FileNotFoundError(f"{knn}: no neighbor map for split {split!r}, which a Retro "
                            "run needs (build it with `python -m retro_jax.preprocess`, or "
                            "train without retrieval)")
  _check_vocab(layout.vocab_path, model_config)
  shape = _model_shape(model_config)
  if with_neighbors and num_neighbors is None:
    num_neighbors = shape.get("num_neighbors")
  names = register_retro_tasks(retrieval_dir, split, seq_len, name=name,
                               num_neighbors=num_neighbors if with_neighbors else None)
  source = TaskBatchSource(names.get(with_neighbors), batch_size=batch_size, seed=seed,
                           shuffle=shuffle, num_epochs=num_epochs)
  if shape and source.chunk_length != shape["chunk_length"]:
    raise ValueError(f"{retrieval_dir}: chunk size {source.chunk_length} differs from the "
                     f"model's RetroConfig.chunk_length={shape['chunk_length']}")
  return source


@gin.configurable
def sft_batch_source(retrieval_dir: Optional[str] = None, *,
                     datasets: Sequence[tuple[str, str, float]] = DEFAULT_SFT_BLEND,
                     vocab_path: Optional[str] = None, seq_len: int = gin.REQUIRED,
                     batch_size: int = gin.REQUIRED, with_neighbors: bool = True,
                     seed: int = 0, chunk_length: int = 64, num_neighbors: int = 2,
                     retrieved_length: Optional[int] = None, model_config: Any = None,
                     retrieve_neighbors: bool = False,
                     name: str = "blend") -> TaskBatchSource:
  """Registers an instruction blend (``(name, path, rate)`` triples) and its batch source.

  Args:
    retrieval_dir: Gives the vocabulary (``vocab/spm.model``) unless ``vocab_path``,
      and the retrieval DB when ``retrieve_neighbors``.
    datasets: The blend (default: the project's shipped set in ``data/sft``).
    with_neighbors: Retro SFT (neighbor features present) or GPT-Instruct.
    chunk_length, num_neighbors, retrieved_length: m, k, r; taken from
      ``model_config`` (a ``RetroConfig``) when given.
    retrieve_neighbors: Fill the neighbor features by searching ``retrieval_dir``
      (``Retriever``) with every complete chunk of each prompt, as the 'live' mode of
      generation does; chunks holding answer tokens get none. False (Megatron's
      InstructRetro SFT): all neighbors are masked, the encoder and CCA idle.
  """
  if vocab_path is None:
    if retrieval_dir is None:
      raise ValueError("sft_batch_source needs retrieval_dir (for its vocab/spm.model) "
                       "or vocab_path")
    vocab_path = RetrievalLayout(retrieval_dir).vocab_path
  _check_vocab(vocab_path, model_config)
  shape = dict(chunk_length=chunk_length, num_neighbors=num_neighbors,
               retrieved_length=retrieved_length)
  shape.update(_model_shape(model_config))
  retriever = None
  if retrieve_neighbors and with_neighbors:
    if retrieval_dir is None:
      raise ValueError("sft_batch_source.retrieve_neighbors needs retrieval_dir (the "
                       "retrieval DB to search)")
    from retro_jax.retrieval.retriever import load_retriever  # pylint: disable=g-import-not-at-top
    retriever = load_retriever(retrieval_dir, num_neighbors=shape["num_neighbors"])
  names = register_sft_mixture(name, [tuple(d) for d in datasets], vocab_path, seq_len,
                               retriever=retriever, **shape)
  return TaskBatchSource(names.get(with_neighbors), batch_size=batch_size, seed=seed)
