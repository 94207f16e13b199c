r"""Evaluation entry point: held-out perplexity in three modes, and zero-shot QA.

    python -m retro_jax.eval --gin_file=gin/recipes/eval_ppl.gin \
        --gin.OUTPUT_DIR=/tmp/eval --gin.RETRIEVAL_DIR=/tmp/retrieval \
        --gin.CHECKPOINTS="{'Retro': '/tmp/retro', 'GPT-fit': '/tmp/gptfit'}"
    python -m retro_jax.eval --gin_file=gin/recipes/eval_qa.gin \
        --gin.OUTPUT_DIR=/tmp/eval --gin.RETRIEVAL_DIR=/tmp/retrieval \
        --gin.CHECKPOINT=/tmp/retro_sft --gin.QA_FILE=nq_test.jsonl
    python -m retro_jax.eval --gin_file=gin/recipes/eval_qa_instructretro.gin \
        --gin.OUTPUT_DIR=/tmp/eval --gin.CHECKPOINT=/runs/ir8b \
        --gin.QA_FILE=/data/NQ/test.json

The model architecture comes from gin (a size file such as ``tiny.gin``), as in
``retro_jax.train``, unless the checkpoint stores its own (``eval_qa`` of a model
directory written by ``retro_jax.convert``: architecture and vocabulary come from the
directory). Only ``evaluate``, ``eval_perplexity`` and ``eval_qa`` are configurable;
each writes its results under ``output_dir``:

* ``eval_perplexity``: one table (``perplexity.md`` / ``.json``) over a split of a
  prepared retrieval directory (default 'valid'): a Retro checkpoint gives two rows
  (with its retrieved neighbors; encoder ablated), a GPT checkpoint one (decoder only),
  all on identical tokens, every example scored once.
* ``eval_qa``: NQ / TriviaQA-style questions, answered by greedy generation; each
  *mode* is a row: how many retrieved passages go into the prompt (InstructRetro's
  "title: ..., source: ..." contexts) and what the encoder reads ('none', 'passages'
  or 'live' retrieval). Questions without ``ctxs`` get theirs from the retrieval
  directory's index (top passages of the question). Predictions and scores per mode
  (``{name}_predictions.jsonl``, ``{name}_scores.json``) and one table ``qa.md``.
  ``eval_qa_instructretro.gin`` sets it up as Megatron-LM's released InstructRetro
  scripts evaluate (prompt truncation, 66 greedy tokens, ``scoring='megatron'``).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import re
from typing import Any, Mapping, Optional, Sequence

from absl import flags
from absl import logging
import gin

from retro_jax.evaluation import perplexity as perplexity_lib
from retro_jax.evaluation import qa as qa_lib
from retro_jax.evaluation.report import markdown_table
from retro_jax.models import RetroConfig
from retro_jax.utils import gin_utils
from retro_jax.utils.io import atomic_write_json, atomic_write_text

DEFAULT_QA_MODES = {
    "question only": {"num_passages": 0, "neighbors": "none"},
    "retrieval": {"num_passages": 2, "neighbors": "live"},
}
CLASS_COLUMNS = (("class", "target tokens"), ("model", "model"), ("mode", "mode"),
                 ("loss", "loss"), ("accuracy", "token accuracy"), ("tokens", "tokens"))
QA_COLUMNS = (("model", "model"), ("mode", "mode"), ("exact_match", "exact match"),
              ("f1", "F1"), ("count", "questions"))


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
  """Perplexity of each checkpoint on a split; returns the rows (see module doc).

  ``token_classes`` (name -> ``mask_fn(batch) -> bool [b, n]``, e.g.
  ``perplexity.PhraseMatcher``) also writes ``{name}_by_class.json/.md``: the loss of
  every row on each class of target tokens (and on the rest), i.e. where a retrieval
  gain comes from.
  """
  from retro_jax.data import tasks  # pylint: disable=g-import-not-at-top
  model_config = model_config or RetroConfig()
  source = tasks.pretraining_batch_source(
      retrieval_dir, split=split, seq_len=seq_len, batch_size=batch_size,
      with_neighbors=True, shuffle=False, num_epochs=1, model_config=model_config)
  if token_classes:    # the same forward passes score every class
    rows, by_class = perplexity_lib.token_class_table(
        model_config, checkpoints, source, eval_batches(source), token_classes,
        mesh_shape=mesh_shape)
  else:
    rows = perplexity_lib.perplexity_table(model_config, checkpoints, source,
                                           eval_batches(source), mesh_shape=mesh_shape)
  table = perplexity_lib.write_results(rows, output_dir, name)
  logging.info("perplexity on %s/%s:\n%s", retrieval_dir, split, table)
  if token_classes:
    atomic_write_json(os.path.join(output_dir, f"{name}_by_class.json"), by_class)
    table = markdown_table(by_class, CLASS_COLUMNS)
    atomic_write_text(os.path.join(output_dir, f"{name}_by_class.md"), table + "\n")
    logging.info("loss by token class:\n%s", table)
  return rows


def with_cca_gate(generator: Any, gate: Optional[float]) -> Any:
  """The generator with its model's CCA gate set to ``gate`` (same parameters); the
  released InstructRetro checkpoints store Megatron's ``--retro-attention-gate 0``."""
  if gate is None or float(gate) == generator.config.cca_gate:
    return generator
  other = copy.copy(generator)
  other.config = dataclasses.replace(generator.config, cca_gate=float(gate))
  return other


