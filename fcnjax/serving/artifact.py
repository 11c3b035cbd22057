"""Reading an fcnjax export (``python -m fcnjax.export``): jax and numpy only.

The writing side is :mod:`fcnjax.inference.export` (which re-exports everything here). This
module lives apart from it so that a process that only *runs* artifacts (the HTTP server of
:mod:`fcnjax.serving`) imports neither the model code (flax) nor the training / data code
(``fcnjax.inference``'s package imports the data pipeline).

An artifact is two files: ``OUT`` (a serialized ``jax.export.Exported``) and ``OUT.json`` (its
metadata, ``"format": "fcnjax-export"``). Its function maps **uint8 RGB images (N, H, W, 3)** to
float32 logits: **(N, H, W, C)** for a segmenter (``"task": "segmentation"``, also what a
metadata file without ``"task"`` means), **(N, C)** for a classifier
(``"task": "classification"``). Problems raise :class:`ExportError` (a ``ValueError``) whose
message starts with the path.
"""

from __future__ import annotations

import json
import pathlib

import jax
import numpy as np

FORMAT = "fcnjax-export"
FORMAT_VERSION = 1
SEGMENTATION = "segmentation"
CLASSIFICATION = "classification"
TASKS = (SEGMENTATION, CLASSIFICATION)
#: task -> the rank of the artifact's output
OUTPUT_RANK = {SEGMENTATION: 4, CLASSIFICATION: 2}


class ExportError(ValueError):
  """An artifact cannot be written or read (the message starts with the path)."""


def one_line(e: BaseException) -> str:
  """The first non-empty line of ``str(e)`` (at most 400 characters), else the type's name."""
  lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
  return (lines[0] if lines else type(e).__name__)[:400]


def _read_meta(path: pathlib.Path):
  """The JSON beside ``path`` if it is an fcnjax export's, else ``None``."""
  try:
    meta = json.loads(pathlib.Path(f"{path}.json").read_text())
  except (OSError, ValueError):
    return None
  return meta if isinstance(meta, dict) and meta.get("format") == FORMAT else None


def is_exported(path) -> bool:
  """Whether ``path`` is a file with a ``path + ".json"`` beside it of format fcnjax-export."""
  p = pathlib.Path(path)
  return p.is_file() and _read_meta(p) is not None


def task_of(meta: dict) -> str:
  """The metadata's ``"task"``; ``"segmentation"`` when absent (files written before it)."""
  return meta.get("task", SEGMENTATION)


class ExportedModel:
  """An artifact and its metadata; needs only jax and numpy to run.

  Attributes: ``exported`` (:class:`jax.export.Exported`), ``meta`` (the JSON), ``path``,
  ``task`` (``"segmentation"`` | ``"classification"``), ``num_classes``, ``class_names``
  (tuple), ``palette`` ((256, 3) uint8), ``pad_value_rgb`` (tuple), ``translation_period``
  (int; ``None`` for a classifier whose metadata has none), ``input_multiple``,
  ``min_input_size`` ((h, w): the smallest image the artifact accepts; (1, 1) by default),
  ``bucket_padding_safe`` (False when zero-padding an image changes its logits beyond its edge
  rows, e.g. a model that resizes its scores to the whole input; then run images unpadded),
  ``platforms``.

  ``model(images)``: uint8 (N, H, W, 3) RGB -> float32 numpy logits, (N, H, W, num_classes) for
  a segmenter, (N, num_classes) for a classifier. One compiled program per input shape (a
  ``jax.jit`` of ``exported.call``, cached by shape); safe to call from several threads.
  """

  def __init__(self, exported, meta: dict, path=None):
    self.exported = exported
    self.meta = meta
    self.path = path
    self.task = task_of(meta)
    self.num_classes = int(meta["num_classes"])
    self.class_names = tuple(meta["class_names"])
    self.palette = np.asarray(meta["palette"], np.uint8)
    self.pad_value_rgb = tuple(int(v) for v in meta["pad_value_rgb"])
    period = meta.get("translation_period")
    self.translation_period = None if period is None else int(period)
    self.input_multiple = int(meta.get("input_multiple") or 1)
    self.min_input_size = tuple(int(v) for v in meta.get("min_input_size") or (1, 1))
    self.bucket_padding_safe = bool(meta.get("bucket_padding_safe", True))
    self.platforms = tuple(exported.platforms)
    self._call = jax.jit(exported.call)

  def __call__(self, images) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 \
        or min(images.shape) < 1:
      raise ValueError(f"expected uint8 RGB images (N, H, W, 3) with N, H, W >= 1, got "
                       f"{images.dtype} {images.shape}")
    mh, mw = self.min_input_size
    if images.shape[1] < mh or images.shape[2] < mw:
      raise ValueError(f"input {images.shape[1]}x{images.shape[2]} is smaller than the "
                       f"minimum input size {mh}x{mw} of this model")
    return np.asarray(self._call(images), np.float32)

  def compiled_shapes(self) -> int:
    """How many input shapes have been compiled so far (the jit's cache size; -1 if unknown)."""
    size = getattr(self._call, "_cache_size", None)
    return int(size()) if callable(size) else -1

  def __repr__(self) -> str:
    return (f"ExportedModel({self.path}, {self.task}, {self.num_classes} classes, "
            f"platforms {','.join(self.platforms)})")


