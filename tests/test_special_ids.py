"""Special ids come from the vocabulary in use: our T5 layout (pad 0, eos 1, no bos) and
Megatron's (unk 0, bos 1, eos 2, no pad: pad = EOD = 2), through every stage that writes
or reads them (chunk DB, pretraining loss weights, SFT examples, generation, retrieval).
"""

import io
import json

import jax
import numpy as np
import pytest
import sentencepiece as spm

from retro_jax.data import instructions
from retro_jax.data import vocab as vocab_lib
from retro_jax.inference.generator import Generator, passages_to_neighbors
from retro_jax.models import RetroConfig
from retro_jax.retrieval import chunk_db
from retro_jax.retrieval import formats
from retro_jax.retrieval.embedders import ChunkEmbedder
from retro_jax.retrieval.layout import RetrievalLayout
from retro_jax.retrieval.retriever import DocumentStore, Retriever
from test_decoding import _params
from test_retriever import BagOfWordsEmbedder

OURS = vocab_lib.SpecialIds(pad=0, eos=1, bos=None, unk=2)
MEGATRON = vocab_lib.SpecialIds(pad=2, eos=2, bos=1, unk=0)

CONFIG = RetroConfig(vocab_size=512, hidden_size=32, num_layers=2, num_heads=4, mlp_dim=64,
                     chunk_length=8, num_neighbors=2, cca_layers=(1, 2),
                     encoder_dropout_rate=0.0, max_length=256)

_WORDS = ("river city mountain clock rain water bridge tower harbor market garden "
          "library engine signal forest island winter summer valley lantern copper "
          "glass stone north south quiet bright ancient modern small large").split()


def _lines(count=400, seed=0):
  """A few hundred lines of plain text (seeded)."""
  rng = np.random.RandomState(seed)
  lines = []
  for i in range(count):
    words = rng.choice(_WORDS, size=int(rng.randint(5, 14)))
    lines.append(f"Line {i}: the " + " ".join(words) + ".")
  return lines


def _train_megatron_layout(path, **ids):
  """A SentencePiece model in Megatron's GPTSentencePieceTokenizer layout."""
  model = io.BytesIO()
  settings = dict(unk_id=0, bos_id=1, eos_id=2, pad_id=-1)
  settings.update(ids)
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(_lines()), model_writer=model, vocab_size=400,
      model_type="bpe", byte_fallback=True, character_coverage=1.0,
      hard_vocab_limit=False, num_threads=1, minloglevel=2, **settings)
  with open(path, "wb") as f:
    f.write(model.getvalue())
  return str(path)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  root = tmp_path_factory.mktemp("special_ids")
  megatron = _train_megatron_layout(root / "megatron.model")
  ours = vocab_lib.train_sentencepiece(_lines(), str(root / "ours"), vocab_size=400,
                                       num_threads=1)
  return {"megatron": megatron, "ours": ours}


LAYOUTS = [("megatron", MEGATRON), ("ours", OURS)]


# ------------------------------------------------------------------------------------
# The rule
# ------------------------------------------------------------------------------------


def test_special_ids_of_both_layouts(models):
  sp = spm.SentencePieceProcessor(model_file=models["megatron"])
  assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
  assert [sp.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
  for name, expected in LAYOUTS:
    path = models[name]
    assert vocab_lib.special_ids(path) == expected
    assert vocab_lib.special_ids(spm.SentencePieceProcessor(model_file=path)) == expected
    assert chunk_db.Tokenizer(path).special_ids == expected
    assert (chunk_db.Tokenizer(path).pad_id, chunk_db.Tokenizer(path).eos_id) == (
        expected.pad, expected.eos)
  assert vocab_lib.special_ids(models["ours"]) == vocab_lib.OWN_LAYOUT


def test_seqio_vocabulary_is_read_from_its_model_not_from_seqio_pad(models):
  pytest.importorskip("seqio")
  vocab = vocab_lib.get_vocabulary(models["megatron"])
  assert (vocab.pad_id, vocab.eos_id) == (0, 2)    # seqio's pad is always 0 (= <unk> here)
  assert vocab_lib.special_ids(vocab) == MEGATRON
  embed = ChunkEmbedder(BagOfWordsEmbedder(), vocab)
  assert (embed.pad_id, embed.eod_id) == (2, 2)
  ours = ChunkEmbedder(BagOfWordsEmbedder(), vocab_lib.get_vocabulary(models["ours"]))
  assert (ours.pad_id, ours.eod_id) == (0, 1)


def test_a_model_without_eos_is_an_error_naming_the_file(tmp_path):
  path = _train_megatron_layout(tmp_path / "no_eos.model", eos_id=-1)
  with pytest.raises(ValueError, match="no_eos.model.*no EOS"):
    vocab_lib.special_ids(path)
  with pytest.raises(ValueError, match="no_eos.model"):
    chunk_db.Tokenizer(path).eos_id


def test_toy_vocabularies_need_a_default_or_declare_their_ids():
  class Toy:
    def encode(self, text):
      return [3]

    def decode(self, ids):
      return ""

  with pytest.raises(TypeError):
    vocab_lib.special_ids(Toy())
  assert vocab_lib.special_ids(Toy(), default=OURS) == OURS
  toy = Toy()
  toy.special_ids = MEGATRON
  assert vocab_lib.special_ids(toy, default=OURS) == MEGATRON
  with pytest.raises(ValueError, match="token id, None or 'vocab'"):
    vocab_lib.is_from_vocab("eos")


# ------------------------------------------------------------------------------------
# Chunk DB and pretraining examples
# ------------------------------------------------------------------------------------


def _documents():
  lines = _lines(120, seed=3)
  return [" ".join(lines[i:i + 1 + i % 4]) for i in range(0, 120, 4)]


def _build(tmp_path, vocab, name, retrieval_db, **kwargs):
  corpus = tmp_path / "docs.jsonl"
  if not corpus.exists():
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in _documents()))
  out = tmp_path / name
  chunk_db.build_chunk_db(str(corpus), vocab, str(out), retrieval_db=retrieval_db,
                          chunk_size=8, progress=False, **kwargs)
  return chunk_db.chunk_db_prefix(str(out))


