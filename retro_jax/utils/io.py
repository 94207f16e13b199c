"""Atomic file writes and stage manifests: the one place that knows how outputs land.

Every offline stage writes through these helpers so that a killed job never leaves a
file that looks complete, and a re-run can tell which shards are finished.

* ``atomic_path(path)``: a context manager yielding a temporary sibling path; on a
  clean exit the temporary file is renamed onto ``path`` (``os.replace`` is atomic on
  POSIX), on an exception it is removed.
* ``Manifest``: a small JSON file ``<dir>/manifest.json`` recording finished shards and
  the settings they were produced with; ``is_done`` is true only when the recorded
  settings match and every listed output still exists.
* ``file_fingerprint(path)``: the content identity of an input file, so that manifests
  key inputs by what they hold, not by how their path is spelled (see below).
* ``tree_fingerprint(path)``: the identity of an output file or directory as a step
  that built on it saw it, without reading the bytes of large trees (see below).

Inputs in manifests
-------------------
A manifest never stores the path of an input or of the output directory: a stage puts
``file_fingerprint`` of each input file (or an upstream stage's identity) under the
settings keys it names ``input_keys``. The rule of ``file_fingerprint``:

* a file of at most ``FULL_HASH_BYTES`` (8 MiB): its size and the SHA-256 of all its
  bytes (``"full:<size>:<sha256>"``); any edit is noticed, a copy or a ``touch`` is not
  a change;
* a larger file: its size, ``st_mtime_ns`` and the SHA-256 of its first and last MiB
  (``"sampled:<size>:<mtime_ns>:<sha256>"``), O(1) in the file size; an in-place edit
  changes the mtime (or the size / the sampled bytes), so it is noticed; a copy that
  does not keep the mtime (``cp`` without ``-p``) reads as changed and re-runs.

So the same input spelled as an absolute or a relative path, or an output directory
moved elsewhere, has the same settings; an input edited in place does not.

``Manifest(directory, settings, input_keys=...)`` compares the recorded settings with
the new ones: equal -> finished units are kept; a difference in an ``input_keys`` entry
(the input changed) -> the manifest starts afresh (every unit re-runs, and settings
that follow from the input, such as sizes, may differ too); a difference in other
settings only -> ``ValueError`` naming both (outputs of other settings are never
silently replaced). A stage whose outputs changed changes the identity the next stage
records as its input, so a change propagates down the chain of stages and only there.

Outputs
-------
``tree_fingerprint(path)`` is ``file_fingerprint`` for a file; for a directory it is
the SHA-256 of its listing, each file (recursively, names starting with ``.`` such as
lock files and temporary files left out) as its relative path, size and
``st_mtime_ns`` (``"tree:<files>:<sha256>"``): no file is read, so a checkpoint
directory of gigabytes costs one ``stat`` per file; a deleted, added, resized or
rewritten file changes it, a copy that keeps mtimes (``shutil.copytree``, ``cp -p``)
or a move does not. A missing path, or a directory with no file in it, is ``None``.
A unit records such identities with ``Manifest.mark_done(..., fingerprints=...)``
and reads them back with ``Manifest.fingerprints``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
from typing import Any, Iterable, Iterator, Mapping, Sequence

from absl import logging

from retro_jax.utils import stages


FULL_HASH_BYTES = 8 << 20
SAMPLE_BYTES = 1 << 20


def file_fingerprint(path: str | os.PathLike) -> str:
  """The content identity of an input file (rule in the module docstring)."""
  path = os.fspath(path)
  st = os.stat(path)
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    if st.st_size <= FULL_HASH_BYTES:
      for block in iter(lambda: f.read(SAMPLE_BYTES), b""):
        digest.update(block)
      return f"full:{st.st_size}:{digest.hexdigest()}"
    digest.update(f.read(SAMPLE_BYTES))
    f.seek(st.st_size - SAMPLE_BYTES)
    digest.update(f.read(SAMPLE_BYTES))
  return f"sampled:{st.st_size}:{st.st_mtime_ns}:{digest.hexdigest()}"


def tree_fingerprint(path: str | os.PathLike) -> str | None:
  """The identity of an output file or directory; None if missing or an empty
  directory (rule in the module docstring)."""
  path = os.fspath(path)
  if os.path.isfile(path):
    return file_fingerprint(path)
  if not os.path.isdir(path):
    return None
  listing = []
  for directory, subdirs, names in os.walk(path):
    subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
    for name in sorted(n for n in names if not n.startswith(".")):
      full = os.path.join(directory, name)
      st = os.stat(full)
      listing.append(f"{os.path.relpath(full, path)}\0{st.st_size}\0{st.st_mtime_ns}")
  if not listing:
    return None
  digest = hashlib.sha256("\n".join(listing).encode("utf-8")).hexdigest()
  return f"tree:{len(listing)}:{digest}"


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


def read_jsonl(path: str | os.PathLike, *, torn_tail: bool = False
               ) -> Iterator[tuple[str, dict[str, Any]]]:
  """The one reader of JSON-lines files: yields ``("<path>:<line>", object)`` per
  non-blank line, so callers name the line in their own errors.

  Invalid UTF-8, invalid JSON and a line that is not a JSON object raise ``ValueError``
  naming ``path:line``. ``torn_tail=True`` is for files this project appends to while
  running (partial predictions): an invalid *last* line (a write cut short by a kill)
  ends the file instead of raising; invalid JSON before the last line still raises.
  """
  path = os.fspath(path)
  with open(path, "rb") as f:
    lines = f.read().split(b"\n")
  last = max((i for i, raw in enumerate(lines) if raw.strip()), default=-1)
  for index, raw in enumerate(lines[:last + 1]):
    where = f"{path}:{index + 1}"
    if not raw.strip():
      continue
    try:
      obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
      if torn_tail and index == last:
        return
      raise ValueError(f"{where}: not UTF-8 ({e.reason} at byte {e.start})") from e
    except json.JSONDecodeError as e:
      if torn_tail and index == last:
        return
      raise ValueError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from e
    if not isinstance(obj, dict):
      raise ValueError(f"{where}: expected a JSON object, found {type(obj).__name__}")
    yield where, obj


class Manifest:
  """Records which units of work (shards) of a stage are complete.

  Layout of ``<directory>/manifest.json``::

      {"settings": {...}, "done": {"<unit>": {"outputs": [...], "info": {...},
                                             "fingerprints": {...}}}}

  ``settings`` are the parameters the outputs depend on; opening a manifest with
  different settings raises, naming both, instead of mixing incompatible outputs,
  unless a key in ``input_keys`` (an input's content identity) differs: then the
  inputs changed and the manifest starts afresh (``self.inputs_changed``), so every
  unit is redone. Paths in ``outputs`` are relative to the directory, so a moved
  directory keeps its manifest. ``fingerprints`` (present only where the caller gave
  them) are the content identities the caller checks the unit against, e.g. of its
  outputs and inputs (``tree_fingerprint``); ``is_done`` does not read them.
  """

  FILENAME = "manifest.json"

  def __init__(self, directory: str | os.PathLike, settings: Mapping[str, Any],
               input_keys: Sequence[str] = ()):
    self.directory = os.fspath(directory)
    self.path = os.path.join(self.directory, self.FILENAME)
    self.settings = json.loads(json.dumps(dict(settings), sort_keys=True))
    self.input_keys = tuple(input_keys)
    self.inputs_changed: list[str] = []
    self._done: dict[str, dict[str, Any]] = {}
    if os.path.exists(self.path):
      data = self._read(self.path)
      old = data.get("settings")
      changed = [k for k in self.input_keys
                 if not isinstance(old, dict) or old.get(k) != self.settings.get(k)]
      if old != self.settings and changed:
        # The inputs changed: what was done was done for other inputs; redo it all.
        self.inputs_changed = changed
        logging.warning("%s: inputs changed (%s); redoing the outputs in %s", self.path,
                        ", ".join(changed), self.directory)
        return
      if old != self.settings:
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

  def fingerprints(self, unit: str) -> dict[str, Any] | None:
    """What ``mark_done`` recorded as ``fingerprints`` for ``unit`` (None if nothing)."""
    entry = self._done.get(unit)
    return None if entry is None or "fingerprints" not in entry else dict(
        entry["fingerprints"])

  def outputs(self, unit: str) -> list[str] | None:
    """The recorded outputs of ``unit`` (relative paths), None if it has no entry."""
    entry = self._done.get(unit)
    return None if entry is None else list(entry["outputs"])

  def mark_done(self, unit: str, outputs: Sequence[str], info: Mapping[str, Any] | None = None,
                *, fingerprints: Mapping[str, Any] | None = None) -> None:
    """Records ``unit`` as complete; ``outputs`` are paths relative to the directory,
    ``fingerprints`` (JSON) what the caller will check the unit against later.

    Safe when several processes finish shards at once: under an exclusive lock on
    the directory it re-reads the file, adds this unit and rewrites it. Every write
    of the file holds that lock, so a temporary of it found there was left by a
    killed process; it is removed.
    """
    os.makedirs(self.directory, exist_ok=True)
    fd = os.open(self.directory, os.O_RDONLY)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX)
      stages.remove_stale_temporaries(self.directory, self.FILENAME)
      if os.path.exists(self.path):
        data = self._read(self.path)
        # Units another process finished meanwhile, if for these settings (entries
        # made for older inputs are dropped).
        if data.get("settings") == self.settings:
          self._done.update(data.get("done", {}))
      self._done[unit] = {"outputs": list(outputs), "info": dict(info or {})}
      if fingerprints is not None:
        self._done[unit]["fingerprints"] = json.loads(json.dumps(dict(fingerprints)))
      atomic_write_json(self.path, {"settings": self.settings, "done": self._done})
    finally:
      fcntl.flock(fd, fcntl.LOCK_UN)
      os.close(fd)

  @staticmethod
  def _read(path: str) -> Any:
    """The JSON in ``path``; ``ValueError`` naming the file if it is not JSON."""
    with open(path, encoding="utf-8") as f:
      try:
        return json.load(f)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}: corrupt manifest ({e})") from e

  @classmethod
  def read_settings(cls, directory: str | os.PathLike, *, stage: str | None = None,
                    what: str = "", hint: str = "") -> dict[str, Any]:
    """The settings recorded in ``<directory>/manifest.json``, without opening it.

    Raises ``FileNotFoundError`` naming the file when there is none ("no <what> build
    in <directory>", then ``hint``), ``ValueError`` naming it when it is corrupt, and,
    with ``stage``, when its recorded ``settings["stage"]`` is another (a directory of
    another stage).
    """
    directory = os.fspath(directory)
    path = os.path.join(directory, cls.FILENAME)
    what = what or stage or "stage"
    if not os.path.exists(path):
      raise FileNotFoundError(f"{path}: no {what} build in {directory}{hint}")
    data = cls._read(path)
    settings = data.get("settings") if isinstance(data, dict) else None
    if not isinstance(settings, dict):
      raise ValueError(f"{path}: corrupt manifest (no settings object)")
    if stage is not None and settings.get("stage") != stage:
      article = "an" if what[:1].lower() in "aeiou" else "a"
      raise ValueError(f"{path}: not {article} {what} build (stage {settings.get('stage')!r})")
    return settings

  @classmethod
  def load(cls, directory: str | os.PathLike, *, stage: str, what: str = "", hint: str = "",
           input_keys: Sequence[str] = ()) -> "Manifest":
    """The manifest of a ``stage`` build in ``directory``, opened with the settings it
    recorded (errors as ``read_settings``)."""
    settings = cls.read_settings(directory, stage=stage, what=what, hint=hint)
    return cls(directory, settings, input_keys)

  @property
  def done_units(self) -> list[str]:
    return sorted(u for u in self._done if self.is_done(u))
