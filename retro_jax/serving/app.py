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
(the page asks for it). Without a token every request must name this machine's loopback
(or the bound host) in its ``Host`` header and, where it sends an ``Origin``, come from
such an origin: a web page elsewhere cannot reach the service by DNS rebinding or
post to it cross-site (403).

Limits: request bodies over ``max_request_bytes`` get 413 as soon as the byte count
passes the limit (declared length or streamed body, never read whole); generation
lengths over ``max_new_tokens_limit`` get 422; generation runs one request at a time
on a thread of its own, with at most ``max_pending_generates`` requests running or
waiting: more get 503 with ``Retry-After``, so status, queries and adds never wait
behind queued generations.

Consistency: adds and resets change the document store under its lock; a query (and
every retrieval of a generation) holds that lock from search to titles, so it sees one
version of the store, never a half-reset one.
"""

from __future__ import annotations

import contextlib
import hmac
import importlib.resources
import ipaddress
import json
import math
import threading
import time
from typing import Any, Callable, Optional
import urllib.parse

import anyio
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


class _ConsistentRetriever:
  """The service's retriever as generation sees it: every retrieval holds the store's
  lock from search to titles (one store version per call) and titles its hits."""

  def __init__(self, service: "RetroService"):
    self._service = service
    self._inner = service.retriever

  def __getattr__(self, name):
    return getattr(self._inner, name)

  def query_texts(self, texts, k=None, **options):
    with self._service.store_lock:
      tokens, mask, info = self._inner.query_texts(texts, k=k, **options)
      return tokens, mask, [self._service._titled(hits) for hits in info]

  def __call__(self, chunk_tokens, chunk_index: int = 0):
    with self._service.store_lock:
      tokens, mask, info = self._inner(chunk_tokens, chunk_index)
      return tokens, mask, [self._service._titled(hits) for hits in info]


class RetroService:
  """The state behind the app: a document store, its retriever and a generator."""

  def __init__(self, store: DocumentStore, retriever: Retriever, generate_fn: GenerateFn,
               model_name: str = "retro"):
    self.store, self.retriever, self.generate_fn = store, retriever, generate_fn
    self.model_name = model_name
    self._generate_lock = threading.Lock()
    # The store's own (reentrant) lock where it has one: its add/reset already take
    # it, and a query holding it across search, chunk lookup and titles sees one version.
    self.store_lock = getattr(store, "_lock", None) or threading.RLock()
    self._consistent = _ConsistentRetriever(self)

  def status(self) -> dict[str, Any]:
    return {"num_docs": self.store.num_docs, "num_chunks": self.store.num_chunks,
            "model": self.model_name}

  def _titled(self, hits: list[dict]) -> list[dict]:
    """Hits with their documents' titles (call under ``store_lock``)."""
    out = []
    for h in hits:
      if "title" not in h:
        doc_id = h["doc_id"]
        docs = self.store.documents
        h = dict(h, title=docs[doc_id]["title"] if 0 <= doc_id < len(docs) else "")
      out.append(h)
    return out

  def add(self, request: AddRequest) -> dict[str, Any]:
    ids = self.store.add_documents([d.text for d in request.documents],
                                   [d.title for d in request.documents])
    with self.store_lock:
      return dict(self.status(), doc_ids=ids)

  def reset(self) -> dict[str, Any]:
    with self.store_lock:
      self.store.reset()
      return self.status()

  def query(self, request: QueryRequest) -> dict[str, Any]:
    _, _, info = self._consistent.query_texts([request.text], k=request.k)
    return {"neighbors": info[0]}

  def generate(self, request: GenerateRequest) -> dict[str, Any]:
    with self._generate_lock:
      out = self.generate_fn(request.prompt, request.max_new_tokens, self._consistent)
    # Hits retrieved through the consistent retriever carry their titles already.
    with self.store_lock:
      return {"text": out["text"],
              "retrievals": [self._titled(chunk) for chunk in out.get("retrievals", [])]}


def _page() -> str:
  return importlib.resources.files("retro_jax.serving").joinpath("page.html").read_text(
      encoding="utf-8")


def is_loopback(host: str) -> bool:
  host = host.strip("[]").lower()
  if host == "localhost" or host.endswith(".localhost"):
    return True
  try:
    return ipaddress.ip_address(host).is_loopback
  except ValueError:
    return False


def _split_host(value: str) -> tuple[str, Optional[int]]:
  """'host[:port]' / '[v6][:port]' -> (host without brackets, lower case; port)."""
  value = value.strip().lower()
  if value.startswith("["):
    end = value.find("]")
    if end < 0:
      return value, None
    host, rest = value[1:end], value[end + 1:]
  elif value.count(":") == 1:
    host, rest = value.split(":")[0], value[value.index(":"):]
  else:
    host, rest = value, ""
  if rest.startswith(":") and rest[1:].isdigit():
    return host, int(rest[1:])
  return host, None if not rest else -1


