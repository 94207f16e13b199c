r"""Nested subsets of a retrieval DB and the neighbors of evaluated chunks within them
(RETRO Fig. 1 right: the same model, a growing retrieval DB, no retraining).

    docs = nested_document_subsets(db.num_docs, (1/64, 1/16, 1/4, 1), seed=0)
    ids = subset_chunk_ids(db, docs[0])
    neighbors = subset_neighbors(queries, vectors, ids, db, k=2, extra=8, metric="ip",
                                 query_docs=query_docs)     # [q, k] DB chunk ids

Subsets: a seeded permutation of the DB's documents; the subset of fraction f is its
first ``max(1, ceil(f * D))`` documents, so a smaller subset is always inside a larger
one. Search: exact (a Faiss ``IndexFlat`` with the index's metric) over the subset's
stored chunk embeddings (``embeddings/``), for the given query embeddings only (the
chunks an evaluation scores, never the whole neighbor map); ``k + extra`` candidates,
then the pipeline's same-document exclusion and -1 padding
(``retrieval.neighbors.select_neighbors``).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import faiss
import numpy as np

from retro_jax.retrieval import formats
from retro_jax.retrieval import search as search_lib
from retro_jax.retrieval.neighbors import select_neighbors


def nested_document_subsets(num_docs: int, fractions: Sequence[float], seed: int = 0
                            ) -> list[np.ndarray]:
  """Sorted document ids of each fraction's subset (nested; see the module docstring)."""
  bad = [f for f in fractions if not 0 < f <= 1]
  if bad:
    raise ValueError(f"db_fractions must lie in (0, 1], got {bad}")
  if num_docs <= 0:
    raise ValueError("the retrieval DB has no documents")
  order = np.random.default_rng(seed).permutation(num_docs)
  return [np.sort(order[:max(1, math.ceil(f * num_docs))]) for f in fractions]


def subset_chunk_ids(db: formats.ChunkDB, docs: np.ndarray) -> np.ndarray:
  """int64 chunk ids (ascending) of documents ``docs`` (sorted) of ``db``."""
  docs = np.asarray(docs, np.int64)
  counts = formats.chunks_per_doc(db.sizes[docs], db.chunk_size, db.stride)
  starts = np.asarray(db.chunk_id_start, np.int64)[docs]
  offsets = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
  return np.repeat(starts, counts) + offsets


def subset_neighbors(queries: np.ndarray, vectors: search_lib.VectorSource,
                     subset_ids: np.ndarray, db: formats.ChunkDB, *, k: int, extra: int,
                     metric: str, query_docs: Optional[np.ndarray]) -> np.ndarray:
  """Exact top-k DB chunks of each query among ``subset_ids``.

  Args:
    queries: float [q, dim] query embeddings.
    vectors: the DB's chunk embeddings (row i = chunk i).
    subset_ids: int64 [s] ascending chunk ids of the subset.
    metric: 'ip' or 'l2' (the index's, ``retrieval.json``'s ``metric``).
    query_docs: int64 [q] each query's document for same-document exclusion, or None.
  Returns:
    int64 [q, k] DB chunk ids, best first, -1 where fewer than k survive.
  """
  if metric not in search_lib.METRICS:
    raise ValueError(f"metric {metric!r}: choose from {sorted(search_lib.METRICS)}")
  subset_ids = np.asarray(subset_ids, np.int64)
  if len(queries) == 0 or len(subset_ids) == 0:
    return np.full((len(queries), k), -1, np.int64)
  flat = faiss.IndexFlat(vectors.dim, search_lib.METRICS[metric])
  flat.add(vectors.take(subset_ids))
  _, found = flat.search(np.ascontiguousarray(queries, np.float32),
                         min(k + extra, len(subset_ids)))
  candidates = np.where(found >= 0, subset_ids[np.maximum(found, 0)], -1)
  candidate_docs = None
  if query_docs is not None:
    candidate_docs = np.full(candidates.shape, -1, np.int64)
    present = candidates >= 0
    candidate_docs[present] = db.doc_of_chunk(candidates[present])
  return select_neighbors(candidates, candidate_docs, query_docs, k)
