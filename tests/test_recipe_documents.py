"""The recipe on a user corpus (``python -m retro_jax.recipe --documents=...``): the
report describes the corpus it ran on; the documents run's own settings."""

from __future__ import annotations

import math
import os

import gin
import pytest

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
  assert "same tokens for as many steps." in text
  with_retrieval = {**INFOS, "retrieval": {
      "retrieval_db": {"num_chunks": 107828, "num_docs": 1711}, "index": "IVF1024,SQ8",
      "vocab_size": 2048, "chunk_size": 16}}
  path = tmp_path / "retrieval.md"
  report_lib.write_recipe_report(str(path), run_dir=str(tmp_path), model_dirs={},
                                 infos=with_retrieval, documents="/data/pydoc.jsonl")
  assert "Retrieval DB: 107828 chunks of 16 tokens (1711 documents)" in path.read_text(
      encoding="utf-8")
  two_phase = {**INFOS, "retro": {"frozen_phase": {"steps": 1500}}}
  path = tmp_path / "two.md"
  report_lib.write_recipe_report(str(path), run_dir=str(tmp_path), model_dirs={},
                                 infos=two_phase, documents="/data/pydoc.jsonl")
  assert ("same tokens for as many steps as Retro's second phase (its first, 1500 steps, "
          "trained the encoder and CCA with the decoder frozen).") in path.read_text(
              encoding="utf-8")


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
    gpt_batch = gin.query_parameter("%BATCH_SIZE")
    frozen, _, _ = _optimizer(embedded.step_gin("retro"))
    embedded_gpt, embedded_steps, _ = _optimizer(embedded.step_gin("gptfit"))
    embedded_batch = gin.query_parameter("%BATCH_SIZE")
  finally:
    gin.clear_config()
  # One phase (FROZEN_FIT_STEPS=0): InstructRetro's unfrozen retro-fitting, new
  # parameters at 3x; GPT-fit at the decoder's learning rate, same steps and model.
  assert (retro.trainable, retro.retro_lr_multiplier) == ("all", 3.0)
  assert gpt.learning_rate == retro.learning_rate == 3e-3
  assert (gpt_steps, gpt_model) == (retro_steps, retro_model)
  # Batches of 8, twice the steps: the embedded run's tokens.
  assert (gpt_batch, gpt_steps) == (8, 300)
  assert (embedded_batch, embedded_steps) == (16, 150)
  assert frozen.trainable == "retro"                # the embedded run is unchanged
  assert embedded_gpt.learning_rate == 1e-3
  # Two phases by default on a user corpus; one on the embedded corpus.
  assert documents.frozen_fit_steps() == 2000
  assert embedded.frozen_fit_steps() == 0


def _training_calls(monkeypatch, run):
  """The training runs of ``run.step_retro()``: per run, what its gin file binds."""
  calls = []

  def fake(step, layout, bindings, overrides, gin_file=None):
    values = {"MODEL_DIR": layout.model_dir(step), "RETRIEVAL_DIR": "/r", **bindings}
    recipe._parse_step_gin(gin_file or recipe.STEP_GIN[step],
                           [f"{k} = {v!r}" for k, v in values.items()], overrides)
    query = lambda name: _macro(gin.query_parameter(name))
    calls.append(dict(gin_file=gin_file, model_dir=query("train.model_dir"),
                      init=query("train.init_checkpoint"), init_mode=query("train.init_mode"),
                      steps=query("train.train_steps"), batch=query("%BATCH_SIZE"),
                      optimizer=OptimizerConfig(), model=RetroConfig()))
    gin.clear_config()
    return {"loss": 1.0}

  monkeypatch.setattr(recipe, "run_training", fake)
  outputs, info = run.step_retro()
  return calls, outputs, info


def _macro(value):
  """A gin macro's value (through macro references)."""
  while hasattr(value, "scoped_configurable_fn"):
    value = value.scoped_configurable_fn()
  return value


@pytest.mark.parametrize("documents", [None, "d.jsonl"])
def test_two_phase_retro_fitting_freezes_then_unfreezes(tmp_path, monkeypatch, documents):
  run = recipe.Recipe(str(tmp_path / "two"), documents=documents, print_fn=lambda _: None,
                      overrides=["FROZEN_FIT_STEPS = 40"])
  assert run.frozen_fit_steps() == 40
  calls, outputs, info = _training_calls(monkeypatch, run)
  frozen, unfrozen = calls
  frozen_dir = run.layout.model_dir(recipe.FROZEN_PHASE_DIR)
  # A user corpus's phases run at its batch (8, twice the steps), the embedded one's at 16.
  batch, fit_steps = (8, 300) if documents else (16, 150)
  # Phase 1, from the GPT: RETRO's retro-fitting, the decoder frozen.
  assert frozen["model_dir"] == frozen_dir
  assert frozen["init"] == run.layout.model_dir("gpt")
  assert frozen["init_mode"] == "retrofit" and frozen["steps"] == 40
  assert frozen["optimizer"].trainable == "retro"
  assert (frozen["optimizer"].learning_rate, frozen["optimizer"].retro_lr_multiplier) == (
      1e-2, 1.0)
  assert frozen["batch"] == batch
  # Phase 2, the whole Retro of phase 1: every parameter at GPT-fit's rate, FIT_STEPS.
  assert unfrozen["model_dir"] == run.layout.model_dir("retro")
  assert unfrozen["init"] == frozen_dir and unfrozen["init_mode"] == "params"
  assert (unfrozen["steps"], unfrozen["batch"]) == (fit_steps, batch)
  assert unfrozen["optimizer"].trainable == "all"
  assert (unfrozen["optimizer"].learning_rate, unfrozen["optimizer"].retro_lr_multiplier
          ) == (3e-3, 1.0)
  assert outputs == [os.path.join(frozen_dir, "checkpoints"),
                     os.path.join(run.layout.model_dir("retro"), "checkpoints")]
  assert info["frozen_phase"]["steps"] == 40


