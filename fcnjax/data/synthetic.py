"""A built-in segmentation dataset, written to disk in the PASCAL VOC 2012 layout.

``write_synthetic_voc(root, num_train=..., num_val=..., scale=..., seed=...)`` writes::

    root/VOCdevkit/VOC2012/JPEGImages/<id>.jpg           RGB JPEG
    root/VOCdevkit/VOC2012/SegmentationClass/<id>.png    palette PNG (VOC palette), 255 = void
    root/VOCdevkit/VOC2012/ImageSets/Segmentation/{train,val,trainval}.txt

so that :func:`fcnjax.data.readers.voc_source` reads it like the real thing. Each image holds 1-3
objects of the 20 VOC classes on a cluttered, low-contrast background. A class is a shape plus a
fill texture (:data:`CLASS_SHAPES`): 18 distinct shapes, squares and discs also in a striped
version. Object colours come from one shared palette, so colour never identifies a class. Objects
span 36-72 % of the image's short side; a void band (255) of ``max(1, round(4 * scale))`` pixels
runs along every object boundary, as in VOC. Image sizes are drawn from the real VOC 2012
segmentation size table (``voc2012_seg_sizes.csv``, 2,905 images, 387 shapes) times ``scale``.
Everything is a function of ``seed`` (image i uses ``numpy.random.default_rng((seed, i))``).

``ensure_builtin_dataset(cache_dir=None, ...)`` writes it once under
``~/.cache/fcnjax/builtin_voc_<params>`` (via a temporary folder renamed into place, so an
interrupted write never leaves a half dataset) and returns the VOC2012 folder.
"""

from __future__ import annotations

import csv
import os
import pathlib
import shutil
import tempfile
from importlib import resources

import numpy as np
import scipy.ndimage
from PIL import Image, ImageDraw

from fcnjax.data import palette

# class index -> (shape, texture); index 0 is background.
CLASS_SHAPES = {
    1: ("disc", "solid"), 2: ("square", "solid"), 3: ("triangle", "solid"), 4: ("ring", "solid"),
    5: ("plus", "solid"), 6: ("star", "solid"), 7: ("ellipse", "solid"), 8: ("diamond", "solid"),
    9: ("u_shape", "solid"), 10: ("square", "stripes"), 11: ("disc", "stripes"),
    12: ("triangle_down", "solid"), 13: ("x_cross", "solid"), 14: ("crescent", "solid"),
    15: ("frame", "solid"), 16: ("half_disc", "solid"), 17: ("hourglass", "solid"),
    18: ("tee", "solid"), 19: ("bar", "solid"), 20: ("arrow", "solid"),
}
GENERATOR_VERSION = 4
"""Bumped whenever the pictures change, so cached datasets of older versions are not reused."""
OBJECT_COLORS = np.array([
    (220, 40, 40), (40, 180, 60), (50, 80, 220), (235, 200, 40), (200, 60, 200), (40, 200, 210),
    (245, 130, 30), (250, 250, 250), (25, 25, 25), (150, 90, 40), (130, 200, 120), (120, 120, 250),
], np.uint8)
"""Shared by all classes: colour alone cannot tell a class."""


def voc_sizes() -> np.ndarray:
  """The real VOC 2012 segmentation (train + val) image sizes, (2905, 2) int (height, width)."""
  text = resources.files("fcnjax.data").joinpath("voc2012_seg_sizes.csv").read_text()
  rows = list(csv.DictReader(text.splitlines()))
  return np.array([(int(r["height"]), int(r["width"])) for r in rows], np.int64)


def _poly(kind, cx, cy, rx, ry):
  """Polygon vertices for the polygonal shapes, centred at (cx, cy) with radii (rx, ry)."""
  def reg(n, phase, rr=1.0):
    a = phase + 2 * np.pi * np.arange(n) / n
    return [(cx + rr * rx * np.cos(t), cy + rr * ry * np.sin(t)) for t in a]
  if kind == "triangle":
    return reg(3, -np.pi / 2)
  if kind == "triangle_down":
    return reg(3, np.pi / 2)
  if kind == "diamond":
    return reg(4, 0)
  if kind == "hourglass":
    return [(cx - rx, cy - ry), (cx + rx, cy - ry), (cx - rx, cy + ry), (cx + rx, cy + ry)]
  if kind == "arrow":
    return [(cx - rx, cy - 0.3 * ry), (cx + 0.1 * rx, cy - 0.3 * ry), (cx + 0.1 * rx, cy - ry),
            (cx + rx, cy), (cx + 0.1 * rx, cy + ry), (cx + 0.1 * rx, cy + 0.3 * ry),
            (cx - rx, cy + 0.3 * ry)]
  if kind == "star":
    outer, inner = reg(5, -np.pi / 2), reg(5, -np.pi / 2 + np.pi / 5, 0.42)
    return [p for pair in zip(outer, inner) for p in pair]
  raise KeyError(kind)


