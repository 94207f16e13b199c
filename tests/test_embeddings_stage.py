"""Embedding stage: chunk DB -> .npy shards; equals direct embedding, resumes byte-identically."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import faiss
import numpy as np
import pytest

from retro_jax.data import vocab as vocab_lib
from retro_jax.data.prose import prose_chunks
from retro_jax.retrieval import formats
from retro_jax.retrieval.embedders import ChunkEmbedder, load_embedder
from retro_jax.retrieval.embeddings import build_embeddings
from retro_jax.retrieval.formats import EMBEDDINGS_SHARD_SUFFIX, Embeddings
from retro_jax.utils.stages import shard_name
from retro_jax.retrieval.layout import RetrievalLayout
from retro_jax.retrieval.neighbors import build_neighbor_map

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
M = 32                       # tokens per chunk (small, so the DB has many chunks)
SHARDS = 3
BLOCK = 8                    # chunks per embedding step: several blocks per shard


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """A retrieval DB of real prose (about 40 chunks) in a RetrievalLayout, its vocab."""
  layout = RetrievalLayout(tmp_path_factory.mktemp("retrieval"))
  texts = prose_chunks(60, 150)
  os.makedirs(layout.vocab_dir)
  vocab = vocab_lib.train_sentencepiece(texts, layout.vocab_path[:-len(".model")], 400,
                                        num_threads=1)
  sp = vocab_lib.load_sentencepiece(vocab)
  docs = [sp.encode(" ".join(texts[i:i + 3])) + [vocab_lib.EOS_ID] for i in range(0, 36, 3)]
  formats.write_chunk_db(layout.retrieval_db_prefix, docs, dtype=np.uint16, pad_id=0,
                         chunk_size=M, retrieval_db=True)
  # Few padded lengths: fewer compiles; a chunk of 32 SentencePiece tokens fits in 64.
  embedder = load_embedder(buckets=(64, 128))
  return layout, vocab, embedder


def _build(setup, output_dir, shard_ids=range(SHARDS), **kwargs):
  layout, vocab, embedder = setup
  kwargs = dict(dict(embedder=embedder, num_shards=SHARDS, block_size=BLOCK,
                     progress=False), **kwargs)
  return [build_embeddings(layout.retrieval_db_prefix, vocab, str(output_dir), shard_id=s,
                           **kwargs) for s in shard_ids]


@pytest.fixture(scope="module")
def uninterrupted(setup):
  layout = setup[0]
  results = _build(setup, layout.embeddings_dir)
  return layout.embeddings_dir, results


def _shard_bytes(directory):
  return {n: open(os.path.join(directory, n), "rb").read()
          for n in (shard_name(s, SHARDS, EMBEDDINGS_SHARD_SUFFIX) for s in range(SHARDS))}


def test_stage_equals_direct_embedding(setup, uninterrupted):
  layout, vocab, embedder = setup
  directory, results = uninterrupted
  db = formats.ChunkDB(layout.retrieval_db_prefix)
  assert db.num_chunks >= 30 and all(not r.skipped for r in results) and results[-1].complete
  vectors = Embeddings(directory)
  assert (vectors.num_vectors, vectors.dim, vectors.dtype) == (db.num_chunks, 384, np.float16)
  direct = ChunkEmbedder(embedder, vocab)(
      db.get_chunks(np.arange(db.num_chunks), with_continuation=False))
  everything = vectors.get(0, db.num_chunks)
  np.testing.assert_allclose(everything, direct, atol=2e-3)      # float16 storage
  assert [(r.start, r.end) for r in results] == [
      (s, e) for s, e in zip(vectors.shard_starts, vectors.shard_starts[1:] + [len(vectors)])]
  # Blocks across shard boundaries, slices and streaming agree with the whole.
  np.testing.assert_array_equal(vectors.get(5, 27), everything[5:27])
  np.testing.assert_array_equal(vectors[-7:], everything[-7:])
  blocks = list(vectors.iter_blocks(9, start=2))
  assert [s for s, _ in blocks] == list(range(2, db.num_chunks, 9))
  np.testing.assert_array_equal(np.concatenate([b for _, b in blocks]), everything[2:])
  with pytest.raises(IndexError, match="outside"):
    vectors.get(0, db.num_chunks + 1)
  # A re-run skips every shard.
  assert all(r.skipped for r in _build(setup, directory))


def test_float32_output_and_more_shards_than_needed(setup, tmp_path):
  layout, vocab, embedder = setup
  db = formats.ChunkDB(layout.retrieval_db_prefix)
  results = _build(setup, tmp_path / "f32", dtype="float32", block_size=64)
  vectors = Embeddings(str(tmp_path / "f32"))
  assert vectors.dtype == np.float32 and results[-1].complete
  shards = db.num_chunks + 2                          # the last shards are empty
  empty = _build(setup, tmp_path / "many", shard_ids=[shards - 1], num_shards=shards)[0]
  assert (empty.start, empty.end, empty.complete) == (db.num_chunks, db.num_chunks, False)
  assert np.load(empty.shard_path).shape == (0, 384)
  direct = ChunkEmbedder(embedder, vocab)(
      db.get_chunks(np.arange(db.num_chunks), with_continuation=False))
  np.testing.assert_allclose(vectors.get(0, len(vectors)), direct, atol=1e-5)


@pytest.mark.slow
def test_killed_and_failed_runs_resume_byte_identical(setup, uninterrupted, tmp_path):
  layout, vocab, embedder = setup
  out = tmp_path / "resumed"
  # Shard 0 from the command line (gin bindings reach the embedder's options).
  cli = subprocess.run(
      [sys.executable, "-m", "retro_jax.retrieval.embeddings",
       f"--gin.build_embeddings.db_prefix={layout.retrieval_db_prefix}",
       f"--gin.build_embeddings.vocab_path={vocab}",
       f"--gin.build_embeddings.output_dir={out}", "--gin.build_embeddings.shard_id=0",
       f"--gin.build_embeddings.num_shards={SHARDS}",
       f"--gin.build_embeddings.block_size={BLOCK}", "--gin.build_embeddings.progress=False",
       "--gin.load_embedder.buckets=(64, 128)"],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert cli.returncode == 0, cli.stderr[-3000:]
  assert json.loads(cli.stdout[cli.stdout.index("{"):])["complete"] is False
  # Shard 1 is killed (SIGKILL) in the middle of its second block.
  script = textwrap.dedent(f"""
      import os, signal
      from retro_jax.retrieval.embedders import load_embedder
      from retro_jax.retrieval.embeddings import build_embeddings
      real = load_embedder(buckets=(64, 128))
      class Killed:
        dim, name, fingerprint, calls = real.dim, real.name, real.fingerprint, 0
        def embed_texts(self, texts):
          self.calls += 1
          if self.calls == 2:
            os.kill(os.getpid(), signal.SIGKILL)
          return real.embed_texts(texts)
      build_embeddings({layout.retrieval_db_prefix!r}, {vocab!r}, {str(out)!r},
                       embedder=Killed(), shard_id=1, num_shards={SHARDS},
                       block_size={BLOCK}, progress=False)
      """)
  killed = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
  assert killed.returncode == -9, killed.stderr[-3000:]
  assert any(n.startswith(f".{shard_name(1, SHARDS, EMBEDDINGS_SHARD_SUFFIX)}.") for n in os.listdir(out))
  assert not os.path.exists(out / shard_name(1, SHARDS, EMBEDDINGS_SHARD_SUFFIX))
  # Shard 2 fails with an exception in its first block: nothing is left behind.

  class Failing:
    dim, name, fingerprint = embedder.dim, embedder.name, embedder.fingerprint

    def embed_texts(self, texts):
      raise RuntimeError("injected failure")

  with pytest.raises(RuntimeError, match="injected"):
    _build(setup, out, shard_ids=[2], embedder=Failing())
  assert not os.path.exists(out / shard_name(2, SHARDS, EMBEDDINGS_SHARD_SUFFIX))
  # The re-run skips shard 0, redoes 1 and 2, and matches the uninterrupted run.
  results = _build(setup, out)
  assert [r.skipped for r in results] == [True, False, False] and results[-1].complete
  assert _shard_bytes(out) == _shard_bytes(uninterrupted[0])
  assert not [n for n in os.listdir(out) if n.endswith(".tmp")]


def test_corrupt_or_mismatched_shards_are_clear_errors(setup, uninterrupted, tmp_path):
  source = uninterrupted[0]
  name = shard_name(1, SHARDS, EMBEDDINGS_SHARD_SUFFIX)

  def copy(tag):
    target = tmp_path / tag
    shutil.copytree(source, target)
    return target

  truncated = copy("truncated")
  data = (truncated / name).read_bytes()
  (truncated / name).write_bytes(data[:len(data) // 2])
  with pytest.raises(ValueError, match=f"{name}: not a readable .npy"):
    Embeddings(str(truncated))
  reshaped = copy("reshaped")
  np.save(reshaped / name, np.zeros((3, 384), np.float16))
  with pytest.raises(ValueError, match=rf"{name}: holds float16 \(3, 384\), the manifest "
                     r"expects float16 \(\d+, 384\)"):
    Embeddings(str(reshaped))
  retyped = copy("retyped")
  rows = np.load(source + "/" + name).shape[0]
  np.save(retyped / name, np.zeros((rows, 384), np.float32))
  with pytest.raises(ValueError, match=f"{name}: holds float32"):
    Embeddings(str(retyped))
  missing = copy("missing")
  os.remove(missing / name)
  with pytest.raises(FileNotFoundError, match=f"1 of 3 shards missing: {name}"):
    Embeddings(str(missing))
  with pytest.raises(FileNotFoundError, match="no embeddings build"):
    Embeddings(str(tmp_path / "nothing"))
  # Other settings in the same directory are refused, naming both.
  with pytest.raises(ValueError, match="float32"):
    _build(setup, copy("settings"), shard_ids=[0], dtype="float32")


def test_chunk_embedder_serves_the_neighbor_stage(setup, uninterrupted, tmp_path):
  """Embeddings -> exact index -> neighbor map with the same ChunkEmbedder: every chunk
  of the DB finds itself first (training DB = retrieval DB, no same-doc exclusion)."""
  layout, vocab, embedder = setup
  db = formats.ChunkDB(layout.retrieval_db_prefix)
  vectors = Embeddings(uninterrupted[0])
  index = faiss.IndexFlatIP(vectors.dim)
  for _, block in vectors.iter_blocks(16):
    index.add(block)
  query = tmp_path / "query"
  formats.write_chunk_db(query, [db.get_document(d)[:db.sizes[d]] for d in range(3)],
                         dtype=np.uint16, pad_id=0, chunk_size=M, retrieval_db=False)
  query_db = formats.ChunkDB(query)
  path = build_neighbor_map(query_db, db, ChunkEmbedder(embedder, vocab),
                            lambda q, k: index.search(q, k), str(tmp_path / "nn"), k=2,
                            exclude_same_document=False, progress=False)
  ids = np.asarray(formats.NeighborMap(path).neighbors)          # [query chunks, 2]
  as_text = ChunkEmbedder(embedder, vocab).texts
  found = as_text(db.get_chunks(ids[:, 0], with_continuation=False))
  want = as_text(query_db.get_chunks(np.arange(query_db.num_chunks), with_continuation=False))
  assert ids.shape == (query_db.num_chunks, 2) and found == want
