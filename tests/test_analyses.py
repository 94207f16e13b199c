"""RETRO's analyses (retro_jax.evaluation.analyses) on a small retrieval directory of real
text (the Python documentation topics), each against a reference we did not write:
decoding for bytes, brute-force numpy search for the DB subsets, a brute-force longest
common substring for the overlap, the seqio batch source's k for the neighbor sweep."""

from __future__ import annotations

import json
import math
import os
import shutil

import faiss
from flax import linen as nn
from flax import traverse_util
import gin
import jax
import numpy as np
import pytest
from pydoc_data.topics import topics

from retro_jax import eval as eval_main
from retro_jax.data import sources as sources_lib
from retro_jax.data import vocab as vocab_lib
from retro_jax.data.batches import pretraining_batch_source
from retro_jax.evaluation import analyses, db_subsets, leakage
from retro_jax.evaluation.bits_per_byte import token_byte_lengths
from retro_jax.evaluation.perplexity import count_target_bytes, eval_batches
from retro_jax.models import RetroConfig, RetroLM, partitioning
from retro_jax.retrieval import formats
from retro_jax.retrieval.chunk_db import build_chunk_db
from retro_jax.retrieval.embedders import ChunkEmbedder
from retro_jax.retrieval.embeddings import build_embeddings
from retro_jax.retrieval.layout import RetrievalLayout
from retro_jax.retrieval.neighbors import build_neighbor_map
from retro_jax.training import checkpoints as ckpt_lib
from retro_jax.training.trainer import Evaluator
from retro_jax.utils import gin_utils

M, SEQ_LEN, BATCH, DIM = 16, 64, 8, 32
MODEL_BINDINGS = ["RetroConfig.vocab_size = 400", "RetroConfig.hidden_size = 32",
                  "RetroConfig.num_layers = 2", "RetroConfig.mlp_dim = 64",
                  "RetroConfig.max_length = 128", f"RetroConfig.chunk_length = {M}",
                  "RetroConfig.encoder_num_layers = 1"]


class BagEmbedder:
  """A deterministic text embedder: SentencePiece bag of tokens through a fixed
  projection, L2-normalised (stands in for MiniLM; the stages only need embed_texts)."""

  name = "bag-of-tokens"

  def __init__(self, vocab_path: str):
    self.sp = vocab_lib.load_sentencepiece(vocab_path)
    self.dim = DIM
    self.proj = np.random.default_rng(7).standard_normal(
        (self.sp.get_piece_size(), DIM)).astype(np.float32)

  def embed_texts(self, texts):
    counts = np.zeros((len(texts), self.sp.get_piece_size()), np.float32)
    for i, ids in enumerate(self.sp.encode(list(texts))):
      np.add.at(counts[i], ids, 1.0)
    out = counts @ self.proj
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-6)


def _documents():
  texts = [topics[k][:1500] for k in sorted(topics)]
  return texts[:24], texts[24:30], texts[30:46]     # train, valid, extra DB documents


def _write_jsonl(path, texts):
  with open(path, "w", encoding="utf-8") as f:
    for text in texts:
      f.write(json.dumps({"text": text}) + "\n")
  return path