def _shape_mask(kind, h, w, cx, cy, r, aspect):
  """Boolean (h, w) mask of one shape with radius ``r`` pixels and x/y ``aspect``."""
  img = Image.new("L", (w, h), 0)
  d = ImageDraw.Draw(img)
  rx, ry = r * aspect, r / aspect
  box = [cx - rx, cy - ry, cx + rx, cy + ry]
  t = max(2.0, 0.4 * r)  # stroke width for plus, x_cross, ring, frame, tee, u_shape
  if kind in ("disc", "ring", "crescent"):
    d.ellipse(box, fill=1)
    if kind == "ring":
      d.ellipse([cx - rx + t, cy - ry + t, cx + rx - t, cy + ry - t], fill=0)
    elif kind == "crescent":
      d.ellipse([cx - rx + 0.55 * rx, cy - ry - 0.1 * ry, cx + rx + 0.55 * rx, cy + ry - 0.1 * ry],
                fill=0)
  elif kind == "ellipse":
    d.ellipse([cx - 1.4 * rx, cy - 0.6 * ry, cx + 1.4 * rx, cy + 0.6 * ry], fill=1)
  elif kind in ("square", "frame"):
    d.rectangle([cx - 0.85 * rx, cy - 0.85 * ry, cx + 0.85 * rx, cy + 0.85 * ry], fill=1)
    if kind == "frame":
      d.rectangle([cx - 0.85 * rx + t, cy - 0.85 * ry + t, cx + 0.85 * rx - t, cy + 0.85 * ry - t],
                  fill=0)
  elif kind == "bar":
    d.rectangle([cx - 1.3 * rx, cy - 0.4 * ry, cx + 1.3 * rx, cy + 0.4 * ry], fill=1)
  elif kind == "half_disc":
    d.pieslice([cx - rx, cy - ry * 0.6, cx + rx, cy + ry * 1.4], 180, 360, fill=1)
  elif kind == "plus":
    d.rectangle([cx - t / 2, cy - ry, cx + t / 2, cy + ry], fill=1)
    d.rectangle([cx - rx, cy - t / 2, cx + rx, cy + t / 2], fill=1)
  elif kind == "x_cross":
    d.line([(cx - rx, cy - ry), (cx + rx, cy + ry)], fill=1, width=int(round(t)))
    d.line([(cx - rx, cy + ry), (cx + rx, cy - ry)], fill=1, width=int(round(t)))
  elif kind == "u_shape":
    d.rectangle([cx - rx, cy - ry, cx - rx + t, cy + ry], fill=1)
    d.rectangle([cx + rx - t, cy - ry, cx + rx, cy + ry], fill=1)
    d.rectangle([cx - rx, cy + ry - t, cx + rx, cy + ry], fill=1)
  elif kind == "tee":
    d.rectangle([cx - rx, cy - ry, cx + rx, cy - ry + t], fill=1)
    d.rectangle([cx - t / 2, cy - ry, cx + t / 2, cy + ry], fill=1)
  else:
    d.polygon(_poly(kind, cx, cy, rx, ry), fill=1)
  return np.asarray(img, bool)


