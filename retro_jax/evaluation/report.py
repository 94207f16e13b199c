"""Plots and a markdown report of a recipe run (loss curves, perplexity by mode, QA).

    plot_loss_curves({"GPT-fit": gpt_dir, "Retro": retro_dir}, "loss.png")
    plot_perplexity(rows, "perplexity.png")          # rows of evaluation.perplexity
    markdown_table(rows, columns)                    # one table format for every report

Everything reads what the runs already wrote (``MODEL_DIR/metrics.jsonl``, the
evaluation JSON files); nothing is recomputed. Plots use matplotlib's non-interactive
Agg backend, so they work on headless machines.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional, Sequence

from retro_jax.training.trainer import read_metrics
from retro_jax.utils.io import atomic_path


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def _save(fig, path: str) -> str:
  with atomic_path(path) as tmp:
    fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
  _pyplot().close(fig)
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
  plt = _pyplot()
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
  return _save(fig, path)


def plot_perplexity(rows: Sequence[Mapping[str, Any]], path: str, *,
                    title: str = "Held-out perplexity by mode") -> str:
  """Bar chart of ``rows`` from ``evaluation.perplexity.perplexity_table``."""
  plt = _pyplot()
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
  return _save(fig, path)


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str]],
                   ) -> str:
  """A markdown table of ``rows``; ``columns`` are (key, header) pairs.

  Floats are printed with 4 significant digits (whole numbers such as token counts in
  full), everything else with ``str``.
  """
  def cell(value: Any) -> str:
    if isinstance(value, float):
      return str(int(value)) if value.is_integer() and abs(value) >= 1e4 else f"{value:.4g}"
    return str(value)

  lines = ["| " + " | ".join(h for _, h in columns) + " |",
           "|" + "---|" * len(columns)]
  for row in rows:
    lines.append("| " + " | ".join(cell(row.get(k, "")) for k, _ in columns) + " |")
  return "\n".join(lines)


def relative_path(path: str, start: str) -> str:
  return os.path.relpath(path, start)
