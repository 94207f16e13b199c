"""The recipe on a user corpus (``python -m retro_jax.recipe --documents=...``): the
report describes the corpus it ran on; the documents run's own settings."""

from __future__ import annotations

import math

from retro_jax.evaluation import report as report_lib

ROWS = [
    {"model": "Retro", "mode": "retrieval", "loss": 3.00, "perplexity": math.exp(3.00),
     "accuracy": 0.3, "tokens": 100},
    {"model": "Retro", "mode": "encoder ablated", "loss": 3.05,
     "perplexity": math.exp(3.05), "accuracy": 0.29, "tokens": 100},
    {"model": "GPT-fit", "mode": "decoder only", "loss": 3.20,
     "perplexity": math.exp(3.20), "accuracy": 0.28, "tokens": 100},
]
INFOS = {"corpus": {"counts": {"pretrain": 40, "retrofit": 55, "heldout": 5,
                               "retrieval": 95}},
         "eval_perplexity": {"rows": ROWS}}


def _report(tmp_path, documents):
  path = tmp_path / "report.md"
  report_lib.write_recipe_report(str(path), run_dir=str(tmp_path), model_dirs={
      s: str(tmp_path / "none" / s) for s in ("gpt", "retro", "gptfit", "instructretro",
                                              "gpt_instruct")},
                                 infos=INFOS, documents=documents)
  return path.read_text(encoding="utf-8")


def test_user_corpus_report_is_neutral_and_states_the_retrieval_gain(tmp_path):
  text = _report(tmp_path, "/data/pydoc.jsonl")
  assert "facts exist only in the retrieval DB" not in text
  assert "`/data/pydoc.jsonl`" in text
  assert "GPT pretraining (40), retro-fitting (55) and held-out (5) documents" in text
  assert "in no retrieval DB" in text
  # 3.05 - 3.00 nats; exp(3.00) / exp(3.20) = exp(-0.2).
  assert "Retro: retrieval is worth 0.0500 nats per token" in text
  assert f"perplexity {math.exp(-0.2):.3f} x GPT-fit's" in text


def test_embedded_corpus_report_keeps_its_story(tmp_path):
  text = _report(tmp_path, None)
  assert "Held-out documents of entities whose facts exist only in the retrieval DB." in text
  assert "Retro: retrieval is worth 0.0500 nats per token" in text
  assert "in no retrieval DB" not in text
