r"""Held-out perplexity in the three modes of the RETRO / InstructRetro evaluations.

* ``Retro``: the Retro checkpoint with its retrieved neighbors;
* ``Retro, encoder ablated``: the same parameters with retrieval off (the decoder
  alone; InstructRetro's "encoder ablated" mode);
* ``GPT baseline``: a GPT(-fitting) checkpoint, retrieval off, on the same tokens.

    from retro_jax.evaluation.perplexity import perplexity_table
    rows = perplexity_table(config, {"Retro": retro_dir, "GPT baseline": gpt_dir},
                            eval_source, num_batches=8)

The eval source is a batch source with neighbor features (``get_batch(i)``); the GPT
rows ignore the neighbors, so every row scores identical tokens.

``eval_perplexity`` (gin-configurable: ``python -m retro_jax.eval``'s perplexity task and
the recipe bind it) runs the table over a split of a prepared retrieval directory and
writes it; with ``token_classes`` (e.g. ``db_only_token_classes``, ``PhraseMatcher``) it
also scores classes of target tokens: where a retrieval gain comes from. Its rows carry
bits per byte beside perplexity (``bytes``: UTF-8 bytes of the scored targets; ``bpb``;
``retro_jax.evaluation.bits_per_byte``), which ``perplexity_table`` and
``token_class_table`` add when given ``token_bytes``.
"""

from __future__ import annotations

import copy
import json
import math
import os
from typing import Any, Mapping, Optional

from absl import logging
import gin
import numpy as np
import sentencepiece as spm

from retro_jax.data import batches
from retro_jax.evaluation.bits_per_byte import (target_bytes, token_byte_lengths,
                                                with_bits_per_byte)
from retro_jax.evaluation.report import CLASS_COLUMNS, markdown_table
from retro_jax.models import RetroConfig
from retro_jax.models import partitioning
from retro_jax.retrieval.layout import RetrievalLayout
from retro_jax.training import checkpoints as ckpt_lib
from retro_jax.training.trainer import BatchSource, Evaluator
from retro_jax.utils.io import atomic_write_json, atomic_write_text

PERPLEXITY_COLUMNS = (("model", "model"), ("mode", "mode"), ("loss", "loss", ".4f"),
                      ("perplexity", "perplexity", ".3f"), ("bpb", "bits/byte"),
                      ("accuracy", "token accuracy", ".4f"), ("tokens", "tokens", ".0f"))


def count_target_bytes(source: BatchSource, num_batches: int, token_bytes: np.ndarray,
                       classes: Optional[Mapping[str, Any]] = None) -> dict[str, float]:
  """UTF-8 bytes of the scored targets of ``num_batches`` batches: ``{'all': ...}`` and,
  with ``classes`` (name -> ``mask_fn(batch) -> bool [b, n]``), each class and
  ``'other'`` (tokens in no class), as ``Evaluator.evaluate_classes`` splits them."""
  classes = classes or {}
  totals = dict.fromkeys(["all", *classes] + (["other"] if classes else []), 0.0)
  for i in range(num_batches):
    batch = source.get_batch(i)
    totals["all"] += target_bytes(batch, token_bytes)
    if classes:
      masks = {name: np.asarray(fn(batch), bool) for name, fn in classes.items()}
      for name, mask in masks.items():
        totals[name] += target_bytes(batch, token_bytes, mask)
      totals["other"] += target_bytes(batch, token_bytes, ~np.any(list(masks.values()), 0))
  return totals


def _checkpoint_modes(model_config: RetroConfig, checkpoints: Mapping[str, str],
                      mesh_shape: Optional[dict]):
  """Yields ``(name, path, mode, params, evaluator)``: a Retro checkpoint in two modes
  (retrieval, encoder ablated), a GPT one in one (decoder only); each loaded once."""
  mesh = partitioning.make_mesh(mesh_shape)
  for name, path in checkpoints.items():
    params, shardings, has_retro = ckpt_lib.load_model_params(path, model_config, mesh)
    modes = [("retrieval", True), ("encoder ablated", False)] if has_retro else [
        ("decoder only", False)]
    for mode, retrieval in modes:
      yield name, path, mode, params, Evaluator(model_config, mesh, shardings,
                                                retrieval=retrieval)


