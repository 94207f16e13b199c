r"""Retrieval pipeline speed and memory: embedding, index, neighbors, chunk-DB RSS.

    python -m retro_jax.bench.retrieval                      # everything, 1M vectors
    python -m retro_jax.bench.retrieval --num_vectors=100000 --sections=index

Sections (``--sections``, comma-separated):

* ``embedding``: chunks/s of the Flax MiniLM encoder vs sentence-transformers on the
  same prose chunks (``retro_jax.bench.embedding.run_embedding_bench``).
* ``index``: the neighbor-map workload at ``--num_vectors`` DB chunks: train the
  default index (``retro_jax.retrieval.index.default_factory``, or ``--factory``), add
  (vectors/s), then ``build_neighbor_map`` for ``--num_queries`` query chunks (queries/s,
  the stage's own code path: choose nprobe / k_factor for ``--target_recall`` on a
  sample of 2,000 queries unless ``--nprobe`` / ``--k_factor`` are given, search k +
  extra candidates, select, write the NeMo KNN file) and recall@k of its rows against
  exact search (``IndexFlatIP``) on a seeded subset of ``--recall_queries`` queries.
  The total (train + add + neighbors) is the
  time to "neighbors for N chunks" once the chunks are embedded.
* ``real_recall``: recall@k of the default IVF index at its default nprobe on the real
  MiniLM embeddings alone (queries: held-out real chunks).
* ``db_rss``: peak RSS of ``build_chunk_db`` at two corpus sizes, each in a fresh
  subprocess (``resource.getrusage``): bounded, independent of the DB size.
* ``db_open``: time to open a retmmap chunk DB of ``--db_open_chunks`` chunks with and
  without the open-time index validation (``ChunkDB(check_index=...)``), for
  documents of 10 chunks and of 1 chunk (the worst case: one document per chunk).
  The index arrays are synthetic (written directly, as the writer would) and the
  ``.bin`` is a sparse file, so no tokens are generated; the arrays are read from
  the page cache (warm: the best of 3 opens).

Vectors. Real vectors are MiniLM embeddings (the Flax embedder) of real English prose
(``retro_jax.data.prose.real_embeddings``): ``prose_documents()`` = the Python
documentation topics (``pydoc_data.topics``) and the docstrings of the standard
library's modules, cut into 40-word chunks (~64 WordPiece tokens); about 8k chunks,
deterministic, no download. They are cached in ``--cache_dir``. Embedding a million chunks does not fit this benchmark's budget on a
CPU (MiniLM embeds tens of chunks/s per core), so larger sets are made by a documented
generator, ``synthetic_like(real, n)``: a smoothed bootstrap (kernel density sample) of
the real embeddings. Each synthetic vector is a random real vector plus Gaussian noise
with the real embeddings' covariance scaled by ``bandwidth^2``, renormalised to unit
length; the bandwidth is set so that a synthetic vector's cosine to its parent equals
the mean cosine of a real chunk to its nearest real neighbor. The result has the real
data's anisotropy and topic clusters at the scale of real neighbor distances. Queries
are drawn from the same generator independently of the DB (a query is never a DB
vector). How the vectors were made is printed with the results.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import tempfile
import time
from typing import Any, Optional, Sequence

from absl import app
from absl import flags
import faiss
import numpy as np

from retro_jax.bench.embedding import run_embedding_bench
from retro_jax.data.prose import prose_chunk_texts, prose_documents, real_embeddings
from retro_jax.data.vocab import train_sentencepiece
from retro_jax.retrieval import formats
from retro_jax.retrieval import index as index_lib
from retro_jax.retrieval import search as search_lib
from retro_jax.retrieval.embedders import load_embedder
from retro_jax.retrieval.neighbors import build_neighbor_map
from retro_jax.utils import stages
from retro_jax.utils.io import Manifest


# ----------------------------------------------------------------------------------
# The generator
# ----------------------------------------------------------------------------------


def nearest_neighbor_cosine(real: np.ndarray, docs: Optional[np.ndarray] = None) -> float:
  """Mean cosine of a real vector to its nearest other vector (of another document)."""
  index = faiss.IndexFlatIP(real.shape[1])
  index.add(real)
  scores, ids = index.search(real, 16)
  best = []
  for row in range(len(real)):
    for score, j in zip(scores[row], ids[row]):
      if j != row and (docs is None or docs[j] != docs[row]):
        best.append(score)
        break
  return float(np.mean(best))


def synthetic_like(real: np.ndarray, n: int, *, seed: int = 0,
                   target_cosine: Optional[float] = None, block: int = 65536
                   ) -> tuple[np.ndarray, dict]:
  """``n`` unit vectors from a smoothed bootstrap of ``real`` (see the module docstring).

  Returns:
    (float32 [n, dim], a description dict: parents, bandwidth, target cosine).
  """
  rng = np.random.default_rng(seed)
  real = np.asarray(real, np.float32)
  mean = real.mean(axis=0)
  centered = real - mean
  cov = centered.T @ centered / max(len(real) - 1, 1)
  eigval, eigvec = np.linalg.eigh(cov.astype(np.float64))
  root = (eigvec * np.sqrt(np.clip(eigval, 0, None))).astype(np.float32)  # cov = root root^T
  target = nearest_neighbor_cosine(real) if target_cosine is None else target_cosine
  # E|noise|^2 = h^2 tr(cov); a unit parent plus noise has cosine ~ 1/sqrt(1 + h^2 tr).
  trace = float(np.trace(cov))
  bandwidth = float(np.sqrt(max(1.0 / target ** 2 - 1.0, 1e-6) / trace))
  out = np.empty((n, real.shape[1]), np.float32)
  for lo in range(0, n, block):
    hi = min(n, lo + block)
    parents = real[rng.integers(0, len(real), hi - lo)]
    noise = rng.standard_normal((hi - lo, real.shape[1]), dtype=np.float32) @ root.T
    x = parents + bandwidth * noise
    out[lo:hi] = x / np.linalg.norm(x, axis=1, keepdims=True)
  description = {"generator": "smoothed bootstrap of real MiniLM embeddings",
                 "real_vectors": int(len(real)), "bandwidth": bandwidth,
                 "target_parent_cosine": target, "seed": seed}
  return out, description


# ----------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------


def _write_random_db(prefix: str, num_chunks: int, *, retrieval_db: bool, seed: int,
                     chunks_per_doc: int = 16, chunk_size: int = 64) -> None:
  """A chunk DB of ``num_chunks`` chunks of random tokens (the neighbor workload reads
  its documents for alignment only; the vectors come from the generator)."""
  rng = np.random.default_rng(seed)
  with formats.ChunkDBWriter(prefix, dtype=np.uint16, pad_id=0, chunk_size=chunk_size,
                             retrieval_db=retrieval_db) as writer:
    left = num_chunks
    while left:
      count = min(chunks_per_doc, left)
      writer.add_document(rng.integers(2, 30000, count * chunk_size).astype(np.uint16))
      left -= count


def index_section(db_vectors: np.ndarray, query_vectors: np.ndarray, *, k: int = 2,
                  extra: int = 8, factory: Optional[str] = None,
                  nprobe: Optional[int] = None, ef_search: Optional[int] = None,
                  k_factor: Optional[int] = None, train_size: Optional[int] = None,
                  recall_queries: int = 2000, workdir: Optional[str] = None,
                  progress: bool = True, seed: int = 0,
                  target_recall: Optional[float] = search_lib.DEFAULT_TARGET_RECALL,
                  tune_queries: int = 2000) -> dict:
  """Train + add + ``build_neighbor_map`` over ``query_vectors``; recall on a subset.

  The map chooses nprobe / k_factor for ``target_recall`` on a sample of
  ``tune_queries`` queries unless they are given (``build_neighbor_map``); its time is
  in the neighbor seconds. Works in ``workdir`` (default: a temporary directory,
  removed afterwards).
  """
  if workdir is None:
    with tempfile.TemporaryDirectory(prefix="bench_retrieval_") as tmp:
      return index_section(db_vectors, query_vectors, k=k, extra=extra, factory=factory,
                           nprobe=nprobe, ef_search=ef_search, k_factor=k_factor,
                           train_size=train_size, recall_queries=recall_queries,
                           workdir=tmp, progress=progress, seed=seed,
                           target_recall=target_recall, tune_queries=tune_queries)
  n, dim = db_vectors.shape
  # Stored as the embedding stage stores them: float16 .npy files, memory-mapped.
  for name, array in (("db.npy", db_vectors), ("queries.npy", query_vectors)):
    np.save(os.path.join(workdir, name), np.asarray(array, np.float16))
  db_vectors = np.load(os.path.join(workdir, "db.npy"), mmap_mode="r")
  query_vectors = np.load(os.path.join(workdir, "queries.npy"), mmap_mode="r")
  factory = factory or index_lib.default_factory(n, dim)
  began = time.perf_counter()
  built = index_lib.build_index(db_vectors, os.path.join(workdir, "index"), factory=factory,
                                train_size=train_size, seed=seed, progress=progress,
                                use_gpu="auto")
  build_seconds = time.perf_counter() - began
  manifest = Manifest.load(os.path.join(workdir, "index"), stage=index_lib.STAGE,
                           what="index", input_keys=index_lib.INPUT_KEYS)
  built_settings = manifest.settings
  train_seconds = manifest.info("trained")["seconds"]
  add_seconds = manifest.info(stages.shard_name(0, 1, index_lib.SHARD_SUFFIX))["seconds"]
  index = search_lib.open_index(built.index_path)
  refine = db_vectors if search_lib.needs_refine(index) else None
  searcher = search_lib.IndexSearcher(index, nprobe=nprobe, ef_search=ef_search,
                                     refine=refine, k_factor=k_factor if refine is not None
                                     else None, path=built.index_path)
  _write_random_db(os.path.join(workdir, "db"), n, retrieval_db=True, seed=1)
  _write_random_db(os.path.join(workdir, "queries"), len(query_vectors),
                   retrieval_db=False, seed=2)
  retrieval_db = formats.ChunkDB(os.path.join(workdir, "db"))
  query_db = formats.ChunkDB(os.path.join(workdir, "queries"))
  began = time.perf_counter()
  path = build_neighbor_map(query_db, retrieval_db, None, searcher,
                            os.path.join(workdir, "neighbors"), k=k, extra=extra,
                            exclude_same_document=False, block_size=16384,
                            progress=progress, query_embeddings=query_vectors,
                            target_recall=target_recall, db_embeddings=db_vectors,
                            tune_queries=tune_queries, seed=seed)
  neighbor_seconds = time.perf_counter() - began
  tuning = searcher.tuning
  rows = formats.NeighborMap(path)
  subset = np.sort(np.random.default_rng(seed).choice(
      len(query_vectors), min(recall_queries, len(query_vectors)), replace=False))
  queries = np.asarray(query_vectors[subset], np.float32)
  began = time.perf_counter()
  _, exact = search_lib.exact_search(db_vectors, queries, k, built.metric)
  exact_seconds = time.perf_counter() - began
  recall = search_lib.recall_at_k(rows[subset], exact, k)
  return {"factory": factory, "metric": built.metric, "db_vectors": n,
          "queries": len(query_vectors), "k": k, "extra": extra, **searcher.parameters,
          "train_size": built_settings["train_size"],
          "train_seconds": train_seconds, "add_seconds": add_seconds,
          "add_vectors_per_s": n / max(add_seconds, 1e-9),
          "build_seconds": build_seconds, "neighbor_seconds": neighbor_seconds,
          "queries_per_s": len(query_vectors) / max(neighbor_seconds, 1e-9),
          "total_seconds": build_seconds + neighbor_seconds,
          f"recall@{k}": recall, "recall_queries": len(subset),
          "exact_queries_per_s": len(subset) / max(exact_seconds, 1e-9),
          "on_gpu": searcher.on_gpu,
          "target_recall": None if tuning is None else tuning.target_recall,
          "sample_recall": None if tuning is None else tuning.recall,
          "tune_seconds": None if tuning is None else tuning.seconds,
          "tune_queries": None if tuning is None else tuning.sample}


def real_recall_section(real: np.ndarray, *, ks: Sequence[int] = (2, 10)) -> dict:
  """The default mid-size IVF index at its default nprobe on real vectors alone."""
  held_out = np.arange(len(real)) % 10 == 0
  db, queries = real[~held_out], real[held_out]
  factory = index_lib.default_factory(len(db), db.shape[1], exact_below=0)
  with tempfile.TemporaryDirectory() as workdir:
    built = index_lib.build_index(db, workdir, factory=factory, progress=False)
    searcher = search_lib.load_index(built.index_path)
    _, approx = searcher(queries, max(ks))
  _, exact = search_lib.exact_search(db, queries, max(ks))
  return {"factory": factory, "db_vectors": len(db), "queries": len(queries),
          **searcher.parameters,
          **{f"recall@{k}": search_lib.recall_at_k(approx, exact, k) for k in ks}}


_RSS_CHILD = r"""
import json, resource, sys, time
from retro_jax.retrieval.chunk_db import build_chunk_db
began = time.time()
result = build_chunk_db(sys.argv[1], sys.argv[2], sys.argv[3], retrieval_db=True,
                        progress=False)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:   # ru_maxrss survives exec (a big parent inflates it); VmHWM is this image's own
  with open("/proc/self/status") as f:
    peak = next(int(l.split()[1]) for l in f if l.startswith("VmHWM:"))