@pytest.mark.parametrize("name,ids", LAYOUTS)
def test_chunk_db_documents_end_with_eos_and_are_padded_with_pad(models, tmp_path, name,
                                                                  ids):
  sp = spm.SentencePieceProcessor(model_file=models[name])
  prefix = _build(tmp_path, models[name], "db", retrieval_db=True)
  assert chunk_db.built_ids(prefix) == (ids.pad, ids.eos)
  db = formats.ChunkDB(prefix)
  padded = 0
  for d, text in enumerate(_documents()):
    expect = sp.encode(text) + [ids.eos]
    stored = db.get_document(d)
    np.testing.assert_array_equal(stored[:len(expect)], expect)
    assert np.all(stored[len(expect):] == ids.pad) and len(stored) % 8 == 0
    padded += len(stored) - len(expect)
  assert padded > 0
  # An explicit pad id still wins over the vocabulary's.
  explicit = _build(tmp_path, models[name], "db_pad7", retrieval_db=True, pad_id=7)
  assert chunk_db.built_ids(explicit) == (7, ids.eos)
  doc = formats.ChunkDB(explicit).get_document(0)
  assert doc[len(sp.encode(_documents()[0])) + 1:].tolist() == [7] * (
      len(doc) - len(sp.encode(_documents()[0])) - 1)
  with pytest.raises(ValueError, match="pad_id=-1"):
    _build(tmp_path, models[name], "db_bad", retrieval_db=True, pad_id=-1)


