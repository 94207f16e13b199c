r"""Bits per byte: a tokenizer-independent loss (RETRO reports C4 / Pile in bpb).

    table = token_byte_lengths(vocab_path)          # int64 [vocab]: UTF-8 bytes per id
    nbytes = target_bytes(batch, table)             # bytes of the scored targets
    bpb = bits_per_byte(loss, tokens, nbytes)       # = loss * tokens / (bytes * ln 2)

A perplexity depends on the tokenizer (a vocabulary with longer pieces has fewer, harder
tokens); the loss of the whole text in bits divided by its length in UTF-8 bytes does
not. ``loss`` is the mean loss in nats per scored token, so ``loss * tokens`` is the
text's total loss in nats.

The byte length of a SentencePiece id (``token_byte_lengths``):

* a normal or user-defined piece: its text with every ``'▁'`` read as one space,
  encoded as UTF-8;
* a byte-fallback piece ``<0xXX>``: one byte;
* a control or unknown piece (``<pad>``, ``</s>``, ``<unk>``): the length of what
  ``decode([id])`` gives (0 for control pieces: an end-of-document target costs loss
  but adds no bytes).

Leading-space convention: ``decode`` drops the ``'▁'`` that starts a text, the table
counts it. So the bytes of ids ``ids`` are ``len(decode(ids).encode())`` plus one where
the first non-control piece starts with ``'▁'`` (a chunk taken from the middle of a
document really does begin with that space). Our vocabularies add SentencePiece's dummy
prefix, so an encoded document is its text's bytes plus one: a space before each
document, less than 0.1% of a 1 kB document. A run of byte pieces that is not valid UTF-8 counts its raw
bytes, where ``decode`` would print replacement characters.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import numpy as np

from retro_jax.data import vocab as vocab_lib

SPACE_PIECE = "\u2581"     # '▁', SentencePiece's whitespace


def token_byte_lengths(vocab: Any, size: Optional[int] = None) -> np.ndarray:
  """UTF-8 bytes of every id of a SentencePiece model (see the module docstring).

  Args:
    vocab: a ``.model`` path or a ``SentencePieceProcessor``.
    size: length of the table (the model's ``vocab_size``, which may exceed the piece
      count; ids beyond the pieces get 0 bytes). Default: the piece count.
  Returns:
    int64 [size].
  """
  sp = vocab_lib.load_sentencepiece(vocab) if isinstance(vocab, str) else vocab
  pieces = sp.get_piece_size()
  size = pieces if size is None else size
  if size < pieces:
    raise ValueError(f"token_byte_lengths: size={size} is below the vocabulary's "
                     f"{pieces} pieces")
  table = np.zeros(size, np.int64)
  for i in range(pieces):
    if sp.is_byte(i):
      table[i] = 1
    elif sp.is_control(i) or sp.is_unknown(i):
      table[i] = len(sp.decode([i]).encode("utf-8"))
    else:
      table[i] = len(sp.id_to_piece(i).replace(SPACE_PIECE, " ").encode("utf-8"))
  return table


def target_bytes(batch: Mapping[str, Any], table: np.ndarray,
                 mask: Optional[np.ndarray] = None) -> float:
  """UTF-8 bytes of a batch's scored targets: ``sum(table[target] * weight [* mask])``.

  Args:
    batch: model features with ``decoder_target_tokens`` and ``decoder_loss_weights``
      ``[batch, n]``.
    mask: optional bool ``[batch, n]`` (a class of target tokens).
  """
  targets = np.asarray(batch["decoder_target_tokens"])
  weights = np.asarray(batch["decoder_loss_weights"], np.float64)
  if targets.size and (targets.min() < 0 or targets.max() >= len(table)):
    raise ValueError(f"decoder_target_tokens: ids {targets.min()}..{targets.max()} outside "
                     f"the byte table of {len(table)} ids (another vocabulary?)")
  if mask is not None:
    weights = weights * np.asarray(mask, bool)
  return float(np.sum(table[targets] * weights))


def bits_per_byte(loss: float, tokens: float, nbytes: float) -> float:
  """``loss * tokens / (bytes * ln 2)``: mean nats per token -> bits per UTF-8 byte
  (NaN when there are no bytes)."""
  if nbytes <= 0:
    return float("nan")
  return loss * tokens / (nbytes * math.log(2.0))


def with_bits_per_byte(row: Mapping[str, Any], nbytes: float) -> dict[str, Any]:
  """``row`` (with ``loss`` and ``tokens``) plus ``bytes`` and ``bpb``."""
  return dict(row, bytes=nbytes, bpb=bits_per_byte(row["loss"], row["tokens"], nbytes))
