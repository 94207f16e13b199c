"""Document readers: jsonl, plain-text and TFDS corpora as ``(doc_id, text)`` streams.

A ``Corpus`` is an ordered sequence of *records*: a jsonl line, a text file, a line
of a text file, or a TFDS example. Files are read in sorted path order, so records
are numbered ``0, 1, ...`` the same way on every machine. ``doc_id`` is that record
number: it does not depend on sharding, and empty records keep their number.

``Corpus.documents(shard_id, num_shards)`` yields the non-empty documents of one
shard. Records whose text is empty or whitespace-only are skipped and counted in a
``CorpusStats``. Two ways to shard (``sharding=``):

* ``'contiguous'`` (default): shard s gets records ``[s*N//S, (s+1)*N//S)``.
  Concatenating the shards in shard order gives the unsharded stream, so a DB built
  in S shards and merged is identical to a one-process build. It costs one counting
  pass over line-based files (newline counting, no decoding; cached per corpus);
  TFDS reads N from the dataset info.
* ``'interleaved'``: record i goes to shard ``i % S``; no counting pass.

Formats (``open_corpus`` picks one from the input, or ``format=``):

* jsonl (``.jsonl``/``.json``, optionally ``.gz``): one JSON object per line, text
  under ``text_key`` (NeMo's ``--json-keys``). A blank line is an empty record.
* text: ``text_unit='file'`` (one document per file) or ``'line'`` (one per line,
  trailing ``\\r\\n`` removed).
* tfds: ``tfds:<name>[:<version>]`` (or ``format='tfds'``), split ``tfds_split``,
  text under ``text_key``. ``tensorflow_datasets`` is imported only here.

Errors name the file and the 1-based line: invalid UTF-8, invalid JSON, a line that
is not a JSON object, a missing key, a non-string text value.
"""

from __future__ import annotations

import abc
import dataclasses
import glob
import gzip
import json
import os
from typing import BinaryIO, Callable, Iterator, Optional, Sequence

from retro_jax.utils import stages

Document = tuple[int, str]
SHARDINGS = ("contiguous", "interleaved")
JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
_READ_BLOCK = 16 << 20


@dataclasses.dataclass
class CorpusStats:
  """Counts of one pass: records of the shard read, documents yielded, empties skipped."""
  records: int = 0
  documents: int = 0
  empty: int = 0


class Corpus(abc.ABC):
  """An ordered, re-readable sequence of text records."""

  @abc.abstractmethod
  def num_records(self) -> int:
    """Total records, empty ones included."""

  @abc.abstractmethod
  def _records(self, start: int, stop: int, keep: Callable[[int], bool]
               ) -> Iterator[Document]:
    """Yields ``(index, text)`` for records ``start <= index < stop`` with ``keep``."""

  @abc.abstractmethod
  def describe(self) -> str:
    """A short description for logs and manifests."""

  def shard_num_records(self, shard_id: int = 0, num_shards: int = 1, *,
                        sharding: str = "contiguous") -> int:
    """Records (empty included) that shard ``shard_id`` reads."""
    stages.check_shard(shard_id, num_shards)
    total = self.num_records()
    if sharding == "contiguous":
      start, stop = stages.shard_range(total, shard_id, num_shards)
      return stop - start
    return len(range(shard_id, total, num_shards))

  def documents(self, shard_id: int = 0, num_shards: int = 1, *,
                sharding: str = "contiguous",
                stats: Optional[CorpusStats] = None) -> Iterator[Document]:
    """Yields ``(doc_id, text)`` for the non-empty records of one shard, in order.

    Args:
      shard_id, num_shards: This shard.
      sharding: ``'contiguous'`` or ``'interleaved'`` (see the module docstring).
      stats: Updated in place while iterating (records, documents, empty).
    """
    stages.check_shard(shard_id, num_shards)
    if sharding not in SHARDINGS:
      raise ValueError(f"sharding must be one of {SHARDINGS}, got {sharding!r}")
    stats = CorpusStats() if stats is None else stats
    if num_shards == 1:
      start, stop, keep = 0, None, (lambda i: True)
    elif sharding == "contiguous":
      (start, stop), keep = stages.shard_range(self.num_records(), shard_id, num_shards), (
          lambda i: True)
    else:
      start, stop, keep = 0, None, (lambda i: i % num_shards == shard_id)
    if stop is not None and start >= stop:
      return
    for doc_id, text in self._records(start, stop, keep):
      stats.records += 1
      if not text.strip():
        stats.empty += 1
        continue
      stats.documents += 1
      yield doc_id, text

  def __iter__(self) -> Iterator[Document]:
    return self.documents()


# ----------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------


