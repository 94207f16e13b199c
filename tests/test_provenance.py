"""Which code produced an output (``retro_jax.utils.provenance``): the git state of a
checkout against git itself, the recorded version of this process, the report's line."""

import importlib.metadata
import json
import os
import subprocess

import pytest

from retro_jax.evaluation.report import _code_lines
from retro_jax.utils import provenance


def _git(root, *args):
  return subprocess.run(["git", "-C", str(root), "-c", "user.name=t", "-c",
                         "user.email=t@example.com", *args], capture_output=True,
                        check=True, text=True).stdout.strip()


@pytest.fixture
def repo(tmp_path):
  root = tmp_path / "repo"
  root.mkdir()
  _git(root, "init", "-q")
  (root / "model.py").write_text("x = 1\n")
  (root / ".gitignore").write_text("*.log\n")
  _git(root, "add", ".")
  _git(root, "commit", "-q", "-m", "first")
  return root


def test_clean_checkout_is_its_commit(repo):
  state = provenance.git_state(str(repo))
  assert state == {"commit": _git(repo, "rev-parse", "HEAD"), "dirty": False,
                   "diff_sha256": None}
  (repo / "run.log").write_text("ignored by .gitignore")
  assert provenance.git_state(str(repo))["dirty"] is False


def test_uncommitted_trees_are_told_apart(repo):
  (repo / "model.py").write_text("x = 2\n")
  two = provenance.git_state(str(repo))
  (repo / "model.py").write_text("x = 3\n")
  three = provenance.git_state(str(repo))
  assert two["dirty"] and three["dirty"] and two["commit"] == three["commit"]
  assert two["diff_sha256"] != three["diff_sha256"]
  (repo / "model.py").write_text("x = 2\n")
  assert provenance.git_state(str(repo)) == two          # the same tree, the same hash
  (repo / "model.py").write_text("x = 1\n")
  (repo / "new_module.py").write_text("y = 1\n")         # untracked, not ignored: counts
  untracked = provenance.git_state(str(repo))
  assert untracked["dirty"] and untracked["diff_sha256"] not in (
      two["diff_sha256"], three["diff_sha256"])
  (repo / "new_module.py").write_text("y = 2\n")
  assert provenance.git_state(str(repo))["diff_sha256"] != untracked["diff_sha256"]


def test_not_a_checkout_of_its_own(repo, tmp_path):
  (repo / "pkg").mkdir()
  assert provenance.git_state(str(repo / "pkg")) is None   # inside another repository
  plain = tmp_path / "plain"
  plain.mkdir()
  assert provenance.git_state(str(plain)) is None


def test_this_process_records_this_checkout():
  version = provenance.code_version()
  assert version["packages"]["jax"] == importlib.metadata.version("jax")
  assert version["packages"]["flax"] == importlib.metadata.version("flax")
  if os.path.isdir(os.path.join(provenance.PACKAGE_ROOT, ".git")):
    assert version["git"]["commit"] == _git(provenance.PACKAGE_ROOT, "rev-parse", "HEAD")
  assert provenance.describe(version).startswith("retro_jax ")


def test_record_appends_a_line_per_run(tmp_path):
  provenance.record(str(tmp_path), tasks=["qa"])
  provenance.record(str(tmp_path), start_step=3)
  with open(tmp_path / provenance.FILENAME, encoding="utf-8") as f:
    rows = [json.loads(line) for line in f]
  assert [r.get("tasks") for r in rows] == [["qa"], None] and rows[1]["start_step"] == 3
  assert all(r["code"] == provenance.code_version() and r["time"].endswith("+00:00")
             for r in rows)


def test_describe():
  git = {"commit": "0123456789abcdef" * 2 + "01234567", "dirty": True,
         "diff_sha256": "fe" * 32}
  assert provenance.describe({"retro_jax": "0.1.0", "git": git}) == (
      "retro_jax 0.1.0, commit 0123456789ab (+ uncommitted changes fefefefe)")
  assert provenance.describe({"retro_jax": "0.1.0", "git": None}) == (
      "retro_jax 0.1.0, not a git checkout")
  assert provenance.describe(None) == "unrecorded"


def test_report_names_the_code_of_each_step():
  a = {"retro_jax": "0.1.0", "git": {"commit": "a" * 40, "dirty": False,
                                     "diff_sha256": None}}
  b = dict(a, git=dict(a["git"], commit="b" * 40))
  assert _code_lines({"corpus": {"code": a}, "gpt": {"code": a}, "eval_qa": {}}) == [
      f"Code: retro_jax 0.1.0, commit {'a' * 12}.", ""]
  line = _code_lines({"corpus": {"code": a}, "gpt": {"code": b}, "retro": {"code": a},
                      "report": {"seconds": 1}})[0]
  assert line == (f"Code: the steps ran different code: retro_jax 0.1.0, commit {'a' * 12} "
                  f"(corpus, retro); retro_jax 0.1.0, commit {'b' * 12} (gpt); "
                  "unrecorded (report).")
