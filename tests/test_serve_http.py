"""``python -m fcnjax.serve`` over real HTTP: a server subprocess per model, urllib / http.client.

Two servers for the module (a tiny exported FCN-8s segmenter, unbatched; the stand-in exported
classifier of ``test_export_classifier``, with request batching on), started on 127.0.0.1 at a
port the system picks (``--port 0``, read from the first stdout line), plus one per shutdown
test. Answers are compared with the artifact run in this process.

Run as a script (``python tests/test_serve_http.py ARTIFACT``), this file serves ARTIFACT in
process, answers one request and prints the training / model modules the process imported (the
import test runs it so); nothing at its top imports fcnjax's training or model code.
"""

from __future__ import annotations

import base64
import concurrent.futures
import http.client
import io
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
#: Module prefixes a process serving an exported artifact must not import.
FORBIDDEN = ("fcnjax.train", "fcnjax.data", "fcnjax.models", "fcnjax.inference", "flax",
             "optax", "orbax", "grain")
SIZE = (16, 16)
"""The image size (H, W) of most requests (one compiled program, warmed up at start)."""
MAX_BODY_MB = 1


def _imported_forbidden() -> list:
  return sorted(m for m in sys.modules if any(m == f or m.startswith(f + ".") for f in FORBIDDEN))


def _serve_once(artifact: str) -> None:
  """The import check's subprocess: serve in process, answer one predict, list the imports."""
  import fcnjax.serve  # noqa: F401 -- the CLI module, as `python -m fcnjax.serve` imports it
  from fcnjax.serving import models
  from fcnjax.serving.server import ModelServer, ServerConfig

  server = ModelServer(models.open_model(artifact), ServerConfig(port=0, name="m")).start()
  body = json.dumps({"instances": [np.zeros((4, 4, 3), int).tolist()]}).encode()
  with urllib.request.urlopen(urllib.request.Request(
      f"{server.url}/v1/models/m:predict", data=body), timeout=120) as r:
    assert r.status == 200 and "predictions" in json.loads(r.read())
  assert server.drain(10)
  print(json.dumps(_imported_forbidden()))


if __name__ == "__main__":
  _serve_once(sys.argv[1])
  sys.exit(0)

import pytest  # noqa: E402 -- the script above needs none of the test machinery


# ---------------------------------------------------------------------------------------------
# Fixtures: artifacts and servers


def _tiny_segmenter_export(out: pathlib.Path):
  """Export a 1/16-width aligned FCN-8s with random He-normal kernels (numpy-drawn: see
  ``test_export_classifier.numpy_init``) and zero biases; each score head's class kernels sum
  to zero, so the features' common (ReLU, positive) mean cancels and no class wins everywhere."""
  import jax.numpy as jnp
  from fcnjax import weights
  from fcnjax.data.palette import VOC_PALETTE
  from fcnjax.inference import export as export_lib
  from fcnjax.inference.loading import LoadedModel, default_class_names
  from fcnjax.models import build_model
  from test_export_classifier import numpy_init

  model = numpy_init(lambda: build_model("fcn8s", 5, width_multiplier=1 / 16, aligned=True,
                                         seed=0), seed=1)
  for head in [model.score_fr, *model.score_skips]:
    k = np.asarray(head.conv.kernel[...])
    head.conv.kernel.set_value(jnp.asarray(k - k.mean(axis=(0, 1, 2), keepdims=True)))
  model.eval()
  loaded = LoadedModel(model, default_class_names(5), np.asarray(VOC_PALETTE, np.uint8),
                       model.preprocessing, "tiny fcn8s", weights.describe(model))
  export_lib.export_model(loaded, out, platforms=("cpu",))


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
  """name -> (artifact path, the artifact loaded in this process)."""
  from fcnjax.inference import export as export_lib
  from test_export_classifier import standin_loaded

  work = tmp_path_factory.mktemp("serve")
  seg, cls = work / "seg.jaxexport", work / "cls.jaxexport"
  _tiny_segmenter_export(seg)
  export_lib.export_model(standin_loaded(), cls, platforms=("cpu",))
  return {"seg": (seg, export_lib.load_exported(seg)),
          "cls": (cls, export_lib.load_exported(cls))}


