r"""Stage: embed the chunks of a chunk DB into .npy shards, sharded and resumable.

    python -m retro_jax.retrieval.embeddings \
        --gin.build_embeddings.db_prefix=DIR/retrieval_db/chunks \
        --gin.build_embeddings.vocab_path=DIR/vocab/spm.model \
        --gin.build_embeddings.output_dir=DIR/embeddings \
        [--gin.build_embeddings.embedder=all-MiniLM-L6-v2] \
        [--gin.build_embeddings.shard_id=3 --gin.build_embeddings.num_shards=8] \
        [--gin.build_embeddings.dtype=float16] [--gin.load_embedder.buckets=(64, 128)]

Chunk i of the DB (its m tokens, not the continuation) is detokenised without pad and
EOD ids and embedded (``embedders.ChunkEmbedder``); the conventional output directory
is ``RetrievalLayout(root).embeddings_dir``. Outputs::

    shard_00003_of_00008.npy   float16/float32 [chunks of the shard, dim]: the vectors
                               of a contiguous chunk-id range (shard s of n holds
                               ``utils.stages.shard_chunk_range(num_chunks, s, n)``)
    manifest.json              settings + finished shards and their ranges

The settings the vectors depend on are recorded in the manifest (DB identity and size,
vocabulary fingerprint, pad/EOD ids, embedder name and weights fingerprint, dtype,
number of shards); a re-run with other settings in the same directory is refused, but
a changed DB or vocabulary (their content fingerprints) re-embeds every shard. A
shard is written block by block into a temporary memory-mapped .npy and renamed into
place when complete, so memory stays bounded by one block and a killed run leaves no
file that looks finished; a re-run skips finished shards and redoes the rest from
their start (byte-identical to an uninterrupted run).

Read them with ``Embeddings(output_dir)``: ``num_vectors``, ``dim``, and blocks by
global chunk-id range from memory-mapped shards (never everything at once), each shard
validated against the manifest (shape, dtype) on open.

Python::

    for s in range(n):
      build_embeddings(layout.retrieval_db_prefix, layout.vocab_path,
                       layout.embeddings_dir, shard_id=s, num_shards=n)
    vectors = Embeddings(layout.embeddings_dir)
    for start, block in vectors.iter_blocks(65536): index.add(block)
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Iterator, Optional

from absl import logging
import gin
import numpy as np
from tqdm import tqdm

from retro_jax.retrieval import formats
from retro_jax.retrieval.chunk_db import Tokenizer
from retro_jax.retrieval.embedders import DEFAULT_EMBEDDER, ChunkEmbedder, load_embedder
from retro_jax.utils import stages
from retro_jax.utils.io import Manifest, atomic_path

STAGE = "embeddings"
DTYPES = ("float16", "float32")


# Settings that identify the inputs by content (utils.io.Manifest: a changed DB or
# vocabulary re-embeds instead of being refused).
INPUT_KEYS = ("db", "vocab_sha256")


SHARD_SUFFIX = ".npy"


@dataclasses.dataclass
class EmbeddingsResult:
  """What ``build_embeddings`` did.

  Attributes:
    shard_path: This shard's .npy file.
    start, end: Its chunk-id range ``[start, end)``.
    skipped: It was already complete.
    complete: Every shard of the build is complete (``Embeddings(output_dir)`` opens).
  """
  shard_path: str
  start: int
  end: int
  skipped: bool
  complete: bool


def _embedder_identity(embedder: Any) -> tuple[str, Optional[str]]:
  name = getattr(embedder, "name", None) or type(embedder).__qualname__
  return str(name), getattr(embedder, "fingerprint", None)


@gin.configurable
def build_embeddings(db_prefix: str, vocab_path: Any, output_dir: str, *,
                     embedder: Any = DEFAULT_EMBEDDER, shard_id: int = 0,
                     num_shards: int = 1, dtype: str = "float16", block_size: int = 4096,
                     pad_id: Optional[int] = None, eod_id: Optional[int] = None,
                     progress: bool = True) -> EmbeddingsResult:
  """Embeds one shard of the chunks of a chunk DB (skipped when already done).

  Args:
    db_prefix: The chunk DB (``formats.ChunkDB`` prefix), usually the retrieval DB.
    vocab_path: Its SentencePiece model (path, processor or seqio vocabulary).
    output_dir: Where the shards and the manifest go
      (``RetrievalLayout.embeddings_dir`` by convention).
    embedder: A known name or local directory (``embedders.load_embedder``; its
      options are gin-configurable), or an ``Embedder`` object (its ``name`` and
      ``fingerprint`` attributes, if any, go into the manifest).
    shard_id, num_shards: This process's contiguous share of the chunk ids.
    dtype: 'float16' (default; half the disk) or 'float32'.
    block_size: Chunks embedded per step (memory: one block of tokens and vectors).
    pad_id, eod_id: Ids dropped before detokenising; default the vocabulary's pad and
      EOS ids (the chunk DB stage's defaults).
    progress: Show a tqdm bar with chunks/s.

  Returns:
    An ``EmbeddingsResult``.
  """
  if dtype not in DTYPES:
    raise ValueError(f"dtype={dtype!r}: use one of {DTYPES}")
  if not 0 <= shard_id < num_shards:
    raise ValueError(f"shard_id={shard_id} must be in [0, num_shards={num_shards})")
  if block_size <= 0:
    raise ValueError(f"block_size={block_size} must be positive")
  db = formats.ChunkDB(db_prefix)
  tokenizer = Tokenizer(vocab_path)
  pad_id = tokenizer.pad_id if pad_id is None else pad_id
  eod_id = tokenizer.eos_id if eod_id is None else eod_id
  if isinstance(embedder, (str, os.PathLike)):
    embedder = load_embedder(os.fspath(embedder))
  embedder_name, embedder_fingerprint = _embedder_identity(embedder)
  settings = {
      "stage": STAGE,
      "db": {"num_docs": db.num_docs, "num_chunks": db.num_chunks,
             "chunk_size": db.chunk_size, "fingerprint": formats.db_fingerprint(db)},
      "vocab_sha256": tokenizer.fingerprint, "pad_id": int(pad_id), "eod_id": int(eod_id),
      "embedder": embedder_name, "embedder_fingerprint": embedder_fingerprint,
      "dim": int(embedder.dim), "dtype": dtype, "num_shards": int(num_shards),
  }
  manifest = Manifest(output_dir, settings, INPUT_KEYS)
  name = stages.shard_name(shard_id, num_shards, SHARD_SUFFIX)
  path = os.path.join(output_dir, name)
  start, end = stages.shard_chunk_range(db.num_chunks, shard_id, num_shards)
  skipped = manifest.is_done(name)
  if skipped:
    logging.info("embeddings shard %s is complete; skipping", path)
  else:
    stages.remove_stale_temporaries(output_dir, name)
    embed_chunks = ChunkEmbedder(embedder, tokenizer.processor, pad_id=pad_id,
                                 eod_id=eod_id)
    seconds = _write_shard(db, embed_chunks, path, start, end, int(embedder.dim), dtype,
                           block_size, progress, f"embeddings {shard_id}/{num_shards}")
    Manifest(output_dir, settings, INPUT_KEYS).mark_done(
        name, [name], {"start": start, "end": end, "seconds": round(seconds, 3)})
    logging.info("embeddings: shard %d/%d, chunks [%d, %d) in %.1fs (%.1f chunks/s)",
                 shard_id, num_shards, start, end, seconds,
                 (end - start) / max(seconds, 1e-9))
  fresh = Manifest(output_dir, settings, INPUT_KEYS)
  complete = all(fresh.is_done(stages.shard_name(s, num_shards, SHARD_SUFFIX))
                 for s in range(num_shards))
  return EmbeddingsResult(path, start, end, skipped=skipped, complete=complete)


def _write_shard(db: formats.ChunkDB, embed_chunks: ChunkEmbedder, path: str, start: int,
                 end: int, dim: int, dtype: str, block_size: int, progress: bool,
                 desc: str) -> float:
  """Embeds chunks ``[start, end)`` into ``path`` (atomic); returns the seconds spent."""
  began = time.time()
  with atomic_path(path) as tmp:
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.dtype(dtype),
                                    shape=(end - start, dim))
    with tqdm(total=end - start, unit="chunk", unit_scale=True, desc=desc,
              disable=not progress) as bar:
      for block_start in range(start, end, block_size):
        block_end = min(end, block_start + block_size)
        tokens = db.get_chunks(np.arange(block_start, block_end), with_continuation=False)
        vectors = np.asarray(embed_chunks(tokens))
        if vectors.shape != (block_end - block_start, dim):
          raise ValueError(f"the embedder returned shape {vectors.shape} for "
                           f"{block_end - block_start} chunks; expected "
                           f"{(block_end - block_start, dim)}")
        if not np.all(np.isfinite(vectors)):
          raise ValueError(f"the embedder returned non-finite values for chunks "
                           f"[{block_start}, {block_end}) of {db.idx_path}")
        out[block_start - start:block_end - start] = vectors
        bar.update(block_end - block_start)
    out.flush()
    del out
  return time.time() - began


# ----------------------------------------------------------------------------------
# Reader
# ----------------------------------------------------------------------------------


class Embeddings:
  """The chunk embeddings of a finished build, memory-mapped shard by shard.

  Attributes:
    output_dir, settings: The build's directory and manifest settings.
    num_vectors: Vectors = chunks of the DB; ``dim``: their width; ``dtype``: as stored.
    shard_paths, shard_starts: The shards and the first chunk id of each.

  ``get(start, end)`` / ``embeddings[start:end]`` return ``[end - start, dim]`` float32
  (copied from the memory maps, so only that range is read); ``iter_blocks`` streams.

  Raises on open: ``FileNotFoundError`` if the manifest or a shard is missing,
  ``ValueError`` naming the file if a shard is incomplete, corrupt or of another
  shape or dtype than the manifest records.
  """

  def __init__(self, output_dir: str):
    self.output_dir = os.fspath(output_dir)
    path = os.path.join(self.output_dir, Manifest.FILENAME)
    if not os.path.exists(path):
      raise FileNotFoundError(f"{path}: no embeddings build in {self.output_dir} (run "
                              "`python -m retro_jax.retrieval.embeddings`)")
    with open(path, encoding="utf-8") as f:
      try:
        data = json.load(f)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}: corrupt manifest ({e})") from e
    self.settings = settings = data.get("settings", {})
    if settings.get("stage") != STAGE:
      raise ValueError(f"{path}: not an embeddings build (stage {settings.get('stage')!r})")
    manifest = Manifest(self.output_dir, settings)
    num_shards = int(settings["num_shards"])
    names = [stages.shard_name(s, num_shards, SHARD_SUFFIX) for s in range(num_shards)]
    missing = [n for n in names if not manifest.is_done(n)]
    if missing:
      raise FileNotFoundError(
          f"{self.output_dir}: embeddings incomplete, {len(missing)} of {num_shards} "
          f"shards missing: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    self.num_vectors = int(settings["db"]["num_chunks"])
    self.dim = int(settings["dim"])
    self.dtype = np.dtype(settings["dtype"])
    self.shard_paths, self.shard_starts, self._shards = [], [], []
    expected_start = 0
    for s, name in enumerate(names):
      start, end = stages.shard_chunk_range(self.num_vectors, s, num_shards)
      info = manifest.info(name)
      if (info.get("start"), info.get("end")) != (start, end):
        raise ValueError(f"{path}: {name} is recorded for chunks [{info.get('start')}, "
                         f"{info.get('end')}), expected [{start}, {end})")
      shard_path = os.path.join(self.output_dir, name)
      self._shards.append(self._open_shard(shard_path, end - start))
      self.shard_paths.append(shard_path)
      self.shard_starts.append(start)
      expected_start = end
    if expected_start != self.num_vectors:
      raise ValueError(f"{path}: shards cover {expected_start} of {self.num_vectors} chunks")
    self._ends = np.asarray(self.shard_starts[1:] + [self.num_vectors], np.int64)

  def _open_shard(self, path: str, rows: int) -> np.ndarray:
    try:
      array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
      raise ValueError(f"{path}: not a readable .npy embeddings shard ({e})") from e
    if array.dtype != self.dtype or array.shape != (rows, self.dim):
      raise ValueError(f"{path}: holds {array.dtype} {array.shape}, the manifest expects "
                       f"{self.dtype} {(rows, self.dim)}")
    return array

  def __len__(self) -> int:
    return self.num_vectors

  def __repr__(self) -> str:
    return (f"Embeddings({self.output_dir!r}, num_vectors={self.num_vectors}, "
            f"dim={self.dim}, dtype={self.dtype}, shards={len(self._shards)})")

  def get(self, start: int, end: int, dtype=np.float32) -> np.ndarray:
    """Vectors of chunk ids ``[start, end)``: ``[end - start, dim]`` of ``dtype``
    (None: the stored dtype)."""
    if not 0 <= start <= end <= self.num_vectors:
      raise IndexError(f"chunk range [{start}, {end}) outside [0, {self.num_vectors})")
    out = np.empty((end - start, self.dim), self.dtype if dtype is None else dtype)
    s = int(np.searchsorted(self._ends, start, side="right"))
    position = start
    while position < end:
      shard_start, shard_end = self.shard_starts[s], int(self._ends[s])
      stop = min(end, shard_end)
      out[position - start:stop - start] = self._shards[s][position - shard_start:
                                                           stop - shard_start]
      position, s = stop, s + 1
    return out

  def __getitem__(self, index: slice) -> np.ndarray:
    if not isinstance(index, slice) or index.step not in (None, 1):
      raise TypeError("Embeddings supports contiguous slices: embeddings[start:end]")
    start, end, _ = index.indices(self.num_vectors)
    return self.get(start, max(start, end))

  def iter_blocks(self, block_size: int, start: int = 0, end: Optional[int] = None,
                  dtype=np.float32) -> Iterator[tuple[int, np.ndarray]]:
    """Yields ``(first chunk id, [<= block_size, dim] vectors)`` over ``[start, end)``."""
    end = self.num_vectors if end is None else end
    for block_start in range(start, end, block_size):
      yield block_start, self.get(block_start, min(end, block_start + block_size), dtype)


def load_embeddings(output_dir: str) -> Embeddings:
  return Embeddings(output_dir)


if __name__ == "__main__":
  stages.run_stage(build_embeddings)
