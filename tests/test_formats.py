"""The NeMo on-disk formats: retmmap chunk DB and KNN neighbor map.

Files are also built byte by byte with ``struct`` from the layout in the NeMo docs
seed and NeMo's indexed_retrieval_dataset.py, independently of our writer, and read
back with our reader (and compared with our writer's bytes).
"""

import os
import pickle
import struct

import numpy as np
import pytest

from retro_jax.retrieval import formats

PAD = 0


# ------------------------------------------------------------------------------------
# Independent, element-by-element builders of the two layouts.
# ------------------------------------------------------------------------------------


def handmade_retmmap(prefix, docs, *, m, retrieval, code=8, stride=None,
                     legacy_version=False, pad=PAD):
  """Writes a retmmap pair with struct only; returns the padded docs (lists)."""
  fmt = {8: "<H", 4: "<i"}[code]
  stride = m if stride is None else stride
  padded, sizes, pointers, chunk_start, addresses = [], [], [], [], []
  address, chunk_id = 0, 0
  item = struct.calcsize(fmt)
  with open(prefix + ".bin", "wb") as f:
    for doc in docs:
      size = len(doc) + (-len(doc)) % m
      body = list(doc) + [pad] * (size - len(doc))
      stored = body + ([pad] * m if retrieval else [])
      for t in stored:
        f.write(struct.pack(fmt, t))
      padded.append(body)
      sizes.append(size)
      pointers.append(address)
      chunk_start.append(chunk_id)
      for start in range(0, size - m + 1, stride):
        addresses.append(address + start * item)
        chunk_id += 1
      address += len(stored) * item
  with open(prefix + ".idx", "wb") as f:
    f.write(b"MMIDRET\x00\x00")
    if legacy_version:
      f.write(struct.pack("<Q", 1))          # old NeMo: 8-byte version, no stride
    else:
      f.write(struct.pack("<L", 1))
      f.write(struct.pack("<L", stride))
    f.write(struct.pack("<B", code))
    f.write(struct.pack("<Q", len(docs)))
    f.write(struct.pack("<Q", m))
    f.write(struct.pack("<Q", len(addresses)))
    f.write(struct.pack("<B", int(retrieval)))
    for s in sizes:
      f.write(struct.pack("<i", s))
    for p in pointers:
      f.write(struct.pack("<q", p))
    for c in chunk_start:
      f.write(struct.pack("<q", c))
    for a in addresses:
      f.write(struct.pack("<q", a))
  return padded


def handmade_knn(path, rows, *, start=0, version=1):
  with open(path, "wb") as f:
    f.write(b"KNNRETM\x00\x00")
    f.write(struct.pack("<QQQQ", version, len(rows[0]), len(rows), start))
    for row in rows:
      for v in row:
        f.write(struct.pack("<q", v))


def random_docs(rng, n, vocab=300, max_len=200):
  return [list(rng.integers(1, vocab, rng.integers(1, max_len))) for _ in range(n)]


# ------------------------------------------------------------------------------------
# Chunk DB
# ------------------------------------------------------------------------------------


@pytest.mark.parametrize("retrieval", [False, True])
@pytest.mark.parametrize("dtype,code", [(np.uint16, 8), (np.int32, 4)])
def test_writer_bytes_equal_handmade_layout(tmp_path, retrieval, dtype, code):
  rng = np.random.default_rng(0)
  docs = random_docs(rng, 7, max_len=40) + [[5] * 16]         # an exact multiple of m
  handmade_retmmap(str(tmp_path / "hand"), docs, m=16, retrieval=retrieval, code=code)
  formats.write_chunk_db(tmp_path / "ours", docs, dtype=dtype, pad_id=PAD,
                         chunk_size=16, retrieval_db=retrieval)
  for suffix in (".idx", ".bin"):
    assert (tmp_path / ("ours" + suffix)).read_bytes() == (
        tmp_path / ("hand" + suffix)).read_bytes(), suffix