except (OSError, StopIteration):
  pass
print(json.dumps({"seconds": time.time() - began, "info": result.info, "max_rss_kib": peak}))
"""


def _write_corpus(path: str, documents: Sequence[tuple[str, str]], num_docs: int) -> int:
  """``num_docs`` jsonl documents cycling over ``documents`` (each copy numbered)."""
  written = 0
  with open(path, "w", encoding="utf-8") as f:
    for i in range(num_docs):
      title, text = documents[i % len(documents)]
      line = json.dumps({"text": f"[{i}] {title}\n{text}"}) + "\n"
      f.write(line)
      written += len(line.encode("utf-8"))
  return written


def db_rss_section(doc_counts: Sequence[int] = (5_000, 50_000), *,
                   workdir: Optional[str] = None) -> list[dict]:
  """Peak RSS of ``build_chunk_db`` (retrieval flavour) in a fresh process per size."""
  if workdir is None:
    with tempfile.TemporaryDirectory(prefix="bench_db_rss_") as tmp:
      return db_rss_section(doc_counts, workdir=tmp)
  documents = prose_documents()
  vocab = train_sentencepiece((text for _, text in documents[:200]),
                              os.path.join(workdir, "spm"), 8000)
  rows = []
  for count in doc_counts:
    corpus = os.path.join(workdir, f"corpus_{count}.jsonl")
    corpus_bytes = _write_corpus(corpus, documents, count)
    out = os.path.join(workdir, f"db_{count}")
    child = subprocess.run([sys.executable, "-c", _RSS_CHILD, corpus, vocab, out],
                           capture_output=True, text=True, check=True,
                           env=dict(os.environ, JAX_PLATFORMS="cpu"))
    report = json.loads(child.stdout.strip().splitlines()[-1])
    db = formats.ChunkDB(os.path.join(out, "chunks"))
    db_bytes = os.path.getsize(db.idx_path) + os.path.getsize(db.bin_path)
    rows.append({"documents": count, "corpus_mib": corpus_bytes / 2**20,
                 "chunks": db.num_chunks, "db_mib": db_bytes / 2**20,
                 "seconds": report["seconds"], "peak_rss_mib": report["max_rss_kib"] / 1024})
    db.close()
  return rows


def _write_synthetic_index(prefix: str, num_docs: int, chunks_per_doc: int, *,
                           chunk_size: int = 64, retrieval_db: bool = True) -> None:
  """A valid retmmap pair of ``num_docs`` documents of ``chunks_per_doc`` chunks each:
  the four index arrays as the writer computes them, and a sparse ``.bin``."""
  item = 2                                                        # uint16 tokens
  sizes = np.full(num_docs, chunks_per_doc * chunk_size, np.int32)
  spans = (sizes.astype(np.int64) + (chunk_size if retrieval_db else 0)) * item
  pointers = np.cumsum(spans) - spans
  counts = np.full(num_docs, chunks_per_doc, np.int64)
  starts = np.cumsum(counts) - counts
  addresses = formats.chunk_addresses(pointers, counts, chunk_size * item)
  header = struct.pack("<9sLLBQQQB", formats.RETMMAP_MAGIC, formats.FORMAT_VERSION,
                       chunk_size, 8, num_docs, chunk_size, addresses.size,
                       int(retrieval_db))
  with open(prefix + ".idx", "wb") as f:
    for part in (header, sizes, pointers, starts, addresses):
      f.write(part if isinstance(part, bytes) else part.astype(part.dtype.newbyteorder(
          "<")).tobytes())
  with open(prefix + ".bin", "wb") as f:
    f.truncate(int(spans.sum()))


def db_open_section(num_chunks: int = 10_000_000, chunks_per_doc: Sequence[int] = (10, 1),
                    *, workdir: Optional[str] = None, repeats: int = 3) -> list[dict]:
  """Seconds to open a chunk DB with and without the index validation (best of 3)."""
  if workdir is None:
    with tempfile.TemporaryDirectory(prefix="bench_db_open_") as tmp:
      return db_open_section(num_chunks, chunks_per_doc, workdir=tmp, repeats=repeats)
  rows = []
  for per_doc in chunks_per_doc:
    prefix = os.path.join(workdir, f"db_{per_doc}")
    _write_synthetic_index(prefix, num_chunks // per_doc, per_doc)
    row = {"chunks": num_chunks // per_doc * per_doc, "documents": num_chunks // per_doc,
           "idx_mib": os.path.getsize(prefix + ".idx") / 2**20}
    for check in (False, True):
      best = float("inf")
      for _ in range(repeats):
        began = time.perf_counter()
        formats.ChunkDB(prefix, check_index=check).close()
        best = min(best, time.perf_counter() - began)
      row["checked_seconds" if check else "unchecked_seconds"] = best
    rows.append(row)
    for suffix in (".idx", ".bin"):
      os.remove(prefix + suffix)
  return rows


# ----------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------

SECTIONS = ("embedding", "index", "real_recall", "db_rss", "db_open")


def _default_cache_dir() -> str:
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "retro_jax", "bench")


def run(*, sections: Sequence[str] = SECTIONS, num_vectors: int = 1_000_000,
        num_queries: Optional[int] = None, recall_queries: int = 2000, k: int = 2,
        factory: Optional[str] = None, nprobe: Optional[int] = None,
        ef_search: Optional[int] = None, k_factor: Optional[int] = None,
        train_size: Optional[int] = None,
        target_recall: Optional[float] = search_lib.DEFAULT_TARGET_RECALL,
        embedding_texts: int = 1024,
        db_docs: Sequence[int] = (5_000, 50_000), cache_dir: Optional[str] = None,
        seed: int = 0, progress: bool = True, db_open_chunks: int = 10_000_000,
        print_fn=print) -> dict:
  """Runs the sections; prints markdown tables; returns the figures."""
  unknown = sorted(set(sections) - set(SECTIONS))
  if unknown:
    raise ValueError(f"unknown sections {unknown}; known: {SECTIONS}")
  results: dict[str, Any] = {"machine": _machine()}
  print_fn(f"machine: {results['machine']}; faiss {faiss.__version__}, "
           f"{faiss.omp_get_max_threads()} threads, {index_gpus()} GPUs")
  if "db_rss" in sections:
    rows = db_rss_section(db_docs)
    results["db_rss"] = rows
    print_fn("\npeak RSS of a retrieval-DB build (fresh process each; tokenize + write "
             "retmmap)\n| documents | corpus MiB | chunks | DB MiB | seconds | "
             "peak RSS MiB |\n|---|---|---|---|---|---|")
    for r in rows:
      print_fn(f"| {r['documents']:,} | {r['corpus_mib']:.1f} | {r['chunks']:,} | "
               f"{r['db_mib']:.1f} | {r['seconds']:.1f} | {r['peak_rss_mib']:.0f} |")
  if "db_open" in sections:
    rows = db_open_section(db_open_chunks)
    results["db_open"] = rows
    print_fn("\nopening a retmmap chunk DB (synthetic index arrays, page cache warm; "
             "best of 3)\n| chunks | documents | .idx MiB | open, header + ends s | "
             "open, full index check s |\n|---|---|---|---|---|")
    for r in rows:
      print_fn(f"| {r['chunks']:,} | {r['documents']:,} | {r['idx_mib']:.0f} | "
               f"{r['unchecked_seconds']:.4f} | {r['checked_seconds']:.3f} |")
  if "embedding" in sections:
    texts, _ = prose_chunk_texts(prose_documents())
    results["embedding"] = run_embedding_bench(texts[:embedding_texts], print_fn=print_fn)
  real = None
  if {"index", "real_recall"} & set(sections):
    real, _ = real_embeddings(load_embedder(), cache_dir=cache_dir or _default_cache_dir(),
                              progress=progress)
  if "real_recall" in sections:
    row = real_recall_section(real)
    results["real_recall"] = row
    print_fn(f"\nrecall of the default IVF index on {row['db_vectors']} real MiniLM "
             f"embeddings ({row['queries']} held-out real queries)")
    print_fn("| factory | nprobe | recall@2 | recall@10 |\n|---|---|---|---|")
    print_fn(f"| {row['factory']} | {row.get('nprobe')} | {row['recall@2']:.3f} | "
             f"{row['recall@10']:.3f} |")
  if "index" in sections:
    num_queries = num_vectors if num_queries is None else num_queries
    began = time.perf_counter()
    if num_vectors <= len(real) // 2 and num_queries <= len(real) - num_vectors:
      db_vectors, query_vectors = real[:num_vectors], real[num_vectors:][:num_queries]
      made = {"generator": None, "real_vectors": len(real)}
    else:
      db_vectors, made = synthetic_like(real, num_vectors, seed=seed)
      query_vectors, _ = synthetic_like(real, num_queries, seed=seed + 1,
                                        target_cosine=made["target_parent_cosine"])
    generate_seconds = time.perf_counter() - began
    row = index_section(db_vectors, query_vectors, k=k, factory=factory, nprobe=nprobe,
                        ef_search=ef_search, k_factor=k_factor, train_size=train_size,
                        recall_queries=recall_queries, target_recall=target_recall,
                        progress=progress, seed=seed)
    row["vectors"] = made
    results["index"] = row
    source = ("real MiniLM embeddings" if made["generator"] is None else
              f"{made['generator']} ({made['real_vectors']} real vectors, bandwidth "
              f"{made['bandwidth']:.3f}, parent cosine {made['target_parent_cosine']:.3f}; "
              f"generated in {generate_seconds:.0f}s, not counted)")
    print_fn(f"\nneighbors for {row['queries']:,} query chunks over {row['db_vectors']:,} "
             f"DB chunks (k={k}, +{row['extra']} candidates; vectors: {source}); load "
             f"average {os.getloadavg()[0]:.1f}")
    if row["target_recall"] is None:
      chosen = "given (no tuning)"
    else:
      chosen = (f"for recall {row['target_recall']:.2f}: {row['sample_recall']:.3f} on "
                f"{row['tune_queries']} sample queries, {row['tune_seconds']:.1f} s")
    print_fn("| factory | train size | nprobe | efSearch | re-rank k_factor | "
             "settings chosen | train s | add vectors/s | "
             "neighbor queries/s | total s (train+add+neighbors) | "
             f"recall@{k} vs exact ({row['recall_queries']} queries) |\n"
             "|---|---|---|---|---|---|---|---|---|---|---|")
    print_fn(f"| {row['factory']} | {row['train_size']:,} | {row.get('nprobe', '-')} | "
             f"{row.get('ef_search', '-')} | {row.get('k_factor', '-')} | {chosen} | "
             f"{row['train_seconds']:.1f} | {row['add_vectors_per_s']:,.0f} | "
             f"{row['queries_per_s']:,.0f} | {row['total_seconds']:.1f} | "
             f"{row[f'recall@{k}']:.3f} |")
  return results


def index_gpus() -> int:
  return search_lib.gpu_count()


def _machine() -> str:
  try:
    cores = len(os.sched_getaffinity(0))
  except AttributeError:
    cores = os.cpu_count() or 1
  try:
    with open("/proc/meminfo", encoding="utf-8") as f:
      mem = int(f.readline().split()[1]) / 2**20
    return f"{cores} vCPU, {mem:.0f} GiB"
  except OSError:
    return f"{cores} vCPU"


def main(argv):
  del argv
  f = flags.FLAGS
  run(sections=[s for s in f.sections.split(",") if s], num_vectors=f.num_vectors,
      num_queries=f.num_queries, recall_queries=f.recall_queries, k=f.k,
      factory=f.factory, nprobe=f.nprobe, ef_search=f.ef_search, k_factor=f.k_factor,
      train_size=f.train_size, target_recall=f.target_recall or None,
      embedding_texts=f.embedding_texts, db_docs=[int(x) for x in f.db_docs.split(",")],
      cache_dir=f.cache_dir, seed=f.seed, progress=f.progress,
      db_open_chunks=f.db_open_chunks)


if __name__ == "__main__":
  flags.DEFINE_string("sections", ",".join(SECTIONS), f"Comma-separated: {SECTIONS}.")
  flags.DEFINE_integer("num_vectors", 1_000_000, "DB chunks of the index section.")
  flags.DEFINE_integer("num_queries", None, "Query chunks (default: num_vectors).")
  flags.DEFINE_integer("recall_queries", 2000, "Queries checked against exact search.")
  flags.DEFINE_integer("k", 2, "Neighbors per chunk.")
  flags.DEFINE_string("factory", None, "Faiss factory (default: by DB size).")
  flags.DEFINE_integer("nprobe", None, "IVF nprobe (default: by index size).")
  flags.DEFINE_integer("ef_search", None, "HNSW efSearch.")
  flags.DEFINE_integer("k_factor", None, "Re-ranked candidates per result (fast-scan).")
  flags.DEFINE_integer("train_size", None, "Index training sample (default 40 per "
                        "centroid).")
  flags.DEFINE_float("target_recall", search_lib.DEFAULT_TARGET_RECALL,
                     "Choose nprobe / k_factor (those not given) for this recall@k on a "
                     "sample (0: the fixed defaults).")
  flags.DEFINE_integer("embedding_texts", 1024, "Texts for the embedding section.")
  flags.DEFINE_string("db_docs", "5000,50000", "Corpus sizes (documents) for db_rss.")
  flags.DEFINE_string("cache_dir", None, "Cache of the real embeddings (default "
                       "~/.cache/retro_jax/bench).")
  flags.DEFINE_integer("seed", 0, "Generator and index seed.")
  flags.DEFINE_integer("db_open_chunks", 10_000_000, "Chunks of the db_open DB.")
  flags.DEFINE_bool("progress", True, "Progress bars.")
  app.run(main)