def load_exported(path) -> ExportedModel:
  """Read an artifact written by :func:`fcnjax.inference.export.export_model`.

  Raises :class:`ExportError` ``"PATH: ..."`` for a missing or unreadable file, a missing or
  malformed JSON, one that is not an fcnjax export's (or of a newer format version, or of an
  unknown task), a truncated / damaged artifact, or one whose signature is not uint8
  (N, H, W, 3) -> float32 (N, H, W, num_classes) (segmentation) / (N, num_classes)
  (classification).
  """
  p = pathlib.Path(path).expanduser()
  if not p.is_file():
    raise ExportError(f"{p}: no such file" if not p.exists() else f"{p}: not a file")
  jp = pathlib.Path(f"{p}.json")
  try:
    data = p.read_bytes()
    text = jp.read_text()
  except FileNotFoundError:
    raise ExportError(f"{p}: no metadata {jp.name} beside it: not an fcnjax export") from None
  except (OSError, UnicodeDecodeError) as e:
    raise ExportError(f"{p}: cannot read the artifact or its metadata ({e})") from None
  try:
    meta = json.loads(text)
  except ValueError as e:
    raise ExportError(f"{p}: its metadata {jp.name} is not JSON ({e})") from None
  if not isinstance(meta, dict) or meta.get("format") != FORMAT:
    raise ExportError(f"{p}: its metadata {jp.name} is not an fcnjax export's (format "
                      f"{meta.get('format') if isinstance(meta, dict) else None!r})")
  if not isinstance(meta.get("format_version"), int) or meta["format_version"] > FORMAT_VERSION:
    raise ExportError(f"{p}: export format version {meta.get('format_version')!r}; this fcnjax "
                      f"reads up to {FORMAT_VERSION}")
  task = task_of(meta)
  if task not in TASKS:
    raise ExportError(f"{p}: unknown task {task!r} in {jp.name} (known: {', '.join(TASKS)})")
  try:
    exported = jax.export.deserialize(bytearray(data))
  except ImportError as e:  # jax's serialization needs the flatbuffers package
    raise ExportError(f"{p}: cannot deserialize: {one_line(e)}") from None
  except Exception as e:  # noqa: BLE001 -- flatbuffer / MLIR errors of any kind
    raise ExportError(f"{p}: not a readable jax.export artifact (truncated or damaged?): "
                      f"{type(e).__name__}: {one_line(e)}") from None
  want = ("(N, H, W, {c})" if task == SEGMENTATION else "(N, {c})")
  try:
    (inp,), (out,) = exported.in_avals, exported.out_avals
    ok = (inp.dtype == np.uint8 and inp.ndim == 4 and inp.shape[-1] == 3
          and out.dtype == np.float32 and out.ndim == OUTPUT_RANK[task]
          and out.shape[-1] == int(meta["num_classes"]))
    model = ExportedModel(exported, meta, p) if ok else None
  except (ValueError, TypeError, KeyError) as e:
    raise ExportError(f"{p}: malformed metadata or signature ({type(e).__name__}: {e})") from None
  if model is None:
    raise ExportError(f"{p}: the artifact maps {exported.in_avals} -> {exported.out_avals}, not "
                      f"uint8 (N, H, W, 3) -> float32 {want.format(c=meta['num_classes'])} "
                      f"({task})")
  if model.palette.shape != (256, 3):
    raise ExportError(f"{p}: metadata palette has shape {model.palette.shape}, not (256, 3)")
  return model
