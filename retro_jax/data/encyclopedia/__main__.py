"""``python -m retro_jax.data.encyclopedia --output_dir=DIR [--scale=1.0] [--seed=0]``.

Flags that are set override gin bindings of ``generate_corpus``; the summary table and
the result (JSON) go to stdout.
"""

from __future__ import annotations

import json
from typing import Sequence

from absl import flags

from retro_jax.data.encyclopedia.stage import format_summary, generate_corpus
from retro_jax.data.encyclopedia.templates import TEMPLATES
from retro_jax.utils import gin_utils

_FLAG_ARGS = ("scale", "seed", "heldout_template", "update_fraction", "retrofit_fraction",
              "questions_per_fact", "overwrite")


def _define_flags() -> None:
  flags.DEFINE_string("output_dir", None, "Output directory.", required=True)
  flags.DEFINE_float("scale", None, "Entity count multiplier (default 1.0).")
  flags.DEFINE_integer("seed", None, "Seed (default 0).")
  flags.DEFINE_enum("heldout_template", None, list(TEMPLATES),
                    "Template kept out of the DB for db-only entities (default article).")
  flags.DEFINE_float("update_fraction", None, "Fraction of db-only entities updated.")
  flags.DEFINE_float("retrofit_fraction", None, "Fraction of seen entities in "
                     "retrofit.jsonl instead of pretrain.jsonl (default 0.5).")
  flags.DEFINE_integer("questions_per_fact", None, "Question phrasings per fact (1-3).")
  flags.DEFINE_bool("overwrite", None, "Regenerate even if complete.")
  gin_utils.define_gin_flags()


def main(argv: Sequence[str]) -> None:
  """Flags that are set override gin bindings; unset ones leave gin/defaults."""
  del argv
  f = flags.FLAGS
  gin_utils.parse_gin(f.gin_file, f.gin_bindings)
  kwargs = {k: f[k].value for k in _FLAG_ARGS if f[k].value is not None}
  result = generate_corpus(f.output_dir, **kwargs)
  print(format_summary(result))
  print(json.dumps(result, indent=2, sort_keys=True))


if __name__ == "__main__":
  _define_flags()
  gin_utils.run_with_gin_flags(main)
