"""Test setup: 8 fake CPU devices for mesh tests (must precede the first jax import),
and the one run of the smallest miniature recipe (``miniature_run``) for all the test
processes (``launch/test.sh`` runs pytest-xdist workers, each test file in one)."""

import fcntl
import json
import os
import subprocess
import sys

import gin
import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import recipe_fixture  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.fixture
def clean_gin():
  """No gin bindings before or after the test (``pytestmark = pytest.mark.usefixtures(
  "clean_gin")`` in a module whose tests parse gin files)."""
  gin.clear_config()
  yield
  gin.clear_config()


@pytest.fixture(scope="session")
def miniature_run(tmp_path_factory, worker_id):
  """(run_dir, the finished process) of ``recipe_fixture.run_recipe``, run once for the
  whole test run (under pytest-xdist the first worker to ask runs it, under a lock, in
  the workers' common temporary directory; the others wait and reuse it). Shared by
  tests/test_recipe.py and tests/test_notebook.py, which only read it: a test that
  re-runs steps works on a ``shutil.copytree`` of it (mtimes kept: as done as the run)."""
  root = tmp_path_factory.getbasetemp()
  if worker_id != "master":
    root = root.parent
  shared = root / "miniature_recipe"
  shared.mkdir(exist_ok=True)
  with open(root / "miniature_recipe.lock", "w", encoding="utf-8") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    record = shared / "process.json"
    if not record.exists():
      proc = recipe_fixture.run_recipe(shared / "run")
      record.write_text(json.dumps({"args": proc.args, "returncode": proc.returncode,
                                    "stdout": proc.stdout, "stderr": proc.stderr}))
  proc = subprocess.CompletedProcess(**json.loads(record.read_text()))
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  return shared / "run", proc
