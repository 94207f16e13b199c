r"""Stage: build a chunk DB (NeMo retmmap) from a corpus, sharded and resumable.

    python -m retro_jax.retrieval.chunk_db --gin.build_chunk_db.input=docs.jsonl \
        --gin.build_chunk_db.vocab=spm.model \
        --gin.build_chunk_db.output_dir=/data/retrieval_db \
        --gin.build_chunk_db.retrieval_db=True \
        [--gin.build_chunk_db.shard_id=3 --gin.build_chunk_db.num_shards=8]
    python -m retro_jax.retrieval.chunk_db --merge_only \
        --gin.merge_chunk_db_shards.output_dir=/data/retrieval_db

Each document is tokenized with the SentencePiece vocabulary, gets the EOD (EOS)
token appended, is padded with the pad id (the EOS id for a vocabulary without a pad
piece, as Megatron pads with EOD; ``vocab_lib.special_ids``) to a multiple of m
(``chunk_size``, 64)
and is written to a retmmap pair: the *retrieval* flavour (``retrieval_db=True``)
stores one more pad chunk per document, so every chunk has a ``[2m]`` continuation
inside its document; the *training* flavour does not. Empty documents are skipped.
See ``retro_jax.retrieval.formats`` for the layout.

Outputs in ``output_dir``::

    shard_00003_of_00008.{idx,bin}   one pair per shard (records of the corpus split
                                     by ``corpus.Corpus.documents`` sharding)
    chunks.{idx,bin}                 the merged DB (``merge_chunk_db_shards``)
    manifest.json                    settings + finished shards (utils.io.Manifest)

A shard found complete in the manifest is skipped; an interrupted shard leaves only
temporary files (removed on the next run of that shard) and is rebuilt from its
start, so a re-run gives byte-identical outputs. With the default contiguous
sharding, the merged DB equals a one-shard build byte for byte. Memory stays
bounded by one batch of documents whatever the corpus size.

Python::

    for s in range(n):
      build_chunk_db("docs.jsonl", "spm.model", out, retrieval_db=True,
                     shard_id=s, num_shards=n)        # the last one also merges
    db = formats.ChunkDB(chunk_db_prefix(out))
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import os
import time
from typing import Any, Iterable, Iterator, Optional, Sequence

from absl import logging
import gin
import numpy as np
import sentencepiece as spm
from tqdm import tqdm

from retro_jax.data import corpus as corpus_lib
from retro_jax.data import vocab as vocab_lib
from retro_jax.retrieval import formats
from retro_jax.utils import stages
from retro_jax.utils.io import Manifest, atomic_path, file_fingerprint

MERGED_NAME = "chunks"
MERGED_UNIT = "merged"
STAGE = "chunk_db"


def chunk_db_prefix(output_dir: str, name: str = MERGED_NAME) -> str:
  """The merged DB's path prefix in ``output_dir`` (open with ``formats.ChunkDB``)."""
  return os.path.join(output_dir, name)


class Tokenizer:
  """SentencePiece encoding for the build (plain sentencepiece: no TensorFlow).

  Args:
    vocab: A ``.model`` path, a ``SentencePieceProcessor`` or a
      ``seqio.SentencePieceVocabulary``.
    num_threads: Threads for batch encoding (None: SentencePiece's default).
  """

  def __init__(self, vocab: Any, num_threads: Optional[int] = None):
    self.source = None                                     # the model file, if known
    if isinstance(vocab, (str, os.PathLike)):
      if not os.path.exists(vocab):
        raise FileNotFoundError(f"{vocab}: SentencePiece model not found")
      self.source = os.fspath(vocab)
      self.processor = spm.SentencePieceProcessor(model_file=os.fspath(vocab))
    elif isinstance(vocab, spm.SentencePieceProcessor):
      self.processor = vocab
    elif hasattr(vocab, "sp_model"):                       # seqio vocabulary
      self.source = getattr(vocab, "sentencepiece_model_file", None)
      self.processor = spm.SentencePieceProcessor(model_proto=vocab.sp_model)
    else:
      raise TypeError(f"vocab must be a model path, a SentencePieceProcessor or a "
                      f"seqio SentencePieceVocabulary, got {type(vocab).__name__}")
    self.num_threads = num_threads
    self.vocab_size = self.processor.get_piece_size()
    self.fingerprint = hashlib.sha256(
        self.processor.serialized_model_proto()).hexdigest()

  @functools.cached_property
  def special_ids(self) -> vocab_lib.SpecialIds:
    """The vocabulary's ids (``vocab_lib.special_ids``: pad = EOS when it has no pad
    piece); raises naming the model file when it has no EOS."""
    return vocab_lib.special_ids(self.processor, name=self.source)

  @property
  def pad_id(self) -> int:
    return self.special_ids.pad

  @property
  def eos_id(self) -> int:
    return self.special_ids.eos

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    kwargs = {} if self.num_threads is None else {"num_threads": self.num_threads}
    return self.processor.encode(list(texts), out_type=int, **kwargs)


