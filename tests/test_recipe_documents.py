"""The recipe on a user corpus (``python -m retro_jax.recipe --documents=...``): the
report describes the corpus it ran on; the documents run's own settings."""

from __future__ import annotations

import math

import gin

from retro_jax import recipe
from retro_jax.evaluation import report as report_lib
from retro_jax.models import RetroConfig
from retro_jax.training.optimizers import OptimizerConfig
from retro_jax.utils import gin_utils

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


def _optimizer(gin_file):
  gin.clear_config()
  gin_utils.parse_gin([gin_file], ["MODEL_DIR = '/m'", "RETRIEVAL_DIR = '/r'",
                                   "INIT_CHECKPOINT = '/c'"])
  return OptimizerConfig(), gin.query_parameter("%FIT_STEPS"), RetroConfig()


def test_documents_run_reads_its_own_fitting_steps(tmp_path):
  embedded = recipe.Recipe(str(tmp_path / "a"), print_fn=lambda _: None)
  documents = recipe.Recipe(str(tmp_path / "b"), documents="d.jsonl",
                            print_fn=lambda _: None)
  assert embedded.step_gin("retro") == "miniature/retro_fitting.gin"
  assert embedded.step_gin("gptfit") == "miniature/gpt_fitting.gin"
  assert documents.step_gin("gpt") == embedded.step_gin("gpt")
  assert embedded.steps == recipe.STEPS
  assert documents.steps == tuple(s for s in recipe.ALL_STEPS
                                  if s in recipe.STEPS or s in recipe.DOCUMENTS_ARMS)
  try:
    retro, retro_steps, retro_model = _optimizer(documents.step_gin("retro"))
    gpt, gpt_steps, gpt_model = _optimizer(documents.step_gin("gptfit"))
    frozen, _, _ = _optimizer(embedded.step_gin("retro"))
  finally:
    gin.clear_config()
  # InstructRetro's unfrozen retro-fitting, new parameters at 3x; GPT-fit at the
  # decoder's learning rate, same steps and model: the two differ only by retrieval.
  assert (retro.trainable, retro.retro_lr_multiplier) == ("all", 3.0)
  assert gpt.learning_rate == retro.learning_rate == 3e-3
  assert (gpt_steps, gpt_model) == (retro_steps, retro_model)
  assert frozen.trainable == "retro"                # the embedded run is unchanged
