"""Atomic file writes and stage manifests: the one place that knows how outputs land.

Every offline stage writes through these helpers so that a killed job never leaves a
file that looks complete, and a re-run can tell which shards are finished.

* ``atomic_path(path)``: a context manager yielding a temporary sibling path; on a
  clean exit the temporary file is renamed onto ``path`` (``os.replace`` is atomic on
  POSIX), on an exception it is removed.
* ``Manifest``: a small JSON file ``<dir>/manifest.json`` recording finished shards and
  the settings they were produced with; ``is_done`` is true only when the recorded
  settings match and every listed output still exists.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from typing import Any, Iterable, Iterator, Mapping, Sequence


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
  """Yields a temporary path in ``path``'s directory; renames it onto ``path`` on success."""
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                             dir=directory)
  os.close(fd)
  try:
    yield tmp
    if os.path.exists(tmp):
      # mkstemp makes 0600 files; give outputs the usual umask-based mode.
      umask = os.umask(0)
      os.umask(umask)
      os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
  with atomic_path(path) as tmp:
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
  atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_write_jsonl(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]]) -> None:
  """One JSON object per line (UTF-8, not ASCII-escaped), written atomically."""
  with atomic_path(path) as tmp:
    with open(tmp, "w", encoding="utf-8") as f:
      for row in rows:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")


class Manifest:
  """Records which units of work (shards) of a stage are complete.

  Layout of ``<directory>/manifest.json``::

      {"settings": {...}, "done": {"<unit>": {"outputs": [...], "info": {...}}}}

  ``settings`` are the parameters the outputs depend on; opening a manifest with
  different settings raises, naming both, instead of mixing incompatible outputs.
  """

  FILENAME = "manifest.json"

  def __init__(self, directory: str | os.PathLike, settings: Mapping[str, Any]):
    self.directory = os.fspath(directory)
    self.path = os.path.join(self.directory, self.FILENAME)
    self.settings = json.loads(json.dumps(dict(settings), sort_keys=True))
    self._done: dict[str, dict[str, Any]] = {}
    if os.path.exists(self.path):
      with open(self.path, encoding="utf-8") as f:
        try:
          data = json.load(f)
        except json.JSONDecodeError as e:
          raise ValueError(f"{self.path}: corrupt manifest ({e})") from e
      if data.get("settings") != self.settings:
        raise ValueError(
            f"{self.path}: outputs in {self.directory} were made with settings "
            f"{data.get('settings')}, not {self.settings}; use a fresh directory "
            "or delete the old outputs")
      self._done = dict(data.get("done", {}))

  def is_done(self, unit: str) -> bool:
    entry = self._done.get(unit)
    if entry is None:
      return False
    return all(os.path.exists(os.path.join(self.directory, p)) for p in entry["outputs"])

  def info(self, unit: str) -> dict[str, Any]:
    return dict(self._done[unit].get("info", {}))

  def mark_done(self, unit: str, outputs: Sequence[str], info: Mapping[str, Any] | None = None
                ) -> None:
    """Records ``unit`` as complete; ``outputs`` are paths relative to the directory.

    Safe when several processes finish shards at once: under an exclusive lock on
    the directory it re-reads the file, adds this unit and rewrites it.
    """
    os.makedirs(self.directory, exist_ok=True)
    fd = os.open(self.directory, os.O_RDONLY)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX)
      if os.path.exists(self.path):
        with open(self.path, encoding="utf-8") as f:
          self._done.update(json.load(f).get("done", {}))
      self._done[unit] = {"outputs": list(outputs), "info": dict(info or {})}
      atomic_write_json(self.path, {"settings": self.settings, "done": self._done})
    finally:
      fcntl.flock(fd, fcntl.LOCK_UN)
      os.close(fd)

  @property
  def done_units(self) -> list[str]:
    return sorted(u for u in self._done if self.is_done(u))