def retrieved_contexts(retriever: Any, questions: Sequence[str], count: int
                       ) -> list[list[dict[str, str]]]:
  """Top ``count`` DB passages (chunk + continuation text) of each question."""
  if count <= 0:
    return [[] for _ in questions]
  _, _, info = retriever.query_texts(list(questions), k=count)
  return [[{"title": hit.get("title", ""), "text": hit["text"]} for hit in hits]
          for hits in info]


def with_retrieved_contexts(rows: Sequence[Mapping[str, Any]], retriever: Any,
                            count: int, batch: int = 256) -> list[dict[str, Any]]:
  """QA rows (``{"question", ...}``) with their top ``count`` passages as ``ctxs``,
  retrieved ``batch`` questions at a time."""
  out = []
  for start in range(0, len(rows), batch):
    part = rows[start:start + batch]
    contexts = retrieved_contexts(retriever, [r["question"] for r in part], count)
    out += [dict(r, ctxs=c) for r, c in zip(part, contexts)]
  return out


@gin.configurable
def eval_qa(*, output_dir: str, checkpoint: str = gin.REQUIRED, qa_file: str = gin.REQUIRED,
            retrieval_dir: Optional[str] = None, model_name: str = "model",
            modes: Mapping[str, Mapping[str, Any]] = gin.REQUIRED,
            model_config: Optional[RetroConfig] = None, vocab_path: Optional[str] = None,
            max_examples: Optional[int] = None, max_new_tokens: int = 16,
            batch_size: int = 16, align_prompts: bool = True,
            retriever: Any = None, scoring: str = "default",
            max_seq_len: Optional[int] = None, output_reserve: Optional[int] = None,
            dev_max_examples: Optional[int] = None,
            param_dtype: Optional[str] = None) -> list[dict[str, Any]]:
  """Zero-shot QA of one checkpoint in several modes; returns one row per mode (scores,
  settings and the path of its ``predictions`` file, for paired comparisons:
  ``retro_jax.evaluation.qa.paired_exact_match``).

  Args:
    output_dir: Gets ``{model_name}_{mode}_predictions.jsonl`` / ``_scores.json`` and
      ``{model_name}_qa.md``.
    checkpoint: MODEL_DIR (or step directory) of a GPT or Retro checkpoint.
    qa_file: jsonl (or .json list) of ``{question, answers, ctxs?}``.
    retrieval_dir: Prepared retrieval directory: the vocabulary, the index for live
      retrieval and for questions without ``ctxs``. Not needed when every question
      has ``ctxs`` and the model directory has its vocabulary (``vocab/spm.model``).
    modes: row name -> ``{"num_passages": int, "neighbors": "none"|"passages"|"live"}``,
      optionally ``"cca_gate": float`` (the CCA gate of this row: e.g. 1.0 to read the
      neighbors with a checkpoint stored with Megatron's gate 0).
    model_config: The architecture (default: the one stored in the checkpoint, else
      gin's ``RetroConfig()``).
    max_examples: Score the first N questions only.
    align_prompts: Left-pad prompts to a chunk boundary (the question's chunk is then
      retrieved before the answer starts; see ``run_qa``).
    retriever: An already built retriever (else one is loaded from ``retrieval_dir``).
    scoring, max_seq_len, output_reserve: As ``run_qa`` ('megatron': Megatron's
      post-processing and scores; contexts cut so that the prompt fits
      ``max_seq_len - output_reserve`` tokens).
    dev_max_examples: When the QA file's name contains "dev", score only its first
      N questions (Megatron's evaluate.py: 3000).
    param_dtype: Hold the parameters in this dtype (e.g. 'bfloat16': 2 bytes each, as
      Megatron's --bf16 inference) whatever the stored architecture says.
  """
  from retro_jax import generate  # pylint: disable=g-import-not-at-top
  from retro_jax.retrieval import retriever as retriever_lib  # pylint: disable=g-import-not-at-top
  for mode, spec in modes.items():
    unknown = set(spec) - {"num_passages", "neighbors", "cca_gate"}
    if unknown or spec.get("neighbors", "none") not in qa_lib.NEIGHBOR_MODES:
      raise ValueError(f"eval_qa.modes[{mode!r}]={dict(spec)}: expected keys num_passages "
                       f"and neighbors (one of {qa_lib.NEIGHBOR_MODES}), optionally "
                       "cca_gate")
  needs_retriever = any(spec.get("neighbors") == "live" or spec.get("num_passages", 0)
                        for spec in modes.values())
  if retriever is None and needs_retriever and retrieval_dir is not None:
    retriever = retriever_lib.load_retriever(retrieval_dir)
  if vocab_path is None and retrieval_dir is not None:
    from retro_jax.retrieval.layout import RetrievalLayout  # pylint: disable=g-import-not-at-top
    vocab_path = RetrievalLayout(retrieval_dir).vocab_path
  if param_dtype is not None:
    from retro_jax.training import checkpoints as ckpt_lib  # pylint: disable=g-import-not-at-top
    base = model_config or ckpt_lib.stored_model_config(checkpoint) or RetroConfig()
    model_config = dataclasses.replace(base, param_dtype=param_dtype)
  generator = generate.load_generator(checkpoint, model_config=model_config,
                                      vocab_path=vocab_path, retrieval_dir=None,
                                      retriever=retriever)
  if dev_max_examples is not None and "dev" in os.path.basename(qa_file):
    max_examples = min(dev_max_examples, max_examples or dev_max_examples)
  examples = qa_lib.read_qa_jsonl(qa_file, max_examples=max_examples)
  most = max(int(spec.get("num_passages", 0)) for spec in modes.values())
  missing = [i for i, e in enumerate(examples) if not e["ctxs"]]
  if missing and most:
    if retriever is None:
      raise ValueError(f"{qa_file}: {len(missing)} questions have no 'ctxs' and no "
                       "retrieval_dir was given to retrieve them")
    filled = with_retrieved_contexts([examples[i] for i in missing], retriever, most)
    for i, example in zip(missing, filled):
      examples[i] = example
  rows = []
  for mode, spec in modes.items():
    neighbors = spec.get("neighbors", "none")
    if neighbors == "live" and generator.retriever is None:
      logging.warning("%s: no retrieval for %s (a decoder-only checkpoint)", mode,
                      checkpoint)
      neighbors = "none"
    if neighbors == "passages" and not generator.has_retro:
      logging.warning("%s: %s has no encoder/CCA; its passages go to the prompt only",
                      mode, checkpoint)
      neighbors = "none"
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{model_name}_{mode}").strip("_")
    mode_generator = with_cca_gate(generator, spec.get("cca_gate"))
    scores = qa_lib.run_qa(mode_generator, examples, output_dir=output_dir, name=slug,
                           num_passages=int(spec.get("num_passages", 0)),
                           neighbors=neighbors, max_new_tokens=max_new_tokens,
                           batch_size=batch_size, align_prompts=align_prompts,
                           scoring=scoring, max_seq_len=max_seq_len,
                           output_reserve=output_reserve)
    rows.append({"model": model_name, "mode": mode, "checkpoint": checkpoint,
                 "neighbors": neighbors, "num_passages": int(spec.get("num_passages", 0)),
                 **({"cca_gate": mode_generator.config.cca_gate}
                    if "cca_gate" in spec else {}),
                 **{k: scores[k] for k in ("exact_match", "f1", "count", "f1_count")
                    if k in scores},
                 "predictions": qa_lib.predictions_path(output_dir, slug)})
  atomic_write_json(os.path.join(output_dir, f"{model_name}_qa.json"), rows)
  atomic_write_text(os.path.join(output_dir, f"{model_name}_qa.md"),
                    markdown_table(rows, QA_COLUMNS) + "\n")
  return rows