@pytest.mark.parametrize("name,ids", LAYOUTS)
def test_pretraining_weights_train_on_eod_but_not_on_padding(models, tmp_path, name, ids):
  from retro_jax.data import sources  # pylint: disable=g-import-not-at-top
  sp = spm.SentencePieceProcessor(model_file=models[name])
  prefix = _build(tmp_path, models[name], "query", retrieval_db=False)
  source = sources.PretrainSource(prefix, seq_len=16)
  assert (source.pad_id, source.eod_id) == (ids.pad, ids.eos)
  # Expected: every document token and its EOD weighted, the padding after it not.
  stream, real = [], []
  for text in _documents():
    length = len(sp.encode(text)) + 1
    stored = -(-length // 8) * 8
    real += [1.0] * length + [0.0] * (stored - length)
  real = np.asarray(real, np.float32)
  got = source.examples(np.arange(source.num_examples), with_neighbors=False)
  n = source.seq_len
  for i in range(source.num_examples):
    want = np.zeros(n + 1, np.float32)
    span = real[i * n:i * n + n + 1]
    want[:len(span)] = span
    want[0] = 0.0
    np.testing.assert_array_equal(got["loss_weights"][i], want, err_msg=f"example {i}")
  targets, weights = got["targets"], got["loss_weights"]
  assert weights[targets == ids.eos].sum() > 0          # EOD is a target
  assert (weights[targets == ids.pad] == 0).any()       # padding is not


# ------------------------------------------------------------------------------------
# SFT examples
# ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,ids", LAYOUTS)
def test_sft_examples_end_with_the_vocabulary_eos(models, name, ids):
  from retro_jax.data import sources  # pylint: disable=g-import-not-at-top
  record = instructions.SFTExample(messages=(
      {"role": "user", "content": "Which river runs by the copper tower?"},
      {"role": "assistant", "content": "The quiet river."}))
  sp = spm.SentencePieceProcessor(model_file=models[name])
  tokens, weights, _ = instructions.encode_sft(*record.render(), sp, 200)
  assert tokens[-1] == ids.eos and weights[-1] == 1.0
  source = sources.SFTSource([record], models[name], seq_len=128, chunk_length=8)
  assert (source.pad_id, source.eos_id) == (ids.pad, ids.eos)
  tokens, weights, _ = source.encode(0)
  assert tokens[-1] == ids.eos and weights[-1] == 1.0 and ids.eos not in tokens[:-1]
  feats = source.examples(np.arange(1))
  assert np.all(feats["targets"][0, len(tokens):] == ids.pad)
  assert np.all(feats["loss_weights"][0, len(tokens):] == 0)
  assert np.all(feats["neighbor_tokens"] == ids.pad) and not feats["neighbor_mask"].any()


# ------------------------------------------------------------------------------------
# Generation and live retrieval
# ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,ids", LAYOUTS)
def test_generator_and_retrieval_use_the_vocabulary_ids(models, name, ids):
  sp = spm.SentencePieceProcessor(model_file=models[name])
  generator = Generator(CONFIG, _params(CONFIG), sp)
  assert (generator.eos_id, generator.pad_id, generator.eod_id) == (
      ids.eos, ids.pad, ids.eos)
  never = Generator(CONFIG, _params(CONFIG), sp, eos_id=None)
  assert (never.eos_id, never.eod_id) == (None, ids.eos)
  passage = "the copper tower by the river"
  encoded = sp.encode(passage)
  neighbors = passages_to_neighbors(sp, [[passage]], 16)
  np.testing.assert_array_equal(
      neighbors.tokens[0, 0], encoded + [ids.eos] + [ids.pad] * (15 - len(encoded)))
  store = DocumentStore(sp, BagOfWordsEmbedder(), chunk_length=8)
  retriever = Retriever(store.embedder, sp, store)
  assert (store.pad_id, store.eod_id) == (ids.pad, ids.eos)
  assert (retriever.pad_id, retriever.eod_id) == (ids.pad, ids.eos)
  store.add_documents([passage])
  chunks = store.get_chunks(np.arange(store.num_chunks), with_continuation=False).reshape(-1)
  np.testing.assert_array_equal(chunks[:len(encoded) + 1], encoded + [ids.eos])
  assert np.all(chunks[len(encoded) + 1:] == ids.pad)
  missing = store.get_chunks(np.array([-1]), missing_value=retriever.pad_id)
  assert np.all(missing == ids.pad)


def _swap_tokens(params, a, b):
  """The model with tokens a and b exchanged (tied embeddings: inputs and outputs)."""
  def swap(path, leaf):
    leaf = np.array(leaf)
    if [getattr(k, "key", None) for k in path][-2:] == ["token_embedding", "embedding"]:
      leaf[[a, b]] = leaf[[b, a]]
    return leaf
  return jax.tree_util.tree_map_with_path(swap, params)


@pytest.mark.slow
def test_generation_stops_at_the_vocabulary_eos(models):
  assert CONFIG.tie_embeddings
  megatron = spm.SentencePieceProcessor(model_file=models["megatron"])
  ours = spm.SentencePieceProcessor(model_file=models["ours"])
  params = _params(CONFIG)
  free = Generator(CONFIG, params, megatron, eos_id=None)
  for prompt in ["the river", "a quiet copper bridge", "Line 7: the", "north harbor"]:
    ids = megatron.encode(prompt)
    first = int(free.generate_tokens([ids], max_new_tokens=1).tokens[0][0])
    if first not in ids and 2 not in ids:
      break
  else:
    pytest.fail("no prompt without the model's first token")
  # Exchange that token with id 2, so that the model's first new token becomes 2.
  swapped = _swap_tokens(params, first, 2)
  assert Generator(CONFIG, swapped, megatron, eos_id=None).generate_tokens(
      [ids], max_new_tokens=1).tokens[0][0] == 2
  # Megatron's vocabulary: 2 is EOD, generation stops there.
  stopped = Generator(CONFIG, swapped, megatron, sync_every=1).generate_tokens(
      [ids], max_new_tokens=6)
  assert stopped.finished == [True] and len(stopped.tokens[0]) == 0
  assert stopped.texts == [""] and stopped.stats["steps"] <= 2
  # Ours: 2 is <unk>, not EOS (1); the same model goes on past it.
  going = Generator(CONFIG, swapped, ours).generate_tokens([ids], max_new_tokens=6)
  assert going.tokens[0][0] == 2 and len(going.tokens[0]) > 1
