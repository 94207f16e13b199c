"""Helpers for service tests: a real uvicorn server on a free loopback port."""

import contextlib
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import uvicorn


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@contextlib.contextmanager
def running_server(app):
  port = free_port()
  server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
  thread = threading.Thread(target=server.run, daemon=True)
  thread.start()
  deadline = time.time() + 30
  while not server.started:
    if time.time() > deadline:
      raise TimeoutError("uvicorn did not start")
    time.sleep(0.05)
  try:
    yield f"http://127.0.0.1:{port}"
  finally:
    server.should_exit = True
    thread.join(timeout=10)


def call(url, body=None, token=None, raw=None, timeout=60):
  """(status, json) of a GET (body None) or POST request."""
  data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
  request = urllib.request.Request(url, data=data, method="GET" if data is None else "POST")
  request.add_header("Content-Type", "application/json")
  if token:
    request.add_header("Authorization", f"Bearer {token}")
  try:
    with urllib.request.urlopen(request, timeout=timeout) as response:
      return response.status, json.loads(response.read())
  except urllib.error.HTTPError as e:
    return e.code, json.loads(e.read() or b"{}")