@gin.configurable
def evaluate(*, output_dir: str = gin.REQUIRED,
             tasks: Sequence[str] = gin.REQUIRED) -> dict[str, Any]:
  """Runs the named evaluations (``'perplexity'``, ``'qa'``) into ``output_dir``."""
  runners = {"perplexity": eval_perplexity, "qa": eval_qa}
  unknown = [t for t in tasks if t not in runners]
  if unknown:
    raise ValueError(f"evaluate.tasks: unknown {unknown}; choose from {sorted(runners)}")
  os.makedirs(output_dir, exist_ok=True)
  return {task: runners[task](output_dir=output_dir) for task in tasks}


def _define_flags() -> None:
  gin_utils.define_gin_flags()


def main(argv) -> None:
  del argv
  gin_utils.parse_gin(flags.FLAGS.gin_file, flags.FLAGS.gin_bindings)
  results = evaluate()
  for task, rows in results.items():
    columns = QA_COLUMNS if task == "qa" else (
        ("model", "model"), ("mode", "mode"), ("loss", "loss"),
        ("perplexity", "perplexity"), ("tokens", "tokens"))
    print(f"\n{task}\n" + markdown_table(rows, columns))


if __name__ == "__main__":
  _define_flags()
  gin_utils.run_with_gin_flags(main)
