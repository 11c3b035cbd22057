"""The REST API, as pure functions: routes, predict requests -> images, outputs -> responses.

It follows TensorFlow Serving's REST API (so its clients work unchanged), one model of version
``"1"`` per server:

* ``GET /v1/models/NAME`` (or ``.../versions/1``) -> :func:`status_body`.
* ``GET /v1/models/NAME/metadata`` (or ``.../versions/1/metadata``) -> the model's task, classes
  and input / output conventions (:func:`metadata_body`).
* ``POST /v1/models/NAME:predict`` (or ``.../versions/1:predict``) with a JSON object:

  - ``"instances"``: a list of images (row format), each nested lists of pixel values (H, W, 3)
    (grey (H, W), (H, W, 1) and RGBA (H, W, 4) accepted: :mod:`fcnjax.serving.images`), or
    ``{"b64": "<base64 PNG / JPEG>"}``, or a one-key object ``{"NAME": image}`` (a named input);
  - or ``"inputs"`` (columnar format): a batch (N, H, W, C) as nested lists, a list of
    ``{"b64": ...}`` objects, one ``{"b64": ...}``, or a one-key object naming one of these;
  - optional ``"signature_name"``: ``"serving_default"`` (the only one); optional ``"output"``:
    for a segmenter ``"classes"`` (default) or ``"png"``, for a classifier ``"probabilities"``
    (default). Any other key is an error (a typo would otherwise be ignored silently).

  -> ``{"predictions": [...]}`` for ``"instances"``, ``{"outputs": [...]}`` for ``"inputs"``,
  one entry per image in request order: a classifier's class probabilities (C floats, softmax
  of the logits); a segmenter's class map, nested lists (H, W) of ints, or ``{"b64": "<PNG>"}``
  (a palette PNG whose pixel values are the class ids) with ``"output": "png"``.
* ``GET /healthz`` -> ``{"status": "ok"}``.

Images of different sizes in one request are run as one batch per size (the artifact takes any
size, but one call is one array); the answer keeps the request's order.

Errors are :class:`ApiError` (HTTP status + message), answered as ``{"error": "..."}``: 400 for
a malformed request, 404 for an unknown path, model name or version, 405 for a wrong method,
413 for a body or image over the limits.
"""

from __future__ import annotations

import dataclasses
import json
import urllib.parse

import numpy as np

from fcnjax.serving import images as images_lib

VERSION = "1"
SIGNATURE = "serving_default"
SEGMENTATION, CLASSIFICATION = "segmentation", "classification"
#: task -> (default output, accepted outputs)
OUTPUTS = {SEGMENTATION: ("classes", ("classes", "png")),
           CLASSIFICATION: ("probabilities", ("probabilities",))}
REQUEST_KEYS = ("instances", "inputs", "signature_name", "output")

HEALTHZ, STATUS, METADATA, PREDICT = "healthz", "status", "metadata", "predict"
#: route -> the HTTP method it answers
METHODS = {HEALTHZ: "GET", STATUS: "GET", METADATA: "GET", PREDICT: "POST"}


class ApiError(Exception):
  """An HTTP error answer: ``status`` and the ``{"error": message}`` body (``headers`` extra)."""

  def __init__(self, status: int, message: str, headers: dict | None = None):
    super().__init__(message)
    self.status = int(status)
    self.message = message
    self.headers = dict(headers or {})


def error_body(message: str) -> dict:
  return {"error": message}


# ---------------------------------------------------------------------------------------------
# Routes


