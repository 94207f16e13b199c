r"""Stage: the Faiss index of the retrieval DB's chunk embeddings (train, add, merge, search).

    python -m retro_jax.retrieval.index --gin.build_index.embeddings=DIR/embeddings \
        --gin.build_index.output_dir=DIR/index [--gin.build_index.factory='IVF1024,SQ8'] \
        [--gin.build_index.metric=ip] \
        [--gin.build_index.shard_id=3 --gin.build_index.num_shards=8]
    python -m retro_jax.retrieval.index --merge_only \
        --gin.merge_index_shards.output_dir=DIR/index

The stage has three kinds of unit, each recorded in ``output_dir/manifest.json``
(``retro_jax.utils.io.Manifest``), so a re-run skips what is finished:

1. *train*: a seeded sample of ``train_size`` embeddings trains the empty index
   (``trained.faissindex``). One process trains, under a lock; shards started at the
   same time wait for it and then reuse it.
2. *add*: shard s adds the embeddings of its contiguous range of DB chunks, with their
   global chunk ids (``shard_00003_of_00008.faissindex``).
3. *merge*: the shard that finishes last merges the shards, in order, into
   ``index.faissindex``, in memory, or for large IVF indexes as on-disk inverted lists
   (``index.ivfdata`` beside it, written by ``faiss.contrib.ondisk.merge_ondisk`` and
   memory-mapped when searched). Either way the merged index has the inverted lists of
   a one-shot add: the same search results.

Every file is written under a temporary name and renamed into place (the index file
last); the temporaries of a killed run are removed when its unit is redone.

Default factory (``default_factory``), after the Faiss wiki's "Guidelines to choose an
index" (N vectors of dimension d):

============================  ==========================================  =============
N                             factory                                     memory/vector
============================  ==========================================  =============
N < 10k                       ``Flat`` (exact: few searches, no training)  4d bytes
10k <= N < 1M                 ``IVF{K},SQ8``, K = 4*sqrt(N) as a power    d bytes
                              of two (the guideline's 4..16*sqrt(N))
1M <= N < 10M                 ``IVF{K},PQ{d/2}x4fs`` + exact re-ranking    d/4 bytes
                              (the guideline's ``IVF...,PQNx4fs,RFlat``)   (+ the stored
                                                                          embeddings)
N >= 10M                      ``OPQ{M}_{4M},IVF{K}_HNSW32,PQ{M}``,         M bytes
                              K = 262144 below 100M, else 1048576 (the     (M = 64 for
                              guideline's table; GPU training advised)     d >= 256)
============================  ==========================================  =============

Re-ranking (``refine=``): a fast-scan PQ index (4-bit codes scanned with SIMD, several
times faster than SQ8 on a CPU) returns ``k_factor * k`` candidates, whose exact scores
are computed from the embedding stage's vectors (memory-mapped float16 files) before
the top k are kept: Faiss' ``RFlat`` refinement, without a second copy of the vectors
in RAM and without breaking shard merging. ``needs_refine(index)`` says when an index
should be searched that way (``load_index(..., refine=embeddings)``).

K is always capped so that the training sample holds at least 39 vectors per centroid
(Faiss' own minimum); the lower end of the guideline's K range is used because k-means
training on a CPU costs O(K^2 * 30 * d). A factory whose K exceeds the sample is refused
with a message that names both numbers and the ways out (Megatron-LM issue #699, where
Faiss fails with "fewer training vectors than centroids").

Metric: ``'ip'`` (inner product, default) ranks unit-norm sentence embeddings by
cosine similarity, which is how sentence-transformers models (all-MiniLM-L6-v2,
normalised by its config) are meant to be compared; ``'l2'`` is the Euclidean
distance, for embedders that do not normalise. For unit vectors both give the same
ranking; the scores differ (IP: higher is closer; L2: lower is closer).

Search (``load_index`` -> ``IndexSearcher``): ``nprobe`` (IVF lists visited; default
``default_nprobe(K)``, chosen so that recall@2 against exact search is >= 0.9 on real
MiniLM embeddings, see tests/test_index.py and ``python -m retro_jax.bench.retrieval``)
``ef_search`` (HNSW: the graph's efSearch; IVF with an HNSW quantizer: the
quantizer's efSearch), set through ``faiss.ParameterSpace``, and ``refine`` /
``k_factor`` (re-ranking, above).

GPU: with a faiss build that has GPUs (``faiss.get_num_gpus() > 0``) and
``use_gpu='auto'``, k-means training runs on the GPUs (the IVF's ``clustering_index``)
and searches run on a GPU copy of the index; a factory the GPU code does not support
falls back to the CPU with a warning. CPU-only faiss builds never touch that code.

Python::

    result = build_index(embeddings, "/data/retro/index", expected_num_vectors=db.num_chunks)
    searcher = load_index(result.index_path, nprobe=64)    # + refine=embeddings if
    scores, ids = searcher(queries, k)         # needs_refine; [n, k] each; ids = DB
                                               # chunk ids, -1 = none
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import time
from typing import Any, Iterator, Optional, Sequence, Union

from absl import logging
import faiss
import gin
import numpy as np
import tqdm

from retro_jax.retrieval import formats
from retro_jax.utils import stages
from retro_jax.utils.io import Manifest, atomic_path, file_fingerprint

STAGE = "index"
# Settings that identify the input vectors (utils.io.Manifest): other embeddings
# rebuild the index (train, add, merge) instead of being refused.
INPUT_KEYS = ("embeddings", "num_vectors", "dim")
INDEX_NAME = "index.faissindex"       # == RetrievalLayout.index_path's name
IVFDATA_NAME = "index.ivfdata"
TRAINED_NAME = "trained.faissindex"
TRAINED_UNIT = "trained"
MERGED_UNIT = "merged"

METRICS = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}
EXACT_BELOW = 10_000
FAST_SCAN_FROM = 1_000_000
DEFAULT_K_FACTOR = 4                  # re-ranked candidates per result (fast-scan)
COMPRESSED_FROM = 10_000_000
MIN_POINTS_PER_CENTROID = 39          # below this Faiss' k-means warns
TRAIN_POINTS_PER_CENTROID = 40        # default sample: 40 * K
MAX_TRAIN_POINTS_PER_CENTROID = 256   # Faiss subsamples above this anyway
DEFAULT_EF_SEARCH = 128
ON_DISK_ABOVE_BYTES = 8 << 30         # merge on disk when inverted lists exceed this


# ----------------------------------------------------------------------------------
# Defaults after the Faiss guidelines
# ----------------------------------------------------------------------------------


def _pow2(x: float) -> int:
  return 1 << max(0, int(round(math.log2(max(x, 1.0)))))


def _pow2_floor(x: float) -> int:
  return 1 << max(0, int(math.floor(math.log2(max(x, 1.0)))))


def default_num_centroids(num_vectors: int, *, train_size: Optional[int] = None) -> int:
  """K for an IVF index of ``num_vectors``: the guideline's value, capped so that the
  training sample (default ``num_vectors``) has >= 39 vectors per centroid."""
  n = int(num_vectors)
  if n < COMPRESSED_FROM:
    k = _pow2(4 * math.sqrt(n))
  else:
    k = 262144 if n < 100_000_000 else 1048576    # the guideline's 10M-100M, 100M-1B
  sample = n if train_size is None else min(n, int(train_size))
  return max(1, min(k, _pow2_floor(sample / MIN_POINTS_PER_CENTROID)))


def _pq_size(dim: int) -> tuple[int, int]:
  """(M bytes per vector, OPQ output dimension 4M <= dim)."""
  m = max(1, min(64, dim // 4))
  return m, 4 * m


@gin.configurable
def default_factory(num_vectors: int, dim: int, *, exact_below: int = EXACT_BELOW,
                    fast_scan_from: int = FAST_SCAN_FROM,
                    compressed_from: int = COMPRESSED_FROM,
                    train_size: Optional[int] = None) -> str:
  """The Faiss factory string for ``num_vectors`` embeddings of ``dim`` (see the table
  in the module docstring). The thresholds are arguments so that a test or a user can
  pick a tier at any size (``exact_below=0`` forces an IVF index)."""
  if num_vectors < exact_below:
    return "Flat"
  k = default_num_centroids(num_vectors, train_size=train_size)
  if num_vectors < fast_scan_from:
    return f"IVF{k},SQ8"
  if num_vectors < compressed_from:
    return f"IVF{k},PQ{max(1, dim // 2)}x4fs"
  m, d_out = _pq_size(dim)
  if dim % m or d_out > dim:
    return f"IVF{k}_HNSW32,PQ{m}"
  return f"OPQ{m}_{d_out},IVF{k}_HNSW32,PQ{m}"


def ivf_num_centroids(factory: str) -> Optional[int]:
  """K of an ``IVF{K}...`` factory string (None for a non-IVF factory)."""
  match = re.search(r"(?:^|,)IVF(\d+)", factory)
  return int(match.group(1)) if match else None


def default_train_size(factory: str, num_vectors: int) -> int:
  """Training sample: 40 vectors per IVF centroid (Faiss' minimum is 39), at least
  ~10k for PQ/SQ codebooks, at most ``num_vectors`` (0 for untrained factories)."""
  k = ivf_num_centroids(factory)
  if k is None:
    return 0 if factory.strip() == "Flat" else min(num_vectors, 256 * 39)
  wanted = max(TRAIN_POINTS_PER_CENTROID * k, 256 * 39 if "PQ" in factory else 0)
  return min(num_vectors, wanted)


def default_nprobe(nlist: int) -> int:
  """IVF lists visited per query: max(16, sqrt(K)), at most K.

  On real MiniLM embeddings of a few thousand chunks this gives recall@2 >= 0.95 against
  exact search (16 of 64 lists: 0.97; 16 of 256: 0.97); the fraction of lists visited
  falls as 1/sqrt(K) because larger DBs are denser (K=4096 at 1M vectors: 64 lists).
  """
  return int(max(1, min(nlist, max(16, math.isqrt(max(nlist, 1))))))


def check_train_size(factory: str, train_size: int, num_vectors: int) -> None:
  """Refuses a training sample too small for the factory's centroids (clear message)."""
  k = ivf_num_centroids(factory)
  if k is None:
    return
  if train_size < k:
    suggestion = default_factory(num_vectors, 1 << 30, train_size=train_size)
    raise ValueError(
        f"factory {factory!r}: {k} IVF centroids but only {train_size} training vectors "
        f"(the DB has {num_vectors}); k-means needs at least {k} and Faiss wants "
        f"{MIN_POINTS_PER_CENTROID * k}. Use fewer centroids (e.g. {suggestion!r}, or "
        f"factory=None for the default), a larger train_size, or 'Flat' for a small DB")
  if train_size < MIN_POINTS_PER_CENTROID * k:
    logging.warning("index: %d training vectors for %d centroids (Faiss recommends >= %d)",
                    train_size, k, MIN_POINTS_PER_CENTROID * k)


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
# Files, locks
# ----------------------------------------------------------------------------------


SHARD_SUFFIX = ".faissindex"


def index_path(output_dir: str) -> str:
  """The merged index in a stage directory (``RetrievalLayout.index_path``)."""
  return os.path.join(output_dir, INDEX_NAME)


def write_index(index: faiss.Index, path: str) -> None:
  """Writes ``index`` to ``path`` atomically."""
  with atomic_path(path) as tmp:
    faiss.write_index(index, tmp)


def _read_index(path: str, flags: int = 0) -> faiss.Index:
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: Faiss index not found")
  try:
    return faiss.read_index(path, flags)
  except RuntimeError as e:
    reason = str(e).strip().splitlines()[-1] if str(e).strip() else "unreadable"
    raise ValueError(f"{path}: not a readable Faiss index ({reason})") from e


def _gpu_count() -> int:
  get = getattr(faiss, "get_num_gpus", None)
  if get is None or not hasattr(faiss, "StandardGpuResources"):
    return 0
  try:
    return int(get())
  except RuntimeError:
    return 0


def _use_gpu(use_gpu: Union[bool, str]) -> bool:
  if use_gpu == "auto":
    return _gpu_count() > 0
  if use_gpu and _gpu_count() == 0:
    raise ValueError("use_gpu=True, but this faiss build sees no GPU (faiss-cpu, or "
                     "no CUDA device); use use_gpu='auto' or False")
  return bool(use_gpu)


# ----------------------------------------------------------------------------------
# Train, add, merge
# ----------------------------------------------------------------------------------


def sample_ids(num_vectors: int, train_size: int, seed: int) -> np.ndarray:
  """A seeded uniform sample of ``train_size`` distinct row ids, sorted."""
  rng = np.random.default_rng(seed)
  if train_size >= num_vectors:
    return np.arange(num_vectors, dtype=np.int64)
  return np.sort(rng.choice(num_vectors, size=train_size, replace=False)).astype(np.int64)


def train_index(vectors: VectorSource, factory: str, metric: str, *, train_size: int,
                seed: int = 0, use_gpu: bool = False) -> faiss.Index:
  """An empty index of ``factory`` trained on a seeded sample of ``vectors``."""
  index = faiss.index_factory(vectors.dim, factory, METRICS[metric])
  if index.is_trained:
    return index
  check_train_size(factory, train_size, vectors.num_vectors)
  began = time.time()
  x = vectors.take(sample_ids(vectors.num_vectors, train_size, seed))
  ivf = faiss.try_extract_index_ivf(index)
  if ivf is not None:
    ivf.cp.seed = seed
    ivf.cp.max_points_per_centroid = MAX_TRAIN_POINTS_PER_CENTROID
    if use_gpu:
      ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlat(ivf.d, ivf.metric_type))
  logging.info("index: training %s (%s) on %d of %d vectors%s", factory, metric, len(x),
               vectors.num_vectors, " on GPU" if use_gpu else "")
  index.train(x)
  if ivf is not None:
    ivf.clustering_index = None
  seconds = time.time() - began
  logging.info("index: trained in %.1fs (%.0f vectors/s)", seconds, len(x) / max(seconds, 1e-9))
  return index


