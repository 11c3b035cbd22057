"""Random-access segmentation readers: PASCAL VOC 2012, SBD, SegmentationClassAug, Oxford-IIIT Pets,
image folders.

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
  * :func:`pets_source(root, split="trainval")` - Oxford-IIIT Pets ``images/<id>.jpg``,
    ``annotations/trimaps/<id>.png``, ``annotations/{trainval,test}.txt``.
  * :func:`folder_source(image_dir, label_dir, mask_values=...)` - images and masks matched by
    stem, masks read as class ids (``"index"``), binary (``"binary"``: 0 / non-zero), Oxford
    trimaps (``"trimap"``) or palette PNGs / palette-coloured RGB (``"palette"``); the number of
    classes may be inferred from the mask values (:func:`scan_mask_values`).

Every source has a ``palette`` ((256, 3) uint8, to colour class maps: the VOC palette unless the
masks bring their own), ``class_names``, ``num_classes`` and ``num_classes_origin`` (how the number
of classes was decided, in words). :meth:`SegmentationSource.subset` and :func:`split_by_fraction`
make train / val views of one source without re-reading any file.

Validation (see :mod:`fcnjax.data.validation`): missing files, unreadable headers and image/mask
size mismatches (PNG masks) are found at construction; truncated pixel data, bad label values and
.mat size mismatches are found on decode. ``validate="full"`` decodes every example at construction
so that an epoch never meets a bad file. With ``on_error="skip"`` construction-time problems drop the
example (counted in ``src.report``) and decode-time problems give a fully-ignored example
(``valid=False``: the pipeline sets its mask to False and its label to 255).
"""

from __future__ import annotations

import concurrent.futures
import copy
import math
import os
import pathlib
from importlib import resources

import numpy as np
import scipy.io
from PIL import Image

from fcnjax.data import palette
from fcnjax.data.validation import DataError, ErrorReport, Problem, check_policy, log

_palette_mod = palette  # the module, where a ``palette`` argument shadows its name


def image_extensions() -> tuple:
  """File name endings (lower case, with the dot) of every format this Pillow can *open*."""
  Image.init()
  return tuple(sorted(ext for ext, fmt in Image.registered_extensions().items()
                      if fmt in Image.OPEN))


IMAGE_EXTS = image_extensions()
"""Extensions :func:`folder_source` lists: all Pillow formats that can be opened."""
MASK_VALUES = ("index", "binary", "trimap", "palette")
"""The mask value modes of :func:`folder_source`."""
BINARY_MAP = {0: 0, 255: 1}
"""Binary masks stored as exactly 0 / 255 -> background 0, foreground 1 (``mask_values="binary"``
accepts any non-zero value as foreground instead)."""
PETS_TRIMAP = {1: 1, 2: 0, 3: 255}
"""Oxford-IIIT Pets trimaps: 1 pet -> 1, 2 background -> 0, 3 border -> ignore."""
PETS_TRIMAP_3 = {1: 1, 2: 0, 3: 2}
"""Oxford-IIIT Pets trimaps with the border as a class: 1 pet -> 1, 2 background -> 0, 3 -> 2."""
PETS_CLASSES = ("background", "pet", "border")
BINARY_CLASSES = ("background", "foreground")
MAX_CLASSES = 255
"""Class ids are 0..254 (labels are uint8, 255 = ignore)."""


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


