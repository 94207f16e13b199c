"""Fault injection: corrupted chunk DBs and neighbor maps fail loudly, naming the file.

A corpus of damaged files is generated from valid ones written by the project's own
writers (``formats.ChunkDBWriter`` / ``formats.write_neighbor_map``): every header
field, a few corruptions of each of the four index arrays, truncation (and excess)
at every section boundary of both files, a missing file, and neighbor maps whose
rows / k / ids do not fit their DBs. For every case, opening and then reading
everything (every chunk, with continuation for a retrieval DB, every document, every
chunk range, the document of every chunk) must raise an error whose message names
the damaged file. A case that opens and reads without error is a *silent read*; the
test counts the cases and asserts there are none.

Killed preprocess runs: ``retrieval.pipeline.preprocess`` (a small corpus, a hashed
bag-of-words embedder, an exact index) is killed with ``os._exit`` just after its Nth
``os.replace`` (every rename that puts an output in place), for every N of a clean
run, and just before it; each killed directory is then re-run to completion and must
equal an uninterrupted run byte for byte (manifests up to their timings), with no
temporary file left behind.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import time

import numpy as np
import pytest

from retro_jax.data import sources
from retro_jax.retrieval import formats
from retro_jax.retrieval.layout import RetrievalLayout
import retrieval_fixture

M = 4
HEADER = formats.ChunkDBHeader.SIZE
# Byte offset and struct format of each retmmap header field.
HEADER_FIELDS = {"magic": (0, "9s"), "version": (9, "<L"), "stride": (13, "<L"),
                 "dtype code": (17, "<B"), "num_docs": (18, "<Q"),
                 "chunk_size": (26, "<Q"), "num_chunks": (34, "<Q"),
                 "retrieval_db": (42, "<B")}
KNN_FIELDS = {"magic": (0, "9s"), "version": (9, "<Q"), "k": (17, "<Q"),
              "num_chunks": (25, "<Q"), "chunk_start_id": (33, "<Q")}
DOCS = [[1, 2, 3], [4] * 9, [5], [6] * 8, [7, 8, 9, 10, 11], [12] * 2]

# Layouts the corpus is generated from: (name, retrieval_db, stride, dtype).
LAYOUTS = [("retrieval", True, M, np.uint16), ("training", False, M, np.uint16),
           ("retrieval_int32", True, M, np.int32), ("overlapping", False, M // 2,
                                                       np.uint16)]


def _write(prefix: str, retrieval_db: bool, stride: int, dtype) -> formats.ChunkDB:
  with formats.ChunkDBWriter(prefix, dtype=dtype, pad_id=0, chunk_size=M,
                             retrieval_db=retrieval_db, stride=stride) as writer:
    for doc in DOCS:
      writer.add_document(np.asarray(doc))
  return formats.ChunkDB(prefix)


def _read_everything(prefix: str) -> None:
  """Opens a DB and reads every chunk, document and index relation."""
  db = formats.ChunkDB(prefix)
  ids = np.arange(db.num_chunks)
  db.get_chunks(ids, with_continuation=False)
  if db.is_retrieval_db:
    db.get_chunks(ids, with_continuation=True)
  db.doc_of_chunk(ids)
  for d in range(db.num_docs):
    db.get_document(d)
    db.doc_chunk_range(d)
  db.close()


def _patch(path: str, offset: int, data: bytes) -> None:
  with open(path, "r+b") as f:
    f.seek(offset)
    f.write(data)


def _truncate(path: str, size: int) -> None:
  with open(path, "r+b") as f:
    f.truncate(size)


class Corpus:
  """Runs corruption cases; records which read silently."""

  def __init__(self, tmp_path):
    self.tmp_path = tmp_path
    self.cases = 0
    self.silent: list[str] = []
    self.unnamed: list[str] = []

  def expect_loud(self, name: str, named_files: tuple[str, ...], read) -> None:
    self.cases += 1
    try:
      read()
    except (ValueError, OSError) as e:   # not a bare IndexError / TypeError
      if not any(path in str(e) for path in named_files):
        self.unnamed.append(f"{name}: {type(e).__name__}: {e}")
      return
    self.silent.append(name)

  def chunk_db_case(self, name: str, layout, corrupt) -> None:
    """Writes a fresh DB of ``layout``, applies ``corrupt(idx, bin, db)``, checks."""
    case_dir = self.tmp_path / f"c{self.cases}"
    case_dir.mkdir()
    prefix = str(case_dir / "db")
    _, retrieval_db, stride, dtype = layout
    db = _write(prefix, retrieval_db, stride, dtype)
    idx, bin_ = db.idx_path, db.bin_path
    before = (open(idx, "rb").read(), open(bin_, "rb").read())
    corrupt(idx, bin_, db)
    db.close()
    after = tuple(open(p, "rb").read() if os.path.exists(p) else None
                  for p in (idx, bin_))
    if after == before:                 # a no-op corruption is not a case
      shutil.rmtree(case_dir)
      return
    self.expect_loud(f"{layout[0]}/{name}", (idx, bin_), lambda: _read_everything(prefix))
    shutil.rmtree(case_dir)


def _header_cases(db: formats.ChunkDB):
  """(name, field, value) corruptions of every header field."""
  h = db.header
  yield "magic", "magic", b"MMIDXXX\x00\x00"
  yield "magic-nemo-indexed", "magic", b"MMIDIDX\x00\x00"
  for v in (0, 2, 2**31):
    yield f"version={v}", "version", v
  for v in {1, 3, 2 * M, M // 2} - {h.stride}:
    yield f"stride={v}", "stride", v
  other = 4 if h.dtype == np.uint16 else 8
  for v in (0, 9, 6, 1, other):
    yield f"dtype code={v}", "dtype code", v
  for v in (0, h.num_docs - 1, h.num_docs + 1, 2**40):
    yield f"num_docs={v}", "num_docs", v
  for v in (0, 1, 2, M + 1, 2 * M, 2**40):
    yield f"chunk_size={v}", "chunk_size", v
  for v in (0, h.num_chunks - 1, h.num_chunks + 1, 2**40):
    yield f"num_chunks={v}", "num_chunks", v
  for v in (2, 255, 1 - int(h.retrieval_db)):
    yield f"retrieval_db={v}", "retrieval_db", v


def _index_cases(db: formats.ChunkDB):
  """(name, array, entry, value) corruptions of interior (and end) index entries."""
  n, c, m = db.num_docs, db.num_chunks, db.chunk_size
  item = db.dtype.itemsize
  sizes = [int(s) for s in db.sizes]
  for d in (0, 1, n - 1):
    for v in (0, sizes[d] + m, sizes[d] - m, sizes[d] + 1, -m, 10**6, 2**31 - 1):
      yield f"sizes[{d}]={v}", "sizes", d, v
  for d in (1, 2, n - 1):
    p = int(db.pointers[d])
    for v in (0, p + item, p - m * item, p + m * item, -64, 10**9):
      yield f"pointers[{d}]={v}", "pointers", d, v
  for d in (1, 2, n - 1):
    s = int(db.chunk_id_start[d])
    for v in (0, s + 1, s - 1, 10**9, -1):
      yield f"chunk_id_start[{d}]={v}", "chunk_id_start", d, v
  for j in (0, 1, 2, c // 2, c - 1):
    a = int(db.chunk_address[j])
    for v in (0, -64, 10**9, a + item, a - item, a + m * item, 2**62):
      yield f"chunk_address[{j}]={v}", "chunk_address", j, v


ARRAY_LAYOUT = {"sizes": (0, "<i"), "pointers": (4, "<q"), "chunk_id_start": (12, "<q"),
                "chunk_address": (20, "<q")}


def _array_offset(db: formats.ChunkDB, array: str, entry: int) -> int:
  n = db.num_docs
  offsets = {"sizes": HEADER, "pointers": HEADER + 4 * n,
             "chunk_id_start": HEADER + 12 * n, "chunk_address": HEADER + 20 * n}
  return offsets[array] + entry * (4 if array == "sizes" else 8)


def _section_boundaries(db: formats.ChunkDB) -> list[int]:
  n, c = db.num_docs, db.num_chunks
  ends = [0, 5, 9, HEADER - 1, HEADER, HEADER + 4 * n, HEADER + 12 * n,
          HEADER + 20 * n, HEADER + 20 * n + 8 * c]
  return sorted({e + delta for e in ends for delta in (-1, 0, 1)
                 if 0 <= e + delta != db.header.idx_bytes})


def test_corrupted_chunk_dbs_never_read_silently(tmp_path, capsys):
  corpus = Corpus(tmp_path)
  for layout in LAYOUTS:
    reference = _write(str(tmp_path / f"ref_{layout[0]}"), *layout[1:])
    _read_everything(reference.prefix)                     # the valid file reads

    for name, field, value in _header_cases(reference):
      offset, fmt = HEADER_FIELDS[field]
      corpus.chunk_db_case(f"header {name}", layout, lambda i, b, db, o=offset,
                           f=fmt, v=value: _patch(i, o, struct.pack(f, v)))

    for name, array, entry, value in _index_cases(reference):
      fmt = ARRAY_LAYOUT[array][1]
      corpus.chunk_db_case(
          f"index {name}", layout,
          lambda i, b, db, a=array, e=entry, f=fmt, v=value:
          _patch(i, _array_offset(db, a, e), struct.pack(f, v)))
    # Two chunk addresses swapped (each in range, both in the DB).
    corpus.chunk_db_case("index chunk_address[1]<->[2]", layout, lambda i, b, db: (
        _patch(i, _array_offset(db, "chunk_address", 1),
               struct.pack("<q", int(db.chunk_address[2]))),
        _patch(i, _array_offset(db, "chunk_address", 2),
               struct.pack("<q", int(db.chunk_address[1])))))

    for size in _section_boundaries(reference):
      corpus.chunk_db_case(f"idx truncated to {size}", layout,
                           lambda i, b, db, s=size: _truncate(i, s))
    corpus.chunk_db_case("idx + 8 bytes", layout,
                         lambda i, b, db: open(i, "ab").write(b"\0" * 8))
    item = reference.dtype.itemsize
    bin_size = os.path.getsize(reference.bin_path)
    doc_starts = [int(p) for p in reference.pointers]
    for size in sorted({0, item, bin_size - item, *doc_starts,
                        *(p - item for p in doc_starts if p)}):
      corpus.chunk_db_case(f"bin truncated to {size}", layout,
                           lambda i, b, db, s=size: _truncate(b, s))
    corpus.chunk_db_case("bin + 1 token", layout,
                         lambda i, b, db: open(b, "ab").write(b"\0" * item))
    corpus.chunk_db_case("bin missing", layout, lambda i, b, db: os.remove(b))
    corpus.chunk_db_case("idx missing", layout, lambda i, b, db: os.remove(i))
    reference.close()

  print(f"\nchunk DB fault injection: {corpus.cases} cases, "
        f"{len(corpus.silent)} silent reads, {len(corpus.unnamed)} unnamed errors")
  assert corpus.cases > 300
  assert not corpus.silent, corpus.silent
  assert not corpus.unnamed, corpus.unnamed


def _neighbor_setup(tmp_path):
  db = _write(str(tmp_path / "retrieval"), True, M, np.uint16)
  query = _write(str(tmp_path / "train"), False, M, np.uint16)
  rng = np.random.default_rng(0)
  ids = rng.integers(-1, db.num_chunks, (query.num_chunks, 2))
  return db, query, ids


def _read_map(path, db, query, num_neighbors=None):
  """Opens a map, reads every row, validates it and uses it as a training source."""
  knn = formats.NeighborMap(path)
  knn[knn.chunk_start_id:knn.chunk_end_id]
  knn.validate_against(db, query_db=query)
  sources.PretrainSource(query, knn, db, seq_len=2 * M, num_neighbors=num_neighbors,
                       validate=False)


def test_corrupted_neighbor_maps_never_read_silently(tmp_path, capsys):
  db, query, ids = _neighbor_setup(tmp_path)
  corpus = Corpus(tmp_path)
  good = str(tmp_path / "good.knn")
  formats.write_neighbor_map(good, ids)
  _read_map(good, db, query)                                   # the valid map reads
  n, k = ids.shape

  def case(name, make, named=None, num_neighbors=None):
    path = str(tmp_path / f"k{corpus.cases}.knn")
    shutil.copy(good, path)
    make(path)
    corpus.expect_loud(name, (path,) if named is None else named,
                       lambda: _read_map(path, db, query, num_neighbors))
    if os.path.exists(path):
      os.remove(path)

  header_values = {"magic": [b"KNNRETX\x00\x00", b"MMIDRET\x00\x00"],
                   "version": [0, 2], "k": [0, k - 1, k + 1, 2**40],
                   "num_chunks": [0, n - 1, n + 1, 2**40],
                   "chunk_start_id": [1, n, 2**40]}
  for field, values in header_values.items():
    offset, fmt = KNN_FIELDS[field]
    for v in values:
      case(f"header {field}={v!r}", lambda p, o=offset, f=fmt, v=v:
           _patch(p, o, struct.pack(f, v)))
  size = formats.NeighborMap.HEADER_SIZE + n * k * 8
  for s in sorted({0, 5, 9, 40, 41, 49, size - 8, size - 1}):
    case(f"truncated to {s}", lambda p, s=s: _truncate(p, s))
  case("+ 8 bytes", lambda p: open(p, "ab").write(b"\0" * 8))
  case("missing", os.remove)
  # Whole maps that do not fit the DBs: rows, k, ids.
  for rows in (n - 1, n + 1):
    other = np.resize(ids, (rows, k))
    case(f"rows={rows} (query DB has {n})",
         lambda p, o=other: formats.write_neighbor_map(p, o))
  case("k=1 for a model reading 2", lambda p: formats.write_neighbor_map(p, ids[:, :1]),
       num_neighbors=2)
  for row, value in ((0, db.num_chunks), (n // 2, 10**9), (n - 1, -2), (1, -2**40)):
    offset = formats.NeighborMap.HEADER_SIZE + (row * k + 1) * 8
    case(f"ids[{row}, 1]={value}",
         lambda p, o=offset, v=value: _patch(p, o, struct.pack("<q", v)))
  print(f"\nneighbor map fault injection: {corpus.cases} cases, "
        f"{len(corpus.silent)} silent reads, {len(corpus.unnamed)} unnamed errors")
  assert not corpus.silent, corpus.silent
  assert not corpus.unnamed, corpus.unnamed


def test_unchecked_open_still_bounds_checks_gathers(tmp_path):
  """check_index=False skips the O(N) scan; gathers still fail loudly, naming the file."""
  db = _write(str(tmp_path / "db"), True, M, np.uint16)
  idx = db.idx_path
  for j, value in ((1, 10**9), (2, -64), (3, 1)):
    _patch(idx, _array_offset(db, "chunk_address", j), struct.pack("<q", value))
    raw = formats.ChunkDB(db.prefix, check_index=False)
    with pytest.raises(ValueError, match=r"db\.idx: chunk_address: chunk %d" % j):
      raw.get_chunks([j])
    _patch(idx, _array_offset(db, "chunk_address", j),
           struct.pack("<q", int(db.chunk_address[j])))
  _patch(idx, _array_offset(db, "sizes", 1), struct.pack("<i", 10**6))
  raw = formats.ChunkDB(db.prefix, check_index=False)
  with pytest.raises(ValueError, match=r"db\.idx: pointers/sizes: document 1"):
    raw.get_document(1)
  with pytest.raises(ValueError, match=r"db\.idx: chunk_id_start/sizes: document 1"):
    raw.doc_chunk_range(1)
  with pytest.raises(ValueError, match=r"db\.idx: sizes: document 1"):
    formats.ChunkDB(db.prefix)                                  # the default checks


def test_issue_examples_raise_naming_the_field(tmp_path):
  """The four silent reads the issue found, now errors naming file and field."""
  cases = [("chunk_address", 3, "<q", 0), ("chunk_address", 3, "<q", -64),
           ("chunk_address", 3, "<q", 10**9), ("sizes", 1, "<i", 10**6),
           ("chunk_id_start", 2, "<q", 0)]
  for i, (array, entry, fmt, value) in enumerate(cases):
    db = _write(str(tmp_path / f"db{i}"), True, M, np.uint16)
    _patch(db.idx_path, _array_offset(db, array, entry), struct.pack(fmt, value))
    with pytest.raises(ValueError, match=rf"db{i}\.idx: .*{array.split('_')[0]}"):
      formats.ChunkDB(db.prefix)


def test_missing_bin_names_the_missing_file(tmp_path):
  layout = RetrievalLayout(str(tmp_path / "root"))
  os.makedirs(layout.split_db_dir("train"))
  _write(layout.split_db_prefix("train"), False, M, np.uint16).close()
  os.remove(layout.split_db_prefix("train") + ".bin")
  with pytest.raises(FileNotFoundError, match=r"train_db/chunks\.bin: chunk DB tokens "
                     "not found"):
    sources.PretrainSource.from_layout(layout, "train", seq_len=2 * M,
                                     with_neighbors=False)
  os.remove(layout.split_db_prefix("train") + ".idx")
  with pytest.raises(FileNotFoundError, match=r"train_db/chunks\.idx"):
    sources.PretrainSource.from_layout(layout, "train", seq_len=2 * M,
                                     with_neighbors=False)


@pytest.mark.slow
def test_decode_step_past_the_cache_raises():
  import jax  # pylint: disable=g-import-not-at-top
  from retro_jax.models import Retro, RetroConfig, init_params  # pylint: disable=g-import-not-at-top
  config = RetroConfig(vocab_size=31, hidden_size=16, num_layers=2, num_heads=2,
                       mlp_dim=32, chunk_length=M, num_neighbors=1, cca_layers=(2,),
                       max_length=32)
  params = init_params(config, jax.random.PRNGKey(0))
  model = Retro(config)
  tokens = np.ones((2, M), np.int32)
  _, state = model.apply({"params": params}, tokens, lengths=np.array([M, 2]),
                         cache_length=2 * M, method=Retro.prefill, mutable=["cache"])
  variables = {"params": params, "cache": state["cache"]}
  step = lambda positions: model.apply(  # pylint: disable=unnecessary-lambda-assignment
      variables, tokens[:, :1], np.asarray(positions)[:, None], retrieval=False,
      method=Retro.decode_step, mutable=["cache"])
  logits, _ = step([M, 2])                                       # inside: fine
  assert np.isfinite(np.asarray(logits)).all()
  with pytest.raises(ValueError, match=r"position 8 is outside the decoding cache "
                     r"\[0, 8\)"):
    step([2 * M, 2])
  # Under jit the positions are traced: the row past the cache gets NaN logits.
  jitted = jax.jit(lambda positions: model.apply(
      variables, tokens[:, :1], positions[:, None], retrieval=False,
      method=Retro.decode_step, mutable=["cache"])[0])
  logits = np.asarray(jitted(np.array([2 * M, 2])))
  assert np.isnan(logits[0]).all() and np.isfinite(logits[1]).all()


# ----------------------------------------------------------------------------------
# Preprocess killed at every rename
# ----------------------------------------------------------------------------------

KILLED = 17
# Runs preprocess in forked children of one process (imports paid once); argv: the
# corpus directory, a work directory, "after" or "before", the exit code KILLED. A
# clean run counts the renames; then for every N, a child exits with KILLED at its Nth
# os.replace (just after the rename, or just before it), and a second child re-runs
# its directory to the end. Prints {"reference": the clean run's exit code,
# "renames": its renames, "cases": [...]} as JSON.
_LAUNCHER = r"""
import json, os, sys, traceback
import numpy as np
from retro_jax.retrieval import pipeline

