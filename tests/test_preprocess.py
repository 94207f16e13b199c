"""``python -m retro_jax.preprocess`` end to end on real prose with the real MiniLM embedder:
every output opens with its reader, same-document exclusion holds, a run killed by a
signal mid-stage and re-run equals an uninterrupted run, shards equal one process, and
the Retriever loads the directory."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from retro_jax.data.prose import prose_documents
from retro_jax.retrieval import formats
from retro_jax.retrieval import search as search_lib
from retro_jax.retrieval.layout import RetrievalLayout

NUM_DOCS = 16
WORDS = 220                     # per document: ~4-5 chunks of 64 tokens


def _write_jsonl(path, docs):
  with open(path, "w", encoding="utf-8") as f:
    for title, text in docs:
      f.write(json.dumps({"title": title, "body": " ".join(text.split()[:WORDS])}) + "\n")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  root = tmp_path_factory.mktemp("corpus")
  docs = prose_documents(stdlib=False)
  _write_jsonl(root / "docs.jsonl", docs[:NUM_DOCS])
  _write_jsonl(root / "heldout.jsonl", docs[NUM_DOCS:NUM_DOCS + 3])
  _write_jsonl(root / "lm.jsonl", docs[NUM_DOCS + 3:NUM_DOCS + 5])
  return root


def _command(corpus, output_dir):
  return [sys.executable, "-m", "retro_jax.preprocess", f"--input={corpus / 'docs.jsonl'}",
          f"--output_dir={output_dir}", f"--split=valid={corpus / 'heldout.jsonl'}",
          f"--lm_split=lm={corpus / 'lm.jsonl'}",
          "--text_key=body", "--vocab_size=1000", "--noprogress",
          "--gin.preprocess.extra_neighbors=6", "--use_gpu=false"]


def _env():
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
  return env


@pytest.fixture(scope="module")
def uninterrupted(corpus, tmp_path_factory):
  out = tmp_path_factory.mktemp("uninterrupted")
  result = subprocess.run(_command(corpus, out), capture_output=True, text=True,
                          timeout=300, env=_env())
  assert result.returncode == 0, result.stderr[-3000:]
  assert "| train neighbors |" in result.stdout          # the final summary table
  return RetrievalLayout(out)


@pytest.fixture(scope="module")
def embedder():
  from retro_jax.retrieval.embedders import load_embedder
  return load_embedder()


def _files(layout):
  names = [os.path.relpath(p, layout.root) for p in (
      layout.vocab_path, *formats.chunk_db_paths(layout.retrieval_db_prefix),
      *formats.chunk_db_paths(layout.split_db_prefix("train")),
      *formats.chunk_db_paths(layout.split_db_prefix("valid")),
      layout.neighbor_map_path("train"), layout.neighbor_map_path("valid"))]
  out = {}
  for name in names:
    with open(os.path.join(layout.root, name), "rb") as f:
      out[name] = f.read()
  return out


@pytest.mark.slow
def test_every_output_opens_with_its_reader(uninterrupted):
  from retro_jax.retrieval.formats import Embeddings
  layout = uninterrupted
  config = layout.read_config()
  assert config["chunk_size"] == 64 and config["num_neighbors"] == 2
  assert config["extra_neighbors"] == 6                     # the gin binding reached it
  assert config["embedder"] == "all-MiniLM-L6-v2" and config["index_factory"] == "Flat"
  assert config["splits"]["train"]["exclude_same_document"] is True
  assert config["splits"]["valid"]["exclude_same_document"] is False
  assert layout.splits() == ["lm", "train", "valid"]
  # An --lm_split gets its query DB and no neighbor map (nothing retrieves for it).
  assert config["splits"]["lm"]["neighbors"] is False
  assert formats.ChunkDB(layout.split_db_prefix("lm")).num_docs == 2
  assert not os.path.exists(layout.neighbor_map_path("lm"))
  db = formats.ChunkDB(layout.retrieval_db_prefix)
  db.verify()
  assert db.is_retrieval_db and db.num_docs == NUM_DOCS and db.num_chunks >= 3 * NUM_DOCS
  for split in ("train", "valid"):
    query = formats.ChunkDB(layout.split_db_prefix(split))
    query.verify()
    assert not query.is_retrieval_db
    knn = formats.NeighborMap(layout.neighbor_map_path(split))
    assert knn.k == 2 and knn.num_chunks == query.num_chunks
    knn.validate_against(db, query_db=query)
    assert (knn.neighbors[:, 0] >= 0).mean() > 0.8
  assert formats.ChunkDB(layout.split_db_prefix("train")).num_chunks == db.num_chunks
  embeddings = Embeddings(layout.embeddings_dir)
  assert (embeddings.num_vectors, embeddings.dim) == (db.num_chunks, 384)
  # A split that is not the DB's prefix keeps its query embeddings; train reads the DB's.
  queries = Embeddings(layout.query_embeddings_dir("valid"))
  assert (queries.num_vectors, queries.dim) == (
      formats.ChunkDB(layout.split_db_prefix("valid")).num_chunks, 384)
  assert queries.dtype == embeddings.dtype
  assert not os.path.exists(layout.query_embeddings_dir("train"))
  searcher = search_lib.load_index(layout.index_path, expected_dim=384,
                                  expected_ntotal=db.num_chunks)
  assert searcher.ntotal == db.num_chunks


@pytest.mark.slow
def test_same_document_exclusion_and_exact_neighbors(uninterrupted, embedder):
  from retro_jax.retrieval.embedders import ChunkEmbedder
  from retro_jax.retrieval.formats import Embeddings
  layout = uninterrupted
  db = formats.ChunkDB(layout.retrieval_db_prefix)
  keys = Embeddings(layout.embeddings_dir)[:].astype(np.float32)
  db_docs = db.doc_of_chunk(np.arange(db.num_chunks))
  # train = the retrieval corpus: no neighbor from the query chunk's own document, and
  # the rows are the exact best of the other documents (the default index is Flat).
  train = formats.NeighborMap(layout.neighbor_map_path("train"))
  extra = layout.read_config()["extra_neighbors"]
  scores = keys @ keys.T
  for q in range(train.num_chunks):
    row = train[q]
    present = row[row >= 0]
    assert (db_docs[present] != db_docs[q]).all()
    candidates = np.argsort(-scores[q], kind="stable")[:2 + extra]
    survivors = candidates[db_docs[candidates] != db_docs[q]][:2]
    assert len(present) == len(survivors)              # -1 only when own chunks filled all
    np.testing.assert_allclose(scores[q, present], scores[q, survivors], atol=1e-5)
  own_best = [db_docs[np.argsort(-scores[q])[1]] == db_docs[q] for q in range(len(keys))]
  assert np.mean(own_best) > 0.3         # exclusion mattered: own-document chunks are close
  # valid (held-out documents): no exclusion, plain exact top-2 of its embedded chunks,
  # searched with the query embeddings the pipeline stored (the embedder's, rounded to
  # the DB embeddings' dtype).
  valid_db = formats.ChunkDB(layout.split_db_prefix("valid"))
  embedded = ChunkEmbedder(embedder, layout.vocab_path)(
      valid_db.get_chunks(np.arange(valid_db.num_chunks), with_continuation=False))
  queries = Embeddings(layout.query_embeddings_dir("valid"))[:].astype(np.float32)
  np.testing.assert_allclose(queries, embedded, atol=1e-3)
  valid = formats.NeighborMap(layout.neighbor_map_path("valid"))
  valid_scores = queries @ keys.T
  for q in range(valid.num_chunks):
    best = np.sort(valid_scores[q])[::-1][:2]
    np.testing.assert_allclose(valid_scores[q, valid[q]], best, atol=1e-5)


@pytest.mark.slow
def test_killed_midway_and_rerun_equals_uninterrupted(corpus, uninterrupted, tmp_path):
  out = tmp_path / "killed"
  process = subprocess.Popen(_command(corpus, out), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True, env=_env())
  seen = []
  try:
    for line in process.stderr:
      seen.append(line)
      if "preprocess: stage embeddings" in line:
        time.sleep(1.0)                               # into the stage's work
        process.send_signal(signal.SIGKILL)
        break
  finally:
    process.kill()
    process.wait(timeout=60)
  assert process.returncode == -signal.SIGKILL, "".join(seen[-20:])
  layout = RetrievalLayout(out)
  assert not os.path.exists(layout.config_path)         # it really stopped midway
  assert not os.path.exists(layout.index_path)
  result = subprocess.run(_command(corpus, out), capture_output=True, text=True,
                          timeout=300, env=_env())
  assert result.returncode == 0, result.stderr[-3000:]
  assert "skipped (done)" in result.stdout               # finished stages were not redone
  want, got = _files(uninterrupted), _files(layout)
  assert sorted(got) == sorted(want)
  for name in want:
    assert got[name] == want[name], f"{name} differs from the uninterrupted run"
  from retro_jax.retrieval.formats import Embeddings
  keys = Embeddings(uninterrupted.embeddings_dir)[:]
  np.testing.assert_array_equal(Embeddings(layout.embeddings_dir)[:], keys)
  np.testing.assert_array_equal(Embeddings(layout.query_embeddings_dir("valid"))[:],
                                Embeddings(uninterrupted.query_embeddings_dir("valid"))[:])
  a = search_lib.load_index(uninterrupted.index_path)(keys, 4)
  b = search_lib.load_index(layout.index_path)(keys, 4)
  np.testing.assert_array_equal(a[1], b[1])
  config = layout.read_config()
  assert config == uninterrupted.read_config()


@pytest.mark.slow
def test_sharded_run_equals_one_process(corpus, uninterrupted, embedder, tmp_path):
  from retro_jax.retrieval.pipeline import preprocess
  kwargs = dict(splits={"valid": str(corpus / "heldout.jsonl")}, text_key="body",
                vocab=uninterrupted.vocab_path, embedder=embedder, extra_neighbors=6,
                progress=False, use_gpu=False)
  one = preprocess(str(corpus / "docs.jsonl"), str(tmp_path / "one"), **kwargs)
  assert one["complete"]
  out = str(tmp_path / "sharded")
  rounds = 0
  done = [False, False]
  while not all(done):                  # two shards, interleaved, never waiting
    for shard in (1, 0):
      if not done[shard]:
        summary = preprocess(str(corpus / "docs.jsonl"), out, shard_id=shard, num_shards=2,
                             wait=False, **kwargs)
        done[shard] = summary["complete"]
    rounds += 1
    assert rounds < 10
  assert rounds > 1                     # shards did wait for each other
  want, got = _files(RetrievalLayout(tmp_path / "one")), _files(RetrievalLayout(out))
  for name in want:
    assert got[name] == want[name], f"{name}: 2 shards differ from 1"
  from retro_jax.retrieval.formats import Embeddings
  np.testing.assert_array_equal(
      Embeddings(RetrievalLayout(out).query_embeddings_dir("valid"))[:],
      Embeddings(RetrievalLayout(tmp_path / "one").query_embeddings_dir("valid"))[:])
  for name in ("retrieval_db/chunks.bin", "retrieval_db/chunks.idx"):
    assert got[name] == _files(uninterrupted)[name]


@pytest.mark.slow
def test_rerun_by_other_code_keeps_retrieval_json(corpus, uninterrupted, embedder, tmp_path,
                                                  monkeypatch):
  """retrieval.json records the code that wrote it; a re-run of a finished directory by
  other code leaves the file as it was (later steps key on its bytes), and a
  directory whose settings file is missing gets one naming the code that wrote it."""
  import shutil
  from retro_jax.retrieval.pipeline import preprocess
  from retro_jax.utils import provenance
  ours = provenance.code_version()
  assert uninterrupted.read_config()["code"] == ours     # the subprocess ran this tree
  out = tmp_path / "copy"
  shutil.copytree(uninterrupted.root, out)
  layout = RetrievalLayout(out)
  before = open(layout.config_path, "rb").read()
  other = dict(ours, git={"commit": "0" * 40, "dirty": False, "diff_sha256": None})
  monkeypatch.setattr(provenance, "code_version", lambda: other)
  kwargs = dict(splits={"valid": str(corpus / "heldout.jsonl")},
                lm_splits={"lm": str(corpus / "lm.jsonl")}, text_key="body",
                vocab_size=1000, embedder=embedder, extra_neighbors=6, progress=False,
                use_gpu=False)
  summary = preprocess(str(corpus / "docs.jsonl"), str(out), **kwargs)
  assert summary["complete"] and summary["code"] == ours
  assert open(layout.config_path, "rb").read() == before
  os.remove(layout.config_path)
  preprocess(str(corpus / "docs.jsonl"), str(out), **kwargs)
  rewritten = layout.read_config()
  assert rewritten["code"] == other
  assert {k: v for k, v in rewritten.items() if k != "code"} == {
      k: v for k, v in json.loads(before).items() if k != "code"}


@pytest.mark.slow
def test_retriever_from_layout_returns_the_db_rows(uninterrupted, embedder):
  from retro_jax.retrieval.embedders import ChunkEmbedder
  from retro_jax.retrieval.retriever import Retriever
  layout = uninterrupted
  retriever = Retriever.from_layout(layout.root, embedder=embedder)
  assert retriever.num_neighbors == 2
  db = formats.ChunkDB(layout.retrieval_db_prefix)
  ids = np.array([0, db.num_chunks // 2, db.num_chunks - 1])
  chunk_tokens = db.get_chunks(ids, with_continuation=False)
  tokens, mask, info = retriever(chunk_tokens, 0)
  assert tokens.shape == (3, 2, 128) and mask.all()
  for row, hits in enumerate(info):
    found = np.array([h["chunk_id"] for h in hits])
    np.testing.assert_array_equal(tokens[row], db.get_chunks(found, with_continuation=True))
    assert found[0] == ids[row]           # a DB chunk's own text finds that chunk first
    assert hits[0]["score"] > 0.99
    assert [h["doc_id"] for h in hits] == list(db.doc_of_chunk(found))
  texts = ChunkEmbedder(embedder, layout.vocab_path).texts(chunk_tokens[:1])
  assert info[0][0]["text"].split()[:5] == texts[0].split()[:5]
  with pytest.raises(ValueError, match="index dimension 384"):
    class Small:
      dim = 8
    Retriever.from_layout(layout.root, embedder=Small())


def test_help_explains_the_flags():
  result = subprocess.run([sys.executable, "-m", "retro_jax.preprocess", "--help"],
                          capture_output=True, text=True, timeout=120, env=_env())
  assert "Every offline retrieval stage in one command" in result.stdout
  for flag in ("--input", "--output_dir", "--train_input", "--split", "--vocab_size",
               "--factory", "--nprobe", "--shard_id", "--exclude_same_document"):
    assert flag in result.stdout, flag


def test_gin_files_bind_the_stages():
  import gin
  from retro_jax.retrieval.pipeline import preprocess
  from retro_jax.utils import gin_utils
  try:
    gin_utils.parse_gin(["preprocess/large_gpu.gin"], ["preprocess.num_neighbors = 4"])
    assert gin.query_parameter("preprocess.num_neighbors") == 4
    assert gin.query_parameter("preprocess.extra_neighbors") == 8      # included default
    assert gin.query_parameter("merge_index_shards.on_disk") is True
    assert callable(preprocess)
  finally:
    gin.clear_config()
