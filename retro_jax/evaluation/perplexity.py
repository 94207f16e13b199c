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
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any, Mapping, Optional

import gin
import numpy as np

from retro_jax.models import RetroConfig
from retro_jax.training import checkpoints as ckpt_lib
from retro_jax.models import partitioning
from retro_jax.training.trainer import BatchSource, Evaluator
from retro_jax.utils.io import atomic_write_json, atomic_write_text


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


@gin.configurable
def perplexity_table(model_config: RetroConfig, checkpoints: Mapping[str, str],
                     eval_source: BatchSource, num_batches: int, *,
                     mesh_shape: Optional[dict] = None) -> list[dict[str, Any]]:
  """Scores each checkpoint; a Retro checkpoint gives two rows (retrieval, ablated).

  Args:
    model_config: The architecture of every checkpoint (GPT ones use its decoder).
    checkpoints: display name -> checkpoint path (MODEL_DIR or a step directory).
    eval_source: batches with neighbor features.
  Returns:
    Rows {'model', 'mode', 'checkpoint', 'loss', 'perplexity', 'accuracy', 'tokens'}.
  """
  return [dict(model=name, mode=mode, checkpoint=path,
               **evaluator.evaluate(params, eval_source, num_batches))
          for name, path, mode, params, evaluator in _checkpoint_modes(
              model_config, checkpoints, mesh_shape)]


def format_table(rows: list[dict[str, Any]]) -> str:
  lines = ["| model | mode | loss | perplexity | token accuracy | tokens |",
           "|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['model']} | {r['mode']} | {r['loss']:.4f} | {r['perplexity']:.3f} | "
                 f"{r['accuracy']:.4f} | {int(r['tokens'])} |")
  return "\n".join(lines)


def write_results(rows: list[dict[str, Any]], output_dir: str, name: str = "perplexity"
                  ) -> str:
  """Writes ``<name>.json`` and ``<name>.md``; returns the markdown table."""
  table = format_table(rows)
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
                      classes: Mapping[str, Any], *, mesh_shape: Optional[dict] = None
                      ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
  """``perplexity_table`` and the same scores on classes of target tokens, from one
  forward pass per batch.

  Args:
    classes: class name -> ``mask_fn(batch) -> bool [b, n]`` (e.g. ``PhraseMatcher``);
      the class ``'other'`` (tokens in no class) is added.
  Returns:
    ``(rows, class_rows)``: the rows of ``perplexity_table``, and rows
    ``{'class', 'model', 'mode', 'checkpoint', 'loss', 'tokens', ...}``.
  """
  rows, class_rows = [], []
  for name, path, mode, params, evaluator in _checkpoint_modes(model_config, checkpoints,
                                                              mesh_shape):
    scores = evaluator.evaluate_classes(params, eval_source, num_batches, classes)
    head = dict(model=name, mode=mode, checkpoint=path)
    rows.append(dict(head, **scores.pop("all")))
    class_rows += [dict({"class": c}, **head, **s) for c, s in scores.items()]
  order = [*classes, "other"]    # grouped by class, as the tables read
  class_rows.sort(key=lambda r: order.index(r["class"]))
  return rows, class_rows