corpus, work, mode, killed = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])


class HashedWords:
  dim, name, fingerprint = 16, "hashed-words", "hashed-words-16"

  def embed_texts(self, texts):
    out = np.zeros((len(texts), self.dim), np.float32)
    for i, text in enumerate(texts):
      for word in text.lower().split():
        out[i, sum(map(ord, word)) % self.dim] += 1.0
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-6)


def run(out, kill_at=0, before=False):
  count = out + ".renames"
  pid = os.fork()
  if pid == 0:
    try:
      null = os.open(os.devnull, os.O_WRONLY)
      os.dup2(null, 1)
      os.dup2(null, 2)
      real, renames = os.replace, [0]

      def replace(src, dst, **kwargs):
        if before and renames[0] + 1 == kill_at:
          os._exit(killed)
        real(src, dst, **kwargs)
        renames[0] += 1
        if renames[0] == kill_at:
          os._exit(killed)

      os.replace = replace
      pipeline.preprocess(
          os.path.join(corpus, "docs.jsonl"), out, vocab_size=300,
          splits={"valid": os.path.join(corpus, "valid.jsonl")},
          embedder=HashedWords(), extra_neighbors=2, use_gpu=False, progress=False)
      with open(count, "w") as f:
        f.write(str(renames[0]))
      os._exit(0)
    except BaseException:
      with open(out + ".error", "w") as f:
        f.write(traceback.format_exc())
      os._exit(2)
  _, status = os.waitpid(pid, 0)
  renames = None
  if os.path.exists(count):
    with open(count) as f:
      renames = int(f.read())
    os.remove(count)
  return os.waitstatus_to_exitcode(status), renames


