"""RETRO models: `RetroConfig`, the Flax module `Retro` and its wrapper `RetroLM`."""

from retro_jax.models.config import RetroConfig, default_cca_layers
from retro_jax.models.lm import (RetroLM, abstract_params, dummy_inputs, init_params,
                                 param_count)
from retro_jax.models.retro import Retro, canonical_neighbor_mask

__all__ = ["RetroConfig", "Retro", "RetroLM", "default_cca_layers",
           "canonical_neighbor_mask", "dummy_inputs", "abstract_params", "init_params",
           "param_count"]
