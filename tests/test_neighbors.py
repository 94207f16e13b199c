"""Neighbor-map stage: exact top-k with same-document exclusion, -1 padding, resume."""

import os

import faiss
import numpy as np
import pytest

from retro_jax.retrieval import formats
from retro_jax.retrieval.neighbors import build_neighbor_map, select_neighbors

M = 4
VOCAB = 50


def _docs(seed, count):
  rng = np.random.default_rng(seed)
  return [rng.integers(2, VOCAB, rng.integers(3, 15)).astype(np.int32) for _ in range(count)]


@pytest.fixture
def dbs(tmp_path):
  train_docs = _docs(0, 12)
  extra_docs = _docs(1, 6)
  formats.write_chunk_db(tmp_path / "train", train_docs, dtype=np.uint16, pad_id=0,
                         chunk_size=M, retrieval_db=False)
  formats.write_chunk_db(tmp_path / "db", train_docs + extra_docs, dtype=np.uint16,
                         pad_id=0, chunk_size=M, retrieval_db=True)
  return formats.ChunkDB(tmp_path / "train"), formats.ChunkDB(tmp_path / "db")


def embed_chunks(tokens):
  """Bag-of-tokens through a fixed random projection, normalised (deterministic)."""
  counts = np.zeros((len(tokens), VOCAB), np.float32)
  for i, row in enumerate(tokens):
    for t in row:
      if t:
        counts[i, t] += 1
  proj = np.random.default_rng(42).standard_normal((VOCAB, 16)).astype(np.float32)
  out = counts @ proj
  return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-6)


def _index(db):
  index = faiss.IndexFlatIP(16)
  index.add(embed_chunks(db.get_chunks(np.arange(db.num_chunks), with_continuation=False)))
  return lambda queries, count: index.search(queries, count)


def test_select_neighbors_excludes_and_pads():
  candidates = np.array([[5, 6, 7, -1], [1, 2, -1, -1]])
  docs = np.array([[0, 1, 1, -1], [3, 3, -1, -1]])
  out = select_neighbors(candidates, docs, np.array([1, 3]), k=2)
  np.testing.assert_array_equal(out, [[5, -1], [-1, -1]])
  np.testing.assert_array_equal(select_neighbors(candidates, docs, None, 3), [[5, 6, 7], [1, 2, -1]])


def test_neighbor_map_matches_exact_search_without_own_document(dbs, tmp_path):
  train, db = dbs
  path = build_neighbor_map(train, db, embed_chunks, _index(db), str(tmp_path / "nn"), k=2,
                            extra=db.num_chunks, progress=False)
  knn = formats.NeighborMap(path)
  assert knn.k == 2 and knn.num_chunks == train.num_chunks and knn.chunk_start_id == 0
  knn.validate_against(db, query_db=train)
  queries = embed_chunks(train.get_chunks(np.arange(train.num_chunks), with_continuation=False))
  keys = embed_chunks(db.get_chunks(np.arange(db.num_chunks), with_continuation=False))
  scores = queries @ keys.T
  db_docs = db.doc_of_chunk(np.arange(db.num_chunks))
  for q in range(train.num_chunks):
    own = train.doc_of_chunk(q)
    allowed = np.where(db_docs != own)[0]
    best = allowed[np.argsort(-scores[q, allowed], kind="stable")[:2]]
    row = knn[q]
    assert (db.doc_of_chunk(row) != own).all()
    np.testing.assert_allclose(scores[q, row], scores[q, best], rtol=1e-5)


def test_shards_and_resume_after_a_crash_equal_one_run(dbs, tmp_path):
  train, db = dbs
  search = _index(db)
  one = build_neighbor_map(train, db, embed_chunks, search, str(tmp_path / "one"),
                           progress=False)
  calls = {"n": 0}

  def crashing_embed(tokens):
    calls["n"] += 1
    if calls["n"] == 2:
      raise RuntimeError("killed")
    return embed_chunks(tokens)

  out = str(tmp_path / "sharded")
  assert build_neighbor_map(train, db, embed_chunks, search, out, shard_id=0, num_shards=2,
                            block_size=3, progress=False) is None
  with pytest.raises(RuntimeError):
    build_neighbor_map(train, db, crashing_embed, search, out, shard_id=1, num_shards=2,
                       block_size=3, progress=False)
  assert not os.path.exists(os.path.join(out, "shard_00001_of_00002.knn"))
  merged = build_neighbor_map(train, db, embed_chunks, search, out, shard_id=1, num_shards=2,
                              block_size=3, progress=False)
  np.testing.assert_array_equal(formats.NeighborMap(merged)[0:train.num_chunks],
                                formats.NeighborMap(one)[0:train.num_chunks])
  with open(merged, "rb") as a, open(one, "rb") as b:
    assert a.read() == b.read()


def test_misaligned_documents_and_training_db_are_rejected(tmp_path, dbs):
  train, db = dbs
  formats.write_chunk_db(tmp_path / "other", _docs(7, 18), dtype=np.uint16, pad_id=0,
                         chunk_size=M, retrieval_db=True)
  other = formats.ChunkDB(tmp_path / "other")
  with pytest.raises(ValueError, match="document 0 of .* differs"):
    build_neighbor_map(train, other, embed_chunks, _index(other), str(tmp_path / "x"),
                       progress=False)
  with pytest.raises(ValueError, match="is a training DB"):
    build_neighbor_map(train, train, embed_chunks, _index(db), str(tmp_path / "y"),
                       progress=False)
