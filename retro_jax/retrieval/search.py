r"""Searching a Faiss index of the retrieval DB's chunk embeddings (built by
``retro_jax.retrieval.index``), and reading embeddings block by block for it.

Search (``load_index`` -> ``IndexSearcher``): ``nprobe`` (IVF lists visited; default
``default_nprobe(K)``, chosen so that recall@2 against exact search is >= 0.9 on real
MiniLM embeddings, see tests/test_index.py and ``python -m retro_jax.bench.retrieval``)
``ef_search`` (HNSW: the graph's efSearch; IVF with an HNSW quantizer: the
quantizer's efSearch), set through ``faiss.ParameterSpace``, and ``refine`` /
``k_factor`` (re-ranking, below).

Target recall (``tune_search``, the neighbor map's default): rather than the fixed
defaults, the cheapest nprobe (and k_factor) whose results reach a recall@k target
against brute force on a seeded sample of queries; cost = estimated time per
query (``search_cost``), recall counts ties as hits (``sample_recall``).

Re-ranking (``refine=``): a fast-scan PQ index (4-bit codes scanned with SIMD, several
times faster than SQ8 on a CPU) returns ``k_factor * k`` candidates, whose exact scores
are computed from the embedding stage's vectors (memory-mapped float16 files) before
the top k are kept: Faiss' ``RFlat`` refinement, without a second copy of the vectors
in RAM and without breaking shard merging. ``needs_refine(index)`` says when an index
should be searched that way (``load_index(..., refine=embeddings)``).

Metrics (``METRICS``): ``'ip'`` (inner product, default) ranks unit-norm sentence
embeddings by cosine similarity, which is how sentence-transformers models (all-MiniLM-L6-v2,
normalised by its config) are meant to be compared; ``'l2'`` is the Euclidean
distance, for embedders that do not normalise. For unit vectors both give the same
ranking; the scores differ (IP: higher is closer; L2: lower is closer).

GPU: with a faiss build that has GPUs (``faiss.get_num_gpus() > 0``) and
``use_gpu='auto'``, searches run on a GPU copy of the index; a factory the GPU code does not support
falls back to the CPU with a warning. CPU-only faiss builds never touch that code.

Python::

    searcher = load_index(index_path, nprobe=64)   # + refine=embeddings if needs_refine
    scores, ids = searcher(queries, k)             # [n, k] each; ids = DB chunk ids,
                                                   # -1 = none
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from typing import Any, Callable, Iterator, Optional, Union

from absl import logging
import faiss
import numpy as np

from retro_jax.retrieval import formats
from retro_jax.utils.io import file_fingerprint

METRICS = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}
IVFDATA_NAME = "index.ivfdata"        # on-disk inverted lists, beside the index file
DEFAULT_K_FACTOR = 4                  # re-ranked candidates per result (fast-scan)
DEFAULT_EF_SEARCH = 128


def default_nprobe(nlist: int) -> int:
  """IVF lists visited per query: max(16, sqrt(K)), at most K.

  On real MiniLM embeddings of a few thousand chunks this gives recall@2 >= 0.95 against
  exact search (16 of 64 lists: 0.97; 16 of 256: 0.97); the fraction of lists visited
  falls as 1/sqrt(K) because larger DBs are denser (K=4096 at 1M vectors: 64 lists).
  """
  return int(max(1, min(nlist, max(16, math.isqrt(max(nlist, 1))))))


# ----------------------------------------------------------------------------------
# Embedding sources
# ----------------------------------------------------------------------------------


class VectorSource:
  """Row-block access to ``[num_vectors, dim]`` embeddings (any float dtype).

  Wraps a numpy array or memmap, a ``.npy`` path (memory-mapped), an embeddings
  directory or reader (``formats.Embeddings``: memory-mapped
  shards), or any object with ``len()``, ``dim`` and contiguous slicing.
  """

  def __init__(self, source: Any):
    if isinstance(source, (str, os.PathLike)):
      path = os.fspath(source)
      if os.path.isdir(path):
        source = formats.Embeddings(path)
      elif path.endswith(".npy"):
        if not os.path.exists(path):
          raise FileNotFoundError(f"{path}: embeddings file not found")
        source = np.load(path, mmap_mode="r")
      else:
        raise ValueError(f"{path}: embeddings must be a .npy file or an embeddings "
                         "directory (retro_jax.retrieval.embeddings)")
    self.source = source
    shape = getattr(source, "shape", None)
    if shape is not None and len(shape) != 2:
      raise ValueError(f"embeddings: expected [num_vectors, dim], got shape {tuple(shape)}")
    self.num_vectors = int(shape[0] if shape is not None else len(source))
    self.dim = int(shape[1] if shape is not None else source.dim)
    self.description = _describe(source, self.num_vectors, self.dim)

  def read(self, start: int, stop: int) -> np.ndarray:
    """``[stop - start, dim]`` float32, C-contiguous."""
    return _float32_rows(self.source[start:stop], self.dim, self.description)

  def take(self, ids: np.ndarray) -> np.ndarray:
    """Rows ``ids`` (sorted ascending) as ``[len(ids), dim]`` float32; reads only them
    from memory maps (arrays, or the shards of an ``Embeddings`` reader)."""
    ids = np.asarray(ids, np.int64)
    out = np.empty((len(ids), self.dim), np.float32)
    if isinstance(self.source, np.ndarray):
      parts = [(self.source, 0, self.num_vectors)]
    elif hasattr(self.source, "shard_paths") and hasattr(self.source, "shard_starts"):
      starts = list(self.source.shard_starts) + [self.num_vectors]
      parts = [(np.load(p, mmap_mode="r"), starts[i], starts[i + 1])
               for i, p in enumerate(self.source.shard_paths)]
    else:                                   # slices only: read the blocks holding ids
      parts = None
    block = 1 << 16
    if parts is not None:
      for array, lo, hi in parts:
        first, last = np.searchsorted(ids, [lo, hi])
        for b in range(first, last, block):
          rows = ids[b:min(last, b + block)] - lo
          out[b:b + len(rows)] = np.asarray(array[rows], np.float32)
      return out
    for lo in range(0, self.num_vectors, block):
      first, last = np.searchsorted(ids, [lo, lo + block])
      if last > first:
        out[first:last] = self.read(lo, min(self.num_vectors, lo + block))[ids[first:last] - lo]
    return out


def _describe(source: Any, num_vectors: int, dim: int) -> str:
  """An identity of the vectors for manifests: their build's settings when known (they
  hold the DB's content fingerprint), else the file's content fingerprint; never a
  path, so a moved output directory keeps its index (``utils.io`` on inputs)."""
  settings = getattr(source, "settings", None)
  where = getattr(source, "filename", None)
  text = f"{type(source).__name__}[{num_vectors}x{dim}]"
  if settings:
    text += " " + hashlib.sha256(json.dumps(settings, sort_keys=True).encode()
                                 ).hexdigest()[:16]
  elif where and os.path.isfile(where):
    text += " " + file_fingerprint(where)
  return text


def _float32_rows(rows: Any, dim: int, what: str) -> np.ndarray:
  rows = np.ascontiguousarray(rows, np.float32)
  if rows.ndim != 2 or rows.shape[1] != dim:
    raise ValueError(f"embeddings {what}: expected rows of {dim}, got {rows.shape}")
  return rows


# ----------------------------------------------------------------------------------
# Files, GPUs
# ----------------------------------------------------------------------------------


def read_index(path: str, flags: int = 0) -> faiss.Index:
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: Faiss index not found")
  try:
    return faiss.read_index(path, flags)
  except RuntimeError as e:
    reason = str(e).strip().splitlines()[-1] if str(e).strip() else "unreadable"
    raise ValueError(f"{path}: not a readable Faiss index ({reason})") from e


def gpu_count() -> int:
  get = getattr(faiss, "get_num_gpus", None)
  if get is None or not hasattr(faiss, "StandardGpuResources"):
    return 0
  try:
    return int(get())
  except RuntimeError:
    return 0


def resolve_use_gpu(use_gpu: Union[bool, str]) -> bool:
  if use_gpu == "auto":
    return gpu_count() > 0
  if use_gpu and gpu_count() == 0:
    raise ValueError("use_gpu=True, but this faiss build sees no GPU (faiss-cpu, or "
                     "no CUDA device); use use_gpu='auto' or False")
  return bool(use_gpu)


def ivf_of(index: faiss.Index):
  return faiss.try_extract_index_ivf(index)


# ----------------------------------------------------------------------------------
# Open and search
# ----------------------------------------------------------------------------------


def needs_refine(index: faiss.Index) -> bool:
  """True for indexes whose codes are too coarse to rank alone (fast-scan PQ)."""
  ivf = ivf_of(index)
  return ivf is not None and isinstance(faiss.downcast_index(ivf), faiss.IndexIVFPQFastScan)


def open_index(path: str, *, expected_dim: Optional[int] = None,
               expected_ntotal: Optional[int] = None, mmap: bool = False,
               what_dim: str = "the embeddings", what_ntotal: str = "the retrieval DB"
               ) -> faiss.Index:
  """Reads and validates a Faiss index (on-disk inverted lists are found beside it).

  Raises:
    FileNotFoundError / ValueError naming the file: missing, unreadable, its on-disk
    lists missing, or a dimension / size that does not match what it is used with.
  """
  path = os.fspath(path)
  flags = faiss.IO_FLAG_ONDISK_SAME_DIR | (faiss.IO_FLAG_MMAP if mmap else 0)
  data = os.path.join(os.path.dirname(os.path.abspath(path)), IVFDATA_NAME)
  try:
    with quiet_stdout(os.path.exists(data)):    # Faiss prints the on-disk file it maps
      index = read_index(path, flags)
  except ValueError as e:
    if "OnDiskInvertedLists" in str(e):
      raise ValueError(f"{path}: its on-disk inverted lists {data} are missing or "
                       "unreadable (rebuild: merge the shards again)") from e
    raise
  if expected_dim is not None and index.d != expected_dim:
    raise ValueError(f"{path}: index dimension {index.d}, but {what_dim} have dimension "
                     f"{expected_dim} (an index of another embedder?)")
  if expected_ntotal is not None and index.ntotal != expected_ntotal:
    raise ValueError(f"{path}: index holds {index.ntotal} vectors, but {what_ntotal} has "
                     f"{expected_ntotal} chunks; rebuild the index for this DB")
  return index


@contextlib.contextmanager
def quiet_stdout(active: bool = True) -> Iterator[None]:
  """Silences what Faiss' C++ code prints to stdout (file names of on-disk lists)."""
  if not active:
    yield
    return
  libc = ctypes.CDLL(None)
  sys.stdout.flush()
  libc.fflush(None)
  saved = os.dup(1)
  devnull = os.open(os.devnull, os.O_WRONLY)
  try:
    os.dup2(devnull, 1)
    yield
  finally:
    libc.fflush(None)
    os.dup2(saved, 1)
    os.close(saved)
    os.close(devnull)


