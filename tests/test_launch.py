"""Launch scripts: shell syntax, Python syntax, and the setup/test scripts' contract."""

import os
import py_compile
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_shell_scripts_parse():
  for path in ("launch/setup.sh", "launch/test.sh", "launch/demo.sh",
               "launch/slurm/train.sbatch", ".ci/run"):
    subprocess.run(["bash", "-n", os.path.join(REPO, path)], check=True)


def test_ci_runs_the_readme_test_command():
  with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
    readme = f.read()
  with open(os.path.join(REPO, ".ci/run"), encoding="utf-8") as f:
    ci = f.read()
  assert "bash launch/test.sh" in readme and "bash launch/test.sh" in ci


def test_xmanager_launcher_compiles():
  py_compile.compile(os.path.join(REPO, "launch/xmanager/launch.py"), doraise=True)
