"""The GPU check's logic on a CPU: the HLO count, the loud failures, a dry run."""

import os
import subprocess
import sys
import time

import pytest

from retro_jax.bench import gpu_check

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Optimised HLO as XLA:GPU writes cuDNN flash attention (forward, then its backward).
_HLO = """
  %custom-call.1 = (bf16[8,16,2048,128]{3,2,1,0}, f32[8,16,2048]{2,1,0}, u8[0]{0})
      custom-call(%q, %k, %v), custom_call_target="__cudnn$fmhaSoftmax",
      backend_config={"cudnn_fmha_backend_config":{"mask_type":"CAUSAL"}}
  %custom-call.2 = (bf16[8,16,2048,128]{3,2,1,0}) custom-call(%q, %k, %v, %o, %do),
      custom_call_target="__cudnn$fmhaSoftmaxBackward"
  %custom-call.3 = bf16[4] custom-call(%x), custom_call_target="__cudnn$fmhaScaleBiasSoftmax"
  %dot.4 = bf16[8,2048,2048] dot(%a, %b), custom_call_target_comment="__cudnn"
"""


def _run(*args, timeout=600):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  return subprocess.run([sys.executable, "-m", "retro_jax.bench.gpu_check", *args], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=timeout,
                        check=False)


def test_counts_cudnn_flash_attention_calls_forward_and_backward():
  assert gpu_check.count_cudnn_attention(_HLO) == (2, 1)
  assert gpu_check.count_cudnn_attention("%d = f32[2] dot(%a, %b)") == (0, 0)
  assert gpu_check.dump_flags("/d", "--xla_foo").split() == [
      "--xla_foo", "--xla_dump_to=/d", "--xla_dump_hlo_module_re=.*train_step.*",
      "--xla_dump_hlo_as_text"]


def test_a_part_past_its_budget_fails_naming_it():
  with pytest.raises(gpu_check.CheckFailed, match="part 'train' FAILED: over its budget"):
    with gpu_check.budget("train", 0.2):
      time.sleep(2)
  with gpu_check.budget("train", 5):      # the timer is cleared on the way out
    pass
  time.sleep(0.1)


def test_without_a_gpu_the_full_check_fails_loudly_naming_the_part():
  proc = _run("--parts=devices,train")
  assert proc.returncode == 1, proc.stderr[-2000:]
  assert "part 'devices' FAILED: JAX's backend is 'cpu'" in proc.stderr
  assert "| part |" not in proc.stdout                 # no table, nothing skipped


@pytest.mark.slow   # multi-second (see pytest.ini)
def test_the_train_step_must_call_cudnn_flash_attention(tmp_path):
  # In this process XLA dumps nothing (no XLA_FLAGS at start-up): no HLO to confirm.
  with pytest.raises(gpu_check.CheckFailed, match="part 'train' FAILED: GPT: XLA dumped "
                     "no optimised HLO"):
    gpu_check.check_train(gpu_check.DRY, False, str(tmp_path / "empty"))


@pytest.mark.slow   # a subprocess that compiles two models (~14 s)
def test_dry_run_train_prints_one_table_from_the_dumped_hlo(tmp_path):
  proc = _run("--dry_run", "--parts=devices,train", f"--dump_dir={tmp_path}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.strip().splitlines()
  table = lines[lines.index(gpu_check.HEADER.splitlines()[0]):]
  assert len(table) == 2 + 3                      # header, rule, devices, GPT, Retro
  assert table[3].startswith("| train | GPT tiny") and table[4].startswith("| train | Retro")
  # The HLO of each timed step was dumped and read: CPU has no cuDNN, so 0 / 0.
  assert "| 0 / 0 |" in table[3] and "no HLO dump" not in proc.stdout
  for name in ("GPT", "Retro"):
    assert any(f.endswith("after_optimizations.txt") for f in os.listdir(tmp_path / name))


@pytest.mark.slow
def test_dry_run_of_every_part(tmp_path):
  proc = _run("--dry_run", f"--cache_dir={tmp_path}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.strip().splitlines()
  rows = lines[lines.index(gpu_check.HEADER.splitlines()[0]) + 2:]
  assert [r.split(" | ")[0][2:] for r in rows] == [
      "devices", "train", "train", "generate", "generate", "embedding", "faiss"]
  faiss_row = rows[-1].split(" | ")
  assert float(faiss_row[5].split()[0]) > 0.5     # recall@2 of the neighbor map