@pytest.mark.parametrize("legacy", [False, True])
def test_reader_reads_handmade_retrieval_db(tmp_path, legacy):
  docs = [[1, 2, 3], list(range(10, 30)), [7] * 8]
  prefix = str(tmp_path / "db")
  padded = handmade_retmmap(prefix, docs, m=8, retrieval=True, legacy_version=legacy)
  db = formats.ChunkDB(prefix)
  assert (db.num_docs, db.num_chunks, db.chunk_size, db.stride) == (3, 1 + 3 + 1, 8, 8)
  assert db.is_retrieval_db and db.dtype == np.uint16
  assert db.header.stored_stride == (0 if legacy else 8)
  np.testing.assert_array_equal(db.sizes, [8, 24, 8])
  np.testing.assert_array_equal(db.chunk_id_start, [0, 1, 4])
  np.testing.assert_array_equal(db.get_chunk(0), [1, 2, 3, 0, 0, 0, 0, 0])
  np.testing.assert_array_equal(db.get_chunk(2), range(18, 26))
  np.testing.assert_array_equal(db.get_chunk_with_continuation(2),
                                list(range(18, 30)) + [0, 0, 0, 0])
  np.testing.assert_array_equal(db.get_chunk_with_continuation(3),
                                [26, 27, 28, 29, 0, 0, 0, 0] + [0] * 8)
  for d, body in enumerate(padded):
    np.testing.assert_array_equal(db.get_document(d), body)
  np.testing.assert_array_equal(db.doc_of_chunk([[0, 1], [3, 4]]), [[0, 1], [1, 2]])
  assert db.doc_chunk_range(1) == (1, 4)
  db.verify()


def test_overlapping_stride(tmp_path):
  docs = [list(range(1, 17)), [40, 41, 42]]
  handmade_retmmap(str(tmp_path / "hand"), docs, m=8, stride=4, retrieval=True)
  db = formats.ChunkDB(tmp_path / "hand")
  assert db.stride == 4 and db.num_chunks == 3 + 1
  np.testing.assert_array_equal(db.get_chunks([0, 1, 2], with_continuation=False),
                                [range(1, 9), range(5, 13), range(9, 17)])
  np.testing.assert_array_equal(db.get_chunk_with_continuation(1),
                                list(range(5, 17)) + [0] * 4)
  np.testing.assert_array_equal(db.doc_of_chunk([0, 2, 3]), [0, 0, 1])
  db.verify()
  formats.write_chunk_db(tmp_path / "ours", docs, dtype=np.uint16, pad_id=0,
                         chunk_size=8, stride=4, retrieval_db=True)
  assert (tmp_path / "ours.idx").read_bytes() == (tmp_path / "hand.idx").read_bytes()


