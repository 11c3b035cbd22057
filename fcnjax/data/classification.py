"""Image classification data in the class-per-folder layout, as segmentation-shaped sources.

``root/<class>/<file>`` (the tf_flowers / torchvision ``ImageFolder`` layout) is read by
:func:`class_folder_source` into a :class:`ClassificationSource`: a
:class:`~fcnjax.data.readers.SegmentationSource` whose label map is the image's class id at every
pixel, made in memory (never read from disk), so the Grain pipeline (buckets, padding, masks, flip,
scale) and the training loop work unchanged; a classifier reads the class as ``label[:, 0, 0]``
(padding is bottom / right, so pixel (0, 0) is always a real one). ``src[i]`` is::

    {"image": uint8 (H, W, 3) RGB, "label": uint8 (H, W) all = the class id (255 everywhere when
     the image failed to decode: valid False), "index": int, "id": "<class>/<file name>",
     "valid": bool}

* :func:`stratified_split` - train / val views with the same held-out fraction in every class.
* :func:`builtin_classification` - the built-in 5-class dataset of :mod:`fcnjax.data.
  synthetic_classes` (fine patterns on thin strips and photo-like sizes), written once, read back
  through :func:`class_folder_source`; its sources carry the object boxes (``src.boxes``).
* :func:`classification_sources` - ``config.data`` -> :class:`~fcnjax.data.datasets.Sources`.

Files and bad files, as the segmentation readers (:mod:`fcnjax.data.readers`): a class folder's
files are every format Pillow can open (``readers.IMAGE_EXTS``; other files such as ``README.txt``
and hidden ones such as ``.DS_Store`` are ignored, subfolders are not searched); sizes come from the
headers (after the EXIF policy ``exif``), problems found up front (unreadable headers, files that
are not images) are collected first and then raise ONE :class:`~fcnjax.data.validation.DataError`
(``on_error="raise"``) or drop their files (``"skip"``, counted in ``src.report``); pixel data
that fails to decode later (a truncated file) gives ``valid=False`` (``src.problem_of(i)`` names
the file and the reason); ``validate="full"`` decodes everything up front. A missing or empty root,
a root without class folders, or a class folder without images stops with a DataError naming it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pathlib

import numpy as np

from fcnjax.data import datasets, readers, synthetic_classes
from fcnjax.data.validation import DataError, Problem, log

IGNORED_FOLDERS = ("__MACOSX",)
"""Folders of the root that are never classes (nor are hidden ones: names starting with a dot)."""
BOXES_FILE = synthetic_classes.BOXES_FILE
"""Optional ``root/boxes.json``: ``{id: [x0, y0, x1, y1]}`` object boxes (pixels, exclusive ends,
in the coordinates of the image as read, i.e. after the EXIF policy)."""


class ClassificationSource(readers.SegmentationSource):
  """Images of ``num_classes`` classes; one class id per image, given as a constant label map.

  Everything :class:`~fcnjax.data.readers.SegmentationSource` has (``name``, ``ids``,
  ``image_paths``, ``sizes`` (N, 2) int32 (h, w) from the headers, ``class_names``,
  ``num_classes``, ``num_classes_origin``, ``palette`` (VOC's), ``exif``, ``exif_oriented``,
  ``report``, ``on_error``, ``problem_of``, ``validate_full``, ``subset``), plus:

  * ``labels``: (N,) int32, the class id of each example (from its id, nothing decoded);
  * ``boxes``: (N, 4) int32 object boxes ``x0, y0, x1, y1`` (exclusive ends; -1 where an image
    has none) when the data came with a ``boxes.json``, else None.

  Both follow the examples through ``subset`` and any dropped rows (they are looked up by id).
  ``label_paths`` are empty strings: no label file exists or is read.
  """

  def __init__(self, name, ids, image_paths, classes, *, class_names, num_classes_origin,
               boxes=None, on_error="raise", validate="header", exif="apply"):
    ids = [str(e) for e in ids]
    if len(classes) != len(ids):
      raise ValueError(f"{len(ids)} ids but {len(classes)} classes")
    # Set before the base class checks (and with validate="full" decodes) the examples.
    self._class_of = dict(zip(ids, (int(c) for c in classes)))
    self._box_of = None if boxes is None else {str(k): tuple(int(v) for v in b)
                                               for k, b in boxes.items()}
    self._size_of = {}
    super().__init__(name, ids, image_paths, [""] * len(ids), num_classes=len(class_names),
                     class_names=tuple(class_names), num_classes_origin=num_classes_origin,
                     on_error=on_error, validate=validate, exif=exif)
    self._check_boxes()

  # -- the hooks of SegmentationSource: only the image file exists -----------------------------
  def _check_all(self, ids, image_paths, label_paths):
    super()._check_all(ids, image_paths, label_paths)
    self._size_of = {e: (int(h), int(w)) for e, (h, w) in zip(self.ids, self.sizes)}

  def _check_headers(self, eid, ip, lp):
    """The image's existence and header size (no label file to check)."""
    if not os.path.isfile(ip):
      raise self._fail(eid, ip, "missing", "file not found")
    try:
      return self._header(ip)
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ...
      raise self._fail(eid, ip, "unreadable",
                       f"cannot read image header ({readers._without_path(e, ip)})") from None

  def _read_raw_label(self, eid, lp, _orientation=None):
    """The label map: the class id at every pixel, of the header size (the base decode checks
    the decoded image against that size first). Never reads a file."""
    if _orientation is not None:
      _orientation.append(1)
    return np.full(self._size_of[eid], self._class_of[eid], np.int32)

  # -- per-example class and box ----------------------------------------------------------------
  @property
  def labels(self) -> np.ndarray:
    """(N,) int32 class id of each example, in example order."""
    return np.fromiter((self._class_of[e] for e in self.ids), np.int32, len(self.ids))

  @property
  def boxes(self) -> np.ndarray | None:
    """(N, 4) int32 ``x0, y0, x1, y1`` per example (-1 rows: no box), or None without boxes."""
    if self._box_of is None:
      return None
    none = (-1, -1, -1, -1)
    return np.asarray([self._box_of.get(e, none) for e in self.ids], np.int32).reshape(-1, 4)

  def _check_boxes(self):
    """Every given box lies inside its image: 0 <= x0 < x1 <= w, 0 <= y0 < y1 <= h."""
    if self._box_of is None:
      return
    bad = []
    for eid in self.ids:
      if eid in self._box_of:
        x0, y0, x1, y1 = self._box_of[eid]
        h, w = self._size_of[eid]
        if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
          bad.append(f"{eid}: box {[x0, y0, x1, y1]} not inside its {h}x{w} image")
    if bad:
      more = f" ... and {len(bad) - 5} more" if len(bad) > 5 else ""
      raise DataError(f"{self.name}: {len(bad)} object box(es) outside their image: "
                      f"{'; '.join(bad[:5])}{more}")

  def class_counts(self) -> np.ndarray:
    """(num_classes,) int64 examples per class."""
    return np.bincount(self.labels, minlength=self.num_classes)

  def __repr__(self):
    return (f"ClassificationSource({self.name!r}, {len(self)} examples, "
            f"{self.num_classes} classes, skipped={self.report.num_skipped})")


def _class_folders(root: pathlib.Path) -> list:
  """The class folders of ``root`` (sorted by name; hidden and :data:`IGNORED_FOLDERS` left out)."""
  return sorted(p for p in root.iterdir()
                if p.is_dir() and not p.name.startswith(".") and p.name not in IGNORED_FOLDERS)


def _read_boxes(path: pathlib.Path) -> dict:
  try:
    boxes = json.loads(path.read_text())
    if not isinstance(boxes, dict):
      raise ValueError("not a JSON object")
    out = {}
    for k, b in boxes.items():
      if not (isinstance(b, list) and len(b) == 4 and all(isinstance(v, int) for v in b)):
        raise ValueError(f"{k!r}: {b!r} is not [x0, y0, x1, y1] (4 integers)")
      out[k] = b
    return out
  except ValueError as e:  # json.JSONDecodeError is a ValueError
    raise DataError(f"unreadable: {path}: object boxes must be a JSON object {{id: [x0, y0, x1, "
                    f"y1]}} ({e})", Problem("", str(path), "unreadable", str(e))) from None


def class_folder_source(root, *, on_error="raise", validate="header", exif="apply",
                        class_names=None, name=None) -> ClassificationSource:
  """Images of ``root/<class>/`` (one folder per class) as a :class:`ClassificationSource`.

  Classes: the sorted names of ``root``'s folders (hidden ones and ``__MACOSX`` left out), or
  ``class_names`` (that order; the names must be exactly the folders). Examples: every image file
  of each class folder (module docstring), class by class, files sorted by name; ids are the
  paths relative to ``root`` (``"daisy/123.jpg"``). Files directly in ``root`` are ignored, except
  an optional ``boxes.json`` of object boxes (:data:`BOXES_FILE`). ``on_error``, ``validate``,
  ``exif``: as for the segmentation readers. ``name`` defaults to ``"classes/<root name>"``.
  """
  root = pathlib.Path(root).expanduser()
  if not root.is_dir():
    raise DataError(f"missing: {root}: class-per-folder root not found",
                    Problem("", str(root), "missing", "class-per-folder root not found"))
  folders = _class_folders(root)
  if not folders:
    raise DataError(f"empty_split: {root}: no class folders in it (expected root/<class>/<image>)",
                    Problem("", str(root), "empty_split", "no class folders"))
  found = [p.name for p in folders]
  if class_names is not None:
    class_names = tuple(str(c) for c in class_names)
    missing = [c for c in class_names if c not in found]
    extra = [c for c in found if c not in class_names]
    if missing or extra or len(set(class_names)) != len(class_names):
      raise DataError(f"{root}: the class names {list(class_names)} do not match its class "
                      f"folders {found}" + (f"; no folder for {missing}" if missing else "")
                      + (f"; folders not named {extra}" if extra else ""))
    origin = f"given class names ({len(class_names)}: {', '.join(class_names)})"
  else:
    class_names = tuple(found)
    origin = f"from the class folders ({len(class_names)}: {', '.join(class_names)})"
  if len(class_names) > readers.MAX_CLASSES:
    raise DataError(f"{root}: {len(class_names)} class folders; at most {readers.MAX_CLASSES} "
                    "classes (labels are uint8, 255 = ignore)")
  ids, paths, classes = [], [], []
  for c, cname in enumerate(class_names):
    images = readers._list_images(root / cname)
    if not images:
      raise DataError(f"empty_split: {root / cname}: class folder {cname!r} holds no image files "
                      "(subfolders are not searched)",
                      Problem("", str(root / cname), "empty_split", "no image files"))
    ids += [f"{cname}/{p.name}" for p in images]
    paths += images
    classes += [c] * len(images)
  boxes = _read_boxes(root / BOXES_FILE) if (root / BOXES_FILE).is_file() else None
  src = ClassificationSource(name or f"classes/{root.name}", ids, paths, classes,
                             class_names=class_names, num_classes_origin=origin, boxes=boxes,
                             on_error=on_error, validate=validate, exif=exif)
  empty = [class_names[c] for c in np.flatnonzero(src.class_counts() == 0)]
  if empty:
    log.warning("%s: every image of class(es) %s was skipped: they have no examples", src.name,
                ", ".join(empty))
  return src


def _split_key(seed: int, eid: str) -> int:
  """A 64-bit sort key of an example id, a function of (seed, id) alone."""
  digest = hashlib.blake2b(f"{int(seed)}\0{eid}".encode(), digest_size=8).digest()
  return int.from_bytes(digest, "little")


def stratified_split(source: ClassificationSource, val_fraction: float, seed: int = 0) -> tuple:
  """Split ``source`` into ``(train, val)`` views holding out the same fraction of every class.

  A class of n >= 2 examples puts ``round(val_fraction * n)`` (half rounds up) of them, clipped to
  1..n-1, into val; a class with one example stays in train. Which ones: the examples of the
  class sorted by a hash of ``(seed, id)``, first ones to val - so the split is a function of the
  ids and the seed only (the same again on every run and file listing order; adding images moves
  no other image from train to val except where a class's val count changes). Both views keep the
  source's order, are disjoint and cover it. Names ``"<name>/train"``, ``"<name>/val"``.
  ``val_fraction`` must be in (0, 1); ValueError if no class has 2 examples.
  """
  f = float(val_fraction)
  if not 0.0 < f < 1.0:  # also rejects NaN
    raise ValueError(f"validation fraction must be in (0, 1), got {val_fraction}")
  labels = source.labels
  keys = np.asarray([_split_key(seed, e) for e in source.ids], np.uint64)
  val = []
  for c in np.unique(labels):
    members = np.flatnonzero(labels == c)
    n = len(members)
    if n < 2:
      continue
    n_val = min(max(int(math.floor(f * n + 0.5)), 1), n - 1)
    val.append(members[np.argsort(keys[members], kind="stable")[:n_val]])
  if not val:
    raise ValueError(f"{source.name}: no class has 2 examples: nothing to hold out for val")
  val = np.sort(np.concatenate(val))
  train = np.setdiff1d(np.arange(len(source)), val)
  return (source.subset(train, f"{source.name}/train"), source.subset(val, f"{source.name}/val"))


def builtin_classification(cache_dir=None, *, num_train: int = 1000, num_val: int = 250,
                           seed: int = 0, on_error="raise", validate="header", exif="apply",
                           class_names=None, **params) -> tuple:
  """(train, val) sources of the built-in 5-class dataset (:mod:`fcnjax.data.synthetic_classes`),
  written once under ``<cache>/classes-<params hash>/{train,val}/<class>/*.png`` (``cache_dir``,
  else ``$FCNJAX_CACHE``, else ``~/.cache/fcnjax``) and read with :func:`class_folder_source`
  (classes in :data:`~fcnjax.data.synthetic_classes.CLASS_NAMES` order unless ``class_names``
  reorders them); both carry ``boxes``. ``params``: the generator's size ranges (``strip_h``,
  ``strip_w``, ``photo_side``)."""
  root = synthetic_classes.ensure_builtin_classes(cache_dir, num_train=num_train,
                                                  num_val=num_val, seed=seed, **params)
  names = class_names or synthetic_classes.CLASS_NAMES
  opts = dict(on_error=on_error, validate=validate, exif=exif, class_names=names)
  return (class_folder_source(root / "train", name="builtin_classes/train", **opts),
          class_folder_source(root / "val", name="builtin_classes/val", **opts))


def classification_sources(data, *, seed: int, print_fn=print) -> datasets.Sources:
  """``config.data`` (a ConfigDict) -> train / val :class:`ClassificationSource` s.

  Fields: ``root`` (class-per-folder root; '' = the built-in dataset with ``builtin.num_train``,
  ``num_val``, ``seed`` and any other generator parameters), ``val_images`` (a separate
  class-per-folder root for validation, read with the training classes; '' = hold out
  ``val_fraction`` of ``root`` per class with :func:`stratified_split` and ``seed``), ``classes``
  (comma-separated names fixing the class order, '' = sorted folder names), ``on_bad_data``
  (``"skip"``: files with up-front problems are left out and counted; ``"raise"``: one DataError
  lists them), ``validate``, ``exif``, ``cache``. Prints one line: what was loaded, the class
  counts, and how many files were skipped.
  """
  names = datasets._class_names(data)
  opts = dict(on_error=data.on_bad_data, validate=data.validate, exif=data.exif)
  if not data.root:
    if data.val_images:
      raise DataError("data.val_images is set but data.root is not (the built-in dataset has its "
                      "own validation images)")
    builtin = data.builtin.to_dict()
    train, val = builtin_classification(datasets._cache(data), class_names=names, **opts,
                                        **builtin)
    where = (f"the built-in dataset ({builtin.get('num_train')} train / "
             f"{builtin.get('num_val')} val images, seed {builtin.get('seed', 0)})")
    reports = [train.report, val.report]
  elif data.val_images:
    train = class_folder_source(data.root, class_names=names, **opts)
    val = class_folder_source(data.val_images, class_names=train.class_names, **opts)
    where = f"{data.root} (val: {data.val_images})"
    reports = [train.report, val.report]
  else:
    full = class_folder_source(data.root, class_names=names, **opts)
    train, val = stratified_split(full, data.val_fraction, seed)
    where = f"{data.root} ({data.val_fraction:g} of each class held out for val, seed {seed})"
    reports = [full.report]
  skipped = sum(r.num_skipped for r in reports)
  counts = ", ".join(f"{n} {c}" for n, c in zip(train.class_names, train.class_counts()))
  print_fn(f"classes: {len(train)} train / {len(val)} val images of {train.num_classes} classes "
           f"from {where}; train per class: {counts}"
           + (f"; {skipped} bad file(s) skipped (listed in the log)" if skipped else ""))
  return datasets.Sources(train, val, f"class folders: {where}")
