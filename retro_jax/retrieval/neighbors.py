"""The neighbor-map stage: for every chunk of the training data, its k nearest DB chunks.

    build_neighbor_map(query_db, retrieval_db, embed_chunks, search, output_dir, k=2)

* ``query_db``: the training data's chunk DB (``ChunkDB``, chunks of m tokens);
* ``retrieval_db``: the retrieval DB (neighbor + continuation = 2m tokens);
* ``embed_chunks(tokens [n, m]) -> [n, dim]``: detokenise and embed (the same
  embedder that embedded the retrieval DB);
* ``search(queries [n, dim], count) -> (scores [n, count], ids [n, count])``: the Faiss
  index of the retrieval DB's chunks (ids are retrieval-DB chunk ids, -1 = none).

It queries ``k + extra`` candidates per chunk and, with ``exclude_same_document``, drops
candidates from the query chunk's own document (RETRO trains on the data it
retrieves from; NeMo's ``remove_duplicate``). That needs the documents of the two DBs to
line up: document i of the training DB is document i of the retrieval DB, which holds
when both were built from the same corpus in the same order, or when the training
corpus is the first documents of the retrieval corpus (the demo's layout). The stage
checks this on the first chunk of each document it touches and fails otherwise.
Rows keep the first k surviving candidates, best first; fewer than k survivors are
padded with -1 (masked downstream, never wrapped to a real chunk).

``query_embeddings`` (optional, ``[query chunks, dim]``, rows sliceable: an array, a
memmap or an embeddings reader) replaces ``embed_chunks``: when the training documents
are the first documents of the retrieval DB, query chunk i *is* DB chunk i, whose
embedding the embedding stage already computed (``retro_jax.preprocess`` passes it).

Output: ``output_dir/shard_XXXXX_of_YYYYY.knn`` per shard (NeMo 'KNNRETM' map with the
shard's ``chunk_start_id``), ``output_dir/neighbors.knn`` (the merged map, start 0) and
a manifest; finished shards are skipped on a re-run, and a killed shard leaves no file
(atomic writers), so a re-run produces the same outputs as an uninterrupted run.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Optional

from absl import logging
import numpy as np
import tqdm

from retro_jax.retrieval import formats
from retro_jax.retrieval import search as search_lib
from retro_jax.utils import stages
from retro_jax.utils.io import Manifest

# Settings that identify the inputs by content (utils.io.Manifest): changed DBs redo
# the map instead of being refused.
INPUT_KEYS = ("query_db", "retrieval_db", "query_chunks", "db_chunks")

EmbedFn = Callable[[np.ndarray], np.ndarray]
SearchFn = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]
MERGED_NAME = "neighbors.knn"


SHARD_SUFFIX = ".knn"


def select_neighbors(candidates: np.ndarray, candidate_docs: np.ndarray,
                     query_docs: Optional[np.ndarray], k: int) -> np.ndarray:
  """Keeps the first k candidates per row not from the query's document (-1 padded).

  Args:
    candidates: int64 [n, c] DB chunk ids, best first, -1 = none.
    candidate_docs: int64 [n, c] their documents (ignored where candidates is -1).
    query_docs: int64 [n] the query chunks' documents, or None (no exclusion).
  Returns:
    int64 [n, k].
  """
  keep = candidates >= 0
  if query_docs is not None:
    keep &= candidate_docs != query_docs[:, None]
  order = np.argsort(~keep, axis=1, kind="stable")[:, :k]   # kept ones first, in order
  picked = np.take_along_axis(candidates, order, axis=1)
  picked_keep = np.take_along_axis(keep, order, axis=1)
  out = np.where(picked_keep, picked, -1)
  if out.shape[1] < k:
    out = np.pad(out, [(0, 0), (0, k - out.shape[1])], constant_values=-1)
  return out.astype(np.int64)


def check_documents_align(query_db: formats.ChunkDB, retrieval_db: formats.ChunkDB,
                          doc_ids: np.ndarray) -> None:
  """Fails unless query document d and retrieval document d start with the same chunk."""
  for d in np.unique(doc_ids):
    d = int(d)
    if d >= retrieval_db.num_docs:
      raise ValueError(f"exclude_same_document: training document {d} has no counterpart "
                       f"in the retrieval DB {retrieval_db.idx_path} ({retrieval_db.num_docs}"
                       " documents); build both from the same corpus order")
    q_start, _ = query_db.doc_chunk_range(d)
    r_start, _ = retrieval_db.doc_chunk_range(d)
    q = query_db.get_chunks(np.asarray(q_start), with_continuation=False)
    r = retrieval_db.get_chunks(np.asarray(r_start), with_continuation=False)
    if not np.array_equal(q, r):
      raise ValueError(f"exclude_same_document: document {d} of {query_db.idx_path} differs "
                       f"from document {d} of {retrieval_db.idx_path}; the training "
                       "documents must be the first documents of the retrieval DB, in order")


def _select_rows(query_db, retrieval_db, ids, candidates, k, exclude_same_document):
  """The map's rows [n, k] of query chunks ``ids`` from their search candidates."""
  candidates = np.asarray(candidates, np.int64)
  if np.any(candidates >= retrieval_db.num_chunks):
    raise ValueError(f"the index returned chunk ids >= {retrieval_db.num_chunks}, the size of "
                     f"{retrieval_db.idx_path}: index and retrieval DB do not match")
  query_docs = cand_docs = None
  if exclude_same_document:
    query_docs = query_db.doc_of_chunk(ids)
    check_documents_align(query_db, retrieval_db, query_docs)
    cand_docs = np.full(candidates.shape, -1, np.int64)
    present = candidates >= 0
    cand_docs[present] = retrieval_db.doc_of_chunk(candidates[present])
  return select_neighbors(candidates, cand_docs, query_docs, k)


