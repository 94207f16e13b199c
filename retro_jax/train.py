r"""Training entry point: GPT pretraining, retro-fitting, GPT-fitting and SFT (t5x style).

    python -m retro_jax.train --gin_file=gin/recipes/retrofit.gin \
        --gin.MODEL_DIR=/tmp/retrofit --gin.TRAIN_STEPS=1000 \
        --gin.INIT_CHECKPOINT=/tmp/gpt

Parses the gin files and bindings, starts multi-host JAX if the job has several hosts,
and runs ``retro_jax.training.loop.train`` (the one gin-configurable of the run, plus
the config dataclasses and batch sources it receives; its docstring says what a run
does: resume, checkpoints, metrics, non-finite stops).
"""

from __future__ import annotations

from absl import flags

from retro_jax.models import partitioning
from retro_jax.training.loop import train
from retro_jax.utils import gin_utils


def _define_flags() -> None:
  gin_utils.define_gin_flags()


def main(argv) -> None:
  del argv
  gin_utils.parse_gin(flags.FLAGS.gin_file, flags.FLAGS.gin_bindings)
  partitioning.initialize_distributed()
  train()


if __name__ == "__main__":
  _define_flags()
  gin_utils.run_with_gin_flags(main)
