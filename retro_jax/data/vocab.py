r"""The SentencePiece vocabulary: load it (as seqio does) and train one on a corpus.

    python -m retro_jax.data.vocab --input=docs.jsonl --output_prefix=/data/spm \
        --vocab_size=32000

Special ids come from the vocabulary in use: ``special_ids(vocab)`` is the one place
that reads them (from a model path, a ``SentencePieceProcessor`` or a
``seqio.SentencePieceVocabulary``), and every stage asks it rather than assuming an id
layout. The rule:

    eos  the model's EOS id: the EOD token appended to chunk DB documents, passages and
         SFT examples, and the token generation stops at (an error naming the model
         file if it has none)
    pad  the model's pad id; the EOS id when the model has no pad piece (Megatron
         pads retrieved neighbors and chunk DB documents with EOD)
    bos  the model's BOS id, or None; unk  the model's unk id, or None

Two layouts meet this rule. Models trained here (``train_sentencepiece``) use the
T5/seqio layout, and the constants below are only what this trainer writes:

    PAD_ID = 0  ``<pad>``  pads chunk DB documents to a multiple of m (seqio's pad)
    EOS_ID = 1  ``</s>``   appended to every document in the chunk DB (the EOD token)
    UNK_ID = 2  ``<unk>``  unused in practice: byte fallback encodes any text
    no BOS

NVIDIA's released InstructRetro checkpoints use Megatron's GPTSentencePieceTokenizer
over a SentencePiece model with its own ids: typically unk 0, bos 1 ``<s>``, eos 2
``</s>`` and no pad piece, so pad = eos = 2 there. Beware ``seqio``'s vocabulary: its
``pad_id`` is always 0 whatever the model says (``special_ids`` reads the model). Where
pad == eos, a pretraining example's loss weights count the first EOD after a document's
tokens and not the EOD padding after it (``retro_jax.data.sources.loss_weights``).

Training is deterministic: a seeded reservoir sample of at most ``max_sentences``
lines of the corpus (kept in corpus order), fed to SentencePiece's trainer with a
fixed thread count and no internal sampling or shuffling. Normalisation is the
identity and whitespace is kept (as Llama's tokenizer), so ``decode(encode(text))
== text`` and a chunk detokenizes to exactly its text for the embedder.

A chunk's text is ``chunk_text(vocab, tokens, pad_id, eod_id)``: its tokens without pad
and end-of-document ids, decoded (what the embedder sees, offline and at run time; as
Megatron and NeMo, retrieval embeds the chunk *text*).

``get_vocabulary`` imports seqio (and so TensorFlow) lazily; ``load_sentencepiece``
is the plain-SentencePiece loader the offline stages use.
"""

from __future__ import annotations

import dataclasses
import io
import os
from typing import Any, Iterable, Iterator, Optional, Protocol, Sequence

from absl import app
from absl import flags
from absl import logging
import numpy as np
import sentencepiece as spm

from retro_jax.data import corpus as corpus_lib
from retro_jax.utils.io import atomic_path
from retro_jax.utils.io import atomic_write_text

# The ids ``train_sentencepiece`` writes (our own layout); never a default for a
# loaded vocabulary: ask ``special_ids``.
PAD_ID = 0
EOS_ID = 1
UNK_ID = 2

# A default argument meaning "the vocabulary's own id" (``special_ids``), where None
# already means something else (e.g. ``Generator(eos_id=None)``: never stop early).
FROM_VOCAB = "vocab"


class Vocabulary(Protocol):
  """What retrieval needs of a tokeniser: ``encode`` text to ids, ``decode`` ids to text."""

  def encode(self, text: str) -> Sequence[int]:
    ...

  def decode(self, ids: Sequence[int]) -> str:
    ...


def is_from_vocab(value: Any) -> bool:
  """Whether an id argument is ``FROM_VOCAB`` (any other string is an error)."""
  if isinstance(value, str):
    if value != FROM_VOCAB:
      raise ValueError(f"an id argument is a token id, None or {FROM_VOCAB!r}; got "
                       f"{value!r}")
    return True
  return False