class Server:
  """A ``python -m fcnjax.serve`` subprocess."""

  def __init__(self, model_path, name, work, *flags):
    self.name = name
    self.stderr_path = pathlib.Path(work) / f"{name}-{time.monotonic_ns()}.stderr"
    self._stderr = open(self.stderr_path, "w")
    self.proc = subprocess.Popen(
        [sys.executable, "-m", "fcnjax.serve", str(model_path), "--port", "0", "--name", name,
         "--max-body-mb", str(MAX_BODY_MB), *flags],
        stdout=subprocess.PIPE, stderr=self._stderr, text=True, cwd=REPO, env=dict(os.environ))
    self.first_line = self.proc.stdout.readline()
    prefix = f"serving {name} on http://127.0.0.1:"
    assert self.first_line.startswith(prefix), (self.first_line, self.stderr())
    self.port = int(self.first_line[len(prefix):])

  def stderr(self) -> str:
    return self.stderr_path.read_text()

  def stop(self):
    if self.proc.poll() is None:
      self.proc.send_signal(signal.SIGTERM)
      try:
        self.proc.wait(30)
      except subprocess.TimeoutExpired:
        self.proc.kill()
        self.proc.wait()
    self.proc.stdout.close()
    self._stderr.close()


@pytest.fixture(scope="module")
def seg(artifacts, tmp_path_factory):
  server = Server(artifacts["seg"][0], "seg", tmp_path_factory.mktemp("seg"),
                  "--warmup", "x".join(map(str, SIZE)))
  yield server
  server.stop()
  assert "Traceback" not in server.stderr(), server.stderr()


@pytest.fixture(scope="module")
def cls(artifacts, tmp_path_factory):
  server = Server(artifacts["cls"][0], "cls", tmp_path_factory.mktemp("cls"),
                  "--batch-window-ms", "50", "--max-batch", "8")
  yield server
  server.stop()
  assert "Traceback" not in server.stderr(), server.stderr()


# ---------------------------------------------------------------------------------------------
# Client helpers


def call(port, method, path, body=None, headers=None, timeout=120):
  """(status, JSON body or None, response headers) of one request on a new connection."""
  conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
  try:
    if isinstance(body, (dict, list)):
      body = json.dumps(body)
    conn.request(method, path, body=body, headers=headers or {})
    r = conn.getresponse()
    data = r.read()
    return r.status, (json.loads(data) if data else None), dict(r.getheaders())
  finally:
    conn.close()


def predict(server, body, **kw):
  return call(server.port, "POST", f"/v1/models/{server.name}:predict", body, **kw)