@pytest.fixture(scope="module")
def retrieval_dir(tmp_path_factory):
  """The real stages: vocab, chunk DBs, stored embeddings, exact-IP neighbor maps."""
  root = str(tmp_path_factory.mktemp("analyses") / "retrieval")
  layout = RetrievalLayout(root)
  train_docs, valid_docs, extra_docs = _documents()
  os.makedirs(layout.vocab_dir)
  vocab_path = vocab_lib.train_sentencepiece(
      train_docs + valid_docs + extra_docs, os.path.join(layout.vocab_dir, "spm"),
      vocab_size=400, num_threads=1)
  corpus = os.path.join(root, "corpus")
  os.makedirs(corpus)
  build_chunk_db(_write_jsonl(os.path.join(corpus, "db.jsonl"), train_docs + extra_docs),
                 vocab_path, layout.retrieval_db_dir, retrieval_db=True, chunk_size=M,
                 progress=False)
  for split, texts in (("train", train_docs), ("valid", valid_docs)):
    build_chunk_db(_write_jsonl(os.path.join(corpus, f"{split}.jsonl"), texts), vocab_path,
                   layout.split_db_dir(split), retrieval_db=False, chunk_size=M,
                   progress=False)
  embedder = BagEmbedder(vocab_path)
  build_embeddings(layout.retrieval_db_prefix, vocab_path, layout.embeddings_dir,
                   embedder=embedder, dtype="float32", progress=False)
  # As the pipeline does for a split that is not a prefix of the DB.
  build_embeddings(layout.split_db_prefix("valid"), vocab_path,
                   layout.query_embeddings_dir("valid"), embedder=embedder,
                   dtype="float32", progress=False)
  vectors = formats.Embeddings(layout.embeddings_dir)[0:len(formats.Embeddings(
      layout.embeddings_dir))]
  index = faiss.IndexFlatIP(DIM)
  index.add(vectors)
  db = formats.ChunkDB(layout.retrieval_db_prefix)
  for split, exclude in (("train", True), ("valid", False)):
    build_neighbor_map(formats.ChunkDB(layout.split_db_prefix(split)), db,
                       ChunkEmbedder(embedder, vocab_path), index.search,
                       layout.neighbors_dir(split), k=2, exclude_same_document=exclude,
                       progress=False)
  ids = vocab_lib.special_ids(vocab_path)
  layout.write_config({"chunk_size": M, "num_neighbors": 2, "extra_neighbors": 8,
                       "metric": "ip", "embedder": embedder.name, "pad_id": ids.pad,
                       "eod_id": ids.eos})
  return layout, embedder


def _save_checkpoint(model_dir, config, retrieval, seed):
  """A checkpoint in the trainer's format (initial parameters: the analyses need
  checkpoints, not trained ones, to be checked against their references), with the CCA
  values and output scaled up so that the neighbors move the loss visibly."""
  params = nn.unbox(RetroLM(config, retrieval=retrieval).init_boxed(jax.random.PRNGKey(seed)))
  flat = traverse_util.flatten_dict(params)
  for key in flat:
    if "cca" in key and key[-2] in ("value", "out"):
      flat[key] = flat[key] * 30.0
  params = traverse_util.unflatten_dict(flat)
  saver = ckpt_lib.Checkpointer(model_dir, async_save=False)
  saver.save(1, params, {"count": np.zeros((), np.int32)}, ckpt_lib.config_meta(config))
  saver.close()
  return model_dir


@pytest.fixture(scope="module")
def run(retrieval_dir, tmp_path_factory):
  """GPT-fit and Retro checkpoints, then ``python -m retro_jax.eval``'s ``evaluate``
  with eval_analyses.gin and both the perplexity and analyses tasks."""
  layout, _ = retrieval_dir
  out = tmp_path_factory.mktemp("analyses_run")
  gin.clear_config()
  gin_utils.parse_gin(["tiny.gin"], MODEL_BINDINGS)
  config = RetroConfig()
  checkpoints = {"Retro": _save_checkpoint(str(out / "retro"), config, True, 1),
                 "GPT-fit": _save_checkpoint(str(out / "gptfit"), config, False, 2)}
  gin.clear_config()
  gin_utils.parse_gin(["eval_analyses.gin"], MODEL_BINDINGS + [
      f"OUTPUT_DIR = '{out / 'eval'}'", f"RETRIEVAL_DIR = '{layout.root}'",
      f"CHECKPOINTS = {checkpoints!r}", "SPLIT = 'train'", f"SEQ_LEN = {SEQ_LEN}",
      f"BATCH_SIZE = {BATCH}", "evaluate.tasks = ['analyses']",
      "eval_analyses.max_batches = 2", "eval_analyses.db_fractions = [0.125, 0.5, 1.0]"])
  results = eval_main.evaluate()
  gin.clear_config()
  return results, checkpoints, config, out / "eval", layout