class _Guard:
  """Pure ASGI middleware: token, Host/Origin checks and a streamed body limit.

  The body of an /api/ POST is read here chunk by chunk up to ``max_request_bytes``
  (413 the moment it passes) and handed to the app from memory, so neither a lying
  Content-Length nor a chunked body without one makes the server hold more."""

  def __init__(self, app, *, token: Optional[str], max_request_bytes: int,
               bind_host: Optional[str], port: Optional[int]):
    self.app, self.token, self.limit = app, token, max_request_bytes
    self.bind_host = _split_host(bind_host)[0] if bind_host else None
    self.port = port

  def _host_ok(self, value: str) -> bool:
    host, port = _split_host(value)
    if port == -1 or (self.port is not None and port not in (None, self.port)):
      return False
    return is_loopback(host) or (self.bind_host is not None and host == self.bind_host
                                 and self.bind_host not in ("0.0.0.0", "::"))

  def _origin_ok(self, origin: str) -> bool:
    parsed = urllib.parse.urlsplit(origin)
    return parsed.scheme in ("http", "https") and self._host_ok(parsed.netloc)

  async def __call__(self, scope, receive, send):
    if scope["type"] != "http":
      return await self.app(scope, receive, send)
    headers = {k.decode("latin-1").lower(): v.decode("latin-1")
               for k, v in scope.get("headers", [])}
    path, method = scope.get("path", ""), scope.get("method", "GET")
    if self.token is None:
      # Loopback without a token: refuse names other than this machine's (DNS
      # rebinding) and, for writes, pages of other origins (cross-site posts).
      if not self._host_ok(headers.get("host", "")):
        return await _reply(send, 403, "Host header does not name this server")
      origin = headers.get("origin")
      if method not in ("GET", "HEAD", "OPTIONS") and origin is not None and (
          not self._origin_ok(origin)):
        return await _reply(send, 403, "cross-origin request refused")
    if not path.startswith("/api/"):
      return await self.app(scope, receive, send)
    if self.token is not None:
      given = headers.get("authorization", "")
      if not hmac.compare_digest(given.encode(), f"Bearer {self.token}".encode()):
        return await _reply(send, 401, "missing or wrong API token")
    too_big = f"request body over {self.limit} bytes"
    length = headers.get("content-length")
    if length is not None:
      if not length.strip().isdigit():
        return await _reply(send, 400, "bad Content-Length")
      if int(length) > self.limit:
        return await _reply(send, 413, too_big)
    if method != "POST":
      return await self.app(scope, receive, send)
    chunks, size = [], 0
    while True:
      message = await receive()
      if message["type"] == "http.disconnect":
        return None
      chunk = message.get("body", b"")
      size += len(chunk)
      if size > self.limit:
        return await _reply(send, 413, too_big)
      chunks.append(chunk)
      if not message.get("more_body", False):
        break
    body, replayed = b"".join(chunks), False

    async def replay():
      nonlocal replayed
      if not replayed:
        replayed = True
        return {"type": "http.request", "body": body, "more_body": False}
      return await receive()  # the disconnect, when it comes

    return await self.app(scope, replay, send)


async def _reply(send, status: int, detail: str, headers: Optional[dict] = None) -> None:
  body = json.dumps({"detail": detail}).encode()
  raw = [(b"content-type", b"application/json"),
         (b"content-length", str(len(body)).encode())]
  raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
  if status == 413:
    raw.append((b"connection", b"close"))  # the rest of the body is never read
  await send({"type": "http.response.start", "status": status, "headers": raw})
  await send({"type": "http.response.body", "body": body})


class _GenerateQueue:
  """At most ``capacity`` generate requests running or waiting (event-loop state)."""

  def __init__(self, capacity: int):
    self.capacity, self.pending = capacity, 0
    self.seconds = 1.0  # running mean of one generation's time, for Retry-After
    self._limiter: Optional[anyio.CapacityLimiter] = None

  def retry_after(self) -> int:
    return max(1, min(600, math.ceil(self.seconds * self.pending)))

  @contextlib.asynccontextmanager
  async def slot(self):
    self.pending += 1
    try:
      yield
    finally:
      self.pending -= 1

  async def run(self, fn, *args):
    if self._limiter is None:
      self._limiter = anyio.CapacityLimiter(1)  # one worker thread for generation

    def timed():
      start = time.perf_counter()
      try:
        return fn(*args)
      finally:
        self.seconds = 0.8 * self.seconds + 0.2 * (time.perf_counter() - start)

    return await anyio.to_thread.run_sync(timed, limiter=self._limiter)


def create_app(service: RetroService, *, token: Optional[str] = None,
               max_request_bytes: int = 1 << 20, max_new_tokens_limit: int = 256,
               max_pending_generates: int = 4, host: Optional[str] = None,
               port: Optional[int] = None) -> fastapi.FastAPI:
  """The FastAPI app around ``service``; ``token`` protects every /api route.

  ``host``/``port``: the bound address; without a token, requests must name it (or a
  loopback name) in ``Host``; ``port`` None accepts any port."""
  if max_pending_generates < 1:
    raise ValueError("max_pending_generates must be >= 1")
  app = fastapi.FastAPI(title="retro_jax retrieval service")
  app.add_middleware(_Guard, token=token, max_request_bytes=max_request_bytes,
                     bind_host=host, port=port)
  queue = _GenerateQueue(max_pending_generates)

  @app.get("/", response_class=responses.HTMLResponse)
  def page() -> str:
    return _page()

  @app.get("/api/status")
  async def status() -> dict:
    # On the event loop: answers even when every worker thread is busy.
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
  async def generate(request: GenerateRequest):
    if request.max_new_tokens > max_new_tokens_limit:
      raise fastapi.HTTPException(
          422, f"max_new_tokens={request.max_new_tokens} is over the server's limit "
          f"{max_new_tokens_limit}")
    if queue.pending >= queue.capacity:
      return responses.JSONResponse(
          {"detail": f"{queue.pending} generations running or queued (the server's "
                     f"limit); retry later"}, 503,
          headers={"Retry-After": str(queue.retry_after())})
    async with queue.slot():
      return await queue.run(service.generate, request)

  return app


def check_bind(host: str, token: Optional[str]) -> None:
  """Refuses a non-loopback bind without a token."""
  if not is_loopback(host) and not token:
    raise ValueError(f"--host={host} exposes the service beyond this machine; set --token "
                     "(clients then send 'Authorization: Bearer <token>')")
