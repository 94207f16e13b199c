r"""Summarise a Retro model configuration: parameters by part, CCA layers, FLOPs.

    python -m retro_jax.models --gin_file=instructretro_8b.gin
    python -m retro_jax.models --gin_file=tiny.gin --gin.RetroConfig.num_layers=12

Nothing is allocated: parameter shapes come from ``jax.eval_shape``.
"""

from __future__ import annotations

from absl import flags
import jax

from retro_jax.models import RetroConfig, init_params, lm, param_count
from retro_jax.models.flops import count_flops
from retro_jax.utils import gin_utils

_GIN_FILE = flags.DEFINE_multi_string("gin_file", [], "gin files (e.g. gin/models/tiny.gin).")
_GIN_BINDINGS = flags.DEFINE_multi_string("gin_bindings", [], "gin bindings KEY=VALUE.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 2048, "Sequence length for the FLOP count.")


def summarize(config: RetroConfig, seq_len: int) -> str:
  shapes = jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))
  retro = param_count(lm.split_retro_params(shapes)[1])
  total = param_count(shapes)
  flops = count_flops(config, seq_len)
  gpt = count_flops(config, seq_len, retrieval=False)
  lines = [
      f"{config}",
      f"parameters: {total / 1e6:,.1f}M total = {(total - retro) / 1e6:,.1f}M decoder + "
      f"{retro / 1e6:,.1f}M retrieval (encoder + CCA)",
      f"CCA layers (1-based): {list(config.retro_layers)}; encoder in layer "
      f"{config.first_retro_layer}",
      f"training FLOPs per {seq_len}-token example: GPT {gpt.train:.3e}, Retro "
      f"{flops.train:.3e} ({flops.train / gpt.train:.2f}x; encoder "
      f"{flops.encoder / flops.forward:.0%}, CCA {flops.cca / flops.forward:.0%})",
  ]
  return "\n".join(lines)


def main(argv):
  del argv
  gin_utils.parse_gin(_GIN_FILE.value, _GIN_BINDINGS.value)
  print(summarize(RetroConfig(), _SEQ_LEN.value))


if __name__ == "__main__":
  gin_utils.run_with_gin_flags(main)
