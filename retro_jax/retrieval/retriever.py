"""Live retrieval during generation and serving: embed a chunk, search, fetch neighbors.

A ``Retriever`` bundles an embedder, a Faiss index and a chunk store:

    neighbor_tokens, neighbor_mask, info = retriever(chunk_tokens, chunk_index)

* ``chunk_tokens``: int [batch, m], the chunk just completed (its pad ids are dropped
  before detokenising, as Megatron and NeMo embed the chunk *text*);
* ``neighbor_tokens``: int32 [batch, k, r], each neighbor chunk with its continuation
  (r = 2m) from the chunk store; ``neighbor_mask``: bool [batch, k] (False where the
  index returned fewer than k hits);
* ``info``: per example, per neighbor ``{"chunk_id", "doc_id", "score", "text"}`` for
  attribution.

Chunk stores: a memory-mapped NeMo retrieval DB (``retro_jax.retrieval.formats.ChunkDB``)
built offline (``Retriever.from_layout(root)`` / ``load_retriever(root)`` load one with its
embedder, vocabulary and Faiss index from a directory ``python -m retro_jax.preprocess``
prepared), or a ``DocumentStore`` that keeps documents added at run time in memory
(the retrieval service's "dynamic retrieval"). A ``DocumentStore`` owns its own exact
inner-product Faiss index; adds, resets and searches are serialised by a lock, so
concurrent requests never see a half-updated store.
"""

from __future__ import annotations

import threading
from typing import Any, Optional, Sequence

from absl import logging
import faiss
import numpy as np

from retro_jax.data import vocab as vocab_lib
from retro_jax.retrieval import formats
from retro_jax.retrieval import search as search_lib
from retro_jax.retrieval.chunk_db import layout_ids
from retro_jax.retrieval.embedders import Embedder, load_embedder
from retro_jax.retrieval.formats import Embeddings
from retro_jax.retrieval.layout import RetrievalLayout


def _ids(vocab: vocab_lib.Vocabulary, pad_id, eod_id) -> tuple[int, Optional[int]]:
  """``(pad_id, eod_id)`` with ``vocab_lib.FROM_VOCAB`` replaced by the vocabulary's ids
  (``vocab_lib.special_ids``; a toy vocabulary that declares none: our own layout)."""
  if vocab_lib.is_from_vocab(pad_id) or vocab_lib.is_from_vocab(eod_id):
    ids = vocab_lib.special_ids(vocab, default=vocab_lib.OWN_LAYOUT)
    pad_id = ids.pad if vocab_lib.is_from_vocab(pad_id) else pad_id
    eod_id = ids.eos if vocab_lib.is_from_vocab(eod_id) else eod_id
  return int(pad_id), None if eod_id is None else int(eod_id)


