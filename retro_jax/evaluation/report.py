"""Plots and a markdown report of a recipe run (loss curves, perplexity by mode, QA).

    plot_loss_curves({"GPT-fit": gpt_dir, "Retro": retro_dir}, "loss.png")
    plot_perplexity(rows, "perplexity.png")          # rows of evaluation.perplexity
    markdown_table(rows, columns)                    # one table writer for every report
    write_recipe_report(report_path, run_dir=..., model_dirs=..., infos=...)

Everything reads what the runs already wrote (``MODEL_DIR/metrics.jsonl``, the
evaluation JSON files); nothing is recomputed. Plots use matplotlib's non-interactive
Agg backend, so they work on headless machines.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping, Optional, Sequence

from retro_jax.training.trainer import read_metrics
from retro_jax.utils import provenance
from retro_jax.utils.io import atomic_path, atomic_write_text

# The recipe's Retro trained from scratch (its 'retro_scratch' arm), as tables name it.
SCRATCH_MODEL = "Retro from scratch"
# The frozen phase of two-phase retro-fitting (the recipe's models/retro_frozen), as the
# loss plot names it; the Retro-fit curve continues after it.
FROZEN_PHASE_RUN = "Retro-fit, decoder frozen"

# The loss by class of target tokens (``perplexity.token_class_table``'s class rows).
CLASS_COLUMNS = (("class", "target tokens"), ("model", "model"), ("mode", "mode"),
                 ("loss", "loss"), ("accuracy", "token accuracy"), ("tokens", "tokens"))

# A QA mode's scores (``qa.summarize``'s keys), in eval_qa's tables and the recipe's.
QA_SCORE_COLUMNS = (("exact_match", "exact match"), ("f1", "F1"), ("count", "questions"),
                    ("answer_in_passages", "answer in prompt passages"),
                    ("answer_in_neighbors", "answer in neighbors read"))


def pyplot():
  """matplotlib.pyplot on the Agg backend (no display; imported on first use)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def save_png(fig, path: str) -> str:
  """Writes ``fig`` to ``path`` as PNG (atomically) and closes it; returns ``path``."""
  with atomic_path(path) as tmp:
    fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
  pyplot().close(fig)
  return path


def loss_curve(model_dir: str, split: str = "train") -> tuple[list[int], list[float]]:
  """(steps, losses) of a run; a resumed run's replayed steps keep the last value."""
  by_step = {}
  for row in read_metrics(model_dir, split):
    by_step[int(row["step"])] = float(row["loss"])
  steps = sorted(by_step)
  return steps, [by_step[s] for s in steps]


def plot_loss_curves(runs: Mapping[str, str], path: str, *,
                     title: str = "Training loss", offsets: Optional[Mapping[str, int]] = None
                     ) -> str:
  """One PNG with the train (solid) and eval (dashed, if any) loss of each run.

  Args:
    runs: display name -> MODEL_DIR (runs without metrics are skipped).
    offsets: display name -> step offset (e.g. a retro-fit run continues a GPT run).
  """
  plt = pyplot()
  fig, ax = plt.subplots(figsize=(7, 4))
  for name, model_dir in runs.items():
    offset = (offsets or {}).get(name, 0)
    steps, losses = loss_curve(model_dir)
    if not steps:
      continue
    line, = ax.plot([s + offset for s in steps], losses, label=f"{name} (train)")
    steps, losses = loss_curve(model_dir, "eval")
    if steps:
      ax.plot([s + offset for s in steps], losses, linestyle="--", marker="o",
              markersize=3, color=line.get_color(), label=f"{name} (held-out)")
  ax.set_xlabel("step")
  ax.set_ylabel("loss (nats / token)")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  return save_png(fig, path)


