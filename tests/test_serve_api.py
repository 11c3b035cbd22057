"""The serving API's pure parts: routes, request parsing, responses, images, batching.

No model and no server: these run in a second.
"""

from __future__ import annotations

import base64
import io
import json
import threading

import numpy as np
import pytest
from PIL import Image

from fcnjax.serving import api
from fcnjax.serving import images as images_lib
from fcnjax.serving.batching import Batcher, batch_rows, padded_rows

SEG, CLS = api.SEGMENTATION, api.CLASSIFICATION


def _body(obj) -> bytes:
  return json.dumps(obj).encode()


def _png_b64(rgb: np.ndarray, mode=None) -> str:
  buf = io.BytesIO()
  Image.fromarray(rgb, mode=mode).save(buf, format="PNG")
  return base64.b64encode(buf.getvalue()).decode()


def _error(status, fn, *args, **kwargs) -> str:
  with pytest.raises(api.ApiError) as e:
    fn(*args, **kwargs)
  assert e.value.status == status, (e.value.status, e.value.message)
  return e.value.message


# --- routes -----------------------------------------------------------------------------------


@pytest.mark.parametrize("method, path, kind", [
    ("GET", "/healthz", api.HEALTHZ),
    ("GET", "/v1/models/m", api.STATUS),
    ("GET", "/v1/models/m/", api.STATUS),
    ("GET", "/v1/models/m/versions/1", api.STATUS),
    ("GET", "/v1/models/m/metadata", api.METADATA),
    ("GET", "/v1/models/m/versions/1/metadata?x=1", api.METADATA),
    ("POST", "/v1/models/m:predict", api.PREDICT),
    ("POST", "/v1/models/m/versions/1:predict", api.PREDICT),
])
def test_routes(method, path, kind):
  assert api.route(method, path, "m") == kind


@pytest.mark.parametrize("method, path, status, words", [
    ("GET", "/", 404, "no such path"),
    ("GET", "/v1/models/other", 404, "other"),
    ("POST", "/v1/models/other:predict", 404, "'m'"),
    ("GET", "/v1/models/m/versions/2", 404, "version 1 only"),
    ("POST", "/v1/models/m/versions/7:predict", 404, "version 1 only"),
    ("POST", "/v1/models/m:classify", 404, ":predict"),
    ("GET", "/v1/models/m/labels/stable", 404, "labels"),
    ("GET", "/v1/models/m/whatever", 404, "no such path"),
    ("GET", "/v1/models/m:predict", 405, "POST"),
    ("POST", "/healthz", 405, "GET"),
    ("DELETE", "/v1/models/m", 405, "GET"),
])
def test_route_errors(method, path, status, words):
  message = _error(status, api.route, method, path, "m")
  assert words in message


def test_405_has_allow_header():
  with pytest.raises(api.ApiError) as e:
    api.route("GET", "/v1/models/m:predict", "m")
  assert e.value.headers == {"Allow": "POST"}


# --- requests ---------------------------------------------------------------------------------


def test_instances_lists_b64_and_named():
  rng = np.random.default_rng(0)
  rgb = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
  req = api.parse_predict(_body({"instances": [rgb.tolist(), {"b64": _png_b64(rgb)},
                                               {"image": rgb.tolist()},
                                               {"image": {"b64": _png_b64(rgb)}}],
                                 "signature_name": "serving_default"}), task=SEG)
  assert not req.columnar and req.output == "classes" and len(req.images) == 4
  for im in req.images:
    assert im.dtype == np.uint8 and im.shape == (5, 7, 3)
    np.testing.assert_array_equal(im, rgb)


def test_inputs_columnar_forms():
  rgb = np.arange(2 * 3 * 4 * 3).reshape(2, 3, 4, 3).astype(np.uint8)
  for inputs in (rgb.tolist(), {"images": rgb.tolist()},
                 [{"b64": _png_b64(rgb[0])}, {"b64": _png_b64(rgb[1])}]):
    req = api.parse_predict(_body({"inputs": inputs}), task=SEG)
    assert req.columnar and len(req.images) == 2
    np.testing.assert_array_equal(np.stack(req.images), rgb)
  req = api.parse_predict(_body({"inputs": {"b64": _png_b64(rgb[0])}}), task=SEG)
  assert len(req.images) == 1


def test_grey_rgba_and_float_pixels():
  grey = np.array([[0, 128], [255, 7]])
  req = api.parse_predict(_body({"instances": [grey.tolist(), grey[..., None].tolist(),
                                               np.dstack([grey] * 3 + [grey * 0]).tolist(),
                                               (grey + 0.4).clip(0, 255).tolist()]}), task=SEG)
  for im in req.images:
    assert im.shape == (2, 2, 3) and im.dtype == np.uint8
    np.testing.assert_array_equal(im[..., 1], grey)


