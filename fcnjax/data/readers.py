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

Validation (see :mod:`fcnjax.data.validation`): missing files, unreadable headers, image/mask size
mismatches (PNG masks) and duplicate ids (an id listed twice in a split file, or two images of a
folder with one stem) are found at construction; truncated pixel data, bad label values (a value
outside the classes, a colour RGB mask where class indices are expected) and .mat size mismatches
are found on decode. ``validate="full"`` decodes every example at construction (a few threads, a
progress bar on a terminal) so that an epoch never meets a bad file. Up-front problems are all
collected first: with ``on_error="raise"`` ONE :class:`DataError` then lists every one of them;
with ``on_error="skip"`` they drop their examples (a duplicated id keeps its first occurrence;
counted in ``src.report``), and decode-time problems give a fully-ignored example (``valid=False``:
the pipeline sets its mask to False and its label to 255; :meth:`SegmentationSource.problem_of`
names the file and reason from any process). Truncated files are never decoded silently: Pillow's
``ImageFile.LOAD_TRUNCATED_IMAGES`` must stay False (a warning is logged if something set it).

EXIF orientation (``exif="apply"`` by default, or ``"ignore"``): a camera JPEG stores its pixels
as the sensor saw them and records in its EXIF Orientation tag (0x0112; 2..8, 1 = as stored) how to
turn them for display. Pillow's ``Image.open`` (and the VOC tooling) ignore the tag, but every
viewer and annotation tool shows the turned image, so a mask drawn on it (a PNG, which carries no
tag) has the *displayed* orientation. The default therefore applies the tag, exactly as
``PIL.ImageOps.exif_transpose`` does (flip / rotate / transpose), both when decoding and in the
header size (orientations 5..8 swap width and height; the tag is read from the header, without
decoding pixels), so images and masks line up. ``exif="ignore"`` uses the stored orientation (as
Pillow and VOC read it: right for datasets whose masks were made from the stored pixels; for
images without a tag, as PASCAL VOC's are expected to be, both choices read the same pixels). A mask that does carry an orientation
tag (rare: a PNG / TIFF / JPEG saved with EXIF) gets the same policy as the images: it was drawn
and is shown as its tag says. ``src.exif_oriented`` lists ``(id, orientation)`` of the images with
a tag other than 1, and construction logs one warning line when there are any (``python -m
fcnjax.data.check`` lists the first ids). An image / mask size mismatch that is exactly a
transposition (mask HxW == image WxH) says whether an EXIF tag explains it (and which ``exif``
setting would make them match); orientations 2..4 (mirror, 180 degrees) keep the size, so a wrong
choice there shows only in the pixels: look at one of the listed images with its mask. (A PNG's
``eXIf`` chunk stored *after* its pixel data is not seen, to keep header checks free of decoding;
Pillow writes it before.)
"""

from __future__ import annotations

import concurrent.futures
import copy
import math
import os
import pathlib
import sys
from importlib import resources

import numpy as np
import scipy.io
from PIL import Image, ImageFile

from fcnjax.data import palette
from fcnjax.data.validation import IN_REPORT, DataError, ErrorReport, Problem, check_policy, log

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
EXIF_POLICIES = ("apply", "ignore")
"""``exif=``: apply the EXIF Orientation tag (as viewers show the image; default) or ignore it."""
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
EXIF_ORIENTATION_TAG = 0x0112
EXIF_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                  4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
                  6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
                  8: Image.Transpose.ROTATE_90}
"""EXIF orientation -> the transposition that displays the image (``ImageOps.exif_transpose``'s)."""
EXIF_ORIENTATION_NAMES = {1: "as stored", 2: "mirrored left-right", 3: "rotated 180 degrees",
                          4: "mirrored top-bottom", 5: "transposed",
                          6: "rotated 90 degrees clockwise", 7: "transversed",
                          8: "rotated 90 degrees counter-clockwise"}
"""How an image with each EXIF orientation is shown."""
_SWAPS = (5, 6, 7, 8)  # orientations that swap width and height
VALIDATE_THREADS = 4
"""Threads :meth:`SegmentationSource.validate_full` decodes with (at most; fewer on fewer cores)."""


def exif_orientation(im: Image.Image) -> int:
  """The EXIF Orientation (1..8) of an opened PIL image, read from its header (1 when there is
  none or it is not 2..8). Never decodes pixels: for a PNG only an ``eXIf`` chunk before the pixel
  data is seen (Pillow's own ``getexif`` would decode the whole file to look behind it)."""
  try:
    exif = (Image.Image.getexif(im) if im.format == "PNG" and "exif" not in im.info
            else im.getexif())
    o = int(exif.get(EXIF_ORIENTATION_TAG, 1))
  except Exception:  # a malformed EXIF block: the pixels are still fine, use them as stored
    return 1
  return o if o in EXIF_TRANSPOSE else 1


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


class IdList(list):
  """The ids of a split file (a plain ``list`` of str) that remember where they came from:
  ``path`` (the file) and ``lines`` (the 1-based line number of each id), so that a
  :class:`SegmentationSource` can name the file and lines of a duplicated id."""

  def __init__(self, ids=(), path=None, lines=None):
    super().__init__(ids)
    self.path = None if path is None else str(path)
    self.lines = list(lines) if lines is not None else None


def _without_path(err, path) -> str:
  """PIL's error text without the file name it repeats (the problem names the file already)."""
  return str(err).replace(f" {str(path)!r}", "")


_truncated_warned = []


def _warn_if_truncated_allowed():
  if ImageFile.LOAD_TRUNCATED_IMAGES and not _truncated_warned:
    _truncated_warned.append(True)
    log.warning("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True (something in this process set it): "
                "truncated image files now decode without an error, their missing part grey, and "
                "cannot be reported; set it back to False to have them found")


class SegmentationSource:
  """Images + class-index masks, random access, sizes known from headers.

  Attributes: ``name``, ``ids`` (list of str, unique), ``image_paths``, ``label_paths`` (lists of
  str), ``sizes`` ((N, 2) int32 height, width, after the EXIF policy), ``num_classes``,
  ``num_classes_origin`` (str: how ``num_classes`` was decided), ``class_names`` (tuple or None),
  ``palette`` ((256, 3) uint8, colours for class maps), ``mask_values`` (how stored mask values
  become classes: ``"index"``, ``"binary"``, ``"trimap"``, ``"palette"`` or ``"value_map"``),
  ``value_map``, ``exif`` (``"apply"`` / ``"ignore"``), ``exif_oriented`` (list of ``(id,
  orientation)`` of the images whose EXIF Orientation tag is 2..8), ``report``
  (:class:`ErrorReport`).

  ``mask_values``: ``"index"`` stored values are classes 0..C-1 and 255 (or ``value_map``'s keys
  when one is given); ``"binary"`` 0 -> 0, any other value -> 1 (colour masks: any non-black
  pixel); ``"palette"`` as ``"index"``, and RGB masks are read colour -> index through ``palette``
  (exact colours only); ``"trimap"`` through ``value_map``. A colour RGB mask in the other modes is
  a ``bad_labels`` problem (never a guessed label).

  ``ids``: an :class:`IdList` (what :func:`read_id_list` returns) lets a duplicated id be named
  with its split file and line numbers. ``exif``: see the module docstring.
  """

  def __init__(self, name, ids, image_paths, label_paths, *, num_classes=palette.NUM_VOC_CLASSES,
               class_names=None, value_map=None, mask_values="index", label_format="image",
               palette=None, num_classes_origin=None, on_error="raise", validate="header",
               exif="apply", _finish=True):
    check_policy(on_error)
    if validate not in ("header", "full"):
      raise ValueError(f"validate must be 'header' or 'full', got {validate!r}")
    if exif not in EXIF_POLICIES:
      raise ValueError(f"exif must be one of {EXIF_POLICIES}, got {exif!r}")
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
    self.exif = exif
    self.exif_oriented = []
    self.report = ErrorReport(name)
    self._warned = set()
    self._set_classes(num_classes, class_names,
                      num_classes_origin or f"given ({int(num_classes)} classes)")
    if not ids:
      raise DataError(f"{name}: empty split (no example ids)")
    _warn_if_truncated_allowed()
    self._num_ids = len(ids)
    self._check_all(ids, [str(p) for p in image_paths], [str(p) for p in label_paths])
    if validate == "full":
      self._full_pass(progress=True)
    if _finish:
      self._finish()

  # -- construction ----------------------------------------------------------------------------
  def _check_all(self, ids, image_paths, label_paths):
    """Every up-front check (duplicates, files, headers); problems go to ``self.report``."""
    if not len(ids) == len(image_paths) == len(label_paths):
      raise ValueError(f"{len(ids)} ids, {len(image_paths)} images, {len(label_paths)} masks")
    self.report.num_checked += len(ids)
    rows = self._unique_rows(ids, image_paths)
    keep_ids, keep_img, keep_lbl, sizes = [], [], [], []
    for r in rows:
      eid, ip, lp = ids[r], image_paths[r], label_paths[r]
      try:
        hw, orientation = self._check_headers(eid, ip, lp)
      except DataError as e:
        self.report.add(e.problem or Problem(eid, ip, "unknown", str(e)))
        continue
      keep_ids.append(eid)
      keep_img.append(ip)
      keep_lbl.append(lp)
      sizes.append(hw)
      if orientation != 1:
        self.exif_oriented.append((eid, orientation))
    self.ids, self.image_paths, self.label_paths = keep_ids, keep_img, keep_lbl
    self.sizes = np.asarray(sizes, np.int32).reshape(-1, 2)

  def _unique_rows(self, ids, image_paths):
    """Rows to check: the first occurrence of each id; every duplicated id is a problem."""
    where = {}
    for r, eid in enumerate(ids):
      where.setdefault(eid, []).append(r)
    lines = getattr(ids, "lines", None)
    list_path = getattr(ids, "path", None)
    for eid, rs in where.items():
      if len(rs) < 2:
        continue
      n = len(rs)
      paths = [image_paths[r] for r in rs]
      if list_path is not None and lines is not None:
        p = Problem(eid, list_path, "duplicate", f"id {eid} appears {n} times (lines "
                    f"{', '.join(str(lines[r]) for r in rs)})")
      elif len(set(paths)) == n:  # one stem, several files (a folder of images)
        parents = {os.path.dirname(q) for q in paths}
        shown = [os.path.basename(q) for q in paths] if len(parents) == 1 else paths
        p = Problem(eid, os.path.dirname(paths[0]) if len(parents) == 1 else paths[0],
                    "duplicate", f"id {eid} names {n} images ({', '.join(shown)}): ids are file "
                    "stems and must be unique")
      else:
        p = Problem(eid, list_path or f"<ids of {self.name}>", "duplicate",
                    f"id {eid} appears {n} times (positions {', '.join(str(r + 1) for r in rs)})")
      self.report.add(p)
      self.report.num_duplicates_dropped += n - 1
    return sorted(rs[0] for rs in where.values())

  def _finish(self):
    """End of construction: raise every up-front problem at once, or log them; the EXIF note."""
    if self.report.problems:
      if self.on_error == "raise":
        raise self.report.error()
      log.warning("%s", self.report.summary(), extra={IN_REPORT: True})
    if self.exif_oriented:
      n = len(self.exif_oriented)
      what = f"{n} image{'s carry' if n != 1 else ' carries'} an EXIF orientation tag"
      if self.exif == "apply":  # a warning too: the pixels differ from what PIL alone gives
        log.warning("%s: %s; applied (exif='apply'; pass exif='ignore' / --exif ignore to use the "
                 "stored orientation)", self.name, what, extra={IN_REPORT: True})
      else:
        log.warning("%s: %s; ignored (exif='ignore': the stored orientation, not the one viewers "
                    "show; pass exif='apply' / --exif apply to turn them as their tag says)",
                    self.name, what, extra={IN_REPORT: True})
    self._check_not_empty(self._num_ids)

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

  # -- full validation -------------------------------------------------------------------------
  def _decode_problems(self, progress=True, num_threads=None) -> list:
    """Decode every example (a few threads; in order): [(row, Problem)] of those that fail."""
    n = len(self.ids)
    if n == 0:
      return []
    threads = num_threads or max(1, min(VALIDATE_THREADS, os.cpu_count() or 1, n))
    from tqdm.auto import tqdm
    bar = tqdm(total=n, desc=f"{self.name}: decoding", unit="example", file=sys.stderr,
               disable=None if progress else True, dynamic_ncols=True)
    out = []
    try:
      with concurrent.futures.ThreadPoolExecutor(threads) as ex:
        for i, p in enumerate(ex.map(self.problem_of, range(n))):
          if p is not None:
            out.append((i, p))
          bar.update(1)
    finally:
      bar.close()
    return out

  def _keep_rows(self, keep):
    keep = list(keep)
    if len(keep) == len(self.ids):
      return
    self.ids = [self.ids[i] for i in keep]
    self.image_paths = [self.image_paths[i] for i in keep]
    self.label_paths = [self.label_paths[i] for i in keep]
    self.sizes = self.sizes[np.asarray(keep, np.int64)].reshape(-1, 2)
    kept = set(self.ids)
    self.exif_oriented = [(e, o) for e, o in self.exif_oriented if e in kept]

  def _full_pass(self, progress=True):
    """Decode everything; record the problems and drop their examples (construction time)."""
    bad = self._decode_problems(progress)
    for _, p in bad:
      self.report.add(p)
    rows = {i for i, _ in bad}
    self._keep_rows(i for i in range(len(self.ids)) if i not in rows)
    return bad

  def validate_full(self, progress=True, log_summary=True):
    """Decode every example now (a small thread pool, results in order, so the outcome does not
    depend on timing) with a progress bar on stderr (tqdm; off when stderr is not a terminal or
    ``progress=False``).

    ``on_error="raise"``: one :class:`DataError` listing every decode problem (the source is left
    as it was). ``"skip"``: the examples that fail are dropped, their problems recorded in
    ``report`` (and its summary logged once when ``log_summary``). Returns ``self``.
    """
    if self.on_error == "raise":
      bad = self._decode_problems(progress)
      if bad:
        raise ErrorReport(self.name, [p for _, p in bad], num_checked=len(self.ids)).error()
      return self
    bad = self._full_pass(progress)
    if bad and log_summary:
      log.warning("%s", self.report.summary(), extra={IN_REPORT: True})
    self._check_not_empty(self.report.num_checked)
    return self

  def problem_of(self, i) -> Problem | None:
    """Decode example ``i`` in the calling process: its :class:`Problem`, or None if it decodes
    fine. Nothing is recorded: with ``on_error="skip"`` a decode-time problem met in a data worker
    process is recorded in that worker's copy of the source, and the main process only sees a
    fully ignored example (``valid`` False); this names the file and the reason there."""
    i = int(i)
    eid, ip = self.ids[i], self.image_paths[i]
    try:
      self._decode(eid, ip, self.label_paths[i], self.sizes[i])
    except DataError as e:
      return e.problem or Problem(eid, ip, "unknown", str(e))
    except Exception as e:  # noqa: BLE001 - any failure is this example's problem
      return Problem(eid, ip, "unknown", f"cannot decode ({type(e).__name__}: {e})")
    return None

  # -- checks --------------------------------------------------------------------------------
  @staticmethod
  def _fail(eid, path, kind, detail):
    p = Problem(eid, str(path), kind, detail)
    return DataError(str(p), p)

  def _header(self, path):
    """(h, w) after the EXIF policy, and the EXIF orientation, from the file's header."""
    with Image.open(path) as im:
      w, h = im.size
      o = exif_orientation(im)
    if self.exif == "apply" and o in _SWAPS:
      h, w = w, h
    return (h, w), o

  def _transposed_hint(self, image_hw, mask_hw, image_o, mask_o):
    """Text for a size mismatch that is exactly a transposition (else "")."""
    (h, w), (lh, lw) = image_hw, mask_hw
    if (lh, lw) != (w, h) or h == w:
      return ""
    swapped = [(what, o) for what, o in (("image", image_o), ("mask", mask_o)) if o in _SWAPS]
    if len(swapped) == 1:
      what, o = swapped[0]
      done, other = (("applied", "ignore") if self.exif == "apply" else ("ignored", "apply"))
      return (f"; the {what} carries EXIF orientation {o} (shown {EXIF_ORIENTATION_NAMES[o]}), "
              f"{done} (exif={self.exif!r}): with exif={other!r} they would match")
    tags = [f"the {what} carries EXIF orientation {o} ({EXIF_ORIENTATION_NAMES[o]})"
            for what, o in (("image", image_o), ("mask", mask_o)) if o != 1]
    return ("; mask is the image transposed (HxW vs WxH): was one of them rotated (EXIF "
            f"orientation?){' - ' + ', '.join(tags) if tags else ''}")

  def _check_headers(self, eid, ip, lp):
    """Existence + header sizes; returns ((h, w) of the image, its EXIF orientation)."""
    for path in (ip, lp):
      if not os.path.isfile(path):
        raise self._fail(eid, path, "missing", "file not found")
    try:
      (h, w), o = self._header(ip)
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ...
      raise self._fail(eid, ip, "unreadable",
                       f"cannot read image header ({_without_path(e, ip)})") from None
    if self.label_format == "image":
      try:
        (lh, lw), lo = self._header(lp)
      except Exception as e:
        raise self._fail(eid, lp, "unreadable",
                         f"cannot read mask header ({_without_path(e, lp)})") from None
      if (lh, lw) != (h, w):
        raise self._fail(eid, lp, "size_mismatch", f"mask is {lh}x{lw} (HxW), image is {h}x{w}"
                         + self._transposed_hint((h, w), (lh, lw), o, lo))
    return (h, w), o

  def _oriented(self, im):
    """Load ``im`` and turn it per its EXIF orientation (``exif="apply"``): (image, orientation).
    The tag is read before loading, as the header check read it."""
    o = exif_orientation(im)
    im.load()
    if self.exif == "apply" and o != 1:
      im = im.transpose(EXIF_TRANSPOSE[o])
    return im, o

  def _read_raw_label(self, eid, lp, _orientation=None):
    """The stored mask values (H, W) int (palette mode: RGB colours already turned to indices)."""
    try:
      if self.label_format == "sbd_mat":
        raw = read_mat_label(lp)
        if _orientation is not None:
          _orientation.append(1)
        return raw
      with Image.open(lp) as im:
        im, o = self._oriented(im)
        if _orientation is not None:
          _orientation.append(o)
        if im.mode in ("RGB", "RGBA") and self.mask_values in ("palette", "binary"):
          rgb = np.asarray(im)[..., :3]
        else:
          try:
            return palette.label_to_array(im)
          except palette.MaskModeError as e:
            hint = (" (or read colour masks with mask_values='palette', exact palette colours, "
                    "or 'binary')" if im.mode in ("RGB", "RGBA") else "")
            raise self._fail(eid, lp, "bad_labels",
                             f"{e}{hint}; mask_values={self.mask_values!r}") from None
    except DataError:
      raise
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
        im, o = self._oriented(im)
        image = palette.image_to_rgb(im)
    except Exception as e:
      msg = str(e)
      if "truncated" in msg:
        detail = ("cannot decode image: the file is truncated - its header reads but the pixel "
                  f"data is cut short (an interrupted download or copy?); PIL: {msg}")
      else:
        detail = f"cannot decode image ({msg})"
      raise self._fail(eid, ip, "unreadable", detail) from None
    mask_o = []
    raw = self._read_raw_label(eid, lp, mask_o)
    if image.shape[:2] != tuple(hw):
      raise self._fail(eid, ip, "size_mismatch",
                       f"decoded image is {image.shape[0]}x{image.shape[1]}, header said "
                       f"{int(hw[0])}x{int(hw[1])}")
    if raw.shape != image.shape[:2]:
      raise self._fail(eid, lp, "size_mismatch",
                       f"mask is {raw.shape[0]}x{raw.shape[1]} (HxW), image is "
                       f"{image.shape[0]}x{image.shape[1]}"
                       + self._transposed_hint(image.shape[:2], raw.shape, o, mask_o[0]))
    return image, self._values_to_labels(eid, lp, raw)

  # -- random access -------------------------------------------------------------------------
  def __len__(self):
    return len(self.ids)

  log_decode_skips = True
  """Log a warning for each example skipped on decode (off where the caller names them itself,
  e.g. the training loop, which sees the skip in the main process whatever decoded it)."""

  def __getitem__(self, i):
    i = int(i)
    eid = self.ids[i]
    try:
      image, label = self._decode(eid, self.image_paths[i], self.label_paths[i], self.sizes[i])
      valid = True
    except Exception as e:  # noqa: BLE001 - under "skip" no bad file stops an epoch
      if self.on_error == "raise":
        raise
      problem = getattr(e, "problem", None) or Problem(
          eid, self.image_paths[i], "unknown", f"cannot decode ({type(e).__name__}: {e})")
      if eid not in self._warned:
        self._warned.add(eid)
        self.report.add(problem)
        if self.log_decode_skips:
          log.warning("%s: skipping on decode (example %d comes out fully ignored): %s",
                      self.name, i, problem)
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
    oriented = dict(self.exif_oriented)
    new.exif_oriented = [(e, oriented[e]) for e in dict.fromkeys(new.ids) if e in oriented]
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


def _scan(source_or_label_paths, max_files=1000, num_threads=4, in_report=False):
  """-> (sorted values list, files scanned, files in all, files that failed to decode).

  ``in_report``: the failures will also be in the source's report (a full validation follows), so
  the warning is marked as repeating it (see :data:`fcnjax.data.validation.IN_REPORT`)."""
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
                len(items), failed[0], extra={IN_REPORT: in_report})
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
def read_id_list(path) -> IdList:
  """Ids from a split file: one id per line (the first token: ``Abyssinian_100 1 1 1`` gives
  ``Abyssinian_100``), or ``/JPEGImages/x.jpg /Seg.../x.png`` pairs; ``#`` lines are comments.

  Returns an :class:`IdList` (a list of str, in file order, duplicates included) that remembers the
  file and each id's line number: a :class:`SegmentationSource` built from it reports a duplicated
  id as a ``duplicate`` problem naming the file, the id and its lines."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise DataError(f"missing: {path}: split list not found", Problem("", str(path), "missing",
                                                                      "split list not found"))
  ids, lines = [], []
  for n, line in enumerate(path.read_text().splitlines(), 1):
    tok = line.strip().split()
    if tok and not tok[0].startswith("#"):
      ids.append(pathlib.PurePosixPath(tok[0]).stem if "/" in tok[0] or "." in tok[0] else tok[0])
      lines.append(n)
  return IdList(ids, path, lines)


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


def voc_source(root, split="train", *, on_error="raise", validate="header", exif="apply"):
  """PASCAL VOC 2012 segmentation: ``split`` in train / val / trainval / seg11valid / <list name>."""
  voc = find_voc2012(root)
  if split == "seg11valid" and not (voc / "ImageSets/Segmentation/seg11valid.txt").is_file():
    ids = seg11valid_ids()
  else:
    ids = read_id_list(voc / "ImageSets" / "Segmentation" / f"{split}.txt")
  return SegmentationSource(
      f"voc2012/{split}", ids, [voc / "JPEGImages" / f"{i}.jpg" for i in ids],
      [voc / "SegmentationClass" / f"{i}.png" for i in ids], class_names=palette.VOC_CLASSES,
      num_classes_origin="PASCAL VOC (21 classes)", on_error=on_error, validate=validate,
      exif=exif)


def voc_aug_source(root, split="train_aug", *, list_file=None, label_dir="SegmentationClassAug",
                   on_error="raise", validate="header", exif="apply"):
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
      num_classes_origin="PASCAL VOC (21 classes)", on_error=on_error, validate=validate,
      exif=exif)


def sbd_source(root, split="train", *, on_error="raise", validate="header", exif="apply"):
  """SBD (Hariharan et al.): ``root`` = ``benchmark_RELEASE`` or its ``dataset`` folder."""
  root = pathlib.Path(root).expanduser()
  ds = root / "dataset" if (root / "dataset").is_dir() else root
  ids = read_id_list(ds / f"{split}.txt")
  return SegmentationSource(
      f"sbd/{split}", ids, [ds / "img" / f"{i}.jpg" for i in ids],
      [ds / "cls" / f"{i}.mat" for i in ids], class_names=palette.VOC_CLASSES,
      num_classes_origin="PASCAL VOC (21 classes)", label_format="sbd_mat", on_error=on_error,
      validate=validate, exif=exif)


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
                validate="header", exif="apply"):
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
      on_error=on_error, validate=validate, exif=exif)


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
                  on_error="raise", validate="header", exif="apply", name=None,
                  scan_max_files=1000):
  """Images in ``image_dir`` and masks in ``label_dir`` matched by file stem.

  Files: every format Pillow can open (:data:`IMAGE_EXTS`), hidden files left out; an image with no
  mask of the same stem is a ``missing`` problem; masks without images are ignored; when several
  masks share a stem the PNG (lossless) one is used; two *images* with one stem (``a.jpg`` and
  ``a.png``) are a ``duplicate`` problem naming both (with ``on_error="skip"`` the first, in sorted
  order, is used). ``exif``: the EXIF orientation policy (module docstring).

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
      validate="header" if infer else validate, exif=exif, _finish=not infer)
  if infer:
    # The up-front problems are collected first (header checks above, decoding below, once the
    # classes are known) and raised / logged together by _finish.
    if not src.ids:
      src._finish()  # raises: every example failed its header check
    try:
      n, origin = _infer_num_classes(src, mask_values, scan_max_files,
                                     in_report=validate == "full")
    except DataError:
      src._finish()  # the file problems first (they may be why inference failed)
      raise
    src._set_classes(n, _default_names(n), origin)
    if validate == "full":
      src._full_pass(progress=True)
    src._finish()
  return src


def _default_names(n):
  return tuple(f"class{i}" for i in range(int(n)))


def _infer_num_classes(src, mask_values, max_files, in_report=False):
  """(num_classes, origin text) from the values stored in ``src``'s masks."""
  values, scanned, total, failed = _scan(src, max_files, in_report=in_report)
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
  """Guess the layout of ``root`` (VOC, SBD, Oxford-IIIT Pets) and open ``split``; ``kw``
  (``on_error``, ``validate``, ``exif``, ...) go to the reader."""
  root = pathlib.Path(root).expanduser()
  if (root / "dataset" / "cls").is_dir() or (root / "cls").is_dir():
    return sbd_source(root, split, **kw)
  if any((c / "annotations" / "trimaps").is_dir() for c in (root, root / "oxford-iiit-pet")):
    return pets_source(root, split, **kw)
  if split in ("train_aug", "trainaug"):
    return voc_aug_source(root, split, **kw)
  return voc_source(root, split, **kw)
