"""The gin training recipes parse and run end to end on a small prepared directory:
GPT pretraining -> retro-fit and GPT-fit from it -> SFT (Retro) and GPT-Instruct."""

import glob
import math
import os

import gin
import jax
import numpy as np
import pytest
from flax import traverse_util

# The configurables the eval and miniature gin files bind: the entry points register
# them (evaluate; the recipe's steps) or import the library modules that do
# (eval_perplexity, eval_qa, generate_corpus, the batch sources).
import retro_jax.data.encyclopedia  # pylint: disable=unused-import
import retro_jax.eval  # pylint: disable=unused-import
import retro_jax.recipe  # pylint: disable=unused-import
from retro_jax.data import batches as batch_sources
from retro_jax.models import RetroConfig
from retro_jax.training import checkpoints as ckpt_lib
from retro_jax.training.loop import train
from retro_jax.training.optimizers import OptimizerConfig
from retro_jax.training.trainer import read_metrics
from retro_jax.utils import gin_utils

import retrieval_fixture

RECIPES = os.path.join(gin_utils.GIN_DIR, "recipes")
# The tiny model, smaller still, so that five runs fit in a test.
SMALL = ["RetroConfig.hidden_size = 32", "RetroConfig.num_layers = 1",
         "RetroConfig.num_heads = 2", "RetroConfig.mlp_dim = 64",
         "RetroConfig.encoder_num_layers = 1", "SEQ_LEN = 128",
         "BATCH_SIZE = 8", "LOG_EVERY = 1", "EVAL_EVERY = 0", "EVAL_BATCHES = 2"]


pytestmark = pytest.mark.usefixtures("clean_gin")


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
  return retrieval_fixture.build(str(tmp_path_factory.mktemp("data") / "recipes_fx"))


def _parse(recipe: str, bindings=()):
  gin.clear_config()
  gin_utils.parse_gin([recipe], list(bindings))


def _bindings(layout, model_dir, steps, **macros):
  out = SMALL + [f"MODEL_DIR = '{model_dir}'", f"RETRIEVAL_DIR = '{layout.root}'",
                 f"TRAIN_STEPS = {steps}"]
  return out + [f"{k} = {v!r}" for k, v in macros.items()]


def _run(recipe, layout, model_dir, steps, **macros):
  _parse(recipe, _bindings(layout, model_dir, steps, **macros))
  metrics = train()
  rows = read_metrics(model_dir)
  assert [r["step"] for r in rows] == list(range(1, steps + 1))
  assert all(math.isfinite(r["loss"]) for r in rows)
  assert ckpt_lib.Checkpointer(model_dir).latest_step() == steps
  return metrics


REQUIRED = ["MODEL_DIR = '/m'", "RETRIEVAL_DIR = '/r'", "TRAIN_STEPS = 5",
            "INIT_CHECKPOINT = '/c'", "OUTPUT_DIR = '/o'", "CHECKPOINT = '/c'",
            "CHECKPOINTS = {'Retro': '/c'}", "QA_FILE = '/q.jsonl'",
            "SFT_QA_FILE = '/s.jsonl'"]
GIN_FILES = sorted(glob.glob(os.path.join(RECIPES, "*.gin"))
                   + glob.glob(os.path.join(gin_utils.GIN_DIR, "miniature", "*.gin")))


@pytest.mark.parametrize("path", GIN_FILES, ids=lambda p: os.path.relpath(
    p, gin_utils.GIN_DIR))
def test_every_recipe_parses(path):
  _parse(path, REQUIRED)
  name = os.path.basename(path)
  if name.startswith("eval_"):
    assert gin.query_parameter("%OUTPUT_DIR") == "/o"
  elif name == "corpus.gin":
    assert 0 < gin.query_parameter("generate_corpus.retrofit_fraction") < 1
  elif name in ("retrieval.gin", "documents_retrieval.gin"):
    assert gin.query_parameter("build_retrieval.embedder") == "all-MiniLM-L6-v2"
  elif name in ("run.gin", "model.gin", "common.gin", "common_documents.gin",
                "evaluation.gin"):
    assert RetroConfig().chunk_length == 64
  else:   # a training recipe
    assert str(gin.query_parameter("train.model_dir")) == "%MODEL_DIR"


def test_miniature_steps_share_data_and_compute():
  _parse("miniature/retro_fitting.gin", REQUIRED[:1] + REQUIRED[2:])
  retro = RetroConfig(), gin.query_parameter("%FIT_STEPS"), gin.query_parameter("%SEQ_LEN")
  assert OptimizerConfig().trainable == "retro"
  _parse("miniature/gpt_fitting.gin", REQUIRED[:1] + REQUIRED[2:])
  assert (RetroConfig(), gin.query_parameter("%FIT_STEPS"),
          gin.query_parameter("%SEQ_LEN")) == retro
  assert OptimizerConfig().trainable == "all"
  _parse("miniature/gpt_pretraining.gin", REQUIRED[:1] + REQUIRED[2:])
  assert gin.query_parameter("train_data/pretraining_batch_source.split") == "pretrain"
  _parse("miniature/instruction_tuning_gpt.gin", REQUIRED[:1] + REQUIRED[2:])
  assert gin.query_parameter("%RETRO_PARAMS") is False
  [(name, path, rate)] = gin.query_parameter("%SFT_DATASETS")
  assert (name, str(path), rate) == ("qa_with_passages", "%SFT_QA_FILE", 1.0)