def _ivf_of(index: faiss.Index):
  return faiss.try_extract_index_ivf(index)


def _add_with_ids(index: faiss.Index) -> bool:
  """IVF indexes store ids (the global DB chunk ids); flat ones use positions."""
  return _ivf_of(index) is not None and not isinstance(index, faiss.IndexRefine)


def _check_mergeable(index: faiss.Index, factory: str) -> None:
  probe, other = faiss.clone_index(index), faiss.clone_index(index)
  try:
    probe.merge_from(other, 0)
  except RuntimeError as e:
    raise ValueError(f"factory {factory!r}: Faiss cannot merge shards of this index type "
                     "({}); build it with num_shards=1 or use an IVF or Flat "
                     "factory".format(str(e).strip().splitlines()[-1])) from e
  if _ivf_of(index) is None and not isinstance(index, faiss.IndexFlatCodes):
    raise ValueError(f"factory {factory!r}: shards of a non-IVF index must be flat codes")


def _add_shard(vectors: VectorSource, trained: faiss.Index, start: int, stop: int, *,
               batch_size: int, progress: bool, desc: str) -> faiss.Index:
  index = faiss.clone_index(trained)
  with_ids = _add_with_ids(index)   # else positions are ids (shards merge in order)
  with tqdm.tqdm(total=stop - start, unit="vec", unit_scale=True, desc=desc,
                 disable=not progress) as bar:
    for lo in range(start, stop, batch_size):
      hi = min(stop, lo + batch_size)
      x = vectors.read(lo, hi)
      if with_ids:
        index.add_with_ids(x, np.arange(lo, hi, dtype=np.int64))
      else:
        index.add(x)
      bar.update(hi - lo)
  return index