# (a) bits per byte ------------------------------------------------------------------------


def _decoded_bytes(sp, ids) -> int:
  """Bytes by decoding, with the table's leading-space convention: decode drops the
  space of a first piece that starts with '▁'."""
  ids = [int(i) for i in ids if not sp.is_control(int(i))]
  if not ids:
    return 0
  lead = sp.id_to_piece(ids[0]).startswith("\u2581")
  return len(sp.decode(ids).encode("utf-8")) + int(lead)


def test_token_bytes_equal_decoded_bytes_on_real_text(retrieval_dir):
  layout, _ = retrieval_dir
  sp = vocab_lib.load_sentencepiece(layout.vocab_path)
  table = token_byte_lengths(layout.vocab_path)
  texts = [topics[k][2000:2600] for k in sorted(topics)[40:] if len(topics[k]) > 2600][:20]
  texts += ["naïve café — 日本語 ünïcödé ≥ 3 µs", " leading space", "tab\tand\nnewline"]
  for text in texts:
    ids = sp.encode(text)
    assert sp.id_to_piece(ids[0]).startswith("\u2581")     # the dummy prefix
    assert int(table[ids].sum()) == _decoded_bytes(sp, ids) == len(text.encode("utf-8")) + 1
  assert sp.is_byte(sp.piece_to_id("<0xE6>")) and table[sp.piece_to_id("<0xE6>")] == 1
  assert table[vocab_lib.EOS_ID] == 0 and table[vocab_lib.PAD_ID] == 0


def test_bpb_is_loss_times_tokens_over_decoded_bytes(run):
  results, _, _, _, layout = run
  sp = vocab_lib.load_sentencepiece(layout.vocab_path)
  source = pretraining_batch_source(layout.root, split="train", seq_len=SEQ_LEN,
                                    batch_size=BATCH, shuffle=False, num_epochs=1)
  nbytes = 0
  for i in range(2):                           # eval_analyses.max_batches = 2
    batch = source.get_batch(i)
    for targets, weights in zip(batch["decoder_target_tokens"], batch["decoder_loss_weights"]):
      nbytes += _decoded_bytes(sp, targets[weights > 0])
  rows = results["analyses"]["perplexity"]
  assert len(rows) == 3
  for row in rows:
    assert row["bytes"] == nbytes
    assert row["bpb"] == pytest.approx(row["loss"] * row["tokens"] / (nbytes * math.log(2)))
  # eval_perplexity's byte count (its seqio source, every example) decodes the same way.
  total = sum(_decoded_bytes(sp, t[w > 0]) for i in range(eval_batches(source))
              for t, w in zip(source.get_batch(i)["decoder_target_tokens"],
                              source.get_batch(i)["decoder_loss_weights"]))
  assert count_target_bytes(source, eval_batches(source), token_byte_lengths(
      layout.vocab_path))["all"] == total > nbytes


# (b) DB-size subsets -------------------------------------------------------------------------


