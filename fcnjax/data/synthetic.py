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

Two more built-in datasets, written and cached the same way (each with its own generator version
in the cache folder name):

* ``write_synthetic_folder`` / ``ensure_builtin_folder``: grey ("L") PNG images of 96-192 px a side
  with binary 0/255 masks of 1-4 smooth blobs (small to large) that are brighter and finely
  speckled against a mottled, unevenly lit background (a global threshold reaches only ~0.50 mean
  IU): ``folder_source(images, masks, mask_values="binary")``.
* ``write_synthetic_pets`` / ``ensure_builtin_pets``: the Oxford-IIIT Pets layout (JPEG images,
  1/2/3 trimaps, ``trainval.txt`` / ``test.txt``) with one large animal-like object per image on a
  cluttered room-like background: ``pets_source(root, split)``.

Learnability (measured on 2 shared CPU cores with ``python -m fcnjax.train --config folder`` /
``--config pets``: FCN-8s at 1/8 width, batch 8, defaults of 800 + 100 images): folder val mean IU
0.76 at step 250 of the 612-step default run; pets (3 classes, border 3) 0.75 after a 300-step run
(background 0.91, pet 0.83, border 0.51).
"""

from __future__ import annotations

import csv
import dataclasses
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


def _cache_base(cache_dir) -> pathlib.Path:
  return pathlib.Path(cache_dir or os.environ.get("FCNJAX_CACHE", "~/.cache/fcnjax")).expanduser()


def _write_once(base: pathlib.Path, final_name: str, write) -> pathlib.Path:
  """``base/final_name``, written by ``write(tmp_folder)`` the first time only: into a temporary
  folder that is renamed into place when complete, so an interrupted write leaves nothing."""
  final = base / final_name
  if (final / "COMPLETE").is_file():
    return final
  base.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".tmp_{final_name.split('_v')[0]}_", dir=base))
  try:
    write(tmp)
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
  return final


def ensure_builtin_dataset(cache_dir=None, *, num_train: int = 1000, num_val: int = 200,
                           scale: float = 0.25, seed: int = 0) -> pathlib.Path:
  """Write the synthetic dataset once and return its VOC2012 folder (cached across calls).

  Location: ``<base>/builtin_voc_v<version>_n<train>-<val>_s<scale>_seed<seed>`` with base =
  ``cache_dir``, else ``$FCNJAX_CACHE``, else ``~/.cache/fcnjax``. Writing 1,000 + 200 images at
  scale 0.25 takes ~6 s once. Learnability (measured, 2 CPU cores, ~200 s of Adam training of an
  FCN-8s-like net with VGG widths / 8, batch 16, flips): val mean IU 0.66 with 1,000 train images,
  0.55 with 300 (which overfits).
  """
  final = _write_once(
      _cache_base(cache_dir),
      f"builtin_voc_v{GENERATOR_VERSION}_n{num_train}-{num_val}_s{scale:g}_seed{seed}",
      lambda tmp: write_synthetic_voc(tmp, num_train=num_train, num_val=num_val, scale=scale,
                                      seed=seed))
  return final / "VOCdevkit" / "VOC2012"


# == built-in folder dataset: grey images, binary masks of blobs =================================
FOLDER_GENERATOR_VERSION = 1
"""Bumped whenever the folder dataset's pictures change (its cache folder name carries it)."""
PETS_GENERATOR_VERSION = 1
"""Bumped whenever the synthetic pets change (its cache folder name carries it)."""


def _smooth(rng, h, w, sigma):
  """Gaussian-smoothed white noise (h, w) float32, rescaled to unit standard deviation (large
  ``sigma``: smoothed on a coarser grid and upsampled bilinearly, which looks the same)."""
  if sigma <= 3:
    f = scipy.ndimage.gaussian_filter(rng.standard_normal((h, w)).astype(np.float32), sigma,
                                      mode="wrap")
  else:
    k = sigma / 2.0
    small = rng.standard_normal((max(2, int(np.ceil(h / k)) + 1),
                                 max(2, int(np.ceil(w / k)) + 1))).astype(np.float32)
    small = scipy.ndimage.gaussian_filter(small, 2.0, mode="wrap")
    f = np.asarray(Image.fromarray(small, "F").resize((w, h), Image.BILINEAR))
  return f / (f.std() + 1e-6)


