"""Live retrieval: the in-memory document store and the Retriever callback."""

import threading

import numpy as np
import pytest

from retro_jax.retrieval.formats import pad_document
from retro_jax.retrieval.retriever import DocumentStore, Retriever


class WordVocab:
  """Whitespace word vocabulary growing on demand (0 = pad, 1 = EOD)."""

  def __init__(self):
    self.words = ["<pad>", "</s>"]
    self.ids = {w: i for i, w in enumerate(self.words)}

  def encode(self, text):
    out = []
    for w in text.split():
      if w not in self.ids:
        self.ids[w] = len(self.words)
        self.words.append(w)
      out.append(self.ids[w])
    return out

  def decode(self, ids):
    return " ".join(self.words[i] for i in ids)


class BagOfWordsEmbedder:
  """Normalised hashed bag of words: texts sharing words are close (test only)."""

  dim = 64

  def embed_texts(self, texts):
    out = np.zeros((len(texts), self.dim), np.float32)
    for i, text in enumerate(texts):
      for w in text.lower().split():
        out[i, sum(map(ord, w)) % self.dim] += 1.0
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-6)


DOCS = ["the capital of zorbia is quenton and its river is the vell",
        "mount arrak rises above the plains of tessel where goats graze",
        "the inventor lira moss built a clock that runs on rain water"]


def _store(m=4):
  return DocumentStore(WordVocab(), BagOfWordsEmbedder(), chunk_length=m)


def test_pad_document_matches_retrieval_db_layout():
  out = pad_document([5, 6, 7, 8, 9], 4, 0, retrieval_db=True)
  np.testing.assert_array_equal(out, [5, 6, 7, 8, 9, 0, 0, 0, 0, 0, 0, 0])
  assert len(pad_document([5, 6, 7, 8], 4, 0, retrieval_db=False)) == 4


def test_store_chunks_and_continuations_stay_in_document():
  store = _store()
  store.add_documents(DOCS)
  assert store.num_docs == 3
  first = store.documents[0]
  last_chunk = first["first_chunk"] + first["num_chunks"] - 1
  tokens = store.get_chunks(np.array([last_chunk]))[0]
  assert tokens.shape == (8,)
  assert (tokens[4:] == 0).all()  # continuation of a document's last chunk is its pad
  assert store.doc_of_chunk(last_chunk + 1) == 1


def test_retriever_finds_the_chunk_with_shared_words_and_masks_missing():
  store = _store()
  retriever = Retriever(store.embedder, store.vocab, store, num_neighbors=2)
  tokens, mask, info = retriever.query_texts(["anything"])
  assert not mask.any() and info == [[]]          # empty store: nothing, all masked
  store.add_documents(DOCS, titles=["Zorbia", "Arrak", "Moss"])
  query = np.array([store.vocab.encode("clock runs on rain")], np.int32)
  tokens, mask, info = retriever(query, 0)
  assert tokens.shape == (1, 2, 8) and mask.all()
  assert info[0][0]["doc_id"] == 2 and "rain" in info[0][0]["text"]
  np.testing.assert_array_equal(tokens[0, 0], store.get_chunks(info[0][0]["chunk_id"]))


def test_passages_are_the_document_from_the_chunk_on():
  store = _store()
  store.add_documents(DOCS)
  retriever = Retriever(store.embedder, store.vocab, store, num_neighbors=2)
  vocab = store.vocab
  for doc in store.documents:
    words = [vocab.ids[w] for w in doc["text"].split()] + [1]   # + EOD
    for i in range(doc["num_chunks"]):
      cid = doc["first_chunk"] + i
      for n in (3, 4, 8, 10, 40):   # the reference: the document's tokens, sliced
        expected = (words[4 * i:] + [0] * n)[:n]
        np.testing.assert_array_equal(retriever.passages(np.array([cid]), n)[0], expected)
  ids = np.array([[0, -1], [store.num_chunks - 1, 2]])
  out = retriever.passages(ids, 8)
  assert out.shape == (2, 2, 8) and (out[0, 1] == 0).all()    # -1: no passage
  # 2m tokens: the chunk with its continuation, the model's neighbor.
  np.testing.assert_array_equal(out[1, 1], store.get_chunks(2))
  _, _, plain = retriever.query_texts(["clock runs on rain"], k=1)
  _, _, long = retriever.query_texts(["clock runs on rain"], k=1, passage_tokens=40)
  assert plain[0][0]["chunk_id"] == long[0][0]["chunk_id"]
  assert long[0][0]["text"] == store.documents[2]["text"].split(
      " ", 4 * (plain[0][0]["chunk_id"] - store.documents[2]["first_chunk"]))[-1]


def test_concurrent_adds_keep_the_store_consistent():
  store = _store()

  def add(i):
    store.add_documents([f"doc {i} word{i} " + " ".join(["filler"] * (i % 7 + 1))])

  threads = [threading.Thread(target=add, args=(i,)) for i in range(16)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert store.num_docs == 16
  assert store.index.ntotal == store.num_chunks
  chunk_docs = store.doc_of_chunk(np.arange(store.num_chunks))
  for doc in store.documents:
    span = chunk_docs[doc["first_chunk"]:doc["first_chunk"] + doc["num_chunks"]]
    assert (span == doc["doc_id"]).all()


def test_bad_documents_are_rejected_without_changing_the_store():
  store = _store()
  store.add_documents(DOCS[:1])
  with pytest.raises(ValueError, match="non-empty string"):
    store.add_documents(["fine text", "   "])
  assert store.num_docs == 1