def resolve_paths(inputs: str | os.PathLike | Sequence[str | os.PathLike],
                  suffixes: Optional[Sequence[str]] = None) -> list[str]:
  """Expands files, directories (their files, non-recursive) and glob patterns.

  Each input's matches are sorted; inputs keep their given order. Hidden files are
  ignored in directories. ``suffixes`` filters directory listings.

  Raises:
    FileNotFoundError: an input matches nothing.
  """
  if isinstance(inputs, (str, os.PathLike)):
    inputs = [inputs]
  paths: list[str] = []
  for item in map(os.fspath, inputs):
    if os.path.isdir(item):
      found = sorted(
          os.path.join(item, name) for name in os.listdir(item)
          if not name.startswith(".") and os.path.isfile(os.path.join(item, name))
          and (suffixes is None or name.endswith(tuple(suffixes))))
    elif glob.has_magic(item):
      found = sorted(p for p in glob.glob(item) if os.path.isfile(p))
    elif os.path.isfile(item):
      found = [item]
    else:
      raise FileNotFoundError(f"{item}: no such file or directory")
    if not found:
      raise FileNotFoundError(f"{item}: matches no input files")
    paths.extend(found)
  return paths


def open_binary(path: str) -> BinaryIO:
  """``path`` opened for binary reading, gunzipped on the fly when it ends ``.gz``."""
  if path.endswith(".gz"):
    return gzip.open(path, "rb")  # type: ignore[return-value]
  return open(path, "rb")  # pylint: disable=consider-using-with


def count_lines(path: str) -> int:
  """Lines as binary iteration yields them (a last line without newline counts)."""
  count, last = 0, b"\n"
  with open_binary(path) as f:
    while block := f.read(_READ_BLOCK):
      count += block.count(b"\n")
      last = block[-1:]
  return count + (last != b"\n")


def _decode(raw: bytes, path: str, lineno: int) -> str:
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    line = lineno + raw[:e.start].count(b"\n")
    raise ValueError(f"{path}:{line}: invalid UTF-8 ({e.reason} at byte "
                     f"{e.start} of the {'line' if lineno else 'file'})") from e


class _LineCorpus(Corpus):
  """Records are the lines of a list of files."""

  def __init__(self, paths: Sequence[str]):
    self.paths = list(paths)
    self._counts: Optional[list[int]] = None

  def _line_counts(self) -> list[int]:
    if self._counts is None:
      self._counts = [count_lines(p) for p in self.paths]
    return self._counts

  def num_records(self) -> int:
    return sum(self._line_counts())

  @abc.abstractmethod
  def _parse(self, raw: bytes, path: str, lineno: int) -> str:
    """Text of one line."""

  def _records(self, start, stop, keep):
    index = 0
    counts = self._counts if start > 0 else None
    for file_number, path in enumerate(self.paths):
      if stop is not None and index >= stop:
        return
      if counts is not None and index + counts[file_number] <= start:
        index += counts[file_number]
        continue
      with open_binary(path) as f:
        for lineno, raw in enumerate(f, 1):
          if index >= start and keep(index):
            yield index, self._parse(raw, path, lineno)
          index += 1
          if stop is not None and index >= stop:
            return


class JsonlCorpus(_LineCorpus):
  """jsonl files: one JSON object per line, text under ``text_key``."""

  def __init__(self, paths: Sequence[str], *, text_key: str = "text"):
    super().__init__(paths)
    self.text_key = text_key

  def describe(self) -> str:
    return f"jsonl[{self.text_key}]:{','.join(self.paths)}"

  def _parse(self, raw: bytes, path: str, lineno: int) -> str:
    line = _decode(raw, path, lineno)
    if not line.strip():
      return ""
    try:
      obj = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg} at column "
                       f"{e.colno})") from e
    if not isinstance(obj, dict):
      raise ValueError(f"{path}:{lineno}: expected a JSON object, found "
                       f"{type(obj).__name__}")
    if self.text_key not in obj:
      raise ValueError(f"{path}:{lineno}: no key {self.text_key!r} (keys: "
                       f"{sorted(obj)[:10]}); set text_key")
    text = obj[self.text_key]
    if not isinstance(text, str):
      raise ValueError(f"{path}:{lineno}: {self.text_key!r} is "
                       f"{type(text).__name__}, not a string")
    return text


class TextLinesCorpus(_LineCorpus):
  """Plain-text files, one document per line."""

  def describe(self) -> str:
    return f"text-lines:{','.join(self.paths)}"

  def _parse(self, raw: bytes, path: str, lineno: int) -> str:
    return _decode(raw.rstrip(b"\r\n"), path, lineno)


class TextFilesCorpus(Corpus):
  """Plain-text files, one document per file."""

  def __init__(self, paths: Sequence[str]):
    self.paths = list(paths)

  def describe(self) -> str:
    return f"text-files:{','.join(self.paths)}"

  def num_records(self) -> int:
    return len(self.paths)

  def _records(self, start, stop, keep):
    stop = len(self.paths) if stop is None else stop
    for index in range(start, stop):
      if keep(index):
        with open_binary(self.paths[index]) as f:
          yield index, _decode(f.read(), self.paths[index], 1)


# ----------------------------------------------------------------------------------
# TFDS
# ----------------------------------------------------------------------------------