def _blob_mask(rng, h, w, cx, cy, r):
  """A smooth random blob (h, w) bool: a star-shaped region whose radius wobbles with angle
  (harmonics 2-5), stretched and turned at random; mean radius ``r`` pixels."""
  a, rot = rng.uniform(0.7, 1.35), rng.uniform(0, np.pi)
  amps = [rng.uniform(0, 0.45 / k) for k in range(2, 6)]
  phases = rng.uniform(0, 2 * np.pi, 4)
  reach = r * (1 + sum(amps)) * max(a, 1 / a) + 1
  y0, y1 = max(0, int(cy - reach)), min(h, int(np.ceil(cy + reach)) + 1)
  x0, x1 = max(0, int(cx - reach)), min(w, int(np.ceil(cx + reach)) + 1)
  out = np.zeros((h, w), bool)
  if y0 >= y1 or x0 >= x1:
    return out
  yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
  dx, dy = xx - cx, yy - cy
  u = (np.cos(rot) * dx + np.sin(rot) * dy) / a
  v = (-np.sin(rot) * dx + np.cos(rot) * dy) * a
  theta, rho = np.arctan2(v, u), np.hypot(u, v)
  rr = np.ones_like(theta)
  for k, (amp, ph) in enumerate(zip(amps, phases), start=2):
    rr += amp * np.cos(k * theta + ph)
  out[y0:y1, x0:x1] = rho <= r * rr
  return out


def render_blobs_example(rng, h, w):
  """One (grey image uint8 (h, w), mask bool (h, w)) pair of the folder dataset.

  Background: a grey level of 70-150 with smooth illumination (+-25 over the image) and a coarse
  mottled texture, plus 0-3 darker smooth blobs (distractors, background). Objects: 1-4 blobs of
  radius 6 px .. 30 % of the short side (log-uniform), 28-55 grey levels brighter than the
  background *around them* and finely speckled, with a soft dome shading: bright objects on a dark
  part of the image are darker than the bright parts of the background, so no single threshold
  separates them, but local contrast and texture do.
  """
  short = min(h, w)
  img = rng.uniform(70, 150) + 25 * _smooth(rng, h, w, short / 4)
  gy, gx = rng.uniform(-20, 20, 2)
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
  img += gy * (yy / h - 0.5) + gx * (xx / w - 0.5)
  img += 7 * _smooth(rng, h, w, 2.5) + 3 * _smooth(rng, h, w, 1.0)
  for _ in range(int(rng.integers(0, 4))):  # dark distractors: background
    r = np.exp(rng.uniform(np.log(4), np.log(0.2 * short)))
    m = _blob_mask(rng, h, w, rng.uniform(0, w), rng.uniform(0, h), r)
    soft = scipy.ndimage.gaussian_filter(m.astype(np.float32), 1.5)
    img -= rng.uniform(15, 35) * soft
  mask = np.zeros((h, w), bool)
  speckle = _smooth(rng, h, w, 0.7)
  for _ in range(int(rng.integers(1, 5))):
    r = float(np.exp(rng.uniform(np.log(6), np.log(0.3 * short))))
    for _ in range(10):  # keep the centre in the frame, avoid piling onto earlier objects
      cx, cy = rng.uniform(0.1 * w, 0.9 * w), rng.uniform(0.1 * h, 0.9 * h)
      m = _blob_mask(rng, h, w, cx, cy, r)
      if m.sum() >= 12 and (mask & m).sum() <= 0.2 * m.sum():
        break
    else:
      continue
    dist = scipy.ndimage.distance_transform_edt(m)
    dome = np.minimum(dist / max(2.0, 0.5 * r), 1.0)
    alpha = scipy.ndimage.gaussian_filter(m.astype(np.float32), 0.7)
    lift = rng.uniform(28, 55) * (0.7 + 0.3 * dome) + rng.uniform(7, 13) * speckle
    img += alpha * lift
    mask |= m
  img += rng.normal(0, 4, (h, w))
  return np.clip(np.rint(img), 0, 255).astype(np.uint8), mask