def test_b64_modes_decode_to_rgb():
  grey = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
  rgba = np.dstack([grey, grey, grey, np.full_like(grey, 9)])
  for b64 in (_png_b64(grey), _png_b64(rgba), _png_b64(grey.astype(np.uint16) * 256)):
    im = images_lib.decode_b64(b64, "x")
    assert im.shape == (3, 4, 3)
    np.testing.assert_array_equal(im[..., 0], grey)
  # URL-safe alphabet and line breaks are accepted
  b64 = _png_b64(np.full((9, 9, 3), 250, np.uint8)).replace("+", "-").replace("/", "_")
  assert images_lib.decode_b64(b64[:10] + "\n" + b64[10:], "x").shape == (9, 9, 3)


@pytest.mark.parametrize("body, words", [
    (b"{", "malformed JSON"),
    (b"\xff\xfe", "not UTF-8"),
    (b"[1, 2]", "JSON object"),
    (b'{"instances": [[[1, 2, 3]]], "inputs": []}', "exactly one"),
    (b'{"signature_name": "serving_default"}', "exactly one"),
    (b'{"instances": [], "typo": 1}', "unknown key"),
    (b'{"instances": {}}', "list of images"),
    (b'{"instances": []}', "empty"),
    (b'{"inputs": []}', "empty"),
    (b'{"instances": [[[[[1, 2, 3]]]]]}', "shape (1, 1, 1, 3)"),
    (b'{"instances": [[1, 2, 3]]}', "shape (3,)"),
    (b'{"instances": [[[[1, 2]]]]}', "shape"),
    (b'{"instances": [[[1, 2]]], "inputs": null}', "exactly one"),
    (b'{"instances": [[[[1, 2], [3, 4]]]]}', "shape"),
    (b'{"instances": [[[1, 2], [3, 4, 5]]]}', "ragged"),
    (b'{"instances": [[[[1, 2, 3]], [[1, 2]]]]}', "ragged"),
    (b'{"instances": [[[[1, 2, 3, 4, 5]]]]}', "shape"),
    (b'{"instances": [[[[1, 2, 3], [1, 2, 3]]], [[[1, 2]]]]}', "instances[1]"),
    (b'{"instances": [[["a", "b", "c"]]]}', "non-numeric"),
    (b'{"instances": [[[null, 1, 2]]]}', "non-numeric"),
    (b'{"instances": [[[true, false, true]]]}', "booleans"),
    (b'{"instances": [[[1, 2, 256]]]}', "0..255"),
    (b'{"instances": [[[-1, 2, 3]]]}', "0..255"),
    (b'{"instances": [[[NaN, 2, 3]]]}', "NaN"),
    (b'{"instances": [[[Infinity, 2, 3]]]}', "Infinity"),
    (b'{"instances": [[]]}', "empty image"),
    (b'{"instances": [7]}', "got a JSON number"),
    (b'{"instances": [{"b64": "!!!"}]}', "not valid base64"),
    (b'{"instances": [{"b64": "aGVsbG8gd29ybGQ="}]}', "not an image"),
    (b'{"instances": [{"b64": 3}]}', "base64 string"),
    (b'{"instances": [{"a": 1, "b": 2}]}', "b64"),
    (b'{"inputs": [[1, 2, 3]]}', "batch"),
    (b'{"inputs": [[[1, 2, 3], [4, 5, 6]]]}', "shape"),
    (b'{"instances": [[[1, 2, 3]]], "signature_name": "other"}', "serving_default"),
    (b'{"instances": [[[1, 2, 3]]], "output": "png"}', "classification"),
    (b"[" * 100000 + b"]" * 100000, "JSON"),
])
def test_bad_requests_are_400(body, words):
  assert words in _error(400, api.parse_predict, body, task=CLS)


