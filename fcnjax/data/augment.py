"""Training augmentation: horizontal flip, random scale, colour jitter.

Every random number is drawn when the epoch is planned, from ``numpy.random.default_rng((seed,
epoch, 7))`` over the whole dataset at once, so example ``index``'s augmentation is a pure function of
(seed, epoch, index) - independent of workers, batch order and restarts. The scale is drawn at plan
time because it decides the example's size and so its bucket.

Scaling and buckets: :func:`planning_sizes` returns the sizes at a grid of scales spanning
``scale_range`` (its ends included); bucket shapes planned on them hold the largest scale of the
largest image, so no image is ever resized down. If bucket shapes are given that are smaller (e.g.
a memory cap), an image whose scaled size fits no bucket is scaled down (aspect kept) to fit the
largest bucket - :func:`fit_sizes` - and that is what the plan records.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image



@dataclasses.dataclass(frozen=True)
class Augment:
  """``flip``: mirror left-right with probability 1/2. ``scale_range``: (lo, hi) uniform scale
  factor, None for no scaling (images bilinear, labels nearest). ``color_jitter``: j > 0 draws
  brightness, contrast and saturation factors uniformly in [1 - j, 1 + j]."""

  flip: bool = True
  scale_range: tuple | None = (0.5, 2.0)
  color_jitter: float = 0.0

  def __post_init__(self):
    if self.scale_range is not None:
      lo, hi = self.scale_range
      if not 0 < lo <= hi:
        raise ValueError(f"scale_range must be 0 < lo <= hi, got {self.scale_range}")
    if not 0 <= self.color_jitter < 1:
      raise ValueError("color_jitter must be in [0, 1)")


@dataclasses.dataclass(frozen=True)
class AugmentParams:
  """Per-example draws for one epoch: ``flip`` (N,) bool, ``scale`` (N,) float64,
  ``jitter`` (N, 3) float32 brightness/contrast/saturation factors (1 = unchanged)."""

  flip: np.ndarray
  scale: np.ndarray
  jitter: np.ndarray


def draw_params(aug: Augment | None, seed: int, epoch: int, n: int) -> AugmentParams:
  """The epoch's augmentation draws for examples 0..n-1 (identity when ``aug`` is None)."""
  rng = np.random.default_rng((int(seed), int(epoch), 7))
  flip = rng.random(n) < 0.5
  scale = rng.uniform(*aug.scale_range, n) if aug and aug.scale_range else np.ones(n)
  j = aug.color_jitter if aug else 0.0
  jitter = rng.uniform(1 - j, 1 + j, (n, 3)).astype(np.float32)
  if aug is None or not aug.flip:
    flip = np.zeros(n, bool)
  if j == 0:
    jitter = np.ones((n, 3), np.float32)
  return AugmentParams(flip, scale, jitter)


def scaled_sizes(sizes, scale) -> np.ndarray:
  """(N, 2) (h, w) times (N,) scale, rounded, at least 1 pixel."""
  sizes = np.asarray(sizes, np.float64).reshape(-1, 2)
  return np.maximum(np.rint(sizes * np.asarray(scale, np.float64)[:, None]), 1).astype(np.int64)


def planning_sizes(sizes, aug: Augment | None, num_scales: int = 9) -> np.ndarray:
  """Sizes to plan buckets on: each size at ``num_scales`` evenly spaced scales of the range."""
  sizes = np.asarray(sizes, np.int64).reshape(-1, 2)
  if aug is None or aug.scale_range is None:
    return sizes
  scales = np.linspace(*aug.scale_range, num_scales)
  return np.concatenate([scaled_sizes(sizes, np.full(len(sizes), s)) for s in scales])


def fit_sizes(sizes, shapes) -> np.ndarray:
  """Sizes that fit no bucket are scaled down (aspect kept, floor) to fit the largest one."""
  sizes = np.asarray(sizes, np.int64).reshape(-1, 2).copy()
  shapes = np.asarray(shapes, np.int64).reshape(-1, 2)
  fits_any = ((shapes[None, :, 0] >= sizes[:, None, 0])
              & (shapes[None, :, 1] >= sizes[:, None, 1])).any(1)
  if fits_any.all():
    return sizes
  big = shapes[np.argmax(shapes[:, 0] * shapes[:, 1])]
  bad = ~fits_any
  f = np.minimum(big[0] / sizes[bad, 0], big[1] / sizes[bad, 1])
  sizes[bad, 0] = np.clip(np.floor(sizes[bad, 0] * f), 1, big[0])
  sizes[bad, 1] = np.clip(np.floor(sizes[bad, 1] * f), 1, big[1])
  return sizes


def apply(image: np.ndarray, label: np.ndarray, out_hw, flip: bool, jitter) -> tuple:
  """Resize to ``out_hw`` (image bilinear, label nearest), flip, jitter. uint8 in, uint8 out."""
  h, w = int(out_hw[0]), int(out_hw[1])
  if image.shape[:2] != (h, w):
    image = np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))
    label = np.asarray(Image.fromarray(label).resize((w, h), Image.NEAREST))
  if flip:
    image, label = image[:, ::-1], label[:, ::-1]
  if not np.all(np.asarray(jitter) == 1):
    image = color_jitter(image, jitter)
  return np.ascontiguousarray(image), np.ascontiguousarray(label)


def color_jitter(image: np.ndarray, factors) -> np.ndarray:
  """RGB uint8 (H, W, 3) with brightness, contrast, saturation factors applied; uint8 out."""
  b, c, s = (float(v) for v in factors)
  x = image.astype(np.float32) * b
  grey = x @ np.array([0.299, 0.587, 0.114], np.float32)
  x = (x - grey.mean()) * c + grey.mean()
  grey = x @ np.array([0.299, 0.587, 0.114], np.float32)
  x = (x - grey[..., None]) * s + grey[..., None]
  return np.clip(np.rint(x), 0, 255).astype(np.uint8)


__all__ = ["Augment", "AugmentParams", "draw_params", "scaled_sizes", "planning_sizes",
           "fit_sizes", "apply", "color_jitter"]
