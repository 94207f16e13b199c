"""HTTP retrieval service: add documents, reset, query neighbors, generate with retrieval.

    app = create_app(service, token=None)        # FastAPI app; see retro_jax/serve.py

Endpoints (JSON):

    GET  /                  a web page to do all of this in a browser
    GET  /api/status        {"num_docs", "num_chunks", "model"}
    POST /api/documents     {"documents": [{"text": ..., "title": ...}]} -> {"doc_ids", ...}
    POST /api/reset         {} -> {"num_docs": 0, ...}
    POST /api/query         {"text": ..., "k": 2} -> {"neighbors": [{chunk_id, doc_id, title,
                                                     score, text}]}
    POST /api/generate      {"prompt": ..., "max_new_tokens": 32} ->
                            {"text", "retrievals": [[{chunk_id, doc_id, title, text}]]}

Security: the server binds to 127.0.0.1 by default; bound anywhere else it refuses to
start without a token, and then every /api call needs ``Authorization: Bearer <token>``
(the page asks for it). Request bodies over ``max_request_bytes`` get 413, generation
lengths over ``max_new_tokens_limit`` get 422. Adds are serialised by the document
store's lock and generation by a lock of its own, so concurrent requests cannot
corrupt the in-memory index.
"""

from __future__ import annotations

import hmac
import importlib.resources
import threading
from typing import Any, Callable, Optional

import fastapi
from fastapi import responses
import pydantic

from retro_jax.retrieval.retriever import DocumentStore, Retriever

# generate_fn(prompt, max_new_tokens, retriever) -> {"text": str, "retrievals": [...]}
GenerateFn = Callable[[str, int, Retriever], dict]


class Document(pydantic.BaseModel):
  text: str = pydantic.Field(min_length=1)
  title: str = ""


class AddRequest(pydantic.BaseModel):
  documents: list[Document] = pydantic.Field(min_length=1)


class QueryRequest(pydantic.BaseModel):
  text: str = pydantic.Field(min_length=1)
  k: int = pydantic.Field(default=2, ge=1, le=32)


class GenerateRequest(pydantic.BaseModel):
  prompt: str = pydantic.Field(min_length=1)
  max_new_tokens: int = pydantic.Field(default=32, ge=1)


class RetroService:
  """The state behind the app: a document store, its retriever and a generator."""

  def __init__(self, store: DocumentStore, retriever: Retriever, generate_fn: GenerateFn,
               model_name: str = "retro"):
    self.store, self.retriever, self.generate_fn = store, retriever, generate_fn
    self.model_name = model_name
    self._generate_lock = threading.Lock()

  def status(self) -> dict[str, Any]:
    return {"num_docs": self.store.num_docs, "num_chunks": self.store.num_chunks,
            "model": self.model_name}

  def _titled(self, hits: list[dict]) -> list[dict]:
    return [dict(h, title=self.store.documents[h["doc_id"]]["title"]) for h in hits]

  def add(self, request: AddRequest) -> dict[str, Any]:
    ids = self.store.add_documents([d.text for d in request.documents],
                                   [d.title for d in request.documents])
    return dict(self.status(), doc_ids=ids)

  def reset(self) -> dict[str, Any]:
    self.store.reset()
    return self.status()

  def query(self, request: QueryRequest) -> dict[str, Any]:
    _, _, info = self.retriever.query_texts([request.text], k=request.k)
    return {"neighbors": self._titled(info[0])}

  def generate(self, request: GenerateRequest) -> dict[str, Any]:
    with self._generate_lock:
      out = self.generate_fn(request.prompt, request.max_new_tokens, self.retriever)
    return {"text": out["text"],
            "retrievals": [self._titled(chunk) for chunk in out.get("retrievals", [])]}


def _page() -> str:
  return importlib.resources.files("retro_jax.serving").joinpath("page.html").read_text(
      encoding="utf-8")


def create_app(service: RetroService, *, token: Optional[str] = None,
               max_request_bytes: int = 1 << 20, max_new_tokens_limit: int = 256
               ) -> fastapi.FastAPI:
  """The FastAPI app around ``service``; ``token`` protects every /api route."""
  app = fastapi.FastAPI(title="retro_jax retrieval service")

  @app.middleware("http")
  async def guard(request: fastapi.Request, call_next):
    if request.url.path.startswith("/api/"):
      if token is not None:
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
          return responses.JSONResponse({"detail": "missing or wrong API token"}, 401)
      length = request.headers.get("content-length")
      if length is not None and int(length) > max_request_bytes:
        return responses.JSONResponse(
            {"detail": f"request body over {max_request_bytes} bytes"}, 413)
      if request.method == "POST":
        body = await request.body()  # also bounds chunked bodies without a length
        if len(body) > max_request_bytes:
          return responses.JSONResponse(
              {"detail": f"request body over {max_request_bytes} bytes"}, 413)
    return await call_next(request)

  @app.get("/", response_class=responses.HTMLResponse)
  def page() -> str:
    return _page()

  @app.get("/api/status")
  def status() -> dict:
    return service.status()

  @app.post("/api/documents")
  def add(request: AddRequest) -> dict:
    try:
      return service.add(request)
    except ValueError as e:
      raise fastapi.HTTPException(422, str(e)) from e

  @app.post("/api/reset")
  def reset() -> dict:
    return service.reset()

  @app.post("/api/query")
  def query(request: QueryRequest) -> dict:
    return service.query(request)

  @app.post("/api/generate")
  def generate(request: GenerateRequest) -> dict:
    if request.max_new_tokens > max_new_tokens_limit:
      raise fastapi.HTTPException(
          422, f"max_new_tokens={request.max_new_tokens} is over the server's limit "
          f"{max_new_tokens_limit}")
    return service.generate(request)

  return app


def is_loopback(host: str) -> bool:
  return host in ("localhost", "::1") or host.startswith("127.")


def check_bind(host: str, token: Optional[str]) -> None:
  """Refuses a non-loopback bind without a token."""
  if not is_loopback(host) and not token:
    raise ValueError(f"--host={host} exposes the service beyond this machine; set --token "
                     "(clients then send 'Authorization: Bearer <token>')")