@dataclasses.dataclass(frozen=True)
class FolderDataset:
  """Where a built-in folder dataset lies: image / mask folders of its train and val parts
  (attributes, or ``ds["images"]``, ``dict(ds)``, ``ds.asdict()``: images, masks, val_images,
  val_masks)."""
  root: pathlib.Path
  images: pathlib.Path
  masks: pathlib.Path
  val_images: pathlib.Path
  val_masks: pathlib.Path

  KEYS = ("images", "masks", "val_images", "val_masks")

  def asdict(self) -> dict:
    return {k: getattr(self, k) for k in self.KEYS}

  def keys(self):
    return self.KEYS

  def __getitem__(self, key):  # ds["images"] works as well as ds.images
    if key not in self.KEYS:
      raise KeyError(key)
    return getattr(self, key)


def _folder_layout(root) -> FolderDataset:
  root = pathlib.Path(root)
  return FolderDataset(root, root / "train" / "images", root / "train" / "masks",
                       root / "val" / "images", root / "val" / "masks")


def write_synthetic_folder(root, num_train: int = 800, num_val: int = 100, seed: int = 0, *,
                           min_size: int = 96, max_size: int = 192) -> FolderDataset:
  """Write the grey-image / binary-mask folder dataset under ``root``; returns its folders::

      root/train/images/<id>.png   grey ("L") PNG        root/train/masks/<id>.png  0 / 255 "L" PNG
      root/val/images/<id>.png                           root/val/masks/<id>.png

  (see :func:`render_blobs_example`), read with ``folder_source(images, masks,
  mask_values="binary")``. Heights and widths are drawn independently from min_size..max_size.
  Ids ``blobs_<seed>_<i>``; train uses i < num_train, val the next num_val; image i is a function
  of ``numpy.random.default_rng((seed, i))`` only.
  """
  ds = _folder_layout(root)
  for d in (ds.images, ds.masks, ds.val_images, ds.val_masks):
    d.mkdir(parents=True, exist_ok=True)
  for i in range(num_train + num_val):
    rng = np.random.default_rng((int(seed), i))
    h, w = (int(v) for v in rng.integers(min_size, max_size + 1, 2))
    image, mask = render_blobs_example(rng, h, w)
    eid = f"blobs_{seed}_{i:06d}"
    imgs, masks = (ds.images, ds.masks) if i < num_train else (ds.val_images, ds.val_masks)
    Image.fromarray(image, "L").save(imgs / f"{eid}.png")
    Image.fromarray(mask.astype(np.uint8) * 255, "L").save(masks / f"{eid}.png")
  return ds


def ensure_builtin_folder(cache_dir=None, *, num_train: int = 800, num_val: int = 100,
                          seed: int = 0, min_size: int = 96, max_size: int = 192) -> FolderDataset:
  """Write the folder dataset once (:func:`write_synthetic_folder`) and return its folders.

  Location: ``<base>/builtin_folder_v<version>_n<train>-<val>_px<min>-<max>_seed<seed>``, base as
  for :func:`ensure_builtin_dataset`. The defaults (800 + 100 images of 96-192 px) take a few
  seconds to write.
  """
  final = _write_once(
      _cache_base(cache_dir),
      f"builtin_folder_v{FOLDER_GENERATOR_VERSION}_n{num_train}-{num_val}_px{min_size}-"
      f"{max_size}_seed{seed}",
      lambda tmp: write_synthetic_folder(tmp, num_train, num_val, seed, min_size=min_size,
                                         max_size=max_size))
  return _folder_layout(final)


# == built-in Oxford-IIIT Pets lookalike ========================================================
PET_BREEDS = (  # name (Oxford: cats capitalised, dogs lower case), species 1 cat / 2 dog, ears,
    ("Tabby", 1, "pointy", "stripes"),      # fur pattern
    ("Spotted", 1, "pointy", "spots"),
    ("Shadow", 1, "pointy", "plain"),
    ("patched_hound", 2, "floppy", "patches"),
    ("plain_hound", 2, "floppy", "plain"),
)
FUR_COLORS = np.array([
    (200, 120, 50), (125, 85, 55), (45, 38, 32), (135, 132, 128), (222, 200, 165),
    (235, 232, 225), (28, 26, 26), (178, 138, 92), (160, 95, 60), (95, 90, 92),
], np.float32)