def _images(n, size=SIZE, seed=0):
  """(n, H, W, 3) uint8: random 4 x 4-pixel blocks (structure a random FCN tells apart, where
  its answer to i.i.d. pixel noise is the same class everywhere)."""
  h, w = size
  coarse = np.random.default_rng(seed).integers(0, 256, (n, -(-h // 4), -(-w // 4), 3))
  return coarse.repeat(4, 1).repeat(4, 2)[:, :h, :w].astype(np.uint8)


def _png_b64(rgb) -> str:
  from PIL import Image
  buf = io.BytesIO()
  Image.fromarray(rgb).save(buf, format="PNG")
  return base64.b64encode(buf.getvalue()).decode()


def _softmax(z):
  z = np.exp(z - z.max(-1, keepdims=True))
  return z / z.sum(-1, keepdims=True)


def _assert_alive(server):
  status, body, _ = call(server.port, "GET", f"/v1/models/{server.name}")
  assert status == 200 and body["model_version_status"][0]["state"] == "AVAILABLE"


# ---------------------------------------------------------------------------------------------
# Status, metadata, health


def test_status(seg):
  want = {"model_version_status": [{"version": "1", "state": "AVAILABLE",
                                    "status": {"error_code": "OK", "error_message": ""}}]}
  for path in ("/v1/models/seg", "/v1/models/seg/versions/1"):
    status, body, headers = call(seg.port, "GET", path)
    assert status == 200 and body == want
    assert headers["Content-Type"] == "application/json"


def test_healthz(seg):
  assert call(seg.port, "GET", "/healthz")[:2] == (200, {"status": "ok"})


def test_metadata(seg, cls):
  status, body, _ = call(seg.port, "GET", "/v1/models/seg/metadata")
  meta = body["metadata"]
  assert status == 200 and body["model_spec"] == {"name": "seg", "version": "1",
                                                  "signature_name": "serving_default"}
  assert meta["task"] == "segmentation" and meta["num_classes"] == 5
  assert meta["source"]["kind"] == "exported" and len(meta["palette"]) == 256
  assert meta["output"]["formats"] == ["classes", "png"]
  meta = call(cls.port, "GET", "/v1/models/cls/versions/1/metadata")[1]["metadata"]
  assert meta["task"] == "classification" and meta["class_names"] == ["cat", "dog", "bird"]
  assert meta["server"]["batching"]["max_batch"] == 8


# ---------------------------------------------------------------------------------------------
# Predict


def test_segmenter_lists_and_inputs(seg, artifacts):
  model = artifacts["seg"][1]
  images = _images(2)
  want = model(images).argmax(-1)
  assert len(np.unique(want)) > 1  # a non-trivial class map
  status, body, _ = predict(seg, {"instances": images.tolist()})
  assert status == 200 and list(body) == ["predictions"]
  np.testing.assert_array_equal(body["predictions"], want)
  status, body, _ = predict(seg, {"inputs": images[:1].tolist(),
                                  "signature_name": "serving_default"})
  assert status == 200 and list(body) == ["outputs"]
  np.testing.assert_array_equal(body["outputs"], want[:1])
  # the versioned URL, floats 0..255 (rounded) and a grey image broadcast to RGB
  grey = images[0, ..., 0]
  status, body, _ = call(seg.port, "POST", "/v1/models/seg/versions/1:predict",
                         {"instances": [(images[0] * 0.999 + 0.1).tolist(), grey.tolist()]})
  assert status == 200
  np.testing.assert_array_equal(body["predictions"][0], want[0])
  np.testing.assert_array_equal(body["predictions"][1],
                                model(np.repeat(grey[None, ..., None], 3, -1)).argmax(-1)[0])


def test_segmenter_b64_and_png_output(seg, artifacts):
  from PIL import Image
  model = artifacts["seg"][1]
  images = _images(2, seed=1)
  want = model(images).argmax(-1)
  status, body, _ = predict(seg, {"instances": [{"b64": _png_b64(im)} for im in images],
                                  "output": "png"})
  assert status == 200
  for pred, w in zip(body["predictions"], want):
    png = Image.open(io.BytesIO(base64.b64decode(pred["b64"])))
    assert png.format == "PNG" and png.mode == "P" and png.size == SIZE[::-1]
    np.testing.assert_array_equal(np.asarray(png), w)
  status, body, _ = predict(seg, {"inputs": [{"b64": _png_b64(images[1])}]})
  assert status == 200
  np.testing.assert_array_equal(body["outputs"][0], want[1])


def test_mixed_sizes_run_separately(seg, artifacts):
  model = artifacts["seg"][1]
  a, b = _images(1, seed=2)[0], _images(1, (12, 20), seed=3)[0]
  status, body, _ = predict(seg, {"instances": [a.tolist(), b.tolist(), a.tolist()]})
  assert status == 200
  preds = body["predictions"]
  assert np.asarray(preds[1]).shape == (12, 20)
  np.testing.assert_array_equal(preds[0], model(a[None]).argmax(-1)[0])
  np.testing.assert_array_equal(preds[1], model(b[None]).argmax(-1)[0])
  assert preds[2] == preds[0]


def test_same_shape_does_not_recompile(seg):
  def compiled():
    server = call(seg.port, "GET", "/v1/models/seg/metadata")[1]["metadata"]
    return server["shapes_compiled"], server["server"]["jit_programs"]

  body = {"instances": _images(1, seed=4).tolist()}
  assert predict(seg, body)[0] == 200
  before = compiled()
  for _ in range(3):
    assert predict(seg, body)[0] == 200
  assert compiled() == before


def test_classifier_probabilities(cls, artifacts):
  model = artifacts["cls"][1]
  images = _images(3, (9, 30), seed=5)
  want = _softmax(model(images).astype(np.float64))
  status, body, _ = predict(cls, {"instances": images.tolist()})
  assert status == 200
  got = np.asarray(body["predictions"])
  assert got.shape == (3, 3)
  np.testing.assert_allclose(got.sum(-1), 1, atol=1e-5)
  np.testing.assert_allclose(got, want, atol=1e-5)
  status, body, _ = predict(cls, {"inputs": {"images": [{"b64": _png_b64(im)} for im in images]}})
  assert status == 200
  np.testing.assert_allclose(body["outputs"], want, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Bad requests: a JSON error each, and the server goes on


GOOD = np.zeros((*SIZE, 3), int).tolist()
BAD_BODIES = [
    ("malformed JSON", b'{"instances": [', 400, "malformed JSON"),
    ("not an object", b"[1, 2, 3]", 400, "JSON object"),
    ("no instances", b'{"signature_name": "serving_default"}', 400, "exactly one"),
    ("empty instances", b'{"instances": []}', 400, "empty"),
    ("2 channels", json.dumps({"instances": [np.zeros((4, 4, 2), int).tolist()]}), 400,
     "2 channels"),
    ("5 channels", json.dumps({"inputs": [np.zeros((4, 4, 5), int).tolist()]}), 400,
     "5 channels"),
    ("rank 4 instance", json.dumps({"instances": [[GOOD]]}), 400, "shape (1, 16, 16, 3)"),
    ("ragged", b'{"instances": [[[[1, 2, 3]], [[1, 2, 3], [4, 5, 6]]]]}', 400, "ragged"),
    ("non-numeric", b'{"instances": [[[["x", 2, 3]]]]}', 400, "non-numeric"),
    ("out of range", b'{"instances": [[[[1, 2, 999]]]]}', 400, "0..255"),
    ("undecodable b64", b'{"instances": [{"b64": "bm90IGFuIGltYWdl"}]}', 400, "not an image"),
    ("bad output", json.dumps({"instances": [GOOD], "output": "jpeg"}), 400, "'png'"),
    ("not UTF-8", b"\xff\xfe{}", 400, "UTF-8"),
]


@pytest.mark.parametrize("body, status, words", [c[1:] for c in BAD_BODIES],
                         ids=[c[0] for c in BAD_BODIES])
def test_bad_bodies(seg, body, status, words):
  got, answer, headers = predict(seg, body)
  assert got == status and set(answer) == {"error"} and words in answer["error"], answer
  assert headers["Content-Type"] == "application/json"
  _assert_alive(seg)


@pytest.mark.parametrize("method, path, status", [
    ("GET", "/v1/models/other", 404), ("POST", "/v1/models/other:predict", 404),
    ("GET", "/v1/models/seg/versions/3", 404), ("GET", "/nowhere", 404),
    ("GET", "/v1/models/seg:predict", 405), ("PUT", "/v1/models/seg", 405),
    ("POST", "/healthz", 405), ("DELETE", "/v1/models/seg:predict", 405)])
def test_bad_paths_and_methods(seg, method, path, status):
  got, answer, headers = call(seg.port, method, path, body=b'{"x": 1}' if method != "GET" else None)
  assert got == status and set(answer) == {"error"}
  if status == 405:
    assert headers["Allow"] in ("GET", "POST")
  _assert_alive(seg)


def test_body_over_the_limit_is_413_before_reading_it(seg):
  conn = http.client.HTTPConnection("127.0.0.1", seg.port, timeout=30)
  conn.putrequest("POST", "/v1/models/seg:predict")
  conn.putheader("Content-Length", str(50 * MAX_BODY_MB << 20))  # announced, never sent
  conn.endheaders()
  r = conn.getresponse()
  assert r.status == 413 and "limit" in json.loads(r.read())["error"]
  conn.close()
  # a body actually sent, over the limit: the answer still arrives
  body = b'{"instances": [' + b" " * ((MAX_BODY_MB << 20) + 1000) + b"]}"
  status, answer, _ = predict(seg, body)
  assert status == 413 and "--max-body-mb" in answer["error"]
  _assert_alive(seg)


def test_no_content_length_and_odd_requests(seg):
  conn = http.client.HTTPConnection("127.0.0.1", seg.port, timeout=30)
  conn.putrequest("POST", "/v1/models/seg:predict")
  conn.endheaders()
  r = conn.getresponse()
  assert r.status == 411 and "Content-Length" in json.loads(r.read())["error"]
  conn.close()
  for raw, want in ((b"BREW /healthz HTTP/1.1\r\nHost: x\r\n\r\n", b" 501 "),
                    (b"GET /healthz HTTP/2.0\r\n\r\n", b" 505 "),
                    (b"\x00\x01\x02 garbage\r\n\r\n", b" 400 ")):
    with socket.create_connection(("127.0.0.1", seg.port), timeout=30) as s:
      s.sendall(raw)
      data = b""
      while chunk := s.recv(65536):
        data += chunk
    assert want in data.split(b"\r\n", 1)[0] + b" ", data
    assert b"Traceback" not in data
  _assert_alive(seg)


# ---------------------------------------------------------------------------------------------
# Concurrency


def _concurrent(server, bodies):
  with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
    return list(pool.map(lambda b: predict(server, b), bodies))


def test_16_concurrent_clients(seg, artifacts):
  images = _images(16, seed=6)
  want = artifacts["seg"][1](images).argmax(-1)
  answers = _concurrent(seg, [{"instances": [im.tolist()]} for im in images])
  for (status, body, _), w in zip(answers, want):
    assert status == 200
    np.testing.assert_array_equal(body["predictions"][0], w)


def test_16_concurrent_clients_batched(cls, artifacts):
  images = _images(16, (9, 30), seed=7)
  want = _softmax(artifacts["cls"][1](images).astype(np.float64))
  batches = call(cls.port, "GET", "/v1/models/cls/metadata")[1]["metadata"]["server"][
      "batching"]["batches"]
  answers = _concurrent(cls, [{"instances": [im.tolist()]} for im in images])
  for (status, body, _), w in zip(answers, want):
    assert status == 200
    np.testing.assert_allclose(body["predictions"][0], w, atol=1e-5)
  after = call(cls.port, "GET", "/v1/models/cls/metadata")[1]["metadata"]["server"][
      "batching"]["batches"]
  assert 2 <= after - batches < 16  # max batch 8: at least 2 batches, fewer than 16 calls


# ---------------------------------------------------------------------------------------------
# Imports and shutdown


def test_serving_an_artifact_imports_no_training_code(artifacts):
  proc = subprocess.run([sys.executable, __file__, str(artifacts["cls"][0])], cwd=REPO,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert json.loads(proc.stdout.strip().splitlines()[-1]) == []


def test_sigterm_drains_in_flight_requests(artifacts, tmp_path):
  server = Server(artifacts["seg"][0], "seg", tmp_path)
  try:
    idle = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    idle.request("GET", "/healthz")  # a keep-alive connection left open: must not hold the exit
    assert idle.getresponse().read()
    images = _images(4, (40, 44), seed=8)  # a new shape: compiling keeps it in flight
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
      future = pool.submit(predict, server, {"instances": images.tolist()})
      time.sleep(0.5)
      t0 = time.monotonic()
      server.proc.send_signal(signal.SIGTERM)
      status, body, headers = future.result(timeout=60)
    assert status == 200 and headers.get("Connection") == "close"
    np.testing.assert_array_equal(body["predictions"],
                                  artifacts["seg"][1](images).argmax(-1))
    assert server.proc.wait(20) == 0
    assert time.monotonic() - t0 < 15  # the idle connection was closed, not waited for
    with pytest.raises(OSError):
      call(server.port, "GET", "/healthz", timeout=5)
    out = server.proc.stdout.read()
    assert "draining" in out and "stopped" in out, out
    assert "Traceback" not in server.stderr(), server.stderr()
  finally:
    server.stop()
