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

import json
import os
from typing import Any, Mapping, Optional

import gin
import numpy as np

from retro_jax.models import RetroConfig
from retro_jax.training import checkpoints as ckpt_lib
from retro_jax.training import partitioning
from retro_jax.training.trainer import BatchSource, Evaluator
from retro_jax.utils.io import atomic_write_json, atomic_write_text


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
  mesh = partitioning.make_mesh(mesh_shape)
  rows = []
  for name, path in checkpoints.items():
    params, shardings, has_retro = ckpt_lib.load_model_params(path, model_config, mesh)
    modes = [("retrieval", True), ("encoder ablated", False)] if has_retro else [
        ("decoder only", False)]
    for mode, retrieval in modes:
      evaluator = Evaluator(model_config, mesh, shardings, retrieval=retrieval)
      scores = evaluator.evaluate(params, eval_source, num_batches)
      rows.append(dict(model=name, mode=mode, checkpoint=path, **scores))
  return rows


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


class WeightedSource:
  """A batch source whose loss weights are multiplied by ``mask_fn(batch)`` ``[b, n]``
  (to score one class of target tokens only)."""

  def __init__(self, source: BatchSource, mask_fn):
    self.source, self.mask_fn = source, mask_fn

  def get_batch(self, index: int) -> dict:
    batch = dict(self.source.get_batch(index))
    mask = np.asarray(self.mask_fn(batch), np.float32)
    batch["decoder_loss_weights"] = batch["decoder_loss_weights"] * mask
    return batch


class PhraseMatcher:
  """Marks the target tokens that belong to any of a set of phrases.

  Each phrase is tokenised as it appears after a space and at the start of a text
  (SentencePiece pieces differ); ``__call__(batch)`` returns a bool mask ``[b, n]`` of
  ``decoder_target_tokens`` positions inside an occurrence.
  """

  def __init__(self, encode, phrases):
    self.by_first: dict[int, set[tuple[int, ...]]] = {}
    for phrase in phrases:
      for ids in (tuple(encode(" " + phrase)), tuple(encode(phrase))):
        if ids:
          self.by_first.setdefault(ids[0], set()).add(ids)

  def __call__(self, batch: Mapping[str, Any]) -> np.ndarray:
    targets = np.asarray(batch["decoder_target_tokens"])
    mask = np.zeros(targets.shape, bool)
    for row in range(targets.shape[0]):
      seq = targets[row].tolist()
      for start, token in enumerate(seq):
        for ids in self.by_first.get(token, ()):
          if tuple(seq[start:start + len(ids)]) == ids:
            mask[row, start:start + len(ids)] = True
    return mask


def token_class_table(model_config: RetroConfig, checkpoints: Mapping[str, str],
                      eval_source: BatchSource, num_batches: int,
                      classes: Mapping[str, Any], *, mesh_shape: Optional[dict] = None
                      ) -> list[dict[str, Any]]:
  """``perplexity_table`` restricted to classes of target tokens.

  Args:
    classes: class name -> ``mask_fn(batch) -> bool [b, n]`` (e.g. ``PhraseMatcher``);
      the class ``'other'`` (tokens in no class) is added.
  Returns:
    Rows ``{'model', 'mode', 'class', 'loss', 'tokens', ...}``.
  """
  def other(batch):
    return ~np.any([fn(batch) for fn in classes.values()], axis=0)

  rows = []
  for name, fn in list(classes.items()) + [("other", other)]:
    for row in perplexity_table(model_config, checkpoints, WeightedSource(eval_source, fn),
                                num_batches, mesh_shape=mesh_shape):
      rows.append({"class": name, **row})
  return rows
