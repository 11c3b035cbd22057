"""The HTTP server: the REST API of :mod:`fcnjax.serving.api` over a bounded thread pool.

:class:`ModelServer` is an ``http.server.HTTPServer`` whose connections are handled by a
``concurrent.futures.ThreadPoolExecutor`` of ``threads`` workers (HTTP/1.1 keep-alive: a
connection holds its worker while it is open; an idle one is closed after
``request_timeout_s``; connections beyond ``threads`` wait for a free worker). Each request is
parsed, run (one model call per image size, or through the :class:`~fcnjax.serving.batching.
Batcher` when ``batch_window_ms > 0``) and answered with JSON.

Robustness: every error is an HTTP status with ``{"error": "..."}`` (400 malformed, 404 unknown
path / model, 405 wrong method, 411 no Content-Length, 413 body over ``max_body_bytes`` (from the
Content-Length, before reading the body) or images over ``max_pixels``, 500 for a bug, its
traceback logged on the server's stderr only); the server keeps serving.

:meth:`ModelServer.drain` (the CLI calls it on SIGTERM / SIGINT): stop accepting (the listening
socket is closed, so new connections are refused), close idle keep-alive connections, let the
requests in flight finish and answer (their connections then close), stop the workers.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import http.server
import json
import select
import socket
import sys
import threading
import time
import traceback

import fcnjax
from fcnjax.serving import api
from fcnjax.serving.batching import Batcher

MIB = 1 << 20
LINGER_BYTES = 16 * MIB
"""After an error answer to a request whose body was not read, read (and drop) at most this much
of it before closing, so the client sees the answer rather than a connection reset."""
LINGER_S = 2.0


@dataclasses.dataclass
class ServerConfig:
  """What :class:`ModelServer` needs besides the model."""

  host: str = "127.0.0.1"
  """Address to listen on (``0.0.0.0``: every interface)."""
  port: int = 8501
  """TCP port (0: a free one, see :attr:`ModelServer.port`)."""
  name: str = "default"
  """The model's name in the URLs (``/v1/models/NAME``)."""
  threads: int = 16
  """Worker threads (connections handled at once)."""
  max_body_bytes: int = 64 * MIB
  """Largest request body; a larger Content-Length is answered 413 without reading the body."""
  max_pixels: int = 1 << 25
  """Most pixels (H x W summed over images) one request may carry (413 beyond)."""
  batch_window_ms: float = 0.0
  """> 0: batch concurrent requests of one image size for up to this long (off by default)."""
  max_batch: int = 16
  """Most images in one batched model call."""
  request_timeout_s: float = 30.0
  """Socket timeout: an idle keep-alive connection, or a body that stalls, is closed after it."""
  access_log: bool = False
  """Log every request on stderr (errors are always logged)."""


class _ClientGone(Exception):
  """The client closed the connection or stalled: nothing can be answered."""


