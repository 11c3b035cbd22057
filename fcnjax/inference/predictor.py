"""``Predictor``: class maps and probabilities for images of any size, in batches of size buckets.

    p = Predictor("runs/smoke-fcn8s")            # workdir, .safetensors, pytorch-fcn .pth, export
    p.predict(rgb)                               # (H, W) int32 class ids, rgb (H, W, 3) uint8
    p.predict_proba(rgb)                         # (H, W, C) float32, sums to 1 over C
    for r in p.predict_many(images): ...         # Prediction(index, classes, probs), in order

How an image is run (every result has exactly the input's height and width):

* **bucketed** (default): images are padded at the bottom/right to a size bucket planned on the
  sizes to come (:func:`fcnjax.data.buckets.plan_buckets`, ``max_buckets``), batched, and the
  output is cropped back: a handful of programs for any number of sizes. Padding is what training
  pads with (zeros after preprocessing), and the model gets the batch's mask as in training: a
  ResNet model then gives each image exactly its lone prediction; to a VGG FCN's score layers the
  padding is context that changes predictions near the bottom/right edge a little. An exported
  model has no mask input: one whose output depends on the whole input size (torchvision's
  FCN-ResNet resizes its scores to it; ``bucket_padding_safe`` false in its JSON) runs exact.
* **exact** (``exact=True``): every image alone at its own size (the reference protocol; one
  program per distinct size, cached by JAX's persistent compilation cache when it is on). An
  aligned model zero-pads its input to a multiple of 32 itself, so for it sizes are rounded up
  to that multiple: the model gets the very same input, in fewer programs.
* **tiled** (``tile=(h, w)``, and automatically for images above ``max_pixels``): sliding windows
  whose logits are averaged (:mod:`fcnjax.inference.tiling`). Edge tiles smaller than ``tile``
  are padded to it (one program), or with ``exact=True`` run at their own size (then the tiled
  logits equal the whole image's for a model whose receptive field fits in ``overlap // 2``).
* **test-time augmentation** (``flip=True``, ``scales=(0.5, 1, 1.5)``): each view is predicted,
  its softmax resized to the input size (bilinear) and un-flipped, and the views' probabilities
  are averaged; the class map is their argmax.

Programs compiled, images and failures are counted in :attr:`Predictor.stats`.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Iterable, Iterator

import numpy as np

from fcnjax.data import buckets as buckets_lib
from fcnjax.inference import images as images_lib
from fcnjax.inference import tiling
from fcnjax.inference.loading import (LoadedModel, ModelLoadError, default_class_names,
                                      load_model)

AUTO_TILE_PIXELS = 2048 * 2048
"""Images (or TTA views) with more pixels than this are tiled automatically (``max_pixels``):
a full-width FCN-8s forward at 2048 x 2048 needs about 4 GB of activations in float32."""
AUTO_TILE = (1024, 1024)
"""The tile of automatic tiling."""
DEFAULT_OVERLAP = 256
"""Tile overlap (pixels) when none is given: each tile drops 128 px at edges shared with a
neighbour."""
DEFAULT_BATCH_PIXELS = 1 << 20
"""Pixels per batch in bucketed mode (4 VOC-sized images); a bucket's batch is this / its area."""
MAX_BATCH = 8
"""Most images in one batch."""
BUCKET_GRID = 32
"""Sizes that fit no planned bucket get a new bucket rounded up to this grid."""


@dataclasses.dataclass
class Prediction:
  """One image's result: ``classes`` (H, W) int32; ``probs`` (H, W, C) float32 or None."""

  index: int
  classes: np.ndarray
  probs: np.ndarray | None = None


def translation_period(model) -> int:
  """The input shift by which the model's output shifts exactly (its total stride): 32 for the
  VGG16 FCNs; a model may declare ``translation_period``; otherwise 1."""
  if hasattr(model, "translation_period"):
    return int(model.translation_period)
  bb = getattr(model, "backbone", None)
  if bb is not None and hasattr(bb, "coord_maps"):
    return int(round(1 / float(bb.coord_maps[bb.final_stage].scale)))
  return 1


def softmax(logits: np.ndarray) -> np.ndarray:
  """Softmax over the last axis, float32."""
  z = logits - logits.max(axis=-1, keepdims=True)
  e = np.exp(z, dtype=np.float32)
  return e / e.sum(axis=-1, keepdims=True)


