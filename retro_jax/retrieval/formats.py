r"""The on-disk formats: the retmmap chunk DB and the KNN neighbor map (shared with
NeMo), and the embeddings directory.

This module is the one reader of each format and the one writer of the first two
(the embedding stage, ``retro_jax.retrieval.embeddings``, writes the third). Files written here
are readable by NeMo's ``MMapRetrievalIndexedDataset`` / ``KNNIndex``
(nemo/collections/nlp/data/language_modeling/megatron/indexed_retrieval_dataset.py)
and files NeMo wrote are readable here. Every reader validates on open (magic,
version, dtype, flags, and both file sizes against the header counts) and raises a
``ValueError`` that names the file and the field, never returning garbage. A chunk
DB's open also checks its four index arrays against each other and against the
``.bin`` length (``ChunkDB._check_index``: vectorised numpy over the memory-mapped
arrays in blocks, about 0.1 s per 10M chunks; ``check_index=False`` skips it), and
every gather is bounds-checked, so a corrupt interior entry is an error naming the
file and field rather than wrong tokens. A KNN map's open checks its shape against
the file size; its ids are checked against a DB by ``validate_against`` and, row by
row, on every read (ids below -1).

Chunk DB ("retmmap"), a pair ``<prefix>.idx`` + ``<prefix>.bin``. ``.idx``, all
little-endian, no alignment padding (header: 43 bytes)::

    magic           9 bytes   b'MMIDRET\x00\x00'
    version         <L        1
    stride          <L        token step between chunk starts; 0 (files written
                              before NeMo stored a stride) means chunk_size
    dtype code      <B        token dtype, NeMo's table (DTYPE_CODES): 8 = uint16,
                              4 = int32, ...
    num_docs        <Q
    chunk_size      <Q        m
    num_chunks      <Q
    retrieval_db    <B        0 or 1
    sizes           int32[num_docs]   tokens of each document, padded to a multiple
                                      of m, NOT counting a retrieval DB's extra chunk
    pointers        int64[num_docs]   byte offset of each document in .bin
    chunk_id_start  int64[num_docs]   id of each document's first chunk
    chunk_address   int64[num_chunks] byte offset of each chunk in .bin

``.bin`` holds the tokens of document 0, 1, ... back to back (uint16 if the
vocabulary has fewer than 65500 entries, else int32). Each document is padded with
``pad_id`` to a multiple of m. A *retrieval* DB stores one more chunk of m pad tokens
after every document, so chunk i followed by the next m tokens ("continuation",
``[2m]`` tokens) never runs into the next document. A document of ``size`` tokens
holds ``(size - m) // stride + 1`` chunks starting at token offsets ``0, stride,
2*stride, ...``; with the default ``stride == m`` the chunks tile the document.

Neighbor map ("KNN map"), one file (header: 41 bytes)::

    magic           9 bytes   b'KNNRETM\x00\x00'
    version         <Q        1
    k               <Q        neighbors per chunk
    num_chunks      <Q        rows in this file
    chunk_start_id  <Q        global id of the first row's query chunk (a shard's
                              offset; 0 for a complete map)
    neighbors       int64[num_chunks, k]   retrieval-DB chunk ids; -1 = missing

Writers stream (a document or a block of rows at a time; memory does not grow with
the file) into temporary names beside the outputs and rename them into place at
``finalize`` (``retro_jax.utils.io.atomic_path``); a chunk DB's ``.idx`` is renamed
last, so its presence marks a complete pair.

Where we differ from NeMo (readers accept everything NeMo writes):

* NeMo's builder pads a document whose length is already a multiple of m with one
  more full chunk of pad tokens (``padded_size = m - len % m``); we pad to the next
  multiple only (an exact multiple gets no pad chunk).
* NeMo's reader takes a stored stride of 0 to mean 64; those legacy files tile their
  chunks (the stride was not stored because chunks did not overlap), so we take 0 to
  mean ``chunk_size`` (identical for the default m = 64).
* Our writer rejects empty documents (NeMo writes one pad chunk for them).

Embeddings directory (``Embeddings``): ``shard_XXXXX_of_YYYYY.npy`` files, each
``[chunks of the shard, dim]`` float16/float32 for a contiguous chunk-id range
(``utils.stages.shard_chunk_range``), and the stage's ``manifest.json``
(``utils.io.Manifest``) recording the settings, the shards and their ranges.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import hashlib
import os
import shutil
import struct
import tempfile
from typing import BinaryIO, Iterable, Iterator, Optional, Sequence

import numpy as np

from retro_jax.utils import stages
from retro_jax.utils.io import Manifest, atomic_path

RETMMAP_MAGIC = b"MMIDRET\x00\x00"
NEIGHBOR_MAP_MAGIC = b"KNNRETM\x00\x00"
FORMAT_VERSION = 1
# The largest vocabulary stored as uint16 (NeMo's __best_fitting_dtype rule).
UINT16_VOCAB_LIMIT = 65500

# NeMo's dtype code table (codes 6 and 7 are both float64 there).
DTYPE_CODES: dict[int, np.dtype] = {
    1: np.dtype(np.uint8), 2: np.dtype(np.int8), 3: np.dtype(np.int16),
    4: np.dtype(np.int32), 5: np.dtype(np.int64), 6: np.dtype(np.float64),
    7: np.dtype(np.float64), 8: np.dtype(np.uint16),
}
_INTEGER_CODES = {np.dtype(np.uint8): 1, np.dtype(np.int8): 2, np.dtype(np.int16): 3,
                  np.dtype(np.int32): 4, np.dtype(np.int64): 5, np.dtype(np.uint16): 8}

_RETMMAP_HEADER = struct.Struct("<9sLLBQQQB")   # 43 bytes
_KNN_HEADER = struct.Struct("<9sQQQQ")          # 41 bytes
_KNN_COUNT_OFFSET = 9 + 8 + 8                   # byte offset of num_chunks
_COPY_BUFFER = 16 << 20
_BLOCK = 1 << 20                                # rows per block in streaming loops


def _error(path: str, field: str, message: str) -> ValueError:
  return ValueError(f"{path}: {field}: {message}")


def token_dtype(vocab_size: int) -> np.dtype:
  """uint16 for vocabularies smaller than 65500 entries, else int32 (as NeMo)."""
  return np.dtype(np.uint16) if vocab_size < UINT16_VOCAB_LIMIT else np.dtype(np.int32)


def chunk_db_paths(prefix: str | os.PathLike) -> tuple[str, str]:
  """``(<prefix>.idx, <prefix>.bin)``; a prefix given with either suffix is accepted."""
  prefix = os.fspath(prefix)
  if prefix.endswith((".idx", ".bin")):
    prefix = prefix[:-4]
  return prefix + ".idx", prefix + ".bin"


def chunk_db_exists(prefix: str | os.PathLike) -> bool:
  """Whether a chunk DB was written at ``prefix``: its ``.idx`` exists.

  The writer renames the ``.idx`` into place last, so its presence marks a complete
  pair; a ``.bin`` missing beside it is damage, which opening (``ChunkDB``) reports
  naming the missing ``.bin`` (rather than a caller reporting "no DB" about an
  ``.idx`` that exists).
  """
  return os.path.exists(chunk_db_paths(prefix)[0])


_FINGERPRINT_BYTES = 1 << 20


def db_fingerprint(db: "ChunkDB") -> str:
  """A cheap identity of a chunk DB's content (manifests key their inputs by it): the
  file names and sizes, the first and last MiB of the index (header, sizes, pointers,
  chunk addresses) and of the tokens; O(1) in the DB size and independent of its path."""
  digest = hashlib.sha256()
  for path in (db.idx_path, db.bin_path):
    size = os.path.getsize(path)
    digest.update(f"{os.path.basename(path)}:{size}".encode())
    with open(path, "rb") as f:
      digest.update(f.read(_FINGERPRINT_BYTES))
      if size > _FINGERPRINT_BYTES:
        f.seek(max(_FINGERPRINT_BYTES, size - _FINGERPRINT_BYTES))
        digest.update(f.read())
  return digest.hexdigest()


def pad_document(tokens, chunk_size: int, pad_id: int, *, retrieval_db: bool,
                 dtype=np.int32) -> np.ndarray:
  """The stored layout of one document: its tokens padded with ``pad_id`` to the next
  multiple of m, plus (retrieval DB) one more chunk of pad tokens so the continuation
  of its last chunk stays inside the document. The one chunking rule of the project.
  """
  tokens = np.asarray(tokens)
  size = -(-tokens.size // chunk_size) * chunk_size
  stored = np.full(size + (chunk_size if retrieval_db else 0), pad_id, dtype)
  stored[:tokens.size] = tokens
  return stored


def chunks_per_doc(sizes: np.ndarray, chunk_size: int, stride: int) -> np.ndarray:
  """Number of chunks of documents of ``sizes`` tokens: ``[num_docs]`` int64."""
  sizes = np.asarray(sizes, np.int64)
  return np.where(sizes >= chunk_size, (sizes - chunk_size) // stride + 1, 0)


def chunk_addresses(pointers: np.ndarray, counts: np.ndarray, stride_bytes: int
                    ) -> np.ndarray:
  """Byte offsets of the chunks of a run of documents: ``[sum(counts)]`` int64.

  Args:
    pointers: ``[docs]`` byte offset of each document.
    counts: ``[docs]`` number of chunks of each document.
    stride_bytes: ``stride * itemsize``.
  """
  pointers = np.asarray(pointers, np.int64)
  counts = np.asarray(counts, np.int64)
  total = int(counts.sum())
  first = np.cumsum(counts) - counts                     # local index of a doc's 1st chunk
  position = np.arange(total, dtype=np.int64) - np.repeat(first, counts)
  return np.repeat(pointers, counts) + position * stride_bytes


# ----------------------------------------------------------------------------------
# Chunk DB: header, reader
# ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ChunkDBHeader:
  """The fixed-size head of a retmmap ``.idx`` file.

  ``stride`` is the effective stride (a stored 0 is reported as ``chunk_size``);
  ``stored_stride`` is the raw field.
  """
  version: int
  stored_stride: int
  stride: int
  dtype: np.dtype
  num_docs: int
  chunk_size: int
  num_chunks: int
  retrieval_db: bool

  SIZE = _RETMMAP_HEADER.size

  @property
  def idx_bytes(self) -> int:
    """The exact size of a well-formed ``.idx`` with this header."""
    return self.SIZE + self.num_docs * (4 + 8 + 8) + self.num_chunks * 8


def read_chunk_db_header(idx_path: str) -> ChunkDBHeader:
  """Reads and validates a retmmap ``.idx`` header and the file's size."""
  if not os.path.exists(idx_path):
    raise FileNotFoundError(f"{idx_path}: chunk DB index not found")
  file_bytes = os.path.getsize(idx_path)
  with open(idx_path, "rb") as f:
    raw = f.read(_RETMMAP_HEADER.size)
  if len(raw) < len(RETMMAP_MAGIC):
    raise _error(idx_path, "header", f"truncated: {len(raw)} of "
                 f"{_RETMMAP_HEADER.size} bytes")
  if raw[:len(RETMMAP_MAGIC)] != RETMMAP_MAGIC:
    raise _error(idx_path, "magic", f"expected {RETMMAP_MAGIC!r}, found "
                 f"{raw[:len(RETMMAP_MAGIC)]!r} (not a retmmap chunk DB index)")
  if len(raw) < _RETMMAP_HEADER.size:
    raise _error(idx_path, "header", f"truncated: {len(raw)} of "
                 f"{_RETMMAP_HEADER.size} bytes")
  (_, version, stored_stride, code, num_docs, chunk_size, num_chunks,
   flag) = _RETMMAP_HEADER.unpack(raw)
  if version != FORMAT_VERSION:
    raise _error(idx_path, "version", f"expected {FORMAT_VERSION}, found {version}")
  if code not in DTYPE_CODES:
    raise _error(idx_path, "dtype code", f"unknown code {code} (known: "
                 f"{sorted(DTYPE_CODES)})")
  dtype = DTYPE_CODES[code]
  if dtype not in _INTEGER_CODES:
    raise _error(idx_path, "dtype code", f"code {code} is {dtype}, not an integer "
                 "token type")
  if chunk_size <= 0:
    raise _error(idx_path, "chunk_size", f"must be positive, found {chunk_size}")
  stride = stored_stride or chunk_size
  if chunk_size % stride:
    raise _error(idx_path, "stride", f"{stride} does not divide chunk_size {chunk_size}")
  if flag not in (0, 1):
    raise _error(idx_path, "retrieval_db flag", f"expected 0 or 1, found {flag}")
  header = ChunkDBHeader(version=version, stored_stride=stored_stride, stride=stride,
                         dtype=dtype, num_docs=num_docs, chunk_size=chunk_size,
                         num_chunks=num_chunks, retrieval_db=bool(flag))
  if file_bytes != header.idx_bytes:
    raise _error(idx_path, "file size", f"{file_bytes} bytes, but the header's "
                 f"num_docs={num_docs} and num_chunks={num_chunks} need "
                 f"{header.idx_bytes} (truncated or corrupt index)")
  return header


