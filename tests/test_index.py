"""Faiss index stage: recall on real MiniLM embeddings, shards + merge, validation, resume."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from retro_jax.data.prose import real_embeddings
from retro_jax.retrieval import index
from retro_jax.retrieval import search
from retro_jax.utils import stages

N_REAL = 3000                     # real chunks (~90% DB, 10% held-out queries)
# Embedding 3000 chunks with MiniLM takes a minute or more on 2 CPU cores, so the
# vectors are cached, keyed by the texts, the checkpoint and the embedder's code.
CACHE = os.environ.get("RETRO_JAX_TEST_CACHE", os.path.join(
    os.path.expanduser("~"), ".cache", "retro_jax", "tests"))


@pytest.fixture(scope="session")
def real():
  """MiniLM (Flax) embeddings of real English prose chunks: (vectors [n, 384], docs [n])."""
  from retro_jax.retrieval.embedders import load_embedder
  vectors, docs = real_embeddings(load_embedder(), max_chunks=N_REAL, cache_dir=CACHE,
                                  progress=False)
  assert vectors.shape == (N_REAL, 384)
  np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
  return vectors, docs


def _db_and_queries(vectors):
  held_out = np.arange(len(vectors)) % 10 == 0     # queries are never DB vectors
  return vectors[~held_out], vectors[held_out]


@pytest.mark.slow
def test_default_ivf_index_recall_against_exact_search(real, tmp_path):
  db, queries = _db_and_queries(real[0])
  # The tier the default rule picks for a mid-size DB (10k..1M), forced at this N.
  factory = index.default_factory(len(db), db.shape[1], exact_below=0)
  nlist = index.ivf_num_centroids(factory)
  assert factory == f"IVF{nlist},SQ8" and nlist >= 32
  built = index.build_index(db, str(tmp_path), factory=factory, progress=False)
  searcher = search.load_index(built.index_path)
  assert searcher.nprobe == search.default_nprobe(nlist) and searcher.nprobe < nlist
  _, approx = searcher(queries, 10)
  _, exact = search.exact_search(db, queries, 10)
  assert search.recall_at_k(approx, exact, 2) >= 0.9
  assert search.recall_at_k(approx, exact, 10) >= 0.9
  # The path is approximate: visiting one list loses many true neighbors.
  _, one_list = search.load_index(built.index_path, nprobe=1)(queries, 10)
  assert search.recall_at_k(one_list, exact, 2) < 0.85


@pytest.mark.parametrize("factory,on_disk", [
    ("IVF32,SQ8", False),
    ("IVF32,SQ8", True),
    ("Flat", False),
    ("PCA32,IVF16_HNSW32,PQ8x4", False),        # pre-transform + HNSW quantizer + PQ
])
@pytest.mark.slow
def test_sharded_build_equals_one_shot_add(real, tmp_path, factory, on_disk):
  db, queries = _db_and_queries(real[0])
  one = index.build_index(db, str(tmp_path / "one"), factory=factory, progress=False)
  out = tmp_path / "sharded"
  for shard in (2, 0, 1):                        # any order: the last one merges
    result = index.build_index(db, str(out), factory=factory, shard_id=shard, num_shards=3,
                               on_disk=on_disk, batch_size=300, progress=False)
  assert result.index_path == str(out / index.INDEX_NAME)
  assert os.path.exists(out / search.IVFDATA_NAME) == on_disk
  if on_disk:                                    # relocatable: lists found beside it
    shutil.move(str(out), str(tmp_path / "moved"))
    out = tmp_path / "moved"
  want = search.load_index(one.index_path)(queries, 10)
  got = search.load_index(str(out / index.INDEX_NAME))(queries, 10)
  np.testing.assert_array_equal(got[1], want[1])
  np.testing.assert_array_equal(got[0], want[0])
  assert got[1].min() >= 0 and got[1].max() < len(db)


@pytest.mark.slow
def test_killed_shard_resumes_to_the_same_index(real, tmp_path, monkeypatch):
  db, queries = _db_and_queries(real[0])
  factory = "IVF32,SQ8"
  one = index.build_index(db, str(tmp_path / "one"), factory=factory, progress=False)
  out = str(tmp_path / "sharded")
  index.build_index(db, out, factory=factory, shard_id=0, num_shards=2, progress=False)
  calls = {"n": 0}
  real_read = search.VectorSource.read

  def dying_read(self, start, stop):
    calls["n"] += 1
    if calls["n"] == 3:
      raise KeyboardInterrupt("killed")
    return real_read(self, start, stop)

  monkeypatch.setattr(search.VectorSource, "read", dying_read)
  with pytest.raises(KeyboardInterrupt):
    index.build_index(db, out, factory=factory, shard_id=1, num_shards=2, batch_size=200,
                      progress=False)
  monkeypatch.setattr(search.VectorSource, "read", real_read)
  assert not os.path.exists(os.path.join(out, stages.shard_name(1, 2, index.SHARD_SUFFIX)))
  assert not os.path.exists(os.path.join(out, index.INDEX_NAME))
  stale = os.path.join(out, f".{stages.shard_name(1, 2, index.SHARD_SUFFIX)}.x1y2.tmp")   # as SIGKILL leaves
  open(stale, "wb").close()
  result = index.build_index(db, out, factory=factory, shard_id=1, num_shards=2,
                             progress=False)
  assert not os.path.exists(stale)
  again = index.build_index(db, out, factory=factory, shard_id=0, num_shards=2,
                            progress=False)
  assert again.skipped and again.index_path == result.index_path
  np.testing.assert_array_equal(search.load_index(result.index_path)(queries, 5)[1],
                                search.load_index(one.index_path)(queries, 5)[1])
  with open(os.path.join(out, "manifest.json"), encoding="utf-8") as f:
    assert "merged" in json.load(f)["done"]


def test_default_factory_follows_the_faiss_guidelines():
  assert index.default_factory(5_000, 384) == "Flat"
  assert index.default_factory(100_000, 384) == "IVF1024,SQ8"           # ~4 sqrt(N)
  assert index.default_factory(1_000_000, 384) == "IVF4096,PQ192x4fs"
  assert index.default_factory(50_000_000, 384) == "OPQ64_256,IVF262144_HNSW32,PQ64"
  for n in (20_000, 300_000, 5_000_000):
    k = index.ivf_num_centroids(index.default_factory(n, 768))
    assert 2 * np.sqrt(n) <= k <= 16 * np.sqrt(n)
    assert index.default_train_size(index.default_factory(n, 768), n) >= 39 * k
  # A small training sample caps K (>= 39 vectors per centroid).
  assert index.default_factory(20_000, 384, train_size=1_000) == "IVF16,SQ8"


def test_too_few_training_vectors_is_a_clear_error(tmp_path):
  x = np.random.default_rng(0).standard_normal((200, 16)).astype(np.float32)
  with pytest.raises(ValueError, match="256 IVF centroids but only 200 training vectors"):
    index.build_index(x, str(tmp_path / "a"), factory="IVF256,Flat", progress=False)
  with pytest.raises(ValueError, match="cannot merge shards"):
    index.build_index(x, str(tmp_path / "b"), factory="HNSW16,Flat", num_shards=2,
                      progress=False)
  built = index.build_index(x, str(tmp_path / "c"), progress=False)   # default adapts
  assert built.factory == "Flat"


@pytest.mark.slow
def test_open_time_validation_names_the_file(real, tmp_path):
  db = real[0][:500]
  built = index.build_index(db, str(tmp_path / "ok"), factory="IVF8,Flat", on_disk=True,
                            progress=False)
  path = built.index_path
  with pytest.raises(ValueError, match=r"index\.faissindex: index dimension 384, but .* 128"):
    search.load_index(path, expected_dim=128)
  with pytest.raises(ValueError, match=r"holds 500 vectors, but .* has 499 chunks"):
    search.load_index(path, expected_ntotal=499)
  with pytest.raises(ValueError, match="500 vectors, but the retrieval DB has 501"):
    index.build_index(db, str(tmp_path / "other"), expected_num_vectors=501, progress=False)
  with pytest.raises(ValueError, match="queries: expected"):
    search.load_index(path)(np.zeros((2, 7), np.float32), 1)
  bad = tmp_path / "bad.faissindex"
  bad.write_bytes(b"not an index at all")
  with pytest.raises(ValueError, match="bad.faissindex: not a readable Faiss index"):
    search.load_index(str(bad))
  with pytest.raises(FileNotFoundError, match="missing.faissindex"):
    search.load_index(str(tmp_path / "missing.faissindex"))
  os.remove(os.path.join(os.path.dirname(path), search.IVFDATA_NAME))
  with pytest.raises(ValueError, match="on-disk inverted lists .*index.ivfdata"):
    search.load_index(path)


@pytest.mark.slow
def test_embeddings_directory_source_and_command_line(real, tmp_path):
  """The index reads the embedding stage's sharded .npy files (and a .npy file) by path;
  the command line and gin bindings reach build_index."""
  from retro_jax.data.vocab import train_sentencepiece
  from retro_jax.retrieval import formats
  from retro_jax.retrieval.embeddings import build_embeddings

  vectors = real[0][:600]

  class TableEmbedder:           # chunk text "t<i>" -> real vector i (no model needed)
    dim, name = 384, "table"

    def embed_texts(self, texts):
      return vectors[[int(t.strip()[1:]) for t in texts]]

  vocab = train_sentencepiece([" ".join(f"t{i}" for i in range(600))] * 5,
                              str(tmp_path / "spm"), 300)
  import sentencepiece as spm
  sp = spm.SentencePieceProcessor(model_file=vocab)
  # One chunk per document, so chunk i is "t<i>" (m = 8 tokens is enough).
  docs = [sp.encode(f"t{i}") for i in range(600)]
  assert max(len(d) for d in docs) < 8
  formats.write_chunk_db(tmp_path / "db", [d + [1] for d in docs], dtype=np.uint16,
                         pad_id=0, chunk_size=8, retrieval_db=True)
  emb_dir = str(tmp_path / "embeddings")
  for s in range(2):
    build_embeddings(str(tmp_path / "db"), vocab, emb_dir, embedder=TableEmbedder(),
                     shard_id=s, num_shards=2, dtype="float32", progress=False)
  from_dir = index.build_index(emb_dir, str(tmp_path / "a"), factory="IVF8,Flat",
                               train_size=400, progress=False)
  from_array = index.build_index(vectors, str(tmp_path / "b"), factory="IVF8,Flat",
                                 train_size=400, progress=False)
  queries = real[0][600:700]
  np.testing.assert_array_equal(search.load_index(from_dir.index_path)(queries, 5)[1],
                                search.load_index(from_array.index_path)(queries, 5)[1])
  np.save(tmp_path / "vectors.npy", vectors)
  out = subprocess.run(
      [sys.executable, "-m", "retro_jax.retrieval.index",
       f"--gin.build_index.embeddings={tmp_path / 'vectors.npy'}",
       f"--gin.build_index.output_dir={tmp_path / 'cli'}",
       "--gin.build_index.factory='IVF8,Flat'", "--gin.build_index.train_size=400",
       "--gin.build_index.use_gpu=False"],
      capture_output=True, text=True, timeout=120, check=True,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  result = json.loads(out.stdout[out.stdout.index("{"):])
  assert result["factory"] == "IVF8,Flat" and result["num_vectors"] == 600
  with open(tmp_path / "cli" / "manifest.json", encoding="utf-8") as f:
    assert json.load(f)["settings"]["train_size"] == 400
  np.testing.assert_array_equal(search.load_index(result["index_path"])(queries, 5)[1],
                                search.load_index(from_array.index_path)(queries, 5)[1])


@pytest.mark.slow
def test_fast_scan_tier_reranks_with_the_stored_vectors(real, tmp_path):
  """The 1M..10M tier (fast-scan PQ + exact re-ranking from the embeddings), forced here."""
  db, queries = _db_and_queries(real[0])
  factory = index.default_factory(len(db), db.shape[1], exact_below=0, fast_scan_from=0)
  assert factory.endswith(",PQ192x4fs")
  built = index.build_index(db, str(tmp_path), factory=factory, progress=False)
  with pytest.raises(ValueError, match="pass refine="):
    search.load_index(built.index_path)
  np.save(tmp_path / "db.npy", db.astype(np.float16))           # as the embedding stage
  searcher = search.load_index(built.index_path, refine=str(tmp_path / "db.npy"))
  assert searcher.k_factor == search.DEFAULT_K_FACTOR
  scores, approx = searcher(queries, 10)
  exact_scores, exact = search.exact_search(db, queries, 10)
  assert search.recall_at_k(approx, exact, 2) >= 0.9
  codes_only = search.load_index(built.index_path, refine=False)(queries, 10)[1]
  assert search.recall_at_k(codes_only, exact, 2) < search.recall_at_k(approx, exact, 2)
  hit = approx[:, 0] == exact[:, 0]                              # re-ranked scores are exact
  np.testing.assert_allclose(scores[hit, 0], exact_scores[hit, 0], atol=2e-3)