def _ellipse_poly(cx, cy, rx, ry, n=40):
  t = np.linspace(0, 2 * np.pi, n, endpoint=False)
  return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], -1)


def _pet_parts(rng, breed):
  """The animal in its own frame (body half-length 1, +x = facing side, +y = down): a list of
  ("poly", (n, 2) points) and ("line", (n, 2) points, width); plus eye / nose positions."""
  _, _, ears, _ = breed
  d = 1.0
  b = rng.uniform(0.42, 0.62)
  hr = rng.uniform(0.36, 0.5)
  hx, hy = d * rng.uniform(0.85, 1.1), -rng.uniform(0.3, 0.6) * (0.5 + b)
  parts = [("poly", _ellipse_poly(0, 0, 1.0, b)), ("poly", _ellipse_poly(hx, hy, hr, hr * 0.92))]
  parts.append(("poly", _ellipse_poly(hx + d * hr * 0.75, hy + hr * 0.25, hr * 0.45, hr * 0.32)))
  for s in (-1, 1):  # ears
    ex = hx + s * hr * 0.55
    if ears == "pointy":
      top = (ex + s * hr * 0.15, hy - hr * rng.uniform(1.3, 1.6))
      parts.append(("poly", np.array([(ex - hr * 0.38, hy - hr * 0.55), top,
                                      (ex + hr * 0.38, hy - hr * 0.55)])))
    else:
      parts.append(("poly", _ellipse_poly(ex + s * hr * 0.25, hy + hr * 0.2, hr * 0.3,
                                          hr * rng.uniform(0.6, 0.8))))
  leg_len = rng.uniform(0.45, 0.85)
  lw = rng.uniform(0.13, 0.2)
  for lx in (-0.7, -0.45, 0.45, 0.7):
    x0 = lx + rng.uniform(-0.06, 0.06)
    bend = rng.uniform(-0.15, 0.15)
    parts.append(("line", np.array([(x0, b * 0.4), (x0 + bend, b + leg_len)]), lw))
  t0 = np.array([-d * 0.92, -b * 0.3])
  ang = rng.uniform(np.pi * 0.9, np.pi * 1.35)  # backwards and up
  curl = rng.uniform(-0.8, 0.8)
  pts = [t0]
  seg = rng.uniform(0.2, 0.3)
  for _ in range(4):
    pts.append(pts[-1] + seg * np.array([np.cos(ang), np.sin(ang)]))
    ang += curl * 0.4
  parts.append(("line", np.array(pts), rng.uniform(0.09, 0.15)))
  eyes = [(hx + d * hr * 0.35 + s * hr * 0.25, hy - hr * 0.15) for s in (-1, 1)]
  nose = (hx + d * hr * 1.1, hy + hr * 0.12)
  return parts, eyes + [nose], hr


def _render_parts(parts, h, w, scale, rot, tx, ty, ss=2):
  """Coverage (h, w) float32 in 0..1 of the transformed parts (drawn ``ss`` x supersampled)."""
  c, s = np.cos(rot), np.sin(rot)
  def tf(p):
    p = np.asarray(p, np.float64)
    return np.stack([(c * p[:, 0] - s * p[:, 1]) * scale + tx,
                     (s * p[:, 0] + c * p[:, 1]) * scale + ty], -1) * ss
  img = Image.new("L", (w * ss, h * ss), 0)
  dr = ImageDraw.Draw(img)
  for part in parts:
    pts = [tuple(q) for q in tf(part[1])]
    if part[0] == "poly":
      dr.polygon(pts, fill=255)
    else:
      width = max(1, int(round(part[2] * scale * ss)))
      dr.line(pts, fill=255, width=width, joint="curve")
      for q in (pts[0], pts[-1]):
        dr.ellipse([q[0] - width / 2, q[1] - width / 2, q[0] + width / 2, q[1] + width / 2],
                   fill=255)
  return np.asarray(img.resize((w, h), Image.BOX), np.float32) / 255.0


