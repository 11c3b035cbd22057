"""HTTP serving throughput and latency: ``python -m fcnjax.serve`` under load on loopback.

    python -m benchmarks.serve --out benchmarks/results/serve-cpu.json
    python -m benchmarks.serve --seconds 3 --concurrency 1,4,16 --batch-window-ms 0,5

Models (random init: throughput does not depend on the weights, only on the architecture):

* ``classifier``: :func:`fcnjax.models.fcn_classifier` with its defaults (the Keras tutorial's
  conv stack, widths 32..512, max pooling), 5 classes; images 30 x 300 (the tutorial's strips).
* ``fcn8s``: the default model of ``python -m fcnjax.experiments.voc_fcn8s`` (aligned FCN-8s at
  1/8 of VGG16's widths, 21 classes), its score layers random (zero ones would take the
  artifact's cheaper all-equal-kernel path); images 128 x 128.

Each is exported (``export_model``, CPU), then served by a ``python -m fcnjax.serve`` subprocess
(``--threads`` >= the largest concurrency, warmed up at its image size). The load generator
(:func:`load`) runs C client threads on this machine, each with its own **keep-alive**
``http.client`` connection, each sending the same pre-encoded request, one image as nested JSON
lists (what a TF-Serving client sends; ``--encoding b64`` for a PNG), one request at a time, for
``--seconds``; a warm-up (``--warmup-requests`` per thread, not timed) runs first. Reported per
cell: requests/s (completed / wall), latency p50 / p99 (client-side, request sent to response
read), errors. The client reads each answer's bytes (checking 200) but parses only the warm-up's
JSON, so its own CPU use stays small; it still shares the cores with the server.

Output: a markdown table on stdout and JSON (``--out``).
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
#: model -> (image (H, W), how it is built)
MODELS = {"classifier": (30, 300), "fcn8s": (128, 128)}
DESCRIPTIONS = {
    "classifier": "fcn_classifier(5) (tutorial conv stack 32..512, max pool), random init",
    "fcn8s": "FCN-8s aligned x1/8, 21 classes (voc_fcn8s default), random init",
}


# ---------------------------------------------------------------------------------------------
# Load generator


def percentile(values, q: float) -> float:
  """The ``q``-th percentile (0..100) of ``values``, linear interpolation (NaN if empty)."""
  return float(np.percentile(np.asarray(values, np.float64), q)) if len(values) else float("nan")


def load(host: str, port: int, path: str, body: bytes, *, concurrency: int, seconds: float,
         warmup_requests: int = 2) -> dict:
  """Drive ``POST path`` with ``concurrency`` keep-alive clients for ``seconds``.

  Returns ``requests`` (completed in the timed window), ``errors`` (non-200 answers or failed
  connections), ``wall_s``, ``requests_per_s``, ``p50_ms``, ``p99_ms``, ``mean_ms``. Warm-up
  requests (``warmup_requests`` per client, all clients at once) are excluded."""
  headers = {"Content-Type": "application/json"}
  barrier = threading.Barrier(concurrency + 1)
  stop_at = [0.0]
  results = [None] * concurrency

  failures = []

  def client(i):
    lat, errors = [], 0
    conn = http.client.HTTPConnection(host, port, timeout=300)
    try:
      for _ in range(warmup_requests):
        conn.request("POST", path, body=body, headers=headers)
        r = conn.getresponse()
        data = r.read()
        if r.status != 200:
          raise RuntimeError(f"warm-up answer {r.status}: {data[:300]!r}")
      barrier.wait()
      barrier.wait()  # the main thread has set stop_at
      while time.perf_counter() < stop_at[0]:
        t0 = time.perf_counter()
        try:
          conn.request("POST", path, body=body, headers=headers)
          r = conn.getresponse()
          r.read()
          ok = r.status == 200
        except (OSError, http.client.HTTPException):
          ok = False
          conn.close()
          conn = http.client.HTTPConnection(host, port, timeout=300)
        if ok:
          lat.append(time.perf_counter() - t0)
        else:
          errors += 1
    except threading.BrokenBarrierError:
      pass
    except Exception as e:  # noqa: BLE001 -- reported by the main thread
      failures.append(f"client {i}: {type(e).__name__}: {e}")
      barrier.abort()
    finally:
      conn.close()
      results[i] = (lat, errors)

  threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(concurrency)]
  for t in threads:
    t.start()
  try:
    barrier.wait()          # every client warmed up
    t0 = time.perf_counter()
    stop_at[0] = t0 + seconds
    barrier.wait()
  except threading.BrokenBarrierError:
    for t in threads:
      t.join()
    raise RuntimeError("; ".join(failures) or "a client failed") from None
  for t in threads:
    t.join()
  wall = time.perf_counter() - t0
  if failures:
    raise RuntimeError("; ".join(failures))
  lat = [x for r in results for x in r[0]]
  errors = sum(r[1] for r in results)
  return {"concurrency": concurrency, "requests": len(lat), "errors": errors,
          "wall_s": wall, "requests_per_s": len(lat) / wall,
          "p50_ms": 1e3 * percentile(lat, 50), "p99_ms": 1e3 * percentile(lat, 99),
          "mean_ms": 1e3 * float(np.mean(lat)) if lat else float("nan")}


# ---------------------------------------------------------------------------------------------
# Models, server


def build(name: str):
  """The :class:`~fcnjax.inference.loading.LoadedModel` of a benchmark model."""
  import jax.numpy as jnp
  from fcnjax import preprocessing, weights
  from fcnjax.data.palette import VOC_PALETTE
  from fcnjax.inference.loading import LoadedModel, default_class_names
  palette = np.asarray(VOC_PALETTE, np.uint8)
  if name == "classifier":
    from fcnjax.models import fcn_classifier
    model = fcn_classifier(5, seed=0)
    model.eval()
    model.preprocessing = preprocessing.CAFFE
    return LoadedModel(model, default_class_names(5), palette, preprocessing.CAFFE,
                       DESCRIPTIONS[name], {"model": "fcn_classifier"})
  from fcnjax.models import build_model
  model = build_model("fcn8s", 21, width_multiplier=1 / 8, aligned=True, seed=0)
  rng = np.random.default_rng(1)
  for head in [model.score_fr, *model.score_skips]:
    head.conv.kernel.set_value(jnp.asarray(rng.normal(0, 0.01, head.conv.kernel.shape),
                                           jnp.float32))
  model.eval()
  return LoadedModel(model, default_class_names(21), palette, model.preprocessing,
                     DESCRIPTIONS[name], weights.describe(model))


def request_body(hw, encoding: str, seed: int = 0) -> bytes:
  """One random RGB image of size ``hw`` as a TF-Serving ``{"instances": [...]}`` body."""
  rgb = np.random.default_rng(seed).integers(0, 256, (*hw, 3), dtype=np.uint8)
  if encoding == "b64":
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    instance = {"b64": base64.b64encode(buf.getvalue()).decode()}
  else:
    instance = rgb.tolist()
  return json.dumps({"instances": [instance]}).encode()


class ServerProcess:
  """``python -m fcnjax.serve ARTIFACT --port 0 ...`` (the port from its first stdout line)."""

  def __init__(self, artifact, name: str, flags):
    self.proc = subprocess.Popen(
        [sys.executable, "-m", "fcnjax.serve", str(artifact), "--port", "0", "--name", name,
         *flags], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO)
    line = self.proc.stdout.readline()
    if " on http://" not in line:
      self.proc.kill()
      raise RuntimeError(f"the server did not start: {line!r}")
    self.port = int(line.rsplit(":", 1)[1])

  def stop(self) -> int:
    self.proc.send_signal(signal.SIGTERM)
    try:
      return self.proc.wait(60)
    except subprocess.TimeoutExpired:
      self.proc.kill()
      return self.proc.wait()


def measure(models, concurrencies, windows, *, seconds, warmup_requests, encoding, threads,
            workdir, log=print) -> list:
  from fcnjax.inference.export import export_model
  rows = []
  for name in models:
    hw = MODELS[name]
    artifact = pathlib.Path(workdir) / f"{name}.jaxexport"
    if not artifact.exists():
      t0 = time.perf_counter()
      export_model(build(name), artifact, platforms=("cpu",))
      log(f"{name}: exported in {time.perf_counter() - t0:.1f} s")
    body = request_body(hw, encoding)
    for window in windows:
      flags = ["--threads", str(threads), "--warmup", f"{hw[0]}x{hw[1]}",
               "--batch-window-ms", str(window)]
      server = ServerProcess(artifact, name, flags)
      try:
        path = f"/v1/models/{name}:predict"
        for c in concurrencies:
          r = load("127.0.0.1", server.port, path, body, concurrency=c, seconds=seconds,
                   warmup_requests=warmup_requests)
          r.update(model=name, image=f"{hw[0]}x{hw[1]}", batch_window_ms=window,
                   body_bytes=len(body), encoding=encoding)
          rows.append(r)
          log(f"{name} {hw[0]}x{hw[1]} window {window} ms, concurrency {c}: "
              f"{r['requests_per_s']:.1f} req/s, p50 {r['p50_ms']:.1f} ms, "
              f"p99 {r['p99_ms']:.1f} ms, {r['errors']} errors")
      finally:
        rc = server.stop()
        if rc != 0:
          log(f"warning: the {name} server exited with status {rc}")
  return rows


def markdown(report: dict) -> str:
  m = report["machine"]
  lines = [f"{m['cpu']} ({m['cpu_count']} cores, {m['platform']}), load "
           f"{m['loadavg_start'][0]:.2f} at start / {m['loadavg_end'][0]:.2f} at end; jax "
           f"{m['jax']}; {m['date']}; commit {m.get('git_commit') or '?'}; "
           f"{report['seconds']:g} s per cell after {report['warmup_requests']} warm-up requests "
           f"per client; keep-alive connections; `{report['command']}`", "",
           "| model | image | batch window ms | clients | requests/s | p50 ms | p99 ms | "
           "requests | errors | body KB |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for r in report["rows"]:
    lines.append(f"| {r['model']} | {r['image']} | {r['batch_window_ms']:g} | "
                 f"{r['concurrency']} | {r['requests_per_s']:.1f} | {r['p50_ms']:.1f} | "
                 f"{r['p99_ms']:.1f} | {r['requests']} | {r['errors']} | "
                 f"{r['body_bytes'] / 1024:.0f} |")
  return "\n".join(lines)


def _ints(text):
  return [int(t) for t in text.split(",") if t.strip()]


def _floats(text):
  return [float(t) for t in text.split(",") if t.strip()]


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m benchmarks.serve",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("--models", default=",".join(MODELS), help=f"subset of {', '.join(MODELS)}")
  p.add_argument("--concurrency", type=_ints, default=[1, 4, 16])
  p.add_argument("--batch-window-ms", type=_floats, default=[0.0],
                 help="server batch windows to try (0: no batching), comma-separated")
  p.add_argument("--seconds", type=float, default=5.0, help="timed seconds per cell")
  p.add_argument("--warmup-requests", type=int, default=2, help="per client, untimed")
  p.add_argument("--encoding", choices=("lists", "b64"), default="lists")
  p.add_argument("--threads", type=int, default=None,
                 help="server threads (default: the largest concurrency)")
  p.add_argument("--workdir", default=None, help="where the artifacts go (default: a temp dir)")
  p.add_argument("--out", help="JSON path")
  args = p.parse_args(argv)
  models = [m.strip() for m in args.models.split(",") if m.strip()]
  if any(m not in MODELS for m in models):
    print(f"error: --models: known {list(MODELS)}", file=sys.stderr)
    return 2
  from benchmarks.buckets import machine_info
  machine = machine_info()
  with tempfile.TemporaryDirectory() as tmp:
    rows = measure(models, args.concurrency, args.batch_window_ms, seconds=args.seconds,
                   warmup_requests=args.warmup_requests, encoding=args.encoding,
                   threads=args.threads or max(args.concurrency), workdir=args.workdir or tmp)
  machine["loadavg_end"] = list(os.getloadavg())
  report = {"machine": machine, "rows": rows, "seconds": args.seconds,
            "warmup_requests": args.warmup_requests, "models": {m: DESCRIPTIONS[m] for m in models},
            "command": "python -m benchmarks.serve " + " ".join(argv if argv is not None
                                                                 else sys.argv[1:])}
  print(markdown(report))
  if args.out:
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.out).write_text(json.dumps(report, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
