"""Random-access segmentation readers: PASCAL VOC 2012, SBD, SegmentationClassAug, image folders.

Every reader returns a :class:`SegmentationSource` (grain's ``RandomAccessDataSource`` protocol:
``len(src)``, ``src[i]``), which knows each example's size up front from the image *header*
(``src.sizes``: (N, 2) int32 (height, width) in pixels), without decoding pixels. ``src[i]`` is::

    {"image": uint8 (H, W, 3) RGB, "label": uint8 (H, W) class indices, 255 = ignore,
     "index": int, "id": str, "valid": bool}

Readers:
  * :func:`voc_source(root, split)` - ``VOCdevkit/VOC2012/{JPEGImages,SegmentationClass,
    ImageSets/Segmentation}``; ``root`` may be the VOCdevkit or the VOC2012 folder; splits ``train``,
    ``val``, ``trainval``, ``seg11valid`` (the 736 ids of the FCN paper, shipped in the package) or
    any ``ImageSets/Segmentation/<split>.txt``.
  * :func:`sbd_source(root, split)` - SBD ``dataset/{img,cls,train.txt,val.txt}``, labels from
    ``cls/<id>.mat`` (``GTcls.Segmentation``).
  * :func:`voc_aug_source(root, split="train_aug")` - the common ``SegmentationClassAug`` PNG form
    (10,582 ids) next to ``JPEGImages``.
  * :func:`folder_source(image_dir, label_dir, value_map=...)` - images and masks matched by stem,
    with a mask value mapping (:data:`BINARY_MAP` for 0/255 masks, :data:`PETS_TRIMAP` for
    Oxford-IIIT Pets trimaps).

Validation (see :mod:`fcnjax.data.validation`): missing files, unreadable headers and image/mask
size mismatches (PNG masks) are found at construction; truncated pixel data, bad label values and
.mat size mismatches are found on decode. ``validate="full"`` decodes every example at construction
so that an epoch never meets a bad file. With ``on_error="skip"`` construction-time problems drop the
example (counted in ``src.report``) and decode-time problems give a fully-ignored example
(``valid=False``: the pipeline sets its mask to False and its label to 255).
"""

from __future__ import annotations

import os
import pathlib
from importlib import resources

import numpy as np
import scipy.io
from PIL import Image

from fcnjax.data import palette
from fcnjax.data.validation import DataError, ErrorReport, Problem, check_policy, log

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
BINARY_MAP = {0: 0, 255: 1}
"""Binary masks stored as 0 / 255 -> background 0, foreground 1."""
PETS_TRIMAP = {1: 1, 2: 0, 3: 255}
"""Oxford-IIIT Pets trimaps: 1 pet -> 1, 2 background -> 0, 3 border -> ignore."""


def _value_lut(value_map, num_classes):
  """Mask value -> class LUT over 0..65535; -1 marks a value that is not allowed."""
  lut = np.full(65536, -1, np.int32)
  if value_map is None:
    lut[:num_classes] = np.arange(num_classes)
    lut[palette.IGNORE] = palette.IGNORE
  else:
    for k, v in value_map.items():
      if not (0 <= int(v) < num_classes or int(v) == palette.IGNORE):
        raise ValueError(f"value_map sends {k} to {v}, outside 0..{num_classes - 1} and 255")
      lut[int(k)] = int(v)
  return lut


def read_mat_label(path) -> np.ndarray:
  """SBD ``cls/<id>.mat`` -> the ``GTcls.Segmentation`` array (H, W) int32."""
  mat = scipy.io.loadmat(path, squeeze_me=True, struct_as_record=False)
  return np.asarray(mat["GTcls"].Segmentation).astype(np.int32)


