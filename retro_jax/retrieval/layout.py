"""The directory layout of a prepared retrieval setup: the one place that names its paths.

``python -m retro_jax.preprocess`` writes it; the seqio tasks, the live ``Retriever``,
generation and the recipe read it. Every path is derived here, so no stage spells a
file name of another::

    ROOT/
      retrieval.json                 settings of the build (vocab, m, k, embedder, index)
      vocab/spm.model                SentencePiece model (trained unless one was given)
      retrieval_db/chunks.{idx,bin}  NeMo retmmap, retrieval flavour (chunk + continuation)
      <split>_db/chunks.{idx,bin}    NeMo retmmap, training flavour: the query chunks of a
                                     split ('train', 'valid', ...)
      embeddings/                    float16/float32 .npy shards of the retrieval DB's chunk
                                     embeddings (+ manifest.json)
      index/index.faissindex         Faiss index over those embeddings (ids = DB chunk ids)
      neighbors/<split>/neighbors.knn   NeMo KNN map: k DB chunk ids per query chunk

    layout = RetrievalLayout("/data/retro")
    db = formats.ChunkDB(layout.retrieval_db_prefix)
    knn = formats.NeighborMap(layout.neighbor_map_path("train"))
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from retro_jax.utils.io import atomic_write_json

CONFIG_NAME = "retrieval.json"
CHUNKS_NAME = "chunks"


@dataclasses.dataclass(frozen=True)
class RetrievalLayout:
  """Paths of a retrieval setup rooted at ``root``."""

  root: str

  def __post_init__(self):
    object.__setattr__(self, "root", os.path.abspath(os.fspath(self.root)))

  @property
  def config_path(self) -> str:
    return os.path.join(self.root, CONFIG_NAME)

  @property
  def vocab_dir(self) -> str:
    return os.path.join(self.root, "vocab")

  @property
  def vocab_path(self) -> str:
    return os.path.join(self.vocab_dir, "spm.model")

  @property
  def retrieval_db_dir(self) -> str:
    return os.path.join(self.root, "retrieval_db")

  @property
  def retrieval_db_prefix(self) -> str:
    return os.path.join(self.retrieval_db_dir, CHUNKS_NAME)

  def split_db_dir(self, split: str) -> str:
    _check_split(split)
    return os.path.join(self.root, f"{split}_db")

  def split_db_prefix(self, split: str) -> str:
    return os.path.join(self.split_db_dir(split), CHUNKS_NAME)

  @property
  def embeddings_dir(self) -> str:
    return os.path.join(self.root, "embeddings")

  def query_embeddings_dir(self, split: str) -> str:
    """Embeddings of a split's query chunks, for a split that is not a prefix of the
    retrieval DB (a prefix split's query embeddings are the DB's own rows)."""
    _check_split(split)
    return os.path.join(self.root, "query_embeddings", split)

  @property
  def index_dir(self) -> str:
    return os.path.join(self.root, "index")

  @property
  def index_path(self) -> str:
    return os.path.join(self.index_dir, "index.faissindex")

  def neighbors_dir(self, split: str) -> str:
    _check_split(split)
    return os.path.join(self.root, "neighbors", split)

  def neighbor_map_path(self, split: str) -> str:
    return os.path.join(self.neighbors_dir(split), "neighbors.knn")

  def splits(self) -> list[str]:
    """Splits with a query DB in this layout (sorted)."""
    if not os.path.isdir(self.root):
      return []
    return sorted(name[:-len("_db")] for name in os.listdir(self.root)
                  if name.endswith("_db") and name != "retrieval_db"
                  and os.path.exists(os.path.join(self.root, name, CHUNKS_NAME + ".idx")))

  # The settings file --------------------------------------------------------------

  def read_config(self) -> dict[str, Any]:
    """The build's settings (``retrieval.json``); a clear error if it is missing."""
    if not os.path.exists(self.config_path):
      raise FileNotFoundError(f"{self.config_path}: not a retrieval directory (run "
                              "`python -m retro_jax.preprocess` to build one)")
    with open(self.config_path, encoding="utf-8") as f:
      try:
        return json.load(f)
      except json.JSONDecodeError as e:
        raise ValueError(f"{self.config_path}: corrupt settings file ({e})") from e

  def write_config(self, config: dict[str, Any]) -> None:
    atomic_write_json(self.config_path, config)


def _check_split(split: str) -> None:
  if not split or not split.replace("_", "").replace("-", "").isalnum() or split == "retrieval":
    raise ValueError(f"split name {split!r}: use letters, digits, '-' or '_' (and not "
                     "'retrieval', which names the retrieval DB)")