def _clutter_colour(rng):
  """A muted random colour, sometimes a fur colour (so colour alone never tells the pet)."""
  if rng.random() < 0.3:
    return FUR_COLORS[rng.integers(len(FUR_COLORS))] + rng.normal(0, 10, 3)
  c = rng.uniform(20, 235, 3)
  return c.mean() + rng.uniform(0.3, 0.8) * (c - c.mean())


def _room_background(rng, h, w):
  """Cluttered RGB float (h, w, 3): wall / floor halves, furniture-like boxes (some striped),
  cushions (some with a fur-like grain), lines; muted colours, some of them fur colours."""
  img = np.empty((h, w, 3), np.float32)
  split = int(rng.uniform(0.3, 0.75) * h)
  img[:split] = _clutter_colour(rng)
  img[split:] = _clutter_colour(rng)
  img += 18 * _smooth(rng, h, w, min(h, w) / 5)[..., None]
  for c in range(3):
    img[..., c] += 8 * _smooth(rng, h, w, min(h, w) / 4)
  img += 6 * _smooth(rng, h, w, 1.2)[..., None]
  layer = Image.new("RGB", (w, h))
  alpha = Image.new("L", (w, h), 0)
  furry = Image.new("L", (w, h), 0)
  d, da, df = ImageDraw.Draw(layer), ImageDraw.Draw(alpha), ImageDraw.Draw(furry)
  for _ in range(int(rng.integers(3, 9))):
    col = tuple(int(v) for v in np.clip(_clutter_colour(rng), 0, 255))
    x0, y0 = rng.uniform(-0.2, 1.0) * w, rng.uniform(-0.2, 1.0) * h
    bw, bh = rng.uniform(0.1, 0.5) * w, rng.uniform(0.1, 0.5) * h
    k = rng.random()
    if k < 0.5:
      d.rectangle([x0, y0, x0 + bw, y0 + bh], fill=col)
      da.rectangle([x0, y0, x0 + bw, y0 + bh], fill=255)
      if rng.random() < 0.4:  # striped upholstery / blinds
        col2 = tuple(int(v) for v in np.clip(_clutter_colour(rng), 0, 255))
        step = rng.uniform(3, 8)
        for yy in np.arange(y0, y0 + bh, 2 * step):
          d.rectangle([x0, yy, x0 + bw, yy + step], fill=col2)
    elif k < 0.8:
      box = [x0, y0, x0 + bw * 0.7, y0 + bh * 0.7]
      d.ellipse(box, fill=col)
      da.ellipse(box, fill=255)
      if rng.random() < 0.5:  # a rug / cushion with a fur-like grain
        df.ellipse(box, fill=255)
    else:
      x1, y1 = x0 + rng.normal(0, 0.4) * w, y0 + rng.normal(0, 0.4) * h
      wd = int(rng.integers(1, 5))
      d.line([(x0, y0), (x1, y1)], fill=col, width=wd)
      da.line([(x0, y0), (x1, y1)], fill=255, width=wd)
  a = np.asarray(alpha, np.float32)[..., None] / 255.0
  img = img * (1 - a) + np.asarray(layer, np.float32) * a
  grain = scipy.ndimage.gaussian_filter(rng.standard_normal((h, w)).astype(np.float32),
                                        (0.5, 1.8))
  img += (np.asarray(furry, np.float32) / 255.0 * 9 * grain / (grain.std() + 1e-6))[..., None]
  return img + rng.normal(0, 4, (h, w, 3))


