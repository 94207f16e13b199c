"""Named model sizes in gin/models parse into valid configs with the documented sizes."""

import glob
import os

import gin
import jax
import pytest

from retro_jax.models import RetroConfig, init_params, param_count
from retro_jax.utils import gin_utils


pytestmark = pytest.mark.usefixtures("clean_gin")


def _config_from(name: str) -> RetroConfig:
  gin_utils.parse_gin([name])
  return RetroConfig()


def _counts(config):
  shapes = jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))
  retro = sum(param_count(v.get(p, {})) for k, v in shapes.items() if k.startswith("layers_")
              for p in ("cca", "retro_encoder", "pre_cca_norm"))
  return param_count(shapes), retro


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(gin_utils.GIN_DIR, "models",
                                                               "*.gin"))))
def test_every_model_gin_parses(path):
  config = _config_from(path)
  config.validate()


def test_instructretro_sizes():
  config = _config_from("instructretro_8b.gin")
  assert (config.num_layers, config.hidden_size, config.num_heads) == (32, 4096, 32)
  assert config.retro_layers == tuple(range(9, 31, 3))
  assert config.norm_zero_centered_gamma and config.mlp_gated and not config.tie_embeddings
  total, retro = _counts(config)
  assert 8.4e9 < total - retro < 8.6e9   # decoder, ~8.5B (Megatron args: 32L/4096/SwiGLU)
  assert 0.95e9 < retro < 1.05e9
  gin.clear_config()
  total, _ = _counts(_config_from("instructretro_48b.gin"))
  assert 48.0e9 < total < 49.0e9


def test_gin_flag_rewrite_and_missing_file():
  rest, bindings = gin_utils.split_gin_flags(["prog", "--gin.RetroConfig.num_layers=3", "-v"])
  assert rest == ["prog", "-v"] and bindings == ["RetroConfig.num_layers = 3"]
  with pytest.raises(FileNotFoundError, match="no_such.gin"):
    gin_utils.parse_gin(["no_such.gin"])