class _Handler(http.server.BaseHTTPRequestHandler):
  """One connection; ``self.server.app`` is the :class:`ModelServer`."""

  protocol_version = "HTTP/1.1"
  server_version = f"fcnjax-serve/{fcnjax.__version__}"
  sys_version = ""

  # --- connection lifecycle -----------------------------------------------------------------

  def setup(self):
    self.app = self.server.app
    self.timeout = self.app.config.request_timeout_s
    super().setup()
    self.app._register(self)

  def finish(self):
    try:
      super().finish()
    except OSError:
      pass
    finally:
      self.app._unregister(self)

  def handle_one_request(self):
    """``BaseHTTPRequestHandler.handle_one_request`` with a busy flag (for draining) and JSON
    answers to unknown methods."""
    try:
      self.raw_requestline = self.rfile.readline(65537)
      self.app._set_busy(self, True)
      if len(self.raw_requestline) > 65536:
        self.requestline = self.request_version = self.command = ""
        self.send_error(414)
        return
      if not self.raw_requestline:
        self.close_connection = True
        return
      if not self.parse_request():
        return
      method = getattr(self, "do_" + self.command, None)
      if method is None:
        self.close_connection = True
        self._send_json(501, api.error_body(f"unsupported method {self.command!r}"))
        return
      method()
      self.wfile.flush()
    except (TimeoutError, ConnectionError, _ClientGone):
      self.close_connection = True
    finally:
      self.app._set_busy(self, False)
      if self.app.draining:
        self.close_connection = True

  # --- answers ------------------------------------------------------------------------------

  def _send_json(self, status: int, obj, headers: dict | None = None) -> None:
    body = json.dumps(obj, separators=(",", ":")).encode()
    self._send(status, body, headers)

  def _send(self, status: int, body: bytes, headers: dict | None = None,
            head_only: bool = False) -> None:
    if self.app.draining:
      self.close_connection = True
    try:
      self.send_response(status)
      self.send_header("Content-Type", "application/json")
      self.send_header("Content-Length", str(len(body)))
      for k, v in (headers or {}).items():
        self.send_header(k, v)
      if self.close_connection:
        self.send_header("Connection", "close")
      self.end_headers()
      if not head_only:
        self.wfile.write(body)
    except OSError:
      raise _ClientGone() from None

  def send_error(self, code, message=None, explain=None):
    """The base class's error page, as JSON (bad request lines, headers too long, ...)."""
    self.close_connection = True
    if self.request_version == "HTTP/0.9":  # the line did not parse: answer with a status line
      self.request_version = "HTTP/1.0"
    try:
      phrase = self.responses.get(code, ("error",))[0]
    except AttributeError:
      phrase = "error"
    try:
      self._send_json(code, api.error_body(message or explain or phrase))
    except _ClientGone:
      pass

  def log_message(self, format, *args):  # noqa: A002 -- the base class's signature
    if self.app.config.access_log:
      super().log_message(format, *args)

  def log_error(self, format, *args):  # noqa: A002
    sys.stderr.write(f"{self.address_string()} - error: {format % args}\n")

  # --- methods ------------------------------------------------------------------------------

  def do_GET(self):
    self._dispatch()

  def do_POST(self):
    self._dispatch()

  def do_PUT(self):
    self._dispatch()

  def do_DELETE(self):
    self._dispatch()

  def do_PATCH(self):
    self._dispatch()

  def do_OPTIONS(self):
    self._dispatch()

  def do_HEAD(self):
    self.close_connection = True
    self._discard_body()
    try:
      api.route("GET", self.path, self.app.config.name)
      status, headers = 405, {"Allow": "GET"}
    except api.ApiError as e:
      status, headers = e.status, e.headers
    self._send(status, b"", headers, head_only=True)

  def _dispatch(self):
    app = self.app
    try:
      try:
        kind = api.route(self.command, self.path, app.config.name)
      except api.ApiError:
        self._discard_body()
        raise
      if kind == api.PREDICT:
        status, obj = 200, app.predict(self._read_body())
      else:
        self._discard_body()
        status, obj = app.get(kind)
      self._send_json(status, obj)
      app._count(status)
    except api.ApiError as e:
      app._count(e.status)
      self._send_json(e.status, api.error_body(e.message), e.headers)
      if self.close_connection and self._unread:
        self._linger()
    except _ClientGone:
      self.close_connection = True
    except Exception as e:  # noqa: BLE001 -- a bug: logged here, never sent to the client
      app._count(500)
      sys.stderr.write(f"error: {self.command} {self.path}: {type(e).__name__}: {e}\n"
                       f"{traceback.format_exc()}")
      self.close_connection = True
      self._send_json(500, api.error_body(f"internal server error ({type(e).__name__}); see "
                                          "the server's log"))

  # --- bodies -------------------------------------------------------------------------------

  _unread = 0

  def _content_length(self) -> int:
    """The request's Content-Length (0 without a body); ApiError 411 / 400 / 413."""
    te = self.headers.get("Transfer-Encoding")
    length = self.headers.get("Content-Length")
    if te is not None and te.strip().lower() != "identity":
      self.close_connection = True
      raise api.ApiError(411, "Transfer-Encoding bodies are not supported: send a "
                              "Content-Length")
    if length is None:
      return -1
    try:
      n = int(length)
      if n < 0:
        raise ValueError
    except ValueError:
      self.close_connection = True
      raise api.ApiError(400, f"bad Content-Length {length!r}") from None
    return n

  def _read_body(self) -> bytes:
    n = self._content_length()
    if n < 0:
      self.close_connection = True
      raise api.ApiError(411, "a predict request needs a Content-Length header")
    limit = self.app.config.max_body_bytes
    if n > limit:
      self.close_connection = True
      self._unread = n
      raise api.ApiError(413, f"the body is {n:,} bytes, over the limit of {limit:,} bytes "
                              "(the server's --max-body-mb)")
    try:
      data = self.rfile.read(n)
    except OSError:
      raise _ClientGone() from None
    if len(data) < n:
      raise _ClientGone()
    return data

  def _discard_body(self) -> None:
    """Read and drop the body of a request that has no use for one (keeps keep-alive in step);
    a too large or unsized one closes the connection instead."""
    try:
      n = self._content_length()
    except api.ApiError:
      n = -1
    if n <= 0:
      if n < 0 and self.headers.get("Transfer-Encoding"):
        self.close_connection = True
      return
    if n > self.app.config.max_body_bytes:
      self.close_connection = True
      self._unread = n
      return
    try:
      self.rfile.read(n)
    except OSError:
      raise _ClientGone() from None

  def _linger(self) -> None:
    """Half-close, then drop what the client still sends (bounded), so it reads the answer."""
    try:
      self.wfile.flush()
      self.connection.shutdown(socket.SHUT_WR)
      self.connection.settimeout(0.2)
      left, deadline = min(self._unread, LINGER_BYTES), time.monotonic() + LINGER_S
      while left > 0 and time.monotonic() < deadline:
        chunk = self.connection.recv(min(left, 1 << 16))
        if not chunk:
          break
        left -= len(chunk)
    except OSError:
      pass


