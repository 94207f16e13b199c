"""Generation with a KV cache and chunk-wise live retrieval (see ``generator``)."""

from retro_jax.inference.generator import (FixedNeighbors, GenerationResult, Generator,
                                           LiveNeighbors, passages_to_neighbors)
from retro_jax.inference.sampling import SamplingConfig, sample

__all__ = ["FixedNeighbors", "GenerationResult", "Generator", "LiveNeighbors",
           "SamplingConfig", "passages_to_neighbors", "sample"]