def perplexity_table(model_config: RetroConfig, checkpoints: Mapping[str, str],
                     eval_source: BatchSource, num_batches: int, *,
                     mesh_shape: Optional[dict] = None,
                     token_bytes: Optional[np.ndarray] = None) -> list[dict[str, Any]]:
  """Scores each checkpoint; a Retro checkpoint gives two rows (retrieval, ablated).

  Args:
    model_config: The architecture of every checkpoint (GPT ones use its decoder).
    checkpoints: display name -> checkpoint path (MODEL_DIR or a step directory).
    eval_source: batches with neighbor features.
    token_bytes: int [vocab] UTF-8 bytes per token id (``token_byte_lengths``): adds
      ``bytes`` and ``bpb`` to every row.
  Returns:
    Rows {'model', 'mode', 'checkpoint', 'loss', 'perplexity', 'accuracy', 'tokens'}
    (+ 'bytes', 'bpb').
  """
  rows = [dict(model=name, mode=mode, checkpoint=path,
               **evaluator.evaluate(params, eval_source, num_batches))
          for name, path, mode, params, evaluator in _checkpoint_modes(
              model_config, checkpoints, mesh_shape)]
  if token_bytes is None:
    return rows
  nbytes = count_target_bytes(eval_source, num_batches, token_bytes)["all"]
  return [with_bits_per_byte(row, nbytes) for row in rows]


def write_results(rows: list[dict[str, Any]], output_dir: str, name: str = "perplexity"
                  ) -> str:
  """Writes ``<name>.json`` and ``<name>.md``; returns the markdown table."""
  table = markdown_table(rows, PERPLEXITY_COLUMNS)
  atomic_write_json(os.path.join(output_dir, f"{name}.json"), rows)
  atomic_write_text(os.path.join(output_dir, f"{name}.md"), table + "\n")
  return table


def load_results(output_dir: str, name: str = "perplexity") -> list[dict[str, Any]]:
  with open(os.path.join(output_dir, f"{name}.json"), encoding="utf-8") as f:
    return json.load(f)


# Loss by token class: where a retrieval gain comes from ---------------------------------


