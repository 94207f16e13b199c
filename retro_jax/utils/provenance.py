"""Which code produced an output: the one place that asks.

Two runs of the same command on the same code give the same bytes here (CPU: the
recipe's retrieval directory and its training runs repeat bit for bit), so a difference
between two runs' figures is a difference of code, settings or hardware. To tell which,
every output that a figure comes from records ``code_version()``:

* ``retro_jax``: the package version;
* ``git``: where the imported ``retro_jax`` is a git checkout's own package (the
  repository's top level holds it), the commit, whether the tree differs from it
  (``dirty``: a tracked file changed, or a file git does not ignore is untracked) and
  then the SHA-256 of ``git diff HEAD`` and of the untracked files' names and
  fingerprints (two different uncommitted trees on one commit read differently);
  ``None`` for an installed package, a tree without git, or a git that fails;
* ``packages``: versions of the libraries the numbers depend on (absent ones left out);
* ``python``, ``platform``: the interpreter and machine.

Writers: the recipe (each step's manifest entry), ``retro_jax.train``
(``MODEL_DIR/provenance.jsonl``, one line per start or resume) and ``retro_jax.eval``
(``OUTPUT_DIR/provenance.jsonl``, one line per run) through ``record``,
``retro_jax.preprocess`` (``retrieval.json``'s ``code``, the code of the run that wrote
the file).
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import importlib.metadata
import json
import os
import platform
import socket
import subprocess
import sys
from typing import Any, Optional

import retro_jax
from retro_jax.utils.io import file_fingerprint

# Distributions whose versions change the figures a run produces.
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "seqio",
            "tensorflow", "faiss-cpu", "faiss-gpu", "sentencepiece", "gin-config")
GIT_TIMEOUT_S = 20
# The directory that holds the ``retro_jax`` package (a checkout's top level).
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(retro_jax.__file__)))


def _git(root: str, *args: str) -> bytes:
  return subprocess.run(["git", "-C", root, *args], capture_output=True, check=True,
                        timeout=GIT_TIMEOUT_S).stdout


def git_state(root: str) -> Optional[dict[str, Any]]:
  """``{"commit", "dirty", "diff_sha256"}`` of the git checkout whose top level is
  ``root``; None if ``root`` is not one (or git is missing or fails)."""
  try:
    top = _git(root, "rev-parse", "--show-toplevel").decode().strip()
    if os.path.realpath(top) != os.path.realpath(root):
      return None            # root lies inside some other repository
    commit = _git(root, "rev-parse", "HEAD").decode().strip()
    diff = _git(root, "diff", "HEAD", "--no-ext-diff", "--binary")
    untracked = sorted(_git(root, "ls-files", "--others", "--exclude-standard", "-z")
                       .decode().split("\0")[:-1])
    digest = hashlib.sha256(diff)
    for rel in untracked:
      digest.update(f"\0{rel}\0{file_fingerprint(os.path.join(root, rel))}".encode())
  except (OSError, subprocess.SubprocessError, UnicodeDecodeError):
    return None
  dirty = bool(diff or untracked)
  return {"commit": commit, "dirty": dirty,
          "diff_sha256": digest.hexdigest() if dirty else None}


def package_versions(names=PACKAGES) -> dict[str, str]:
  versions = {}
  for name in names:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      continue
  return versions


@functools.lru_cache(maxsize=None)
def code_version() -> dict[str, Any]:
  """What this process runs: see the module docstring. Computed once per process."""
  return {"retro_jax": retro_jax.__version__, "git": git_state(PACKAGE_ROOT),
          "packages": package_versions(),
          "python": sys.version.split()[0], "platform": platform.platform()}


FILENAME = "provenance.jsonl"


def record(directory: str, **fields: Any) -> None:
  """Appends one line to ``directory/provenance.jsonl``: ``fields`` (what this run
  does there), the UTC time, the host and ``code_version()``."""
  row = dict(fields, time=datetime.datetime.now(datetime.timezone.utc).isoformat(
      timespec="seconds"), host=socket.gethostname(), code=code_version())
  with open(os.path.join(directory, FILENAME), "a", encoding="utf-8") as f:
    f.write(json.dumps(row, sort_keys=True) + "\n")


def describe(version: Optional[dict[str, Any]]) -> str:
  """One line for a report: ``retro_jax 0.1.0, commit 0123abcd (+ uncommitted changes
  1a2b3c4d)``; ``unrecorded`` for None."""
  if not version:
    return "unrecorded"
  text = f"retro_jax {version.get('retro_jax')}"
  git = version.get("git")
  if git:
    text += f", commit {git['commit'][:12]}"
    if git.get("dirty"):
      text += f" (+ uncommitted changes {str(git.get('diff_sha256'))[:8]})"
  else:
    text += ", not a git checkout"
  return text