@pytest.mark.parametrize("split", ["valid", "train"])
def test_db_subsets_are_nested_and_searched_exactly_for_the_evaluated_chunks(
    retrieval_dir, tmp_path, monkeypatch, split):
  layout, embedder = retrieval_dir
  db = formats.ChunkDB(layout.retrieval_db_prefix)
  query_db = formats.ChunkDB(layout.split_db_prefix(split))
  fractions = (0.1, 0.25, 0.5, 1.0)
  subsets = db_subsets.nested_document_subsets(db.num_docs, fractions, seed=3)
  for small, large in zip(subsets, subsets[1:]):
    assert set(small) < set(large)
  assert len(subsets[-1]) == db.num_docs
  assert not np.array_equal(subsets[0], np.arange(len(subsets[0])))    # permuted

  searched = []
  real_search = db_subsets.subset_neighbors
  monkeypatch.setattr(db_subsets, "subset_neighbors", lambda queries, *a, **kw: (
      searched.append(len(queries)), real_search(queries, *a, **kw))[1])
  evaluated = 12
  maps = analyses.exact_neighbor_maps(layout, split, str(tmp_path), evaluated, fractions,
                                      seed=3, embedder=embedder)
  assert searched == [evaluated] * len(fractions)

  vectors = np.load(formats.Embeddings(layout.embeddings_dir).shard_paths[0])
  queries = embedder.embed_texts([vocab_lib.chunk_text(
      vocab_lib.load_sentencepiece(layout.vocab_path), row, vocab_lib.PAD_ID,
      vocab_lib.EOS_ID) for row in query_db.get_chunks(np.arange(evaluated),
                                                       with_continuation=False)])
  same_doc = split == "train"             # the pipeline's exclusion for a DB-prefix split
  query_docs = query_db.doc_of_chunk(np.arange(evaluated))
  for info, docs in zip(maps, subsets):
    knn = formats.NeighborMap(info["neighbor_map"])
    assert knn.num_chunks == query_db.num_chunks and knn.k == 2
    assert np.all(knn[np.arange(evaluated, query_db.num_chunks)] == -1)
    ids = knn[np.arange(evaluated)]
    in_subset = np.isin(np.arange(db.num_chunks), np.concatenate(
        [np.arange(*db.doc_chunk_range(int(d))) for d in docs]))
    assert info["db_chunks"] == in_subset.sum() and info["db_docs"] == len(docs)
    assert info["db_tokens"] == db.sizes[docs].sum()
    for q in range(evaluated):              # brute force: every subset chunk scored
      allowed = in_subset & ((db.doc_of_chunk(np.arange(db.num_chunks)) != query_docs[q])
                             if same_doc else True)
      scores = np.where(allowed, vectors @ queries[q], -np.inf)
      best = np.sort(scores)[::-1][:2]
      assert np.all(ids[q] >= 0) and np.all(allowed[ids[q]])
      np.testing.assert_allclose(vectors[ids[q]] @ queries[q], best, rtol=1e-5, atol=1e-5)


def test_db_subsets_of_a_held_out_split_search_its_stored_query_embeddings(
    retrieval_dir, tmp_path, monkeypatch):
  layout, embedder = retrieval_dir
  embedded = analyses.exact_neighbor_maps(layout, "valid", str(tmp_path / "embedded"),
                                          12, (0.25, 1.0), embedder=embedder)
  monkeypatch.setattr(analyses, "load_embedder", lambda name: pytest.fail(
      f"embedded the query chunks again with {name}"))
  stored = analyses.exact_neighbor_maps(layout, "valid", str(tmp_path / "stored"), 12,
                                        (0.25, 1.0))
  for a, b in zip(embedded, stored):
    np.testing.assert_array_equal(formats.NeighborMap(a["neighbor_map"]).neighbors,
                                  formats.NeighborMap(b["neighbor_map"]).neighbors)
  # Fraction 1 with exact search: the stored map's rows for the evaluated chunks.
  np.testing.assert_array_equal(
      formats.NeighborMap(stored[-1]["neighbor_map"]).neighbors[:12],
      formats.NeighborMap(layout.neighbor_map_path("valid")).neighbors[:12])


def test_batch_lists_compare_by_content():
  rng = np.random.default_rng(0)
  batches = [{"a": rng.integers(0, 9, (2, 4)), "b": np.where(rng.random((2, 3)) > 0.5,
                                                              np.nan, 1.0)}
             for _ in range(2)]
  same = analyses.ListSource([{k: v.copy() for k, v in b.items()} for b in batches])
  assert analyses.ListSource(batches).same_batches(same)
  changed = [dict(b) for b in batches]
  changed[1] = dict(changed[1], a=changed[1]["a"] + (np.arange(8).reshape(2, 4) == 5))
  assert not analyses.ListSource(batches).same_batches(analyses.ListSource(changed))
  assert not analyses.ListSource(batches).same_batches(analyses.ListSource(batches[:1]))


# (c) overlap -----------------------------------------------------------------------------------


