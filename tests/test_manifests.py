"""Manifests key inputs by content, not by path (issue 17, items 2 and 3)."""

import json
import os
import shutil

import pytest

from retro_jax.data import vocab as vocab_lib
from retro_jax.retrieval import chunk_db
from retro_jax.retrieval import formats
from retro_jax.utils import io

TEXTS = [
    "The lighthouse keeper climbed the spiral stairs every evening at dusk.",
    "Bread dough needs time more than it needs effort; leave it overnight.",
    "Glaciers move because ice deforms under its own weight near the bed.",
    "The committee met on Tuesday to discuss the budget for the library wing.",
]


def write_corpus(path, n, tag):
  with open(path, "w", encoding="utf-8") as f:
    for i in range(n):
      f.write(json.dumps({"text": f"{tag} {i}: {TEXTS[i % len(TEXTS)]}"}) + "\n")


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
  path = tmp_path_factory.mktemp("vocab")
  return vocab_lib.train_sentencepiece(TEXTS * 5, str(path / "spm"), 300, num_threads=1)


def build(corpus, out, spm_model):
  return chunk_db.build_chunk_db(str(corpus), spm_model, str(out), retrieval_db=True,
                                 chunk_size=8, progress=False)


def db_tokens(out):
  with formats.ChunkDB(chunk_db.chunk_db_prefix(str(out))) as db:
    return db.num_docs, db.get_chunks(list(range(db.num_chunks))).tolist()


def test_file_fingerprint_rule(tmp_path, monkeypatch):
  a, b = tmp_path / "a.txt", tmp_path / "b.txt"
  a.write_bytes(b"hello world")
  b.write_bytes(b"hello world")
  assert io.file_fingerprint(a) == io.file_fingerprint(b)        # content, not name
  os.utime(b, ns=(1, 1))
  assert io.file_fingerprint(a) == io.file_fingerprint(b)        # small: full hash
  b.write_bytes(b"hello worle")
  assert io.file_fingerprint(a) != io.file_fingerprint(b)
  monkeypatch.setattr(io, "FULL_HASH_BYTES", 4)
  monkeypatch.setattr(io, "SAMPLE_BYTES", 2)
  big = io.file_fingerprint(a)
  assert big.startswith("sampled:11:")
  os.utime(a, ns=(5, 5))
  assert io.file_fingerprint(a) != big                           # large: mtime counts


def test_in_place_edit_reruns_the_chunk_db(tmp_path, spm_model):
  corpus, out = tmp_path / "docs.jsonl", tmp_path / "db"
  write_corpus(corpus, 30, "old")
  assert not build(corpus, out, spm_model).skipped
  before = db_tokens(out)
  assert before[0] == 30
  # Unchanged input: skipped.
  assert build(corpus, out, spm_model).skipped
  # Same path, 30 -> 20 documents, every text changed: re-run, new text in the DB.
  write_corpus(corpus, 20, "new")
  result = build(corpus, out, spm_model)
  assert not result.skipped and result.merged_prefix
  after = db_tokens(out)
  assert after[0] == 20 and after != before
  fresh = tmp_path / "fresh"
  build(corpus, fresh, spm_model)
  assert db_tokens(fresh) == after
  assert build(corpus, out, spm_model).skipped
  # Other settings are still refused.
  with pytest.raises(ValueError, match="made with settings"):
    chunk_db.build_chunk_db(str(corpus), spm_model, str(out), retrieval_db=True,
                            chunk_size=16, progress=False)


def test_copied_output_dir_is_accepted(tmp_path, spm_model):
  corpus, out = tmp_path / "docs.jsonl", tmp_path / "db"
  write_corpus(corpus, 12, "doc")
  build(corpus, out, spm_model)
  copy = tmp_path / "elsewhere" / "db"
  shutil.copytree(out, copy)
  shutil.rmtree(out)
  assert build(corpus, copy, spm_model).skipped
  assert db_tokens(copy)[0] == 12


def test_absolute_and_relative_input_are_the_same(tmp_path, spm_model, monkeypatch):
  corpus, out = tmp_path / "docs.jsonl", tmp_path / "db"
  write_corpus(corpus, 12, "doc")
  build(os.path.abspath(corpus), out, spm_model)
  monkeypatch.chdir(tmp_path)
  assert build("docs.jsonl", out, spm_model).skipped
  assert build("./docs.jsonl", "db", spm_model).skipped
  with open(out / "manifest.json", encoding="utf-8") as f:
    recorded = json.dumps(json.load(f))
  assert str(tmp_path) not in recorded          # no absolute path in the manifest


def test_input_change_resets_only_that_manifest(tmp_path):
  io.Manifest(tmp_path, {"input": "a", "k": 1}, ["input"]).mark_done("u", [])
  assert io.Manifest(tmp_path, {"input": "a", "k": 1}, ["input"]).is_done("u")
  changed = io.Manifest(tmp_path, {"input": "b", "k": 1}, ["input"])
  assert not changed.is_done("u") and changed.inputs_changed == ["input"]
  changed.mark_done("v", [])                    # drops the old inputs' units
  reopened = io.Manifest(tmp_path, {"input": "b", "k": 1}, ["input"])
  assert reopened.done_units == ["v"]
  with pytest.raises(ValueError, match="made with settings"):
    io.Manifest(tmp_path, {"input": "b", "k": 2}, ["input"])
