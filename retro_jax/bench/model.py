r"""Train-step time of Retro vs its GPT decoder alone, at the same size.

    python -m retro_jax.bench.model                      # tiny and ~100M, CPU-sized
    python -m retro_jax.bench.model --sizes=100m,1b --batch=8 --seq_len=2048 \
        --dtype=bfloat16                                 # on a GPU

For each size it times the trainer's step (``retro_jax.bench.train``) for
  * GPT: the decoder alone (retrieval off; only decoder parameters),
  * Retro: decoder + encoder + CCA with k neighbors per chunk (encoder as wide as the
    decoder, as Megatron does),
  * Retro-small-enc: the same with an encoder of half the width (DeepMind RETRO style),
and prints step time, tokens/s, analytic TFLOP/s, MFU when the device's peak is known,
and the Retro / GPT ratios of step time and of FLOPs, measured in the same run.
"""

from __future__ import annotations

from absl import app

from retro_jax.bench import train as train_bench

VARIANTS = train_bench.GPT_AND_RETRO + (
    ("Retro-small-enc",
     lambda c: c.replace(encoder_hidden_size=c.hidden_size // 2,
                         encoder_num_heads=c.num_heads // 2),
     True),
)


def main(argv):
  del argv
  train_bench.run_from_flags(VARIANTS)


if __name__ == "__main__":
  app.run(main)