def _merge_in_memory(paths: Sequence[str]) -> faiss.Index:
  index = _read_index(paths[0])
  for path in paths[1:]:
    index.merge_from(_read_index(path), 0)
  return index


def _merge_on_disk(trained_path: str, shard_paths: Sequence[str], output_dir: str) -> None:
  """Merges IVF shards into on-disk inverted lists; writes the data file, then the index."""
  from faiss.contrib import ondisk  # pylint: disable=g-import-not-at-top
  final_data = os.path.join(output_dir, IVFDATA_NAME)
  final_index = index_path(output_dir)
  with atomic_path(final_index) as tmp_index:
    workdir = tmp_index + ".d.tmp"       # stale ones are removed with the index's
    os.makedirs(workdir)
    try:
      index = _read_index(trained_path)
      with _quiet_stdout():
        ondisk.merge_ondisk(index, list(shard_paths), os.path.join(workdir, IVFDATA_NAME))
      invlists = faiss.downcast_InvertedLists(_ivf_of(index).invlists)
      invlists.filename = final_data     # read back with IO_FLAG_ONDISK_SAME_DIR
      faiss.write_index(index, tmp_index)
      del index, invlists
      if os.path.exists(final_index):
        os.remove(final_index)           # never pair an old index with new data
      os.replace(os.path.join(workdir, IVFDATA_NAME), final_data)
    finally:
      shutil.rmtree(workdir, ignore_errors=True)


