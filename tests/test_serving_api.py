"""Retrieval service API on a real server: add / reset / query / generate, auth, limits."""

import concurrent.futures

import pytest

from retro_jax.retrieval.retriever import DocumentStore, Retriever
from retro_jax.serving.app import RetroService, check_bind, create_app
from serving_utils import call, running_server
from test_retriever import DOCS, BagOfWordsEmbedder, WordVocab


def retrieval_only_generate(prompt, max_new_tokens, retriever):
  """Test double for the model: 'answers' with the first word after the prompt's last
  word in the top neighbor. The real model is exercised in test_serving_model.py."""
  _, _, info = retriever.query_texts([prompt])
  hits = info[0]
  words = hits[0]["text"].split() if hits else []
  return {"text": " ".join(words[:max_new_tokens]), "retrievals": [hits]}


def _service():
  store = DocumentStore(WordVocab(), BagOfWordsEmbedder(), chunk_length=4)
  retriever = Retriever(store.embedder, store.vocab, store, num_neighbors=2)
  return RetroService(store, retriever, retrieval_only_generate, model_name="test")


def test_add_query_generate_reset():
  with running_server(create_app(_service())) as url:
    assert call(url + "/api/status") == (200, {"num_docs": 0, "num_chunks": 0, "model": "test"})
    status, body = call(url + "/api/documents", {"documents": [
        {"text": t, "title": f"doc{i}"} for i, t in enumerate(DOCS)]})
    assert status == 200 and body["doc_ids"] == [0, 1, 2] and body["num_chunks"] > 3
    status, body = call(url + "/api/query", {"text": "clock rain water", "k": 2})
    assert status == 200 and body["neighbors"][0]["title"] == "doc2"
    status, body = call(url + "/api/generate", {"prompt": "clock rain", "max_new_tokens": 3})
    assert status == 200 and body["retrievals"][0][0]["doc_id"] == 2
    assert call(url + "/api/reset", {})[1]["num_docs"] == 0
    status, body = call(url + "/api/query", {"text": "clock"})
    assert status == 200 and body["neighbors"] == []
    page = __import__("urllib.request").request.urlopen(url + "/").read().decode()
    assert 'id="ask-btn"' in page


def test_token_limits_and_validation():
  app = create_app(_service(), token="s3cret", max_request_bytes=2000, max_new_tokens_limit=8)
  with running_server(app) as url:
    assert call(url + "/api/status")[0] == 401
    assert call(url + "/api/status", token="wrong")[0] == 401
    assert call(url + "/api/status", token="s3cret")[0] == 200
    big = {"documents": [{"text": "word " * 1000}]}
    assert call(url + "/api/documents", big, token="s3cret")[0] == 413
    status, body = call(url + "/api/generate", {"prompt": "x", "max_new_tokens": 9},
                        token="s3cret")
    assert status == 422 and "limit 8" in body["detail"]
    assert call(url + "/api/documents", {"documents": []}, token="s3cret")[0] == 422
    assert call(url + "/api/documents", raw=b"{not json", token="s3cret")[0] == 422


def test_concurrent_adds_are_serialised():
  service = _service()
  with running_server(create_app(service)) as url:
    def add(i):
      return call(url + "/api/documents", {"documents": [{"text": f"note {i} " * (i % 5 + 1)}]})
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
      results = list(pool.map(add, range(24)))
  assert all(status == 200 for status, _ in results)
  assert service.store.num_docs == 24 and service.store.index.ntotal == service.store.num_chunks
  assert sorted(i for _, body in results for i in body["doc_ids"]) == list(range(24))


def test_public_bind_needs_a_token():
  check_bind("127.0.0.1", None)
  check_bind("0.0.0.0", "t")
  with pytest.raises(ValueError, match="--host=0.0.0.0 exposes"):
    check_bind("0.0.0.0", None)