class _PooledHTTPServer(http.server.HTTPServer):
  """``HTTPServer`` handing each accepted connection to a bounded thread pool."""

  allow_reuse_address = True
  request_queue_size = 128

  def __init__(self, address, app, threads: int):
    self.app = app
    self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=threads,
                                                      thread_name_prefix="fcnjax-serve")
    super().__init__(address, _Handler)

  def process_request(self, request, client_address):
    self.app._connection_queued()
    try:
      self.pool.submit(self._work, request, client_address)
    except RuntimeError:  # the pool is shut down: draining
      self.app._connection_done()
      self.shutdown_request(request)

  def _work(self, request, client_address):
    try:
      self.finish_request(request, client_address)
    except (ConnectionError, TimeoutError):
      pass
    except Exception:  # noqa: BLE001 -- logged; the connection is closed, the server goes on
      self.handle_error(request, client_address)
    finally:
      self.shutdown_request(request)
      self.app._connection_done()

  def handle_error(self, request, client_address):
    sys.stderr.write(f"error: connection from {client_address}:\n{traceback.format_exc()}")


class ModelServer:
  """Serve ``model`` (a :class:`~fcnjax.serving.models.ServedModel`) over HTTP.

  ``start()`` binds and starts accepting in a background thread (``port`` is then the bound
  port); ``drain(timeout_s)`` stops it (see the module doc) and returns whether every request
  in flight finished within the timeout.
  """

  def __init__(self, model, config: ServerConfig):
    self.model = model
    self.config = config
    self.draining = False
    self._lock = threading.Condition()
    self._connections = {}   # handler -> busy
    self._pending = 0        # connections accepted and not finished (queued or running)
    self._counts = {"ok": 0, "client_errors": 0, "server_errors": 0}
    self.batcher = None
    if config.batch_window_ms > 0:
      self.batcher = Batcher(model, window_s=config.batch_window_ms / 1000.0,
                             max_batch=config.max_batch)
    self._run = self.batcher or model
    self.httpd = None
    self._thread = None

  # --- lifecycle ----------------------------------------------------------------------------

  def start(self) -> "ModelServer":
    self.httpd = _PooledHTTPServer((self.config.host, self.config.port), self,
                                   self.config.threads)
    self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={
        "poll_interval": 0.1}, name="fcnjax-serve-accept", daemon=True)
    self._thread.start()
    return self

  @property
  def port(self) -> int:
    return int(self.httpd.server_address[1])

  @property
  def url(self) -> str:
    host = self.config.host if self.config.host not in ("", "0.0.0.0") else "127.0.0.1"
    return f"http://{host}:{self.port}"

  def drain(self, timeout_s: float = 30.0) -> bool:
    """Stop accepting, close idle connections, wait for the requests in flight; ``False`` if
    some were still running after ``timeout_s``."""
    with self._lock:
      self.draining = True
    self.httpd.shutdown()        # the accept loop stops ...
    self.httpd.server_close()    # ... and the socket closes: new connections are refused
    deadline = time.monotonic() + timeout_s
    while True:
      with self._lock:
        self._close_idle()
        if self._pending == 0:
          break
        left = deadline - time.monotonic()
        if left <= 0:
          return False
        self._lock.wait(min(left, 0.05))
    self.httpd.pool.shutdown(wait=True)
    return True

  def _close_idle(self) -> None:
    """Shut down connections waiting for a next request with nothing sent (lock held)."""
    for handler, busy in list(self._connections.items()):
      if busy:
        continue
      sock = handler.connection
      try:
        readable, _, _ = select.select([sock], [], [], 0)
        if not readable:
          sock.shutdown(socket.SHUT_RDWR)
      except (OSError, ValueError):
        pass

  def _connection_queued(self):
    with self._lock:
      self._pending += 1

  def _connection_done(self):
    with self._lock:
      self._pending -= 1
      self._lock.notify_all()

  def _register(self, handler):
    with self._lock:
      self._connections[handler] = False

  def _unregister(self, handler):
    with self._lock:
      self._connections.pop(handler, None)

  def _set_busy(self, handler, busy: bool):
    with self._lock:
      if handler in self._connections:
        self._connections[handler] = busy

  def _count(self, status: int):
    key = "ok" if status < 400 else "client_errors" if status < 500 else "server_errors"
    with self._lock:
      self._counts[key] += 1

  # --- the API ------------------------------------------------------------------------------

  def get(self, kind: str):
    """(status, body) of a GET route."""
    if kind == api.HEALTHZ:
      return (503, {"status": "draining"}) if self.draining else (200, {"status": "ok"})
    if kind == api.STATUS:
      return 200, api.status_body()
    info = self.model.info()
    with self._lock:
      counts = dict(self._counts)
    info["server"] = {
        "threads": self.config.threads, "max_body_bytes": self.config.max_body_bytes,
        "max_pixels": self.config.max_pixels,
        "batching": ({"window_ms": self.config.batch_window_ms,
                      "max_batch": self.config.max_batch, "batches": self.batcher.batches}
                     if self.batcher else None),
        "requests": counts, "jit_programs": self.model.jit_cache_size()}
    return 200, api.metadata_body(self.config.name, info)

  def predict(self, body: bytes) -> dict:
    """A predict request's body -> the response body (:class:`~fcnjax.serving.api.ApiError`
    for a bad request)."""
    m = self.model
    req = api.parse_predict(body, task=m.task, min_size=m.min_input_size,
                            max_pixels=self.config.max_pixels)
    outputs = api.run_by_size(req.images, self._run)
    preds = [api.prediction(o, m.task, req.output, m.palette) for o in outputs]
    return api.predict_body(preds, req.columnar)