code, total = run(os.path.join(work, "reference"))
results = {"reference": code, "renames": total, "cases": []}
for n in range(1, (total or 0) + 1):
  out = os.path.join(work, f"{mode}_{n}")
  code, _ = run(out, n, before=mode == "before")
  resumed, _ = run(out)
  results["cases"].append({"kill_at": n, "killed": code, "resumed": resumed,
                           "out": out})
print(json.dumps(results))
"""


def _without_timings(value):
  if isinstance(value, dict):
    return {k: _without_timings(v) for k, v in value.items()
            if k != "seconds" and not k.endswith("_per_second")}
  if isinstance(value, list):
    return [_without_timings(v) for v in value]
  return value


def _tree(root: str) -> dict[str, object]:
  """Every file under root (hidden ones too) -> its bytes (a manifest: its JSON
  without timings)."""
  out = {}
  for directory, _, names in os.walk(root):
    for name in names:
      path = os.path.join(directory, name)
      with open(path, "rb") as f:
        data = f.read()
      out[os.path.relpath(path, root)] = (
          _without_timings(json.loads(data)) if name == "manifest.json" else data)
  return out


def _kill_at_renames(tmp_path, mode: str) -> tuple[int, int, list[str]]:
  """Kills preprocess ``mode`` ("after" / "before") each rename of a clean run and
  re-runs it; returns (renames of a clean run, cases, failures)."""
  corpus = tmp_path / "corpus"
  corpus.mkdir()
  for name, seed, count in (("docs", 1, 12), ("valid", 2, 3)):
    with open(corpus / f"{name}.jsonl", "w", encoding="utf-8") as f:
      for text in retrieval_fixture.documents(seed, count):
        f.write(json.dumps({"text": text}) + "\n")
  work = tmp_path / "runs"
  work.mkdir()
  env = dict(os.environ, JAX_PLATFORMS="cpu", OMP_NUM_THREADS="1")
  began = time.time()
  result = subprocess.run([sys.executable, "-c", _LAUNCHER, str(corpus), str(work),
                           mode, str(KILLED)], capture_output=True, text=True,
                          timeout=600, env=env)
  seconds = time.time() - began
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  reference = str(work / "reference")
  assert report["reference"] == 0, open(reference + ".error").read()
  want = _tree(reference)
  assert not [n for n in want if n.endswith(".tmp")], sorted(want)
  failures = []
  for case in report["cases"]:
    name = f"kill {mode} rename {case['kill_at']}"
    if case["killed"] != KILLED or case["resumed"] != 0:
      error = case["out"] + ".error"
      failures.append(f"{name}: exit codes {case['killed']}, {case['resumed']}: "
                      f"{open(error).read()[-800:] if os.path.exists(error) else ''}")
      continue
    got = _tree(case["out"])
    debris = sorted(set(got) - set(want))
    missing = sorted(set(want) - set(got))
    differ = sorted(n for n in set(want) & set(got) if got[n] != want[n])
    if debris or missing or differ:
      failures.append(f"{name}: left {debris}, missing {missing}, differ {differ}")
  print(f"\npreprocess killed at renames: {report['renames']} renames in a clean run, "
        f"{len(report['cases'])} cases, {len(failures)} failed, {seconds:.1f}s")
  return report["renames"], len(report["cases"]), failures


@pytest.mark.slow   # multi-second (see pytest.ini)
@pytest.mark.parametrize("mode", ["after", "before"])
def test_preprocess_killed_at_every_rename_resumes_identically(tmp_path, mode):
  renames, cases, failures = _kill_at_renames(tmp_path, mode)
  # A clean run renames 38 outputs into place: vocab (3), three chunk DBs (shard and
  # merge, 6 each), embeddings (2), index (6), two neighbor maps (4 each),
  # retrieval.json (1).
  assert renames >= 38 and cases == renames
  assert not failures, "\n".join(failures)