def plot_perplexity(rows: Sequence[Mapping[str, Any]], path: str, *,
                    title: str = "Held-out perplexity by mode") -> str:
  """Bar chart of ``rows`` from ``evaluation.perplexity.perplexity_table``."""
  plt = pyplot()
  labels = [f"{r['model']}\n{r['mode']}" for r in rows]
  values = [float(r["perplexity"]) for r in rows]
  fig, ax = plt.subplots(figsize=(max(4, 1.6 * len(rows)), 4))
  bars = ax.bar(range(len(rows)), values, color="#4a7ab0")
  for bar, value in zip(bars, values):
    ax.annotate(f"{value:.2f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center", va="bottom", fontsize=8)
  ax.set_xticks(range(len(rows)), labels, fontsize=8)
  ax.set_ylabel("perplexity")
  ax.set_title(title)
  ax.grid(axis="y", alpha=0.3)
  return save_png(fig, path)


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[Sequence[str]]
                   ) -> str:
  """A markdown table of ``rows``; ``columns`` are (key, header) or (key, header,
  format spec) tuples.

  A column with a format spec prints its values with ``format(value, spec)`` (e.g.
  ``".4f"``). Otherwise floats are printed with 4 significant digits (whole numbers
  such as token counts in full), everything else with ``str``.
  """
  def cell(value: Any, spec: Optional[str]) -> str:
    if spec is not None:
      return format(value, spec)
    if isinstance(value, float):
      return str(int(value)) if value.is_integer() and abs(value) >= 1e4 else f"{value:.4g}"
    return str(value)

  specs = [column[2] if len(column) > 2 else None for column in columns]
  lines = ["| " + " | ".join(column[1] for column in columns) + " |",
           "|" + "---|" * len(columns)]
  for row in rows:
    lines.append("| " + " | ".join(cell(row.get(column[0], ""), spec)
                                   for column, spec in zip(columns, specs)) + " |")
  return "\n".join(lines)


# The recipe's report -------------------------------------------------------------


def _embedded_markdown(path: str, report_dir: str) -> list[str]:
  """The lines of a markdown file below its title, headings one level down and image
  links made relative to ``report_dir``."""
  where = os.path.relpath(os.path.dirname(path), report_dir)
  with open(path, encoding="utf-8") as f:
    lines = f.read().splitlines()
  if lines and lines[0].startswith("# "):
    lines = lines[1:]
  while lines and not lines[0].strip():
    lines = lines[1:]
  out = []
  for line in lines:
    if line.startswith("#"):
      line = "#" + line
    out.append(re.sub(r"!\[([^\]]*)\]\(([^)/]+)\)",
                      lambda m: f"![{m.group(1)}]({where}/{m.group(2)})", line))
  return out + [""]


def _code_lines(infos: Mapping[str, Mapping[str, Any]]) -> list[str]:
  """"Code: ..." naming the code each done step ran (``provenance.code_version``), one
  entry per distinct version with its steps when the steps ran different code."""
  steps_by_code: dict[str, list[str]] = {}
  for step, step_info in infos.items():
    if step_info:
      steps_by_code.setdefault(provenance.describe(step_info.get("code")), []).append(step)
  if not steps_by_code:
    return []
  if len(steps_by_code) == 1:
    return [f"Code: {next(iter(steps_by_code))}.", ""]
  return ["Code: the steps ran different code: " + "; ".join(
      f"{code} ({', '.join(steps)})" for code, steps in steps_by_code.items()) + ".", ""]