def _background(rng, h, w):
  """Cluttered, low-contrast RGB float (h, w, 3): smooth colour field + faint strokes and blobs."""
  base = rng.uniform(70, 170, 3)
  coarse = rng.normal(0, 18, (max(2, h // 12), max(2, w // 12), 3))
  field = np.stack([np.asarray(Image.fromarray(coarse[..., c].astype(np.float32), mode="F")
                               .resize((w, h), Image.BILINEAR)) for c in range(3)], -1)
  img = base + field
  clutter = Image.new("L", (w, h), 0)
  d = ImageDraw.Draw(clutter)
  for _ in range(rng.integers(4, 10)):
    x0, y0 = rng.uniform(0, w), rng.uniform(0, h)
    s = rng.uniform(0.05, 0.25) * min(h, w)
    if rng.random() < 0.5:
      d.line([(x0, y0), (x0 + rng.normal(0, s), y0 + rng.normal(0, s))],
             fill=int(rng.integers(60, 255)), width=int(rng.integers(1, 4)))
    else:
      d.ellipse([x0 - s / 2, y0 - s / 3, x0 + s / 2, y0 + s / 3], fill=int(rng.integers(60, 255)))
  tint = rng.normal(0, 1, 3)
  img += (np.asarray(clutter, np.float32) / 255.0)[..., None] * 25 * tint / np.abs(tint).max()
  return img + rng.normal(0, 4, (h, w, 3))


def _texture(texture, rng, h, w, r, c1, c2):
  """Fill colours (h, w, 3) float for a texture; stripe / checker period ~ r / 2.5 pixels."""
  yy, xx = np.mgrid[0:h, 0:w]
  period = max(4, int(round(r / 2.5)))
  if texture == "solid":
    sel = np.zeros((h, w), bool)
  elif texture == "stripes":
    sel = (yy // (period // 2 or 1)) % 2 == 0
  elif texture == "checker":
    sel = ((yy // (period // 2 or 1)) + (xx // (period // 2 or 1))) % 2 == 0
  else:
    raise KeyError(texture)
  out = np.where(sel[..., None], c2, c1).astype(np.float32)
  return out + rng.normal(0, 6, (h, w, 3))


def render_example(rng, h, w, band):
  """One (image uint8 (h, w, 3), label uint8 (h, w)) pair."""
  img = _background(rng, h, w)
  label = np.zeros((h, w), np.uint8)
  short = min(h, w)
  for n in range(int(rng.integers(1, 4))):
    cls = int(rng.integers(1, 21))
    kind, texture = CLASS_SHAPES[cls]
    r = rng.uniform(0.18, 0.36) * short  # radius: the object spans 36-72 % of the short side
    aspect = rng.uniform(0.9, 1.1)
    for _ in range(8):  # mostly inside the frame, overlapping earlier objects by <= 15 %
      mx, my = min(1.1 * r, w / 2), min(1.1 * r, h / 2)
      cx, cy = rng.uniform(mx, w - mx), rng.uniform(my, h - my)
      m = _shape_mask(kind, h, w, cx, cy, r, aspect)
      if (label[m] > 0).sum() <= 0.15 * m.sum():
        break
    else:
      continue
    if m.sum() < 16:
      continue
    i1, i2 = rng.choice(len(OBJECT_COLORS), 2, replace=False)
    fill = _texture(texture, rng, h, w, r, OBJECT_COLORS[i1], OBJECT_COLORS[i2])
    img[m] = fill[m]
    label[m] = cls
  edges = np.zeros((h, w), bool)
  edges[:, 1:] |= label[:, 1:] != label[:, :-1]
  edges[1:, :] |= label[1:, :] != label[:-1, :]
  if band > 1:
    edges = scipy.ndimage.binary_dilation(edges, iterations=band - 1)
  label[edges] = palette.IGNORE
  return np.clip(np.rint(img), 0, 255).astype(np.uint8), label


def write_synthetic_voc(root, num_train: int = 200, num_val: int = 100, scale: float = 0.25,
                        seed: int = 0, jpeg_quality: int = 92) -> pathlib.Path:
  """Write the dataset under ``root`` (VOC layout, see module docstring); returns the VOC2012 dir.

  ``scale`` multiplies the real VOC sizes (0.25 gives ~125 x 94 images). Ids are
  ``synth_<seed>_<i>``; train uses i < num_train, val the next num_val.
  """
  voc = pathlib.Path(root) / "VOCdevkit" / "VOC2012"
  for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
    (voc / sub).mkdir(parents=True, exist_ok=True)
  table = voc_sizes()
  band = max(1, int(round(4 * scale)))
  ids = {"train": [], "val": []}
  for i in range(num_train + num_val):
    rng = np.random.default_rng((int(seed), i))
    h0, w0 = table[rng.integers(len(table))]
    h, w = max(8, int(round(h0 * scale))), max(8, int(round(w0 * scale)))
    image, label = render_example(rng, h, w, band)
    eid = f"synth_{seed}_{i:06d}"
    Image.fromarray(image).save(voc / "JPEGImages" / f"{eid}.jpg", quality=jpeg_quality)
    palette.label_image(label).save(voc / "SegmentationClass" / f"{eid}.png")
    ids["train" if i < num_train else "val"].append(eid)
  sets = voc / "ImageSets" / "Segmentation"
  for split, lst in (("train", ids["train"]), ("val", ids["val"]),
                     ("trainval", ids["train"] + ids["val"])):
    (sets / f"{split}.txt").write_text("".join(f"{e}\n" for e in lst))
  return voc


def ensure_builtin_dataset(cache_dir=None, *, num_train: int = 1000, num_val: int = 200,
                           scale: float = 0.25, seed: int = 0) -> pathlib.Path:
  """Write the synthetic dataset once and return its VOC2012 folder (cached across calls).

  Location: ``<base>/builtin_voc_v<version>_n<train>-<val>_s<scale>_seed<seed>`` with base =
  ``cache_dir``, else ``$FCNJAX_CACHE``, else ``~/.cache/fcnjax``. Writing 1,000 + 200 images at
  scale 0.25 takes ~6 s once. Learnability (measured, 2 CPU cores, ~200 s of Adam training of an
  FCN-8s-like net with VGG widths / 8, batch 16, flips): val mean IU 0.66 with 1,000 train images,
  0.55 with 300 (which overfits).
  """
  base = pathlib.Path(cache_dir or os.environ.get("FCNJAX_CACHE", "~/.cache/fcnjax")).expanduser()
  final = base / f"builtin_voc_v{GENERATOR_VERSION}_n{num_train}-{num_val}_s{scale:g}_seed{seed}"
  voc = final / "VOCdevkit" / "VOC2012"
  if (final / "COMPLETE").is_file():
    return voc
  base.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=".tmp_builtin_voc_", dir=base))
  try:
    write_synthetic_voc(tmp, num_train=num_train, num_val=num_val, scale=scale, seed=seed)
    (tmp / "COMPLETE").write_text("ok\n")
    try:
      os.rename(tmp, final)
    except OSError:  # another process finished first (or a stale incomplete dir is there)
      if (final / "COMPLETE").is_file():
        shutil.rmtree(tmp, ignore_errors=True)
      else:
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return voc
