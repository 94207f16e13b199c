"""The Flax sentence encoder against sentence-transformers on the real all-MiniLM-L6-v2."""

import json
import math
import os

import jax
import numpy as np
import pytest
import torch

from retro_jax.bench.embedding import run_embedding_bench
from retro_jax.data import vocab as vocab_lib
from retro_jax.data.prose import prose_chunks
from retro_jax.models.bert import pool
from retro_jax.retrieval import embedders
from retro_jax.retrieval.embedders import (ChunkEmbedder, FlaxSentenceEmbedder, load_embedder,
                                           plan_batches, resolve_embedder_dir)

LONG = ("Retrieval-enhanced transformers split a large corpus into chunks, embed every "
        "chunk with a frozen BERT encoder and look up the nearest neighbours of each "
        "chunk of the input while generating. ") * 12           # > 256 WordPiece tokens

TEXTS = [
    "", "   ", "a", "Hello, world!", "THE Quick Brown FOX jumps over the lazy dog.",
    "Zürich café naïve façade — “curly quotes” and an ellipsis…",
    "東京は日本の首都です。北京是中国的首都。", "Привет, мир! Ελληνικά κείμενα. مرحبا بالعالم",
    "emoji 😀🚀🎉 and symbols ∑∫√∞ ≠ ≤", "tab\tseparated\nnew line\r\nwindows line",
    "def square(x):\n    return x ** 2  # 3.14159, 2718, 1e-9",
    "x" * 300,                                           # one word > 100 chars: [UNK]
    LONG, LONG[::-1],
] + prose_chunks(10, 250)
# Few padded lengths keep the compiles (and the test time) down; bucketing is the same.
BUCKETS = (32, 128, 256)


@pytest.fixture(scope="module")
def flax_embedder():
  return load_embedder(buckets=BUCKETS)     # all local devices: the 8 fake CPUs


@pytest.fixture(scope="module")
def reference():
  from sentence_transformers import SentenceTransformer
  torch.manual_seed(0)
  model = SentenceTransformer(resolve_embedder_dir("all-MiniLM-L6-v2"), device="cpu")
  return model.encode(TEXTS, convert_to_numpy=True, batch_size=8)


def _cosine(a, b):
  return np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def test_parity_with_sentence_transformers(flax_embedder, reference):
  assert len(flax_embedder.devices) == 8 and flax_embedder.dim == 384
  assert max(len(ids) for ids in flax_embedder.tokenize(TEXTS)) == 256   # truncation hit
  ours = flax_embedder.embed_texts(TEXTS)
  assert ours.dtype == np.float32 and ours.shape == (len(TEXTS), 384)
  cosine = _cosine(ours, reference)
  assert cosine.min() >= 0.999, [(t[:30], c) for t, c in zip(TEXTS, cosine) if c < 0.999]
  np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)   # Normalize
  np.testing.assert_allclose(ours, reference, atol=2e-5)


@pytest.mark.slow
def test_embedding_does_not_depend_on_the_batch(flax_embedder):
  together = flax_embedder.embed_texts(TEXTS)
  alone = np.concatenate([flax_embedder.embed_texts([t]) for t in TEXTS[:6]])
  np.testing.assert_allclose(alone, together[:6], atol=1e-5)
  shuffled = np.random.default_rng(0).permutation(len(TEXTS))
  np.testing.assert_allclose(flax_embedder.embed_texts([TEXTS[i] for i in shuffled]),
                             together[shuffled], atol=1e-5)
  # Other padding: every text padded to 256 tokens, 4 rows a batch.
  padded = load_embedder(buckets=(256,), tokens_per_batch=8 * 256)
  np.testing.assert_allclose(padded.embed_texts(TEXTS[:8]), together[:8], atol=1e-5)
  assert flax_embedder.embed_texts([]).shape == (0, 384)


@pytest.mark.slow
def test_sharded_over_devices_equals_one_device(flax_embedder):
  one = load_embedder(devices=jax.local_devices()[:1], buckets=BUCKETS)
  assert len(one.devices) == 1
  sharded = flax_embedder.embed_texts(TEXTS)
  np.testing.assert_allclose(one.embed_texts(TEXTS), sharded, atol=1e-5)
  assert one.fingerprint == flax_embedder.fingerprint    # same weights, dtype, length