@dataclasses.dataclass
class IndexBuildResult:
  """What ``build_index`` did.

  Attributes:
    factory, metric: The index built.
    num_vectors, dim: Of the embeddings.
    shard_path: This shard's partial index.
    index_path: The merged index once every shard is done (else None).
    skipped: This shard was already complete.
    info: Timings and counts of this shard.
  """
  factory: str
  metric: str
  num_vectors: int
  dim: int
  shard_path: str
  index_path: Optional[str]
  skipped: bool
  info: dict[str, Any]


@gin.configurable
def build_index(embeddings: Any, output_dir: str, *, factory: Optional[str] = None,
                metric: str = "ip", train_size: Optional[int] = None, seed: int = 0,
                shard_id: int = 0, num_shards: int = 1, merge: bool = True,
                on_disk: Optional[bool] = None, batch_size: int = 65536,
                use_gpu: Union[bool, str] = "auto",
                expected_num_vectors: Optional[int] = None,
                progress: bool = True) -> IndexBuildResult:
  """Builds this shard of the index (training it first if needed); merges when all are.

  Args:
    embeddings: ``[N, dim]`` vectors (array, ``.npy`` path, embeddings directory; see
      ``VectorSource``); row i is DB chunk i.
    output_dir: Stage directory (``RetrievalLayout.index_dir``).
    factory: Faiss factory string; None: ``default_factory(N, dim)``.
    metric: ``'ip'`` (cosine for unit vectors; default) or ``'l2'``.
    train_size: Training sample; None: ``default_train_size``.
    seed: Sampling and k-means seed.
    shard_id, num_shards: This process' contiguous share of the vectors.
    merge: Merge once every shard is done.
    on_disk: Merge into on-disk inverted lists (IVF only); None: when they would
      exceed ``ON_DISK_ABOVE_BYTES``.
    batch_size: Vectors read and added per call.
    use_gpu: ``'auto'`` (GPUs when faiss sees any), True or False.
    expected_num_vectors: The retrieval DB's chunk count: a mismatch is an error.
    progress: tqdm bars with rates.
  """
  vectors = VectorSource(embeddings)
  n, dim = vectors.num_vectors, vectors.dim
  if metric not in METRICS:
    raise ValueError(f"metric must be one of {sorted(METRICS)}, got {metric!r}")
  if expected_num_vectors is not None and n != expected_num_vectors:
    raise ValueError(f"embeddings {vectors.description}: {n} vectors, but the retrieval DB "
                     f"has {expected_num_vectors} chunks; re-embed the DB")
  if n == 0:
    raise ValueError(f"embeddings {vectors.description}: no vectors to index")
  factory = factory or default_factory(n, dim, train_size=train_size)
  train_size = default_train_size(factory, n) if train_size is None else min(train_size, n)
  gpu = _use_gpu(use_gpu)
  settings = {"stage": STAGE, "factory": factory, "metric": metric, "dim": dim,
              "num_vectors": n, "train_size": train_size, "seed": seed,
              "num_shards": num_shards, "embeddings": vectors.description}
  start, stop = stages.shard_range(n, shard_id, num_shards)
  name = stages.shard_name(shard_id, num_shards, SHARD_SUFFIX)
  shard_file = os.path.join(output_dir, name)
  os.makedirs(output_dir, exist_ok=True)

  with stages.locked(output_dir, "train"):
    manifest = Manifest(output_dir, settings, INPUT_KEYS)
    if not manifest.is_done(TRAINED_UNIT):
      stages.remove_stale_temporaries(output_dir, TRAINED_NAME)
      began = time.time()
      trained = train_index(vectors, factory, metric, train_size=train_size, seed=seed,
                            use_gpu=gpu)
      if num_shards > 1:
        _check_mergeable(trained, factory)
      write_index(trained, os.path.join(output_dir, TRAINED_NAME))
      manifest.mark_done(TRAINED_UNIT, [TRAINED_NAME],
                         {"seconds": time.time() - began, "train_size": train_size})
  manifest = Manifest(output_dir, settings, INPUT_KEYS)
  skipped = manifest.is_done(name)
  if skipped:
    info = manifest.info(name)
    logging.info("index shard %s is complete; skipping", shard_file)
  else:
    stages.remove_stale_temporaries(output_dir, name)
    trained = _read_index(os.path.join(output_dir, TRAINED_NAME))
    if num_shards > 1:
      _check_mergeable(trained, factory)
    began = time.time()
    index = _add_shard(vectors, trained, start, stop, batch_size=batch_size,
                       progress=progress, desc=f"index add {shard_id}/{num_shards}")
    write_index(index, shard_file)
    seconds = time.time() - began
    info = {"start": start, "stop": stop, "seconds": seconds,
            "vectors_per_second": (stop - start) / max(seconds, 1e-9)}
    Manifest(output_dir, settings, INPUT_KEYS).mark_done(name, [name], info)
    logging.info("index: shard %d/%d added vectors [%d, %d) in %.1fs (%.0f vectors/s)",
                 shard_id, num_shards, start, stop, seconds, info["vectors_per_second"])
  merged = None
  if merge:
    merged = merge_index_shards(output_dir, on_disk=on_disk)
  return IndexBuildResult(factory=factory, metric=metric, num_vectors=n, dim=dim,
                          shard_path=shard_file, index_path=merged, skipped=skipped,
                          info=info)


