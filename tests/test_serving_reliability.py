"""Reliability of the retrieval service on a real loopback server (issue 17, items 6-9):
consistent queries under concurrent reset/add, bodies cut off at the limit while
streaming, Host/Origin checks without a token, and a bounded generate queue.

All traffic goes to 127.0.0.1 on this machine; every loop is bounded in count and time.
Each test prints its figures (run with -s to see them; docs/reliability.md records them).
"""

import collections
import concurrent.futures
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

from retro_jax.retrieval.retriever import DocumentStore, Retriever
from retro_jax.serving.app import RetroService, create_app
from serving_utils import free_port, running_server
from test_retriever import BagOfWordsEmbedder, WordVocab
from test_serving_api import _service

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS_DIR)


def _request(url, body=None, headers=None, timeout=30):
  """(status, headers with lower-case names, json) of a GET (body None) or POST."""
  data = None if body is None else json.dumps(body).encode()
  request = urllib.request.Request(url, data=data, method="GET" if data is None else "POST")
  request.add_header("Content-Type", "application/json")
  for k, v in (headers or {}).items():
    request.add_header(k, v)
  try:
    with urllib.request.urlopen(request, timeout=timeout) as response:
      return (response.status, {k.lower(): v for k, v in response.headers.items()},
              json.loads(response.read()))
  except urllib.error.HTTPError as e:
    raw = e.read()
    try:
      body = json.loads(raw or b"{}")
    except ValueError:  # e.g. a plain-text 500
      body = {"raw": raw.decode(errors="replace")}
    return e.code, {k.lower(): v for k, v in e.headers.items()}, body


# Item 6: one store version per query --------------------------------------------------


def test_concurrent_reset_add_query_generate_never_5xx():
  service = _service()
  tags = [f"tag{i}" for i in range(40)]
  service.store.vocab.encode(" ".join(tags + ["clock", "rain"]))  # no vocabulary growth
  codes, inconsistent = collections.Counter(), []

  def check(hits):
    # Each document is "tagN clock rain" titled tagN: a hit's title names its own text.
    for hit in hits:
      if hit["title"] not in hit["text"].split():
        inconsistent.append(hit)

  switch = sys.getswitchinterval()
  sys.setswitchinterval(1e-5)  # many more thread switches: races show up within seconds
  with running_server(create_app(service)) as url:
    stop = time.monotonic() + 3.0

    def worker(kind, seed):
      n = 0
      while time.monotonic() < stop and n < 3000:
        n += 1
        if kind == "reset":
          status, _, _ = _request(url + "/api/reset", {}, timeout=10)
        elif kind == "add":
          tag = tags[(seed * 7 + n) % len(tags)]
          status, _, _ = _request(url + "/api/documents", {"documents": [
              {"text": f"{tag} clock rain", "title": tag}] * (1 + n % 3)}, timeout=10)
        elif kind == "query":
          status, _, body = _request(url + "/api/query", {"text": "clock rain", "k": 4},
                                     timeout=10)
          if status == 200:
            check(body["neighbors"])
        else:
          status, _, body = _request(url + "/api/generate",
                                     {"prompt": "clock rain", "max_new_tokens": 2}, timeout=10)
          if status == 200:
            for hits in body["retrievals"]:
              check(hits)
        codes[status] += 1

    kinds = ["reset", "add", "add"] + ["query"] * 6 + ["generate"] * 2
    try:
      with concurrent.futures.ThreadPoolExecutor(len(kinds)) as pool:
        for f in [pool.submit(worker, kind, i) for i, kind in enumerate(kinds)]:
          f.result(timeout=30)
    finally:
      sys.setswitchinterval(switch)
  total = sum(codes.values())
  errors = sum(v for k, v in codes.items() if k >= 500)
  print(f"\nconcurrent: {total} requests in 3 s, codes {dict(codes)}, 5xx {errors}, "
        f"inconsistent hits {len(inconsistent)}")
  assert total > 200
  assert errors == 0, dict(codes)
  assert set(codes) == {200}, dict(codes)
  assert not inconsistent, inconsistent[:3]


class _ResetDuringSearch(DocumentStore):
  """A store whose every search lets another thread try to reset it (for up to 0.2 s)
  before the query goes on to read chunks and titles: the race of issue 17, made
  deterministic."""

  def search(self, queries, k):
    out = super().search(queries, k)
    if getattr(self, "armed", False):
      thread = threading.Thread(target=self.reset, daemon=True)
      thread.start()
      thread.join(timeout=0.2)  # blocks on the lock while the query holds it
    return out