class SegmentationSource:
  """Images + class-index masks, random access, sizes known from headers.

  Attributes: ``ids`` (list of str), ``image_paths``, ``label_paths`` (lists of str), ``sizes``
  ((N, 2) int32 height, width), ``num_classes``, ``class_names``, ``report`` (:class:`ErrorReport`).
  """

  def __init__(self, name, ids, image_paths, label_paths, *, num_classes=palette.NUM_VOC_CLASSES,
               class_names=None, value_map=None, label_format="image", on_error="raise",
               validate="header"):
    check_policy(on_error)
    if validate not in ("header", "full"):
      raise ValueError(f"validate must be 'header' or 'full', got {validate!r}")
    if label_format not in ("image", "sbd_mat"):
      raise ValueError(f"label_format must be 'image' or 'sbd_mat', got {label_format!r}")
    self.name = name
    self.num_classes = int(num_classes)
    self.class_names = tuple(class_names) if class_names is not None else None
    self.value_map = dict(value_map) if value_map is not None else None
    self.label_format = label_format
    self.on_error = on_error
    self.report = ErrorReport(name)
    self._lut = _value_lut(self.value_map, self.num_classes)
    self._warned = set()
    if not ids:
      raise DataError(f"{name}: empty split (no example ids)")
    keep_ids, keep_img, keep_lbl, sizes = [], [], [], []
    for eid, ip, lp in zip(ids, image_paths, label_paths):
      self.report.num_checked += 1
      try:
        hw = self._check_headers(eid, ip, lp)
        if validate == "full":
          self._decode(eid, ip, lp, hw)
      except DataError as e:
        if on_error == "raise":
          raise
        self.report.add(e.problem or Problem(eid, str(ip), "unknown", str(e)))
        continue
      keep_ids.append(eid)
      keep_img.append(str(ip))
      keep_lbl.append(str(lp))
      sizes.append(hw)
    if self.report.problems:
      log.warning("%s", self.report.summary())
    if not keep_ids:
      raise DataError(f"{name}: empty split (all {len(ids)} examples were skipped)\n"
                      + self.report.summary())
    self.ids, self.image_paths, self.label_paths = keep_ids, keep_img, keep_lbl
    self.sizes = np.asarray(sizes, np.int32).reshape(-1, 2)

  # -- checks --------------------------------------------------------------------------------
  @staticmethod
  def _fail(eid, path, kind, detail):
    p = Problem(eid, str(path), kind, detail)
    return DataError(str(p), p)

  def _check_headers(self, eid, ip, lp):
    """Existence + header sizes; returns (h, w) of the image."""
    for path in (ip, lp):
      if not os.path.isfile(path):
        raise self._fail(eid, path, "missing", "file not found")
    try:
      with Image.open(ip) as im:
        w, h = im.size
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ...
      raise self._fail(eid, ip, "unreadable", f"cannot read image header ({e})") from None
    if self.label_format == "image":
      try:
        with Image.open(lp) as im:
          lw, lh = im.size
      except Exception as e:
        raise self._fail(eid, lp, "unreadable", f"cannot read mask header ({e})") from None
      if (lh, lw) != (h, w):
        raise self._fail(eid, lp, "size_mismatch", f"mask is {lh}x{lw} (HxW), image is {h}x{w}")
    return (h, w)

  def _decode(self, eid, ip, lp, hw):
    """Full decode + checks: returns (image uint8 (H,W,3), label uint8 (H,W))."""
    try:
      with Image.open(ip) as im:
        im.load()
        image = palette.image_to_rgb(im)
    except Exception as e:
      raise self._fail(eid, ip, "unreadable", f"cannot decode image ({e})") from None
    try:
      if self.label_format == "sbd_mat":
        raw = read_mat_label(lp)
      else:
        with Image.open(lp) as im:
          im.load()
          raw = palette.label_to_array(im)
    except Exception as e:
      raise self._fail(eid, lp, "unreadable", f"cannot decode mask ({e})") from None
    if image.shape[:2] != tuple(hw):
      raise self._fail(eid, ip, "size_mismatch",
                       f"decoded image is {image.shape[0]}x{image.shape[1]}, header said {hw}")
    if raw.shape != image.shape[:2]:
      raise self._fail(eid, lp, "size_mismatch",
                       f"mask is {raw.shape[0]}x{raw.shape[1]} (HxW), image is "
                       f"{image.shape[0]}x{image.shape[1]}")
    if raw.min(initial=0) < 0 or raw.max(initial=0) > 65535:
      raise self._fail(eid, lp, "bad_labels", f"mask values outside 0..65535")
    label = self._lut[raw]
    if (label < 0).any():
      bad = np.unique(raw[label < 0])[:10].tolist()
      allowed = (sorted(self.value_map) if self.value_map is not None
                 else f"0..{self.num_classes - 1} and 255")
      raise self._fail(eid, lp, "bad_labels", f"mask values {bad} not allowed (allowed: {allowed})")
    return image, label.astype(np.uint8)

  # -- random access -------------------------------------------------------------------------
  def __len__(self):
    return len(self.ids)

  def __getitem__(self, i):
    i = int(i)
    eid = self.ids[i]
    try:
      image, label = self._decode(eid, self.image_paths[i], self.label_paths[i], self.sizes[i])
      valid = True
    except DataError as e:
      if self.on_error == "raise":
        raise
      if eid not in self._warned:
        self._warned.add(eid)
        self.report.add(e.problem)
        log.warning("%s: skipping on decode (example %d comes out fully ignored): %s",
                    self.name, i, e)
      h, w = (int(v) for v in self.sizes[i])
      image = np.zeros((h, w, 3), np.uint8)
      label = np.full((h, w), palette.IGNORE, np.uint8)
      valid = False
    return {"image": image, "label": label, "index": i, "id": eid, "valid": valid}

  def __repr__(self):
    return (f"SegmentationSource({self.name!r}, {len(self)} examples, "
            f"{self.num_classes} classes, skipped={self.report.num_skipped})")