def _lcs(chunk, valid, neighbor):
  """Brute force: the longest run of consecutive valid chunk tokens in ``neighbor``."""
  best = 0
  for i in range(len(chunk)):
    for j in range(i + 1, len(chunk) + 1):
      if not all(valid[i:j]):
        break
      piece = list(chunk[i:j])
      if any(list(neighbor[s:s + len(piece)]) == piece
             for s in range(len(neighbor) - len(piece) + 1)):
        best = max(best, len(piece))
  return best


def _reference_overlaps(batch, m, pad_id):
  """Per target t: the sequence token t + 1 lies in chunk v = (t + 1) // m and is
  predicted from the neighbors retrieved for chunk v - 1 (the shifted CCA)."""
  targets, weights = batch["decoder_target_tokens"], batch["decoder_loss_weights"] > 0
  b, n = targets.shape
  out = np.full((b, n), np.nan)
  for row in range(b):
    for t in range(n):
      v = (t + 1) // m
      if v == 0 or v >= n // m:
        continue
      span = slice(v * m - 1, v * m + m - 1)
      chunk, valid = targets[row, span], weights[row, span]
      if not valid.any():
        continue
      best = 0
      for i in np.flatnonzero(batch["neighbor_mask"][row, v - 1]):
        neighbor = batch["neighbor_tokens"][row, v - 1, i]
        neighbor = np.where(neighbor == pad_id, -2, neighbor)
        best = max(best, _lcs(chunk, valid, neighbor))
      out[row, t] = best / valid.sum()
  return out


def _random_batch(rng, b=3, m=4, chunks=4, k=2, vocab=4):
  n = m * chunks
  targets = rng.integers(1, vocab, (b, n))
  weights = (rng.random((b, n)) > 0.15).astype(np.float32)
  neighbors = rng.integers(0, vocab, (b, chunks, k, 2 * m))
  for row in range(b):                     # some verbatim copies of the next chunk
    u = int(rng.integers(0, chunks - 1))
    neighbors[row, u, 0, 2:2 + m] = targets[row, (u + 1) * m - 1:(u + 2) * m - 1]
  return {"decoder_target_tokens": targets, "decoder_loss_weights": weights,
          "neighbor_tokens": neighbors, "neighbor_mask": rng.random((b, chunks, k)) > 0.2}


def test_overlap_equals_brute_force_longest_common_substring(retrieval_dir):
  layout, _ = retrieval_dir
  rng = np.random.default_rng(0)
  for _ in range(20):
    batch = _random_batch(rng)
    np.testing.assert_array_equal(leakage.target_overlaps(batch, 4, 0),
                                  _reference_overlaps(batch, 4, 0))
  source = sources_lib.PretrainSource.from_layout(layout, "valid", seq_len=SEQ_LEN)
  batch = analyses.source_batches(source, 4, max_batches=1)[0]
  got = leakage.target_overlaps(batch, M, source.pad_id)
  np.testing.assert_array_equal(got, _reference_overlaps(batch, M, source.pad_id))
  assert np.nanmax(got) > 0


def test_overlap_uses_the_previous_chunks_neighbors():
  """A neighbor of chunk 0 that holds chunk 1 verbatim: chunk 1 fully overlaps; the same
  text among chunk 1's own neighbors counts for nothing."""
  m, rng = 4, np.random.default_rng(1)
  targets = rng.permutation(np.arange(1, 13))[None]            # n = 12, 3 chunks
  chunk1 = targets[0, m - 1:2 * m - 1]
  neighbors = np.full((1, 3, 1, 2 * m), 0)
  batch = {"decoder_target_tokens": targets, "decoder_loss_weights": np.ones((1, 12)),
           "neighbor_tokens": neighbors.copy(), "neighbor_mask": np.ones((1, 3, 1), bool)}
  batch["neighbor_tokens"][0, 0, 0, m:] = chunk1
  assert leakage.chunk_overlaps(batch, m, pad_id=0)[0, 1] == 1.0
  batch["neighbor_tokens"] = neighbors.copy()
  batch["neighbor_tokens"][0, 1, 0, :m] = chunk1
  assert leakage.chunk_overlaps(batch, m, pad_id=0)[0, 1] == 0.0