@pytest.mark.parametrize("retrieval", [False, True])
def test_round_trip_and_vectorised_access(tmp_path, retrieval):
  rng = np.random.default_rng(1)
  docs = random_docs(rng, 30, vocab=70000, max_len=300)
  m = 64
  db = formats.write_chunk_db(tmp_path / "db", docs, dtype=formats.token_dtype(70000),
                              pad_id=PAD, chunk_size=m, retrieval_db=retrieval)
  assert db.dtype == np.int32
  db.verify()
  chunks, owner = [], []
  for d, doc in enumerate(docs):
    size = -(-len(doc) // m) * m
    body = np.array(doc + [PAD] * (size - len(doc)))
    np.testing.assert_array_equal(db.get_document(d), body)
    start, end = db.doc_chunk_range(d)
    assert end - start == size // m
    chunks.extend(body.reshape(-1, m))
    owner.extend([d] * (end - start))
  assert db.num_chunks == len(chunks) and db.num_docs == len(docs)
  ids = rng.integers(0, db.num_chunks, (4, 3, 2))
  got = db.get_chunks(ids, with_continuation=False)
  assert got.shape == (4, 3, 2, m) and got.dtype == np.int32
  np.testing.assert_array_equal(got, np.array(chunks)[ids])
  np.testing.assert_array_equal(db.doc_of_chunk(ids), np.array(owner)[ids])
  default = db.get_chunks(ids)
  assert default.shape[-1] == (2 * m if retrieval else m)


def test_continuation_never_crosses_into_next_document(tmp_path):
  rng = np.random.default_rng(2)
  docs = random_docs(rng, 20, max_len=150)
  db = formats.write_chunk_db(tmp_path / "db", docs, dtype=np.uint16, pad_id=PAD,
                              chunk_size=16, retrieval_db=True)
  all_ids = np.arange(db.num_chunks)
  pairs = db.get_chunk_with_continuation(0)
  assert pairs.shape == (32,)
  pairs = db.get_chunks(all_ids)                               # [chunks, 2m]
  for d in range(db.num_docs):
    start, end = db.doc_chunk_range(d)
    body = db.get_document(d)
    for i in range(start, end):
      expect = np.concatenate([body, np.full(16, PAD)])[(i - start) * 16:][:32]
      np.testing.assert_array_equal(pairs[i], expect)
    assert np.all(pairs[end - 1, 16:] == PAD)                  # last chunk: pad only


def test_training_db_has_no_continuation(tmp_path):
  db = formats.write_chunk_db(tmp_path / "db", [[1, 2]], dtype=np.uint16, pad_id=0,
                              chunk_size=4)
  with pytest.raises(ValueError, match="training DB"):
    db.get_chunk_with_continuation(0)
  assert db.get_chunks([0]).shape == (1, 4)


def test_missing_and_out_of_range_ids(tmp_path):
  db = formats.write_chunk_db(tmp_path / "db", [[1, 2, 3, 4, 5]], dtype=np.uint16,
                              pad_id=0, chunk_size=4, retrieval_db=True)
  with pytest.raises(ValueError, match="-1 .*missing"):
    db.get_chunks(np.array([[0, -1]]))
  with pytest.raises(ValueError, match="outside"):
    db.get_chunks([2])
  with pytest.raises(ValueError, match="outside"):
    db.get_chunks([-2], missing_value=0)
  with pytest.raises(TypeError):
    db.get_chunks([0.5])
  got = db.get_chunks(np.array([[1, -1]]), missing_value=7)
  np.testing.assert_array_equal(got[0, 0], [5, 0, 0, 0, 0, 0, 0, 0])
  np.testing.assert_array_equal(got[0, 1], [7] * 8)
  with pytest.raises(ValueError, match="-1"):
    db.doc_of_chunk([-1])


def _write_small(tmp_path):
  prefix = str(tmp_path / "db")
  formats.write_chunk_db(prefix, [[1, 2, 3], [4] * 9], dtype=np.uint16, pad_id=0,
                         chunk_size=4, retrieval_db=True)
  return prefix


def _patch(path, offset, data):
  with open(path, "r+b") as f:
    f.seek(offset)
    f.write(data)


@pytest.mark.parametrize("corruption,field", [
    (lambda p: _patch(p + ".idx", 0, b"MMIDXXX"), "magic"),
    (lambda p: _patch(p + ".idx", 9, struct.pack("<L", 2)), "version"),
    (lambda p: _patch(p + ".idx", 17, struct.pack("<B", 6)), "dtype code"),
    (lambda p: _patch(p + ".idx", 17, struct.pack("<B", 42)), "dtype code"),
    (lambda p: _patch(p + ".idx", 42, struct.pack("<B", 3)), "retrieval_db flag"),
    (lambda p: _patch(p + ".idx", 13, struct.pack("<L", 3)), "stride"),
    (lambda p: os.truncate(p + ".idx", os.path.getsize(p + ".idx") - 8), "file size"),
    (lambda p: os.truncate(p + ".idx", 20), "header"),
    (lambda p: os.truncate(p + ".bin", os.path.getsize(p + ".bin") - 2), "file size"),
    (lambda p: _patch(p + ".bin", os.path.getsize(p + ".bin"), b"\0\0"), "file size"),
    (lambda p: _patch(p + ".idx", 34, struct.pack("<Q", 99)), "file size"),
    (lambda p: _patch(p + ".idx", 26, struct.pack("<Q", 6)), "stride"),
])
def test_corrupt_chunk_db_is_an_error_naming_file_and_field(tmp_path, corruption,
                                                            field):
  prefix = _write_small(tmp_path)
  corruption(prefix)
  with pytest.raises(ValueError) as e:
    formats.ChunkDB(prefix)
  assert str(tmp_path) in str(e.value) and field in str(e.value), str(e.value)


def test_missing_bin_and_idx(tmp_path):
  prefix = _write_small(tmp_path)
  os.remove(prefix + ".bin")
  with pytest.raises(FileNotFoundError, match=r"db\.bin"):
    formats.ChunkDB(prefix)
  with pytest.raises(FileNotFoundError, match=r"nothing\.idx"):
    formats.ChunkDB(tmp_path / "nothing")


def test_verify_finds_inconsistent_arrays(tmp_path):
  prefix = str(tmp_path / "db")
  formats.write_chunk_db(prefix, [[1, 2, 3], [4] * 9, [5]], dtype=np.uint16,
                         pad_id=0, chunk_size=4, retrieval_db=True)
  header = formats.ChunkDBHeader.SIZE
  # The second document's pointer (sizes are 3 x int32, pointers follow).
  _patch(prefix + ".idx", header + 12 + 8, struct.pack("<q", 2))
  with pytest.raises(ValueError, match=r"db\.idx: pointers: document 1"):
    formats.ChunkDB(prefix)                   # open validates every index entry
  db = formats.ChunkDB(prefix, check_index=False)   # the scan skipped: verify() finds it
  with pytest.raises(ValueError, match=r"db\.idx: pointers: document 1"):
    db.verify()


def test_writer_is_atomic_and_validates(tmp_path):
  with pytest.raises(KeyError):
    with formats.ChunkDBWriter(tmp_path / "db", dtype=np.uint16, pad_id=0) as w:
      w.add_document([1, 2, 3])
      raise KeyError("killed")
  assert os.listdir(tmp_path) == []
  w = formats.ChunkDBWriter(tmp_path / "db", dtype=np.uint16, pad_id=0)
  with pytest.raises(ValueError, match="empty"):
    w.add_document([])
  with pytest.raises(ValueError, match="fit uint16"):
    w.add_document([70000])
  with pytest.raises(TypeError):
    w.add_document([1.5])
  w.add_document([1])
  assert not formats.chunk_db_exists(tmp_path / "db")   # nothing until finalize
  w.finalize()
  assert sorted(os.listdir(tmp_path)) == ["db.bin", "db.idx"]
  with pytest.raises(ValueError, match="stride"):
    formats.ChunkDBWriter(tmp_path / "x", dtype=np.uint16, pad_id=0, stride=5)
  with pytest.raises(ValueError, match="integer"):
    formats.ChunkDBWriter(tmp_path / "x", dtype=np.float32, pad_id=0)


def test_empty_db(tmp_path):
  db = formats.write_chunk_db(tmp_path / "db", [], dtype=np.uint16, pad_id=0)
  assert (db.num_docs, db.num_chunks) == (0, 0)
  db.verify()
  assert db.get_chunks(np.zeros((2, 0), np.int64)).shape == (2, 0, 64)


def test_concatenate_equals_one_writer(tmp_path):
  rng = np.random.default_rng(3)
  parts = [random_docs(rng, n, max_len=90) for n in (5, 1, 8)]
  prefixes = []
  for i, docs in enumerate(parts):
    prefixes.append(str(tmp_path / f"part{i}"))
    formats.write_chunk_db(prefixes[-1], docs, dtype=np.uint16, pad_id=0,
                           chunk_size=16, retrieval_db=True)
  merged = formats.concatenate_chunk_dbs(prefixes, tmp_path / "merged")
  formats.write_chunk_db(tmp_path / "whole", sum(parts, []), dtype=np.uint16,
                         pad_id=0, chunk_size=16, retrieval_db=True)
  for suffix in (".idx", ".bin"):
    assert (tmp_path / ("merged" + suffix)).read_bytes() == (
        tmp_path / ("whole" + suffix)).read_bytes()
  merged.verify()
  formats.write_chunk_db(tmp_path / "train", [[1]], dtype=np.uint16, pad_id=0,
                         chunk_size=16)
  with pytest.raises(ValueError, match="train.idx"):
    formats.concatenate_chunk_dbs([prefixes[0], str(tmp_path / "train")],
                                  tmp_path / "bad")


def test_chunk_db_pickles_by_path(tmp_path):
  prefix = _write_small(tmp_path)
  db = formats.ChunkDB(prefix + ".idx")
  clone = pickle.loads(pickle.dumps(db))
  np.testing.assert_array_equal(clone.get_chunks([0, 1, 2]), db.get_chunks([0, 1, 2]))


# ------------------------------------------------------------------------------------
# Neighbor map
# ------------------------------------------------------------------------------------


def test_neighbor_map_round_trip_streamed(tmp_path):
  rng = np.random.default_rng(4)
  rows = rng.integers(-1, 50, (23, 3))
  path = tmp_path / "knn.bin"
  with formats.NeighborMapWriter(path, 3, chunk_start_id=100) as w:
    for lo in range(0, 23, 5):
      w.write(rows[lo:lo + 5].astype(np.int32))
  nm = formats.NeighborMap(path)
  assert (nm.k, nm.num_chunks, nm.chunk_start_id, len(nm)) == (3, 23, 100, 23)
  np.testing.assert_array_equal(nm.neighbors, rows)
  np.testing.assert_array_equal(nm[100], rows[0])
  np.testing.assert_array_equal(nm[np.array([[122, 101]])], rows[[[22, 1]]])
  np.testing.assert_array_equal(nm[110:113], rows[10:13])
  with pytest.raises(IndexError, match="outside"):
    nm[99]
  # Header bytes as in the seed/NeMo layout.
  raw = path.read_bytes()
  assert raw[:9] == b"KNNRETM\x00\x00"
  assert struct.unpack("<QQQQ", raw[9:41]) == (1, 3, 23, 100)
  assert len(raw) == 41 + 23 * 3 * 8


def test_neighbor_map_reads_handmade_file(tmp_path):
  handmade_knn(str(tmp_path / "k"), [[5, -1], [0, 2], [3, 3]], start=0)
  nm = formats.NeighborMap(tmp_path / "k")
  np.testing.assert_array_equal(nm[0:3], [[5, -1], [0, 2], [3, 3]])
  db = formats.write_chunk_db(tmp_path / "db", [[1] * 24], dtype=np.uint16, pad_id=0,
                              chunk_size=4, retrieval_db=True)       # 6 chunks
  nm.validate_against(db)
  small = formats.write_chunk_db(tmp_path / "small", [[1] * 20], dtype=np.uint16,
                                 pad_id=0, chunk_size=4, retrieval_db=True)
  with pytest.raises(ValueError, match=r"k: neighbors: query chunk 0 neighbor 0 is 5"):
    nm.validate_against(small)
  with pytest.raises(ValueError, match="num_chunks"):
    nm.validate_against(db, query_db=formats.write_chunk_db(
        tmp_path / "q", [[1, 2]], dtype=np.uint16, pad_id=0, chunk_size=4))


@pytest.mark.parametrize("corruption,field", [
    (lambda p: _patch(p, 0, b"KNNXXXX"), "magic"),
    (lambda p: _patch(p, 9, struct.pack("<Q", 7)), "version"),
    (lambda p: os.truncate(p, os.path.getsize(p) - 8), "file size"),
    (lambda p: os.truncate(p, 30), "header"),
    (lambda p: _patch(p, 17, struct.pack("<Q", 0)), "k"),
])
def test_corrupt_neighbor_map_is_an_error(tmp_path, corruption, field):
  path = str(tmp_path / "knn")
  handmade_knn(path, [[1, 2], [3, 4]])
  corruption(path)
  with pytest.raises(ValueError) as e:
    formats.NeighborMap(path)
  assert path in str(e.value) and field in str(e.value), str(e.value)


def test_neighbor_writer_atomic_and_validates(tmp_path):
  with pytest.raises(RuntimeError):
    with formats.NeighborMapWriter(tmp_path / "k", 2) as w:
      w.write(np.zeros((3, 2), np.int64))
      raise RuntimeError
  assert os.listdir(tmp_path) == []
  with formats.NeighborMapWriter(tmp_path / "k", 2) as w:
    with pytest.raises(ValueError, match=r"\[rows, 2\]"):
      w.write(np.zeros((3, 3), np.int64))
    with pytest.raises(ValueError, match=">= -1"):
      w.write(np.full((1, 2), -2))


def test_merge_neighbor_maps(tmp_path):
  rng = np.random.default_rng(5)
  rows = rng.integers(-1, 1000, (30, 4))
  bounds = [0, 7, 8, 30]
  paths = []
  for i, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
    paths.append(tmp_path / f"shard{i}")
    formats.write_neighbor_map(paths[-1], rows[lo:hi], chunk_start_id=lo)
  merged = formats.merge_neighbor_maps(paths[::-1], tmp_path / "merged", block_rows=4)
  assert merged.chunk_start_id == 0 and merged.num_chunks == 30
  np.testing.assert_array_equal(merged.neighbors, rows)
  with pytest.raises(ValueError, match="gap or overlap"):
    formats.merge_neighbor_maps([paths[0], paths[2]], tmp_path / "bad")
  formats.write_neighbor_map(tmp_path / "k3", rows[7:8, :3], chunk_start_id=7)
  with pytest.raises(ValueError, match="k: 3"):
    formats.merge_neighbor_maps([paths[0], tmp_path / "k3"], tmp_path / "bad")
  assert not os.path.exists(tmp_path / "bad")