@dataclasses.dataclass(frozen=True)
class SpecialIds:
  """The special ids of a vocabulary (the module docstring's rule).

  Attributes:
    pad: Padding id (the EOS id when the model has no pad piece).
    eos: EOS, the end-of-document (EOD) token.
    bos: BOS id, or None.
    unk: unk id, or None.
  """
  pad: int
  eos: int
  bos: Optional[int] = None
  unk: Optional[int] = None


# The ids of the models ``train_sentencepiece`` writes.
OWN_LAYOUT = SpecialIds(pad=PAD_ID, eos=EOS_ID, bos=None, unk=UNK_ID)


def _processor_of(vocab: Any) -> tuple[Optional[spm.SentencePieceProcessor], str]:
  """(The SentencePiece processor behind ``vocab`` or None, a name for messages)."""
  if isinstance(vocab, (str, os.PathLike)):
    return load_sentencepiece(os.fspath(vocab)), os.fspath(vocab)
  if isinstance(vocab, spm.SentencePieceProcessor):
    return vocab, f"the SentencePiece model ({vocab.get_piece_size()} pieces)"
  processor = getattr(vocab, "processor", None)      # chunk_db.Tokenizer
  if isinstance(processor, spm.SentencePieceProcessor):
    return processor, str(getattr(vocab, "source", None) or
                          f"the SentencePiece model ({processor.get_piece_size()} pieces)")
  if hasattr(vocab, "sp_model") and hasattr(vocab, "tokenizer"):   # seqio vocabulary
    name = getattr(vocab, "sentencepiece_model_file", None) or "the seqio vocabulary"
    return vocab.tokenizer, str(name)
  return None, type(vocab).__name__


def special_ids(vocab: Any, *, default: Optional[SpecialIds] = None,
                name: Optional[str] = None) -> SpecialIds:
  """The special ids of ``vocab`` by the module docstring's rule.

  Args:
    vocab: A SentencePiece model path, a ``SentencePieceProcessor``, a
      ``seqio.SentencePieceVocabulary`` (read from its model, not from seqio's
      ``pad_id``, which is always 0), anything with a ``processor`` attribute holding
      one (``chunk_db.Tokenizer``), or an object with a ``special_ids`` attribute (a
      ``SpecialIds``; test vocabularies).
    default: Returned for an object that is none of these (e.g. a toy vocabulary
      with only ``encode``/``decode``); None raises ``TypeError``.
    name: The model's name in error messages (default: its path when known).
  Raises:
    ValueError naming the model file: the model has no EOS piece.
  """
  declared = getattr(vocab, "special_ids", None)
  if isinstance(declared, SpecialIds):
    return declared
  processor, known = _processor_of(vocab)
  if processor is None:
    if default is not None:
      return default
    raise TypeError(f"special_ids: {known} is not a SentencePiece model path, processor "
                    "or seqio vocabulary")
  eos = processor.eos_id()
  if eos < 0:
    raise ValueError(f"{name or known}: the SentencePiece model has no EOS piece "
                     "(eos_id=-1); documents, passages and SFT examples end with EOS and "
                     "generation stops at it")
  pad = processor.pad_id()
  bos, unk = processor.bos_id(), processor.unk_id()
  return SpecialIds(pad=pad if pad >= 0 else eos, eos=eos,
                    bos=bos if bos >= 0 else None, unk=unk if unk >= 0 else None)


def get_vocabulary(path: str, extra_ids: int = 0):
  """A ``seqio.SentencePieceVocabulary`` for the model file at ``path``."""
  import seqio  # pylint: disable=g-import-not-at-top
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: SentencePiece model not found")
  return seqio.SentencePieceVocabulary(path, extra_ids=extra_ids)