def _hnsw_of(index: faiss.Index):
  """The HNSW index of an HNSW factory or of an IVF's quantizer, else None."""
  ivf = ivf_of(index)
  candidate = faiss.downcast_index(ivf.quantizer) if ivf is not None else index
  while isinstance(candidate, faiss.IndexPreTransform):
    candidate = faiss.downcast_index(candidate.index)
  return candidate if isinstance(candidate, faiss.IndexHNSW) else None


def set_search_parameters(index: faiss.Index, *, nprobe: Optional[int] = None,
                          ef_search: Optional[int] = None) -> dict[str, int]:
  """Sets nprobe / efSearch through ``faiss.ParameterSpace``; returns what was set."""
  space = faiss.ParameterSpace()
  ivf = ivf_of(index)
  hnsw = _hnsw_of(index)
  chosen: dict[str, int] = {}
  if ivf is not None:
    chosen["nprobe"] = int(nprobe or default_nprobe(ivf.nlist))
    space.set_index_parameter(index, "nprobe", chosen["nprobe"])
    if hnsw is not None:
      chosen["ef_search"] = int(ef_search or max(DEFAULT_EF_SEARCH, 2 * chosen["nprobe"]))
      space.set_index_parameter(index, "quantizer_efSearch", chosen["ef_search"])
    elif ef_search is not None:
      raise ValueError("ef_search applies to HNSW indexes and IVF indexes with an HNSW "
                       f"quantizer; this one is {type(index).__name__}")
  elif hnsw is not None:
    if nprobe is not None:
      raise ValueError("nprobe applies to IVF indexes; this one is HNSW (use ef_search)")
    chosen["ef_search"] = int(ef_search or DEFAULT_EF_SEARCH)
    space.set_index_parameter(index, "efSearch", chosen["ef_search"])
  elif nprobe is not None or ef_search is not None:
    raise ValueError(f"nprobe / ef_search do not apply to {type(index).__name__} (exact)")
  return chosen