def _check_ids(ids: np.ndarray, upper: int, what: str, allow_missing: bool) -> None:
  if ids.dtype.kind not in "iu":
    raise TypeError(f"{what} must be integers, got dtype {ids.dtype}")
  if ids.size == 0:
    return
  low, high = int(ids.min()), int(ids.max())
  if low == -1 and not allow_missing:
    raise ValueError(f"{what} contains -1 (a missing neighbor): mask missing ids "
                     "before fetching, or pass missing_value= to fill them")
  if low < -1 or high >= upper:
    bad = low if low < -1 else high
    raise ValueError(f"{what} contains {bad}, outside [0, {upper})")


def _where_true(mask: np.ndarray) -> Optional[int]:
  """The first index where ``mask`` holds, or None (fast when none does)."""
  return int(np.argmax(mask)) if mask.any() else None


def _remainder(values: np.ndarray, divisor: int) -> np.ndarray:
  if divisor & (divisor - 1) == 0:                  # a power of two: a mask is cheaper
    return values & (divisor - 1)
  return values % divisor


class ChunkDB:
  """A memory-mapped retmmap chunk DB (read-only).

  Attributes:
    prefix, idx_path, bin_path: The files.
    header: The validated ``ChunkDBHeader``.
    sizes: ``[num_docs]`` int32, padded tokens per document (without a retrieval
      DB's extra pad chunk).
    pointers: ``[num_docs]`` int64, byte offset of each document in ``.bin``.
    chunk_id_start: ``[num_docs]`` int64, first chunk id of each document.
    chunk_address: ``[num_chunks]`` int64, byte offset of each chunk in ``.bin``.
    tokens: ``[total tokens]`` the ``.bin`` file as a memmap of ``dtype``.

  Chunk ids run over the whole DB, documents in order. Token arrays are returned as
  int32. Opening validates the header, both file sizes and (``check_index=True``,
  the default) every entry of the four index arrays (``_check_index``: vectorised,
  streamed in blocks; ~0.1 s per 10M chunks from the page cache). Gathers are
  bounds-checked either way. ``verify()`` is an independent, slower full check.
  Instances pickle by path (they reopen the files).
  """

  def __init__(self, prefix: str | os.PathLike, *, check_index: bool = True):
    self.check_index = check_index
    self.idx_path, self.bin_path = chunk_db_paths(prefix)
    self.prefix = self.idx_path[:-4]
    self.header = header = read_chunk_db_header(self.idx_path)
    n, c = header.num_docs, header.num_chunks
    self._idx = np.memmap(self.idx_path, dtype=np.uint8, mode="r")
    offset = ChunkDBHeader.SIZE
    self.sizes = np.frombuffer(self._idx, np.int32, n, offset)
    offset += 4 * n
    self.pointers = np.frombuffer(self._idx, np.int64, n, offset)
    offset += 8 * n
    self.chunk_id_start = np.frombuffer(self._idx, np.int64, n, offset)
    offset += 8 * n
    self.chunk_address = np.frombuffer(self._idx, np.int64, c, offset)
    self._check_bin()
    if os.path.getsize(self.bin_path):
      self.tokens = np.memmap(self.bin_path, dtype=header.dtype, mode="r")
    else:
      self.tokens = np.zeros(0, header.dtype)
    self._check_ends()
    if check_index:
      self._check_index()

  # -- validation ------------------------------------------------------------------

  @property
  def _tail_tokens(self) -> int:
    """Pad tokens stored after each document beyond ``sizes`` (m for a retrieval DB)."""
    return self.chunk_size if self.is_retrieval_db else 0

  def _expected_bin_bytes(self) -> int:
    if self.num_docs == 0:
      return 0
    return int(self.pointers[-1]) + (int(self.sizes[-1]) + self._tail_tokens) * (
        self.dtype.itemsize)

  def _check_bin(self) -> None:
    if self.num_docs and (self.sizes[-1] < 0 or self.pointers[-1] < 0):
      raise _error(self.idx_path, "sizes/pointers", f"the last document has size "
                   f"{int(self.sizes[-1])} at byte {int(self.pointers[-1])} (negative)")
    if not os.path.exists(self.bin_path):
      raise FileNotFoundError(f"{self.bin_path}: chunk DB tokens not found (the "
                              f"index {self.idx_path} exists)")
    actual = os.path.getsize(self.bin_path)
    expected = self._expected_bin_bytes()
    if actual != expected:
      raise _error(self.bin_path, "file size", f"{actual} bytes, but {self.idx_path} "
                   f"describes {expected} (truncated or mismatched .bin)")

  def _check_ends(self) -> None:
    """O(1) consistency checks of the index arrays' first and last entries."""
    if self.num_docs == 0:
      if self.num_chunks:
        raise _error(self.idx_path, "num_chunks", f"{self.num_chunks} chunks in 0 docs")
      return
    if self.pointers[0] != 0 or self.chunk_id_start[0] != 0:
      raise _error(self.idx_path, "pointers/chunk_id_start",
                   "the first document does not start at 0")
    last = int(chunks_per_doc(self.sizes[-1:], self.chunk_size, self.stride)[0])
    if int(self.chunk_id_start[-1]) + last != self.num_chunks:
      raise _error(self.idx_path, "num_chunks", f"header says {self.num_chunks}, the "
                   f"last document ends at chunk {int(self.chunk_id_start[-1]) + last}")
    if self.num_chunks:
      end = int(self.chunk_address[-1]) + self.chunk_size * self.dtype.itemsize
      if self.chunk_address[0] != 0 or end > self._expected_bin_bytes():
        raise _error(self.idx_path, "chunk_address", "chunk addresses fall outside "
                     f"{self.bin_path}")

  def _check_index(self, block: int = 1 << 16) -> None:
    """Every entry of the four index arrays, vectorised over blocks of ``block``.

    Documents (in blocks): sizes are non-negative multiples of m; pointers are the
    running sum of the documents' byte spans (``(size + tail) * itemsize``, tail = m
    for a retrieval DB's pad chunk) and stay inside ``.bin``; chunk_id_start is the
    running sum of the chunk counts (``chunks_per_doc``; the pad chunk holds no
    chunk id) and stays within num_chunks; each document's first chunk address is
    its pointer. Chunks (in blocks): consecutive addresses inside a document differ
    by ``stride * itemsize``. Together with the ends (``_check_ends``) and the
    ``.bin`` size this pins every chunk address to its document. Memory: O(block).

    Raises:
      ValueError naming the index file, the field and the first bad document/chunk.
    """
    n, c, m = self.num_docs, self.num_chunks, self.chunk_size
    item = self.dtype.itemsize
    stride_bytes = self.stride * item
    tail = self._tail_tokens
    bin_bytes = os.path.getsize(self.bin_path)
    byte, chunk = 0, 0
    for lo in range(0, n, block):
      hi = min(lo + block, n)
      sizes = self.sizes[lo:hi].astype(np.int64)
      bad = _where_true((sizes < 0) | (_remainder(sizes, m) != 0))
      if bad is not None:
        raise _error(self.idx_path, "sizes", f"document {lo + bad} has "
                     f"{sizes[bad]} tokens, not a non-negative multiple of "
                     f"chunk_size {m}")
      spans = (sizes + tail) * item
      ends = byte + np.cumsum(spans)
      if ends[-1] > bin_bytes:
        d = int(np.argmax(ends > bin_bytes))
        raise _error(self.idx_path, "sizes", f"document {lo + d} ({sizes[d]} tokens) "
                     f"ends at byte {ends[d]}, past the end of {self.bin_path} "
                     f"({bin_bytes} bytes)")
      starts = ends - spans
      pointers = self.pointers[lo:hi].astype(np.int64)   # aligned copies: the arrays
      bad = _where_true(pointers != starts)            # sit at odd offsets
      if bad is not None:
        raise _error(self.idx_path, "pointers", f"document {lo + bad}: found "
                     f"{pointers[bad]}, expected {starts[bad]} (the running sum "
                     "of the document sizes)")
      counts = chunks_per_doc(sizes, m, self.stride)
      chunk_ends = chunk + np.cumsum(counts)
      if chunk_ends[-1] > c:
        d = int(np.argmax(chunk_ends > c))
        raise _error(self.idx_path, "sizes", f"document {lo + d} ends at chunk "
                     f"{chunk_ends[d]}, past num_chunks={c}")
      first = chunk_ends - counts
      got = self.chunk_id_start[lo:hi].astype(np.int64)
      bad = _where_true(got != first)
      if bad is not None:
        raise _error(self.idx_path, "chunk_id_start", f"document {lo + bad}: found "
                     f"{got[bad]}, expected {first[bad]} (the running sum of the "
                     "chunk counts)")
      nonempty = np.flatnonzero(counts)
      if chunk_ends[-1] - chunk <= 4 * block:     # gather from an aligned copy (fast)
        got = self.chunk_address[chunk:chunk_ends[-1]].astype(np.int64)[
            first[nonempty] - chunk]
      else:                                        # long documents: few gathers
        got = self.chunk_address[first[nonempty]]
      bad = _where_true(got != starts[nonempty])
      if bad is not None:
        d = nonempty[bad]
        raise _error(self.idx_path, "chunk_address", f"chunk {first[d]} (the first of "
                     f"document {lo + d}): found {got[bad]}, expected the document's "
                     f"pointer {starts[d]}")
      byte, chunk = int(ends[-1]), int(chunk_ends[-1])
    if byte != bin_bytes or chunk != c:
      raise _error(self.idx_path, "sizes", f"the documents hold {chunk} chunks and "
                   f"{byte} bytes; the header says num_chunks={c} and "
                   f"{self.bin_path} has {bin_bytes} bytes")
    for lo in range(0, c, block):
      hi = min(lo + block + 1, c)        # one chunk of overlap: differences across blocks
      address = self.chunk_address[lo:hi].astype(np.int64)
      ok = np.diff(address) == stride_bytes          # [j]: chunk lo + j + 1
      # Chunks that start a document (checked against its pointer above) may jump.
      # (bisect: O(log n) scalar reads; np.searchsorted would copy the unaligned array)
      d_lo = bisect.bisect_left(self.chunk_id_start, lo + 1)
      d_hi = bisect.bisect_right(self.chunk_id_start, hi - 1)
      doc_starts = self.chunk_id_start[d_lo:d_hi].astype(np.int64) - lo - 1
      ok[doc_starts] = True
      bad = _where_true(~ok)
      if bad is not None:
        j = lo + bad + 1
        raise _error(self.idx_path, "chunk_address", f"chunk {j}: found "
                     f"{int(self.chunk_address[j])}, expected "
                     f"{int(self.chunk_address[j - 1]) + stride_bytes} (the previous "
                     f"chunk's address + stride {self.stride} x {item} bytes)")

  def verify(self, block_docs: int = _BLOCK) -> None:
    """Full check: every size, pointer, chunk start and chunk address (O(N), streamed).

    Raises:
      ValueError naming the index file, the field and the first bad document.
    """
    m, item = self.chunk_size, self.dtype.itemsize
    byte, chunk = 0, 0
    for lo in range(0, self.num_docs, block_docs):
      hi = min(lo + block_docs, self.num_docs)
      sizes = np.asarray(self.sizes[lo:hi], np.int64)
      bad = np.flatnonzero((sizes < 0) | (sizes % m != 0))
      if bad.size:
        raise _error(self.idx_path, "sizes", f"document {lo + bad[0]} has "
                     f"{sizes[bad[0]]} tokens, not a multiple of chunk_size {m}")
      spans = (sizes + self._tail_tokens) * item
      pointers = byte + np.cumsum(spans) - spans
      counts = chunks_per_doc(sizes, m, self.stride)
      starts = chunk + np.cumsum(counts) - counts
      for name, got, want in (("pointers", self.pointers[lo:hi], pointers),
                              ("chunk_id_start", self.chunk_id_start[lo:hi], starts)):
        bad = np.flatnonzero(np.asarray(got) != want)
        if bad.size:
          raise _error(self.idx_path, name, f"document {lo + bad[0]}: found "
                       f"{got[bad[0]]}, expected {want[bad[0]]}")
      want = chunk_addresses(pointers, counts, self.stride * item)
      got = np.asarray(self.chunk_address[chunk:chunk + want.size])
      if got.size != want.size or np.any(got != want):
        raise _error(self.idx_path, "chunk_address", f"wrong addresses for the chunks "
                     f"of documents {lo}..{hi - 1}")
      byte += int(spans.sum())
      chunk += want.size
    if chunk != self.num_chunks or byte != os.path.getsize(self.bin_path):
      raise _error(self.idx_path, "num_chunks", f"documents hold {chunk} chunks and "
                   f"{byte} bytes; header/.bin say {self.num_chunks} and "
                   f"{os.path.getsize(self.bin_path)}")

  # -- properties ------------------------------------------------------------------

  @property
  def num_docs(self) -> int:
    return self.header.num_docs

  @property
  def num_chunks(self) -> int:
    return self.header.num_chunks

  @property
  def chunk_size(self) -> int:
    return self.header.chunk_size

  @property
  def stride(self) -> int:
    return self.header.stride

  @property
  def dtype(self) -> np.dtype:
    return self.header.dtype

  @property
  def is_retrieval_db(self) -> bool:
    return self.header.retrieval_db

  @property
  def num_tokens(self) -> int:
    """Padded document tokens (without a retrieval DB's extra pad chunks)."""
    return int(np.sum(self.sizes, dtype=np.int64))

  def __repr__(self) -> str:
    kind = "retrieval" if self.is_retrieval_db else "training"
    return (f"ChunkDB({self.prefix!r}, {kind}, docs={self.num_docs}, "
            f"chunks={self.num_chunks}, m={self.chunk_size}, dtype={self.dtype})")

  # -- chunks ----------------------------------------------------------------------

  def _chunk_length(self, with_continuation: Optional[bool]) -> int:
    if with_continuation is None:
      with_continuation = self.is_retrieval_db
    if with_continuation and not self.is_retrieval_db:
      raise ValueError(f"{self.idx_path}: a training DB (retrieval_db=0) has no "
                       "continuation pad chunks; build a retrieval DB for neighbors")
    return self.chunk_size * (2 if with_continuation else 1)

  def get_chunks(self, chunk_ids, *, with_continuation: Optional[bool] = None,
                 missing_value: Optional[int] = None) -> np.ndarray:
    """Tokens of many chunks: ``chunk_ids [...]`` -> ``[..., L]`` int32.

    Args:
      chunk_ids: Integer array of any shape; every id in ``[0, num_chunks)``.
      with_continuation: ``L = 2m`` (the chunk and its continuation; retrieval DB
        only) or ``L = m``. Default: 2m for a retrieval DB, m otherwise (as NeMo).
      missing_value: If None (default), an id of -1 raises ``ValueError``: callers
        mask missing neighbors. Otherwise -1 ids give rows filled with this value
        (e.g. the pad id).
    """
    length = self._chunk_length(with_continuation)
    ids = np.asarray(chunk_ids)
    _check_ids(ids, self.num_chunks, f"{self.idx_path}: chunk_ids",
               missing_value is not None)
    flat = ids.reshape(-1)
    out = np.empty((flat.size, length), np.int32)
    present = flat >= 0
    if np.any(present):
      address = self.chunk_address[flat[present]]
      starts = address // self.dtype.itemsize
      bad = np.flatnonzero((address < 0) | (address % self.dtype.itemsize != 0) |
                           (starts > self.tokens.size - length))
      if bad.size:
        raise _error(self.idx_path, "chunk_address", f"chunk {flat[present][bad[0]]} "
                     f"at byte {address[bad[0]]}: its {length} tokens fall outside "
                     f"{self.bin_path} ({self.tokens.size} tokens) or off the token grid")
      out[present] = self.tokens[starts[:, None] + np.arange(length)]
    if missing_value is not None:
      out[~present] = missing_value
    return out.reshape(ids.shape + (length,))

  def get_chunk(self, chunk_id: int) -> np.ndarray:
    """``[m]`` int32 tokens of one chunk."""
    return self.get_chunks(np.asarray(chunk_id), with_continuation=False)

  def get_chunk_with_continuation(self, chunk_id: int) -> np.ndarray:
    """``[2m]`` int32: the chunk and the next m tokens of its document (retrieval DB).

    The continuation of a document's last chunk is the document's pad chunk; it
    never crosses into the next document.
    """
    return self.get_chunks(np.asarray(chunk_id), with_continuation=True)

  def doc_of_chunk(self, chunk_ids) -> np.ndarray:
    """Document index of each chunk id: ``[...]`` -> ``[...]`` int64."""
    ids = np.asarray(chunk_ids)
    _check_ids(ids, self.num_chunks, f"{self.idx_path}: chunk_ids", allow_missing=False)
    return np.searchsorted(self.chunk_id_start, ids, side="right").astype(np.int64) - 1

  # -- documents -------------------------------------------------------------------

  def doc_chunk_range(self, doc_id: int) -> tuple[int, int]:
    """``[start, end)`` chunk ids of a document."""
    if not 0 <= doc_id < self.num_docs:
      raise IndexError(f"document {doc_id} outside [0, {self.num_docs})")
    start = int(self.chunk_id_start[doc_id])
    count = int(chunks_per_doc(self.sizes[doc_id:doc_id + 1], self.chunk_size,
                               self.stride)[0])
    if start < 0 or start + count > self.num_chunks:
      raise _error(self.idx_path, "chunk_id_start/sizes", f"document {doc_id} covers "
                   f"chunks [{start}, {start + count}), outside [0, {self.num_chunks})")
    return start, start + count

  def get_document(self, doc_id: int) -> np.ndarray:
    """``[sizes[doc_id]]`` int32 tokens of a document, including its padding to m."""
    if not 0 <= doc_id < self.num_docs:
      raise IndexError(f"document {doc_id} outside [0, {self.num_docs})")
    pointer, size = int(self.pointers[doc_id]), int(self.sizes[doc_id])
    start = pointer // self.dtype.itemsize
    end = start + size + self._tail_tokens
    if pointer < 0 or size < 0 or pointer % self.dtype.itemsize or end > self.tokens.size:
      raise _error(self.idx_path, "pointers/sizes", f"document {doc_id}: {size} tokens "
                   f"at byte {pointer} fall outside {self.bin_path} "
                   f"({self.tokens.size} tokens)")
    return np.asarray(self.tokens[start:start + size], np.int32)

  # -- lifetime --------------------------------------------------------------------

  def close(self) -> None:
    for name in ("sizes", "pointers", "chunk_id_start", "chunk_address", "tokens",
                 "_idx"):
      self.__dict__.pop(name, None)

  def __enter__(self) -> "ChunkDB":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def __reduce__(self):
    return (_open_chunk_db, (self.prefix, self.check_index))


