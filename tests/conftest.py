"""Test setup: 8 fake CPU devices for mesh tests (must precede the first jax import),
and the session's one run of the smallest miniature recipe (``miniature_run``)."""

import os
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
def miniature_run(tmp_path_factory):
  """(run_dir, the finished process) of ``recipe_fixture.run_recipe`` in a fresh
  directory: run once, shared by tests/test_recipe.py and tests/test_notebook.py."""
  run_dir = tmp_path_factory.mktemp("recipe") / "run"
  proc = recipe_fixture.run_recipe(run_dir)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  return run_dir, proc