class _ModelBackend:
  """Runs an NNX model: batches preprocessed on the host, zero-padded (as training pads), with
  the batch's mask of image pixels (``model(x, mask=mask)``, as the trainer's steps) when the
  model's ``__call__`` takes one (your own model need not)."""

  pads_safely = True

  def __init__(self, model, preprocessing):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from fcnjax.models import masking
    self.num_classes = int(model.num_classes)
    self.period = translation_period(model)
    bb = getattr(model, "backbone", None)
    self.input_multiple = int(getattr(bb, "input_multiple", 1))
    self.preprocessing = preprocessing
    graphdef, self.params, self.rest = nnx.split(model, nnx.Param, ...)
    takes_mask = masking.takes_mask(model)

    def forward(params, rest, x, mask, want):
      m = nnx.merge(graphdef, params, rest, copy=True)
      m.eval()
      logits = (m(x, mask=mask) if takes_mask else m(x)).astype(jnp.float32)
      return jnp.argmax(logits, -1).astype(jnp.int32) if want == "classes" else logits

    self._forward = jax.jit(forward, static_argnames="want")

  def __call__(self, batch: list, shape: tuple, rows: int, want: str) -> np.ndarray:
    x = np.zeros((rows, shape[0], shape[1], 3), np.float32)
    mask = np.zeros((rows, shape[0], shape[1]), bool)
    for i, rgb in enumerate(batch):
      x[i, :rgb.shape[0], :rgb.shape[1]] = self.preprocessing(rgb)
      mask[i, :rgb.shape[0], :rgb.shape[1]] = True
    return np.asarray(self._forward(self.params, self.rest, x, mask, want))


class _ExportedBackend:
  """Runs an exported artifact (:mod:`fcnjax.inference.export`): uint8 in, logits out; padding
  is the RGB colour its preprocessing maps to (nearly) zero."""

  def __init__(self, exported):
    self.exported = exported
    self.num_classes = int(exported.num_classes)
    self.period = int(exported.translation_period)
    self.input_multiple = int(exported.input_multiple)
    self.pad = np.asarray(exported.pad_value_rgb, np.uint8)
    self.pads_safely = bool(exported.bucket_padding_safe)

  def __call__(self, batch: list, shape: tuple, rows: int, want: str) -> np.ndarray:
    x = np.empty((rows, shape[0], shape[1], 3), np.uint8)
    x[...] = self.pad
    for i, rgb in enumerate(batch):
      x[i, :rgb.shape[0], :rgb.shape[1]] = rgb
    logits = np.asarray(self.exported(x), np.float32)
    return logits.argmax(-1).astype(np.int32) if want == "classes" else logits


@dataclasses.dataclass
class _Job:
  item: int          # position in the chunk
  view: int          # view of that item
  rgb: np.ndarray    # the pixels this job runs on
  tile: tiling.Tile | None


def _refuse_classifier(task: str, where) -> None:
  if task == "classification":
    raise ModelLoadError(f"{where}: an image classifier (one class per image), not a "
                         "segmentation model: serve it with python -m fcnjax.serve MODEL (class "
                         "probabilities per image)")