class TfdsCorpus(Corpus):
  """A TFDS split; each example is a record, text under ``text_key``.

  Examples are read in the dataset's stored order (no file shuffling, one file at a
  time), so record numbers are stable; a contiguous shard reads only its slice
  (``split[start:stop]``).

  Args:
    name: TFDS name, e.g. ``'wiki40b/en'`` or ``'c4/en:3.0.1'``.
    split: e.g. ``'train'``.
    text_key: Feature holding the text (bytes or str).
    data_dir: TFDS data directory (default: TFDS's).
    download: Let TFDS download and prepare the dataset if needed.
  """

  def __init__(self, name: str, *, split: str = "train", text_key: str = "text",
               data_dir: Optional[str] = None, download: bool = True):
    self.name, self.split, self.text_key = name, split, text_key
    self.data_dir, self.download = data_dir, download
    self._num_records: Optional[int] = None

  def describe(self) -> str:
    return f"tfds[{self.text_key}]:{self.name}/{self.split}"

  def _builder(self):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    builder = tfds.builder(self.name, data_dir=self.data_dir)
    if self.download:
      builder.download_and_prepare()
    return builder

  def num_records(self) -> int:
    if self._num_records is None:
      info = self._builder().info
      if self.split not in info.splits:
        raise ValueError(f"tfds {self.name}: no split {self.split!r} (splits: "
                         f"{sorted(info.splits)})")
      self._num_records = info.splits[self.split].num_examples
    return self._num_records

  def _records(self, start, stop, keep):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    builder = self._builder()
    split = self.split if (start == 0 and stop is None) else (
        f"{self.split}[{start}:{'' if stop is None else stop}]")
    dataset = builder.as_dataset(
        split=split, shuffle_files=False,
        read_config=tfds.ReadConfig(interleave_cycle_length=1))
    for index, example in enumerate(tfds.as_numpy(dataset), start):
      if not keep(index):
        continue
      where = f"tfds {self.name}/{self.split} example {index}"
      if self.text_key not in example:
        raise ValueError(f"{where}: no feature {self.text_key!r} (features: "
                         f"{sorted(example)}); set text_key")
      text = example[self.text_key]
      if isinstance(text, bytes):
        try:
          text = text.decode("utf-8")
        except UnicodeDecodeError as e:
          raise ValueError(f"{where}: invalid UTF-8 ({e.reason})") from e
      elif not isinstance(text, str):
        raise ValueError(f"{where}: {self.text_key!r} is {type(text).__name__}, not "
                         "text")
      yield index, text


# ----------------------------------------------------------------------------------
# Factory
# ----------------------------------------------------------------------------------

FORMATS = ("auto", "jsonl", "text", "tfds")
TEXT_UNITS = ("file", "line")


def open_corpus(inputs: str | os.PathLike | Sequence[str | os.PathLike], *,
                format: str = "auto", text_key: str = "text",  # pylint: disable=redefined-builtin
                text_unit: str = "file", tfds_split: str = "train",
                tfds_data_dir: Optional[str] = None,
                tfds_download: bool = True) -> Corpus:
  """Opens a corpus from files, directories, globs or ``tfds:<name>``.

  Args:
    inputs: A path, directory, glob or ``tfds:<name>``; or a list of paths/globs.
    format: ``'auto'`` (``tfds:`` prefix -> tfds; all files ``.jsonl``/``.json``
      [``.gz``] -> jsonl; else text), ``'jsonl'``, ``'text'`` or ``'tfds'``.
    text_key: jsonl key / TFDS feature holding the text.
    text_unit: For text files: ``'file'`` (a document per file) or ``'line'``.
    tfds_split, tfds_data_dir, tfds_download: For TFDS.
  """
  if format not in FORMATS:
    raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
  if text_unit not in TEXT_UNITS:
    raise ValueError(f"text_unit must be one of {TEXT_UNITS}, got {text_unit!r}")
  single = os.fspath(inputs) if isinstance(inputs, (str, os.PathLike)) else None
  if format == "tfds" or (format == "auto" and single and single.startswith("tfds:")):
    if single is None:
      raise ValueError("a TFDS corpus takes one dataset name")
    return TfdsCorpus(single.removeprefix("tfds:"), split=tfds_split,
                      text_key=text_key, data_dir=tfds_data_dir,
                      download=tfds_download)
  if format == "auto":
    listing = resolve_paths(inputs)
    is_json = [p.endswith(JSONL_SUFFIXES) for p in listing]
    if any(is_json) and not all(is_json):
      raise ValueError(f"{inputs}: mixes jsonl and other files; pass format='jsonl' "
                       "(directories are then filtered to jsonl files) or 'text'")
    format = "jsonl" if all(is_json) else "text"
  if format == "jsonl":
    return JsonlCorpus(resolve_paths(inputs, JSONL_SUFFIXES), text_key=text_key)
  paths = resolve_paths(inputs)
  return TextFilesCorpus(paths) if text_unit == "file" else TextLinesCorpus(paths)