def _fur(rng, breed, h, w, scale, rot, cov):
  """Fur colours (h, w, 3) float for the pet: base colour, pattern, streaky grain, edge shading."""
  pattern = breed[3]
  i1, i2 = rng.choice(len(FUR_COLORS), 2, replace=False)
  c1, c2 = FUR_COLORS[i1], FUR_COLORS[i2]
  if np.abs(c1 - c2).sum() < 120:  # the pattern colour must show
    c2 = np.where(c1.mean() > 120, c1 * 0.45, np.minimum(c1 * 1.6 + 40, 245))
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
  u = np.cos(rot) * xx + np.sin(rot) * yy  # along the body
  sel = np.zeros((h, w), np.float32)
  if pattern == "stripes":
    warp = 2.5 * _smooth(rng, h, w, 4)
    period = max(4.0, scale * rng.uniform(0.22, 0.32))
    sel = (np.sin(2 * np.pi * (u + warp) / period) > 0.25).astype(np.float32)
  elif pattern == "spots":
    sp = Image.new("L", (w, h), 0)
    d = ImageDraw.Draw(sp)
    for _ in range(int(h * w / max(30.0, (0.22 * scale) ** 2))):
      x, y, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.04, 0.08) * scale
      d.ellipse([x - r, y - r, x + r, y + r], fill=255)
    sel = np.asarray(sp, np.float32) / 255.0
  elif pattern == "patches":
    sel = (_smooth(rng, h, w, max(2.0, 0.3 * scale)) > 0.3).astype(np.float32)
  fur = c1 * (1 - sel[..., None]) + c2 * sel[..., None]
  grain = scipy.ndimage.gaussian_filter(rng.standard_normal((h, w)).astype(np.float32),
                                        (0.5, 1.8) if abs(np.sin(rot)) < 0.7 else (1.8, 0.5))
  grain /= grain.std() + 1e-6
  dist = scipy.ndimage.distance_transform_edt(cov > 0.5)
  shade = 0.72 + 0.28 * np.minimum(dist / max(2.0, 0.12 * scale), 1.0)
  return fur * shade[..., None] + 11 * grain[..., None]


def render_pet_example(rng, h, w, breed, border=3):
  """One (RGB image uint8 (h, w, 3), trimap uint8 (h, w): 1 pet, 2 background, 3 border) pair.

  One animal (body ellipse, head, snout, two ears (pointy or floppy by breed), four legs, a curled
  tail; eyes and nose) covering 25-60 % of the image (some of it may leave the frame), turned by
  up to +-20 degrees and facing left or right, in the breed's fur pattern (stripes, spots, white
  patches or plain; two of :data:`FUR_COLORS`) with a streaky grain and darker edges, on a
  cluttered room-like background (:func:`_room_background`). The trimap's border band is the
  pixels within ``border`` px of the object outline (2 ``border`` px wide), as in Oxford.
  """
  parts, dots, hr = _pet_parts(rng, breed)
  flip = rng.random() < 0.5
  if flip:
    parts = [(p[0], p[1] * np.array([-1.0, 1.0])) + p[2:] for p in parts]
    dots = [(-x, y) for x, y in dots]
  rot = rng.uniform(-0.35, 0.35)
  target = rng.uniform(0.25, 0.6)
  scale = 0.3 * min(h, w)
  tx, ty = w / 2 + rng.uniform(-0.08, 0.08) * w, h / 2 + rng.uniform(-0.05, 0.12) * h
  for _ in range(4):  # fit the area covered inside the frame to the target
    cov = _render_parts(parts, h, w, scale, rot, tx, ty)
    frac = float(cov.mean())
    if abs(frac - target) < 0.02:
      break
    scale *= float(np.clip(np.sqrt(target / max(frac, 1e-3)), 0.6, 1.6))
  cov = _render_parts(parts, h, w, scale, rot, tx, ty)
  img = _room_background(rng, h, w)
  fur = _fur(rng, breed, h, w, scale, rot, cov)
  c, s = np.cos(rot), np.sin(rot)
  dot_layer = Image.new("L", (w, h), 0)
  dd = ImageDraw.Draw(dot_layer)
  for x, y in dots:
    px, py = (c * x - s * y) * scale + tx, (s * x + c * y) * scale + ty
    r = max(1.0, 0.07 * hr * scale * 2)
    dd.ellipse([px - r, py - r, px + r, py + r], fill=255)
  dots_a = (np.asarray(dot_layer, np.float32) / 255.0)[..., None]
  fur = fur * (1 - dots_a) + 20 * dots_a
  a = cov[..., None]
  img = img * (1 - a) + fur * a
  mask = cov >= 0.5
  band = (scipy.ndimage.binary_dilation(mask, iterations=border)
          & ~scipy.ndimage.binary_erosion(mask, iterations=border, border_value=1))
  trimap = np.where(mask, 1, 2).astype(np.uint8)
  trimap[band] = 3
  return np.clip(np.rint(img), 0, 255).astype(np.uint8), trimap


