"""Corpus readers: jsonl, text and TFDS; empty documents, errors, sharding."""

import gzip
import json

import pytest

from retro_jax.data import corpus as corpus_lib
from retro_jax.utils import stages

PARAGRAPHS = [
    "Retrieval-enhanced language models condition on passages fetched from a large "
    "database, so that facts need not all be stored in the weights.",
    "The database is cut into chunks of sixty-four tokens; each chunk is embedded "
    "once and placed in an approximate nearest-neighbour index.",
    "",
    "   ",
    "During training, every chunk of the input sequence looks up its neighbours, and "
    "the decoder attends to them through chunked cross-attention.",
    "Une phrase en français, avec des accents : é, è, à, ç. Und ein Satz auf Deutsch "
    "mit Umlauten: ä, ö, ü, ß.",
    "数据库中的每个文本块都有一个嵌入向量。",
]


def write_jsonl(path, texts, key="text"):
  with open(path, "w", encoding="utf-8") as f:
    for i, text in enumerate(texts):
      f.write(json.dumps({key: text, "id": i}, ensure_ascii=False) + "\n")
  return str(path)


def test_jsonl_documents_skip_and_count_empty(tmp_path):
  path = write_jsonl(tmp_path / "a.jsonl", PARAGRAPHS)
  corpus = corpus_lib.open_corpus(path)
  assert isinstance(corpus, corpus_lib.JsonlCorpus)
  stats = corpus_lib.CorpusStats()
  docs = list(corpus.documents(stats=stats))
  assert [d for d, _ in docs] == [0, 1, 4, 5, 6]
  assert [t for _, t in docs] == [PARAGRAPHS[i] for i in (0, 1, 4, 5, 6)]
  assert (stats.records, stats.documents, stats.empty) == (7, 5, 2)
  assert corpus.num_records() == 7


def test_jsonl_text_key_gzip_and_blank_lines(tmp_path):
  path = tmp_path / "b.jsonl.gz"
  with gzip.open(path, "wt", encoding="utf-8") as f:
    f.write(json.dumps({"body": "first"}) + "\n\n" + json.dumps({"body": "third"}))
  corpus = corpus_lib.open_corpus(str(path), text_key="body")
  assert list(corpus.documents()) == [(0, "first"), (2, "third")]
  assert corpus.num_records() == 3


@pytest.mark.parametrize("line,message", [
    (b'{"text": "ok"', "invalid JSON"),
    (b'["a list"]', "expected a JSON object"),
    (b'{"other": "x"}', "no key 'text'"),
    (b'{"text": 3}', "'text' is int, not a string"),
    (b'{"text": "caf\xe9"}', "invalid UTF-8"),
])
def test_jsonl_errors_name_file_and_line(tmp_path, line, message):
  path = tmp_path / "bad.jsonl"
  path.write_bytes(b'{"text": "fine"}\n{"text": "also fine"}\n' + line + b"\n")
  with pytest.raises(ValueError) as e:
    list(corpus_lib.open_corpus(str(path)).documents())
  assert f"{path}:3:" in str(e.value) and message in str(e.value), str(e.value)


def test_text_files_one_document_per_file(tmp_path):
  for i, text in enumerate(PARAGRAPHS):
    (tmp_path / f"doc{i:02d}.txt").write_text(text + "\n", encoding="utf-8")
  corpus = corpus_lib.open_corpus(str(tmp_path))
  assert isinstance(corpus, corpus_lib.TextFilesCorpus)
  docs = dict(corpus.documents())
  assert sorted(docs) == [0, 1, 4, 5, 6] and docs[5] == PARAGRAPHS[5] + "\n"


def test_text_lines_one_document_per_line(tmp_path):
  path = tmp_path / "lines.txt"
  path.write_bytes("alpha\r\n\nbeta gamma\ndelta".encode())       # no final newline
  corpus = corpus_lib.open_corpus(str(path), text_unit="line")
  assert list(corpus.documents()) == [(0, "alpha"), (2, "beta gamma"), (3, "delta")]
  assert corpus.num_records() == 4


def test_text_invalid_utf8_names_line(tmp_path):
  path = tmp_path / "doc.txt"
  path.write_bytes(b"good line\nsecond line\nbad \xff byte\n")
  with pytest.raises(ValueError, match=r"doc\.txt:3: invalid UTF-8"):
    list(corpus_lib.open_corpus(str(path)).documents())
  with pytest.raises(ValueError, match=r"doc\.txt:3: invalid UTF-8"):
    list(corpus_lib.open_corpus(str(path), text_unit="line").documents())


