r"""RETRO's evaluation analyses of Retro and GPT checkpoints on a split of a retrieval dir.

    python -m retro_jax.eval --gin_file=gin/recipes/eval_analyses.gin \
        --gin.OUTPUT_DIR=/tmp/analyses --gin.RETRIEVAL_DIR=/tmp/retrieval \
        --gin.CHECKPOINTS="{'Retro': '/tmp/retro', 'GPT-fit': '/tmp/gptfit'}"

``eval_analyses`` (gin-configurable; ``python -m retro_jax.eval``'s ``analyses`` task)
scores every example of ``split`` once per variant and writes ``analyses.json``,
``analyses.md`` and PNG plots under ``output_dir``. Every row has perplexity and bits
per byte (``evaluation.bits_per_byte``: UTF-8 bytes of the scored targets).

* ``perplexity``: each checkpoint as ``eval_perplexity`` scores it (a Retro checkpoint
  with its neighbors and encoder ablated, a GPT one decoder only), with the map's
  neighbors truncated to the model's k.
* ``neighbors``: a Retro checkpoint with k = 0 (the encoder ablated), 1, 2, 4 neighbors
  at evaluation (``num_neighbors``): the same tokens, each chunk's neighbors truncated to
  its first k (best first). For a k above what the neighbor map holds, the evaluated
  chunks' neighbors are searched again, exactly, over the whole DB (as the DB-size
  curve's fraction 1, below; ``neighbors_k<k>/1/neighbors.knn``), and the row says so;
  without stored embeddings to search, k is capped to the map's and the row says that.
* ``leakage`` (RETRO §2.6, §4.4): every evaluated chunk's overlap with the neighbors
  that condition its prediction (``evaluation.leakage``: with the shifted CCA, chunk
  C_u is predicted from the neighbors retrieved for C_{u-1}, each chunk + continuation;
  overlap = longest common token substring / scored tokens of C_u). Loss by overlap
  bucket, and perplexity filtered to chunks with overlap below 12.5%, 25%, 50% and all
  chunks, for every checkpoint and mode on the same chunks. Chunk 0 of each example (no
  neighbors condition it) is its own row; each example's last target (the first token
  of a chunk the example does not hold) is in ``all`` only.
* ``db_size`` (RETRO Fig. 1 right): a Retro checkpoint against nested subsets of the
  retrieval DB (``db_fractions`` of its documents, nested by a ``db_seed``-ed
  permutation; ``evaluation.db_subsets``), with the neighbors of the evaluated chunks
  recomputed by exact search over the subset's stored chunk embeddings (same metric as
  the index, the pipeline's same-document exclusion); no retraining, no other neighbor
  is computed. Each subset's map is written to ``db_size/<fraction>/neighbors.knn``
  (rows of chunks no example scores stay -1). Fraction 1 is searched the same way, so the
  curve shares one search method; the ``neighbors`` table holds the stored map's score
  (where fraction 1's rows equal the stored map's, as with an exact index, its score is
  that one, not computed twice).
  Query embeddings: a split whose documents are the DB's first ones (the training split)
  reuses the DB's stored embeddings, any other split the query embeddings the pipeline
  stored for it; a directory built without them, or an ``embedder`` given, embeds the
  split's chunks (with the build's embedder from ``retrieval.json`` by default).

The recipe calls ``eval_analyses(output_dir=..., checkpoints={'Retro': ..., 'GPT-fit':
...}, retrieval_dir=..., split=..., seq_len=..., batch_size=...)``.
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping, Optional, Sequence

from absl import logging
import gin
import jax
import numpy as np
import seqio

from retro_jax.data import feature_converters as fc
from retro_jax.data.ordering import ExampleStream, shard_positions
from retro_jax.data.sources import PretrainSource
from retro_jax.evaluation import db_subsets
from retro_jax.evaluation import leakage
from retro_jax.evaluation.bits_per_byte import token_byte_lengths, with_bits_per_byte
from retro_jax.evaluation.perplexity import count_target_bytes
from retro_jax.evaluation.report import markdown_table, pyplot, save_png
from retro_jax.models import RetroConfig
from retro_jax.models import partitioning
from retro_jax.retrieval import formats
from retro_jax.retrieval import search as search_lib
from retro_jax.retrieval.chunk_db import layout_ids
from retro_jax.retrieval.embedders import ChunkEmbedder, load_embedder
from retro_jax.retrieval.layout import RetrievalLayout
from retro_jax.retrieval.pipeline import documents_are_prefix
from retro_jax.training import checkpoints as ckpt_lib
from retro_jax.training.trainer import Evaluator
from retro_jax.utils.io import atomic_write_json, atomic_write_text

ANALYSES = ("neighbors", "leakage", "db_size")
ALL_TARGETS = "all targets"
SCORE_COLUMNS = (("loss", "loss"), ("perplexity", "perplexity"), ("bpb", "bits/byte"),
                 ("tokens", "tokens"))
SCORES = ("loss", "perplexity", "accuracy", "bpb")


# Batches -----------------------------------------------------------------------------


class ListSource:
  """A batch source over batches held in memory (every variant is scored by several
  checkpoints and modes; its batches are read and retrieved once)."""

  def __init__(self, batches: Sequence[dict[str, np.ndarray]]):
    self.batches = list(batches)
    self.target_bytes: dict[tuple, dict[str, float]] = {}    # classes -> bytes by class

  def __len__(self) -> int:
    return len(self.batches)

  def get_batch(self, step: int) -> dict[str, np.ndarray]:
    return self.batches[step]

  def same_batches(self, other: "ListSource") -> bool:
    """Whether both hold equal batches (then every score of one is the other's)."""
    return len(self) == len(other) and all(
        a.keys() == b.keys() and all(np.array_equal(a[key], b[key], equal_nan=np.issubdtype(
            np.asarray(a[key]).dtype, np.inexact)) for key in a)
        for a, b in zip(self.batches, other.batches))


def split_source(layout: RetrievalLayout, split: str, seq_len: int, *,
                 num_neighbors: Optional[int] = None,
                 neighbor_map: Optional[str] = None) -> PretrainSource:
  """The split's examples (as ``PretrainSource.from_layout``), with the layout's neighbor
  map or ``neighbor_map`` (a map of the same query chunks)."""
  if neighbor_map is None:
    return PretrainSource.from_layout(layout, split, seq_len=seq_len,
                                      num_neighbors=num_neighbors)
  ids = {k: v for k, v in layout_ids(layout).items() if v is not None}
  return PretrainSource(layout.split_db_prefix(split), neighbor_map,
                        layout.retrieval_db_prefix, seq_len=seq_len,
                        num_neighbors=num_neighbors, **ids)


def source_batches(source: PretrainSource, batch_size: int,
                   max_batches: Optional[int] = None) -> list[dict[str, np.ndarray]]:
  """This host's share of the batches that score every example once (in order; the
  last batch padded with weight-0 examples), as ``eval_perplexity``'s source gives
  them; at most ``max_batches``."""
  shards = seqio.ShardInfo(jax.process_index(), jax.process_count())
  if batch_size % shards.num_shards:
    raise ValueError(f"batch_size={batch_size} must be a multiple of the "
                     f"{shards.num_shards} hosts")
  local = batch_size // shards.num_shards
  stream = ExampleStream([source], shuffle=False, num_epochs=1)
  count = max(1, math.ceil(source.num_examples / batch_size))
  count = count if max_batches is None else min(count, max_batches)
  return [fc.model_features(
      stream.features(shard_positions(step * local + np.arange(local), shards),
                      with_neighbors=True), with_neighbors=True)
          for step in range(count)]


def truncate_neighbors(batch: Mapping[str, np.ndarray], k: int) -> dict[str, np.ndarray]:
  """The batch with each chunk's neighbors truncated to the first k: ``[b, L, k, r]``."""
  return dict(batch, neighbor_tokens=np.asarray(batch["neighbor_tokens"])[:, :, :k],
              neighbor_mask=np.asarray(batch["neighbor_mask"])[:, :, :k])


def with_overlaps(batches: Sequence[Mapping[str, np.ndarray]], chunk_length: int,
                  pad_id: int) -> tuple[list[dict[str, np.ndarray]], np.ndarray]:
  """Batches carrying ``leakage.OVERLAP_FEATURE``, and every chunk's overlap
  ``[examples, L]`` (``leakage.chunk_overlaps``; padding examples left out)."""
  out, overlaps = [], []
  for batch in batches:
    overlap = leakage.chunk_overlaps(batch, chunk_length, pad_id)
    out.append(dict(batch, **{leakage.OVERLAP_FEATURE: leakage.target_overlaps(
        batch, chunk_length, pad_id)}))
    scored = np.asarray(batch["decoder_loss_weights"]).sum(1) > 0
    overlaps.append(overlap[scored])
  return out, np.concatenate(overlaps)


# Scoring ----------------------------------------------------------------------------


class _Scorer:
  """Scores batch lists with one checkpoint's evaluators; bytes counted once per list."""

  def __init__(self, evaluators: Mapping[bool, Evaluator], params: Any,
               token_bytes: np.ndarray):
    self.evaluators, self.params, self.token_bytes = evaluators, params, token_bytes

  def __call__(self, source: ListSource, retrieval: bool,
               classes: Optional[Mapping[str, Any]] = None) -> dict[str, dict[str, Any]]:
    """``{'all': row}`` (+ a row per class and ``'other'``) with bytes and bpb."""
    evaluator = self.evaluators[retrieval]
    if classes:
      scores = evaluator.evaluate_classes(self.params, source, len(source), classes)
    else:
      scores = {"all": evaluator.evaluate(self.params, source, len(source))}
    key = tuple(classes or ())
    if key not in source.target_bytes:
      source.target_bytes[key] = count_target_bytes(source, len(source), self.token_bytes,
                                                    classes)
    rows = {c: with_bits_per_byte(s, source.target_bytes[key][c]) for c, s in scores.items()}
    for row in rows.values():           # an empty class has no loss (not 0, not ppl 1)
      if not row["tokens"]:
        row.update(dict.fromkeys(SCORES))
    return rows


def _load(model_config: RetroConfig, path: str, mesh) -> tuple[Any, dict, bool]:
  params, shardings, has_retro = ckpt_lib.load_model_params(path, model_config, mesh)
  modes = (True, False) if has_retro else (False,)
  return params, {r: Evaluator(model_config, mesh, shardings, retrieval=r)
                  for r in modes}, has_retro


def _mode(has_retro: bool, retrieval: bool) -> str:
  if not has_retro:
    return "decoder only"
  return "retrieval" if retrieval else "encoder ablated"


# DB-size variants ---------------------------------------------------------------------


def _query_embeddings(layout: RetrievalLayout, split: str, query_db: formats.ChunkDB,
                      vectors: search_lib.VectorSource,
                      chunk_ids: np.ndarray, prefix: bool, embedder: Any,
                      block: int = 4096) -> np.ndarray:
  """Embeddings of query chunks ``chunk_ids``: the DB's stored rows when the split's
  documents are the DB's first ones, else the split's stored query embeddings
  (``RetrievalLayout.query_embeddings_dir``), else (a directory built before they were
  stored, or ``embedder`` given) embedded with the build's embedder."""
  if prefix:
    return vectors.take(chunk_ids)
  stored = layout.query_embeddings_dir(split)
  if embedder is None and os.path.isdir(stored):
    embeddings = formats.Embeddings(stored)
    if len(embeddings) != query_db.num_chunks:
      raise ValueError(f"{stored}: {len(embeddings)} embeddings for the "
                       f"{query_db.num_chunks} chunks of {query_db.idx_path}")
    return search_lib.VectorSource(embeddings).take(chunk_ids)
  if embedder is None or isinstance(embedder, (str, os.PathLike)):
    name = embedder or layout.read_config().get("embedder")
    if not name:
      raise ValueError(f"{layout.config_path}: no 'embedder' recorded; pass "
                       "eval_analyses.embedder to embed the query chunks")
    embedder = load_embedder(os.fspath(name))
  ids = layout_ids(layout)
  embed = ChunkEmbedder(embedder, layout.vocab_path, pad_id=ids["pad_id"],
                        eod_id=ids["eod_id"])
  return np.concatenate([embed(query_db.get_chunks(chunk_ids[i:i + block],
                                                   with_continuation=False))
                         for i in range(0, len(chunk_ids), block)])


def exact_neighbor_maps(layout: RetrievalLayout, split: str, output_dir: str,
                        evaluated_chunks: int, fractions: Sequence[float], *,
                        seed: int = 0, k: Optional[int] = None, subdir: str = "db_size",
                        embedder: Any = None) -> list[dict[str, Any]]:
  """Writes, for each fraction, the neighbor map of the split's first
  ``evaluated_chunks`` query chunks within that DB subset (other rows -1), found by
  exact search: ``<output_dir>/<subdir>/<fraction>/neighbors.knn``, ``k`` neighbors
  per chunk (default: as many as the stored map holds).

  Returns:
    One dict per fraction: ``fraction``, ``db_docs``, ``db_chunks``, ``db_tokens``
    (tokens of its documents, padded to m), ``neighbor_map`` (path), ``queries``.
  """
  config = layout.read_config()
  retrieval_db = formats.ChunkDB(layout.retrieval_db_prefix)
  query_db = formats.ChunkDB(layout.split_db_prefix(split))
  stored = formats.NeighborMap(layout.neighbor_map_path(split))
  if not os.path.isdir(layout.embeddings_dir):
    raise FileNotFoundError(f"{layout.embeddings_dir}: the DB-size analysis searches the "
                            "stored chunk embeddings, which this directory lacks")
  vectors = search_lib.VectorSource(formats.Embeddings(layout.embeddings_dir))
  if vectors.num_vectors != retrieval_db.num_chunks:
    raise ValueError(f"{layout.embeddings_dir}: {vectors.num_vectors} embeddings for the "
                     f"{retrieval_db.num_chunks} chunks of {retrieval_db.idx_path}")
  prefix = documents_are_prefix(query_db, retrieval_db)
  exclude = config.get("splits", {}).get(split, {}).get("exclude_same_document", prefix)
  chunk_ids = np.arange(min(evaluated_chunks, query_db.num_chunks), dtype=np.int64)
  queries = _query_embeddings(layout, split, query_db, vectors, chunk_ids, prefix,
                              embedder)
  query_docs = query_db.doc_of_chunk(chunk_ids) if exclude else None
  extra = int(config.get("extra_neighbors", 8))
  metric = config.get("metric", "ip")
  k = stored.k if k is None else k
  out = []
  for fraction, docs in zip(fractions, db_subsets.nested_document_subsets(
      retrieval_db.num_docs, fractions, seed)):
    subset = db_subsets.subset_chunk_ids(retrieval_db, docs)
    found = db_subsets.subset_neighbors(queries, vectors, subset, retrieval_db, k=k,
                                        extra=extra, metric=metric, query_docs=query_docs)
    rows = np.full((query_db.num_chunks, k), -1, np.int64)
    rows[chunk_ids] = found
    path = os.path.join(output_dir, subdir, f"{fraction:.6g}", "neighbors.knn")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    formats.write_neighbor_map(path, rows)
    out.append(dict(fraction=float(fraction), db_docs=int(len(docs)),
                    db_chunks=int(len(subset)),
                    db_tokens=int(np.sum(retrieval_db.sizes[docs], dtype=np.int64)),
                    neighbor_map=path, queries=int(len(chunk_ids))))
  return out


# Plots and tables -------------------------------------------------------------------------


def _plot_lines(series: Mapping[str, tuple[list, list]], path: str, *, xlabel: str,
                ylabel: str, title: str, logx: bool = False,
                hlines: Optional[Mapping[str, float]] = None) -> str:
  plt = pyplot()
  fig, ax = plt.subplots(figsize=(7, 4))
  for label, (xs, ys) in series.items():
    ax.plot(xs, ys, marker="o", label=label)
  for (label, y), style in zip((hlines or {}).items(), ("--", ":", "-.") * 8):
    ax.axhline(y, linestyle=style, linewidth=1, label=label, color="gray")
  if logx:
    ax.set_xscale("log")
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  return save_png(fig, path)


def _plot_leakage(rows: Sequence[Mapping[str, Any]], buckets: Sequence[str], path: str
                  ) -> str:
  plt = pyplot()
  fig, ax = plt.subplots(figsize=(8, 4))
  runs = list(dict.fromkeys((r["model"], r["mode"]) for r in rows))
  width = 0.8 / max(len(runs), 1)
  for i, run in enumerate(runs):
    by = {r["class"]: r["loss"] for r in rows if (r["model"], r["mode"]) == run}
    ax.bar(np.arange(len(buckets)) + i * width, [np.nan if by.get(b) is None else by[b] for b in buckets],
           width, label=f"{run[0]}, {run[1]}")
  ax.set_xticks(np.arange(len(buckets)) + 0.4 - width / 2,
                [b.replace("overlap ", "") for b in buckets], fontsize=8)
  ax.set_xlabel("overlap with the neighbors that condition the chunk")
  ax.set_ylabel("loss (nats / token)")
  ax.set_title("Loss by the chunk's overlap with its neighbors (RETRO §4.4)")
  ax.grid(axis="y", alpha=0.3)
  ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
  return save_png(fig, path)


def _table(rows: Sequence[Mapping[str, Any]], columns) -> str:
  return markdown_table([{k: "" if v is None else v for k, v in r.items()} for r in rows],
                        columns)


def write_report(results: Mapping[str, Any], output_dir: str) -> list[str]:
  """``analyses.json``, ``analyses.md`` and the plots; returns the paths written."""
  paths = [os.path.join(output_dir, "analyses.json"), os.path.join(output_dir, "analyses.md")]
  atomic_write_json(paths[0], results)
  head = (("model", "model"), ("mode", "mode"))
  lines = [f"# Analyses on {results['retrieval_dir']} / {results['split']}", ""]
  lines += [f"- {note}" for note in results["notes"]] + [""]
  lines += ["## Perplexity and bits per byte", "",
            _table(results["perplexity"], head + SCORE_COLUMNS), ""]
  if results.get("neighbors"):
    rows = results["neighbors"]
    lines += ["## Neighbors at evaluation", "", _table(rows, (
        ("model", "model"), ("k", "k"), ("requested", "k asked"), *SCORE_COLUMNS,
        ("note", "note"))), "", "![neighbors](neighbors.png)", ""]
    series = {}
    for r in rows:
      xs, ys = series.setdefault(r["model"], ([], []))
      xs.append(r["k"])
      ys.append(r["perplexity"])
    paths.append(_plot_lines(series, os.path.join(output_dir, "neighbors.png"),
                             xlabel="neighbors at evaluation (k)", ylabel="perplexity",
                             title="Perplexity by neighbors at evaluation"))
  if results.get("leakage"):
    rows = results["leakage"]
    lines += ["## Leakage: loss by overlap with the conditioning neighbors", "",
              "Overlap of chunk C_u = longest common token substring with any neighbor "
              "retrieved for C_{u-1} (which the shifted CCA conditions C_u on) / C_u's "
              "scored tokens; chunks counted over all examples.", "",
              _table(rows, (("class", "chunks"), ("chunks", "count"), *head,
                                    *SCORE_COLUMNS)), "", "![leakage](leakage.png)", ""]
    buckets = [c for c in dict.fromkeys(r["class"] for r in rows)
               if c.startswith("overlap [")]
    paths.append(_plot_leakage(rows, buckets, os.path.join(output_dir, "leakage.png")))
  if results.get("db_size"):
    rows = results["db_size"]
    lines += ["## Retrieval DB size (same checkpoint, neighbors recomputed)", "",
              _table(rows, (("model", "model"), ("fraction", "DB fraction", ".4g"),
                                    ("db_docs", "documents"), ("db_tokens", "DB tokens"),
                                    *SCORE_COLUMNS)), "", "![db size](db_size.png)", ""]
    for metric, name, label in (("perplexity", "db_size.png", "perplexity"),
                                ("bpb", "db_size_bpb.png", "bits per byte")):
      series, hlines = {}, {}
      for r in rows:
        xs, ys = series.setdefault(r["model"], ([], []))
        xs.append(r["db_tokens"])
        ys.append(r[metric])
      for r in results["perplexity"]:
        if r["mode"] != "retrieval":
          hlines[f"{r['model']}, {r['mode']}"] = r[metric]
      paths.append(_plot_lines(series, os.path.join(output_dir, name),
                               xlabel="retrieval DB tokens", ylabel=label, logx=True,
                               title=f"{label} vs retrieval DB size", hlines=hlines))
  atomic_write_text(paths[1], "\n".join(lines) + "\n")
  return paths


# The entry point ---------------------------------------------------------------------------


@gin.configurable
def eval_analyses(*, output_dir: str, checkpoints: Mapping[str, str] = gin.REQUIRED,
                  retrieval_dir: str = gin.REQUIRED, split: str = "valid",
                  seq_len: int = gin.REQUIRED, batch_size: int = 16,
                  model_config: Optional[RetroConfig] = None,
                  mesh_shape: Optional[dict] = None,
                  analyses: Sequence[str] = ANALYSES,
                  num_neighbors: Sequence[int] = (0, 1, 2, 4),
                  overlap_edges: Sequence[float] = leakage.BUCKET_EDGES,
                  overlap_thresholds: Sequence[float] = leakage.THRESHOLDS,
                  db_fractions: Sequence[float] = (1 / 64, 1 / 16, 1 / 4, 1.0),
                  db_seed: int = 0, embedder: Any = None,
                  max_batches: Optional[int] = None) -> dict[str, Any]:
  """Runs RETRO's analyses (see the module docstring) and writes them under
  ``output_dir``; returns the results (what ``analyses.json`` holds).

  Args:
    checkpoints: display name -> checkpoint (MODEL_DIR or step directory); Retro ones
      get every analysis, GPT ones the perplexity and leakage rows.
    retrieval_dir, split, seq_len, batch_size: the examples, as ``eval_perplexity``.
    analyses: any of 'neighbors', 'leakage', 'db_size' (perplexity always runs).
    num_neighbors: the k of the neighbors analysis (0 = encoder ablated).
    overlap_edges, overlap_thresholds: leakage buckets and filters (fractions).
    db_fractions, db_seed: the nested DB subsets.
    embedder: embeds a held-out split's chunks for the DB-size search (default: the
      build's, from ``retrieval.json``); a name or an ``Embedder``.
    max_batches: score only the first batches (a quick look; None: every example).
  """
  unknown = [a for a in analyses if a not in ANALYSES]
  if unknown:
    raise ValueError(f"eval_analyses.analyses: unknown {unknown}; choose from {ANALYSES}")
  if any(k < 0 for k in num_neighbors):
    raise ValueError(f"eval_analyses.num_neighbors must be >= 0, got {list(num_neighbors)}")
  model_config = model_config or RetroConfig()
  layout = RetrievalLayout(retrieval_dir)
  os.makedirs(output_dir, exist_ok=True)
  m = model_config.chunk_length
  mesh = partitioning.make_mesh(mesh_shape)
  token_bytes = token_byte_lengths(layout.vocab_path, model_config.vocab_size)
  stored_k = formats.NeighborMap(layout.neighbor_map_path(split)).k
  model_k = min(model_config.num_neighbors, stored_k)
  base = split_source(layout, split, seq_len)            # every neighbor the map holds
  if base.chunk_length != m:
    raise ValueError(f"{retrieval_dir}: chunk size {base.chunk_length} differs from the "
                     f"model's RetroConfig.chunk_length={m}")
  full = source_batches(base, batch_size, max_batches)
  main, overlaps = with_overlaps([truncate_neighbors(b, model_k) for b in full], m,
                                 base.pad_id)
  main = ListSource(main)
  notes = [f"{len(full)} batches of {batch_size} x {seq_len} tokens; chunk length {m}; "
           f"the neighbor map holds k={stored_k}, the model reads k={model_k}"]
  if model_config.num_neighbors > stored_k:
    notes.append(f"the model's k={model_config.num_neighbors} is capped at the map's "
                 f"k={stored_k}")
  any_retro = any(map(ckpt_lib.has_retro_params, checkpoints.values()))
  evaluated = min(len(full) * batch_size, base.num_examples) * (seq_len // m)
  beyond = sorted({k for k in num_neighbors if k > stored_k})
  exact: Optional[list[dict]] = None      # batches with k_max exactly searched neighbors
  if "neighbors" in analyses and beyond and any_retro:
    if os.path.isdir(layout.embeddings_dir):
      k_max = beyond[-1]
      exact_map = exact_neighbor_maps(layout, split, output_dir, evaluated, (1.0,), k=k_max,
                                      subdir=f"neighbors_k{k_max}", embedder=embedder)
      exact = source_batches(split_source(layout, split, seq_len,
                                          neighbor_map=exact_map[0]["neighbor_map"]),
                             batch_size, max_batches)
      notes.append(f"k={beyond}: the neighbor map holds {stored_k} per chunk; the "
                   f"{evaluated} evaluated chunks' {k_max} neighbors recomputed by exact "
                   "search over the whole DB (as the DB-size curve's fraction 1)")
    else:
      notes.append(f"k={beyond} asked, capped at k={stored_k}: the retrieval directory's "
                   f"neighbor map holds {stored_k} per chunk, and without its stored "
                   "embeddings more cannot be searched")
  ks: dict[int, int] = {}                  # k used -> the first k asked for it
  for k in num_neighbors:
    ks.setdefault(k if exact is not None else min(k, stored_k), k)
  capped = [] if exact is not None else beyond
  db_maps = []
  if "db_size" in analyses and any_retro:
    db_maps = exact_neighbor_maps(layout, split, output_dir, evaluated, db_fractions,
                                  seed=db_seed, embedder=embedder)
    notes.append(f"DB subsets: {len(db_fractions)} nested fractions of "
                 f"{formats.ChunkDB(layout.retrieval_db_prefix).num_docs} documents "
                 f"(seed {db_seed}); neighbors of the {db_maps[0]['queries']} evaluated "
                 "chunks recomputed by exact search")
  classes = leakage.overlap_classes(overlap_edges, overlap_thresholds, m)
  counts = leakage.chunk_counts(overlaps, overlap_edges, overlap_thresholds)
  counts[leakage.CHUNK_ZERO] = int(len(overlaps))
  results: dict[str, Any] = dict(retrieval_dir=layout.root, split=split, notes=notes,
                                 perplexity=[], neighbors=[], leakage=[], db_size=[])
  # Every variant is scored with the same classes (one compiled step per neighbor shape).
  scored_classes = classes if "leakage" in analyses else None
  db_sources = [ListSource(with_overlaps([truncate_neighbors(b, model_k) for b in (
      source_batches(split_source(layout, split, seq_len, neighbor_map=d["neighbor_map"]),
                     batch_size, max_batches))], m, base.pad_id)[0]) for d in db_maps]
  db_same = [source.same_batches(main) for source in db_sources]
  for d, same in zip(db_maps, db_same):
    if same:
      notes.append(f"DB fraction {d['fraction']:.6g}: the recomputed neighbors equal the "
                   "stored map's; its scores are the retrieval rows'")
  for name, path in checkpoints.items():
    params, evaluators, has_retro = _load(model_config, path, mesh)
    score = _Scorer(evaluators, params, token_bytes)
    head = dict(model=name, checkpoint=path)
    by_mode = {}
    for retrieval in evaluators:
      rows = score(main, retrieval, scored_classes)
      by_mode[retrieval] = rows["all"]
      mode = _mode(has_retro, retrieval)
      results["perplexity"].append(dict(head, mode=mode, **rows["all"]))
      if "leakage" in analyses:
        results["leakage"] += [
            dict({"class": ALL_TARGETS if c == "all" else c}, chunks=counts.get(c, ""),
                 **head, mode=mode, **s) for c, s in rows.items() if c != "other"]
    if not has_retro:
      continue
    if "neighbors" in analyses:
      for used, asked in ks.items():
        if used == 0:
          row = by_mode[False]
        elif used == model_k:
          row = by_mode[True]
        else:
          batches = exact if used > stored_k else full
          row = score(ListSource(with_overlaps([truncate_neighbors(b, used) for b in batches],
                                               m, base.pad_id)[0]), True, scored_classes)["all"]
        note = (f"asked k={[k for k in capped if min(k, stored_k) == used]}, capped at "
                f"the map's k={stored_k}" if used == stored_k and capped else
                "exact search over the whole DB" if used > stored_k else "")
        results["neighbors"].append(dict(head, k=used, requested=asked, note=note, **row))
    for d, source, same in zip(db_maps, db_sources, db_same):
      row = by_mode[True] if same else score(source, True, scored_classes)["all"]
      results["db_size"].append(dict(head, **{k: v for k, v in d.items()
                                              if k != "neighbor_map"}, **row))
  order = [*classes, ALL_TARGETS]
  results["leakage"].sort(key=lambda r: order.index(r["class"]))
  paths = write_report(results, output_dir)
  logging.info("analyses of %s/%s written: %s", retrieval_dir, split, ", ".join(paths))
  return results