def test_documents_run_retro_fits_in_two_phases_by_default(tmp_path, monkeypatch):
  run = recipe.Recipe(str(tmp_path / "d"), documents="d.jsonl", print_fn=lambda _: None)
  calls, _, info = _training_calls(monkeypatch, run)
  assert [(c["gin_file"], c["steps"], c["batch"]) for c in calls] == [
      ("miniature/documents_retro_frozen_phase.gin", 2000, 8),
      ("miniature/documents_retro_unfreezing.gin", 300, 8)]
  assert info["frozen_phase"]["steps"] == 2000
  # FROZEN_FIT_STEPS=0: one run of the step's own gin file, from the GPT.
  one = recipe.Recipe(str(tmp_path / "one"), documents="d.jsonl", print_fn=lambda _: None,
                      overrides=["FROZEN_FIT_STEPS = 0"])
  assert one.frozen_fit_steps() == 0
  [call], outputs, _ = _training_calls(monkeypatch, one)
  assert call["gin_file"] == "miniature/documents_retro_fitting.gin"
  assert call["init"] == one.layout.model_dir("gpt")
  assert (call["steps"], call["batch"]) == (300, 8)
  assert call["optimizer"].trainable == "all"
  monkeypatch.setattr(recipe, "_parse_step_gin", lambda *args: gin.clear_config())
  assert one.frozen_fit_steps() == 0          # a gin file without the macro: one phase
  monkeypatch.undo()
  bad = recipe.Recipe(str(tmp_path / "bad"), print_fn=lambda _: None,
                      overrides=["FROZEN_FIT_STEPS = -5"])
  with pytest.raises(ValueError, match=r"--gin\.FROZEN_FIT_STEPS=-5"):
    bad.step_retro()


def test_report_plots_the_frozen_phase_before_the_unfrozen_one(tmp_path, monkeypatch):
  import json
  dirs = {}
  for step, steps in (("gpt", 250), ("retro_frozen", 40), ("retro", 150), ("gptfit", 150)):
    dirs[step] = str(tmp_path / "models" / step)
    os.makedirs(dirs[step])
    with open(os.path.join(dirs[step], "metrics.jsonl"), "w", encoding="utf-8") as f:
      for s in (steps // 2, steps):
        f.write(json.dumps({"split": "train", "step": s, "loss": 2.0}) + "\n")
  plotted = {}
  monkeypatch.setattr(report_lib, "plot_loss_curves", lambda runs, path, **kw: (
      plotted.setdefault(os.path.basename(path), (dict(runs), kw.get("offsets"))), path)[1])
  report_lib.write_recipe_report(str(tmp_path / "report.md"), run_dir=str(tmp_path),
                                 model_dirs=dirs, infos=INFOS, documents="d.jsonl")
  runs, offsets = plotted["loss_pretraining.png"]
  assert runs[report_lib.FROZEN_PHASE_RUN] == dirs["retro_frozen"]
  assert offsets == {report_lib.FROZEN_PHASE_RUN: 250, "Retro-fit": 290, "GPT-fit": 250}


def test_documents_run_retrieves_chunks_of_16_and_its_models_read_them(tmp_path, monkeypatch):
  """A user corpus is chunked by 16 tokens, the embedded one by 64; every model of a run
  (each training phase, the evaluation) takes its chunk length from the run's retrieval
  directory, and a --gin binding of the user's still comes last."""
  from retro_jax.retrieval.layout import RetrievalLayout

  def preprocess(retrieval_input, output_dir, **kwargs):
    del retrieval_input
    RetrievalLayout(output_dir).write_config({"chunk_size": kwargs["chunk_size"]})
    return {"retrieval_db": {"num_chunks": 1, "num_docs": 1}, "splits": {},
            "index_factory": "Flat", "vocab_size": 8, "chunk_size": kwargs["chunk_size"],
            "stages": []}

  monkeypatch.setattr(recipe.pipeline, "preprocess", preprocess)
  files = {"retrieval": "r.jsonl", "retrofit": "f.jsonl", "heldout": "h.jsonl",
           "pretrain": "p.jsonl"}
  monkeypatch.setattr(recipe.Recipe, "files", property(lambda self: files))
  for documents, m in ((None, 64), ("d.jsonl", 16)):
    run = recipe.Recipe(str(tmp_path / str(m)), documents=documents, print_fn=lambda _: None,
                        overrides=["FROZEN_FIT_STEPS = 40", "RetroConfig.num_neighbors = 3"])
    assert run.gin_overrides == run.overrides         # no retrieval directory yet
    try:
      _, info = run.step_retrieval()
    finally:
      gin.clear_config()
    assert info["chunk_size"] == m
    assert run.gin_overrides == [f"RetroConfig.chunk_length = {m}", *run.overrides]
    calls, _, _ = _training_calls(monkeypatch, run)
    assert [(c["model"].chunk_length, c["model"].num_neighbors) for c in calls] == [(m, 3)] * 2
    try:
      run._eval_gin()       # pylint: disable=protected-access
      assert (RetroConfig().chunk_length, RetroConfig().num_neighbors) == (m, 3)
    finally:
      gin.clear_config()
