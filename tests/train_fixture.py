"""The tiny model, optimizer and batches that the training tests share."""

from retro_jax.data.synthetic import SyntheticRetroSource
from retro_jax.models import RetroConfig
from retro_jax.training.optimizers import OptimizerConfig

CONFIG = RetroConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, mlp_dim=64,
                     chunk_length=8, encoder_dropout_rate=0.0,
                     encoder_position_embedding="rope")
OPT = OptimizerConfig(learning_rate=3e-3, warmup_steps=5)


def source(batch=8, retrieval=True, seed=0):
  """Synthetic batches of 32 tokens (4 chunks of 8) for ``CONFIG``."""
  return SyntheticRetroSource(64, 32, batch, chunk_length=8, seed=seed,
                              with_neighbors=retrieval)
