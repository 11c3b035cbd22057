"""Command line: ``python -m fcnjax.serve MODEL [--port 8501] [--host 127.0.0.1] [--name NAME]``.

Serves MODEL over HTTP with TensorFlow Serving's REST API (:mod:`fcnjax.serving.api`), so a
TF-Serving client works unchanged::

    GET  /v1/models/NAME                  -> {"model_version_status": [{"version": "1",
                                              "state": "AVAILABLE", ...}]}
    GET  /v1/models/NAME/metadata         -> task, class names, input / output conventions
    POST /v1/models/NAME:predict          {"instances": [image, ...]} -> {"predictions": [...]}
                                          {"inputs": batch}           -> {"outputs": [...]}
    GET  /healthz                         -> {"status": "ok"}

An image is nested lists of pixel values (H, W, 3) 0..255 (grey (H, W) and RGBA accepted) or
``{"b64": "<base64 PNG / JPEG>"}``. A classifier answers class probabilities per image; a
segmenter a class map per image (nested lists (H, W), or ``{"b64": "<PNG>"}`` with
``"output": "png"`` in the request). Images of different sizes in one request are run as one
batch per size.

MODEL is an exported artifact (``python -m fcnjax.export WEIGHTS OUT``: serving it imports
neither flax nor the training code), a training workdir (``--step N`` picks a checkpoint) or a
weights file. NAME defaults to MODEL's file name without its suffix.

The first line on stdout is ``serving NAME on http://HOST:PORT`` (with ``--port 0`` the port
the system chose), printed once the model is loaded and the socket is listening. SIGTERM or
SIGINT drains: no new connections, the requests in flight complete, exit status 0 (1 if some
were still running after ``--drain-timeout-s``; a second signal, a second or more after the
first, exits at once with status 1).
A MODEL that cannot be loaded, or a port that cannot be bound, prints ``error: ...`` on stderr
and exits with status 1.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import signal
import sys
import threading
import time

from fcnjax import compilation

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
FORCE_AFTER_S = 1.0
"""A second SIGTERM / SIGINT later than this after the first exits at once (status 1)."""


def _one_line(e: BaseException) -> str:
  return " ".join(str(e).split()) or type(e).__name__


def _name(text: str) -> str:
  if not NAME_PATTERN.match(text) or ":" in text:
    raise argparse.ArgumentTypeError(f"{text!r}: a model name is letters, digits, '.', '_' "
                                     "and '-' (starting with a letter or digit)")
  return text


def default_name(model_path) -> str:
  """MODEL's file or folder name without its suffix, made URL-safe (``"default"`` if empty)."""
  p = pathlib.Path(model_path).expanduser()
  stem = p.name if p.is_dir() else p.stem
  stem = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-._")
  return stem or "default"


def _positive(kind):
  def parse(text):
    try:
      v = kind(text)
    except ValueError:
      v = -1
    if not v > 0:
      raise argparse.ArgumentTypeError(f"{text!r}: expected a number > 0")
    return v
  return parse


def _non_negative_float(text):
  try:
    v = float(text)
  except ValueError:
    v = -1.0
  if not v >= 0:
    raise argparse.ArgumentTypeError(f"{text!r}: expected a number >= 0")
  return v


def _port(text):
  try:
    v = int(text)
  except ValueError:
    v = -1
  if not 0 <= v <= 65535:
    raise argparse.ArgumentTypeError(f"{text!r}: a port is 0..65535 (0: any free port)")
  return v


def _sizes(text):
  sizes = []
  for part in filter(None, (t.strip() for t in text.split(","))):
    m = re.fullmatch(r"(\d+)x(\d+)", part)
    if not m or min(int(m[1]), int(m[2])) < 1:
      raise argparse.ArgumentTypeError(f"{part!r}: give sizes as HxW, comma-separated")
    sizes.append((int(m[1]), int(m[2])))
  return sizes


