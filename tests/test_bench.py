"""Benchmarks run end to end at a tiny size (figures are not asserted: no timed tests)."""

import pytest

from retro_jax.bench import generate as generate_bench
from retro_jax.bench import matvec
from retro_jax.bench import model as model_bench
from retro_jax.bench import peers
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


TINY_PEER_ARCH = dict(vocab=256, dec_dim=64, dec_depth=2, dim_head=32, cca_layers=(1,),
                      enc_dim=64, enc_depth=1)


@pytest.mark.parametrize("peer", [False, True])
def test_peers_bench_runs(peer):
  if peer:
    pytest.importorskip("retro_pytorch")
  lines = []
  rows = peers.run(arch=TINY_PEER_ARCH, batch=8, seq_len=64, steps=1, num_neighbors=2,
                   prompt_tokens=64, new_tokens=4, repeats=1, peer=peer,
                   print_fn=lines.append)
  assert len(rows) == 1 + peer and rows[0]["framework"].startswith("retro_jax")
  assert all(r["step_s"] > 0 and r["gen_tokens_s"] > 0 for r in rows)
  assert lines[1].startswith("| framework |") and len(lines) == 3 + len(rows) + peer
  if peer:
    assert rows[1]["framework"].startswith("RETRO-pytorch") and lines[-1].startswith("| jax / peer")


def test_matvec_bench_runs():
  rows = matvec.run([1, 2], width=32, layers=2, repeats=1)
  assert [r["batch"] for r in rows] == [1, 2]
  assert all(r["f32_ms"] > 0 and r["bf16_speedup"] > 0 and r["upcast_speedup"] > 0
             for r in rows)


def test_generate_bench_runs_in_bfloat16_weights():
  lines = []
  rows = generate_bench.run(["tiny"], [1, 2], embedder="hash", db_scale=0.02,
                            new_tokens=4, repeats=1, dtype="bfloat16",
                            param_dtype="bfloat16", print_fn=lines.append)
  assert [(r["batch"], r["mode"]) for r in rows] == [
      (b, mode) for b in (1, 2) for mode in generate_bench.MODES]
  assert all(r["tokens_per_s"] > 0 for r in rows)
  assert "compute bfloat16, params bfloat16" in lines[0] and len(lines) == 3 + len(rows)


def test_forward_bench_times_both_programs_both_ways():
  from retro_jax.bench import forward
  rows = forward.run(["miniature"], batch=8, seq_len=128, repeats=1)
  assert [(r["model"], r["program"]) for r in rows] == [
      (m, p) for m in ("GPT", "Retro") for p in ("evaluation forward", "train step")]
  assert all(r["default_s"] > 0 and r["options_s"] > 0 and r["speedup"] > 0 for r in rows)



def test_cca_recall_bench_scores_three_ways():
  from retro_jax.bench import cca_recall
  lines = []
  rows = cca_recall.run("tiny", cca_recall.parse_overrides(["cca_layers=(2,4)"]), steps=2,
                        batch=8, eval_every=1, eval_count=1, print_fn=lines.append)
  assert [r["step"] for r in rows] == [1, 2]
  assert all(0 < r[m][0] and 0 <= r[m][1] <= 1 for r in rows for m in cca_recall.MODES)
  assert "(2, 4)" in lines[0] and len(lines) == 3 + len(rows)
  with pytest.raises(ValueError, match="hidden"):
    cca_recall.parse_overrides(["hidden=128"])


def _bench_programs():
  import pathlib
  import retro_jax.bench
  bench = pathlib.Path(retro_jax.bench.__path__[0])
  return sorted(p.stem for p in bench.glob("*.py") if "app.run(" in p.read_text())


@pytest.mark.parametrize("program", _bench_programs())
def test_bench_programs_define_their_flags(program):
  # Each program runs in its own process with the flags of every bench module it
  # imports: a flag defined twice only shows there (bench.forward's did).
  import subprocess
  import sys
  done = subprocess.run([sys.executable, "-m", f"retro_jax.bench.{program}", "--help"],
                        capture_output=True, text=True, timeout=300)
  output = done.stdout + done.stderr
  assert "Traceback" not in output, output[-2000:]
  assert "--helpfull" in output, output[-2000:]