class PhraseMatcher:
  """Marks the target tokens that belong to any of a set of phrases.

  Each phrase is tokenised as it appears after a space and at the start of a text
  (SentencePiece pieces differ); ``__call__(batch)`` returns a bool mask ``[b, n]`` of
  ``decoder_target_tokens`` positions inside an occurrence.

  ``mentions='first'`` keeps only the first occurrence of each phrase in an example and
  ``'repeated'`` only the later ones (those the decoder could copy from its own
  context); ``positions=(start, stop)`` keeps occurrences that start in that range of
  target positions (``stop`` None: to the end). With chunk length m, a target at
  position ``t >= m - 1`` is predicted after the first chunk's neighbors are in (the
  shifted chunked cross-attention), so ``positions=(0, m - 1)`` are the occurrences no
  retrieval can help. ``select(...)`` gives such a matcher over the same phrases that
  shares this one's tokenised phrases and its scans: each batch's targets are scanned
  once, however many views and checkpoints score them (up to ``max_cached_batches``
  batches are remembered).
  """

  max_cached_batches = 4096

  def __init__(self, encode, phrases, *, mentions: str = "all",
               positions: tuple[int, Optional[int]] = (0, None)):
    # first token -> {(token ids, phrase)}: a phrase has up to two tokenisations.
    self.by_first: dict[int, set[tuple[tuple[int, ...], str]]] = {}
    for phrase in phrases:
      for ids in (tuple(encode(" " + phrase)), tuple(encode(phrase))):
        if ids:
          self.by_first.setdefault(ids[0], set()).add((ids, phrase))
    self._scanned: dict[tuple, list] = {}   # (shape, target bytes) -> occurrences per row
    self._set_selection(mentions, positions)

  def _set_selection(self, mentions: str, positions: tuple[int, Optional[int]]) -> None:
    if mentions not in ("all", "first", "repeated"):
      raise ValueError(f"mentions must be 'all', 'first' or 'repeated', got {mentions!r}")
    self.mentions, self.positions = mentions, positions

  def select(self, *, mentions: str = "all",
             positions: tuple[int, Optional[int]] = (0, None)) -> "PhraseMatcher":
    """The same phrases with another ``mentions`` / ``positions`` selection."""
    view = copy.copy(self)     # shares by_first and the scans
    view._set_selection(mentions, positions)  # pylint: disable=protected-access
    return view

  def occurrences(self, seq: list[int]) -> list[tuple[int, tuple[int, ...], bool]]:
    """``(start, token ids, first mention of its phrase?)`` of every occurrence."""
    found, seen = [], set()
    for start, token in enumerate(seq):
      for ids, phrase in sorted(self.by_first.get(token, ())):
        if tuple(seq[start:start + len(ids)]) == ids:
          found.append((start, ids, phrase not in seen))
          seen.add(phrase)
    return found

  def _batch_occurrences(self, targets: np.ndarray) -> list[list]:
    key = (targets.shape, targets.tobytes())
    if key not in self._scanned:
      if len(self._scanned) >= self.max_cached_batches:
        self._scanned.clear()
      self._scanned[key] = [self.occurrences(row.tolist()) for row in targets]
    return self._scanned[key]

  def __call__(self, batch: Mapping[str, Any]) -> np.ndarray:
    targets = np.asarray(batch["decoder_target_tokens"])
    mask = np.zeros(targets.shape, bool)
    lo, hi = self.positions
    hi = targets.shape[1] if hi is None else hi
    for row, found in enumerate(self._batch_occurrences(targets)):
      for start, ids, first in found:
        if (self.mentions == "all" or first == (self.mentions == "first")) and lo <= start < hi:
          mask[row, start:start + len(ids)] = True
    return mask