def test_reset_between_search_and_chunk_lookup_cannot_break_a_query():
  store = _ResetDuringSearch(WordVocab(), BagOfWordsEmbedder(), chunk_length=4)
  retriever = Retriever(store.embedder, store.vocab, store, num_neighbors=2)
  service = RetroService(store, retriever, lambda p, n, r: {"text": "", "retrievals": [
      r.query_texts([p])[2][0]]}, model_name="test")
  with running_server(create_app(service)) as url:
    for kind in ("query", "generate"):
      store.armed = False
      assert _request(url + "/api/documents", {"documents": [
          {"text": "alpha clock rain", "title": "alpha"}]})[0] == 200
      store.armed = True
      if kind == "query":
        status, _, body = _request(url + "/api/query", {"text": "clock rain"}, timeout=10)
        hits = body.get("neighbors")
      else:
        status, _, body = _request(url + "/api/generate", {"prompt": "clock rain"},
                                   timeout=10)
        hits = body.get("retrievals", [[]])[0]
      assert status == 200, (kind, body)
      assert hits and hits[0]["title"] == "alpha" and "alpha" in hits[0]["text"]
      time.sleep(0.3)  # the reset went through after the query
      assert store.num_docs == 0


# Item 7: a streamed body is cut off at the limit ------------------------------------

_SERVER = """
import sys
import uvicorn
from retro_jax.serving.app import create_app
from test_serving_api import _service
uvicorn.run(create_app(_service(), max_request_bytes=1 << 20), host="127.0.0.1",
            port=int(sys.argv[1]), log_level="warning")
"""


