"""The miniature recipe at its smallest setting, shared by the recipe and notebook tests.

``SMALLEST`` is a tenth of the embedded corpus, 4 steps per training stage, no periodic
evaluation, 20 QA questions and 30% of the facts updated. ``run_recipe`` runs
``python -m retro_jax.recipe`` with it, as a user does; ``notebook_parameters`` is the
same setting as the notebook's ``parameters`` cell. conftest.py runs it once per test
run (``miniature_run``); the recipe skips finished steps, so the notebook executed against
a copy of that run directory reuses every step but the report.
"""

from __future__ import annotations

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCALE = 0.1
BINDINGS = {"GPT_STEPS": 4, "FIT_STEPS": 4, "SFT_STEPS": 4, "EVAL_EVERY": 0,
            "sample_questions.max_questions": 20,
            "generate_corpus.update_fraction": 0.3}
SMALLEST = [f"--scale={SCALE}"] + [f"--gin.{k}={v}" for k, v in BINDINGS.items()]
# One CPU device, as the recipe runs from a shell (conftest fakes 8 for this process).
XLA_FLAGS = "--xla_force_host_platform_device_count=1"


def run_recipe(run_dir, *args) -> subprocess.CompletedProcess:
  """``python -m retro_jax.recipe --run_dir=run_dir SMALLEST... args...``, captured."""
  env = dict(os.environ, XLA_FLAGS=XLA_FLAGS)
  return subprocess.run([sys.executable, "-m", "retro_jax.recipe", f"--run_dir={run_dir}",
                         *SMALLEST, *args], cwd=REPO, env=env, capture_output=True,
                        text=True, check=False)


def notebook_parameters(run_dir) -> str:
  """The notebook's ``parameters`` cell with ``SMALLEST``'s values."""
  b = BINDINGS
  return "\n".join([
      f"SCALE = {SCALE}", f"GPT_STEPS = {b['GPT_STEPS']}", f"FIT_STEPS = {b['FIT_STEPS']}",
      f"SFT_STEPS = {b['SFT_STEPS']}", f"EVAL_EVERY = {b['EVAL_EVERY']}",
      f"MAX_QUESTIONS = {b['sample_questions.max_questions']}", f"RUN_DIR = {str(run_dir)!r}",
      f"EXTRA_GIN = ['generate_corpus.update_fraction = "
      f"{b['generate_corpus.update_fraction']}']"])
