"""Real English prose shipped with Python, for tests and benchmarks (no download).

The one home of the real-text fixtures:

* ``prose_documents()``: ``(title, text)`` documents, the documentation topics
  (``pydoc_data.topics``, sorted by name) then the docstrings of each standard-library
  module (sorted by path). Deterministic for a Python version.
* ``prose_chunks(n, chars)``: ``n`` pieces of about ``chars`` characters of the topics,
  cut at word boundaries (a RETRO chunk is ~256 characters).
* ``prose_chunk_texts(documents)``: documents cut into chunks of
  ``WORDS_PER_CHUNK`` = 40 words (~64 WordPiece tokens), with each chunk's document.
* ``real_embeddings(embedder)``: a given embedder's vectors of ``prose_documents()``'s
  chunks (about 8k), cached in a directory keyed by the texts and the embedder's code.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import inspect
import os
import re
import sys
import sysconfig
import time
from typing import Any, Iterator, Optional, Sequence

import numpy as np
from pydoc_data.topics import topics

from retro_jax.utils.io import atomic_path

WORDS_PER_CHUNK = 40
_SKIP_DIRS = ("test", "tests", "idlelib", "site-packages", "lib2to3", "__pycache__",
              "turtledemo", "ensurepip")


def prose_chunks(num_texts: int = 512, chars: int = 256) -> list[str]:
  """``num_texts`` pieces of about ``chars`` characters of English prose, cut at word
  boundaries from the Python documentation topics (deterministic)."""
  words = re.sub(r"\s+", " ", " ".join(topics[k] for k in sorted(topics))).split(" ")
  pieces, current, size = [], [], 0
  while len(pieces) < num_texts:
    for word in words:
      current.append(word)
      size += len(word) + 1
      if size >= chars:
        pieces.append(" ".join(current))
        current, size = [], 0
        if len(pieces) == num_texts:
          break
  return pieces


def _stdlib_docstring_documents() -> Iterator[tuple[str, str]]:
  root = sysconfig.get_paths()["stdlib"]
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
    for filename in sorted(filenames):
      if not filename.endswith(".py"):
        continue
      path = os.path.join(dirpath, filename)
      try:
        with open(path, encoding="utf-8") as f:
          tree = ast.parse(f.read())
      except (SyntaxError, UnicodeDecodeError, ValueError):
        continue
      parts = []
      for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                             ast.AsyncFunctionDef)):
          doc = ast.get_docstring(node)
          if doc and len(doc.split()) >= 8:
            parts.append(doc)
      if parts:
        yield os.path.relpath(path, root), "\n\n".join(parts)


def prose_documents(max_documents: Optional[int] = None, *, stdlib: bool = True
                    ) -> list[tuple[str, str]]:
  """Real English prose shipped with Python, as ``(title, text)`` documents.

  The documentation topics (``pydoc_data.topics``, sorted by name), then (``stdlib``)
  the docstrings of each standard-library module (sorted by path). Deterministic for a
  Python version; no download.
  """
  docs = [(f"pydoc:{name}", topics[name]) for name in sorted(topics)]
  if stdlib:
    docs.extend(_stdlib_docstring_documents())
  return docs[:max_documents] if max_documents is not None else docs


def prose_chunk_texts(documents: Sequence[tuple[str, str]],
                      words_per_chunk: int = WORDS_PER_CHUNK
                      ) -> tuple[list[str], np.ndarray]:
  """Documents cut into chunks of ``words_per_chunk`` words: (texts, doc index [n])."""
  texts, docs = [], []
  for i, (_, text) in enumerate(documents):
    words = text.split()
    for start in range(0, len(words), words_per_chunk):
      texts.append(" ".join(words[start:start + words_per_chunk]))
      docs.append(i)
  return texts, np.asarray(docs, np.int64)


def real_embeddings(embedder: Any, *, max_chunks: Optional[int] = None,
                    cache_dir: Optional[str] = None, progress: bool = True
                    ) -> tuple[np.ndarray, np.ndarray]:
  """``embedder``'s vectors of ``prose_documents()``'s chunks: (float32 [n, dim], docs [n]).

  Args:
    embedder: An embedder (``embed_texts``, ``dim``), e.g. the Flax MiniLM of
      ``retro_jax.retrieval.embedders.load_embedder()``.
    max_chunks: Keep the first chunks only.
    cache_dir: Cache the vectors there (keyed by the texts and the embedder).
  """
  texts, docs = prose_chunk_texts(prose_documents())
  if max_chunks is not None:
    texts, docs = texts[:max_chunks], docs[:max_chunks]
  key = hashlib.sha256()
  key.update("\n".join(texts).encode())
  key.update(str(getattr(embedder, "fingerprint", type(embedder).__name__)).encode())
  with contextlib.suppress(TypeError, OSError):     # the embedder's code, too
    with open(inspect.getsourcefile(type(embedder)), "rb") as f:
      key.update(f.read())
  key = key.hexdigest()[:16]
  path = os.path.join(cache_dir, f"prose_{len(texts)}_{key}.npy") if cache_dir else None
  if path and os.path.exists(path):
    return np.load(path), docs
  began = time.time()
  out = []
  block = 512
  for lo in range(0, len(texts), block):
    out.append(np.asarray(embedder.embed_texts(texts[lo:lo + block]), np.float32))
    if progress:
      done = min(len(texts), lo + block)
      print(f"\rembedding real chunks: {done}/{len(texts)} "
            f"({done / max(time.time() - began, 1e-9):.0f} chunks/s)", end="",
            file=sys.stderr, flush=True)
  if progress:
    print(file=sys.stderr)
  vectors = np.concatenate(out) if out else np.zeros((0, embedder.dim), np.float32)
  if path:
    os.makedirs(cache_dir, exist_ok=True)
    with atomic_path(path) as tmp:
      with open(tmp, "wb") as f:
        np.save(f, vectors)
  return vectors, docs