def _parser() -> argparse.ArgumentParser:
  from fcnjax.serving.server import ServerConfig
  d = ServerConfig()
  p = argparse.ArgumentParser(prog="python -m fcnjax.serve", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("model", metavar="MODEL",
                 help="an exported artifact, a training workdir or a weights file")
  p.add_argument("--port", type=_port, default=d.port, help=f"TCP port (default {d.port}; 0: "
                 "a free one, printed on the first line)")
  p.add_argument("--host", default=d.host, help=f"address to listen on (default {d.host})")
  p.add_argument("--name", type=_name, default=None,
                 help="the model's name in the URLs (default: MODEL's name without suffix)")
  p.add_argument("--step", type=int, default=None, help="checkpoint step of a workdir")
  p.add_argument("--threads", type=_positive(int), default=d.threads,
                 help=f"worker threads = connections served at once (default {d.threads})")
  p.add_argument("--max-body-mb", type=_positive(float), default=d.max_body_bytes / (1 << 20),
                 help="largest request body in MiB (default %(default)g; larger: 413)")
  p.add_argument("--max-pixels", type=_positive(int), default=d.max_pixels,
                 help="most image pixels in one request (default %(default)d; more: 413)")
  p.add_argument("--batch-window-ms", type=_non_negative_float, default=d.batch_window_ms,
                 help="batch concurrent requests of one image size for up to this long "
                      "(default 0: off)")
  p.add_argument("--max-batch", type=_positive(int), default=d.max_batch,
                 help=f"most images in one batched call (default {d.max_batch})")
  p.add_argument("--request-timeout-s", type=_positive(float), default=d.request_timeout_s,
                 help="close idle or stalled connections after this long (default %(default)g)")
  p.add_argument("--drain-timeout-s", type=_positive(float), default=30.0,
                 help="on SIGTERM, wait this long for requests in flight (default %(default)g)")
  p.add_argument("--warmup", type=_sizes, default=[],
                 help="compile the programs for these sizes before serving (e.g. "
                      "128x128,30x300): batch 1, and with batching every padded batch size")
  p.add_argument("--access-log", action="store_true", help="log every request on stderr")
  p.add_argument("--compile-cache", default=compilation.DEFAULT_CACHE_DIR,
                 help="JAX persistent compilation cache folder ('' = off; "
                      "$JAX_COMPILATION_CACHE_DIR wins)")
  return p


def _error(message: str) -> int:
  print(f"error: {message}", file=sys.stderr, flush=True)
  return 1


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  stop = threading.Event()
  first = []

  def on_signal(signum, _frame):
    # a second signal gives up draining; one within FORCE_AFTER_S of the first does not (tools
    # such as timeout(1) deliver a signal to the process and to its group)
    if first and time.monotonic() - first[0] > FORCE_AFTER_S:
      os._exit(1)
    first.append(time.monotonic())
    stop.set()

  signal.signal(signal.SIGTERM, on_signal)  # before loading: a signal then stops it cleanly
  signal.signal(signal.SIGINT, on_signal)
  compilation.enable_persistent_cache(args.compile_cache)
  from fcnjax.serving import models
  from fcnjax.serving.server import ModelServer, ServerConfig

  t0 = time.perf_counter()
  try:
    model = models.open_model(args.model, step=args.step)
  except (ValueError, OSError) as e:  # ExportError, ModelLoadError, WeightsError are ValueErrors
    return _error(_one_line(e))
  from fcnjax.serving.batching import batch_rows
  rows = batch_rows(args.max_batch) if args.batch_window_ms > 0 else (1,)
  try:
    model.warmup(args.warmup, rows)
  except ValueError as e:
    return _error(f"--warmup: {_one_line(e)}")
  name = args.name or default_name(args.model)
  config = ServerConfig(host=args.host, port=args.port, name=name, threads=args.threads,
                        max_body_bytes=int(args.max_body_mb * (1 << 20)),
                        max_pixels=args.max_pixels, batch_window_ms=args.batch_window_ms,
                        max_batch=args.max_batch, request_timeout_s=args.request_timeout_s,
                        access_log=args.access_log)
  server = ModelServer(model, config)
  try:
    server.start()
  except OSError as e:
    return _error(f"cannot listen on {args.host}:{args.port}: {_one_line(e)}")
  print(f"serving {name} on {server.url}", flush=True)
  print(f"{model.task} model, {model.num_classes} classes, from {model.source} {model.path} "
        f"({time.perf_counter() - t0:.1f} s); POST {server.url}/v1/models/{name}:predict",
        flush=True)
  while not stop.wait(1.0):
    pass
  print("draining: no new connections, finishing the requests in flight", flush=True)
  ok = server.drain(args.drain_timeout_s)
  print("stopped" if ok else f"stopped with requests still running after "
        f"{args.drain_timeout_s:g} s", flush=True)
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