# ------------------------------------------------------------------------------------------
def read_id_list(path) -> list:
  """Ids from a split file: one id per line, or ``/JPEGImages/x.jpg /Seg.../x.png`` pairs."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise DataError(f"missing: {path}: split list not found", Problem("", str(path), "missing",
                                                                      "split list not found"))
  ids = []
  for line in path.read_text().splitlines():
    tok = line.strip().split()
    if tok:
      ids.append(pathlib.PurePosixPath(tok[0]).stem if "/" in tok[0] or "." in tok[0] else tok[0])
  return ids


def seg11valid_ids() -> list:
  """The 736 VOC2011 val ids the FCN paper reports on (ids not in SBD train), shipped here."""
  text = resources.files("fcnjax.data").joinpath("seg11valid.txt").read_text()
  return [t for t in text.split() if t]


def find_voc2012(root) -> pathlib.Path:
  """The ``VOC2012`` folder for ``root`` = VOCdevkit, VOC2012, or a parent of VOCdevkit."""
  root = pathlib.Path(root).expanduser()
  for cand in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
    if (cand / "JPEGImages").is_dir():
      return cand
  raise DataError(f"missing: {root}: no VOC2012/JPEGImages under it",
                  Problem("", str(root), "missing", "no VOC2012/JPEGImages"))


def voc_source(root, split="train", *, on_error="raise", validate="header"):
  """PASCAL VOC 2012 segmentation: ``split`` in train / val / trainval / seg11valid / <list name>."""
  voc = find_voc2012(root)
  if split == "seg11valid" and not (voc / "ImageSets/Segmentation/seg11valid.txt").is_file():
    ids = seg11valid_ids()
  else:
    ids = read_id_list(voc / "ImageSets" / "Segmentation" / f"{split}.txt")
  return SegmentationSource(
      f"voc2012/{split}", ids, [voc / "JPEGImages" / f"{i}.jpg" for i in ids],
      [voc / "SegmentationClass" / f"{i}.png" for i in ids], class_names=palette.VOC_CLASSES,
      on_error=on_error, validate=validate)


def voc_aug_source(root, split="train_aug", *, list_file=None, label_dir="SegmentationClassAug",
                   on_error="raise", validate="header"):
  """VOC images + ``SegmentationClassAug`` PNG masks (SBD converted, 10,582 ``train_aug`` ids).

  The id list is ``list_file`` if given, else the first of ``ImageSets/Segmentation/<split>.txt``,
  ``<VOC2012>/<split>.txt``, ``<VOC2012>/list/<split>.txt``, ``<label_dir>/../<split>.txt``.
  """
  voc = find_voc2012(root)
  if list_file is None:
    cands = [voc / "ImageSets/Segmentation" / f"{split}.txt", voc / f"{split}.txt",
             voc / "list" / f"{split}.txt"]
    list_file = next((c for c in cands if c.is_file()), cands[0])
  ids = read_id_list(list_file)
  return SegmentationSource(
      f"voc_aug/{split}", ids, [voc / "JPEGImages" / f"{i}.jpg" for i in ids],
      [voc / label_dir / f"{i}.png" for i in ids], class_names=palette.VOC_CLASSES,
      on_error=on_error, validate=validate)


def sbd_source(root, split="train", *, on_error="raise", validate="header"):
  """SBD (Hariharan et al.): ``root`` = ``benchmark_RELEASE`` or its ``dataset`` folder."""
  root = pathlib.Path(root).expanduser()
  ds = root / "dataset" if (root / "dataset").is_dir() else root
  ids = read_id_list(ds / f"{split}.txt")
  return SegmentationSource(
      f"sbd/{split}", ids, [ds / "img" / f"{i}.jpg" for i in ids],
      [ds / "cls" / f"{i}.mat" for i in ids], class_names=palette.VOC_CLASSES,
      label_format="sbd_mat", on_error=on_error, validate=validate)


def folder_source(image_dir, label_dir, *, value_map=None, num_classes=None, class_names=None,
                  on_error="raise", validate="header", name=None):
  """Images in ``image_dir`` and masks in ``label_dir`` matched by file stem.

  ``value_map`` maps stored mask values to classes (``BINARY_MAP``, ``PETS_TRIMAP``, or a dict);
  values absent from it are errors. Without it, masks must hold 0..num_classes-1 and 255.
  ``num_classes`` defaults to 1 + the largest non-ignore class of ``value_map``. An image with no
  mask of the same stem is a ``missing`` problem; masks without images are ignored.
  """
  image_dir, label_dir = pathlib.Path(image_dir), pathlib.Path(label_dir)
  if not image_dir.is_dir():
    raise DataError(f"missing: {image_dir}: image folder not found",
                    Problem("", str(image_dir), "missing", "image folder not found"))
  if num_classes is None:
    if value_map is None:
      raise ValueError("folder_source needs num_classes or value_map")
    num_classes = 1 + max(v for v in value_map.values() if v != palette.IGNORE)
  images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_EXTS)
  labels = {}
  if label_dir.is_dir():
    for p in sorted(label_dir.iterdir()):
      if p.suffix.lower() in IMAGE_EXTS:
        labels.setdefault(p.stem, p)
  ids = [p.stem for p in images]
  lbl = [labels.get(p.stem, label_dir / f"{p.stem}.png") for p in images]
  return SegmentationSource(name or f"folder/{image_dir.name}", ids, images, lbl,
                            num_classes=num_classes, class_names=class_names, value_map=value_map,
                            on_error=on_error, validate=validate)


def open_source(root, split="train", **kw):
  """Guess the layout of ``root`` (VOC, SBD) and open ``split``."""
  root = pathlib.Path(root).expanduser()
  if (root / "dataset" / "cls").is_dir() or (root / "cls").is_dir():
    return sbd_source(root, split, **kw)
  if split in ("train_aug", "trainaug"):
    return voc_aug_source(root, split, **kw)
  return voc_source(root, split, **kw)