def test_paths_globs_and_errors(tmp_path):
  write_jsonl(tmp_path / "b.jsonl", ["b0", "b1"])
  write_jsonl(tmp_path / "a.jsonl", ["a0"])
  corpus = corpus_lib.open_corpus(str(tmp_path / "*.jsonl"))
  assert [t for _, t in corpus.documents()] == ["a0", "b0", "b1"]
  (tmp_path / "notes.txt").write_text("x")
  with pytest.raises(ValueError, match="mixes jsonl"):
    corpus_lib.open_corpus(str(tmp_path))
  assert corpus_lib.open_corpus(str(tmp_path), format="jsonl").num_records() == 3
  with pytest.raises(FileNotFoundError, match="missing.jsonl"):
    corpus_lib.open_corpus(str(tmp_path / "missing.jsonl"))
  with pytest.raises(FileNotFoundError, match="matches no input"):
    corpus_lib.open_corpus(str(tmp_path / "*.parquet"))


@pytest.mark.parametrize("sharding", ["contiguous", "interleaved"])
@pytest.mark.parametrize("num_shards", [1, 2, 3, 5])
def test_shards_partition_the_corpus(tmp_path, sharding, num_shards):
  texts = [f"document {i}" if i % 7 else "" for i in range(23)]
  paths = [write_jsonl(tmp_path / "p0.jsonl", texts[:10]),
           write_jsonl(tmp_path / "p1.jsonl", texts[10:11]),
           write_jsonl(tmp_path / "p2.jsonl", texts[11:])]
  whole = list(corpus_lib.open_corpus(paths).documents())
  shards = []
  for s in range(num_shards):
    corpus = corpus_lib.open_corpus(paths)      # fresh: no cached line counts
    stats = corpus_lib.CorpusStats()
    shards.append(list(corpus.documents(s, num_shards, sharding=sharding, stats=stats)))
    assert stats.records == corpus.shard_num_records(s, num_shards, sharding=sharding)
  if sharding == "contiguous":
    assert sum(shards, []) == whole
  else:
    assert sorted(sum(shards, [])) == whole
    assert all(d % num_shards == s for s, docs in enumerate(shards) for d, _ in docs)
  assert all(text == f"document {d}" for d, text in whole)


def test_shard_range_and_bad_shards():
  assert [stages.shard_range(10, s, 3) for s in range(3)] == [(0, 3), (3, 6),
                                                                   (6, 10)]
  with pytest.raises(ValueError, match="shard_id"):
    stages.shard_range(10, 3, 3)


# ------------------------------------------------------------------------------------
# TFDS: a tiny dataset built offline in a temporary data_dir.
# ------------------------------------------------------------------------------------

TFDS_TEXTS = [f"example number {i} about retrieval" if i != 4 else "" for i in range(9)]


@pytest.fixture(scope="module")
def tfds_data_dir(tmp_path_factory):
  tfds = pytest.importorskip("tensorflow_datasets")

  class TinyRetroCorpus(tfds.core.GeneratorBasedBuilder):
    """Nine short texts."""
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self,
          features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i, text in enumerate(TFDS_TEXTS):
        yield i, {"text": text}

  data_dir = str(tmp_path_factory.mktemp("tfds"))
  TinyRetroCorpus(data_dir=data_dir).download_and_prepare()
  return data_dir


def test_tfds_corpus(tfds_data_dir):
  corpus = corpus_lib.open_corpus("tfds:tiny_retro_corpus", tfds_data_dir=tfds_data_dir,
                                  tfds_download=False)
  assert isinstance(corpus, corpus_lib.TfdsCorpus) and corpus.num_records() == 9
  stats = corpus_lib.CorpusStats()
  whole = list(corpus.documents(stats=stats))
  assert sorted(t for _, t in whole) == sorted(t for t in TFDS_TEXTS if t)
  assert stats.empty == 1 and [d for d, _ in whole] == sorted(d for d, _ in whole)
  shards = [list(corpus.documents(s, 2)) for s in range(2)]
  assert shards[0] + shards[1] == whole
  with pytest.raises(ValueError, match="no feature 'body'"):
    list(corpus_lib.open_corpus("tfds:tiny_retro_corpus", text_key="body",
                                tfds_data_dir=tfds_data_dir,
                                tfds_download=False).documents())