def _batches(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
  batch = []
  for item in items:
    batch.append(item)
    if len(batch) == size:
      yield batch
      batch = []
  if batch:
    yield batch


@dataclasses.dataclass
class BuildResult:
  """What ``build_chunk_db`` did.

  Attributes:
    shard_prefix: This shard's DB (``<output_dir>/shard_..._of_...``).
    info: Counts of the shard (docs, chunks, tokens, skipped documents).
    skipped: The shard was already complete.
    merged_prefix: The merged DB if every shard is complete and ``merge`` was set.
  """
  shard_prefix: str
  info: dict[str, Any]
  skipped: bool
  merged_prefix: Optional[str] = None


# Settings that identify the inputs by content (utils.io.Manifest: a change re-runs).
INPUT_KEYS = ("input", "vocab_sha256")


def corpus_identity(corpus: corpus_lib.Corpus) -> Any:
  """The corpus as manifests record it: its format and the content fingerprint of each
  file in order (``utils.io.file_fingerprint``), never its paths, so an input edited in
  place is a new input and one spelled as a relative or an absolute path is the same;
  a corpus without files (TFDS) is its description."""
  paths = getattr(corpus, "paths", None)
  if paths is None:
    return corpus.describe()
  return {"format": corpus.describe().split(":", 1)[0],
          "files": [file_fingerprint(p) for p in paths]}


@gin.configurable
def build_chunk_db(input: str | Sequence[str],  # pylint: disable=redefined-builtin
                   vocab: Any, output_dir: str, *, retrieval_db: bool,
                   chunk_size: int = 64, shard_id: int = 0, num_shards: int = 1,
                   sharding: str = "contiguous", input_format: str = "auto",
                   text_key: str = "text",
                   text_unit: str = "file", tfds_split: str = "train",
                   tfds_data_dir: Optional[str] = None, append_eod: bool = True,
                   pad_id: Optional[int] = None, eod_id: Optional[int] = None,
                   batch_size: int = 256, tokenizer_threads: Optional[int] = None,
                   merge: bool = True, progress: bool = True) -> BuildResult:
  """Builds one shard of a chunk DB (and merges the shards once all are done).

  Args:
    input: Corpus files, directories, globs or ``tfds:<name>`` (``corpus.open_corpus``).
    vocab: SentencePiece ``.model`` path (or processor / seqio vocabulary).
    output_dir: Where shards, the merged DB and the manifest go.
    retrieval_db: True: the retrieval flavour (an extra pad chunk per document, for
      ``[2m]`` neighbors); False: the training flavour.
    chunk_size: m, tokens per chunk.
    shard_id, num_shards: This process's share of the corpus records.
    sharding: ``'contiguous'`` (merged DB = one-shard build) or ``'interleaved'``.
    input_format, text_key, text_unit, tfds_split, tfds_data_dir: Corpus options.
    append_eod: Append ``eod_id`` to every document (NeMo's ``--append-eod``).
    pad_id: Padding token; default the vocabulary's pad id, or its EOS id when it has
      no pad piece (``vocab_lib.special_ids``: 0 for our models, EOD = 2 for
      Megatron's, which pads with EOD).
    eod_id: End-of-document token; default the vocabulary's EOS id (1 for our
      models, 2 for Megatron's).
    batch_size: Documents tokenized per call.
    tokenizer_threads: SentencePiece batch-encoding threads.
    merge: After this shard, merge all shards if every one is complete.
    progress: Show a tqdm bar (documents/s, tokens/s).

  Returns:
    A ``BuildResult``.
  """
  tokenizer = Tokenizer(vocab, tokenizer_threads)
  # The vocabulary's ids are read only where an argument leaves them to it, so that a
  # model without EOS still builds with pad_id= and append_eod=False.
  pad_id = tokenizer.pad_id if pad_id is None else int(pad_id)
  eod_id = tokenizer.eos_id if eod_id is None and append_eod else eod_id
  if pad_id < 0:
    raise ValueError(f"pad_id={pad_id} must be a token id (>= 0)")
  if append_eod and eod_id < 0:
    raise ValueError(f"eod_id={eod_id} must be a token id (>= 0), or pass "
                     "append_eod=False")
  corpus = corpus_lib.open_corpus(input, format=input_format, text_key=text_key,
                                  text_unit=text_unit, tfds_split=tfds_split,
                                  tfds_data_dir=tfds_data_dir)
  dtype = formats.token_dtype(tokenizer.vocab_size)
  settings = {
      "stage": STAGE, "input": corpus_identity(corpus), "vocab_sha256": tokenizer.fingerprint,
      "vocab_size": tokenizer.vocab_size, "dtype": dtype.name,
      "retrieval_db": bool(retrieval_db), "chunk_size": chunk_size,
      "num_shards": num_shards, "sharding": sharding, "append_eod": append_eod,
      "pad_id": pad_id, "eod_id": eod_id if append_eod else None,
  }
  manifest = Manifest(output_dir, settings, INPUT_KEYS)
  name = stages.shard_name(shard_id, num_shards)
  prefix = os.path.join(output_dir, name)
  if manifest.is_done(name):
    logging.info("chunk DB shard %s is complete; skipping", prefix)
    result = BuildResult(prefix, manifest.info(name), skipped=True)
  else:
    stages.remove_stale_temporaries(output_dir, name)
    info = _write_shard(corpus, tokenizer, prefix, dtype=dtype, pad_id=pad_id,
                        eod_id=eod_id if append_eod else None, chunk_size=chunk_size,
                        retrieval_db=retrieval_db, shard_id=shard_id,
                        num_shards=num_shards, sharding=sharding,
                        batch_size=batch_size, progress=progress)
    # Re-read the manifest so that shards finishing meanwhile are kept.
    Manifest(output_dir, settings, INPUT_KEYS).mark_done(
        name, [name + ".idx", name + ".bin"], info)
    result = BuildResult(prefix, info, skipped=False)
  if merge:
    missing = _missing_shards(Manifest(output_dir, settings, INPUT_KEYS), num_shards)
    if missing:
      logging.info("%d of %d shards still to build; merge later", len(missing),
                   num_shards)
    else:
      result.merged_prefix = merge_chunk_db_shards(output_dir)
  return result


def _write_shard(corpus: corpus_lib.Corpus, tokenizer: Tokenizer, prefix: str, *,
                 dtype: np.dtype, pad_id: int, eod_id: Optional[int], chunk_size: int,
                 retrieval_db: bool, shard_id: int, num_shards: int, sharding: str,
                 batch_size: int, progress: bool) -> dict[str, Any]:
  """Tokenizes and writes one shard; returns its counts."""
  stats = corpus_lib.CorpusStats()
  total = (corpus.shard_num_records(shard_id, num_shards, sharding=sharding)
           if sharding == "contiguous" else None)
  tokens, no_tokens = 0, 0
  start = time.time()
  documents = corpus.documents(shard_id, num_shards, sharding=sharding, stats=stats)
  with formats.ChunkDBWriter(prefix, dtype=dtype, pad_id=pad_id, chunk_size=chunk_size,
                             retrieval_db=retrieval_db) as writer, tqdm(
                                 total=total, unit="doc", unit_scale=True,
                                 desc=os.path.basename(prefix),
                                 disable=not progress) as bar:
    for batch in _batches(documents, batch_size):
      for ids in tokenizer.encode_batch([text for _, text in batch]):
        if eod_id is not None:
          ids.append(eod_id)
        if not ids:
          no_tokens += 1
          continue
        writer.add_document(np.asarray(ids, dtype))
        tokens += len(ids)
      bar.update(stats.records - bar.n)
      bar.set_postfix_str(f"{tokens / max(time.time() - start, 1e-9):,.0f} tok/s",
                          refresh=False)
    bar.update(stats.records - bar.n)
    info = {"records": stats.records, "num_docs": writer.num_docs,
            "num_chunks": writer.num_chunks, "num_tokens": tokens,
            "empty_docs": stats.empty + no_tokens}
  elapsed = time.time() - start
  logging.info("wrote %s: %d docs, %d chunks, %d tokens (%.0f tok/s), %d empty docs "
               "skipped", prefix, info["num_docs"], info["num_chunks"], tokens,
               tokens / max(elapsed, 1e-9), info["empty_docs"])
  return info


def _load_manifest(output_dir: str) -> Manifest:
  return Manifest.load(output_dir, stage=STAGE, what="chunk DB")


def built_ids(db_prefix: str | os.PathLike) -> tuple[Optional[int], Optional[int]]:
  """``(pad_id, eod_id)`` a DB built by this stage was written with (its manifest);
  ``(None, None)`` for a DB without a chunk-stage manifest beside it (``eod_id`` is
  None also for a build with ``append_eod=False``)."""
  directory = os.path.dirname(os.fspath(formats.chunk_db_paths(db_prefix)[0]))
  try:
    settings = Manifest.read_settings(directory, stage=STAGE)
  except (OSError, ValueError):
    return None, None
  pad, eod = settings.get("pad_id"), settings.get("eod_id")
  return (None if pad is None else int(pad)), (None if eod is None else int(eod))


def layout_ids(layout: Any) -> dict[str, Optional[int]]:
  """``{"pad_id", "eod_id"}`` of a prepared retrieval directory (a ``RetrievalLayout``):
  its ``retrieval.json`` record, else its vocabulary's (``vocab_lib.special_ids``);
  None where neither says. A recorded -1 (a model without that piece, as written
  before pad fell back to EOS) counts as unrecorded."""
  config = layout.read_config() if os.path.exists(layout.config_path) else {}
  pad, eod = config.get("pad_id"), config.get("eod_id")
  pad = None if pad is None or int(pad) < 0 else int(pad)
  eod = None if eod is None or int(eod) < 0 else int(eod)
  if (pad is None or eod is None) and os.path.exists(layout.vocab_path):
    ids = vocab_lib.special_ids(layout.vocab_path)
    pad = ids.pad if pad is None else pad
    eod = ids.eos if eod is None else eod
  return {"pad_id": pad, "eod_id": eod}


def _missing_shards(manifest: Manifest, num_shards: int) -> list[str]:
  return [stages.shard_name(s, num_shards) for s in range(num_shards)
          if not manifest.is_done(stages.shard_name(s, num_shards))]


def _link_or_copy(src: str, dst: str) -> None:
  """Makes ``dst`` a hard link to ``src`` (a copy where links fail).

  A ``dst`` already linked to ``src`` (a merge killed after this rename) is removed
  first: renaming one link of a file onto another link of the same file does nothing
  (POSIX ``rename``), which would leave the temporary link behind.
  """
  with contextlib.suppress(FileNotFoundError):
    os.remove(dst)
  with atomic_path(dst) as tmp:
    os.remove(tmp)
    try:
      os.link(src, tmp)
    except OSError:
      with open(src, "rb") as fin, open(tmp, "wb") as fout:
        while block := fin.read(16 << 20):
          fout.write(block)


@gin.configurable
def merge_chunk_db_shards(output_dir: str, *, name: str = MERGED_NAME) -> str:
  """Concatenates a build's shards, in shard order, into ``<output_dir>/<name>``.

  Streams (memory does not grow with the DB); one shard is hard-linked (or copied).
  Skipped if the manifest records the merge as complete.

  Returns:
    The merged DB's prefix.

  Raises:
    ValueError: some shards are not complete (names them).
  """
  manifest = _load_manifest(output_dir)
  num_shards = manifest.settings["num_shards"]
  prefix = chunk_db_prefix(output_dir, name)
  unit = f"{MERGED_UNIT}:{name}"
  if manifest.is_done(unit):
    return prefix
  missing = _missing_shards(manifest, num_shards)
  if missing:
    raise ValueError(f"{output_dir}: cannot merge, shards not complete: "
                     f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
  shards = [os.path.join(output_dir, stages.shard_name(s, num_shards))
            for s in range(num_shards)]
  stages.remove_stale_temporaries(output_dir, name)
  if num_shards == 1:
    idx_path, bin_path = formats.chunk_db_paths(prefix)
    src_idx, src_bin = formats.chunk_db_paths(shards[0])
    formats.ChunkDB(shards[0]).close()                      # validates
    if os.path.exists(idx_path):
      os.remove(idx_path)
    _link_or_copy(src_bin, bin_path)
    _link_or_copy(src_idx, idx_path)
    merged = formats.ChunkDB(prefix)
  else:
    merged = formats.concatenate_chunk_dbs(shards, prefix)
  info = {"num_docs": merged.num_docs, "num_chunks": merged.num_chunks}
  merged.close()
  Manifest(output_dir, manifest.settings).mark_done(unit, [name + ".idx", name + ".bin"],
                                                   info)
  logging.info("merged %d shards into %s: %d docs, %d chunks", num_shards, prefix,
               info["num_docs"], info["num_chunks"])
  return prefix


if __name__ == "__main__":
  stages.run_stage(build_chunk_db, merge_chunk_db_shards)
