"""The knowledge update's DB rebuild (``evaluation.knowledge_update.build_updated_retrieval``):
the edited corpus gets a retrieval directory built as the original was (chunk length,
neighbors, embedding storage, index, search, corpus options), and only the chunks whose
text changed are embedded anew."""

import numpy as np

from retro_jax.data import encyclopedia as enc
from retro_jax.evaluation import knowledge_update
from retro_jax.retrieval import formats, pipeline
from retro_jax.retrieval.layout import RetrievalLayout

from test_retriever import BagOfWordsEmbedder


class CountingEmbedder(BagOfWordsEmbedder):
  """test_retriever's stand-in for MiniLM, named, counting the texts it embeds."""

  name = "hashed-words"

  def __init__(self):
    self.texts = 0

  def embed_texts(self, texts):
    self.texts += len(texts)
    return super().embed_texts(texts)


def test_updated_db_is_built_as_the_original_and_reembeds_only_changed_chunks(
    tmp_path, monkeypatch):
  paths = enc.generate_corpus(tmp_path / "corpus", scale=0.1, seed=0)["paths"]
  original_dir, updated_dir = str(tmp_path / "retrieval"), str(tmp_path / "updated")
  # Settings away from preprocess's defaults, so a rebuild with defaults shows.
  pipeline.preprocess(paths["retrieval"], original_dir, vocab_size=600, chunk_size=16,
                      num_neighbors=3, extra_neighbors=5, embedding_dtype="float32",
                      metric="l2", seed=3, embedder=CountingEmbedder(), use_gpu=False,
                      progress=False)
  embedder = CountingEmbedder()
  loaded = []

  def load_embedder(name):
    loaded.append(name)
    return embedder

  monkeypatch.setattr(knowledge_update.embedders, "load_embedder", load_embedder)
  rebuild = knowledge_update.build_updated_retrieval(
      original_dir, paths["retrieval_updated"], updated_dir)

  assert loaded == ["hashed-words"]
  original = RetrievalLayout(original_dir).read_config()
  updated = RetrievalLayout(updated_dir).read_config()
  settings = pipeline.rebuild_settings(original)
  assert settings["chunk_size"] == 16 and settings["num_neighbors"] == 3
  assert settings["metric"] == "l2" and settings["embedding_dtype"] == "float32"
  assert pipeline.rebuild_settings(updated) == settings
  for key in ("embedder", "embedder_fingerprint", "vocab_size", "index_factory", "nprobe"):
    assert updated[key] == original[key], key
  db = formats.ChunkDB(RetrievalLayout(updated_dir).retrieval_db_prefix)
  assert db.header.chunk_size == 16
  assert db.get_chunks(np.arange(2), with_continuation=True).shape == (2, 32)
  # The edit touches a few documents: few texts are embedded again.
  assert rebuild["chunk_texts"] == db.num_chunks
  assert 0 < rebuild["embedded_anew"] == embedder.texts < 0.3 * rebuild["chunk_texts"]