class Predictor:
  """Predict class maps / probabilities with a trained segmentation model.

  Args:
    weights: a training workdir, an fcnjax ``.safetensors``, a pytorch-fcn ``.pth``, an exported
      artifact (``python -m fcnjax.export``), a :class:`~fcnjax.inference.LoadedModel`, or an NNX
      model ((N, H, W, 3) preprocessed float32 -> (N, H, W, C) logits, with ``num_classes`` and
      ``preprocessing`` attributes, e.g. an :class:`~fcnjax.models.FCN`).
    step: with a workdir, the checkpoint to use (default: best, else latest).
    class_names, palette: override the model's (palette (n <= 256, 3) uint8).
    exact: run every image at its own size (see the module docstring).
    max_buckets: size buckets planned for :meth:`predict_many` in bucketed mode.
    tile: (h, w) of sliding-window tiles for every image; ``None``: only images above
      ``max_pixels`` pixels are tiled, with :data:`AUTO_TILE`.
    overlap: pixels shared by neighbouring tiles (:data:`DEFAULT_OVERLAP`).
    max_pixels: the automatic tiling threshold (:data:`AUTO_TILE_PIXELS`; ``None``: never).
    flip, scales: test-time augmentation (horizontal flip; input scale factors).
    batch_pixels, max_batch: batch sizes in bucketed mode (``batch_pixels`` / bucket area,
      between 1 and ``max_batch``).

  Raises :class:`~fcnjax.inference.ModelLoadError` / :class:`fcnjax.weights.WeightsError` for
  weights that cannot be loaded and ``ValueError`` for bad options (the message names the
  option).
  """

  def __init__(self, weights, *, step: int | None = None, class_names=None, palette=None,
               exact: bool = False, max_buckets: int = 8, tile: tuple | None = None,
               overlap: int = DEFAULT_OVERLAP, max_pixels: int | None = AUTO_TILE_PIXELS,
               flip: bool = False, scales: Iterable[float] = (1.0,),
               batch_pixels: int = DEFAULT_BATCH_PIXELS, max_batch: int = MAX_BATCH):
    self.scales = tuple(float(s) for s in scales)
    if not self.scales or any(not math.isfinite(s) or s <= 0 for s in self.scales):
      raise ValueError(f"scales must be positive numbers, got {list(scales)}")
    if tile is not None:
      tile = tuple(int(t) for t in tile)
      if len(tile) != 2 or min(tile) < 1:
        raise ValueError(f"tile must be (height, width) >= 1, got {tile}")
      if overlap >= min(tile):
        raise ValueError(f"overlap {overlap} must be smaller than the tile {tile}")
    if overlap < 0:
      raise ValueError(f"overlap must be >= 0, got {overlap}")
    if max_buckets < 1 or batch_pixels < 1 or max_batch < 1:
      raise ValueError("max_buckets, batch_pixels and max_batch must be >= 1")
    self.exact, self.max_buckets, self.tile, self.overlap = exact, int(max_buckets), tile, overlap
    self.max_pixels, self.flip = max_pixels, bool(flip)
    self.batch_pixels, self.max_batch = int(batch_pixels), int(max_batch)
    self.source = _describe_source(weights)
    self._init_backend(weights, step)
    if not self.backend.pads_safely:  # see the module docstring: such a model runs exact
      self.exact = True
    if class_names is not None:
      names = tuple(str(n) for n in class_names)
      if len(names) != self.num_classes:
        raise ValueError(f"{len(names)} class names for a {self.num_classes}-class model")
      self.class_names = names
    if palette is not None:
      pal = np.asarray(palette, np.uint8).reshape(-1, 3)
      full = np.array(self.palette)
      full[:len(pal)] = pal[:256]
      self.palette = full
    self.bucket_shapes: list = []
    self._planned = False
    self._programs: set = set()
    self.stats = collections.Counter()

  # -- set-up -----------------------------------------------------------------------------------
  def _init_backend(self, weights, step):
    from fcnjax.data.palette import VOC_PALETTE
    if isinstance(weights, (str, bytes)) or hasattr(weights, "__fspath__"):
      from fcnjax.inference import export as export_lib
      if export_lib.is_exported(weights):
        if step is not None:
          raise ValueError("step only applies to a training workdir")
        exported = export_lib.load_exported(weights)
        _refuse_classifier(getattr(exported, "task", "segmentation"), weights)
        self.backend = _ExportedBackend(exported)
        self.class_names = tuple(exported.class_names)
        self.palette = np.asarray(exported.palette, np.uint8)
        self.description = f"{weights} (exported, {exported.meta.get('platforms')})"
        return
      weights = load_model(weights, step=step)
    if hasattr(weights, "exported") and hasattr(weights, "translation_period"):  # ExportedModel
      self.backend = _ExportedBackend(weights)
      self.class_names, self.palette = tuple(weights.class_names), weights.palette
      self.description = "exported model"
      return
    if isinstance(weights, LoadedModel):
      _refuse_classifier(weights.task, weights.description)
      self.backend = _ModelBackend(weights.model, weights.preprocessing)
      self.class_names, self.palette = weights.class_names, weights.palette
      self.description = weights.description
      return
    if not hasattr(weights, "num_classes"):
      raise ValueError(f"cannot predict with {type(weights).__name__}: give a workdir, a weights "
                       "file, an exported artifact, a LoadedModel or an FCN model")
    from fcnjax import preprocessing as pp
    if hasattr(weights, "eval"):
      weights.eval()
    self.backend = _ModelBackend(weights, getattr(weights, "preprocessing", pp.CAFFE))
    self.class_names = default_class_names(int(weights.num_classes))
    self.palette = np.asarray(VOC_PALETTE, np.uint8)
    self.description = type(weights).__name__

  @property
  def num_classes(self) -> int:
    return self.backend.num_classes

  @property
  def programs_compiled(self) -> int:
    """Distinct (batch, height, width, output) programs run so far (one XLA compile each)."""
    return len(self._programs)

  # -- planning ---------------------------------------------------------------------------------
  def view_sizes(self, hw: tuple) -> list:
    """The (h, w) of every test-time-augmentation view of an image of size ``hw``."""
    h, w = hw
    return [(max(1, int(round(h * s))), max(1, int(round(w * s))))
            for s in self.scales for _ in range(2 if self.flip else 1)]

  def _tile_for(self, hw: tuple) -> tuple | None:
    if self.tile is not None and (hw[0] > self.tile[0] or hw[1] > self.tile[1]):
      return self.tile
    if self.tile is None and self.max_pixels is not None and hw[0] * hw[1] > self.max_pixels:
      return AUTO_TILE
    return None

  def plan(self, sizes) -> list:
    """Plan the size buckets for images of ``sizes`` ((h, w) each; their TTA views and untiled
    ones are what is planned). Returns the bucket shapes. Exact mode plans nothing."""
    views = [v for hw in sizes for v in self.view_sizes(tuple(hw)) if self._tile_for(v) is None]
    self._planned = True
    if self.exact or not views:
      self.bucket_shapes = []
      return []
    plan = buckets_lib.plan_buckets(np.asarray(views), self.max_buckets,
                                    granularity=max(1, self.backend.input_multiple))
    self.bucket_shapes = [tuple(map(int, s)) for s in plan.shape_list]
    return self.bucket_shapes

  def _shape_for(self, hw: tuple) -> tuple:
    """The program shape a whole (untiled) view of size ``hw`` runs at."""
    if self.exact:  # the aligned model zero-pads to its multiple itself: same input, fewer shapes
      return _round_up(hw, self.backend.input_multiple)
    fits = [s for s in self.bucket_shapes if s[0] >= hw[0] and s[1] >= hw[1]]
    if fits:
      return min(fits, key=lambda s: (s[0] * s[1], s))
    g = max(BUCKET_GRID, self.backend.input_multiple)
    shape = (-(-hw[0] // g) * g, -(-hw[1] // g) * g)
    self.bucket_shapes.append(shape)
    return shape

  def _batch_rows(self, shape: tuple) -> int:
    if self.exact:
      return 1
    return max(1, min(self.max_batch, self.batch_pixels // (shape[0] * shape[1])))

  # -- prediction -------------------------------------------------------------------------------
  def predict(self, image) -> np.ndarray:
    """One image (array, PIL image or path) -> (H, W) int32 class ids, run at its own size
    (or tiled above ``max_pixels``)."""
    return self._one(image, proba=False).classes

  def predict_proba(self, image) -> np.ndarray:
    """One image -> (H, W, C) float32 class probabilities (softmax; averaged over TTA views)."""
    return self._one(image, proba=True).probs

  def _one(self, image, proba: bool) -> Prediction:
    rgb = images_lib.to_rgb(image)
    exact = self.exact
    self.exact = True  # one image: no reason to pad it
    try:
      return self._run_chunk([rgb], proba)[0]
    finally:
      self.exact = exact

  def predict_many(self, images, *, proba: bool = False, sizes=None,
                   chunk: int = 32) -> Iterator[Prediction]:
    """Predict every image of ``images`` (arrays, PIL images or paths); yields
    :class:`Prediction` s in input order.

    Buckets are planned on ``sizes`` ((h, w) per image) if given, else on the images' sizes
    when ``images`` is a sequence of arrays, else on the first ``chunk`` images (later sizes that
    fit no bucket get one rounded up to a 32-pixel grid). ``proba``: also return probabilities.
    An image that cannot be read raises :class:`~fcnjax.inference.images.ImageReadError`.
    """
    records = ((i, images_lib.to_rgb(im, f"image {i}")) for i, im in enumerate(images))
    if sizes is None and isinstance(images, (list, tuple)) and all(
        isinstance(im, np.ndarray) for im in images):
      sizes = [im.shape[:2] for im in images]
    for i, r in self.predict_records(records, proba=proba, sizes=sizes, chunk=chunk):
      r.index = i
      yield r

  def predict_records(self, records, *, proba: bool = False, sizes=None, chunk: int = 32):
    """The engine behind :meth:`predict_many` and the CLI: ``records`` yields ``(key, rgb)``
    (RGB uint8 (H, W, 3)) or ``(key, exception)`` for an input that could not be read; yields
    ``(key, Prediction)`` or ``(key, exception)`` in the same order. Work is done ``chunk``
    records at a time (and fewer when their probabilities would exceed ~512 MB)."""
    if sizes is not None:
      self.plan(sizes)
    planned = self._planned
    batch, budget = [], 0
    for key, rgb in records:
      batch.append((key, rgb))
      if isinstance(rgb, np.ndarray):
        budget += rgb.shape[0] * rgb.shape[1] * self.num_classes * 4 * len(self.view_sizes((1, 1)))
      if len(batch) >= chunk or budget > 512 << 20:
        if not planned:
          self.plan([r.shape[:2] for _, r in batch if isinstance(r, np.ndarray)])
          planned = True
        yield from self._finish(batch, proba)
        batch, budget = [], 0
    if batch:
      if not planned:
        self.plan([r.shape[:2] for _, r in batch if isinstance(r, np.ndarray)])
      yield from self._finish(batch, proba)

  def _finish(self, batch, proba):
    ok = [(k, r) for k, r in batch if isinstance(r, np.ndarray)]
    results = iter(self._run_chunk([r for _, r in ok], proba)) if ok else iter(())
    for key, rgb in batch:
      if isinstance(rgb, np.ndarray):
        self.stats["images"] += 1
        yield key, next(results)
      else:
        self.stats["failures"] += 1
        yield key, rgb

  def _views(self, rgb: np.ndarray) -> list:
    out = []
    for hw in dict.fromkeys(self.view_sizes(rgb.shape[:2])):
      v = images_lib.resize_rgb(rgb, hw)
      out.append((v, False))
      if self.flip:
        out.append((np.ascontiguousarray(v[:, ::-1]), True))
    return out

  def _run_chunk(self, rgbs: list, proba: bool) -> list:
    """Predict a list of RGB images; returns one :class:`Prediction` each (index = position)."""
    views = [self._views(rgb) for rgb in rgbs]
    single = all(len(v) == 1 and v[0][0].shape == rgb.shape for v, rgb in zip(views, rgbs))
    jobs, stitchers = collections.defaultdict(list), {}
    for i, item_views in enumerate(views):
      for j, (v, _) in enumerate(item_views):
        tile = self._tile_for(v.shape[:2])
        if tile is None:
          jobs[("whole", self._shape_for(v.shape[:2]))].append(_Job(i, j, v, None))
          continue
        stitchers[i, j] = tiling.Stitcher(v.shape[0], v.shape[1], self.num_classes)
        for t in tiling.plan_tiles(v.shape[0], v.shape[1], tile, self.overlap,
                                   self.backend.period):
          part = v[t.rows[0]:t.rows[1], t.cols[0]:t.cols[1]]
          # exact: edge tiles at their own size (tiled == whole, see tiling); else padded to
          # the full tile, so a folder of any sizes runs one tile program
          shape = _round_up(t.shape, self.backend.input_multiple) if self.exact else tile
          jobs[("tile", shape)].append(_Job(i, j, part, t))
    want_classes = single and not proba and not stitchers
    outputs = {}
    for (kind, shape), group in jobs.items():
      rows = self._batch_rows(shape)
      want = "classes" if want_classes else "logits"
      for start in range(0, len(group), rows):
        part = group[start:start + rows]
        self._programs.add((rows, shape, want))
        out = self.backend([j.rgb for j in part], shape, rows, want)
        for job, o in zip(part, out):
          o = o[:job.rgb.shape[0], :job.rgb.shape[1]]
          if job.tile is None:
            outputs[job.item, job.view] = o
          else:
            stitchers[job.item, job.view].add(job.tile, o)
    for key, s in stitchers.items():
      outputs[key] = s.result()
    results = []
    for i, (rgb, item_views) in enumerate(zip(rgbs, views)):
      if want_classes:
        results.append(Prediction(i, outputs[i, 0].astype(np.int32)))
        continue
      if len(item_views) == 1 and item_views[0][0].shape == rgb.shape:
        logits = outputs[i, 0]
        results.append(Prediction(i, logits.argmax(-1).astype(np.int32),
                                  softmax(logits) if proba else None))
        continue
      probs = np.zeros(rgb.shape[:2] + (self.num_classes,), np.float32)
      for j, (_, flipped) in enumerate(item_views):
        p = images_lib.resize_maps(softmax(outputs[i, j]), rgb.shape[:2])
        probs += p[:, ::-1] if flipped else p
      probs /= len(item_views)
      results.append(Prediction(i, probs.argmax(-1).astype(np.int32), probs if proba else None))
    return results


def _round_up(hw: tuple, multiple: int) -> tuple:
  return tuple(-(-int(v) // multiple) * multiple for v in hw)


def _describe_source(weights) -> str:
  if isinstance(weights, (str, bytes)) or hasattr(weights, "__fspath__"):
    return str(weights)
  return type(weights).__name__