# (d) neighbors at evaluation, (e) the gin entry point ------------------------------------------


def test_neighbor_sweep_scores_the_first_k_neighbors(run):
  results, checkpoints, config, _, layout = run
  rows = {r["k"]: r for r in results["analyses"]["neighbors"]}
  assert sorted(rows) == [0, 1, 2, 4]
  assert "exact search" in rows[4]["note"] and not rows[2]["note"]
  assert not any("capped" in note for note in results["analyses"]["notes"])
  by_mode = {r["mode"]: r for r in results["analyses"]["perplexity"]}
  assert rows[0]["loss"] == by_mode["encoder ablated"]["loss"]
  assert rows[2]["loss"] == by_mode["retrieval"]["loss"]
  # k = 1 against the seqio batch source reading the map's first column.
  mesh = partitioning.make_mesh(None)
  params, shardings, _ = ckpt_lib.load_model_params(checkpoints["Retro"], config, mesh)
  source = pretraining_batch_source(layout.root, split="train", seq_len=SEQ_LEN,
                                    batch_size=BATCH, shuffle=False, num_epochs=1,
                                    num_neighbors=1, name="k1")
  assert source.get_batch(0)["neighbor_tokens"].shape[2] == 1
  ref = Evaluator(config, mesh, shardings, retrieval=True).evaluate(params, source, 2)
  assert rows[1]["loss"] == pytest.approx(ref["loss"], rel=1e-6)
  assert abs(rows[1]["loss"] - rows[2]["loss"]) > 1e-4 < abs(rows[1]["loss"] - rows[0]["loss"])