def _neighbors_of_block(query_db, retrieval_db, start, end, embed_chunks, search, k,
                        extra, exclude_same_document, query_embeddings=None):
  ids = np.arange(start, end)
  if query_embeddings is not None:
    embeddings = np.asarray(query_embeddings[start:end], np.float32)
  else:
    queries = query_db.get_chunks(ids, with_continuation=False)
    embeddings = np.asarray(embed_chunks(queries), np.float32)
  _, candidates = search(embeddings, k + extra)
  return _select_rows(query_db, retrieval_db, ids, candidates, k, exclude_same_document)


def tune_neighbor_search(query_db: formats.ChunkDB, retrieval_db: formats.ChunkDB,
                         embed_chunks: Optional[EmbedFn], searcher: search_lib.IndexSearcher,
                         *, k: int, extra: int, exclude_same_document: bool,
                         target_recall: float, db_embeddings=None, query_embeddings=None,
                         sample_size: int = 2000, seed: int = 0
                         ) -> Optional[search_lib.SearchTuning]:
  """Chooses ``searcher``'s nprobe / k_factor for ``target_recall`` of the map's rows.

  A seeded sample of ``sample_size`` query chunks of the whole query DB (the same in
  every shard) is searched as the map searches (``k + extra`` candidates, same-document
  exclusion) and compared with the rows exact search would give
  (``search_lib.tune_search``; brute force over ``db_embeddings``, default the
  searcher's re-ranking vectors).

  Returns:
    The tuning, or None when the searcher has nothing to choose.
  """
  if not search_lib.is_tunable(searcher):
    return None
  vectors = db_embeddings if db_embeddings is not None else searcher.refine
  if vectors is None:
    raise ValueError("target_recall: the exact neighbors of the tuning sample need the "
                     "retrieval DB's embeddings; pass db_embeddings= (or give nprobe, or "
                     "target_recall=None)")
  n = query_db.num_chunks
  rng = np.random.default_rng(seed)
  ids = np.sort(rng.choice(n, size=min(sample_size, n), replace=False)).astype(np.int64)
  if query_embeddings is not None:
    queries = search_lib.VectorSource(query_embeddings).take(ids)
  else:
    queries = np.asarray(embed_chunks(query_db.get_chunks(ids, with_continuation=False)),
                         np.float32)
  select = lambda candidates: _select_rows(query_db, retrieval_db, ids, candidates, k,
                                           exclude_same_document)
  return search_lib.tune_search(searcher, queries, vectors, k=k, count=k + extra,
                                target_recall=target_recall, select=select)