def _to_gpu(index: faiss.Index) -> Optional[faiss.Index]:
  try:
    options = faiss.GpuMultipleClonerOptions()
    options.useFloat16 = True
    return faiss.index_cpu_to_all_gpus(index, options)
  except (RuntimeError, AttributeError) as e:   # a type the GPU code does not support
    logging.warning("index: searching on CPU; no GPU version of %s (%s)",
                    type(index).__name__, str(e).strip().splitlines()[-1:] or "")
    return None


class IndexSearcher:
  """A loaded index with its search parameters: ``searcher(queries, k) -> (scores, ids)``.

  Args:
    index: A Faiss index (CPU).
    nprobe, ef_search: Search parameters (see ``set_search_parameters``).
    refine: The indexed vectors (anything ``VectorSource`` takes, e.g. the embeddings
      directory): candidates are re-ranked by their exact scores.
    k_factor: Candidates per result when re-ranking (default 4).
    use_gpu: ``'auto'``: search on a GPU copy when faiss sees GPUs.
    path: Where it was read from (for messages).

  ``search(queries [n, dim], k)`` returns float32 scores ``[n, k]`` and int64 DB chunk
  ids ``[n, k]`` (-1 where fewer than k vectors were found); it is the ``search``
  callback of ``retro_jax.retrieval.neighbors.build_neighbor_map``.
  """

  def __init__(self, index: faiss.Index, *, nprobe: Optional[int] = None,
               ef_search: Optional[int] = None, refine: Any = None,
               k_factor: Optional[int] = None, use_gpu: Union[bool, str] = "auto",
               path: Optional[str] = None):
    self.index, self.path = index, path
    # What the caller fixed: ``tune_search`` varies only the others.
    self.explicit = {name for name, value in (("nprobe", nprobe), ("ef_search", ef_search),
                                              ("k_factor", k_factor)) if value is not None}
    self.tuning: Optional[SearchTuning] = None
    self.parameters = set_search_parameters(index, nprobe=nprobe, ef_search=ef_search)
    self.metric = "ip" if index.metric_type == faiss.METRIC_INNER_PRODUCT else "l2"
    self.refine = None
    if refine is not None:
      self.refine = refine if isinstance(refine, VectorSource) else VectorSource(refine)
      if (self.refine.num_vectors, self.refine.dim) != (index.ntotal, index.d):
        raise ValueError(f"refine vectors {self.refine.description} are "
                         f"[{self.refine.num_vectors}, {self.refine.dim}], the index "
                         f"{path or ''} holds [{index.ntotal}, {index.d}]")
      self.parameters["k_factor"] = int(k_factor or DEFAULT_K_FACTOR)
    elif k_factor is not None:
      raise ValueError("k_factor re-ranks with the stored vectors: pass refine=")
    self._search_index = index
    self.on_gpu = False
    if resolve_use_gpu(use_gpu):
      gpu_index = _to_gpu(index)
      if gpu_index is not None:
        self._search_index, self.on_gpu = gpu_index, True
        if "nprobe" in self.parameters:
          faiss.GpuParameterSpace().set_index_parameter(gpu_index, "nprobe",
                                                        self.parameters["nprobe"])

  def set_parameters(self, *, nprobe: Optional[int] = None,
                     k_factor: Optional[int] = None) -> None:
    """Changes nprobe (IVF; an HNSW quantizer's efSearch follows it unless it was given)
    and/or k_factor (re-ranking) of this searcher, on its CPU and GPU indexes."""
    if nprobe is not None:
      ef_search = self.parameters.get("ef_search") if "ef_search" in self.explicit else None
      self.parameters.update(set_search_parameters(self.index, nprobe=nprobe,
                                                   ef_search=ef_search))
      if self.on_gpu:
        faiss.GpuParameterSpace().set_index_parameter(self._search_index, "nprobe",
                                                      self.parameters["nprobe"])
    if k_factor is not None:
      if self.refine is None:
        raise ValueError("k_factor re-ranks with the stored vectors: this searcher has none")
      self.parameters["k_factor"] = int(k_factor)

  @property
  def dim(self) -> int:
    return self.index.d

  @property
  def ntotal(self) -> int:
    return self.index.ntotal

  @property
  def nprobe(self) -> Optional[int]:
    return self.parameters.get("nprobe")

  @property
  def ef_search(self) -> Optional[int]:
    return self.parameters.get("ef_search")

  @property
  def k_factor(self) -> Optional[int]:
    return self.parameters.get("k_factor")

  def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    queries = np.ascontiguousarray(queries, np.float32)
    if queries.ndim != 2 or queries.shape[1] != self.dim:
      raise ValueError(f"queries: expected [n, {self.dim}], got {queries.shape} "
                       f"(index {self.path or type(self.index).__name__})")
    if k < 1:
      raise ValueError(f"k must be >= 1, got {k}")
    if self.refine is None:
      scores, ids = self._search_index.search(queries, k)
      return scores, ids.astype(np.int64, copy=False)
    _, candidates = self._search_index.search(queries, k * self.k_factor)
    return rerank(queries, candidates.astype(np.int64, copy=False), self.refine, k,
                  self.metric)

  __call__ = search

  def __repr__(self) -> str:
    return (f"IndexSearcher({self.path or type(self.index).__name__}, ntotal={self.ntotal}, "
            f"dim={self.dim}, metric={self.metric}, {self.parameters}"
            f"{', gpu' if self.on_gpu else ''})")


