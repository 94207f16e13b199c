"""Chunk DB build stage and the SentencePiece vocabulary, on small real text."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from retro_jax.data import vocab as vocab_lib
from retro_jax.retrieval import chunk_db
from retro_jax.retrieval import formats

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PARAGRAPHS = [
    "The lighthouse keeper climbed the spiral stairs every evening at dusk. He wound "
    "the clockwork that turned the great lens, trimmed the wick, and wrote the state "
    "of the sea in a leather logbook that his grandfather had started.",
    "Bread dough needs time more than it needs effort. Mix flour, water, salt and a "
    "little yeast, fold it a few times over an hour, then leave it in a cool place "
    "overnight; the slow rise develops both flavour and structure.",
    "A retrieval-enhanced language model splits its database into chunks of tokens, "
    "embeds each chunk once, and stores the vectors in an approximate nearest "
    "neighbour index that can be searched in milliseconds.",
    "Glaciers move because ice deforms under its own weight. Near the bed, meltwater "
    "lubricates the contact with the rock, and in warm summers the flow can double "
    "in speed within a few days.",
    "The committee met on Tuesday to discuss the budget for the new library wing. "
    "After two hours of debate they agreed to postpone the decision until the "
    "architects had revised their estimates for the heating system.",
    "Octopuses have three hearts and blue blood. Two of the hearts pump blood through "
    "the gills, while the third supplies the rest of the body; the third heart stops "
    "beating when the animal swims, which is one reason they prefer to crawl.",
    "In 1854 John Snow mapped cholera deaths around a water pump on Broad Street in "
    "London. The cluster of cases convinced the parish to remove the pump handle, and "
    "the outbreak, already waning, came to an end.",
    "To compile the project, install the dependencies listed in requirements.txt, "
    "run the configure script with the prefix of your choice, and then call make "
    "with as many parallel jobs as your machine has cores.",
    "Ein kurzer Absatz auf Deutsch: Die Straßenbahn fährt alle zehn Minuten über die "
    "Brücke, außer am Sonntag, wenn sie nur jede halbe Stunde kommt.",
    "Les marées sont causées principalement par l'attraction de la Lune; le Soleil "
    "les renforce lors des vives-eaux, quand les trois astres sont alignés.",
]


def make_documents():
  """40 documents of 1-4 paragraphs (several chunks each), two of them empty."""
  docs = []
  for i in range(40):
    parts = [PARAGRAPHS[(i * 7 + j * 3) % len(PARAGRAPHS)] for j in range(1 + i % 4)]
    docs.append("\n\n".join(parts))
  docs[5] = ""
  docs[23] = "  \n "
  return docs


DOCS = make_documents()


@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
  path = tmp_path_factory.mktemp("chunk_db")
  with open(path / "docs.jsonl", "w", encoding="utf-8") as f:
    for i, text in enumerate(DOCS):
      f.write(json.dumps({"text": text, "id": i}, ensure_ascii=False) + "\n")
  return path


@pytest.fixture(scope="session")
def spm_model(workdir):
  return vocab_lib.train_sentencepiece(PARAGRAPHS * 3, str(workdir / "spm"), 512,
                                       num_threads=1)


def build(workdir, spm_model, out, **kwargs):
  kwargs.setdefault("retrieval_db", True)
  kwargs.setdefault("progress", False)
  return chunk_db.build_chunk_db(str(workdir / "docs.jsonl"), spm_model, str(out),
                                 **kwargs)


def read_outputs(directory, name="chunks"):
  return {suffix: open(os.path.join(directory, name + suffix), "rb").read()
          for suffix in (".idx", ".bin")}


# ------------------------------------------------------------------------------------
# Vocabulary
# ------------------------------------------------------------------------------------


def test_sentencepiece_ids_round_trip_and_determinism(workdir, spm_model):
  sp = vocab_lib.load_sentencepiece(spm_model)
  assert (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id()) == (
      vocab_lib.PAD_ID, vocab_lib.EOS_ID, vocab_lib.UNK_ID, -1)
  assert sp.id_to_piece(0) == "<pad>" and sp.id_to_piece(1) == "</s>"
  for text in PARAGRAPHS + ["Unseen: 東京 🚀 ∑ x²\ttab  two spaces\n"]:
    ids = sp.encode(text)
    assert vocab_lib.UNK_ID not in ids                  # byte fallback
    assert sp.decode(ids) == text
  again = vocab_lib.train_sentencepiece(PARAGRAPHS * 3, str(workdir / "spm_again"), 512,
                                        num_threads=1)
  assert open(again, "rb").read() == open(spm_model, "rb").read()
  assert sorted(p for p in os.listdir(workdir) if p.startswith(".")) == []


def test_sample_lines_is_seeded_and_ordered():
  docs = [f"line {i}\nsecond {i}" for i in range(100)]
  a = vocab_lib.sample_lines(docs, 10, seed=1)
  assert a == vocab_lib.sample_lines(docs, 10, seed=1) and len(a) == 10
  assert a != vocab_lib.sample_lines(docs, 10, seed=2)
  order = [int(s.split()[1]) * 2 + s.startswith("second") for s in a]
  assert order == sorted(order)


def test_seqio_vocabulary(spm_model):
  pytest.importorskip("seqio")
  vocab = vocab_lib.get_vocabulary(spm_model)
  sp = vocab_lib.load_sentencepiece(spm_model)
  assert (vocab.pad_id, vocab.eos_id) == (0, 1)
  assert vocab.encode(PARAGRAPHS[0]) == sp.encode(PARAGRAPHS[0])
  assert chunk_db.Tokenizer(vocab).fingerprint == chunk_db.Tokenizer(spm_model).fingerprint


def test_vocab_command_line(workdir):
  out = workdir / "cli_spm"
  subprocess.run([sys.executable, "-m", "retro_jax.data.vocab",
                  f"--input={workdir / 'docs.jsonl'}", f"--output_prefix={out}",
                  "--vocab_size=400", "--num_threads=1"], cwd=REPO, check=True,
                 capture_output=True)
  assert vocab_lib.load_sentencepiece(str(out) + ".model").get_piece_size() <= 400


# ------------------------------------------------------------------------------------
# Build
# ------------------------------------------------------------------------------------


@pytest.mark.parametrize("retrieval", [True, False])
def test_build_contents(workdir, spm_model, tmp_path, retrieval):
  result = build(workdir, spm_model, tmp_path, retrieval_db=retrieval, batch_size=7)
  assert result.merged_prefix == chunk_db.chunk_db_prefix(str(tmp_path))
  assert result.info["empty_docs"] == 2 and result.info["records"] == 40
  db = formats.ChunkDB(result.merged_prefix)
  db.verify()
  sp = vocab_lib.load_sentencepiece(spm_model)
  texts = [t for t in DOCS if t.strip()]
  assert db.num_docs == len(texts) == result.info["num_docs"]
  assert db.is_retrieval_db == retrieval and db.dtype == np.uint16
  assert db.chunk_size == 64
  for d, text in enumerate(texts):
    expect = sp.encode(text) + [vocab_lib.EOS_ID]
    doc = db.get_document(d)
    assert len(doc) % 64 == 0 and len(doc) - len(expect) < 64
    np.testing.assert_array_equal(doc[:len(expect)], expect)
    assert np.all(doc[len(expect):] == vocab_lib.PAD_ID)
    assert sp.decode(doc[:len(expect) - 1].tolist()) == text
  if retrieval:
    pairs = db.get_chunks(np.arange(db.num_chunks))            # [chunks, 128]
    last = [db.doc_chunk_range(d)[1] - 1 for d in range(db.num_docs)]
    assert np.all(pairs[last, 64:] == vocab_lib.PAD_ID)       # never the next doc
    assert pairs.shape == (db.num_chunks, 128)
  else:
    assert db.get_chunks([0, 1]).shape == (2, 64)


def test_sharded_build_equals_one_shard_build_and_reruns_skip(workdir, spm_model,
                                                              tmp_path):
  build(workdir, spm_model, tmp_path / "one")
  results = [build(workdir, spm_model, tmp_path / "three", shard_id=s, num_shards=3)
             for s in range(3)]
  assert [r.merged_prefix is None for r in results] == [True, True, False]
  assert read_outputs(tmp_path / "one") == read_outputs(tmp_path / "three")
  stamps = {p: os.stat(tmp_path / "three" / p).st_mtime_ns
            for p in os.listdir(tmp_path / "three")}
  again = build(workdir, spm_model, tmp_path / "three", shard_id=1, num_shards=3)
  assert again.skipped and again.info == results[1].info
  assert again.merged_prefix == results[2].merged_prefix
  assert stamps == {p: os.stat(tmp_path / "three" / p).st_mtime_ns
                    for p in os.listdir(tmp_path / "three")}


def test_interleaved_sharding_partitions_documents(workdir, spm_model, tmp_path):
  for s in range(2):
    result = build(workdir, spm_model, tmp_path, shard_id=s, num_shards=2,
                   sharding="interleaved")
  db = formats.ChunkDB(result.merged_prefix)
  assert db.num_docs == 38


def test_more_shards_than_documents(workdir, spm_model, tmp_path):
  (tmp_path / "three.jsonl").write_text(
      "".join(json.dumps({"text": t}) + "\n" for t in PARAGRAPHS[:3]))
  for s in range(5):
    result = chunk_db.build_chunk_db(str(tmp_path / "three.jsonl"), spm_model,
                                     str(tmp_path / "five"), retrieval_db=True,
                                     shard_id=s, num_shards=5, progress=False)
  assert result.info["num_docs"] == 1 and result.merged_prefix
  chunk_db.build_chunk_db(str(tmp_path / "three.jsonl"), spm_model,
                          str(tmp_path / "one"), retrieval_db=True, progress=False)
  assert read_outputs(tmp_path / "five") == read_outputs(tmp_path / "one")
  empty = formats.ChunkDB(tmp_path / "five" / "shard_00000_of_00005")
  assert (empty.num_docs, empty.num_chunks) == (0, 0)


def test_merge_needs_every_shard(workdir, spm_model, tmp_path):
  build(workdir, spm_model, tmp_path, shard_id=2, num_shards=3)
  with pytest.raises(ValueError, match="shard_00000_of_00003, shard_00001_of_00003"):
    chunk_db.merge_chunk_db_shards(str(tmp_path))


def test_settings_mismatch_is_an_error(workdir, spm_model, tmp_path):
  build(workdir, spm_model, tmp_path)
  with pytest.raises(ValueError, match="settings"):
    build(workdir, spm_model, tmp_path, chunk_size=32)


def test_exception_midway_then_rerun_is_identical(workdir, spm_model, tmp_path,
                                                  monkeypatch):
  build(workdir, spm_model, tmp_path / "clean", shard_id=0, num_shards=1)
  out = tmp_path / "interrupted"
  original = formats.ChunkDBWriter.add_document
  calls = []

  def failing(self, tokens):
    if os.path.basename(self.idx_path).startswith("shard_00001"):
      calls.append(1)
      if len(calls) > 4:
        raise RuntimeError("simulated failure")
    return original(self, tokens)

  monkeypatch.setattr(formats.ChunkDBWriter, "add_document", failing)
  build(workdir, spm_model, out, shard_id=0, num_shards=3)
  with pytest.raises(RuntimeError, match="simulated"):
    build(workdir, spm_model, out, shard_id=1, num_shards=3, batch_size=2)
  assert sorted(os.listdir(out)) == ["manifest.json", "shard_00000_of_00003.bin",
                                     "shard_00000_of_00003.idx"]
  monkeypatch.setattr(formats.ChunkDBWriter, "add_document", original)
  for s in range(3):
    build(workdir, spm_model, out, shard_id=s, num_shards=3)
  assert read_outputs(out) == read_outputs(tmp_path / "clean")


def test_killed_process_then_rerun_is_identical(workdir, spm_model, tmp_path):
  build(workdir, spm_model, tmp_path / "clean")
  out = tmp_path / "killed"
  script = textwrap.dedent(f"""
      import os
      from retro_jax.retrieval import chunk_db, formats
      original = formats.ChunkDBWriter.add_document
      count = [0]
      def add(self, tokens):
        if os.path.basename(self.idx_path).startswith("shard_00001"):
          count[0] += 1
          if count[0] > 5:
            os._exit(9)                        # like SIGKILL: no cleanup at all
        return original(self, tokens)
      formats.ChunkDBWriter.add_document = add
      for s in range(3):
        chunk_db.build_chunk_db({str(workdir / 'docs.jsonl')!r}, {spm_model!r},
                                {str(out)!r}, retrieval_db=True, shard_id=s,
                                num_shards=3, batch_size=2, progress=False)
  """)
  proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                        text=True)
  assert proc.returncode == 9, proc.stderr
  leftovers = [p for p in os.listdir(out) if p.startswith(".shard_00001")]
  assert leftovers                                    # the kill left temporaries
  assert not os.path.exists(out / "shard_00001_of_00003.idx")
  for s in range(3):
    build(workdir, spm_model, out, shard_id=s, num_shards=3)
  assert not [p for p in os.listdir(out) if p.startswith(".")]
  assert read_outputs(out) == read_outputs(tmp_path / "clean")


def test_command_line_with_gin(workdir, spm_model, tmp_path):
  help_text = subprocess.run([sys.executable, "-m", "retro_jax.retrieval.chunk_db",
                              "--helpfull"], cwd=REPO, capture_output=True, text=True)
  assert "--gin_file" in help_text.stdout + help_text.stderr
  assert "--merge_only" in help_text.stdout + help_text.stderr
  subprocess.run([sys.executable, "-m", "retro_jax.retrieval.chunk_db",
                  f"--gin.build_chunk_db.input={workdir / 'docs.jsonl'}",
                  f"--gin.build_chunk_db.vocab={spm_model}",
                  f"--gin.build_chunk_db.output_dir={tmp_path}",
                  "--gin.build_chunk_db.retrieval_db=False",
                  "--gin.build_chunk_db.chunk_size=32",
                  "--gin.build_chunk_db.progress=False"],
                 cwd=REPO, check=True, capture_output=True)
  db = formats.ChunkDB(chunk_db.chunk_db_prefix(str(tmp_path)))
  assert db.chunk_size == 32 and not db.is_retrieval_db and db.num_docs == 38