class DocumentStore:
  """An in-memory, growable retrieval DB with its own exact Faiss index.

  Documents are tokenised with ``vocab``, given an end-of-document token (``eod_id``;
  None: none), padded with ``pad_id`` like a retrieval DB, chunked into m-token chunks
  and embedded chunk by chunk. Both ids default to the vocabulary's
  (``vocab_lib.special_ids``: pad = EOS where it has no pad piece, as Megatron).
  Thread-safe: one lock serialises ``add_documents``, ``reset`` and searches.
  """

  def __init__(self, vocab: vocab_lib.Vocabulary, embedder: Embedder, *,
               chunk_length: int = 64, pad_id: int | str = vocab_lib.FROM_VOCAB,
               eod_id: int | str | None = vocab_lib.FROM_VOCAB,
               max_chunks: int = 1_000_000):
    self.vocab, self.embedder = vocab, embedder
    self.chunk_size = chunk_length
    self.pad_id, self.eod_id = _ids(vocab, pad_id, eod_id)
    self.max_chunks = max_chunks
    self.is_retrieval_db = True
    self._lock = threading.RLock()
    self.reset()

  def reset(self) -> None:
    with self._lock:
      self._tokens = np.zeros((0,), np.int32)  # all documents back to back
      self._chunk_start: list[int] = []        # token offset of each chunk
      self._chunk_doc: list[int] = []
      self.documents: list[dict[str, Any]] = []
      self.index = faiss.IndexFlatIP(self.embedder.dim)

  @property
  def num_chunks(self) -> int:
    return len(self._chunk_start)

  @property
  def num_docs(self) -> int:
    return len(self.documents)

  def add_documents(self, texts: Sequence[str], titles: Optional[Sequence[str]] = None
                    ) -> list[int]:
    """Adds documents; returns their ids. Embedding happens outside the lock's
    critical section only for the new chunks; the store changes atomically."""
    titles = list(titles) if titles is not None else [""] * len(texts)
    if len(titles) != len(texts):
      raise ValueError(f"add_documents: {len(texts)} texts but {len(titles)} titles")
    m = self.chunk_size
    prepared = []
    for text in texts:
      if not isinstance(text, str) or not text.strip():
        raise ValueError("add_documents: every document must be a non-empty string")
      ids = list(self.vocab.encode(text))
      if self.eod_id is not None:
        ids.append(self.eod_id)
      padded = formats.pad_document(ids, m, self.pad_id, retrieval_db=True)
      chunks = padded[:-m].reshape(-1, m)
      texts_of_chunks = [vocab_lib.chunk_text(self.vocab, c, self.pad_id, self.eod_id)
                         for c in chunks]
      prepared.append((padded, chunks.shape[0], texts_of_chunks))
    all_chunk_texts = [t for _, _, ts in prepared for t in ts]
    embeddings = np.asarray(self.embedder.embed_texts(all_chunk_texts), np.float32)
    with self._lock:
      if self.num_chunks + len(all_chunk_texts) > self.max_chunks:
        raise ValueError(f"add_documents: the store would exceed max_chunks="
                         f"{self.max_chunks}")
      doc_ids = []
      pieces = [self._tokens]
      offset = len(self._tokens)
      for (padded, count, _), text, title in zip(prepared, texts, titles):
        doc_id = len(self.documents)
        self.documents.append({"doc_id": doc_id, "title": title, "text": text,
                               "first_chunk": self.num_chunks, "num_chunks": count})
        self._chunk_start.extend(offset + m * i for i in range(count))
        self._chunk_doc.extend([doc_id] * count)
        pieces.append(padded)
        offset += len(padded)
        doc_ids.append(doc_id)
      self._tokens = np.concatenate(pieces)
      self.index.add(embeddings)
      return doc_ids

  def get_chunks(self, chunk_ids, *, with_continuation: Optional[bool] = True,
                 missing_value: Optional[int] = None) -> np.ndarray:
    """``chunk_ids [...]`` -> ``[..., 2m]`` (or ``[..., m]``) int32 tokens."""
    length = self.chunk_size * (2 if with_continuation in (None, True) else 1)
    ids = np.asarray(chunk_ids)
    with self._lock:
      if np.any(ids >= self.num_chunks) or (missing_value is None and np.any(ids < 0)):
        raise ValueError(f"chunk ids outside [0, {self.num_chunks})")
      flat = ids.reshape(-1)
      out = np.full((flat.size, length), self.pad_id if missing_value is None
                    else missing_value, np.int32)
      starts = np.asarray(self._chunk_start, np.int64)
      for row, cid in enumerate(flat):
        if cid >= 0:
          out[row] = self._tokens[starts[cid]:starts[cid] + length]
    return out.reshape(ids.shape + (length,))

  def doc_of_chunk(self, chunk_ids) -> np.ndarray:
    with self._lock:
      return np.asarray(self._chunk_doc, np.int64)[np.asarray(chunk_ids)]

  def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores [n, k], chunk ids [n, k], -1 where fewer than k chunks exist)."""
    with self._lock:
      if self.num_chunks == 0:
        n = len(queries)
        return np.full((n, k), -np.inf, np.float32), np.full((n, k), -1, np.int64)
      return self.index.search(np.asarray(queries, np.float32), k)


class Retriever:
  """Embedder + index + chunk store; the ``retrieve`` callback of generation.

  Args:
    embedder: ``embed_texts(list[str]) -> [n, dim]``.
    vocab: tokeniser of the model (``encode``/``decode``).
    store: a ``DocumentStore`` (searches itself) or a ``ChunkDB`` (then pass ``index``).
    index: a Faiss index over the store's chunk embeddings (for a ``ChunkDB``).
    num_neighbors: k.
    pad_id, eod_id: ids dropped before detokenising a query chunk (``pad_id`` also
      fills missing neighbors); default the vocabulary's (``vocab_lib.special_ids``).
    search_fn: ``search_fn(index, queries, k) -> (scores, ids)``; default Faiss'
      ``index.search`` (pass one that sets nprobe / efSearch).
  """

  def __init__(self, embedder: Embedder, vocab: vocab_lib.Vocabulary, store: Any, *,
               index: Any = None, num_neighbors: int = 2,
               pad_id: int | str = vocab_lib.FROM_VOCAB,
               eod_id: int | str | None = vocab_lib.FROM_VOCAB, search_fn=None):
    self.embedder, self.vocab, self.store = embedder, vocab, store
    self.index = index
    self.num_neighbors = num_neighbors
    self.pad_id, self.eod_id = _ids(vocab, pad_id, eod_id)
    self.search_fn = search_fn
    if index is None and not hasattr(store, "search"):
      raise ValueError("Retriever: a ChunkDB store needs the Faiss index of its chunks")

  def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    if self.index is None:
      return self.store.search(queries, k)
    if self.search_fn is not None:
      return self.search_fn(self.index, queries, k)
    return self.index.search(np.asarray(queries, np.float32), k)

  def passages(self, chunk_ids: np.ndarray, num_tokens: int) -> np.ndarray:
    """Passages for a prompt: ``chunk_ids [...]`` (-1: none) -> ``[..., num_tokens]``,
    the tokens of each chunk's document from that chunk on (``pad_id`` past the
    document's end). With ``num_tokens`` = 2m a passage is the chunk with its
    continuation, the model's neighbor; a prompt may want longer passages than the
    model's chunks give (chunks of 16, passages of 128 tokens)."""
    m = self.store.chunk_size
    ids = np.asarray(chunk_ids, np.int64)
    flat = ids.reshape(-1, 1)
    window = flat + np.arange(-(-num_tokens // m))                # [n, chunks]
    present = (flat >= 0) & (window < self.store.num_chunks)
    safe = np.where(present, window, 0)
    if self.store.num_chunks:
      doc = self.store.doc_of_chunk(safe)
      present &= doc == doc[:, :1]
    tokens = self.store.get_chunks(np.where(present, window, -1), with_continuation=False,
                                   missing_value=self.pad_id)      # [n, chunks, m]
    return tokens.reshape(len(flat), -1)[:, :num_tokens].reshape(*ids.shape, num_tokens)

  def query_texts(self, texts: Sequence[str], k: Optional[int] = None, *,
                  passage_tokens: Optional[int] = None
                  ) -> tuple[np.ndarray, np.ndarray, list[list[dict]]]:
    """Neighbors of free texts: (tokens [n, k, 2m], mask [n, k], info); each hit's
    ``text`` is its neighbor's, or with ``passage_tokens`` its ``passages``'."""
    k = k or self.num_neighbors
    embeddings = np.asarray(self.embedder.embed_texts(list(texts)), np.float32)
    scores, ids = self.search(embeddings, k)
    ids = np.asarray(ids, np.int64)
    mask = ids >= 0
    tokens = self.store.get_chunks(ids, with_continuation=True, missing_value=self.pad_id)
    shown = tokens if passage_tokens is None else self.passages(ids, passage_tokens)
    info = []
    for row in range(len(texts)):
      hits = []
      for j in range(k):
        if not mask[row, j]:
          continue
        cid = int(ids[row, j])
        hits.append({"chunk_id": cid, "doc_id": int(self.store.doc_of_chunk(cid)),
                     "score": float(scores[row, j]),
                     "text": vocab_lib.chunk_text(self.vocab, shown[row, j], self.pad_id,
                                                  self.eod_id)})
      info.append(hits)
    return tokens, mask, info

  def __call__(self, chunk_tokens: np.ndarray, chunk_index: int = 0
               ) -> tuple[np.ndarray, np.ndarray, list[list[dict]]]:
    """The generation callback: neighbors of completed chunks [batch, m]."""
    del chunk_index
    texts = [vocab_lib.chunk_text(self.vocab, row, self.pad_id, self.eod_id)
             for row in np.asarray(chunk_tokens)]
    return self.query_texts(texts)

  @classmethod
  def from_layout(cls, root: "str | RetrievalLayout", *, nprobe: Optional[int] = None,
                  ef_search: Optional[int] = None, num_neighbors: Optional[int] = None,
                  embedder: Optional[Embedder] = None, use_gpu="auto") -> "Retriever":
    """A retriever over a prepared retrieval directory (``RetrievalLayout``).

    Reads ``retrieval.json`` for the embedder, k, pad/EOD ids (else the vocabulary's:
    ``chunk_db.layout_ids``) and search parameters;
    opens the vocabulary, the memory-mapped retrieval DB and the Faiss index, checking
    the index against the embedder's dimension and the DB's chunk count.

    Args:
      root: The directory (or its layout).
      nprobe, ef_search: Override the build's search parameters.
      num_neighbors: Override k.
      embedder: An already loaded embedder (default: ``load_embedder`` of the build's).
      use_gpu: Search on a GPU copy of the index when faiss has GPUs ('auto').
    """
    layout = root if isinstance(root, RetrievalLayout) else RetrievalLayout(root)
    config = layout.read_config()
    missing = [key for key in ("embedder", "num_neighbors") if key not in config]
    if missing:
      raise ValueError(f"{layout.config_path}: missing settings {missing}")
    if embedder is None:
      embedder = load_embedder(config["embedder"])
    want = config.get("embedder_fingerprint")
    have = getattr(embedder, "fingerprint", None)
    if want and have and want != have:
      logging.warning("%s: the index was built with embedder fingerprint %s, this embedder "
                      "has %s; neighbors may be worse", layout.config_path, want[:12],
                      have[:12])
    store = formats.ChunkDB(layout.retrieval_db_prefix)
    index = search_lib.open_index(layout.index_path, expected_dim=embedder.dim,
                                 expected_ntotal=store.num_chunks)
    refine = None
    if search_lib.needs_refine(index):       # fast-scan codes: re-rank with the vectors
      refine = Embeddings(layout.embeddings_dir)
    searcher = search_lib.IndexSearcher(
        index, nprobe=nprobe if nprobe is not None else config.get("nprobe"),
        ef_search=ef_search if ef_search is not None else config.get("ef_search"),
        refine=refine, k_factor=config.get("k_factor") if refine is not None else None,
        use_gpu=use_gpu, path=layout.index_path)
    ids = {k: v for k, v in layout_ids(layout).items() if v is not None}
    return cls(embedder, vocab_lib.load_sentencepiece(layout.vocab_path), store,
               index=searcher, num_neighbors=num_neighbors or int(config["num_neighbors"]),
               **ids)


def load_retriever(root: str, *, nprobe: Optional[int] = None,
                   ef_search: Optional[int] = None, num_neighbors: Optional[int] = None,
                   use_gpu="auto") -> Retriever:
  """``Retriever.from_layout`` with the build's embedder (what the entry points call)."""
  return Retriever.from_layout(root, nprobe=nprobe, ef_search=ef_search,
                               num_neighbors=num_neighbors, use_gpu=use_gpu)