def _full_palette(pal) -> np.ndarray:
  """A PIL ``getpalette()`` list (or an (n, 3) array) -> (256, 3) uint8, padded with VOC colours."""
  out = palette.VOC_PALETTE.copy()
  arr = np.asarray(pal, np.uint8).reshape(-1)
  n = min(256, arr.size // 3)
  out[:n] = arr[:3 * n].reshape(n, 3)
  return out


def read_mat_label(path) -> np.ndarray:
  """SBD ``cls/<id>.mat`` -> the ``GTcls.Segmentation`` array (H, W) int32."""
  mat = scipy.io.loadmat(path, squeeze_me=True, struct_as_record=False)
  return np.asarray(mat["GTcls"].Segmentation).astype(np.int32)


class SegmentationSource:
  """Images + class-index masks, random access, sizes known from headers.

  Attributes: ``name``, ``ids`` (list of str), ``image_paths``, ``label_paths`` (lists of str),
  ``sizes`` ((N, 2) int32 height, width), ``num_classes``, ``num_classes_origin`` (str: how
  ``num_classes`` was decided), ``class_names`` (tuple or None), ``palette`` ((256, 3) uint8,
  colours for class maps), ``mask_values`` (how stored mask values become classes: ``"index"``,
  ``"binary"``, ``"trimap"``, ``"palette"`` or ``"value_map"``), ``value_map``, ``report``
  (:class:`ErrorReport`).

  ``mask_values``: ``"index"`` stored values are classes 0..C-1 and 255 (or ``value_map``'s keys
  when one is given); ``"binary"`` 0 -> 0, any other value -> 1 (colour masks: any non-black
  pixel); ``"palette"`` as ``"index"``, and RGB masks are read colour -> index through ``palette``
  (exact colours only); ``"trimap"`` through ``value_map``.
  """

  def __init__(self, name, ids, image_paths, label_paths, *, num_classes=palette.NUM_VOC_CLASSES,
               class_names=None, value_map=None, mask_values="index", label_format="image",
               palette=None, num_classes_origin=None, on_error="raise", validate="header"):
    check_policy(on_error)
    if validate not in ("header", "full"):
      raise ValueError(f"validate must be 'header' or 'full', got {validate!r}")
    if label_format not in ("image", "sbd_mat"):
      raise ValueError(f"label_format must be 'image' or 'sbd_mat', got {label_format!r}")
    if mask_values not in MASK_VALUES + ("value_map",):
      raise ValueError(f"mask_values must be one of {MASK_VALUES}, got {mask_values!r}")
    if value_map is not None and mask_values == "index":
      mask_values = "value_map"
    if mask_values in ("trimap", "value_map") and value_map is None:
      raise ValueError(f"mask_values={mask_values!r} needs a value_map")
    self.name = name
    self.label_format = label_format
    self.mask_values = mask_values
    self.value_map = dict(value_map) if value_map is not None else None
    self.palette = _full_palette(_palette_mod.VOC_PALETTE if palette is None else palette)
    self.palette.setflags(write=False)
    self.on_error = on_error
    self.report = ErrorReport(name)
    self._warned = set()
    self._set_classes(num_classes, class_names,
                      num_classes_origin or f"given ({int(num_classes)} classes)")
    if not ids:
      raise DataError(f"{name}: empty split (no example ids)")
    keep_ids, keep_img, keep_lbl, sizes = [], [], [], []
    for eid, ip, lp in zip(ids, image_paths, label_paths):
      self.report.num_checked += 1
      try:
        hw = self._check_headers(eid, ip, lp)
      except DataError as e:
        if on_error == "raise":
          raise
        self.report.add(e.problem or Problem(eid, str(ip), "unknown", str(e)))
        continue
      keep_ids.append(eid)
      keep_img.append(str(ip))
      keep_lbl.append(str(lp))
      sizes.append(hw)
    self.ids, self.image_paths, self.label_paths = keep_ids, keep_img, keep_lbl
    self.sizes = np.asarray(sizes, np.int32).reshape(-1, 2)
    if validate == "full":
      self.validate_full(log_summary=False)
    if self.report.problems:
      log.warning("%s", self.report.summary())
    self._check_not_empty(len(ids))

  def _check_not_empty(self, num_ids):
    if not self.ids:
      raise DataError(f"{self.name}: empty split (all {num_ids} examples were skipped)\n"
                      + self.report.summary())

  def _set_classes(self, num_classes, class_names, origin):
    """Set the classes (and the value -> class table that depends on them)."""
    num_classes = int(num_classes)
    if not 1 <= num_classes <= MAX_CLASSES:
      raise ValueError(f"num_classes must be in 1..{MAX_CLASSES}, got {num_classes}")
    if class_names is not None and len(class_names) != num_classes:
      raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
    self.num_classes = num_classes
    self.class_names = tuple(class_names) if class_names is not None else None
    self.num_classes_origin = origin
    self._lut = (None if self.mask_values == "binary"
                 else _value_lut(self.value_map, self.num_classes))
    if self.mask_values == "palette":
      packed = (self.palette.astype(np.int32) @ np.array([1 << 16, 1 << 8, 1], np.int32))
      self._colour_keys, self._colour_index = np.unique(packed, return_index=True)

  def validate_full(self, log_summary=True):
    """Decode every example now; with ``on_error="skip"`` drop the ones that fail."""
    keep = []
    for i, (eid, ip, lp) in enumerate(zip(self.ids, self.image_paths, self.label_paths)):
      try:
        self._decode(eid, ip, lp, self.sizes[i])
      except DataError as e:
        if self.on_error == "raise":
          raise
        self.report.add(e.problem or Problem(eid, str(ip), "unknown", str(e)))
        continue
      keep.append(i)
    if len(keep) < len(self.ids):
      self.ids = [self.ids[i] for i in keep]
      self.image_paths = [self.image_paths[i] for i in keep]
      self.label_paths = [self.label_paths[i] for i in keep]
      self.sizes = self.sizes[np.asarray(keep, np.int64)].reshape(-1, 2)
      if log_summary:
        log.warning("%s", self.report.summary())
    self._check_not_empty(self.report.num_checked)

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

  def _read_raw_label(self, eid, lp):
    """The stored mask values (H, W) int (palette mode: RGB colours already turned to indices)."""
    try:
      if self.label_format == "sbd_mat":
        return read_mat_label(lp)
      with Image.open(lp) as im:
        im.load()
        if im.mode in ("RGB", "RGBA") and self.mask_values in ("palette", "binary"):
          rgb = np.asarray(im)[..., :3]
        else:
          return palette.label_to_array(im)
    except Exception as e:
      raise self._fail(eid, lp, "unreadable", f"cannot decode mask ({e})") from None
    if self.mask_values == "binary":
      return rgb.max(axis=-1).astype(np.int32)
    return self._colours_to_indices(eid, lp, rgb)

  def _colours_to_indices(self, eid, lp, rgb):
    """RGB (H, W, 3) uint8 -> palette indices (H, W) int32; a colour not in the palette fails."""
    packed = rgb.astype(np.int32) @ np.array([1 << 16, 1 << 8, 1], np.int32)
    uniq, inv = np.unique(packed, return_inverse=True)
    keys = self._colour_keys
    pos = np.minimum(np.searchsorted(keys, uniq), len(keys) - 1)
    unknown = keys[pos] != uniq
    if unknown.any():
      bad = [((int(c) >> 16) & 255, (int(c) >> 8) & 255, int(c) & 255) for c in uniq[unknown]]
      npx = int(unknown[inv].sum())
      more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
      raise self._fail(eid, lp, "bad_labels",
                       f"RGB colour{'s' if len(bad) > 1 else ''} "
                       f"{', '.join(map(str, bad[:5]))}{more} ({npx} pixels) not in the palette "
                       f"(palette mode maps exact palette colours to their index)")
    return self._colour_index[pos][inv].reshape(rgb.shape[:2]).astype(np.int32)

  def _values_to_labels(self, eid, lp, raw):
    """Stored values -> class labels uint8 (checks every value)."""
    if self.mask_values == "binary":
      if raw.min(initial=0) < 0:
        raise self._fail(eid, lp, "bad_labels", "negative mask values")
      return (raw != 0).astype(np.uint8)
    if raw.min(initial=0) < 0 or raw.max(initial=0) > 65535:
      raise self._fail(eid, lp, "bad_labels", "mask values outside 0..65535")
    label = self._lut[raw]
    if (label < 0).any():
      bad = np.unique(raw[label < 0])[:10].tolist()
      allowed = (sorted(self.value_map) if self.value_map is not None
                 else f"0..{self.num_classes - 1} and 255")
      mode = f" for {self.mask_values} masks" if self.mask_values != "value_map" else ""
      raise self._fail(eid, lp, "bad_labels",
                       f"mask values {bad} not allowed{mode} (allowed: {allowed})")
    return label.astype(np.uint8)

  def _decode(self, eid, ip, lp, hw):
    """Full decode + checks: returns (image uint8 (H,W,3), label uint8 (H,W))."""
    try:
      with Image.open(ip) as im:
        im.load()
        image = palette.image_to_rgb(im)
    except Exception as e:
      raise self._fail(eid, ip, "unreadable", f"cannot decode image ({e})") from None
    raw = self._read_raw_label(eid, lp)
    if image.shape[:2] != tuple(hw):
      raise self._fail(eid, ip, "size_mismatch",
                       f"decoded image is {image.shape[0]}x{image.shape[1]}, header said {hw}")
    if raw.shape != image.shape[:2]:
      raise self._fail(eid, lp, "size_mismatch",
                       f"mask is {raw.shape[0]}x{raw.shape[1]} (HxW), image is "
                       f"{image.shape[0]}x{image.shape[1]}")
    return image, self._values_to_labels(eid, lp, raw)

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

  def subset(self, indices, name=None) -> "SegmentationSource":
    """A view of the examples ``indices`` (in that order), as a new source.

    Same classes, palette, mask value mapping and error policy; sizes are kept and nothing is
    re-read or re-validated. The view starts a fresh, empty ``report`` (problems found while
    building this source stay in ``self.report``). ``name`` defaults to ``"<name>/subset"``.
    """
    idx = np.asarray(indices, np.int64).reshape(-1)
    if idx.size == 0:
      raise ValueError("subset of no examples")
    if idx.min() < -len(self) or idx.max() >= len(self):
      raise IndexError(f"subset indices outside 0..{len(self) - 1}")
    idx = idx % len(self)
    new = copy.copy(self)
    new.name = name or f"{self.name}/subset"
    new.ids = [self.ids[i] for i in idx]
    new.image_paths = [self.image_paths[i] for i in idx]
    new.label_paths = [self.label_paths[i] for i in idx]
    new.sizes = self.sizes[idx].copy()
    new.report = ErrorReport(new.name, num_checked=len(idx))
    new._warned = set()
    return new

  def __repr__(self):
    return (f"SegmentationSource({self.name!r}, {len(self)} examples, "
            f"{self.num_classes} classes, skipped={self.report.num_skipped})")


def split_by_fraction(source: SegmentationSource, fraction: float, seed: int = 0) -> tuple:
  """Split ``source`` into ``(train, val)`` views (see :meth:`SegmentationSource.subset`).

  ``val`` holds ``round(fraction * N)`` examples (half rounds up), clipped to 1..N-1 so that
  neither part is empty, drawn by ``numpy.random.default_rng(seed).permutation(N)``; both parts
  keep the source's order. The same source (same file listing) and seed always give the same
  split. ``fraction`` must be in (0, 1) and the source needs >= 2 examples (else ValueError).
  Names: ``"<name>/train"`` and ``"<name>/val"``.
  """
  fraction = float(fraction)
  if not 0.0 < fraction < 1.0:  # also rejects NaN
    raise ValueError(f"validation fraction must be in (0, 1), got {fraction}")
  n = len(source)
  if n < 2:
    raise ValueError(f"{source.name}: cannot split {n} example(s) into train and val")
  n_val = min(max(int(math.floor(fraction * n + 0.5)), 1), n - 1)
  perm = np.random.default_rng(seed).permutation(n)
  val = np.sort(perm[:n_val])
  train = np.sort(perm[n_val:])
  return (source.subset(train, f"{source.name}/train"), source.subset(val, f"{source.name}/val"))


# -- mask value scans ------------------------------------------------------------------------
def _values_of_array(raw) -> np.ndarray:
  raw = np.asarray(raw)
  if raw.size and raw.min() >= 0 and raw.max() < 65536:
    return np.flatnonzero(np.bincount(raw.reshape(-1), minlength=1))
  return np.unique(raw)


def _scan(source_or_label_paths, max_files=1000, num_threads=4):
  """-> (sorted values list, files scanned, files in all, files that failed to decode)."""
  if isinstance(source_or_label_paths, SegmentationSource):
    src = source_or_label_paths
    items = list(zip(src.ids, src.label_paths))
    read = lambda item: src._read_raw_label(*item)
  else:
    items = [(str(p), p) for p in source_or_label_paths]

    def read(item):
      with Image.open(item[1]) as im:
        im.load()
        return palette.label_to_array(im)
  total = len(items)
  if max_files is not None and total > max_files:
    pick = np.unique(np.linspace(0, total - 1, int(max_files)).round().astype(np.int64))
    items = [items[i] for i in pick]

  def one(item):
    try:
      return _values_of_array(read(item)), None
    except Exception as e:  # a bad file: reported by the source when it is decoded
      return None, f"{item[1]}: {e}"
  with concurrent.futures.ThreadPoolExecutor(max(1, min(num_threads, len(items)))) as ex:
    results = list(ex.map(one, items))
  seen = [v for v, _ in results if v is not None]
  failed = [err for _, err in results if err is not None]
  if failed:
    log.warning("mask value scan: %d of %d masks could not be read (first: %s)", len(failed),
                len(items), failed[0])
  values = np.unique(np.concatenate(seen)) if seen else np.zeros(0, np.int64)
  return [int(v) for v in values], len(items), total, len(failed)


def scan_mask_values(source_or_label_paths, *, max_files: int | None = 1000) -> list:
  """Sorted distinct values stored in the masks of a source (or of a list of mask files).

  Each mask is decoded with Pillow (a few threads) and its values counted with numpy
  (``bincount``). Palette PNGs give their indices; for a :class:`SegmentationSource` the values are
  what its ``mask_values`` mode reads before mapping (e.g. palette mode turns RGB colours into
  palette indices, binary mode reads colour masks as their brightest channel). With more than
  ``max_files`` masks only ``max_files`` of them, evenly spaced over the (sorted) list, are read,
  so a rare value may be missed (``None``: read all). Masks that cannot be read are left out (and
  logged); the source reports them when it decodes them.
  """
  return _scan(source_or_label_paths, max_files)[0]


def _short_list(values, limit=24):
  if len(values) <= limit:
    return str(list(values))
  return f"[{', '.join(map(str, values[:12]))}, ..., {', '.join(map(str, values[-6:]))}] " \
         f"({len(values)} values)"


# ------------------------------------------------------------------------------------------
def read_id_list(path) -> list:
  """Ids from a split file: one id per line (the first token: ``Abyssinian_100 1 1 1`` gives
  ``Abyssinian_100``), or ``/JPEGImages/x.jpg /Seg.../x.png`` pairs; ``#`` lines are comments."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise DataError(f"missing: {path}: split list not found", Problem("", str(path), "missing",
                                                                      "split list not found"))
  ids = []
  for line in path.read_text().splitlines():
    tok = line.strip().split()
    if tok and not tok[0].startswith("#"):
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
      num_classes_origin="PASCAL VOC (21 classes)", on_error=on_error, validate=validate)


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
      num_classes_origin="PASCAL VOC (21 classes)", on_error=on_error, validate=validate)


def sbd_source(root, split="train", *, on_error="raise", validate="header"):
  """SBD (Hariharan et al.): ``root`` = ``benchmark_RELEASE`` or its ``dataset`` folder."""
  root = pathlib.Path(root).expanduser()
  ds = root / "dataset" if (root / "dataset").is_dir() else root
  ids = read_id_list(ds / f"{split}.txt")
  return SegmentationSource(
      f"sbd/{split}", ids, [ds / "img" / f"{i}.jpg" for i in ids],
      [ds / "cls" / f"{i}.mat" for i in ids], class_names=palette.VOC_CLASSES,
      num_classes_origin="PASCAL VOC (21 classes)", label_format="sbd_mat", on_error=on_error,
      validate=validate)


def find_pets(root) -> pathlib.Path:
  """The Oxford-IIIT Pets folder (holding ``images/`` and ``annotations/``): ``root`` or
  ``root/oxford-iiit-pet`` (torchvision's download folder)."""
  root = pathlib.Path(root).expanduser()
  for cand in (root, root / "oxford-iiit-pet"):
    if (cand / "images").is_dir() and (cand / "annotations").is_dir():
      return cand
  raise DataError(f"missing: {root}: no Oxford-IIIT Pets layout (images/ and annotations/) there",
                  Problem("", str(root), "missing", "no images/ and annotations/ folders"))


def pets_source(root, split="trainval", *, ignore_border=False, on_error="raise",
                validate="header"):
  """Oxford-IIIT Pets: ``images/<id>.jpg`` + ``annotations/trimaps/<id>.png`` for the ids of
  ``annotations/<split>.txt`` (``trainval`` 3,680 / ``test`` 3,669 ids in the real dataset).

  Trimap 1 pet, 2 background, 3 border -> classes background 0, pet 1, border 2
  (:data:`PETS_CLASSES`), or with ``ignore_border`` background 0, pet 1 and the border ignored
  (255). Images are opened by content, so the few real ones that are PNG / GIF data under a
  ``.jpg`` name, grey, CMYK or RGBA read as RGB like the rest.
  """
  pets = find_pets(root)
  ids = read_id_list(pets / "annotations" / f"{split}.txt")
  names = PETS_CLASSES[:2] if ignore_border else PETS_CLASSES
  return SegmentationSource(
      f"pets/{split}", ids, [pets / "images" / f"{i}.jpg" for i in ids],
      [pets / "annotations" / "trimaps" / f"{i}.png" for i in ids], num_classes=len(names),
      class_names=names, value_map=PETS_TRIMAP if ignore_border else PETS_TRIMAP_3,
      mask_values="trimap",
      num_classes_origin=(f"Oxford-IIIT Pets trimaps: {len(names)} classes ({', '.join(names)}"
                          + (", border ignored)" if ignore_border else ")")),
      on_error=on_error, validate=validate)


def _missing_dir(path, what):
  return DataError(f"missing: {path}: {what} folder not found",
                   Problem("", str(path), "missing", f"{what} folder not found"))


def _list_images(folder):
  """Image files of ``folder`` (sorted; hidden files such as macOS ``._x.png`` left out)."""
  exts = set(IMAGE_EXTS)
  return sorted(p for p in folder.iterdir()
                if p.suffix.lower() in exts and not p.name.startswith(".") and p.is_file())


def _mask_priority(p):
  """Several masks with one stem: prefer lossless formats (PNG first, JPEG last)."""
  order = {".png": 0, ".tif": 1, ".tiff": 1, ".bmp": 2, ".gif": 3, ".webp": 4}
  return (order.get(p.suffix.lower(), 5 if p.suffix.lower() not in (".jpg", ".jpeg") else 9),
          p.name)


def folder_source(image_dir, label_dir, *, mask_values="index", num_classes=None,
                  class_names=None, value_map=None, trimap_ignore_border=False,
                  on_error="raise", validate="header", name=None, scan_max_files=1000):
  """Images in ``image_dir`` and masks in ``label_dir`` matched by file stem.

  Files: every format Pillow can open (:data:`IMAGE_EXTS`), hidden files left out; an image with no
  mask of the same stem is a ``missing`` problem; masks without images are ignored; when several
  masks share a stem the PNG (lossless) one is used.

  ``mask_values`` says what the stored mask values mean:
    * ``"index"``: class ids 0..C-1, 255 = ignore.
    * ``"binary"``: 0 background, any non-zero value (1, 255, 65535, a colour) foreground: 2
      classes ``("background", "foreground")``.
    * ``"trimap"``: Oxford-IIIT Pets trimaps 1 pet, 2 background, 3 border: 3 classes
      ``("background", "pet", "border")``, or 2 with ``trimap_ignore_border`` (border -> 255).
      Any other value is a ``bad_labels`` problem.
    * ``"palette"``: palette PNGs give their palette indices (255 = ignore); RGB masks are mapped
      colour -> index through the palette (the first mask's own PNG palette if it has one, else
      VOC's); a colour not in it is a ``bad_labels`` problem naming the colour. The source's
      ``palette`` is that palette.
  ``value_map`` (a dict stored value -> class, e.g. :data:`BINARY_MAP`; other values are errors)
  replaces ``mask_values="index"``.

  Classes: ``class_names`` and / or ``num_classes`` if given (they must agree; names default to
  ``"class0"``, ``"class1"``, ...); binary and trimap have fixed classes; with ``value_map``,
  1 + its largest class; else (index / palette) inferred as 1 + the largest non-255 value found by
  :func:`scan_mask_values` (at most ``scan_max_files`` masks read). ``src.num_classes_origin``
  says which, e.g. ``"from mask values found: [0, 1, 2]"``.
  """
  if mask_values not in MASK_VALUES:
    raise ValueError(f"mask_values must be one of {MASK_VALUES}, got {mask_values!r}")
  if value_map is not None and mask_values != "index":
    raise ValueError(f"give value_map or mask_values={mask_values!r}, not both")
  image_dir = pathlib.Path(image_dir).expanduser()
  label_dir = pathlib.Path(label_dir).expanduser()
  if not image_dir.is_dir():
    raise _missing_dir(image_dir, "image")
  if not label_dir.is_dir():
    raise _missing_dir(label_dir, "mask")
  name = name or f"folder/{image_dir.name}"
  images = _list_images(image_dir)
  if not images:
    raise DataError(f"empty_split: {image_dir}: no image files in this folder",
                    Problem("", str(image_dir), "empty_split", "no image files"))
  labels = {}
  for p in sorted(_list_images(label_dir), key=_mask_priority):
    labels.setdefault(p.stem, p)
  ids = [p.stem for p in images]
  lbl = [labels.get(p.stem, label_dir / f"{p.stem}.png") for p in images]
  if not any(p.stem in labels for p in images):
    log.warning("%s: none of the %d images of %s has a mask of the same name in %s", name,
                len(images), image_dir, label_dir)

  if class_names is not None:
    class_names = tuple(str(c) for c in class_names)
    if num_classes is not None and int(num_classes) != len(class_names):
      raise ValueError(f"num_classes={num_classes} but {len(class_names)} class names given")
  given = (class_names is not None or num_classes is not None)
  given_n = len(class_names) if class_names is not None else num_classes
  given_origin = (f"from class names ({given_n}: {', '.join(class_names)})"
                  if class_names is not None else f"given (num_classes={num_classes})")
  kind = mask_values
  infer = False
  pal = None
  if mask_values == "binary":
    fixed, origin = BINARY_CLASSES, "binary masks: 2 classes (0 -> background, non-zero -> " \
                                    "foreground)"
  elif mask_values == "trimap":
    value_map = PETS_TRIMAP if trimap_ignore_border else PETS_TRIMAP_3
    fixed = PETS_CLASSES[:2] if trimap_ignore_border else PETS_CLASSES
    origin = (f"trimap masks: {len(fixed)} classes ({', '.join(fixed)}"
              + (", border ignored)" if trimap_ignore_border else ")"))
  elif value_map is not None:
    kind = "value_map"
    n = 1 + max(int(v) for v in value_map.values() if int(v) != palette.IGNORE)
    fixed, origin = None, f"from value_map ({n} classes)"
    if not given:
      num_classes = n
  else:
    fixed, origin = None, None
    infer = not given
  if fixed is not None:
    if given and given_n != len(fixed):
      raise ValueError(f"{mask_values} masks have {len(fixed)} classes ({', '.join(fixed)}), "
                       f"got {given_n}")
    num_classes = len(fixed)
    class_names = class_names or fixed
  elif given:
    num_classes, origin = given_n, given_origin
  if mask_values == "palette":
    for p in lbl:
      try:
        with Image.open(p) as im:
          if im.mode in ("P", "PA") and im.getpalette():
            pal = im.getpalette()
      except Exception:  # a bad first mask: the source reports it
        pass
      else:
        break

  src = SegmentationSource(
      name, ids, images, lbl, num_classes=num_classes if not infer else MAX_CLASSES,
      class_names=None if infer else (class_names or _default_names(num_classes)),
      value_map=value_map, mask_values=kind, palette=pal,
      num_classes_origin=origin or "inferring", on_error=on_error,
      validate="header" if infer else validate)
  if infer:
    n, origin = _infer_num_classes(src, mask_values, scan_max_files)
    src._set_classes(n, _default_names(n), origin)
    if validate == "full":
      src.validate_full()
  return src


def _default_names(n):
  return tuple(f"class{i}" for i in range(int(n)))


def _infer_num_classes(src, mask_values, max_files):
  """(num_classes, origin text) from the values stored in ``src``'s masks."""
  values, scanned, total, failed = _scan(src, max_files)
  where = (f" (in {scanned} of {total} masks, evenly sampled)" if scanned < total
           else f" (in all {total} masks)")
  if failed:
    where += f"; {failed} masks could not be read"
  classes = [v for v in values if v != palette.IGNORE]
  hint = (" (give the number of classes / class names, or choose another mask value mode: "
          "binary for 0/255 masks)")
  if not classes:
    raise DataError(f"{src.name}: cannot infer the number of classes: the masks hold "
                    f"{_short_list(values) if values else 'no readable values'}{where}{hint}")
  if mask_values == "index" and set(values) == {0, palette.IGNORE}:
    raise DataError(f"{src.name}: the masks hold only 0 and 255{where}; with mask_values='index' "
                    "255 means 'ignore', leaving one class: for 0/255 binary masks use "
                    "mask_values='binary'")
  if max(classes) >= MAX_CLASSES:
    raise DataError(f"{src.name}: mask values up to {max(classes)}{where}: class ids must be "
                    f"0..{MAX_CLASSES - 1} (255 = ignore); for 16-bit binary masks use "
                    "mask_values='binary'")
  n = max(classes) + 1
  if n < 2:
    raise DataError(f"{src.name}: the masks hold only class 0{where}: nothing to segment{hint}")
  origin = f"from mask values found: {_short_list(values)}{where}"
  if len(classes) < n:
    origin += f"; {n - len(classes)} of the class ids 0..{n - 1} never appear"
  return n, origin


def open_source(root, split="train", **kw):
  """Guess the layout of ``root`` (VOC, SBD, Oxford-IIIT Pets) and open ``split``."""
  root = pathlib.Path(root).expanduser()
  if (root / "dataset" / "cls").is_dir() or (root / "cls").is_dir():
    return sbd_source(root, split, **kw)
  if any((c / "annotations" / "trimaps").is_dir() for c in (root, root / "oxford-iiit-pet")):
    return pets_source(root, split, **kw)
  if split in ("train_aug", "trainaug"):
    return voc_aug_source(root, split, **kw)
  return voc_source(root, split, **kw)
