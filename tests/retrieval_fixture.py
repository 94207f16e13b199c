"""A small prepared retrieval directory (RetrievalLayout) built with the real stages.

Documents are generated English-like sentences; the vocabulary is trained on them; the
chunk DBs come from ``retrieval.chunk_db.build_chunk_db`` and the neighbor maps from
``retrieval.neighbors.build_neighbor_map`` with a deterministic bag-of-tokens embedder
and an exact Faiss inner-product index. Layout::

    ROOT/vocab/spm.model, retrieval_db/, train_db/, valid_db/,
    neighbors/{train,valid}/neighbors.knn, retrieval.json
"""

from __future__ import annotations

import json
import os

import faiss
import numpy as np

from retro_jax.data import vocab as vocab_lib
from retro_jax.retrieval import formats
from retro_jax.retrieval.chunk_db import build_chunk_db
from retro_jax.retrieval.layout import RetrievalLayout
from retro_jax.retrieval.neighbors import build_neighbor_map

SUBJECTS = ["The river", "A small town", "The old library", "Every farmer", "The engineer",
            "A quiet student", "The museum", "Our neighbor", "The mountain road",
            "A young painter", "The harbor", "The bakery"]
VERBS = ["opens", "collects", "builds", "watches", "repairs", "describes", "follows",
         "paints", "measures", "visits", "carries", "remembers"]
OBJECTS = ["the wooden bridge", "seven blue boats", "an ancient map", "the winter garden",
           "a long letter", "the northern lights", "fresh bread", "the stone tower",
           "a broken clock", "the spring festival", "two silver keys", "the evening train"]
TAILS = ["before sunrise.", "after the rain.", "with great care.", "every Sunday.",
         "near the lake.", "for the children.", "in the valley.", "without a sound."]
EMBED_DIM = 32


def documents(seed: int, count: int) -> list[str]:
  rng = np.random.default_rng(seed)
  docs = []
  for _ in range(count):
    sentences = []
    for _ in range(int(rng.integers(4, 14))):
      sentences.append(" ".join([SUBJECTS[rng.integers(len(SUBJECTS))],
                                 VERBS[rng.integers(len(VERBS))],
                                 OBJECTS[rng.integers(len(OBJECTS))],
                                 TAILS[rng.integers(len(TAILS))]]))
    docs.append(" ".join(sentences))
  return docs


def _write_jsonl(path: str, texts: list[str]) -> str:
  with open(path, "w", encoding="utf-8") as f:
    for text in texts:
      f.write(json.dumps({"text": text}) + "\n")
  return path


def embed_tokens(tokens: np.ndarray, vocab_size: int) -> np.ndarray:
  """Bag of token ids (pad/EOS dropped) through a fixed projection, L2-normalised."""
  counts = np.zeros((len(tokens), vocab_size), np.float32)
  for i, row in enumerate(np.asarray(tokens)):
    ids = row[row > vocab_lib.EOS_ID]
    np.add.at(counts[i], ids, 1.0)
  proj = np.random.default_rng(7).standard_normal((vocab_size, EMBED_DIM)).astype(np.float32)
  out = counts @ proj
  return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-6)


def build(root: str, *, train_docs: int = 60, valid_docs: int = 12, extra_docs: int = 30,
          chunk_size: int = 64, k: int = 2) -> RetrievalLayout:
  """Builds the directory (skipped if already complete); returns its layout."""
  layout = RetrievalLayout(root)
  if os.path.exists(layout.config_path):
    return layout
  os.makedirs(layout.vocab_dir, exist_ok=True)
  train, valid, extra = documents(1, train_docs), documents(2, valid_docs), documents(
      3, extra_docs)
  corpus_dir = os.path.join(root, "corpus")
  os.makedirs(corpus_dir, exist_ok=True)
  train_file = _write_jsonl(os.path.join(corpus_dir, "train.jsonl"), train)
  valid_file = _write_jsonl(os.path.join(corpus_dir, "valid.jsonl"), valid)
  db_file = _write_jsonl(os.path.join(corpus_dir, "db.jsonl"), train + extra)
  vocab_path = vocab_lib.train_sentencepiece(
      train + valid + extra, os.path.join(layout.vocab_dir, "spm"), vocab_size=400,
      num_threads=1)
  vocab_size = vocab_lib.load_sentencepiece(vocab_path).get_piece_size()
  build_chunk_db(db_file, vocab_path, layout.retrieval_db_dir, retrieval_db=True,
                 chunk_size=chunk_size, progress=False)
  for split, path in (("train", train_file), ("valid", valid_file)):
    build_chunk_db(path, vocab_path, layout.split_db_dir(split), retrieval_db=False,
                   chunk_size=chunk_size, progress=False)
  db = formats.ChunkDB(layout.retrieval_db_prefix)
  index = faiss.IndexFlatIP(EMBED_DIM)
  index.add(embed_tokens(db.get_chunks(np.arange(db.num_chunks), with_continuation=False),
                         vocab_size))

  def embed(chunks):
    return embed_tokens(chunks, vocab_size)

  def search(queries, count):
    return index.search(np.asarray(queries, np.float32), count)

  for split, exclude in (("train", True), ("valid", False)):
    build_neighbor_map(formats.ChunkDB(layout.split_db_prefix(split)), db, embed, search,
                       layout.neighbors_dir(split), k=k, exclude_same_document=exclude,
                       progress=False)
  layout.write_config({"chunk_size": chunk_size, "k": k, "pad_id": vocab_lib.PAD_ID,
                       "vocab_size": vocab_size})
  return layout