def test_truncated_b64_png():
  b64 = _png_b64(np.zeros((64, 64, 3), np.uint8) + np.arange(64, dtype=np.uint8)[:, None, None])
  raw = base64.b64decode(b64)
  cut = base64.b64encode(raw[:len(raw) // 2]).decode()
  assert "instances[0]" in _error(400, api.parse_predict, _body({"instances": [{"b64": cut}]}),
                                  task=SEG)


def test_too_small_for_the_model():
  message = _error(400, api.parse_predict, _body({"instances": [np.zeros((5, 30, 3)).tolist()]}),
                   task=CLS, min_size=(19, 19))
  assert "5x30" in message and "19x19" in message


def test_pixel_budget_is_413():
  body = _body({"instances": [np.zeros((10, 10, 3), int).tolist()] * 3})
  assert api.parse_predict(body, task=SEG, max_pixels=300)
  assert "300 pixels" in _error(413, api.parse_predict, body, task=SEG, max_pixels=299)
  big = _body({"instances": [{"b64": _png_b64(np.zeros((100, 100, 3), np.uint8))}]})
  assert "100x100" in _error(413, api.parse_predict, big, task=SEG, max_pixels=9999)


# --- batches by size and responses ------------------------------------------------------------


def test_run_by_size_keeps_request_order():
  ims = [np.full((h, w, 3), i, np.uint8) for i, (h, w) in
         enumerate([(2, 3), (4, 4), (2, 3), (1, 1), (4, 4)])]
  calls = []

  def fn(x):
    calls.append(x.shape)
    return x[:, 0, 0, 0].astype(np.float32)

  assert [float(v) for v in api.run_by_size(ims, fn)] == [0, 1, 2, 3, 4]
  assert calls == [(2, 2, 3, 3), (2, 4, 4, 3), (1, 1, 1, 3)]
  assert api.size_groups(ims) == {(2, 3): [0, 2], (4, 4): [1, 4], (1, 1): [3]}


def test_classifier_prediction_is_softmax():
  logits = np.array([1.0, 2.0, -3.0, 1000.0], np.float32)
  p = api.prediction(logits, CLS, "probabilities")
  assert isinstance(p, list) and len(p) == 4 and abs(sum(p) - 1) < 1e-6 and p[3] > 0.999
  logits = np.array([0.0, np.log(3.0)])
  np.testing.assert_allclose(api.prediction(logits, CLS, "probabilities"), [0.25, 0.75],
                             rtol=1e-6)


def test_segmenter_prediction_classes_and_png():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(6, 5, 300)).astype(np.float32)
  want = logits.argmax(-1)
  classes = api.prediction(logits, SEG, "classes")
  assert np.asarray(classes).shape == (6, 5)
  np.testing.assert_array_equal(classes, want)
  palette = rng.integers(0, 256, (256, 3), dtype=np.uint8)
  png = api.prediction(logits[..., :21], SEG, "png", palette)
  img = Image.open(io.BytesIO(base64.b64decode(png["b64"])))
  assert img.mode == "P" and img.size == (5, 6)
  np.testing.assert_array_equal(np.asarray(img), logits[..., :21].argmax(-1))
  np.testing.assert_array_equal(np.asarray(img.getpalette(), np.uint8)[:768].reshape(256, 3),
                                palette)
  wide = Image.open(io.BytesIO(base64.b64decode(api.prediction(logits, SEG, "png")["b64"])))
  np.testing.assert_array_equal(np.asarray(wide), want)  # > 256 classes: a 16-bit grey PNG


def test_bodies():
  assert api.predict_body([1], columnar=True) == {"outputs": [1]}
  assert api.predict_body([1], columnar=False) == {"predictions": [1]}
  status = api.status_body()["model_version_status"]
  assert status == [{"version": "1", "state": "AVAILABLE",
                     "status": {"error_code": "OK", "error_message": ""}}]
  meta = api.metadata_body("m", {"task": SEG})
  assert meta["model_spec"]["name"] == "m" and meta["metadata"] == {"task": SEG}


# --- batching ---------------------------------------------------------------------------------


def test_padded_rows():
  assert [padded_rows(n, 16) for n in (1, 2, 3, 5, 9, 16, 20)] == [1, 2, 4, 8, 16, 16, 20]
  assert padded_rows(3, 2) == 3
  assert batch_rows(16) == (1, 2, 4, 8, 16) and batch_rows(6) == (1, 2, 4, 6)
  assert all(padded_rows(n, 6) in batch_rows(6) for n in range(1, 7))


def test_batcher_batches_concurrent_calls_of_one_size():
  calls = []
  lock = threading.Lock()

  def fn(x):
    with lock:
      calls.append(x.shape)
    return x[:, 0, 0, 0].astype(np.int64) * 10

  b = Batcher(fn, window_s=0.3, max_batch=8)
  results = {}

  def client(i, h):
    results[i] = b(np.full((1, h, 4, 3), i, np.uint8))

  threads = [threading.Thread(target=client, args=(i, 4 if i < 5 else 6)) for i in range(7)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert {i: int(r[0]) for i, r in results.items()} == {i: 10 * i for i in range(7)}
  assert sorted(calls) == [(2, 6, 4, 3), (8, 4, 4, 3)]  # 5 rows padded to 8; 2 rows
  assert b.batches == 2


def test_batcher_passes_errors_to_every_member():
  def fn(x):
    raise RuntimeError("boom")

  b = Batcher(fn, window_s=0.05, max_batch=4)
  with pytest.raises(RuntimeError, match="boom"):
    b(np.zeros((1, 2, 2, 3), np.uint8))