def test_bfloat16_is_close_to_float32(flax_embedder):
  bf16 = load_embedder(dtype="bfloat16", buckets=BUCKETS)
  assert bf16.fingerprint != flax_embedder.fingerprint
  cosine = _cosine(bf16.embed_texts(TEXTS[-6:]), flax_embedder.embed_texts(TEXTS[-6:]))
  assert cosine.min() > 0.99


def test_plan_batches_covers_every_text_once():
  lengths = np.random.default_rng(1).integers(2, 257, 500)
  plan = plan_batches(lengths, embedders.default_buckets(256), tokens_per_batch=2048,
                      max_batch_size=64, multiple=8)
  seen = np.concatenate([members for _, _, members in plan])
  np.testing.assert_array_equal(np.sort(seen), np.arange(500))
  for length, rows, members in plan:
    assert lengths[members].max() <= length and rows % 8 == 0 and len(members) <= rows
    assert rows <= max(8, 2048 // length // 8 * 8)
  assert len({(length, rows) for length, rows, _ in plan}) <= 3 * len(
      embedders.default_buckets(256))
  with pytest.raises(ValueError, match="more than the largest bucket"):
    plan_batches([300], (16, 256), 1024, 8)
  # Batches of any size take few shapes: full, or a power of two (a multiple of 8).
  for rows, multiple in ((21, 1), (64, 8), (12, 1)):
    shapes = {embedders._round_rows(n, rows, multiple) for n in range(1, rows + 1)}
    assert len(shapes) <= math.log2(rows) + 2
    assert all(embedders._round_rows(n, rows, multiple) >= n for n in range(1, rows + 1))


@pytest.mark.parametrize("modes", [("cls",), ("max",), ("mean", "mean_sqrt_len_tokens"),
                                   ("weightedmean",), ("lasttoken", "cls", "max")])
def test_pooling_matches_sentence_transformers(modes):
  from sentence_transformers.sentence_transformer.modules.pooling import Pooling
  rng = np.random.default_rng(0)
  hidden = rng.standard_normal((3, 7, 5)).astype(np.float32)
  mask = np.array([[1] * 7, [1] * 3 + [0] * 4, [1] * 1 + [0] * 6], np.int64)
  st = Pooling(5, pooling_mode=modes)({"token_embeddings": torch.from_numpy(hidden),
                                       "attention_mask": torch.from_numpy(mask)})
  np.testing.assert_allclose(np.asarray(pool(hidden, mask, modes, normalize=False)),
                             st["sentence_embedding"].numpy(), rtol=1e-5, atol=1e-6)


def _fake_checkpoint(tmp_path, edits=None, drop=()):
  """A copy of the real checkpoint directory (files symlinked) with edited JSON files."""
  src = resolve_embedder_dir("all-MiniLM-L6-v2")
  dst = tmp_path / "ckpt"
  for root, _, files in os.walk(src):
    rel = os.path.relpath(root, src)
    os.makedirs(dst / rel, exist_ok=True)
    for name in files:
      path = os.path.normpath(os.path.join(rel, name))
      if path in drop:
        continue
      if edits and path in edits:
        with open(os.path.join(root, name), encoding="utf-8") as f:
          data = json.load(f)
        edits[path](data)
        (dst / path).write_text(json.dumps(data), encoding="utf-8")
      else:
        os.symlink(os.path.join(root, name), dst / path)
  return str(dst)


def test_checkpoint_errors_name_the_file_and_field(tmp_path):
  with pytest.raises(FileNotFoundError, match="tokenizer.json"):
    FlaxSentenceEmbedder(_fake_checkpoint(tmp_path / "a", drop={"tokenizer.json"}))
  with pytest.raises(FileNotFoundError, match="model.safetensors.*safetensors"):
    FlaxSentenceEmbedder(_fake_checkpoint(tmp_path / "b", drop={"model.safetensors"}))
  with pytest.raises(ValueError, match=r"config.json: missing field 'num_attention_heads'"):
    FlaxSentenceEmbedder(_fake_checkpoint(
        tmp_path / "c", {"config.json": lambda c: c.pop("num_attention_heads")}))
  with pytest.raises(ValueError, match="model_type 'roberta'"):
    FlaxSentenceEmbedder(_fake_checkpoint(
        tmp_path / "d", {"config.json": lambda c: c.update(model_type="roberta")}))
  with pytest.raises(ValueError, match=r"word_embeddings.weight' has shape \(30522, 384\)"):
    FlaxSentenceEmbedder(_fake_checkpoint(
        tmp_path / "e", {"config.json": lambda c: c.update(vocab_size=1000)}))
  with pytest.raises(ValueError, match=r"1_Pooling/config.json: pooling_mode \['median'\]"):
    FlaxSentenceEmbedder(_fake_checkpoint(
        tmp_path / "f", {"1_Pooling/config.json": lambda c: c.update(pooling_mode="median")}))
  with pytest.raises(ValueError, match="modules.json: modules .*Dense"):
    FlaxSentenceEmbedder(_fake_checkpoint(tmp_path / "g", {"modules.json": lambda m: m.append(
        {"idx": 3, "name": "3", "path": "3_Dense",
         "type": "sentence_transformers.models.Dense"})}))
  with pytest.raises(FileNotFoundError, match="not a local directory and not a known name"):
    load_embedder("no-such-model")


def test_checkpoint_options_are_honoured(tmp_path):
  """CLS pooling without Normalize and a shorter max_seq_length, read from the files."""
  path = _fake_checkpoint(tmp_path, {
      "1_Pooling/config.json": lambda c: c.update(pooling_mode_mean_tokens=False,
                                                  pooling_mode_cls_token=True),
      "modules.json": lambda m: m.pop(),
      "sentence_bert_config.json": lambda c: c.update(max_seq_length=16)})
  embedder = FlaxSentenceEmbedder(path, devices=jax.local_devices()[:1])
  assert embedder.spec.pooling == ("cls",) and not embedder.spec.normalize
  assert embedder.buckets == (16,)
  from sentence_transformers import SentenceTransformer
  reference = SentenceTransformer(path, device="cpu").encode(TEXTS[:6], convert_to_numpy=True)
  assert reference.shape == (6, 384)
  assert np.abs(np.linalg.norm(reference, axis=1) - 1).max() > 0.1    # really unnormalised
  np.testing.assert_allclose(embedder.embed_texts(TEXTS[:6]), reference, rtol=1e-4, atol=1e-4)


def test_names_resolve_to_the_installed_checkpoint():
  assert (resolve_embedder_dir("sentence-transformers/all-MiniLM-L6-v2")
          == resolve_embedder_dir("all-MiniLM-L6-v2"))
  assert os.path.exists(os.path.join(resolve_embedder_dir("all-MiniLM-L6-v2"),
                                     "model.safetensors"))


def test_chunk_embedder_drops_pad_and_eod(flax_embedder, tmp_path):
  texts = prose_chunks(40, 200)
  model = vocab_lib.train_sentencepiece(texts, str(tmp_path / "spm"), 400, num_threads=1)
  sp = vocab_lib.load_sentencepiece(model)
  chunk_embedder = ChunkEmbedder(flax_embedder, model)
  assert (chunk_embedder.pad_id, chunk_embedder.eod_id, chunk_embedder.dim) == (0, 1, 384)
  m = 32
  rows, want = [], []
  for text in texts[:4]:
    ids = sp.encode(text)[:m - 3]
    rows.append(np.pad(ids + [1], (0, m - len(ids) - 1)))      # EOD, then pads
    want.append(sp.decode(ids))
  tokens = np.asarray(rows, np.int32)
  assert chunk_embedder.texts(tokens) == want
  np.testing.assert_allclose(chunk_embedder(tokens), flax_embedder.embed_texts(want),
                             atol=1e-6)
  with pytest.raises(ValueError, match=r"\[n, m\]"):
    chunk_embedder(tokens[0])


def test_embedding_bench_runs_both_sides():
  lines = []
  rows = run_embedding_bench(TEXTS[-4:], repeats=1, print_fn=lines.append,
                             embedder_options={"buckets": BUCKETS})
  assert [r["name"].split(" ")[0] for r in rows] == ["retro_jax", "sentence-transformers"]
  assert rows[0]["min_cosine"] >= 0.999 and rows[1]["ratio"] == 1.0
  assert rows[0]["ratio"] == rows[0]["chunks_per_s"] / rows[1]["chunks_per_s"]
  assert lines[1].startswith("| embedder |") and len(lines) == 4