def route(method: str, path: str, name: str) -> str:
  """The route (:data:`HEALTHZ`, :data:`STATUS`, :data:`METADATA`, :data:`PREDICT`) of a request
  to the server of model ``name``; :class:`ApiError` 404 (unknown path / model / version) or 405
  (wrong method, with an ``Allow`` header)."""
  path = urllib.parse.unquote(path.split("?", 1)[0].split("#", 1)[0])
  if path.rstrip("/") == "/healthz":
    kind = HEALTHZ
  elif path.startswith("/v1/models/"):
    kind = _model_route(path[len("/v1/models/"):], name)
  else:
    raise ApiError(404, f"no such path {path!r}: try GET /v1/models/{name}, GET "
                        f"/v1/models/{name}/metadata, POST /v1/models/{name}:predict or GET "
                        "/healthz")
  if method != METHODS[kind]:
    raise ApiError(405, f"{method} is not allowed on {path} (use {METHODS[kind]})",
                   {"Allow": METHODS[kind]})
  return kind


def _model_route(rest: str, name: str) -> str:
  verb = None
  if ":" in rest:
    rest, verb = rest.rsplit(":", 1)
  parts = rest.rstrip("/").split("/") if verb is None else rest.split("/")
  model, parts = parts[0], parts[1:]
  if model != name:
    raise ApiError(404, f"Servable not found for request: Latest({model}): this server serves "
                        f"the model {name!r}")
  if parts[:1] == ["versions"]:
    if len(parts) < 2 or parts[1] != VERSION:
      version = parts[1] if len(parts) > 1 else ""
      raise ApiError(404, f"Servable not found for request: Specific({model}, {version}): "
                          f"{name!r} has version {VERSION} only")
    parts = parts[2:]
  elif parts[:1] == ["labels"]:
    raise ApiError(404, f"version labels are not supported; use /v1/models/{name} or "
                        f"/v1/models/{name}/versions/{VERSION}")
  if verb is not None:
    if parts or verb != "predict":
      raise ApiError(404, f"unknown method :{verb} on /v1/models/{rest}: only :predict is "
                          "supported" if not parts else f"no such path /v1/models/{rest}:{verb}")
    return PREDICT
  if not parts:
    return STATUS
  if parts == ["metadata"]:
    return METADATA
  raise ApiError(404, f"no such path /v1/models/{rest}")


# ---------------------------------------------------------------------------------------------
# Requests


@dataclasses.dataclass
class PredictRequest:
  """A parsed predict request: ``images`` (RGB uint8 (H, W, 3) each, in request order),
  ``columnar`` (``"inputs"`` was given: answer ``"outputs"``), ``output`` (what to return)."""

  images: list
  columnar: bool
  output: str


def _no_constants(text: str):
  raise ValueError(f"{text} is not a number JSON allows")


def parse_json(body: bytes):
  """Body bytes -> the JSON value; :class:`ApiError` 400 for anything that is not strict JSON
  (bad UTF-8, syntax errors, NaN / Infinity, nesting too deep)."""
  try:
    text = body.decode("utf-8")
  except UnicodeDecodeError as e:
    raise ApiError(400, f"the body is not UTF-8 text ({e.reason} at byte {e.start})") from None
  try:
    return json.loads(text, parse_constant=_no_constants)
  except RecursionError:
    raise ApiError(400, "malformed JSON: nested too deeply") from None
  except ValueError as e:
    raise ApiError(400, f"malformed JSON: {e}") from None