def _proc_kib(pid, field):
  with open(f"/proc/{pid}/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1])
  raise KeyError(field)


def _stream_chunked(port, total_bytes, piece=1 << 16, deadline_s=60.0):
  """POSTs a chunked body of up to ``total_bytes`` generated piece by piece (never held
  whole); stops sending when the server answers. Returns (status, bytes sent, seconds)."""
  sock = socket.create_connection(("127.0.0.1", port), timeout=10)
  start = time.monotonic()
  sock.sendall(f"POST /api/documents HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
               "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
  sock.setblocking(False)
  frame = b"%x\r\n" % piece + b"a" * piece + b"\r\n"
  pending, sent, sending, response = b"", 0, True, b""
  try:
    while time.monotonic() - start < deadline_s and b"\r\n" not in response:
      readable, writable, _ = select.select([sock], [sock] if sending else [], [], 1.0)
      if readable:
        try:
          data = sock.recv(65536)
        except ConnectionResetError:
          break
        if not data:
          break
        response += data
      elif writable:
        if not pending:
          if sent >= total_bytes + piece:  # the terminator went out: now only read
            sending = False
            continue
          # One frame at a time (the last one is the terminating empty chunk).
          pending = frame if sent < total_bytes else b"0\r\n\r\n"
          sent += piece
        try:
          n = sock.send(pending)
        except (BrokenPipeError, ConnectionResetError):
          sending = False
          continue
        pending = pending[n:]
    elapsed = time.monotonic() - start
  finally:
    sock.close()
  status = int(response.split(b" ")[1]) if response.startswith(b"HTTP/1.1 ") else None
  return status, min(sent, total_bytes), elapsed


@pytest.fixture
def subprocess_server():
  port = free_port()
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [TESTS_DIR, REPO, os.environ.get("PYTHONPATH", "")]), JAX_PLATFORMS="cpu")
  proc = subprocess.Popen([sys.executable, "-c", _SERVER, str(port)], env=env, cwd=REPO,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  try:
    deadline = time.monotonic() + 60
    while True:
      if proc.poll() is not None:
        raise RuntimeError(f"server exited: {proc.stderr.read().decode()[-2000:]}")
      try:
        if _request(f"http://127.0.0.1:{port}/api/status", timeout=2)[0] == 200:
          break
      except OSError:
        pass
      if time.monotonic() > deadline:
        raise TimeoutError("server did not start")
      time.sleep(0.1)
    yield proc, port
  finally:
    proc.terminate()
    try:
      proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait(timeout=10)


def test_streamed_body_over_the_limit_is_cut_off(subprocess_server):
  proc, port = subprocess_server
  url = f"http://127.0.0.1:{port}"
  rss_before = _proc_kib(proc.pid, "VmRSS")
  total = 100 << 20  # 100 MiB offered against a 1 MiB limit
  status, sent, seconds = _stream_chunked(port, total)
  peak = _proc_kib(proc.pid, "VmHWM")
  growth_mib = (peak - rss_before) / 1024
  print(f"\nbody limit: 413 after {sent / 2**20:.1f} MiB of {total >> 20} MiB sent "
        f"({seconds:.2f} s); server RSS {rss_before / 1024:.0f} MiB, peak "
        f"{peak / 1024:.0f} MiB (+{growth_mib:.1f} MiB)")
  assert status == 413
  assert sent < total // 4  # stopped long before the whole body
  assert growth_mib < 32
  # The server is still fine, and a body under the limit is still accepted.
  assert _request(url + "/api/documents", {"documents": [{"text": "small doc"}]})[0] == 200
  assert _request(url + "/api/status")[2]["num_docs"] == 1


# Item 8: Host / Origin without a token --------------------------------------------------


def test_wrong_host_or_origin_is_refused_without_a_token():
  with running_server(create_app(_service())) as url:
    port = int(url.rsplit(":", 1)[1])
    doc = {"documents": [{"text": "clock rain"}]}
    # DNS rebinding: the page's own name in Host.
    assert _request(url + "/api/documents", doc, {"Host": f"evil.example:{port}"})[0] == 403
    assert _request(url + "/api/reset", {}, {"Host": "evil.example"})[0] == 403
    assert _request(url + "/api/status", headers={"Host": f"attacker.test:{port}"})[0] == 403
    # Cross-site post: a right Host, another page's Origin.
    assert _request(url + "/api/reset", {}, {"Origin": "http://evil.example"})[0] == 403
    assert _request(url + "/api/documents", doc, {"Origin": "null"})[0] == 403
    # The loopback names, with or without the page's Origin, are accepted.
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost"):
      assert _request(url + "/api/documents", doc, {"Host": host})[0] == 200, host
    status, _, body = _request(url + "/api/documents", doc, {
        "Host": f"127.0.0.1:{port}", "Origin": f"http://127.0.0.1:{port}"})
    assert status == 200 and body["num_docs"] == 4
    assert _request(url + "/api/reset", {}, {"Origin": f"http://localhost:{port}"})[0] == 200
    # The page itself still loads and talks to same-origin /api paths.
    page = urllib.request.urlopen(url + "/", timeout=10).read().decode()
    assert 'id="ask-btn"' in page and 'fetch(path' in page
  # The bound host is accepted; a known port must match.
  with running_server(create_app(_service(), host="retro.internal")) as url:
    assert _request(url + "/api/reset", {}, {"Host": "retro.internal:80"})[0] == 200
    assert _request(url + "/api/reset", {}, {"Host": "other.internal"})[0] == 403
  with running_server(create_app(_service(), port=1)) as url:
    assert _request(url + "/api/reset", {})[0] == 403  # Host names another port
    assert _request(url + "/api/reset", {}, {"Host": "127.0.0.1:1"})[0] == 200
  # With a token, the token decides (a public bind sees any host name).
  with running_server(create_app(_service(), token="t0k")) as url:
    assert _request(url + "/api/reset", {}, {"Host": "retro.example.org"})[0] == 401
    assert _request(url + "/api/reset", {}, {"Host": "retro.example.org",
                                             "Authorization": "Bearer t0k"})[0] == 200


# Item 9: bounded generate queue ----------------------------------------------------------


def test_full_generate_queue_gets_503_and_status_stays_fast():
  release = threading.Event()
  running = collections.Counter()

  def slow_generate(prompt, max_new_tokens, retriever):
    running["calls"] += 1
    release.wait(timeout=10)
    return {"text": prompt[:max_new_tokens], "retrievals": []}

  store = DocumentStore(WordVocab(), BagOfWordsEmbedder(), chunk_length=4)
  retriever = Retriever(store.embedder, store.vocab, store, num_neighbors=2)
  service = RetroService(store, retriever, slow_generate, model_name="slow")
  capacity, clients = 4, 50
  with running_server(create_app(service, max_pending_generates=capacity)) as url:
    assert _request(url + "/api/documents", {"documents": [{"text": "clock rain"}]})[0] == 200
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
      futures = [pool.submit(_request, url + "/api/generate",
                             {"prompt": f"p{i}", "max_new_tokens": 4}, None, 30)
                 for i in range(clients)]
      deadline = time.monotonic() + 5
      while (sum(f.done() for f in futures) < clients - capacity
             and time.monotonic() < deadline):
        time.sleep(0.02)
      status_ms, query_ms, side_codes = [], [], collections.Counter()
      for _ in range(10):
        for path, body, times in (("/api/status", None, status_ms),
                                  ("/api/query", {"text": "clock"}, query_ms)):
          start = time.perf_counter()
          try:
            side_codes[_request(url + path, body, timeout=2)[0]] += 1
          except OSError:  # timed out behind the queue
            side_codes["timeout"] += 1
          times.append((time.perf_counter() - start) * 1e3)
        if side_codes["timeout"]:
          break
      release.set()
      results = [f.result(timeout=30) for f in futures]
  codes = collections.Counter(status for status, _, _ in results)
  retry_after = [int(h["retry-after"]) for status, h, _ in results if status == 503]
  print(f"\ngenerate queue: {clients} generate calls, capacity {capacity}: codes "
        f"{dict(codes)}, Retry-After {sorted(set(retry_after))} s; while full /api/status "
        f"max {max(status_ms):.1f} ms, /api/query max {max(query_ms):.1f} ms")
  assert side_codes == {200: 20}, dict(side_codes)
  assert codes == {200: capacity, 503: clients - capacity}
  assert retry_after and all(r >= 1 for r in retry_after)
  assert max(status_ms) < 100 and max(query_ms) < 100
  assert running["calls"] == capacity
