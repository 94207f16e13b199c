"""retro_jax: RETRO and InstructRetro in JAX/Flax."""

__version__ = "0.1.0"