def write_recipe_report(report_path: str, *, run_dir: str, model_dirs: Mapping[str, str],
                        infos: Mapping[str, Mapping[str, Any]],
                        documents: Optional[str] = None) -> list[str]:
  """Plots (in ``plots/`` beside ``report_path``) and the markdown report of a recipe
  run, from what its steps recorded; returns the paths written.

  Args:
    report_path: The report (``RUN_DIR/report.md``).
    run_dir: The run directory the report names.
    model_dirs: Training step (``gpt``, ``retro``, ``gptfit``, ``instructretro``,
      ``gpt_instruct``) -> its MODEL_DIR; runs whose directory does not exist are left
      out.
    infos: Step -> the info it recorded (``{}`` for a step not done), in step order
      (the time table follows it).
    documents: The user corpus of a ``--documents`` run (None: the embedded
      encyclopedia); the corpus and held-out set are described as what they are, the
      encyclopedia's "facts only in the DB" story only for the encyclopedia.
  """
  plots_dir = os.path.join(os.path.dirname(report_path), "plots")
  os.makedirs(plots_dir, exist_ok=True)
  outputs = []
  lines = ["# InstructRetro in miniature", ""]

  def info(step: str) -> Mapping[str, Any]:
    return infos.get(step) or {}

  corpus = info("corpus").get("counts", {})
  retrieval = info("retrieval")
  lines += ["Run directory: `" + run_dir + "`", ""] + _code_lines(infos)
  if retrieval:
    lines += [f"Retrieval DB: {retrieval['retrieval_db']['num_chunks']} chunks of "
              f"{retrieval.get('chunk_size', 64)} tokens "
              f"({retrieval['retrieval_db']['num_docs']} documents), index "
              f"`{retrieval['index']}`, vocabulary {retrieval['vocab_size']} pieces.", ""]
  if documents and corpus:
    lines += [f"Corpus: `{documents}`, split by document into GPT pretraining "
              f"({corpus.get('pretrain')}), retro-fitting ({corpus.get('retrofit')}) and "
              f"held-out ({corpus.get('heldout')}) documents; the retrieval DB holds the "
              "pretraining and retro-fitting documents (a chunk never retrieves from its "
              "own document), the held-out ones are in no DB.", ""]
  elif corpus:
    lines += ["Corpus: `" + json.dumps(corpus.get("entities", corpus)) + "`", ""]
  runs = {name: model_dirs[step] for name, step in (
      ("GPT pretraining", "gpt"), (FROZEN_PHASE_RUN, "retro_frozen"), ("Retro-fit", "retro"),
      ("GPT-fit", "gptfit"),
      (SCRATCH_MODEL, "retro_scratch"), ("InstructRetro SFT", "instructretro"),
      ("GPT-Instruct SFT", "gpt_instruct"))
          if step in model_dirs and os.path.isdir(model_dirs[step])}
  if runs:
    gpt_end = _last_step(runs.get("GPT pretraining"))
    outputs.append(plot_loss_curves(
        {k: v for k, v in runs.items() if "SFT" not in k},
        os.path.join(plots_dir, "loss_pretraining.png"),
        title="GPT pretraining, then retro-fitting vs GPT-fitting",
        offsets={FROZEN_PHASE_RUN: gpt_end, "GPT-fit": gpt_end,
                 "Retro-fit": gpt_end + _last_step(runs.get(FROZEN_PHASE_RUN))}))
    sft_runs = {k: v for k, v in runs.items() if "SFT" in k}
    if sft_runs:
      outputs.append(plot_loss_curves(
          sft_runs, os.path.join(plots_dir, "loss_sft.png"),
          title="Instruction tuning (loss on the answers)"))
    lines += ["## Training", "", "![loss](plots/loss_pretraining.png)", ""]
    if sft_runs:
      lines += ["![sft loss](plots/loss_sft.png)", ""]
  ppl = info("eval_perplexity").get("rows")
  if ppl:
    outputs.append(plot_perplexity(ppl, os.path.join(plots_dir, "perplexity.png")))
    frozen_steps = (info("retro").get("frozen_phase") or {}).get("steps")
    after_frozen = (f" as Retro's second phase (its first, {frozen_steps} steps, trained the "
                    "encoder and CCA with the decoder frozen)" if frozen_steps else "")
    heldout = ("Held-out documents of the corpus, in no retrieval DB: Retro reads the "
               "neighbors its held-out chunks retrieve from the DB; encoder ablated is "
               "the same model without them; GPT-fit is the decoder trained on the same "
               f"tokens for as many steps{after_frozen}." if documents else
               "Held-out documents of entities whose facts exist only in the retrieval DB.")
    lines += ["## Held-out perplexity", "", heldout, ""] + _retrieval_gain(ppl) + [
              markdown_table(ppl, (
                  ("model", "model"), ("mode", "mode"), ("loss", "loss"),
                  ("perplexity", "perplexity"), ("bpb", "bits/byte"),
                  ("accuracy", "token accuracy"), ("tokens", "tokens"))), "",
              "![perplexity](plots/perplexity.png)", ""]
  by_class = info("eval_perplexity").get("by_class")
  if by_class:
    lines += ["Where the difference comes from: the loss on the held-out targets that are "
              "values of db-only facts (first mentioned in the first chunk, before any "
              "neighbors arrive; first mentioned later, where retrieval can supply them; "
              "repeated, where the document itself can), names of db-only entities (first "
              "and repeated mentions), and all other tokens.",
              "", markdown_table(by_class, CLASS_COLUMNS), ""]
  analyses = info("eval_analyses").get("markdown")
  if analyses and os.path.exists(os.path.join(run_dir, analyses)):
    lines += ["## RETRO's analyses", ""] + _embedded_markdown(
        os.path.join(run_dir, analyses), os.path.dirname(report_path))
  qa = info("eval_qa").get("rows")
  if qa:
    lines += ["## Zero-shot QA on facts that are only in the retrieval DB", "",
              markdown_table(qa, (
                  ("model", "model"), ("mode", "mode"), ("num_passages", "passages in prompt"),
                  ("neighbors", "encoder reads"), *QA_SCORE_COLUMNS)), ""]
  paired = info("eval_qa").get("paired")
  if paired:
    lines += ["The same questions, paired: how many only one model answers right, and the "
              "chance of a split at least that uneven if the two were equally good "
              "(two-sided sign test). A difference with p above ~0.05 is within noise.", "",
              markdown_table(paired, (
                  ("InstructRetro", "InstructRetro mode"), ("GPT-Instruct", "GPT-Instruct mode"),
                  ("retro_only", "only InstructRetro right"),
                  ("gpt_only", "only GPT-Instruct right"), ("both", "both right"),
                  ("p_value", "p"))), ""]
  completions = info("knowledge_update").get("completions")
  if completions:
    rows = [dict(db=name, **scores) for name, scores in completions.items()]
    lines += ["## Knowledge update (no retraining): the retro-fit LM", "",
              "For each changed fact, the held-out document of its entity is cut just "
              "before the fact's value; the retro-fit model (greedy, retrieving from "
              "the DB) completes it.", "",
              markdown_table(rows, (
                  ("db", "retrieval DB"), ("follows_new", "completion = new fact"),
                  ("keeps_old", "completion = old fact"), ("count", "prompts"))), ""]
  update = info("knowledge_update").get("results")
  if update:
    rows = [dict(db=name, **scores) for name, scores in update.items()]
    lines += ["## Knowledge update (no retraining): InstructRetro QA", "",
              f"{info('knowledge_update')['facts']} facts changed in the retrieval "
              "DB; InstructRetro with retrieval answers the questions about them.", "",
              markdown_table(rows, (
                  ("db", "retrieval DB"), ("follows_new", "answers = new fact"),
                  ("keeps_old", "answers = old fact"), ("count", "questions"))), ""]
  timings = [{"step": s, "seconds": i["seconds"]} for s, i in infos.items()
             if i and i.get("seconds") is not None]
  lines += ["## Time per step", "",
            markdown_table(timings, (("step", "step"), ("seconds", "seconds", ".0f")))]
  atomic_write_text(report_path, "\n".join(lines) + "\n")
  return outputs + [report_path]


def _retrieval_gain(rows: Sequence[Mapping[str, Any]]) -> list[str]:
  """The report's sentences on what retrieval is worth to each Retro model: its loss
  with the encoder ablated minus with retrieval (nats per token), and its perplexity
  over GPT-fit's."""
  by = {(r["model"], r["mode"]): r for r in rows}
  gpt = next((r for r in rows if r["model"] == "GPT-fit"), None)
  lines = []
  for model in dict.fromkeys(r["model"] for r in rows):
    retro, ablated = by.get((model, "retrieval")), by.get((model, "encoder ablated"))
    if not retro or not ablated:
      continue
    text = (f"{model}: retrieval is worth {ablated['loss'] - retro['loss']:.4f} nats per "
            "token (held-out loss with the encoder ablated minus with retrieval)")
    if gpt:
      text += f"; perplexity {retro['perplexity'] / gpt['perplexity']:.3f} x GPT-fit's"
    lines += [text + ".", ""]
  return lines


def _last_step(model_dir: Optional[str]) -> int:
  if not model_dir:
    return 0
  steps, _ = loss_curve(model_dir)
  return steps[-1] if steps else 0