def _recorded_search(output_dir: str, search: Any, target_recall: Optional[float],
                     query_db: formats.ChunkDB, retrieval_db: formats.ChunkDB
                     ) -> Optional[dict]:
  """The settings of a neighbor map begun in ``output_dir`` for the same DBs whose
  search parameters a tunable ``search`` should take over: recorded for the same
  ``target_recall``, or before target recalls existed (fixed nprobe / k_factor).
  None when there is none, or when the target changed (the map is then refused as
  built with other settings)."""
  if target_recall is None or not search_lib.is_tunable(search):
    return None
  try:
    settings = Manifest.read_settings(output_dir)
  except (OSError, ValueError):
    return None                      # none, or corrupt: Manifest reports it on opening
  if "nprobe" not in settings:
    return None
  if settings.get("target_recall", target_recall) != target_recall:
    return None
  if (settings.get("query_db") != formats.db_fingerprint(query_db)
      or settings.get("retrieval_db") != formats.db_fingerprint(retrieval_db)):
    return None                      # other inputs: the map is redone, tuned afresh
  return settings


def build_neighbor_map(query_db: formats.ChunkDB, retrieval_db: formats.ChunkDB,
                       embed_chunks: EmbedFn, search: SearchFn, output_dir: str, *,
                       k: int = 2, extra: int = 8, exclude_same_document: bool = True,
                       shard_id: int = 0, num_shards: int = 1, block_size: int = 4096,
                       settings: Optional[dict] = None, merge: bool = True,
                       progress: bool = True, query_embeddings=None,
                       target_recall: Optional[float] = search_lib.DEFAULT_TARGET_RECALL,
                       db_embeddings=None, tune_queries: int = 2000,
                       seed: int = 0) -> Optional[str]:
  """Builds this shard's neighbor map (skipped when done); merges when all are done.

  Args:
    settings: extra values the outputs depend on (embedder, index, nprobe...): a re-run
      with different settings in the same directory is refused.
    query_embeddings: ``[query_db.num_chunks, dim]`` precomputed query embeddings
      (sliceable rows); then ``embed_chunks`` is not called.
    target_recall: With an ``IndexSearcher`` of an IVF index, first choose the cheapest
      nprobe / k_factor whose rows reach this recall against exact search on a seeded
      sample of ``tune_queries`` query chunks (``tune_neighbor_search``; parameters the
      searcher was given are kept); the choice and the recall it reached are logged and
      recorded in the manifest. None: search with the searcher's parameters as they are.
    db_embeddings: The retrieval DB's embeddings, for the sample's exact neighbors
      (default: the searcher's re-ranking vectors).
    seed: Of the tuning sample.
  Returns:
    The merged map's path once every shard is finished, else None.
  Raises:
    ValueError: among others, when ``target_recall`` cannot be reached.
  """
  if not retrieval_db.is_retrieval_db:
    raise ValueError(f"{retrieval_db.idx_path} is a training DB; neighbors come from a "
                     "retrieval DB (built with retrieval_db=True)")
  if query_db.chunk_size != retrieval_db.chunk_size:
    raise ValueError(f"chunk sizes differ: {query_db.idx_path} has m={query_db.chunk_size}, "
                     f"{retrieval_db.idx_path} has m={retrieval_db.chunk_size}")
  if query_embeddings is not None:
    rows = getattr(query_embeddings, "shape", (None,))[0]
    rows = len(query_embeddings) if rows is None else rows
    if rows < query_db.num_chunks:
      raise ValueError(f"query_embeddings: {rows} rows for the {query_db.num_chunks} "
                       f"chunks of {query_db.idx_path}")
  tuning = None
  recorded = _recorded_search(output_dir, search, target_recall, query_db, retrieval_db)
  if recorded is not None:
    # This directory's map (or some of its shards) was searched with these parameters:
    # every shard and every resume keeps them, without searching the tuning sample again.
    search.set_parameters(**{key: recorded[key] for key in ("nprobe", "k_factor")
                             if key in recorded and key not in search.explicit})
    logging.info("neighbors: search parameters %s as recorded in %s", search.parameters,
                 output_dir)
    target_recall = recorded.get("target_recall")
  elif target_recall is not None:
    tuning = tune_neighbor_search(
        query_db, retrieval_db, embed_chunks, search, k=k, extra=extra,
        exclude_same_document=exclude_same_document, target_recall=target_recall,
        db_embeddings=db_embeddings, query_embeddings=query_embeddings,
        sample_size=tune_queries, seed=seed)
  searched_with = {}
  if tuning is not None or recorded is not None:
    # The parameters searched with (deterministic), over any the caller recorded.
    searched_with = dict(search.parameters)
    if target_recall is not None:
      searched_with["target_recall"] = target_recall
  if tuning is not None:
    logging.info("neighbors: search parameters %s chosen for recall %.3f: %.4f on %d "
                 "sample query chunks", search.parameters, target_recall, tuning.recall,
                 tuning.sample)
  # The DBs by content (never by path): changed DBs redo the map, a moved one keeps it.
  manifest = Manifest(output_dir, dict(
      settings or {}, **searched_with, k=k, extra=extra,
      exclude_same_document=exclude_same_document,
      num_shards=num_shards, query_chunks=query_db.num_chunks,
      db_chunks=retrieval_db.num_chunks, query_db=formats.db_fingerprint(query_db),
      retrieval_db=formats.db_fingerprint(retrieval_db)), INPUT_KEYS)
  name = stages.shard_name(shard_id, num_shards, SHARD_SUFFIX)
  if not manifest.is_done(name):
    start, end = stages.shard_chunk_range(query_db.num_chunks, shard_id, num_shards)
    began = time.time()
    stages.remove_stale_temporaries(output_dir, name)
    with formats.NeighborMapWriter(os.path.join(output_dir, name), k,
                                   chunk_start_id=start) as writer:
      bar = tqdm.tqdm(total=end - start, unit="chunk", disable=not progress,
                      desc=f"neighbors shard {shard_id}/{num_shards}")
      for block_start in range(start, end, block_size):
        block_end = min(end, block_start + block_size)
        writer.write(_neighbors_of_block(query_db, retrieval_db, block_start, block_end,
                                         embed_chunks, search, k, extra,
                                         exclude_same_document, query_embeddings))
        bar.update(block_end - block_start)
      bar.close()
    seconds = time.time() - began
    info = {"start": start, "end": end, "seconds": seconds}
    if tuning is not None:
      info["search_tuning"] = tuning.summary()
    manifest.mark_done(name, [name], info)
    logging.info("neighbors: shard %d/%d, chunks [%d, %d) in %.1fs (%.0f chunks/s)",
                 shard_id, num_shards, start, end, seconds,
                 (end - start) / max(seconds, 1e-9))
  if not merge:
    return None
  return merge_shards(output_dir, num_shards, manifest)


def merge_shards(output_dir: str, num_shards: int, manifest: Manifest) -> Optional[str]:
  """Merges finished shard maps into ``neighbors.knn`` (None if some are missing)."""
  names = [stages.shard_name(i, num_shards, SHARD_SUFFIX) for i in range(num_shards)]
  fresh = Manifest(output_dir, manifest.settings, INPUT_KEYS)
  if not all(fresh.is_done(n) for n in names):
    return None
  merged = os.path.join(output_dir, MERGED_NAME)
  with stages.locked(output_dir, "merge"):        # the last shards may finish at once
    fresh = Manifest(output_dir, manifest.settings, INPUT_KEYS)
    if not fresh.is_done(MERGED_NAME):
      stages.remove_stale_temporaries(output_dir, MERGED_NAME)
      formats.merge_neighbor_maps([os.path.join(output_dir, n) for n in names], merged)
      fresh.mark_done(MERGED_NAME, [MERGED_NAME])
  return merged