def test_miniature_sft_neighbors_switch_reaches_instructretro_only():
  def macro(name):                       # a macro's value, through macro references
    value = gin.query_parameter(f"%{name}")
    return value.scoped_configurable_fn() if hasattr(value, "scoped_configurable_fn") else value

  switch = ["SFT_NEIGHBORS = True", "SFT_TRAINABLE = 'all'"]    # as recipe overrides
  for recipe, on in (("miniature/instruction_tuning.gin", True),
                     ("miniature/instruction_tuning_gpt.gin", False)):
    _parse(recipe, REQUIRED[:1] + REQUIRED[2:])
    assert macro("RETRIEVAL") is False and OptimizerConfig().trainable == "decoder"
    _parse(recipe, REQUIRED[:1] + REQUIRED[2:] + switch)
    assert macro("RETRIEVAL") is on and macro("RETRIEVE_NEIGHBORS") is on
    assert OptimizerConfig().trainable == ("all" if on else "decoder")
  # The QA reader's passage split reaches InstructRetro only; GPT-Instruct keeps them all.
  def resolved(value):
    if hasattr(value, "scoped_configurable_fn"):
      return resolved(value.scoped_configurable_fn())
    if isinstance(value, (list, tuple)):
      return type(value)(resolved(v) for v in value)
    return {k: resolved(v) for k, v in value.items()} if isinstance(value, dict) else value

  split = ["SFT_PROMPT_PASSAGES = 0", "SFT_NEIGHBOR_PASSAGES = 2", "SFT_QA_FILE = 'q'"]
  for recipe, reader in (("miniature/instruction_tuning.gin",
                          ({"num_passages": 0, "num_neighbor_passages": 2},)),
                         ("miniature/instruction_tuning_gpt.gin", ())):
    _parse(recipe, REQUIRED[:1] + REQUIRED[2:] + switch + split)
    assert resolved(gin.query_parameter("%SFT_DATASETS")) == [
        ("qa_with_passages", "q", 1.0) + reader]


def test_recipe_bindings():
  _parse("retrofit.gin")
  assert gin.query_parameter("train.init_mode") == "retrofit"
  assert gin.query_parameter("%RETRIEVAL") is True
  assert gin.query_parameter("OptimizerConfig.trainable") == "all"
  _parse("gptfit.gin")
  assert gin.query_parameter("train.init_mode") == "params"
  assert gin.query_parameter("%RETRIEVAL") is False
  _parse("sft.gin")
  assert gin.query_parameter("OptimizerConfig.trainable") == "decoder"
  assert gin.query_parameter("%RETRIEVAL") is False
  assert gin.query_parameter("%RETRO_PARAMS") is True
  _parse("sft_gpt.gin")
  assert gin.query_parameter("%RETRIEVAL") is False
  assert gin.query_parameter("%RETRO_PARAMS") is False


def test_a_size_file_after_a_recipe_gives_exactly_that_size():
  gin_utils.parse_gin(["instructretro_8b.gin"])
  alone = RetroConfig()
  gin.clear_config()
  gin_utils.parse_gin(["retrofit.gin", "instructretro_8b.gin"])
  assert RetroConfig() == alone


@pytest.mark.slow
def test_retrofit_and_gptfit_read_identical_tokens(layout):
  batches = {}
  for recipe in ("retrofit.gin", "gptfit.gin"):
    _parse(recipe, _bindings(layout, "/unused", 1))
    with gin.config_scope("train_data"):
      batches[recipe] = batch_sources.pretraining_batch_source().get_batch(3)
  assert "neighbor_tokens" in batches["retrofit.gin"]
  assert "neighbor_tokens" not in batches["gptfit.gin"]
  for key, value in batches["gptfit.gin"].items():
    np.testing.assert_array_equal(value, batches["retrofit.gin"][key])


def _params(model_dir):
  directory, step = ckpt_lib._resolve_checkpoint(model_dir)  # pylint: disable=protected-access
  del directory, step
  config = RetroConfig()
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1),
                           ("data", "fsdp", "tensor"))
  params, _, has_retro = ckpt_lib.load_model_params(model_dir, config, mesh)
  return traverse_util.flatten_dict(jax.device_get(params)), has_retro


@pytest.mark.slow
def test_recipes_run_end_to_end(layout, tmp_path):
  gpt, retro, gptfit = (str(tmp_path / n) for n in ("gpt", "retro", "gptfit"))
  sft, sft_gpt = str(tmp_path / "sft"), str(tmp_path / "sft_gpt")
  _run("pretrain_gpt.gin", layout, gpt, 3)
  metrics = _run("retrofit.gin", layout, retro, 2, INIT_CHECKPOINT=gpt, EVAL_EVERY=2)
  assert metrics["eval_tokens"] > 0 and math.isfinite(metrics["eval_perplexity"])
  _run("gptfit.gin", layout, gptfit, 2, INIT_CHECKPOINT=gpt)
  _run("sft.gin", layout, sft, 2, INIT_CHECKPOINT=retro)
  _run("sft_gpt.gin", layout, sft_gpt, 2, INIT_CHECKPOINT=gptfit)

  # Retro-fit: the decoder came from the GPT; SFT changed only decoder weights.
  gin.clear_config()
  gin_utils.parse_gin(["tiny.gin"], SMALL)
  gpt_params, gpt_has_retro = _params(gpt)
  retro_params, retro_has_retro = _params(retro)
  sft_params, _ = _params(sft)
  assert retro_has_retro and not gpt_has_retro
  assert set(gpt_params) < set(retro_params)
  retro_keys = [k for k in retro_params if k not in gpt_params]
  for key in retro_keys:
    np.testing.assert_array_equal(sft_params[key], retro_params[key])
  assert any(not np.array_equal(sft_params[k], retro_params[k]) for k in gpt_params)
  _, sft_gpt_has_retro = _params(sft_gpt)
  assert not sft_gpt_has_retro