def parse_predict(body: bytes, *, task: str, min_size=(1, 1),
                  max_pixels: int | None = None) -> PredictRequest:
  """A predict request's body -> :class:`PredictRequest` (see the module doc).

  Args:
    body: the raw request body.
    task: the served model's task (which ``"output"`` values are accepted).
    min_size: (h, w), the smallest image the model accepts (a smaller one is a 400).
    max_pixels: the most pixels all the request's images may have together (413 beyond).

  Raises :class:`ApiError` (400, or 413 over ``max_pixels``) naming what is wrong and where
  (``instances[3]: ...``).
  """
  req = parse_json(body)
  if not isinstance(req, dict):
    raise ApiError(400, f"the body must be a JSON object with \"instances\" or \"inputs\", got "
                        f"a JSON {_json_type(req)}")
  unknown = sorted(set(req) - set(REQUEST_KEYS))
  if unknown:
    raise ApiError(400, f"unknown key(s) {', '.join(map(repr, unknown))} in the request "
                        f"(known: {', '.join(REQUEST_KEYS)})")
  if ("instances" in req) == ("inputs" in req):
    raise ApiError(400, "give exactly one of \"instances\" (a list of images) or \"inputs\" "
                        "(a batch)" + (", not both" if "instances" in req else ""))
  sig = req.get("signature_name", SIGNATURE)
  if sig not in (SIGNATURE, ""):
    raise ApiError(400, f"unknown signature_name {sig!r}: this model has only {SIGNATURE!r}")
  default, allowed = OUTPUTS[task]
  output = req.get("output", default)
  if output not in allowed:
    raise ApiError(400, f"\"output\": {output!r} is not available for a {task} model (use "
                        f"{' or '.join(map(repr, allowed))})")
  budget = _Budget(max_pixels)
  if "instances" in req:
    images = _instances(req["instances"], budget)
  else:
    images = _inputs(req["inputs"], budget)
  mh, mw = (int(v) for v in min_size)
  where = "inputs" if "inputs" in req else "instances"
  for i, im in enumerate(images):
    if im.shape[0] < mh or im.shape[1] < mw:
      raise ApiError(400, f"{where}[{i}]: the image is {im.shape[0]}x{im.shape[1]} (H x W), "
                          f"smaller than this model's minimum input size {mh}x{mw}")
  return PredictRequest(images, "inputs" in req, output)


def _json_type(v) -> str:
  return {dict: "object", list: "array", str: "string", bool: "boolean",
          type(None): "null"}.get(type(v), "number")


class _Budget:
  """Pixels left for the request's images (``None``: no limit)."""

  def __init__(self, max_pixels):
    self.left = max_pixels
    self.max = max_pixels
    self.used = 0

  def take(self, image: np.ndarray, where: str) -> np.ndarray:
    self.used += image.shape[0] * image.shape[1]
    if self.left is not None:
      self.left = self.max - self.used
      if self.left < 0:
        raise ApiError(413, f"{where}: the request's images have {self.used:,} pixels so far, "
                            f"over the limit of {self.max:,}")
    return image

  def b64(self, text, where: str) -> np.ndarray:
    try:
      im = images_lib.decode_b64(text, where, max_pixels=self.left)
    except images_lib.TooLarge as e:
      raise ApiError(413, f"{e} (left of the request's {self.max:,})") from None
    except images_lib.ImageError as e:
      raise ApiError(400, str(e)) from None
    return self.take(im, where)

  def array(self, value, where: str, *, allow_grey: bool = True) -> np.ndarray:
    try:
      im = images_lib.array_image(value, where, allow_grey=allow_grey)
    except images_lib.ImageError as e:
      raise ApiError(400, str(e)) from None
    return self.take(im, where)


def _b64_object(v) -> bool:
  return isinstance(v, dict) and set(v) == {"b64"}


def _image(v, where: str, budget: _Budget, *, named_ok: bool = True,
           allow_grey: bool = True) -> np.ndarray:
  """One image: nested lists, ``{"b64": ...}`` or (``named_ok``) ``{"NAME": either}``."""
  if _b64_object(v):
    return budget.b64(v["b64"], where)
  if isinstance(v, dict):
    if named_ok and len(v) == 1:
      (key, value), = v.items()
      return _image(value, f"{where}.{key}", budget, named_ok=False, allow_grey=allow_grey)
    raise ApiError(400, f"{where}: an image object must be {{\"b64\": \"...\"}} (or name one "
                        f"input), got keys {sorted(v)}")
  if isinstance(v, list):
    return budget.array(v, where, allow_grey=allow_grey)
  raise ApiError(400, f"{where}: expected an image (nested lists of pixel values or "
                      f"{{\"b64\": ...}}), got a JSON {_json_type(v)}")


def _instances(value, budget: _Budget) -> list:
  if not isinstance(value, list):
    raise ApiError(400, f"\"instances\" must be a list of images, got a JSON {_json_type(value)}")
  if not value:
    raise ApiError(400, "\"instances\" is empty: give at least one image")
  return [_image(v, f"instances[{i}]", budget) for i, v in enumerate(value)]


