"""Benchmarks run end to end at a tiny size (figures are not asserted: no timed tests)."""

import pytest

from retro_jax.bench import model as model_bench
from retro_jax.bench import train as train_bench

pytestmark = pytest.mark.slow  # see pytest.ini


def test_model_bench_runs_all_variants():
  lines = []
  rows = train_bench.run_variants(["tiny"], model_bench.VARIANTS, batch=8, seq_len=128,
                                  steps=1, dtype="float32", remat_policy="none",
                                  num_neighbors=2, print_fn=lines.append)
  assert [r["model"] for r in rows] == ["GPT", "Retro", "Retro-small-enc"]
  assert rows[0]["ratio"] == 1.0 and rows[1]["flop_ratio"] > rows[2]["flop_ratio"] > 1.0
  assert rows[1]["params"] > rows[2]["params"] > rows[0]["params"]
  assert lines[1].startswith("| size | model |") and len(lines) == 2 + 3
