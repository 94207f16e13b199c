r"""Evaluation entry point: held-out perplexity in three modes, and zero-shot QA.

    python -m retro_jax.eval --gin_file=gin/recipes/eval_ppl.gin \
        --gin.OUTPUT_DIR=/tmp/eval --gin.RETRIEVAL_DIR=/tmp/retrieval \
        --gin.CHECKPOINTS="{'Retro': '/tmp/retro', 'GPT-fit': '/tmp/gptfit'}"
    python -m retro_jax.eval --gin_file=gin/recipes/eval_analyses.gin \
        --gin.OUTPUT_DIR=/tmp/analyses --gin.RETRIEVAL_DIR=/tmp/retrieval \
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
directory). Only ``evaluate`` and the evaluations it runs,
``retro_jax.evaluation.perplexity.eval_perplexity``,
``retro_jax.evaluation.analyses.eval_analyses`` and ``retro_jax.evaluation.qa.eval_qa``,
are configurable; each writes its results under ``output_dir``:

* ``eval_perplexity``: one table (``perplexity.md`` / ``.json``) over a split of a
  prepared retrieval directory (default 'valid'): a Retro checkpoint gives two rows
  (with its retrieved neighbors; encoder ablated), a GPT checkpoint one (decoder only),
  all on identical tokens, every example scored once, with bits per byte.
* ``eval_analyses`` (task ``'analyses'``): RETRO's analyses on the same examples
  (``analyses.json`` / ``.md`` and plots): perplexity and bits per byte, neighbors at
  evaluation (k = 0, 1, 2, 4), leakage (loss by the chunks' overlap with the neighbors
  that condition them; perplexity below 12.5%, 25%, 50% overlap) and retrieval DB size
  (nested subsets of the DB, neighbors recomputed for the evaluated chunks).
* ``eval_qa``: NQ / TriviaQA-style questions, answered by greedy generation; each
  *mode* is a row: how many retrieved passages go into the prompt (InstructRetro's
  "title: ..., source: ..." contexts) and what the encoder reads ('none', 'passages'
  or 'live' retrieval). Questions without ``ctxs`` get theirs from the retrieval
  directory's index (top passages of the question). Predictions and scores per mode
  (``{name}_predictions.jsonl``, ``{name}_scores.json``) and one table ``qa.md``.
  ``eval_qa_instructretro.gin`` sets it up as Megatron-LM's released InstructRetro
  scripts evaluate (prompt truncation, 66 greedy tokens, ``scoring='megatron'``).

Each run appends the tasks it ran and the code that ran them to
``output_dir/provenance.jsonl`` (``retro_jax.utils.provenance``).
"""

from __future__ import annotations

import os
from typing import Any, Sequence

from absl import flags
import gin
import jax

from retro_jax.evaluation.analyses import eval_analyses
from retro_jax.evaluation.perplexity import eval_perplexity
from retro_jax.evaluation.qa import QA_COLUMNS, eval_qa
from retro_jax.evaluation.report import markdown_table
from retro_jax.utils import gin_utils, provenance


@gin.configurable
def evaluate(*, output_dir: str = gin.REQUIRED,
             tasks: Sequence[str] = gin.REQUIRED) -> dict[str, Any]:
  """Runs the named evaluations (``'perplexity'``, ``'analyses'``, ``'qa'``) into
  ``output_dir``."""
  runners = {"perplexity": eval_perplexity, "analyses": eval_analyses, "qa": eval_qa}
  unknown = [t for t in tasks if t not in runners]
  if unknown:
    raise ValueError(f"evaluate.tasks: unknown {unknown}; choose from {sorted(runners)}")
  os.makedirs(output_dir, exist_ok=True)
  if jax.process_index() == 0:
    provenance.record(output_dir, tasks=list(tasks))
  return {task: runners[task](output_dir=output_dir) for task in tasks}


def _define_flags() -> None:
  gin_utils.define_gin_flags()


def main(argv) -> None:
  del argv
  gin_utils.parse_gin(flags.FLAGS.gin_file, flags.FLAGS.gin_bindings)
  results = evaluate()
  for task, rows in results.items():
    if task == "analyses":
      rows = rows["perplexity"]     # the rest is in OUTPUT_DIR/analyses.md
    columns = QA_COLUMNS if task == "qa" else (
        ("model", "model"), ("mode", "mode"), ("loss", "loss"),
        ("perplexity", "perplexity"), ("bpb", "bits/byte"), ("tokens", "tokens"))
    print(f"\n{task}\n" + markdown_table(rows, columns))


if __name__ == "__main__":
  _define_flags()
  gin_utils.run_with_gin_flags(main)