def load_sentencepiece(path: str) -> spm.SentencePieceProcessor:
  """A plain ``SentencePieceProcessor`` (no TensorFlow) for the model at ``path``."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: SentencePiece model not found")
  return spm.SentencePieceProcessor(model_file=path)


def chunk_text(vocab: Vocabulary, tokens: np.ndarray, pad_id: int, eod_id: Optional[int]
               ) -> str:
  """Detokenised text of a chunk without its pad and end-of-document tokens."""
  ids = [int(t) for t in np.asarray(tokens).reshape(-1) if t != pad_id and t != eod_id]
  return vocab.decode(ids)


def passage_neighbors(passages: Sequence[Sequence[int]], length: int, *, pad_id: int,
                      eod_id: Optional[int], num_neighbors: Optional[int] = None
                      ) -> tuple[np.ndarray, np.ndarray]:
  """Token ids of passages as r-token neighbors, laid out as the chunk DB stores a
  neighbor: the ids, EOD, then padding, cut at ``length`` (``chunk_text`` reads one back).

  Args:
    passages: each passage's token ids (no EOD).
    length: r, the neighbor length the model reads.
    eod_id: appended after each passage; None: nothing appended.
    num_neighbors: k (default: one per passage); passages beyond it are dropped and
      missing ones are masked.
  Returns:
    ``(tokens int32 [k, r], mask bool [k])``.
  """
  k = len(passages) if num_neighbors is None else num_neighbors
  tokens = np.full((k, length), pad_id, np.int32)
  mask = np.zeros((k,), bool)
  for j, ids in enumerate(passages[:k]):
    ids = (list(ids) + ([eod_id] if eod_id is not None else []))[:length]
    tokens[j, :len(ids)] = ids
    mask[j] = True
  return tokens, mask


def _lines(documents: Iterable[str], max_bytes: int) -> Iterator[str]:
  """Non-empty lines of the documents, each cut to at most ``max_bytes`` UTF-8 bytes."""
  for text in documents:
    for line in text.split("\n"):
      if not line.strip():
        continue
      if len(line) * 4 > max_bytes:
        data = line.encode("utf-8")
        if len(data) > max_bytes:
          line = data[:max_bytes].decode("utf-8", "ignore")
      yield line


def sample_lines(documents: Iterable[str], max_sentences: int, seed: int = 0,
                 max_bytes: int = 4192) -> list[str]:
  """A uniform, seeded sample of at most ``max_sentences`` lines, in corpus order."""
  rng = np.random.default_rng(seed)
  reservoir: list[tuple[int, str]] = []
  for i, line in enumerate(_lines(documents, max_bytes)):
    if i < max_sentences:
      reservoir.append((i, line))
    else:
      j = int(rng.integers(0, i + 1))
      if j < max_sentences:
        reservoir[j] = (i, line)
  return [line for _, line in sorted(reservoir)]


def train_sentencepiece(documents: Iterable[str], output_prefix: str,
                        vocab_size: int, *, model_type: str = "unigram",
                        max_sentences: int = 1_000_000, max_sentence_bytes: int = 4192,
                        character_coverage: float = 0.9995, byte_fallback: bool = True,
                        split_digits: bool = True, hard_vocab_limit: bool = False,
                        user_defined_symbols: Sequence[str] = (), num_threads: int = 8,
                        seed: int = 0) -> str:
  """Trains a SentencePiece model on a sample of ``documents``; returns the model path.

  Writes ``<output_prefix>.model`` and ``<output_prefix>.vocab`` (piece, tab, score
  per line) through temporary names; the ``.model`` lands last. The model bytes
  depend only on the sample and the arguments (not on the output path). Ids:
  ``PAD_ID``, ``EOS_ID``, ``UNK_ID``, no BOS (``OWN_LAYOUT``).

  Args:
    documents: Texts (e.g. ``text for _, text in corpus.documents()``); split into
      lines for training.
    output_prefix: Output path without suffix.
    vocab_size: Pieces, including 3 specials and 256 byte pieces (byte_fallback).
    model_type: ``'unigram'`` or ``'bpe'``.
    max_sentences: Lines sampled (seeded reservoir) for training.
    max_sentence_bytes: Longer lines are cut to this many bytes.
    character_coverage: Characters covered by pieces; the rest fall back to bytes.
    byte_fallback: Encode unknown characters as UTF-8 byte pieces (no ``<unk>``).
    split_digits: One piece per digit.
    hard_vocab_limit: False lets a small corpus yield fewer than ``vocab_size``
      pieces instead of failing.
    user_defined_symbols: Extra pieces kept whole.
    num_threads: Trainer threads. Part of the output: keep it fixed to reproduce a
      model byte for byte.
    seed: Sampling seed.
  """
  if byte_fallback and vocab_size <= 256 + 3:
    raise ValueError(f"vocab_size={vocab_size} leaves no room beyond the 256 byte "
                     "pieces and 3 specials of byte_fallback")
  sample = sample_lines(documents, max_sentences, seed, max_sentence_bytes)
  if not sample:
    raise ValueError("no non-empty lines to train a SentencePiece model on")
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(sample), model_writer=model, vocab_size=vocab_size,
      model_type=model_type, character_coverage=character_coverage,
      byte_fallback=byte_fallback, split_digits=split_digits,
      pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1,
      pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
      normalization_rule_name="identity", remove_extra_whitespaces=False,
      allow_whitespace_only_pieces=True, input_sentence_size=0,
      shuffle_input_sentence=False, max_sentence_length=max_sentence_bytes,
      hard_vocab_limit=hard_vocab_limit,
      user_defined_symbols=list(user_defined_symbols), num_threads=num_threads,
      minloglevel=2)
  processor = spm.SentencePieceProcessor(model_proto=model.getvalue())
  vocab_lines = "".join(f"{processor.id_to_piece(i)}\t{processor.get_score(i):g}\n"
                        for i in range(processor.get_piece_size()))
  atomic_write_text(output_prefix + ".vocab", vocab_lines)
  with atomic_path(output_prefix + ".model") as tmp:
    with open(tmp, "wb") as f:
      f.write(model.getvalue())
  logging.info("trained %s.model: %d pieces from %d lines", output_prefix,
               processor.get_piece_size(), len(sample))
  return output_prefix + ".model"


# ----------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------


def _define_flags():
  flags.DEFINE_multi_string("input", None, "Corpus files, directories, globs or "
                            "tfds:<name>.", required=True)
  flags.DEFINE_string("output_prefix", None, "Writes <prefix>.model and .vocab.",
                      required=True)
  flags.DEFINE_integer("vocab_size", 32000, "Pieces (incl. 3 specials, 256 bytes).")
  flags.DEFINE_enum("format", "auto", ["auto", "jsonl", "text", "tfds"], "Corpus format.")
  flags.DEFINE_string("text_key", "text", "jsonl key / TFDS feature of the text.")
  flags.DEFINE_enum("text_unit", "file", ["file", "line"], "Text files: a document "
                    "per file or per line.")
  flags.DEFINE_string("tfds_split", "train", "TFDS split.")
  flags.DEFINE_string("tfds_data_dir", None, "TFDS data directory.")
  flags.DEFINE_enum("model_type", "unigram", ["unigram", "bpe"], "SentencePiece model.")
  flags.DEFINE_integer("max_sentences", 1_000_000, "Lines sampled for training.")
  flags.DEFINE_integer("max_documents", None, "Read at most this many documents.")
  flags.DEFINE_float("character_coverage", 0.9995, "Character coverage.")
  flags.DEFINE_integer("num_threads", 8, "Trainer threads (fixed for reproducibility).")
  flags.DEFINE_integer("seed", 0, "Sampling seed.")
  return flags.FLAGS


def _take(documents: Iterable[str], limit: Optional[int]) -> Iterator[str]:
  for i, text in enumerate(documents):
    if limit is not None and i >= limit:
      return
    yield text


def main(argv: Sequence[str]) -> None:
  del argv
  f = flags.FLAGS
  inputs = f.input[0] if len(f.input) == 1 else f.input
  corpus = corpus_lib.open_corpus(inputs, format=f.format, text_key=f.text_key,
                                  text_unit=f.text_unit, tfds_split=f.tfds_split,
                                  tfds_data_dir=f.tfds_data_dir)
  texts = _take((text for _, text in corpus.documents()), f.max_documents)
  path = train_sentencepiece(texts, f.output_prefix, f.vocab_size,
                             model_type=f.model_type, max_sentences=f.max_sentences,
                             character_coverage=f.character_coverage,
                             num_threads=f.num_threads, seed=f.seed)
  print(f"wrote {path} ({load_sentencepiece(path).get_piece_size()} pieces)")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