def write_synthetic_pets(root, num_trainval: int = 800, num_test: int = 100, seed: int = 0, *,
                         min_size: int = 96, max_size: int = 192, border: int = 3,
                         jpeg_quality: int = 90) -> pathlib.Path:
  """Write an Oxford-IIIT Pets lookalike under ``root`` (returned), in Oxford's layout::

      root/images/<id>.jpg               RGB JPEG, heights and widths in min_size..max_size
      root/annotations/trimaps/<id>.png  "L" PNG trimap: 1 pet, 2 background, 3 border
      root/annotations/{trainval,test,list}.txt   "<id> <class id> <species> <breed id>" lines

  (see :func:`render_pet_example`), read with ``pets_source(root, "trainval" | "test")``. Ids are
  ``<Breed>_<n>`` (:data:`PET_BREEDS`; n counts per breed from 1, as in Oxford); example i is a
  function of ``numpy.random.default_rng((seed, i))`` only; i < num_trainval is trainval.
  """
  root = pathlib.Path(root)
  (root / "images").mkdir(parents=True, exist_ok=True)
  (root / "annotations" / "trimaps").mkdir(parents=True, exist_ok=True)
  counts = [0] * len(PET_BREEDS)
  lines = {"trainval": [], "test": []}
  for i in range(num_trainval + num_test):
    rng = np.random.default_rng((int(seed), i))
    k = int(rng.integers(len(PET_BREEDS)))
    breed = PET_BREEDS[k]
    counts[k] += 1
    h, w = (int(v) for v in rng.integers(min_size, max_size + 1, 2))
    image, trimap = render_pet_example(rng, h, w, breed, border)
    eid = f"{breed[0]}_{counts[k]}"
    Image.fromarray(image).save(root / "images" / f"{eid}.jpg", quality=jpeg_quality)
    Image.fromarray(trimap, "L").save(root / "annotations" / "trimaps" / f"{eid}.png")
    species_ids = [j for j, b in enumerate(PET_BREEDS) if b[1] == breed[1]]
    line = f"{eid} {k + 1} {breed[1]} {species_ids.index(k) + 1}"
    lines["trainval" if i < num_trainval else "test"].append(line)
  ann = root / "annotations"
  for split, lst in lines.items():
    (ann / f"{split}.txt").write_text("".join(f"{ln}\n" for ln in lst))
  head = ("#Image CLASS-ID SPECIES BREED ID\n#ID: 1:37 Class ids\n#SPECIES: 1:Cat 2:Dog\n"
          "#BREED ID: 1-25:Cat 1:12:Dog\n#All images with 1st letter as captial are cat images\n"
          "#images with small first letter are dog images\n")
  (ann / "list.txt").write_text(head + "".join(f"{ln}\n" for ln in
                                               lines["trainval"] + lines["test"]))
  return root


def ensure_builtin_pets(cache_dir=None, *, num_trainval: int = 800, num_test: int = 100,
                        seed: int = 0, min_size: int = 96, max_size: int = 192,
                        border: int = 3) -> pathlib.Path:
  """Write the pets lookalike once (:func:`write_synthetic_pets`) and return its root.

  Location: ``<base>/builtin_pets_v<version>_n<trainval>-<test>_px<min>-<max>_b<border>_seed<seed>``,
  base as for :func:`ensure_builtin_dataset`.
  """
  return _write_once(
      _cache_base(cache_dir),
      f"builtin_pets_v{PETS_GENERATOR_VERSION}_n{num_trainval}-{num_test}_px{min_size}-"
      f"{max_size}_b{border}_seed{seed}",
      lambda tmp: write_synthetic_pets(tmp, num_trainval, num_test, seed, min_size=min_size,
                                       max_size=max_size, border=border))