def _load_manifest(output_dir: str) -> Manifest:
  path = os.path.join(output_dir, Manifest.FILENAME)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no index build in {output_dir}")
  with open(path, encoding="utf-8") as f:
    settings = json.load(f).get("settings", {})
  if settings.get("stage") != STAGE:
    raise ValueError(f"{path}: not an index build (stage {settings.get('stage')!r})")
  return Manifest(output_dir, settings, INPUT_KEYS)


@gin.configurable
def merge_index_shards(output_dir: str, *, on_disk: Optional[bool] = None) -> Optional[str]:
  """Merges the finished shards of ``output_dir`` into ``index.faissindex``.

  Returns the merged index's path, or None while some shards are missing. Skipped if
  the merge is recorded as done; safe when several finishing shards call it at once.
  """
  with stages.locked(output_dir, "merge"):
    manifest = _load_manifest(output_dir)
    settings = manifest.settings
    num_shards = settings["num_shards"]
    names = [stages.shard_name(s, num_shards, SHARD_SUFFIX) for s in range(num_shards)]
    missing = [name for name in names if not manifest.is_done(name)]
    if missing:
      logging.info("index: %d of %d shards still to add; merge later", len(missing),
                   num_shards)
      return None
    final = index_path(output_dir)
    if manifest.is_done(MERGED_UNIT):
      return final
    paths = [os.path.join(output_dir, name) for name in names]
    stages.remove_stale_temporaries(output_dir, INDEX_NAME)
    stages.remove_stale_temporaries(output_dir, IVFDATA_NAME)
    trained = _read_index(os.path.join(output_dir, TRAINED_NAME))
    ivf = _ivf_of(trained)
    if on_disk is None:
      code_size = ivf.code_size if ivf is not None else 0
      on_disk = ivf is not None and settings["num_vectors"] * (code_size + 8) > (
          ON_DISK_ABOVE_BYTES)
    if on_disk and ivf is None:
      raise ValueError(f"on_disk merge needs an IVF index, not {settings['factory']!r}")
    began = time.time()
    if on_disk:
      _merge_on_disk(os.path.join(output_dir, TRAINED_NAME), paths, output_dir)
      ntotal = open_index(final, expected_ntotal=settings["num_vectors"]).ntotal
      outputs = [INDEX_NAME, IVFDATA_NAME]
    else:
      merged = _merge_in_memory(paths)
      if merged.ntotal != settings["num_vectors"]:
        raise ValueError(f"{output_dir}: merged shards hold {merged.ntotal} vectors, "
                         f"expected {settings['num_vectors']}")
      write_index(merged, final)
      ntotal = merged.ntotal
      del merged
      outputs = [INDEX_NAME]
    info = {"ntotal": ntotal, "on_disk": bool(on_disk), "seconds": time.time() - began}
    manifest.mark_done(MERGED_UNIT, outputs, info)
    logging.info("index: merged %d shards into %s (%s, %d vectors) in %.1fs", num_shards,
                 final, "on disk" if on_disk else "in memory", ntotal, info["seconds"])
    return final