def _open_chunk_db(prefix: str, check_index: bool) -> ChunkDB:
  return ChunkDB(prefix, check_index=check_index)


# ----------------------------------------------------------------------------------
# Chunk DB: writer
# ----------------------------------------------------------------------------------


class _Aborted(Exception):
  """Raised into the writer's atomic contexts to discard their temporary files."""


class _AtomicWriter:
  """The lifecycle of a streaming writer: its outputs are temporaries
  (``utils.io.atomic_path``) entered on one exit stack, renamed into place by
  ``finalize`` (after ``_complete`` has finished them) and removed by ``abort``, by
  leaving a ``with`` block through an exception, or when the writer is collected
  unfinished."""

  def _begin(self, name: str, open_outputs) -> None:
    """Calls ``open_outputs()`` (which enters the temporaries on ``self._stack``);
    ``name`` is the output named in messages."""
    self._name = name
    self._closed = False
    self._stack = contextlib.ExitStack()
    try:
      open_outputs()
    except BaseException:
      self._closed = True
      self._stack.close()
      raise

  def _check_open(self) -> None:
    if self._closed:
      raise ValueError(f"{self._name}: writer already finalized or aborted")

  def _complete(self) -> None:
    """Finishes the temporaries before they are renamed into place."""
    raise NotImplementedError

  def finalize(self) -> None:
    """Completes the output and renames it into place."""
    self._check_open()
    self._closed = True
    try:
      self._complete()
    except BaseException as e:
      self._stack.__exit__(type(e), e, e.__traceback__)
      raise
    self._stack.close()

  def abort(self) -> None:
    """Discards everything written so far (no output file is created or changed)."""
    if self._closed:
      return
    self._closed = True
    try:
      self._stack.__exit__(_Aborted, _Aborted(), None)
    except _Aborted:
      pass

  def __enter__(self):
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc_type is None:
      self.finalize()
    else:
      self.abort()

  def __del__(self):
    if not getattr(self, "_closed", True):
      self.abort()