def test_neighbors_beyond_the_stored_map_are_searched_exactly(run, retrieval_dir):
  """k = 4 from a map of k = 2: the evaluated chunks' 4 best DB chunks by brute force
  (same-document exclusion: the training split), scored as the other rows."""
  results, checkpoints, config, out, layout = run
  _, embedder = retrieval_dir
  path = out / "neighbors_k4" / "1" / "neighbors.knn"
  knn = formats.NeighborMap(str(path))
  query_db = formats.ChunkDB(layout.split_db_prefix("train"))
  db = formats.ChunkDB(layout.retrieval_db_prefix)
  evaluated = min(2 * BATCH, analyses.split_source(layout, "train", SEQ_LEN).num_examples
                  ) * (SEQ_LEN // M)
  assert knn.k == 4 and np.all(knn[np.arange(evaluated, query_db.num_chunks)] == -1)
  vectors = np.load(formats.Embeddings(layout.embeddings_dir).shard_paths[0])
  db_docs = db.doc_of_chunk(np.arange(db.num_chunks))
  query_docs = query_db.doc_of_chunk(np.arange(evaluated))
  ids = knn[np.arange(evaluated)]
  stored = formats.NeighborMap(layout.neighbor_map_path("train"))[np.arange(evaluated)]
  for q in range(evaluated):
    query = vectors[q]                     # the training split is the DB's first documents
    scores = np.where(db_docs != query_docs[q], vectors @ query, -np.inf)
    np.testing.assert_allclose(vectors[ids[q]] @ query, np.sort(scores)[::-1][:4],
                               rtol=1e-5, atol=1e-5)
    assert set(db_docs[ids[q]]).isdisjoint({query_docs[q]})
  np.testing.assert_array_equal(ids[:, :2], stored)          # both exact: the same first 2
  mesh = partitioning.make_mesh(None)
  params, shardings, _ = ckpt_lib.load_model_params(checkpoints["Retro"], config, mesh)
  source = analyses.ListSource(analyses.source_batches(analyses.split_source(
      layout, "train", SEQ_LEN, neighbor_map=str(path)), BATCH, 2))
  assert source.get_batch(0)["neighbor_tokens"].shape[2] == 4
  ref = Evaluator(config, mesh, shardings, retrieval=True).evaluate(params, source, 2)
  rows = {r["k"]: r for r in results["analyses"]["neighbors"]}
  assert rows[4]["loss"] == pytest.approx(ref["loss"], rel=1e-6)
  assert abs(rows[4]["loss"] - rows[2]["loss"]) > 1e-4


def test_without_stored_embeddings_k_is_capped_and_said(run, tmp_path):
  results, checkpoints, config, _, layout = run
  copy = tmp_path / "retrieval"
  shutil.copytree(layout.root, copy, ignore=shutil.ignore_patterns(
      os.path.basename(layout.embeddings_dir)))
  capped = analyses.eval_analyses(
      output_dir=str(tmp_path / "out"), checkpoints={"Retro": checkpoints["Retro"]},
      retrieval_dir=str(copy), split="train", seq_len=SEQ_LEN, batch_size=BATCH,
      model_config=config, analyses=["neighbors"], max_batches=2)
  rows = {r["k"]: r for r in capped["neighbors"]}
  assert sorted(rows) == [0, 1, 2] and "capped" in rows[2]["note"]
  assert any("without its stored embeddings" in note for note in capped["notes"])
  full = {r["k"]: r for r in results["analyses"]["neighbors"]}
  assert rows[2]["loss"] == pytest.approx(full[2]["loss"], rel=1e-6)


def test_eval_entry_point_runs_the_analyses_task(run):
  results, _, _, out, _ = run
  written = json.load(open(out / "analyses.json", encoding="utf-8"))
  assert written["split"] == "train"
  for name in ("analyses.md", "neighbors.png", "leakage.png", "db_size.png",
               "db_size_bpb.png"):
    assert os.path.getsize(out / name) > 0, name
  report = open(out / "analyses.md", encoding="utf-8").read()
  assert "## Leakage" in report and "## Retrieval DB size" in report
  # Leakage: the same chunks for every model and mode; filters nest; chunk 0 own row.
  lk = written["leakage"]
  runs = {(r["model"], r["mode"]) for r in lk}
  assert runs == {("Retro", "retrieval"), ("Retro", "encoder ablated"),
                  ("GPT-fit", "decoder only")}
  for (model, mode) in runs:
    row = {r["class"]: r for r in lk if (r["model"], r["mode"]) == (model, mode)}
    assert row[leakage.CHUNK_ZERO]["tokens"] == 2 * BATCH * (M - 1)
    assert (row["overlap < 12.5%"]["tokens"] <= row["overlap < 25.0%"]["tokens"]
            <= row["overlap < 50.0%"]["tokens"] <= row[leakage.ALL_CHUNKS]["tokens"])
    buckets = [r for c, r in row.items() if c.startswith("overlap [")]
    assert sum(r["tokens"] for r in buckets) == row[leakage.ALL_CHUNKS]["tokens"]
    assert sum(r["chunks"] for r in buckets) == row[leakage.ALL_CHUNKS]["chunks"]
    assert row[leakage.ALL_CHUNKS]["chunks"] == 2 * BATCH * (SEQ_LEN // M - 1)
  # DB-size rows: the Retro checkpoint only, one per fraction, a growing DB.
  assert written == json.loads(json.dumps(results["analyses"]))
  db = written["db_size"]
  assert [r["fraction"] for r in db] == [0.125, 0.5, 1.0]
  assert {r["model"] for r in db} == {"Retro"}
  assert db[0]["db_tokens"] < db[1]["db_tokens"] < db[2]["db_tokens"]
  assert all(math.isfinite(r["bpb"]) for r in db)
  # Fraction 1 (exact search, the whole DB) finds the stored map's neighbors: its row is
  # the retrieval row, not scored twice; the smaller DBs' rows are their own.
  retrieval = next(r for r in written["perplexity"]
                   if (r["model"], r["mode"]) == ("Retro", "retrieval"))
  assert db[2]["loss"] == retrieval["loss"] and db[2]["tokens"] == retrieval["tokens"]
  assert db[0]["loss"] != retrieval["loss"]
  assert any(note.startswith("DB fraction 1:") for note in written["notes"])
