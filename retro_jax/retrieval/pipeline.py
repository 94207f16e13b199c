r"""The offline retrieval pipeline: every stage in one call, with defaults, for a user
with documents (``preprocess``; its command line is ``retro_jax.preprocess``).

``preprocess(input, output_dir, ...)`` writes a ``RetrievalLayout`` directory
(``retro_jax.retrieval.layout``); the flags named below are the command line's::

    1. vocab/spm.model        SentencePiece, trained on the retrieval corpus (unless
                              --vocab is given, then copied in)
    2. retrieval_db/          the retrieval DB (NeMo retmmap, retrieval flavour)
    3. <split>_db/            the query DB of every split (training flavour): 'train'
                              (the retrieval corpus itself unless --train_input), plus
                              each --split=NAME=FILES and --lm_split=NAME=FILES
    4. embeddings/            the retrieval DB's chunk embeddings (--embedder, MiniLM)
    5. index/                 the Faiss index (factory by DB size unless --factory)
    6. neighbors/<split>/     the k nearest DB chunks of every query chunk (NeMo KNN map);
                              not for --lm_split splits (text for a decoder alone, e.g.
                              GPT pretraining text that nothing retrieves for)
       query_embeddings/<split>/  the query chunks' embeddings of a split that is not a
                              prefix of the retrieval DB (kept for later searches, e.g.
                              ``eval_analyses``' DB-size subsets)
    7. retrieval.json         the settings, read by the seqio tasks, the Retriever,
                              generation and the service; ``code``: the code of the run
                              that wrote it (``utils.provenance``)

Same-document exclusion (RETRO trains on the data it retrieves from, NeMo's
``remove_duplicate``): with ``--exclude_same_document=auto`` (default) it is on for a
split whose documents are the first documents of the retrieval DB (the same corpus, or
a prefix of it; checked token by token), and off otherwise. Such a split's query
embeddings are the DB's own, so they are not computed twice; another split's are
stored (same embedder and dtype as the DB's) before its neighbors are searched.

Sharding (a Slurm array): ``--shard_id/--num_shards`` run one shard of every stage;
between stages a shard waits for the others (``--wait``; ``--nowait`` returns instead,
re-run to continue), and the last one to finish a stage merges it. Every stage keeps a
manifest, so re-running the command skips finished work, and a killed run resumes where
it stopped with outputs identical to an uninterrupted run.

Python::

    summary = preprocess("docs.jsonl", "/data/retro")
    retriever = Retriever.from_layout("/data/retro")
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import time
from typing import Any, Callable, Mapping, Optional, Sequence, Union

from absl import logging
import gin
import numpy as np

from retro_jax.data import corpus as corpus_lib
from retro_jax.data import vocab as vocab_lib
from retro_jax.retrieval import chunk_db as chunk_db_lib
from retro_jax.retrieval import embedders as embedders_lib
from retro_jax.retrieval import embeddings as embeddings_lib
from retro_jax.retrieval import formats
from retro_jax.retrieval import index as index_lib
from retro_jax.retrieval import search as search_lib
from retro_jax.retrieval import neighbors as neighbors_lib
from retro_jax.retrieval.layout import RetrievalLayout
from retro_jax.utils import provenance, stages
from retro_jax.utils.io import Manifest, atomic_path

Inputs = Union[str, Sequence[str]]
TRAIN_SPLIT = "train"
DEFAULT_VOCAB_SIZE = 32000
DEFAULT_EMBEDDER = "all-MiniLM-L6-v2"


@dataclasses.dataclass
class StageReport:
  """One line of the summary: a stage (or a split's part of it)."""
  stage: str
  seconds: float
  skipped: bool
  detail: str = ""


class _NotReady(Exception):
  """Raised (with --nowait) when a stage's inputs are still being built by other shards."""


def _wait_for(ready: Callable[[], bool], what: str, *, wait: bool,
              poll_seconds: float, timeout: Optional[float]) -> None:
  """Blocks until ``ready()`` (other shards finishing a stage) or raises ``_NotReady``."""
  if ready():
    return
  if not wait:
    raise _NotReady(what)
  began = last_log = time.time()
  logging.info("preprocess: waiting for %s (other shards)", what)
  while not ready():
    if timeout is not None and time.time() - began > timeout:
      raise TimeoutError(f"preprocess: waited {timeout:.0f}s for {what}; are all shards "
                         "running? (re-run any missing shard_id)")
    if time.time() - last_log > 300:
      logging.info("preprocess: still waiting for %s", what)
      last_log = time.time()
    time.sleep(poll_seconds)


def _as_list(inputs: Inputs) -> list[str]:
  return [os.fspath(inputs)] if isinstance(inputs, (str, os.PathLike)) else [
      os.fspath(x) for x in inputs]


def squeeze_inputs(inputs: Inputs) -> Inputs:
  """One input as itself, several as a list."""
  items = _as_list(inputs)
  return items[0] if len(items) == 1 else items


def parse_splits(specs: Sequence[str], flag: str = "split") -> dict[str, list[str]]:
  """``['valid=heldout.jsonl', 'test=a.jsonl,b.jsonl']`` -> {split: [inputs]}."""
  out: dict[str, list[str]] = {}
  for spec in specs:
    name, sep, files = spec.partition("=")
    if not sep or not name or not files:
      raise ValueError(f"--{flag}={spec!r}: expected NAME=FILES (e.g. valid=heldout.jsonl)")
    if name == TRAIN_SPLIT:
      raise ValueError(f"--{flag}=train=...: use --train_input for the training split")
    if name in out:
      raise ValueError(f"--{flag}: split {name!r} given twice")
    RetrievalLayout("/").split_db_dir(name)        # validates the name
    out[name] = files.split(",")
  return out


# ----------------------------------------------------------------------------------
# Stages
# ----------------------------------------------------------------------------------


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    while block := f.read(1 << 20):
      digest.update(block)
  return digest.hexdigest()


def _vocab_stage(layout: RetrievalLayout, inputs: Inputs, corpus_options: dict, *,
                 vocab: Optional[str], vocab_size: int, seed: int) -> StageReport:
  """Copies the given vocabulary in, or trains one on the retrieval corpus (once)."""
  began = time.time()
  with stages.locked(layout.vocab_dir, "vocab"):
    stages.remove_stale_temporaries(layout.vocab_dir, "spm")   # of a killed run
    if vocab is not None:
      if not os.path.exists(vocab):
        raise FileNotFoundError(f"--vocab={vocab}: SentencePiece model not found")
      if os.path.exists(layout.vocab_path) and _sha256(layout.vocab_path) == _sha256(vocab):
        return StageReport("vocab", time.time() - began, True, f"{vocab} (copied before)")
      if os.path.exists(layout.vocab_path):
        raise ValueError(f"{layout.vocab_path} differs from --vocab={vocab}; use a fresh "
                         "--output_dir (outputs depend on the vocabulary)")
      with atomic_path(layout.vocab_path) as tmp:
        shutil.copyfile(vocab, tmp)
      return StageReport("vocab", time.time() - began, False, f"copied {vocab}")
    corpus = corpus_lib.open_corpus(inputs, **corpus_options)
    settings = {"stage": "vocab", "input": chunk_db_lib.corpus_identity(corpus),
                "vocab_size": vocab_size, "seed": seed, "hard_vocab_limit": False}
    # A changed corpus retrains the vocabulary (and so, by its fingerprint, the rest).
    manifest = Manifest(layout.vocab_dir, settings, input_keys=("input",))
    if manifest.is_done("spm"):
      return StageReport("vocab", time.time() - began, True, manifest.info("spm")["detail"])
    path = vocab_lib.train_sentencepiece(
        (text for _, text in corpus.documents()), os.path.join(layout.vocab_dir, "spm"),
        vocab_size, hard_vocab_limit=False, seed=seed)
    pieces = vocab_lib.load_sentencepiece(path).get_piece_size()
    detail = f"trained {pieces} pieces (asked {vocab_size})"
    manifest.mark_done("spm", [os.path.basename(path)], {"detail": detail})
    return StageReport("vocab", time.time() - began, False, detail)


def _db_stage(name: str, inputs: Inputs, output_dir: str, vocab_path: str,
              corpus_options: dict, *, retrieval_db: bool, chunk_size: int, shard_id: int,
              num_shards: int, progress: bool, wait_for: Callable) -> StageReport:
  began = time.time()
  result = chunk_db_lib.build_chunk_db(
      squeeze_inputs(inputs), vocab_path, output_dir, retrieval_db=retrieval_db,
      chunk_size=chunk_size, shard_id=shard_id, num_shards=num_shards, progress=progress,
      **corpus_options)
  prefix = chunk_db_lib.chunk_db_prefix(output_dir)
  wait_for(lambda: formats.chunk_db_exists(prefix), f"the merged {name} DB {prefix}")
  with formats.ChunkDB(prefix) as db:
    detail = f"{db.num_docs} docs, {db.num_chunks} chunks"
  empty = result.info.get("empty_docs", 0)
  if empty:
    detail += f" ({empty} empty docs skipped in this shard)"
  return StageReport(f"{name} DB", time.time() - began, result.skipped, detail)


def documents_are_prefix(query_db: formats.ChunkDB, retrieval_db: formats.ChunkDB,
                         block: int = 1 << 16) -> bool:
  """True if the query DB's documents are the first documents of the retrieval DB (the
  same tokens), so that query chunk i is retrieval chunk i."""
  if (query_db.chunk_size != retrieval_db.chunk_size
      or query_db.stride != retrieval_db.stride or query_db.num_docs > retrieval_db.num_docs
      or query_db.num_chunks > retrieval_db.num_chunks):
    return False
  n = query_db.num_docs
  if not np.array_equal(query_db.sizes, retrieval_db.sizes[:n]):
    return False
  for lo in range(0, query_db.num_chunks, block):
    ids = np.arange(lo, min(query_db.num_chunks, lo + block))
    if not np.array_equal(query_db.get_chunks(ids, with_continuation=False),
                          retrieval_db.get_chunks(ids, with_continuation=False)):
      return False
  return True


def _embeddings_stage(stage: str, db_prefix: str, output_dir: str, vocab_path: str,
                      embedder: Any, *, dtype: str, shard_id: int, num_shards: int,
                      progress: bool, wait_for: Callable) -> StageReport:
  """Embeds the chunks of the DB at ``db_prefix`` into ``output_dir`` (all shards)."""
  began = time.time()
  result = embeddings_lib.build_embeddings(
      db_prefix, vocab_path, output_dir, embedder=embedder, shard_id=shard_id,
      num_shards=num_shards, dtype=dtype, progress=progress)
  wait_for(lambda: _embeddings_complete(output_dir), f"the embeddings in {output_dir}")
  emb = formats.Embeddings(output_dir)
  skipped = bool(getattr(result, "skipped", False))
  return StageReport(stage, time.time() - began, skipped,
                     f"{len(emb)} x {emb.dim} {np.dtype(emb.dtype).name}")


def _embeddings_complete(directory: str) -> bool:
  try:
    formats.Embeddings(directory)
  except (FileNotFoundError, ValueError):
    return False
  return True


# ----------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------


# The keys of ``retrieval.json`` that are ``preprocess`` arguments of the same name.
_REBUILD_SETTINGS = ("chunk_size", "num_neighbors", "extra_neighbors", "embedding_dtype",
                     "metric", "nprobe", "ef_search", "seed")


def rebuild_settings(config: Mapping[str, Any]) -> dict[str, Any]:
  """``preprocess`` keyword arguments that build another retrieval directory as the one
  whose ``retrieval.json`` is ``config`` was built: the same corpus options, chunking,
  neighbors, embedding storage, index factory, metric and search (for another corpus,
  e.g. the knowledge update's edited one). The vocabulary and embedder are the
  caller's to pass (a path and a loaded embedder)."""
  settings = {key: config[key] for key in _REBUILD_SETTINGS if key in config}
  if "index_factory" in config:
    settings["factory"] = config["index_factory"]
  settings.update(config.get("corpus_options", {}))
  return settings


@gin.configurable
def preprocess(input: Inputs, output_dir: str, *,  # pylint: disable=redefined-builtin
               vocab: Optional[str] = None, vocab_size: int = DEFAULT_VOCAB_SIZE,
               train_input: Optional[Inputs] = None,
               splits: Optional[Mapping[str, Inputs]] = None,
               lm_splits: Optional[Mapping[str, Inputs]] = None,
               input_format: str = "auto", text_key: str = "text", text_unit: str = "file",
               tfds_split: str = "train", tfds_data_dir: Optional[str] = None,
               chunk_size: int = 64, num_neighbors: int = 2, extra_neighbors: int = 8,
               embedder: Any = DEFAULT_EMBEDDER, embedding_dtype: str = "float16",
               factory: Optional[str] = None, metric: str = "ip",
               nprobe: Optional[int] = None, ef_search: Optional[int] = None,
               target_recall: Optional[float] = search_lib.DEFAULT_TARGET_RECALL,
               train_size: Optional[int] = None, seed: int = 0,
               exclude_same_document: Union[bool, str] = "auto",
               shard_id: int = 0, num_shards: int = 1, wait: bool = True,
               wait_timeout: Optional[float] = None, poll_seconds: float = 10.0,
               use_gpu: Union[bool, str] = "auto", progress: bool = True
               ) -> dict[str, Any]:
  """Runs every stage (this shard of it); returns the summary (``retrieval.json``'s
  settings plus per-stage reports).

  Args:
    input: The retrieval corpus (files, directories, globs or ``tfds:<name>``).
    output_dir: The ``RetrievalLayout`` root.
    vocab: A SentencePiece model to use (copied in); None: train one with
      ``vocab_size`` pieces (fewer on a small corpus: the limit is soft).
    train_input: The training corpus; None: the retrieval corpus.
    splits: Extra query splits ``{name: inputs}`` (e.g. ``{'valid': 'heldout.jsonl'}``).
    lm_splits: Splits that get a query DB but no neighbor map ``{name: inputs}``: text
      for a decoder alone (e.g. GPT pretraining text), read by the GPT tasks.
    input_format, text_key, text_unit, tfds_split, tfds_data_dir: Corpus options (see
      ``retro_jax.data.corpus.open_corpus``), for every corpus.
    chunk_size: m.
    num_neighbors: k neighbors per query chunk.
    extra_neighbors: Candidates queried beyond k (dropped when from the query's document).
    embedder: A known name, a sentence-transformers directory, or a loaded embedder.
    embedding_dtype: float16 or float32 embedding files.
    factory, metric, train_size: The index (``retro_jax.retrieval.index.build_index``).
    nprobe, ef_search: Search parameters of the neighbor search (and retrieval.json).
    target_recall: Unless nprobe is given, the neighbor search of an IVF index takes
      the cheapest nprobe (and re-ranking k_factor) whose rows reach this recall@k
      against exact search on a seeded sample of each split's query chunks
      (``neighbors.tune_neighbor_search``); None: the defaults of
      ``search.default_nprobe``.
    seed: Vocabulary sampling and index training seed.
    exclude_same_document: 'auto' (see the module docstring), True or False.
    shard_id, num_shards: This process' shard of every stage.
    wait: Between stages, wait for the other shards (else return when blocked).
    wait_timeout, poll_seconds: Of that wait.
    use_gpu: Faiss on GPUs when available ('auto').
    progress: Progress bars.
  """
  began = time.time()
  code = provenance.code_version()     # the code as this run starts (cached)
  layout = RetrievalLayout(output_dir)
  os.makedirs(layout.root, exist_ok=True)
  corpus_options = dict(input_format=input_format, text_key=text_key, text_unit=text_unit,
                        tfds_split=tfds_split, tfds_data_dir=tfds_data_dir)
  open_options = dict(format=input_format, text_key=text_key, text_unit=text_unit,
                      tfds_split=tfds_split, tfds_data_dir=tfds_data_dir)
  query_inputs = {TRAIN_SPLIT: _as_list(train_input if train_input is not None else input)}
  for name, files in (splits or {}).items():
    if name == TRAIN_SPLIT:
      raise ValueError("splits: 'train' is the training split; pass train_input")
    query_inputs[name] = _as_list(files)
  lm_inputs = {}
  for name, files in (lm_splits or {}).items():
    if name == TRAIN_SPLIT or name in query_inputs:
      raise ValueError(f"lm_splits: split {name!r} is also a split with neighbors")
    lm_inputs[name] = _as_list(files)
  if exclude_same_document not in ("auto", True, False):
    raise ValueError(f"exclude_same_document must be 'auto', True or False, got "
                     f"{exclude_same_document!r}")
  wait_for = lambda ready, what: _wait_for(ready, what, wait=wait, timeout=wait_timeout,
                                           poll_seconds=poll_seconds)
  reports: list[StageReport] = []

  def log(report: StageReport) -> None:
    reports.append(report)
    logging.info("preprocess: %-22s %s in %.1fs: %s", report.stage,
                 "skipped (done)" if report.skipped else "done", report.seconds,
                 report.detail)

  try:
    logging.info("preprocess: stage vocab")
    log(_vocab_stage(layout, squeeze_inputs(input), open_options, vocab=vocab,
                     vocab_size=vocab_size, seed=seed))
    logging.info("preprocess: stage retrieval DB")
    log(_db_stage("retrieval", input, layout.retrieval_db_dir, layout.vocab_path,
                  corpus_options, retrieval_db=True, chunk_size=chunk_size,
                  shard_id=shard_id, num_shards=num_shards, progress=progress,
                  wait_for=wait_for))
    for split, files in {**query_inputs, **lm_inputs}.items():
      logging.info("preprocess: stage %s DB", split)
      log(_db_stage(split, files, layout.split_db_dir(split), layout.vocab_path,
                    corpus_options, retrieval_db=False, chunk_size=chunk_size,
                    shard_id=shard_id, num_shards=num_shards, progress=progress,
                    wait_for=wait_for))

    logging.info("preprocess: stage embeddings")
    embedder_obj = _load_embedder(embedder)
    log(_embeddings_stage("embeddings", layout.retrieval_db_prefix, layout.embeddings_dir,
                          layout.vocab_path, embedder_obj, dtype=embedding_dtype,
                          shard_id=shard_id, num_shards=num_shards, progress=progress,
                          wait_for=wait_for))

    logging.info("preprocess: stage index")
    embeddings = formats.Embeddings(layout.embeddings_dir)
    retrieval_db = formats.ChunkDB(layout.retrieval_db_prefix)
    stage_began = time.time()
    built = index_lib.build_index(
        embeddings, layout.index_dir, factory=factory, metric=metric,
        train_size=train_size, seed=seed, shard_id=shard_id, num_shards=num_shards,
        use_gpu=use_gpu, expected_num_vectors=retrieval_db.num_chunks, progress=progress)
    wait_for(lambda: os.path.exists(layout.index_path),
             f"the merged index {layout.index_path}")
    log(StageReport("index", time.time() - stage_began, built.skipped,
                    f"{built.factory} ({built.metric}), {built.num_vectors} vectors"))
    index = search_lib.open_index(layout.index_path, expected_dim=embedder_obj.dim,
                                 expected_ntotal=retrieval_db.num_chunks)
    searcher = search_lib.IndexSearcher(
        index, nprobe=nprobe, ef_search=ef_search, use_gpu=use_gpu, path=layout.index_path,
        refine=embeddings if search_lib.needs_refine(index) else None)

    embed_chunks = embedders_lib.ChunkEmbedder(embedder_obj, layout.vocab_path)
    split_settings = {}
    for split in query_inputs:
      logging.info("preprocess: stage %s neighbors", split)
      stage_began = time.time()
      query_db = formats.ChunkDB(layout.split_db_prefix(split))
      prefix = documents_are_prefix(query_db, retrieval_db)
      exclude = prefix if exclude_same_document == "auto" else bool(exclude_same_document)
      query_embeddings = embeddings
      if not prefix:
        log(_embeddings_stage(f"{split} query embeddings", layout.split_db_prefix(split),
                              layout.query_embeddings_dir(split), layout.vocab_path,
                              embedder_obj, dtype=embedding_dtype, shard_id=shard_id,
                              num_shards=num_shards, progress=progress,
                              wait_for=wait_for))
        query_embeddings = formats.Embeddings(layout.query_embeddings_dir(split))
      settings = {"embedder": _embedder_name(embedder_obj, embedder),
                  "embedder_fingerprint": getattr(embedder_obj, "fingerprint", None),
                  "factory": built.factory, "metric": built.metric, **searcher.parameters}
      path = neighbors_lib.build_neighbor_map(
          query_db, retrieval_db, embed_chunks, searcher, layout.neighbors_dir(split),
          k=num_neighbors, extra=extra_neighbors, exclude_same_document=exclude,
          shard_id=shard_id, num_shards=num_shards, settings=settings, progress=progress,
          query_embeddings=query_embeddings, target_recall=target_recall,
          db_embeddings=embeddings, seed=seed)
      wait_for(lambda s=split: os.path.exists(layout.neighbor_map_path(s)),
               f"the {split} neighbor map")
      path = layout.neighbor_map_path(split)
      knn = formats.NeighborMap(path)
      found = int(np.sum(knn.neighbors >= 0))
      log(StageReport(f"{split} neighbors", time.time() - stage_began, False,
                      f"{knn.num_chunks} queries x k={knn.k}, {found} neighbors found, "
                      f"same-document exclusion {'on' if exclude else 'off'}"
                      f"{', DB embeddings reused' if prefix else ''}"))
      split_settings[split] = {"inputs": query_inputs[split], "num_docs": query_db.num_docs,
                               "num_chunks": query_db.num_chunks,
                               "exclude_same_document": exclude}
      if searcher.tuning is not None and target_recall is not None:
        split_settings[split]["search"] = searcher.tuning.summary()
    for split, files in lm_inputs.items():
      query_db = formats.ChunkDB(layout.split_db_prefix(split))
      split_settings[split] = {"inputs": files, "num_docs": query_db.num_docs,
                               "num_chunks": query_db.num_chunks, "neighbors": False}
  except _NotReady as e:
    logging.info("preprocess: shard %d/%d stops here: waiting for %s (--nowait); re-run "
                 "to continue", shard_id, num_shards, e)
    return {"complete": False, "waiting_for": str(e),
            "stages": [dataclasses.asdict(r) for r in reports]}

  sp = vocab_lib.load_sentencepiece(layout.vocab_path)
  ids = vocab_lib.special_ids(layout.vocab_path)   # what the chunk DB stages wrote
  config = {
      "created_by": "retro_jax.preprocess",
      "retrieval_input": _as_list(input),
      "corpus_options": {k: v for k, v in corpus_options.items() if v is not None},
      "vocab": os.path.relpath(layout.vocab_path, layout.root),
      "vocab_size": sp.get_piece_size(), "pad_id": ids.pad, "eod_id": ids.eos,
      "chunk_size": chunk_size, "num_neighbors": num_neighbors,
      "extra_neighbors": extra_neighbors,
      "embedder": _embedder_name(embedder_obj, embedder),
      "embedder_fingerprint": getattr(embedder_obj, "fingerprint", None),
      "embedding_dim": embedder_obj.dim, "embedding_dtype": embedding_dtype,
      "index_factory": built.factory, "metric": built.metric,
      "nprobe": searcher.nprobe, "ef_search": searcher.ef_search,
      "k_factor": searcher.k_factor,
      "train_size": Manifest.read_settings(layout.index_dir).get("train_size"),
      "seed": seed, "num_shards": num_shards,
      "retrieval_db": {"num_docs": retrieval_db.num_docs,
                       "num_chunks": retrieval_db.num_chunks},
      "splits": split_settings,
  }
  with stages.locked(layout.root, "config"):
    stages.remove_stale_temporaries(layout.root, os.path.basename(layout.config_path))
    # The file is rewritten only when what it describes changed (later steps key on its
    # bytes); its "code" is then the code of the run that wrote it.
    old = layout.read_config() if os.path.exists(layout.config_path) else None
    if old is None or {k: v for k, v in old.items() if k != "code"} != config:
      layout.write_config(dict(config, code=code))
    else:
      config = old
  total = time.time() - began
  summary = dict(config, complete=True, seconds=total,
                 stages=[dataclasses.asdict(r) for r in reports])
  _print_summary(layout, reports, total)
  return summary


def _load_embedder(embedder: Any) -> Any:
  if not isinstance(embedder, (str, os.PathLike)):
    return embedder
  return embedders_lib.load_embedder(os.fspath(embedder))


def _embedder_name(embedder_obj: Any, given: Any) -> str:
  if isinstance(given, (str, os.PathLike)):
    given = os.fspath(given)
    # A local model is the same however its path is spelled (its weights are in the
    # embedder_fingerprint); a hub name stays as given.
    return os.path.abspath(given) if os.path.exists(given) else given
  return str(getattr(embedder_obj, "name", type(embedder_obj).__name__))


def _print_summary(layout: RetrievalLayout, reports: Sequence[StageReport],
                   total: float) -> None:
  lines = [f"retrieval directory {layout.root} ({total:.1f}s)",
           "| stage | status | seconds | result |", "|---|---|---|---|"]
  for r in reports:
    lines.append(f"| {r.stage} | {'skipped (done)' if r.skipped else 'done'} | "
                 f"{r.seconds:.1f} | {r.detail} |")
  print("\n".join(lines), flush=True)
