"""RETRO models: `RetroConfig` and the Flax module `Retro`."""

from retro_jax.models.config import RetroConfig, default_cca_layers
from retro_jax.models.retro import (Retro, abstract_params, canonical_neighbor_mask,
                                    dummy_inputs,
                                    init_params, init_variables, param_count)

__all__ = ["RetroConfig", "Retro", "default_cca_layers", "canonical_neighbor_mask",
           "dummy_inputs", "abstract_params", "init_params", "init_variables", "param_count"]
