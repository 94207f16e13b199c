r"""Random-access example sources: task features of example i, read on demand.

Every task of ``retro_jax.data.tasks`` is backed by one of these (numpy, memory-mapped;
nothing is loaded whole), so the stream (``retro_jax.data.ordering``) is a pure function
of (seed, position):

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
  mask False: CCA is skipped and only decoder weights learn, as InstructRetro),
  neighbors from a ``retriever`` over the prompt's complete chunks, or an example's own
  passages read by every chunk.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional, Protocol, Sequence

import numpy as np

from retro_jax.data import instructions
from retro_jax.data import vocab as vocab_lib
from retro_jax.retrieval import formats
from retro_jax.retrieval.chunk_db import Tokenizer, built_ids, layout_ids
from retro_jax.retrieval.layout import RetrievalLayout

_VALIDATE_ROWS_LIMIT = 1 << 24        # full neighbor-map scan on open up to this many ids

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
      Default: no neighbors at all (InstructRetro). An example with
      ``neighbor_passages`` reads those instead, in every chunk (as generation's
      fixed passages), retriever or not.
    align_prompts: Left-pad each example with ``pad_id`` (weight 0) so that its prompt
      ends at a chunk boundary, as generation's ``align_prompts`` (the evaluation's
      default) lays out a prompt: the first answer token then reads the neighbors of
      the chunk holding the prompt's end (the question). Examples that would exceed
      n + 1 tokens lose prompt tokens from the left instead.
    pad_id: Padding of targets (weight 0) and of missing neighbors; default the
      vocabulary's (``vocab_lib.special_ids``: its EOS where it has no pad piece, as
      Megatron pads neighbors with EOD). Examples end with the vocabulary's EOS.
    name: For messages.
  """

  def __init__(self, examples: Sequence[instructions.SFTExample], vocab: Any, *,
               seq_len: int, chunk_length: int = 64, num_neighbors: int = 2,
               retrieved_length: Optional[int] = None, pad_id: Optional[int] = None,
               retriever: Optional[Retrieve] = None, align_prompts: bool = False,
               name: str = "sft"):
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
    self.align_prompts = align_prompts
    self.num_examples = len(self.records)
    self.name = name

  def describe(self) -> str:
    return f"SFTSource({self.name}, examples={self.num_examples}, n={self.seq_len})"

  def encode(self, index: int) -> tuple[np.ndarray, np.ndarray, int]:
    """``(tokens [L], loss_weights [L], prompt_length)`` of example ``index``."""
    prompt, answer = self.records[index].render()
    max_tokens = self.seq_len + 1
    tokens, weights, prompt_len = instructions.encode_sft(
        prompt, answer, self.processor, max_tokens, eos_id=self.eos_id)
    if not self.align_prompts or prompt_len % self.chunk_length == 0:
      return tokens, weights, prompt_len
    if tokens.size + (-prompt_len % self.chunk_length) > max_tokens:
      # m - 1 tokens of room always hold the padding.
      tokens, weights, prompt_len = instructions.encode_sft(
          prompt, answer, self.processor, max_tokens - self.chunk_length + 1,
          eos_id=self.eos_id)
    pad = -prompt_len % self.chunk_length
    return (np.concatenate([np.full(pad, self.pad_id, np.int32), tokens]),
            np.concatenate([np.zeros(pad, np.float32), weights]), prompt_len + pad)

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
      fixed = self.records[int(i)].neighbor_passages
      if with_neighbors and fixed:              # every chunk reads the same passages
        nb_tokens, nb_mask = vocab_lib.passage_neighbors(
            [self.processor.encode(text) for text in fixed], self.retrieved_length,
            pad_id=self.pad_id, eod_id=self.eos_id, num_neighbors=self.num_neighbors)
        out["neighbor_tokens"][row] = nb_tokens
        out["neighbor_mask"][row] = nb_mask
      elif with_neighbors and self.retriever is not None and complete:
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