def _inputs(value, budget: _Budget) -> list:
  if _b64_object(value):
    return [budget.b64(value["b64"], "inputs")]
  if isinstance(value, dict):
    if len(value) != 1:
      raise ApiError(400, f"\"inputs\" as an object must name one input, got keys "
                          f"{sorted(value)}")
    (key, inner), = value.items()
    if isinstance(inner, dict) and not _b64_object(inner):
      raise ApiError(400, f"inputs.{key}: expected a batch of images")
    return _inputs(inner, budget)
  if not isinstance(value, list):
    raise ApiError(400, f"\"inputs\" must be a batch of images (N, H, W, C) or a list of "
                        f"{{\"b64\": ...}}, got a JSON {_json_type(value)}")
  if not value:
    raise ApiError(400, "\"inputs\" is empty: give at least one image")
  out = []
  for i, v in enumerate(value):
    if isinstance(v, list) and v and not isinstance(v[0], list):
      raise ApiError(400, f"inputs[{i}]: \"inputs\" must be a batch (N, H, W, C) of images (a "
                          "single image goes in a list: [image]); got a row of numbers")
    out.append(_image(v, f"inputs[{i}]", budget, named_ok=False, allow_grey=False))
  return out


# ---------------------------------------------------------------------------------------------
# Batches by size


def size_groups(images: list) -> dict:
  """(h, w) -> the indices of ``images`` of that size, in order of first appearance."""
  groups = {}
  for i, im in enumerate(images):
    groups.setdefault(tuple(im.shape[:2]), []).append(i)
  return groups


def run_by_size(images: list, fn) -> list:
  """Apply ``fn`` ((n, h, w, 3) uint8 -> (n, ...) array) to each size group of ``images``;
  return the per-image outputs in the order of ``images``."""
  results = [None] * len(images)
  for idx in size_groups(images).values():
    out = fn(np.stack([images[i] for i in idx]))
    for j, i in enumerate(idx):
      results[i] = out[j]
  return results


# ---------------------------------------------------------------------------------------------
# Responses


def softmax(logits: np.ndarray) -> np.ndarray:
  """Softmax over the last axis (float64 inside, float32 out)."""
  z = np.asarray(logits, np.float64)
  z = np.exp(z - z.max(axis=-1, keepdims=True))
  return (z / z.sum(axis=-1, keepdims=True)).astype(np.float32)


def prediction(logits: np.ndarray, task: str, output: str, palette=None):
  """One image's logits -> its JSON prediction: probabilities (C floats) for a classifier
  ((C,) logits); for a segmenter ((H, W, C) logits) the class map as nested lists (H, W) of
  ints, or ``{"b64": PNG}`` with ``output == "png"``."""
  logits = np.asarray(logits)
  if task == CLASSIFICATION:
    return softmax(logits).tolist()
  classes = np.argmax(logits, axis=-1)
  if output == "png":
    return {"b64": images_lib.encode_b64(images_lib.class_png(classes, palette))}
  return classes.astype(np.int32).tolist()


def predict_body(predictions: list, columnar: bool) -> dict:
  """``{"outputs": ...}`` for a columnar (``"inputs"``) request, else ``{"predictions": ...}``."""
  return {"outputs": predictions} if columnar else {"predictions": predictions}


def status_body() -> dict:
  """TF-Serving's model status: version 1, AVAILABLE."""
  return {"model_version_status": [{"version": VERSION, "state": "AVAILABLE",
                                    "status": {"error_code": "OK", "error_message": ""}}]}


def metadata_body(name: str, info: dict) -> dict:
  """TF-Serving's metadata layout (``model_spec`` + ``metadata``) with fcnjax's model ``info``
  (:meth:`fcnjax.serving.models.ServedModel.info`) under ``metadata``."""
  return {"model_spec": {"name": name, "signature_name": SIGNATURE, "version": VERSION},
          "metadata": info}