def token_class_table(model_config: RetroConfig, checkpoints: Mapping[str, str],
                      eval_source: BatchSource, num_batches: int,
                      classes: Mapping[str, Any], *, mesh_shape: Optional[dict] = None,
                      token_bytes: Optional[np.ndarray] = None
                      ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
  """``perplexity_table`` and the same scores on classes of target tokens, from one
  forward pass per batch.

  Args:
    classes: class name -> ``mask_fn(batch) -> bool [b, n]`` (e.g. ``PhraseMatcher``);
      the class ``'other'`` (tokens in no class) is added.
    token_bytes: as ``perplexity_table``: ``bytes`` and ``bpb`` on every row.
  Returns:
    ``(rows, class_rows)``: the rows of ``perplexity_table``, and rows
    ``{'class', 'model', 'mode', 'checkpoint', 'loss', 'tokens', ...}``.
  """
  rows, class_rows = [], []
  nbytes = None if token_bytes is None else count_target_bytes(
      eval_source, num_batches, token_bytes, classes)
  for name, path, mode, params, evaluator in _checkpoint_modes(model_config, checkpoints,
                                                              mesh_shape):
    scores = evaluator.evaluate_classes(params, eval_source, num_batches, classes)
    if nbytes is not None:
      scores = {c: with_bits_per_byte(s, nbytes[c]) for c, s in scores.items()}
    head = dict(model=name, mode=mode, checkpoint=path)
    rows.append(dict(head, **scores.pop("all")))
    class_rows += [dict({"class": c}, **head, **s) for c, s in scores.items()]
  order = [*classes, "other"]    # grouped by class, as the tables read
  class_rows.sort(key=lambda r: order.index(r["class"]))
  return rows, class_rows


def db_only_token_classes(kb_path: str, vocab_path: str, chunk_length: int
                          ) -> Optional[dict[str, Any]]:
  """Token classes of the held-out text (the encyclopedia's db-only entities), each
  example being one document: the values of their facts, split into first mentions
  before the first chunk's neighbors arrive (positions < chunk_length - 1: no retrieval
  can help), first mentions after (what retrieval is for) and repeated mentions (the
  decoder can copy them from the document itself); and their names, first and repeated
  mentions (a decoder that copies from its context predicts a repeated name almost
  surely). None for a corpus without ``kb.json``."""
  if not os.path.exists(kb_path):
    return None
  with open(kb_path, encoding="utf-8") as f:
    entities = [e for e in json.load(f)["entities"] if e["split"] == "db_only"]
  encode = spm.SentencePieceProcessor(model_file=vocab_path).encode
  values = sorted({v for e in entities for v in e["facts"].values()})
  names = sorted({e["name"] for e in entities} | {w for e in entities
                                                 for w in e["name"].split() if len(w) > 3})
  first_neighbors = chunk_length - 1
  value_matcher, name_matcher = PhraseMatcher(encode, values), PhraseMatcher(encode, names)
  return {
      "fact values, first mention, first chunk": value_matcher.select(
          mentions="first", positions=(0, first_neighbors)),
      "fact values, first mention, later chunks": value_matcher.select(
          mentions="first", positions=(first_neighbors, None)),
      "fact values, repeated": value_matcher.select(mentions="repeated"),
      "entity names, first mention": name_matcher.select(mentions="first"),
      "entity names, repeated": name_matcher.select(mentions="repeated")}


# The evaluation run -----------------------------------------------------------------


def eval_batches(source: Any) -> int:
  """Batches that score every example of a finite (``num_epochs``) source once."""
  total = source.stream.num_positions
  if total is None:
    raise ValueError(f"{source.name}: an evaluation source must be finite "
                     "(num_epochs=1)")
  return max(1, math.ceil(total / source.batch_size))


@gin.configurable
def eval_perplexity(*, output_dir: str, checkpoints: Mapping[str, str] = gin.REQUIRED,
                    retrieval_dir: str = gin.REQUIRED, split: str = "valid",
                    seq_len: int = gin.REQUIRED, batch_size: int = 16,
                    model_config: Optional[RetroConfig] = None,
                    mesh_shape: Optional[dict] = None, name: str = "perplexity",
                    token_classes: Optional[Mapping[str, Any]] = None
                    ) -> list[dict[str, Any]]:
  """Perplexity of each checkpoint on a split of ``retrieval_dir`` (every example
  once): a Retro checkpoint gives two rows (with its retrieved neighbors; encoder
  ablated), a GPT checkpoint one (decoder only), each with bits per byte (the UTF-8
  bytes of the scored targets, from the directory's vocabulary); writes
  ``{name}.json/.md`` under ``output_dir`` and returns the rows.

  ``token_classes`` (name -> ``mask_fn(batch) -> bool [b, n]``, e.g.
  ``PhraseMatcher``) also writes ``{name}_by_class.json/.md``: the loss of
  every row on each class of target tokens (and on the rest), i.e. where a retrieval
  gain comes from.
  """
  model_config = model_config or RetroConfig()
  source = batches.pretraining_batch_source(
      retrieval_dir, split=split, seq_len=seq_len, batch_size=batch_size,
      with_neighbors=True, shuffle=False, num_epochs=1, model_config=model_config)
  token_bytes = token_byte_lengths(RetrievalLayout(retrieval_dir).vocab_path,
                                   model_config.vocab_size)
  if token_classes:    # the same forward passes score every class
    rows, by_class = token_class_table(
        model_config, checkpoints, source, eval_batches(source), token_classes,
        mesh_shape=mesh_shape, token_bytes=token_bytes)
  else:
    rows = perplexity_table(model_config, checkpoints, source, eval_batches(source),
                            mesh_shape=mesh_shape, token_bytes=token_bytes)
  table = write_results(rows, output_dir, name)
  logging.info("perplexity on %s/%s:\n%s", retrieval_dir, split, table)
  if token_classes:
    atomic_write_json(os.path.join(output_dir, f"{name}_by_class.json"), by_class)
    table = markdown_table(by_class, CLASS_COLUMNS)
    atomic_write_text(os.path.join(output_dir, f"{name}_by_class.md"), table + "\n")
    logging.info("loss by token class:\n%s", table)
  return rows
