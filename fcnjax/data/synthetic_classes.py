"""A built-in classification dataset: 5 classes told apart only by fine structure.

``write_synthetic_classes(root, num_train, num_val, seed)`` writes the class-per-folder layout
(tf_flowers / torchvision ``ImageFolder``) that :func:`fcnjax.data.classification.
class_folder_source` reads::

    root/train/<class>/<nnnnn>.png   RGB PNG            root/train/boxes.json
    root/val/<class>/<nnnnn>.png                        root/val/boxes.json

Each image is a noisy, unevenly lit background with ONE rectangular object at a random place; the
object is filled with its class's pattern (:func:`pattern`, random phase):

  * ``vstripes2``: vertical stripes, period 2 px (1 on, 1 off);
  * ``vstripes4``: vertical stripes, period 4 px (2 on, 2 off);
  * ``hstripes2``: horizontal stripes, period 2 px;
  * ``checker1``: a checkerboard of 1-px squares;
  * ``dots3``: 1-px dots on a 3 px grid.

Every pattern is scaled to zero mean and unit standard deviation over its period before it is
multiplied by the object's contrast, so the object's mean colour is its base colour and its
pixel spread is its contrast, both drawn from the same distribution for every class: neither
colour nor mean brightness (nor the object's size or place) tells the class; only the pattern
does, and resizing an image to one size (the Keras tutorial's way) blurs periods of 2-4 px away.

``boxes.json`` maps each image's id (``"<class>/<nnnnn>.png"``) to its object's box ``[x0, y0, x1,
y1]`` in pixels (exclusive ends), so that an explanation (Grad-CAM) can be checked against it.

Sizes: half of the images (class-balanced) are long thin strips like the Keras tutorial's
(``strip_h`` 24-40 x ``strip_w`` 240-400 px), half photo-like (each side independently in
``photo_side`` 48-160 px, aspect ratios up to ~3:1). Classes are balanced exactly (counts differ
by at most one) and every image is a function of ``(seed, split, index)``.

``ensure_builtin_classes(cache_dir, ...)`` writes it once under
``<base>/classes-<hash of the parameters and generator version>`` (a temporary folder renamed into
place when complete; base as for :func:`fcnjax.data.synthetic.ensure_builtin_dataset`).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import pathlib

import numpy as np
from PIL import Image

from fcnjax.data import synthetic

CLASS_NAMES = ("vstripes2", "vstripes4", "hstripes2", "checker1", "dots3")
"""Class id -> name; ids are positions in this tuple."""
GENERATOR_VERSION = 1
"""Bumped whenever the pictures change (the cache folder's hash includes it)."""
SPLITS = ("train", "val")
SAVE_THREADS = 2
"""Threads that compress and write the PNGs."""
BOXES_FILE = "boxes.json"
"""Per split folder: ``{id: [x0, y0, x1, y1]}``, pixels, exclusive ends."""

STRIP_H = (24, 40)
STRIP_W = (240, 400)
PHOTO_SIDE = (48, 160)
"""Default size ranges (inclusive, pixels) of the strips (height, width) and photo-like sides."""
OBJECT_COLOUR = (70.0, 160.0)
"""Object base colour per channel (uniform): the brightest dot (2.8 x the contrast above the base)
and the darkest stripe stay inside 0..255 before the pixel noise."""
OBJECT_CONTRAST = (16.0, 32.0)
"""Object pattern standard deviation (grey levels, uniform), before the channel gains 0.6-1."""
BACKGROUND_COLOUR = (60.0, 190.0)
BACKGROUND_SHADING = 20.0
"""Standard deviation of the background's smooth (sigma 8 px) shading, grey levels."""
PIXEL_NOISE = 5.0
"""Standard deviation of the i.i.d. (uniform) noise added to every pixel and channel, object
included, grey levels."""


def _binary_pattern(name, y, x):
  """The raw 0/1 pattern of class ``name`` at pixel coordinates ``y``, ``x`` (int arrays of one
  shape, phase already added)."""
  if name == "vstripes2":
    return x % 2 == 0
  if name == "vstripes4":
    return x % 4 < 2
  if name == "hstripes2":
    return y % 2 == 0
  if name == "checker1":
    return (x + y) % 2 == 0
  if name == "dots3":
    return (x % 3 == 0) & (y % 3 == 0)
  raise ValueError(f"unknown pattern {name!r}; patterns: {', '.join(CLASS_NAMES)}")


_ON_FRACTION = {"vstripes2": 0.5, "vstripes4": 0.5, "hstripes2": 0.5, "checker1": 0.5,
                "dots3": 1 / 9}


def pattern(name: str, h: int, w: int, phase=(0, 0)) -> np.ndarray:
  """Class ``name``'s fill pattern (h, w) float32, zero mean and unit standard deviation over a
  whole period (so over any box whose sides are multiples of the period; close to it otherwise).
  ``phase`` (dy, dx) shifts it by whole pixels."""
  yy, xx = np.mgrid[0:h, 0:w]
  on = _binary_pattern(name, yy + int(phase[0]), xx + int(phase[1])).astype(np.float32)
  p = _ON_FRACTION[name]
  return (on - p) / np.float32(np.sqrt(p * (1 - p)))


PERIODS = {"vstripes2": (1, 2), "vstripes4": (1, 4), "hstripes2": (2, 1), "checker1": (2, 2),
           "dots3": (3, 3)}
"""name -> (period in y, period in x), pixels: the phases a pattern can take."""


def draw_size(rng, strip: bool, strip_h=STRIP_H, strip_w=STRIP_W, photo_side=PHOTO_SIDE):
  """(h, w) of one image: a thin strip or a photo-like shape (inclusive ranges, pixels)."""
  if strip:
    return int(rng.integers(strip_h[0], strip_h[1] + 1)), int(rng.integers(strip_w[0],
                                                                           strip_w[1] + 1))
  h, w = rng.integers(photo_side[0], photo_side[1] + 1, 2)
  return int(h), int(w)


def draw_box(rng, h: int, w: int):
  """A random object box (x0, y0, x1, y1), exclusive ends, inside an h x w image, at a uniformly
  random place. Its sides come from the same ranges whatever the class: in a strip (``w >= 4 h``)
  half to all but 3 px of the height and 24 to min(96, w / 3) px wide; else each side 12 px to
  60 % of the image's side."""
  if w >= 4 * h:  # a thin strip: the object spans most of the height
    bh = int(rng.integers(max(8, h // 2), max(8, h - 3) + 1))
    bw = int(rng.integers(24, max(24, min(96, w // 3)) + 1))
  else:
    bh = int(rng.integers(12, max(12, int(0.6 * h)) + 1))
    bw = int(rng.integers(12, max(12, int(0.6 * w)) + 1))
  bh, bw = min(bh, h), min(bw, w)
  y0 = int(rng.integers(0, h - bh + 1))
  x0 = int(rng.integers(0, w - bw + 1))
  return x0, y0, x0 + bw, y0 + bh


def render_example(rng, cls: int, h: int, w: int):
  """One image of class ``cls``: (image uint8 (h, w, 3) RGB, box (x0, y0, x1, y1) int).

  Drawn channels-first (3, h, w), so that every array operation runs along contiguous rows."""
  name = CLASS_NAMES[cls]
  tint = rng.uniform(0.7, 1.0, 3).astype(np.float32)[:, None, None]
  base = rng.uniform(*BACKGROUND_COLOUR, 3).astype(np.float32)[:, None, None]
  shade = synthetic._smooth(rng, h, w, 8.0)
  img = base + (BACKGROUND_SHADING * tint) * shade
  x0, y0, x1, y1 = draw_box(rng, h, w)
  py, px = PERIODS[name]
  phase = (int(rng.integers(py)), int(rng.integers(px)))
  fill = pattern(name, y1 - y0, x1 - x0, phase)
  colour = rng.uniform(*OBJECT_COLOUR, 3).astype(np.float32)[:, None, None]
  gains = rng.uniform(0.6, 1.0, 3).astype(np.float32) * np.float32(rng.uniform(*OBJECT_CONTRAST))
  img[:, y0:y1, x0:x1] = colour + gains[:, None, None] * fill
  # uniform noise of standard deviation PIXEL_NOISE (cheaper to draw than Gaussian noise)
  img += rng.random((3, h, w), np.float32) * np.float32(PIXEL_NOISE * 12 ** 0.5) - np.float32(
      PIXEL_NOISE * 3 ** 0.5)
  out = np.clip(img, 0, 255)
  return np.rint(out).astype(np.uint8).transpose(1, 2, 0).copy(), (x0, y0, x1, y1)


def example_plan(n: int, seed: int, split: str):
  """(class (n,) int64, strip (n,) bool) of a split: classes balanced exactly and half of each
  class strips, in a seeded random order (a function of (n, seed, split))."""
  rng = np.random.default_rng((int(seed), SPLITS.index(split)))  # not an image's (3 numbers)
  perm = rng.permutation(n)
  c = len(CLASS_NAMES)
  return perm % c, (perm // c) % 2 == 1


def write_synthetic_classes(root, num_train: int = 1000, num_val: int = 250, seed: int = 0, *,
                            strip_h=STRIP_H, strip_w=STRIP_W, photo_side=PHOTO_SIDE,
                            compress_level: int = 1) -> pathlib.Path:
  """Write ``root/{train,val}/<class>/<nnnnn>.png`` + ``root/{train,val}/boxes.json``; returns
  ``root``. Image i of a split uses ``numpy.random.default_rng((seed, split number, i))``; its
  class and strip-or-photo choice come from :func:`example_plan`. PNGs are compressed by
  :data:`SAVE_THREADS` threads while the next images are drawn (zlib runs without the GIL)."""
  root = pathlib.Path(root)
  with concurrent.futures.ThreadPoolExecutor(SAVE_THREADS) as pool:
    for split, n in zip(SPLITS, (num_train, num_val)):
      folder = root / split
      for name in CLASS_NAMES:
        (folder / name).mkdir(parents=True, exist_ok=True)
      classes, strips = example_plan(n, seed, split)
      boxes, saves = {}, []
      for i in range(n):
        rng = np.random.default_rng((int(seed), SPLITS.index(split), i))
        h, w = draw_size(rng, bool(strips[i]), strip_h, strip_w, photo_side)
        image, box = render_example(rng, int(classes[i]), h, w)
        eid = f"{CLASS_NAMES[classes[i]]}/{i:05d}.png"
        saves.append(pool.submit(Image.fromarray(image, "RGB").save, folder / eid,
                                 compress_level=compress_level))
        boxes[eid] = [int(v) for v in box]
      for f in saves:
        f.result()  # re-raises a failed write
      (folder / BOXES_FILE).write_text(json.dumps(boxes, indent=0, sort_keys=True) + "\n")
  return root


def params_hash(**params) -> str:
  """12 hex digits naming a parameter set (with the generator version) in the cache."""
  text = json.dumps({"version": GENERATOR_VERSION, **params}, sort_keys=True, default=list)
  return hashlib.sha256(text.encode()).hexdigest()[:12]


def ensure_builtin_classes(cache_dir=None, *, num_train: int = 1000, num_val: int = 250,
                           seed: int = 0, strip_h=STRIP_H, strip_w=STRIP_W,
                           photo_side=PHOTO_SIDE) -> pathlib.Path:
  """Write the dataset once (:func:`write_synthetic_classes`) and return its root (holding
  ``train/`` and ``val/``): ``<base>/classes-<params_hash>``, reused when complete."""
  params = dict(num_train=int(num_train), num_val=int(num_val), seed=int(seed),
                strip_h=[int(v) for v in strip_h], strip_w=[int(v) for v in strip_w],
                photo_side=[int(v) for v in photo_side])
  if min(num_train, num_val) < len(CLASS_NAMES):  # else a class folder would be empty
    raise ValueError(f"num_train and num_val must be >= {len(CLASS_NAMES)} (one image per "
                     f"class), got {num_train}, {num_val}")
  for key in ("strip_h", "strip_w", "photo_side"):
    lo, hi = params[key]
    if not 8 <= lo <= hi:
      raise ValueError(f"{key} must be (lo, hi) with 8 <= lo <= hi, got {tuple(params[key])}")
  final = synthetic._write_once(
      synthetic._cache_base(cache_dir), f"classes-{params_hash(**params)}",
      lambda tmp: write_synthetic_classes(tmp, num_train, num_val, seed, strip_h=strip_h,
                                          strip_w=strip_w, photo_side=photo_side))
  return final
