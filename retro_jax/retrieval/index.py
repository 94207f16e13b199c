r"""Stage: the Faiss index of the retrieval DB's chunk embeddings (train, add, merge).

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

K is always capped so that the training sample holds at least 39 vectors per centroid
(Faiss' own minimum); the lower end of the guideline's K range is used because k-means
training on a CPU costs O(K^2 * 30 * d). A factory whose K exceeds the sample is refused
with a message that names both numbers and the ways out (Megatron-LM issue #699, where
Faiss fails with "fewer training vectors than centroids").

The fast-scan tier is searched with exact re-ranking from the stored vectors
(``search.needs_refine``). Searching the index is ``retro_jax.retrieval.search``.

Metric: ``'ip'`` (default: cosine for unit-norm embeddings) or ``'l2'``
(``search.METRICS``).

With a faiss build that has GPUs and ``use_gpu='auto'``, k-means training runs on the
GPUs (the IVF's ``clustering_index``).

Python::

    result = build_index(embeddings, "/data/retro/index", expected_num_vectors=db.num_chunks)
    searcher = search.load_index(result.index_path, nprobe=64)
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import shutil
import time
from typing import Any, Optional, Sequence, Union

from absl import logging
import faiss
from faiss.contrib import ondisk
import gin
import numpy as np
import tqdm

from retro_jax.retrieval import search as search_lib
from retro_jax.utils import stages
from retro_jax.utils.io import Manifest, atomic_path

STAGE = "index"
# Settings that identify the input vectors (utils.io.Manifest): other embeddings
# rebuild the index (train, add, merge) instead of being refused.
INPUT_KEYS = ("embeddings", "num_vectors", "dim")
INDEX_NAME = "index.faissindex"       # == RetrievalLayout.index_path's name
TRAINED_NAME = "trained.faissindex"
TRAINED_UNIT = "trained"
MERGED_UNIT = "merged"

EXACT_BELOW = 10_000
FAST_SCAN_FROM = 1_000_000
COMPRESSED_FROM = 10_000_000
MIN_POINTS_PER_CENTROID = 39          # below this Faiss' k-means warns
TRAIN_POINTS_PER_CENTROID = 40        # default sample: 40 * K
MAX_TRAIN_POINTS_PER_CENTROID = 256   # Faiss subsamples above this anyway
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


# ----------------------------------------------------------------------------------
# Train, add, merge
# ----------------------------------------------------------------------------------


def sample_ids(num_vectors: int, train_size: int, seed: int) -> np.ndarray:
  """A seeded uniform sample of ``train_size`` distinct row ids, sorted."""
  rng = np.random.default_rng(seed)
  if train_size >= num_vectors:
    return np.arange(num_vectors, dtype=np.int64)
  return np.sort(rng.choice(num_vectors, size=train_size, replace=False)).astype(np.int64)


def train_index(vectors: search_lib.VectorSource, factory: str, metric: str, *, train_size: int,
                seed: int = 0, use_gpu: bool = False) -> faiss.Index:
  """An empty index of ``factory`` trained on a seeded sample of ``vectors``."""
  index = faiss.index_factory(vectors.dim, factory, search_lib.METRICS[metric])
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


def _add_with_ids(index: faiss.Index) -> bool:
  """IVF indexes store ids (the global DB chunk ids); flat ones use positions."""
  return search_lib.ivf_of(index) is not None and not isinstance(index, faiss.IndexRefine)


def _check_mergeable(index: faiss.Index, factory: str) -> None:
  probe, other = faiss.clone_index(index), faiss.clone_index(index)
  try:
    probe.merge_from(other, 0)
  except RuntimeError as e:
    raise ValueError(f"factory {factory!r}: Faiss cannot merge shards of this index type "
                     "({}); build it with num_shards=1 or use an IVF or Flat "
                     "factory".format(str(e).strip().splitlines()[-1])) from e
  if search_lib.ivf_of(index) is None and not isinstance(index, faiss.IndexFlatCodes):
    raise ValueError(f"factory {factory!r}: shards of a non-IVF index must be flat codes")


def _add_shard(vectors: search_lib.VectorSource, trained: faiss.Index, start: int, stop: int, *,
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
  index = search_lib.read_index(paths[0])
  for path in paths[1:]:
    index.merge_from(search_lib.read_index(path), 0)
  return index


def _merge_on_disk(trained_path: str, shard_paths: Sequence[str], output_dir: str) -> None:
  """Merges IVF shards into on-disk inverted lists; writes the data file, then the index."""
  final_data = os.path.join(output_dir, search_lib.IVFDATA_NAME)
  final_index = index_path(output_dir)
  with atomic_path(final_index) as tmp_index:
    workdir = tmp_index + ".d.tmp"       # stale ones are removed with the index's
    os.makedirs(workdir)
    try:
      index = search_lib.read_index(trained_path)
      with search_lib.quiet_stdout():
        ondisk.merge_ondisk(index, list(shard_paths), os.path.join(workdir, search_lib.IVFDATA_NAME))
      invlists = faiss.downcast_InvertedLists(search_lib.ivf_of(index).invlists)
      invlists.filename = final_data     # read back with IO_FLAG_ONDISK_SAME_DIR
      faiss.write_index(index, tmp_index)
      del index, invlists
      if os.path.exists(final_index):
        os.remove(final_index)           # never pair an old index with new data
      os.replace(os.path.join(workdir, search_lib.IVFDATA_NAME), final_data)
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
      ``search_lib.VectorSource``); row i is DB chunk i.
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
  vectors = search_lib.VectorSource(embeddings)
  n, dim = vectors.num_vectors, vectors.dim
  if metric not in search_lib.METRICS:
    raise ValueError(f"metric must be one of {sorted(search_lib.METRICS)}, got {metric!r}")
  if expected_num_vectors is not None and n != expected_num_vectors:
    raise ValueError(f"embeddings {vectors.description}: {n} vectors, but the retrieval DB "
                     f"has {expected_num_vectors} chunks; re-embed the DB")
  if n == 0:
    raise ValueError(f"embeddings {vectors.description}: no vectors to index")
  factory = factory or default_factory(n, dim, train_size=train_size)
  train_size = default_train_size(factory, n) if train_size is None else min(train_size, n)
  gpu = search_lib.resolve_use_gpu(use_gpu)
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
    trained = search_lib.read_index(os.path.join(output_dir, TRAINED_NAME))
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
  return Manifest.load(output_dir, stage=STAGE, what="index", input_keys=INPUT_KEYS)


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
    stages.remove_stale_temporaries(output_dir, search_lib.IVFDATA_NAME)
    trained = search_lib.read_index(os.path.join(output_dir, TRAINED_NAME))
    ivf = search_lib.ivf_of(trained)
    if on_disk is None:
      code_size = ivf.code_size if ivf is not None else 0
      on_disk = ivf is not None and settings["num_vectors"] * (code_size + 8) > (
          ON_DISK_ABOVE_BYTES)
    if on_disk and ivf is None:
      raise ValueError(f"on_disk merge needs an IVF index, not {settings['factory']!r}")
    began = time.time()
    if on_disk:
      _merge_on_disk(os.path.join(output_dir, TRAINED_NAME), paths, output_dir)
      ntotal = search_lib.open_index(final, expected_ntotal=settings["num_vectors"]).ntotal
      outputs = [INDEX_NAME, search_lib.IVFDATA_NAME]
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


if __name__ == "__main__":
  stages.run_stage(build_index, merge_index_shards)