def rerank(queries: np.ndarray, candidates: np.ndarray, vectors: VectorSource, k: int,
           metric: str = "ip") -> tuple[np.ndarray, np.ndarray]:
  """Exact top-k among candidate ids (-1 = none) using the stored ``vectors``.

  Args:
    queries: float32 [n, dim]; candidates: int64 [n, c].
  Returns:
    (scores [n, k] float32: inner products, or squared L2 distances; ids [n, k]).
  """
  block = 2048                                  # bounds the gathered rows' memory
  if len(queries) > block:
    parts = [rerank(queries[lo:lo + block], candidates[lo:lo + block], vectors, k, metric)
             for lo in range(0, len(queries), block)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
  present = candidates >= 0
  unique, inverse = np.unique(candidates[present], return_inverse=True)
  rows = vectors.take(unique)                                  # [u, dim]
  scores = np.full(candidates.shape, -np.inf, np.float32)
  flat_query = np.repeat(np.arange(len(queries)), present.sum(axis=1))
  if metric == "ip":
    scores[present] = np.einsum("nd,nd->n", queries[flat_query], rows[inverse])
  else:
    diff = queries[flat_query] - rows[inverse]
    scores[present] = -np.einsum("nd,nd->n", diff, diff)
  order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
  best = np.take_along_axis(scores, order, axis=1)
  ids = np.where(np.isfinite(best), np.take_along_axis(candidates, order, axis=1), -1)
  if ids.shape[1] < k:
    pad = k - ids.shape[1]
    ids = np.pad(ids, [(0, 0), (0, pad)], constant_values=-1)
    best = np.pad(best, [(0, 0), (0, pad)], constant_values=-np.inf)
  return (best if metric == "ip" else -best), ids.astype(np.int64)


def load_index(path: str, *, nprobe: Optional[int] = None, ef_search: Optional[int] = None,
               refine: Any = None, k_factor: Optional[int] = None,
               use_gpu: Union[bool, str] = "auto", expected_dim: Optional[int] = None,
               expected_ntotal: Optional[int] = None, mmap: bool = False) -> IndexSearcher:
  """Opens ``path`` (validated, see ``open_index``) and sets its search parameters.

  ``refine``: the indexed vectors, for re-ranking (a fast-scan index is refused without
  them unless ``refine=False``: its codes alone rank poorly).
  """
  index = open_index(path, expected_dim=expected_dim, expected_ntotal=expected_ntotal,
                     mmap=mmap)
  if refine is None and needs_refine(index):
    raise ValueError(f"{path}: a fast-scan PQ index ranks by re-scoring its candidates "
                     "with the stored vectors: pass refine=<embeddings> (or "
                     "refine=False to search the codes alone)")
  return IndexSearcher(index, nprobe=nprobe, ef_search=ef_search,
                       refine=refine if refine is not False else None, k_factor=k_factor,
                       use_gpu=use_gpu, path=path)


def exact_search(database: Any, queries: Any, k: int, metric: str = "ip", *,
                 block_size: int = 65536) -> tuple[np.ndarray, np.ndarray]:
  """Exact top-k (``IndexFlatIP`` / ``IndexFlatL2``), the reference for recall."""
  db = database if isinstance(database, VectorSource) else VectorSource(database)
  flat = faiss.IndexFlat(db.dim, METRICS[metric])
  for lo in range(0, db.num_vectors, block_size):
    flat.add(db.read(lo, min(db.num_vectors, lo + block_size)))
  return flat.search(np.ascontiguousarray(queries, np.float32), k)


def recall_at_k(approximate_ids: np.ndarray, exact_ids: np.ndarray, k: int) -> float:
  """Mean |approx top-k ∩ exact top-k| / k over queries (k-recall@k)."""
  approx, exact = np.asarray(approximate_ids)[:, :k], np.asarray(exact_ids)[:, :k]
  hits = sum(len(np.intersect1d(a[a >= 0], e[e >= 0])) for a, e in zip(approx, exact))
  return hits / float(exact.shape[0] * k)


# ----------------------------------------------------------------------------------
# Choosing nprobe / k_factor for a target recall
# ----------------------------------------------------------------------------------

DEFAULT_TARGET_RECALL = 0.95
TUNE_K_FACTORS = (1, 2, 4, 8)
# Search time per query, estimated for ``search_cost`` from the 1M-chunk benchmark on 2
# CPU cores (docs/benchmarks.md): scanning fast-scan codes ~4 ns per 96-byte code;
# re-ranking ~3.5 us per candidate (a random row of the float16 memory map + its score).
SCAN_NS_PER_CODE_BYTE = 0.04
RERANK_NS_PER_CANDIDATE = 3500.0
# A setting reaches the target when its sample recall minus this many standard errors
# of the mean of the per-query recalls does.
RECALL_MARGIN_SE = 2.0


@dataclasses.dataclass
class SearchTuning:
  """What ``tune_search`` chose.

  Attributes:
    target_recall: Asked for.
    recall: Reached by the chosen parameters on the sample (``sample_recall``).
    parameters: The searcher's parameters after tuning (nprobe, k_factor, ef_search).
    sample: Queries in the sample.
    cost: ``search_cost`` of the choice (estimated ns per query).
    seconds: Time taken (exact search of the sample included).
    tried: Every (nprobe, k_factor, recall, cost) measured, in order.
  """
  target_recall: float
  recall: float
  parameters: dict[str, int]
  sample: int
  cost: float
  seconds: float
  tried: list[dict[str, Any]]

  def summary(self) -> dict[str, Any]:
    """The figures to record (manifests, retrieval.json), without ``tried``."""
    return {"target_recall": self.target_recall, "sample_recall": round(self.recall, 6),
            "sample_queries": self.sample, **self.parameters}


def is_tunable(searcher: Any) -> bool:
  """True for an ``IndexSearcher`` of an IVF index with nprobe (or, when re-ranking,
  k_factor) not given explicitly: what ``tune_search`` chooses."""
  if not isinstance(searcher, IndexSearcher) or ivf_of(searcher.index) is None:
    return False
  return ("nprobe" not in searcher.explicit
          or (searcher.refine is not None and "k_factor" not in searcher.explicit))


def search_cost(index: faiss.Index, nprobe: int, k_factor: Optional[int],
                count: int) -> float:
  """Estimated ns per query, the cost ``tune_search`` minimises: the code bytes of the
  ``nprobe`` inverted lists scanned (``nprobe * ntotal / nlist * code_size``) at
  ``SCAN_NS_PER_CODE_BYTE``, plus, when re-ranking, ``count * k_factor`` candidates at
  ``RERANK_NS_PER_CANDIDATE``. Only the ratio of the two matters (it decides between
  a larger nprobe and a larger k_factor)."""
  ivf = ivf_of(index)
  code_bytes = nprobe * index.ntotal / max(ivf.nlist, 1) * ivf.code_size
  rerank = count * k_factor * RERANK_NS_PER_CANDIDATE if k_factor else 0.0
  return float(code_bytes * SCAN_NS_PER_CODE_BYTE + rerank)


def sample_recall(queries: np.ndarray, rows: np.ndarray, exact_rows: np.ndarray,
                  vectors: VectorSource, metric: str = "ip", tolerance: float = 1e-5,
                  per_query: bool = False) -> Union[float, np.ndarray]:
  """Recall of ``rows`` against ``exact_rows``, ties counted as hits.

  A returned id is a hit when its exact score is at least the score of the worst id of
  its exact row (duplicate chunks have equal scores and either is a correct answer);
  each row scores at most its number of exact ids (-1 = none).

  Args:
    queries: float32 [n, dim].
    rows, exact_rows: int64 [n, k] approximate and exact ids, best first, -1 = none.
  Returns:
    Hits / exact ids, in [0, 1] (1.0 when no row has an exact id); with ``per_query``,
    float64 [n] of each row's (1.0 for a row without exact ids).
  """
  def scores(ids):
    out = np.full(ids.shape, -np.inf, np.float32)
    present = ids >= 0
    if present.any():
      unique, inverse = np.unique(ids[present], return_inverse=True)
      vecs = vectors.take(unique)[inverse]
      q = queries[np.nonzero(present)[0]]
      out[present] = (np.einsum("nd,nd->n", q, vecs) if metric == "ip"
                      else -np.einsum("nd,nd->n", q - vecs, q - vecs))
    return out

  exact_scores = scores(exact_rows)
  wanted = (exact_rows >= 0).sum(axis=1)
  worst = np.where(np.isfinite(exact_scores), exact_scores, np.inf).min(axis=1)
  slack = tolerance * np.maximum(1.0, np.abs(worst))
  hits = (scores(rows) >= (worst - slack)[:, None]).sum(axis=1)
  if per_query:
    return np.where(wanted > 0, np.minimum(hits, wanted) / np.maximum(wanted, 1), 1.0)
  total = wanted.sum()
  return float(np.minimum(hits, wanted).sum() / total) if total else 1.0


def tune_search(searcher: IndexSearcher, queries: np.ndarray, vectors: Any, *, k: int,
                count: Optional[int] = None, target_recall: float = DEFAULT_TARGET_RECALL,
                select: Optional[Callable[[np.ndarray], np.ndarray]] = None
                ) -> Optional[SearchTuning]:
  """Sets the cheapest nprobe / k_factor of ``searcher`` that reach ``target_recall``.

  The sample's exact answers come from brute force over ``vectors`` (the indexed
  embeddings, ``exact_search``). For every k_factor (1, 2, 4, 8 when re-ranking; the
  given one otherwise; largest first) the smallest nprobe of 1, 2, 4, ..., nlist whose
  rows reach the target (sample recall minus ``RECALL_MARGIN_SE`` standard errors of
  the per-query recalls' mean: the rows of a query are not independent) is found,
  skipping what cannot win (fewer probes than a larger k_factor needed, or a cost above
  a setting already reached); of those, the one of least ``search_cost`` is set on the
  searcher (ties: the smaller k_factor). Parameters given to the searcher (``explicit``) are
  kept. Deterministic: the same sample and index choose the same parameters in every
  shard.

  Args:
    queries: float32 [n, dim], the sample.
    vectors: The indexed vectors (anything ``VectorSource`` takes).
    k: Neighbors per row that count for recall.
    count: Candidates asked per query (the neighbor map asks k + extra); default k.
    target_recall: In (0, 1].
    select: ``candidates [n, count] -> rows [n, k]`` applied to approximate and exact
      candidates alike (the neighbor map's same-document exclusion); default: first k.
  Returns:
    The ``SearchTuning`` (also kept as ``searcher.tuning``), or None when there is
    nothing to choose (an exact index, an HNSW index, or every parameter given).
  Raises:
    ValueError: no setting reaches the target (the message has the best one).
  """
  if not 0.0 < target_recall <= 1.0:
    raise ValueError(f"target_recall={target_recall}: must be in (0, 1]")
  if not is_tunable(searcher):
    return None
  ivf = ivf_of(searcher.index)
  refine = searcher.refine is not None
  began = time.perf_counter()
  count = count or k
  select = select or (lambda candidates: candidates[:, :k])
  queries = np.ascontiguousarray(queries, np.float32)
  source = vectors if isinstance(vectors, VectorSource) else VectorSource(vectors)
  if (source.num_vectors, source.dim) != (searcher.ntotal, searcher.dim):
    raise ValueError(f"tune_search: vectors {source.description} are [{source.num_vectors}, "
                     f"{source.dim}], the index holds [{searcher.ntotal}, {searcher.dim}]")
  _, exact = exact_search(source, queries, count, searcher.metric)
  exact_rows = select(exact.astype(np.int64))
  if "nprobe" in searcher.explicit:
    ladder = [searcher.nprobe]
  else:
    ladder = [1 << i for i in range(ivf.nlist.bit_length()) if (1 << i) < ivf.nlist]
    ladder.append(ivf.nlist)
  if not refine:
    k_factors = [None]
  elif "k_factor" in searcher.explicit:
    k_factors = [searcher.k_factor]
  else:
    k_factors = list(TUNE_K_FACTORS)
  # Largest k_factor first: recall grows with nprobe and with k_factor (a larger one
  # re-ranks a superset of the candidates), so a smaller k_factor cannot reach the target
  # with fewer probes than a larger one needed, and a setting dearer than one already
  # reached cannot be chosen: each ladder starts where the last one reached and stops at
  # the cost of the cheapest setting reached so far.
  k_factors.sort(key=lambda f: -(f or 0))
  tried: list[dict[str, Any]] = []
  reached: list[dict[str, Any]] = []
  start = 0
  for k_factor in k_factors:
    for rung in range(start, len(ladder)):
      nprobe = ladder[rung]
      cost = search_cost(searcher.index, nprobe, k_factor, count)
      if reached and cost > min(r["cost"] for r in reached):
        break
      searcher.set_parameters(nprobe=nprobe, k_factor=k_factor)
      _, candidates = searcher.search(queries, count)
      per_query = sample_recall(queries, select(candidates), exact_rows, source,
                                searcher.metric, per_query=True)
      recall = float(per_query.mean())
      margin = RECALL_MARGIN_SE * float(per_query.std()) / math.sqrt(len(per_query))
      entry = {"nprobe": nprobe, "k_factor": k_factor, "recall": recall,
               "reached": recall - margin >= target_recall, "cost": cost}
      tried.append(entry)
      if entry["reached"]:
        reached.append(entry)
        start = rung
        break
    else:
      break                         # the whole ladder missed: smaller k_factors miss too
  if not reached:
    best = max(tried, key=lambda e: e["recall"])
    searcher.set_parameters(nprobe=best["nprobe"], k_factor=best["k_factor"])
    raise ValueError(
        f"target_recall={target_recall}: not reached on {len(queries)} sample queries; the "
        f"best setting tried (nprobe={best['nprobe']}, k_factor={best['k_factor']}) reaches "
        f"{best['recall']:.3f} with {searcher.path or type(searcher.index).__name__}. Lower "
        "target_recall, give nprobe / k_factor explicitly, or build a finer index")
  chosen = min(reached, key=lambda e: (e["cost"], e["k_factor"] or 0))
  searcher.set_parameters(nprobe=chosen["nprobe"], k_factor=chosen["k_factor"])
  searcher.tuning = SearchTuning(target_recall=target_recall, recall=chosen["recall"],
                                 parameters=dict(searcher.parameters), sample=len(queries),
                                 cost=chosen["cost"], seconds=time.perf_counter() - began,
                                 tried=tried)
  logging.info("search: target recall %.3f -> %s, recall %.4f on %d sample queries "
               "(%.1fs; tried nprobe/k_factor: recall %s)", target_recall,
               searcher.parameters, chosen["recall"], len(queries), searcher.tuning.seconds,
               ", ".join(f"{t['nprobe']}/{t['k_factor']}: {t['recall']:.3f}" for t in tried))
  return searcher.tuning
