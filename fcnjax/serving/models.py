"""MODEL -> a :class:`ServedModel`: uint8 images in, float32 logits out, thread-safe.

MODEL is an exported artifact (``python -m fcnjax.export``; read with
:mod:`fcnjax.serving.artifact`: jax and numpy only, neither flax nor the training / data code is
imported), a training workdir or a weights file (:func:`fcnjax.inference.loading.load_model`,
which does import them).

Every input shape is compiled once: the first call of a new (N, H, W) compiles it (under a lock,
so concurrent first calls of a shape compile it once), later calls reuse the program.
"""

from __future__ import annotations

import pathlib
import threading

import numpy as np

from fcnjax.serving import artifact

SEGMENTATION, CLASSIFICATION = artifact.SEGMENTATION, artifact.CLASSIFICATION


class ServedModel:
  """A model behind the server.

  Attributes: ``task`` (``"segmentation"`` | ``"classification"``), ``num_classes``,
  ``class_names`` (tuple), ``palette`` ((256, 3) uint8), ``min_input_size`` ((h, w)),
  ``source`` (``"exported"`` | ``"workdir"`` | ``"weights"``), ``path``, ``description``,
  ``extra`` (a dict for :meth:`info`).

  ``model(images)``: uint8 RGB (N, H, W, 3) -> float32 numpy logits, (N, num_classes) for a
  classifier, (N, H, W, num_classes) for a segmenter. Safe to call from several threads.
  """

  def __init__(self, fn, *, task: str, num_classes: int, class_names, palette,
               min_input_size=(1, 1), source: str, path, description: str,
               extra: dict | None = None, cache_size=None):
    self._fn = fn
    self._cache_size = cache_size
    self.task = task
    self.num_classes = int(num_classes)
    self.class_names = tuple(str(n) for n in class_names)
    self.palette = np.asarray(palette, np.uint8)
    self.min_input_size = tuple(int(v) for v in min_input_size)
    self.source = source
    self.path = str(path)
    self.description = description
    self.extra = dict(extra or {})
    self._shapes = set()
    self._compile_lock = threading.Lock()

  def __call__(self, images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"expected uint8 RGB images (N, H, W, 3), got {images.dtype} "
                       f"{images.shape}")
    key = images.shape
    if key not in self._shapes:
      with self._compile_lock:  # one compile per new shape, however many threads ask at once
        if key not in self._shapes:
          out = np.asarray(self._fn(images), np.float32)
          self._shapes.add(key)
          return out
    return np.asarray(self._fn(images), np.float32)

  @property
  def shapes_compiled(self) -> int:
    """How many distinct input shapes (N, H, W, 3) have been run (each compiled once)."""
    return len(self._shapes)

  def jit_cache_size(self) -> int:
    """The jit's own count of compiled programs (-1 where jax does not say)."""
    if self._cache_size is None:
      return -1
    try:
      return int(self._cache_size())
    except Exception:  # noqa: BLE001 -- a private jax API: best effort
      return -1

  def warmup(self, sizes, rows=(1,)) -> None:
    """Compile the programs for each (h, w) in ``sizes`` and each batch size in ``rows`` now."""
    for h, w in sizes:
      for n in rows:
        self(np.zeros((int(n), int(h), int(w), 3), np.uint8))

  def info(self) -> dict:
    """The model's description for the metadata endpoint."""
    if self.task == CLASSIFICATION:
      output = {"kind": "probabilities", "shape": ["N", self.num_classes],
                "formats": ["probabilities"]}
    else:
      output = {"kind": "class map", "shape": ["N", "H", "W"], "dtype": "int",
                "formats": ["classes", "png"]}
    info = {
        "task": self.task,
        "num_classes": self.num_classes,
        "class_names": list(self.class_names),
        "input": {"layout": "HWC RGB", "values": "0..255 (integers; floats are rounded)",
                  "min_size": list(self.min_input_size),
                  "accepts": ["nested lists (H, W, 3)", "grey (H, W) or (H, W, 1)",
                              "RGBA (H, W, 4), alpha dropped", "{\"b64\": PNG / JPEG}"]},
        "output": output,
        "source": {"kind": self.source, "path": self.path, "description": self.description},
        "shapes_compiled": self.shapes_compiled,
    }
    if self.task == SEGMENTATION:
      info["palette"] = self.palette.astype(int).tolist()
    info.update(self.extra)
    return info


def from_exported(path) -> ServedModel:
  """An exported artifact (``path`` and ``path + ".json"``); :class:`~fcnjax.serving.artifact.
  ExportError` if it cannot be read."""
  exp = artifact.load_exported(path)
  return ServedModel(
      exp, task=exp.task, num_classes=exp.num_classes, class_names=exp.class_names,
      palette=exp.palette, min_input_size=exp.min_input_size, source="exported", path=path,
      description=str(exp.meta.get("model", {}).get("description", path)),
      extra={"platforms": list(exp.platforms),
             "preprocessing": exp.meta.get("preprocessing", {}).get("name")},
      cache_size=exp.compiled_shapes)


def from_weights(path, *, step: int | None = None) -> ServedModel:
  """A training workdir or weights file, through :func:`fcnjax.inference.loading.load_model`
  (``ModelLoadError`` / ``WeightsError`` if it cannot be loaded)."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from fcnjax.inference import export as export_lib
  from fcnjax.inference.loading import is_workdir, load_model

  loaded = load_model(path, step=step)
  task = export_lib.task_of(loaded)
  model = loaded.model
  model.eval()
  graphdef, state = nnx.split(model)
  pre = loaded.preprocessing
  try:
    pre_fn = export_lib.jnp_preprocessing(pre)
  except ValueError:  # a convention without a jnp form: numpy on the host
    pre_fn = None

  @jax.jit
  def forward(state, x):
    return nnx.merge(graphdef, state)(pre_fn(x) if pre_fn else x).astype(jnp.float32)

  def fn(images):
    return forward(state, images if pre_fn else np.asarray(pre.fn(images), np.float32))

  min_size = export_lib.min_input_size(model) if task == CLASSIFICATION else (1, 1)
  return ServedModel(
      fn, task=task, num_classes=loaded.num_classes, class_names=loaded.class_names,
      palette=loaded.palette, min_input_size=min_size,
      source="workdir" if is_workdir(path) else "weights", path=path,
      description=loaded.description, extra={"preprocessing": pre.name},
      cache_size=getattr(forward, "_cache_size", None))


def open_model(path, *, step: int | None = None) -> ServedModel:
  """MODEL (see the module doc) -> :class:`ServedModel`. An exported artifact is recognised by
  its ``.json`` beside it; ``step`` applies to a workdir only."""
  p = pathlib.Path(path).expanduser()
  if artifact.is_exported(p):
    if step is not None:
      raise ValueError(f"{p}: --step applies to a training workdir, not an exported artifact")
    return from_exported(p)
  return from_weights(p, step=step)