# ----------------------------------------------------------------------------------
# Open and search
# ----------------------------------------------------------------------------------


def needs_refine(index: faiss.Index) -> bool:
  """True for indexes whose codes are too coarse to rank alone (fast-scan PQ)."""
  ivf = _ivf_of(index)
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
    with _quiet_stdout(os.path.exists(data)):    # Faiss prints the on-disk file it maps
      index = _read_index(path, flags)
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
def _quiet_stdout(active: bool = True) -> Iterator[None]:
  """Silences what Faiss' C++ code prints to stdout (file names of on-disk lists)."""
  if not active:
    yield
    return
  import ctypes  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
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
  ivf = _ivf_of(index)
  candidate = faiss.downcast_index(ivf.quantizer) if ivf is not None else index
  while isinstance(candidate, faiss.IndexPreTransform):
    candidate = faiss.downcast_index(candidate.index)
  return candidate if isinstance(candidate, faiss.IndexHNSW) else None


def set_search_parameters(index: faiss.Index, *, nprobe: Optional[int] = None,
                          ef_search: Optional[int] = None) -> dict[str, int]:
  """Sets nprobe / efSearch through ``faiss.ParameterSpace``; returns what was set."""
  space = faiss.ParameterSpace()
  ivf = _ivf_of(index)
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


@gin.configurable
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
    if _use_gpu(use_gpu):
      gpu_index = _to_gpu(index)
      if gpu_index is not None:
        self._search_index, self.on_gpu = gpu_index, True
        if "nprobe" in self.parameters:
          faiss.GpuParameterSpace().set_index_parameter(gpu_index, "nprobe",
                                                        self.parameters["nprobe"])

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


@gin.configurable
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


if __name__ == "__main__":
  stages.run_stage(build_index, merge_index_shards)
