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

Read them with ``formats.Embeddings(output_dir)``: ``num_vectors``, ``dim``, and blocks by
global chunk-id range from memory-mapped shards (never everything at once), each shard
validated against the manifest (shape, dtype) on open.

Python::

    for s in range(n):
      build_embeddings(layout.retrieval_db_prefix, layout.vocab_path,
                       layout.embeddings_dir, shard_id=s, num_shards=n)
    vectors = formats.Embeddings(layout.embeddings_dir)
    for start, block in vectors.iter_blocks(65536): index.add(block)
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Optional

from absl import logging
import gin
import numpy as np
from tqdm import tqdm

from retro_jax.retrieval import formats
from retro_jax.retrieval.chunk_db import Tokenizer
from retro_jax.retrieval.embedders import DEFAULT_EMBEDDER, ChunkEmbedder, load_embedder
from retro_jax.utils import stages
from retro_jax.utils.io import Manifest, atomic_path

DTYPES = ("float16", "float32")


# Settings that identify the inputs by content (utils.io.Manifest: a changed DB or
# vocabulary re-embeds instead of being refused).
INPUT_KEYS = ("db", "vocab_sha256")


@dataclasses.dataclass
class EmbeddingsResult:
  """What ``build_embeddings`` did.

  Attributes:
    shard_path: This shard's .npy file.
    start, end: Its chunk-id range ``[start, end)``.
    skipped: It was already complete.
    complete: Every shard of the build is complete (``formats.Embeddings(output_dir)``
      opens).
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
      "stage": formats.EMBEDDINGS_STAGE,
      "db": {"num_docs": db.num_docs, "num_chunks": db.num_chunks,
             "chunk_size": db.chunk_size, "fingerprint": formats.db_fingerprint(db)},
      "vocab_sha256": tokenizer.fingerprint, "pad_id": int(pad_id), "eod_id": int(eod_id),
      "embedder": embedder_name, "embedder_fingerprint": embedder_fingerprint,
      "dim": int(embedder.dim), "dtype": dtype, "num_shards": int(num_shards),
  }
  manifest = Manifest(output_dir, settings, INPUT_KEYS)
  name = stages.shard_name(shard_id, num_shards, formats.EMBEDDINGS_SHARD_SUFFIX)
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
  complete = all(fresh.is_done(stages.shard_name(s, num_shards, formats.EMBEDDINGS_SHARD_SUFFIX))
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


if __name__ == "__main__":
  stages.run_stage(build_embeddings)