class ChunkDBWriter(_AtomicWriter):
  """Streams documents into a retmmap pair ``<prefix>.idx`` / ``<prefix>.bin``.

  Usage::

      with ChunkDBWriter(prefix, dtype=token_dtype(vocab_size), pad_id=0,
                         retrieval_db=True) as writer:
        for tokens in documents:
          writer.add_document(tokens)

  Tokens go straight to a temporary ``.bin``; the four index arrays stream to
  temporary side files that ``finalize`` appends after the header. Memory use is
  one document (or one block of a DB being appended). Leaving the ``with`` block by
  an exception (or calling ``abort``) removes every temporary file.

  Args:
    prefix: Output path without suffix.
    dtype: Token dtype (``token_dtype(vocab_size)``: uint16 or int32).
    pad_id: Token used to pad documents to a multiple of ``chunk_size``.
    chunk_size: m.
    retrieval_db: Append one pad chunk per document (continuations stay inside).
    stride: Token step between chunk starts; default m (non-overlapping chunks).
  """

  def __init__(self, prefix: str | os.PathLike, *, dtype, pad_id: int,
               chunk_size: int = 64, retrieval_db: bool = False,
               stride: Optional[int] = None):
    self.idx_path, self.bin_path = chunk_db_paths(prefix)
    self.dtype = np.dtype(dtype)
    if self.dtype not in _INTEGER_CODES:
      raise ValueError(f"dtype {self.dtype} is not an integer token type "
                       f"({sorted(str(d) for d in _INTEGER_CODES)})")
    if chunk_size <= 0:
      raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    self.stride = chunk_size if stride is None else stride
    if self.stride <= 0 or chunk_size % self.stride:
      raise ValueError(f"stride {self.stride} must divide chunk_size {chunk_size}")
    self._limits = np.iinfo(self.dtype)
    if not self._limits.min <= pad_id <= self._limits.max:
      raise ValueError(f"pad_id {pad_id} does not fit {self.dtype}")
    self.pad_id = pad_id
    self.chunk_size = chunk_size
    self.retrieval_db = retrieval_db
    self.num_docs = 0
    self.num_chunks = 0
    self.num_bytes = 0
    self._begin(self.idx_path, self._open_outputs)

  def _open_outputs(self) -> None:
    # Entered idx first so that the stack renames .bin first and .idx last.
    self._tmp_idx = self._stack.enter_context(atomic_path(self.idx_path))
    self._tmp_bin = self._stack.enter_context(atomic_path(self.bin_path))
    self._bin = self._open(self._tmp_bin)
    self._parts = {name: self._open(self._side_file(name)) for name in
                   ("sizes", "pointers", "chunk_id_start", "chunk_address")}

  def _open(self, path: str) -> BinaryIO:
    f = open(path, "wb", buffering=1 << 20)  # pylint: disable=consider-using-with
    self._stack.callback(f.close)
    return f

  def _side_file(self, name: str) -> str:
    directory = os.path.dirname(os.path.abspath(self.idx_path))
    fd, path = tempfile.mkstemp(prefix=f".{os.path.basename(self.idx_path)}.{name}.",
                                suffix=".tmp", dir=directory)
    os.close(fd)
    self._stack.callback(_remove_quietly, path)
    return path

  def _append_index(self, sizes, pointers, chunk_id_start, chunk_address) -> None:
    self._parts["sizes"].write(np.asarray(sizes, "<i4").tobytes())
    self._parts["pointers"].write(np.asarray(pointers, "<i8").tobytes())
    self._parts["chunk_id_start"].write(np.asarray(chunk_id_start, "<i8").tobytes())
    self._parts["chunk_address"].write(np.asarray(chunk_address, "<i8").tobytes())

  def add_document(self, tokens) -> int:
    """Appends one document (``[n]`` token ids, n >= 1); returns its document index."""
    self._check_open()
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or tokens.size == 0:
      raise ValueError(f"a document must be a non-empty [n] token array, got shape "
                       f"{tokens.shape} (skip empty documents before writing)")
    if tokens.dtype.kind not in "iu":
      raise TypeError(f"token ids must be integers, got {tokens.dtype}")
    low, high = int(tokens.min()), int(tokens.max())
    if low < self._limits.min or high > self._limits.max:
      raise ValueError(f"token ids {low}..{high} do not fit {self.dtype} (use "
                       "int32 for vocabularies of 65500 or more)")
    m = self.chunk_size
    size = -(-tokens.size // m) * m
    if size > np.iinfo(np.int32).max:
      raise ValueError(f"document of {size} tokens exceeds the int32 sizes field")
    stored = pad_document(tokens, m, self.pad_id, retrieval_db=self.retrieval_db,
                          dtype=self.dtype)
    count = (size - m) // self.stride + 1
    self._append_index([size], [self.num_bytes], [self.num_chunks],
                       self.num_bytes + np.arange(count, dtype=np.int64) * (
                           self.stride * self.dtype.itemsize))
    self._bin.write(stored.tobytes())
    self.num_bytes += stored.nbytes
    self.num_chunks += count
    self.num_docs += 1
    return self.num_docs - 1

  def append_db(self, db: ChunkDB, block: int = _BLOCK) -> None:
    """Appends every document of another DB with the same layout (streamed)."""
    self._check_open()
    mine = (self.dtype, self.chunk_size, self.stride, self.retrieval_db)
    theirs = (db.dtype, db.chunk_size, db.stride, db.is_retrieval_db)
    if mine != theirs:
      raise ValueError(f"{db.idx_path}: (dtype, chunk_size, stride, retrieval_db) = "
                       f"{theirs}, but this writer has {mine}")
    for lo in range(0, max(db.num_docs, db.num_chunks), block):
      d_hi, c_hi = min(lo + block, db.num_docs), min(lo + block, db.num_chunks)
      if lo < db.num_docs:
        self._parts["sizes"].write(np.asarray(db.sizes[lo:d_hi], "<i4").tobytes())
        self._parts["pointers"].write(
            (db.pointers[lo:d_hi] + self.num_bytes).astype("<i8").tobytes())
        self._parts["chunk_id_start"].write(
            (db.chunk_id_start[lo:d_hi] + self.num_chunks).astype("<i8").tobytes())
      if lo < db.num_chunks:
        self._parts["chunk_address"].write(
            (db.chunk_address[lo:c_hi] + self.num_bytes).astype("<i8").tobytes())
    with open(db.bin_path, "rb") as src:
      shutil.copyfileobj(src, self._bin, _COPY_BUFFER)
    self.num_bytes += os.path.getsize(db.bin_path)
    self.num_chunks += db.num_chunks
    self.num_docs += db.num_docs

  def _complete(self) -> None:
    """Writes the index; ``finalize`` then renames ``.bin`` and ``.idx`` (last) into
    place."""
    for f in (self._bin, *self._parts.values()):
      f.close()
    header = _RETMMAP_HEADER.pack(
        RETMMAP_MAGIC, FORMAT_VERSION, self.stride, _INTEGER_CODES[self.dtype],
        self.num_docs, self.chunk_size, self.num_chunks, int(self.retrieval_db))
    with open(self._tmp_idx, "wb") as out:
      out.write(header)
      for f in self._parts.values():
        with open(f.name, "rb") as src:
          shutil.copyfileobj(src, out, _COPY_BUFFER)
    # A kill between the two renames must not pair an old .idx with the new .bin.
    _remove_quietly(self.idx_path)


def _remove_quietly(path: str) -> None:
  with contextlib.suppress(FileNotFoundError):
    os.remove(path)


def write_chunk_db(prefix: str | os.PathLike, documents: Iterable[Sequence[int]], *,
                   dtype, pad_id: int, chunk_size: int = 64,
                   retrieval_db: bool = False, stride: Optional[int] = None) -> ChunkDB:
  """Writes token documents (each ``[n]``) to a retmmap pair and opens it."""
  with ChunkDBWriter(prefix, dtype=dtype, pad_id=pad_id, chunk_size=chunk_size,
                     retrieval_db=retrieval_db, stride=stride) as writer:
    for doc in documents:
      writer.add_document(doc)
  return ChunkDB(prefix)


def concatenate_chunk_dbs(prefixes: Sequence[str | os.PathLike],
                          output_prefix: str | os.PathLike) -> ChunkDB:
  """Concatenates chunk DBs of one layout, in order, into one (streamed).

  Chunk ids and document indices of input j are shifted by the totals of inputs
  0..j-1. The result is byte-identical to writing all their documents with one
  ``ChunkDBWriter``.
  """
  if not prefixes:
    raise ValueError("no chunk DBs to concatenate")
  dbs = [ChunkDB(p) for p in prefixes]
  first = dbs[0]
  with ChunkDBWriter(output_prefix, dtype=first.dtype, pad_id=0,
                     chunk_size=first.chunk_size, retrieval_db=first.is_retrieval_db,
                     stride=first.stride) as writer:
    for db in dbs:
      writer.append_db(db)
  for db in dbs:
    db.close()
  return ChunkDB(output_prefix)


# ----------------------------------------------------------------------------------
# Neighbor (KNN) map
# ----------------------------------------------------------------------------------


class NeighborMap:
  """A memory-mapped KNN map: query chunk id -> k retrieval-DB chunk ids.

  Attributes:
    path: The file.
    k: Neighbors per query chunk.
    num_chunks: Rows in the file.
    chunk_start_id: Global id of the first row's query chunk (a shard's offset).
    chunk_end_id: ``chunk_start_id + num_chunks``.
    neighbors: ``[num_chunks, k]`` int64 rows (-1 = missing), indexed by *row*.

  ``map[ids]`` takes *global* query chunk ids (``chunk_start_id <= id <
  chunk_end_id``): an int gives ``[k]``, an int array ``[...]`` gives ``[..., k]``, a
  slice of global ids (``map[start:stop]``: bounds are ids, not rows) gives
  ``[rows, k]``.
  """

  HEADER_SIZE = _KNN_HEADER.size

  def __init__(self, path: str | os.PathLike):
    self.path = path = os.fspath(path)
    if not os.path.exists(path):
      raise FileNotFoundError(f"{path}: neighbor map not found")
    file_bytes = os.path.getsize(path)
    with open(path, "rb") as f:
      raw = f.read(_KNN_HEADER.size)
    if len(raw) < len(NEIGHBOR_MAP_MAGIC):
      raise _error(path, "header", f"truncated: {len(raw)} of {_KNN_HEADER.size} bytes")
    if raw[:len(NEIGHBOR_MAP_MAGIC)] != NEIGHBOR_MAP_MAGIC:
      raise _error(path, "magic", f"expected {NEIGHBOR_MAP_MAGIC!r}, found "
                   f"{raw[:len(NEIGHBOR_MAP_MAGIC)]!r} (not a KNN neighbor map)")
    if len(raw) < _KNN_HEADER.size:
      raise _error(path, "header", f"truncated: {len(raw)} of {_KNN_HEADER.size} bytes")
    _, version, k, num_chunks, start = _KNN_HEADER.unpack(raw)
    if version != FORMAT_VERSION:
      raise _error(path, "version", f"expected {FORMAT_VERSION}, found {version}")
    if k == 0:
      raise _error(path, "k", "must be positive, found 0")
    expected = _KNN_HEADER.size + num_chunks * k * 8
    if file_bytes != expected:
      raise _error(path, "file size", f"{file_bytes} bytes, but num_chunks="
                   f"{num_chunks} x k={k} needs {expected} (truncated or corrupt)")
    self.k, self.num_chunks, self.chunk_start_id = k, num_chunks, start
    self.chunk_end_id = start + num_chunks
    if num_chunks:
      self._mm = np.memmap(path, dtype=np.uint8, mode="r")
      self.neighbors = np.frombuffer(self._mm, "<i8", num_chunks * k,
                                     _KNN_HEADER.size).reshape(num_chunks, k)
    else:
      self.neighbors = np.zeros((0, k), np.int64)

  def __len__(self) -> int:
    return self.num_chunks

  def __repr__(self) -> str:
    return (f"NeighborMap({self.path!r}, k={self.k}, chunks=[{self.chunk_start_id}, "
            f"{self.chunk_end_id}))")

  def __getitem__(self, chunk_ids) -> np.ndarray:
    if isinstance(chunk_ids, slice):
      start = self.chunk_start_id if chunk_ids.start is None else chunk_ids.start
      stop = self.chunk_end_id if chunk_ids.stop is None else chunk_ids.stop
      chunk_ids = np.arange(start, stop, chunk_ids.step or 1, dtype=np.int64)
    ids = np.asarray(chunk_ids)
    if ids.dtype.kind not in "iu":
      raise TypeError(f"query chunk ids must be integers, got {ids.dtype}")
    if ids.size and (ids.min() < self.chunk_start_id or ids.max() >= self.chunk_end_id):
      raise IndexError(f"{self.path}: query chunk ids {ids.min()}..{ids.max()} "
                       f"outside [{self.chunk_start_id}, {self.chunk_end_id})")
    rows = np.asarray(self.neighbors[ids - self.chunk_start_id])
    if rows.size and rows.min() < -1:
      raise _error(self.path, "neighbors", f"id {int(rows.min())} (below -1, the "
                   "missing marker) in the rows read: corrupt map")
    return rows

  def validate_against(self, db: ChunkDB, *, query_db: Optional[ChunkDB] = None,
                       block_rows: int = _BLOCK) -> None:
    """Checks every id is -1 or a chunk of ``db`` (and rows fit ``query_db``).

    Raises:
      ValueError naming this file, the query chunk and the bad id.
    """
    if query_db is not None and self.chunk_end_id > query_db.num_chunks:
      raise _error(self.path, "num_chunks", f"rows cover query chunks up to "
                   f"{self.chunk_end_id}, but {query_db.idx_path} has "
                   f"{query_db.num_chunks}")
    for lo in range(0, self.num_chunks, block_rows):
      block = np.asarray(self.neighbors[lo:lo + block_rows])
      bad = np.argwhere((block < -1) | (block >= db.num_chunks))
      if bad.size:
        row, col = bad[0]
        raise _error(self.path, "neighbors", f"query chunk "
                     f"{self.chunk_start_id + lo + row} neighbor {col} is "
                     f"{block[row, col]}, outside [-1, {db.num_chunks}) of "
                     f"{db.idx_path}")

  def close(self) -> None:
    self.__dict__.pop("neighbors", None)
    self.__dict__.pop("_mm", None)

  def __reduce__(self):
    return (NeighborMap, (self.path,))


class NeighborMapWriter(_AtomicWriter):
  """Streams ``[rows, k]`` blocks of neighbor ids into a KNN map file.

  The header's row count is written at ``finalize`` (as NeMo does); the file lands
  under its final name only then (atomic rename). Leaving a ``with`` block by an
  exception, or ``abort()``, removes the temporary file.

  Args:
    path: Output file.
    k: Neighbors per query chunk.
    chunk_start_id: Global id of the first query chunk written (a shard's offset).
  """

  def __init__(self, path: str | os.PathLike, k: int, *, chunk_start_id: int = 0):
    if k <= 0:
      raise ValueError(f"k must be positive, got {k}")
    if chunk_start_id < 0:
      raise ValueError(f"chunk_start_id must be >= 0, got {chunk_start_id}")
    self.path = os.fspath(path)
    self.k = k
    self.chunk_start_id = chunk_start_id
    self.num_chunks = 0
    self._begin(self.path, self._open_outputs)

  def _open_outputs(self) -> None:
    self._tmp = self._stack.enter_context(atomic_path(self.path))
    self._file = open(self._tmp, "wb", buffering=1 << 20)  # pylint: disable=consider-using-with
    self._stack.callback(self._file.close)
    self._file.write(_KNN_HEADER.pack(NEIGHBOR_MAP_MAGIC, FORMAT_VERSION, self.k, 0,
                                      self.chunk_start_id))

  def write(self, neighbors) -> None:
    """Appends rows: ``neighbors [rows, k]`` integer ids, -1 for missing."""
    self._check_open()
    block = np.asarray(neighbors)
    if block.ndim != 2 or block.shape[1] != self.k:
      raise ValueError(f"neighbors must be [rows, {self.k}], got {block.shape}")
    if block.dtype.kind not in "iu":
      raise TypeError(f"neighbor ids must be integers, got {block.dtype}")
    if block.size and block.min() < -1:
      raise ValueError(f"neighbor ids must be >= -1, found {block.min()}")
    self._file.write(np.ascontiguousarray(block, "<i8").tobytes())
    self.num_chunks += block.shape[0]

  def _complete(self) -> None:
    """Writes the row count into the header."""
    self._file.seek(_KNN_COUNT_OFFSET)
    self._file.write(struct.pack("<Q", self.num_chunks))
    self._file.close()


def write_neighbor_map(path: str | os.PathLike, neighbors, *,
                       chunk_start_id: int = 0) -> NeighborMap:
  """Writes ``neighbors [num_chunks, k]`` to a KNN map file and opens it."""
  neighbors = np.asarray(neighbors)
  if neighbors.ndim != 2:
    raise ValueError(f"neighbors must be [num_chunks, k], got {neighbors.shape}")
  with NeighborMapWriter(path, neighbors.shape[1], chunk_start_id=chunk_start_id) as w:
    w.write(neighbors)
  return NeighborMap(path)


def merge_neighbor_maps(paths: Sequence[str | os.PathLike],
                        output_path: str | os.PathLike, *,
                        block_rows: int = _BLOCK) -> NeighborMap:
  """Merges shard maps covering consecutive query-chunk ranges into one (streamed).

  The shards are ordered by ``chunk_start_id``; they must have one k and leave no
  gap or overlap. The merged map starts at the first shard's start (0 when the
  shards cover a whole DB).

  Raises:
    ValueError naming the shard whose range or k does not fit.
  """
  if not paths:
    raise ValueError("no neighbor maps to merge")
  maps = sorted((NeighborMap(p) for p in paths), key=lambda m: m.chunk_start_id)
  for prev, cur in zip(maps, maps[1:]):
    if cur.k != prev.k:
      raise _error(cur.path, "k", f"{cur.k}, but {prev.path} has k={prev.k}")
    if cur.chunk_start_id != prev.chunk_end_id:
      raise _error(cur.path, "chunk_start_id", f"{cur.chunk_start_id}, but "
                   f"{prev.path} ends at {prev.chunk_end_id} (gap or overlap)")
  with NeighborMapWriter(output_path, maps[0].k,
                         chunk_start_id=maps[0].chunk_start_id) as writer:
    for shard in maps:
      for lo in range(0, shard.num_chunks, block_rows):
        writer.write(shard.neighbors[lo:lo + block_rows])
  for shard in maps:
    shard.close()
  return NeighborMap(output_path)


# ----------------------------------------------------------------------------------
# Embeddings directory (written by retro_jax.retrieval.embeddings)
# ----------------------------------------------------------------------------------

EMBEDDINGS_STAGE = "embeddings"        # the manifest's stage
EMBEDDINGS_SHARD_SUFFIX = ".npy"


class Embeddings:
  """The chunk embeddings of a finished build, memory-mapped shard by shard.

  Attributes:
    output_dir, settings: The build's directory and manifest settings.
    num_vectors: Vectors = chunks of the DB; ``dim``: their width; ``dtype``: as stored.
    shard_paths, shard_starts: The shards and the first chunk id of each.

  ``get(start, end)`` / ``embeddings[start:end]`` return ``[end - start, dim]`` float32
  (copied from the memory maps, so only that range is read); ``iter_blocks`` streams.

  Raises on open: ``FileNotFoundError`` if the manifest or a shard is missing,
  ``ValueError`` naming the file if a shard is incomplete, corrupt or of another
  shape or dtype than the manifest records.
  """

  def __init__(self, output_dir: str):
    self.output_dir = os.fspath(output_dir)
    manifest = Manifest.load(self.output_dir, stage=EMBEDDINGS_STAGE, what="embeddings",
                             hint=" (run `python -m retro_jax.retrieval.embeddings`)")
    self.settings = settings = manifest.settings
    path = manifest.path
    num_shards = int(settings["num_shards"])
    names = [stages.shard_name(s, num_shards, EMBEDDINGS_SHARD_SUFFIX)
             for s in range(num_shards)]
    missing = [n for n in names if not manifest.is_done(n)]
    if missing:
      raise FileNotFoundError(
          f"{self.output_dir}: embeddings incomplete, {len(missing)} of {num_shards} "
          f"shards missing: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    self.num_vectors = int(settings["db"]["num_chunks"])
    self.dim = int(settings["dim"])
    self.dtype = np.dtype(settings["dtype"])
    self.shard_paths, self.shard_starts, self._shards = [], [], []
    expected_start = 0
    for s, name in enumerate(names):
      start, end = stages.shard_chunk_range(self.num_vectors, s, num_shards)
      info = manifest.info(name)
      if (info.get("start"), info.get("end")) != (start, end):
        raise ValueError(f"{path}: {name} is recorded for chunks [{info.get('start')}, "
                         f"{info.get('end')}), expected [{start}, {end})")
      shard_path = os.path.join(self.output_dir, name)
      self._shards.append(self._open_shard(shard_path, end - start))
      self.shard_paths.append(shard_path)
      self.shard_starts.append(start)
      expected_start = end
    if expected_start != self.num_vectors:
      raise ValueError(f"{path}: shards cover {expected_start} of {self.num_vectors} chunks")
    self._ends = np.asarray(self.shard_starts[1:] + [self.num_vectors], np.int64)

  def _open_shard(self, path: str, rows: int) -> np.ndarray:
    try:
      array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
      raise ValueError(f"{path}: not a readable .npy embeddings shard ({e})") from e
    if array.dtype != self.dtype or array.shape != (rows, self.dim):
      raise ValueError(f"{path}: holds {array.dtype} {array.shape}, the manifest expects "
                       f"{self.dtype} {(rows, self.dim)}")
    return array

  def __len__(self) -> int:
    return self.num_vectors

  def __repr__(self) -> str:
    return (f"Embeddings({self.output_dir!r}, num_vectors={self.num_vectors}, "
            f"dim={self.dim}, dtype={self.dtype}, shards={len(self._shards)})")

  def get(self, start: int, end: int, dtype=np.float32) -> np.ndarray:
    """Vectors of chunk ids ``[start, end)``: ``[end - start, dim]`` of ``dtype``
    (None: the stored dtype)."""
    if not 0 <= start <= end <= self.num_vectors:
      raise IndexError(f"chunk range [{start}, {end}) outside [0, {self.num_vectors})")
    out = np.empty((end - start, self.dim), self.dtype if dtype is None else dtype)
    s = int(np.searchsorted(self._ends, start, side="right"))
    position = start
    while position < end:
      shard_start, shard_end = self.shard_starts[s], int(self._ends[s])
      stop = min(end, shard_end)
      out[position - start:stop - start] = self._shards[s][position - shard_start:
                                                           stop - shard_start]
      position, s = stop, s + 1
    return out

  def __getitem__(self, index: slice) -> np.ndarray:
    if not isinstance(index, slice) or index.step not in (None, 1):
      raise TypeError("Embeddings supports contiguous slices: embeddings[start:end]")
    start, end, _ = index.indices(self.num_vectors)
    return self.get(start, max(start, end))

  def iter_blocks(self, block_size: int, start: int = 0, end: Optional[int] = None,
                  dtype=np.float32) -> Iterator[tuple[int, np.ndarray]]:
    """Yields ``(first chunk id, [<= block_size, dim] vectors)`` over ``[start, end)``."""
    end = self.num_vectors if end is None else end
    for block_start in range(start, end, block_size):
      yield block_start, self.get(block_start, min(end, block_start + block_size), dtype)
