"""A run's ``config.data`` -> its train and val sources (the one place experiments open data).

``kind`` picks the layout: ``voc`` (VOC 2012, or SBD + VOC), ``folder`` (images + masks matched by
stem) or ``pets`` (Oxford-IIIT Pets). With no data given (``root`` / ``images`` empty) each kind
writes its built-in dataset once (``config.data.builtin`` holds its parameters) and reads it back
through the same reader, so the default runs exercise the real path.

Bad files: every up-front problem (missing files, unreadable headers, size mismatches, duplicate
ids; with ``data.validate = "full"`` every decode problem too) stops here with one
:class:`~fcnjax.data.validation.DataError` listing them all. The sources returned decode with
``on_error="skip"``: an example that fails to decode later comes out fully ignored, and the
training loop names, counts and (``data.on_bad_data = "raise"``) stops on it.
"""

from __future__ import annotations

import dataclasses
import pathlib

from fcnjax.data import readers, synthetic
from fcnjax.data.validation import DataError


@dataclasses.dataclass
class Sources:
  """What a run trains and evaluates on. ``description``: one line for the log."""

  train: readers.SegmentationSource
  val: readers.SegmentationSource
  description: str


def _class_names(data) -> tuple | None:
  names = tuple(n.strip() for n in data.classes.split(",")) if data.classes.strip() else None
  if names is not None and (any(not n for n in names) or len(set(names)) != len(names)):
    raise DataError(f"--classes {data.classes!r}: names must be non-empty and distinct")
  return names


def _short_name(path) -> str:
  """``folder/<parent>/<name>`` of a folder, for the log."""
  p = pathlib.Path(path).expanduser()
  return f"folder/{p.parent.name}/{p.name}" if p.parent.name else f"folder/{p.name}"


def _cache(data):
  return data.cache or None


def _opts(data) -> dict:
  """The reader options every layout takes from ``config.data``."""
  return dict(validate=data.validate, exif=data.exif)


def _decode_skips(sources: Sources) -> Sources:
  """Decode-time problems become fully-ignored examples (the loop decides what to do)."""
  for src in (sources.train, sources.val):
    src.on_error = "skip"
    src.log_decode_skips = False  # the training loop names each one (Run.check_rows)
  return sources


def voc_sources(data, print_fn=print) -> Sources:
  if data.sbd_root:
    if not data.root:
      raise DataError("data.sbd_root (--sbd-root) needs data.root (--voc-root) too: evaluation "
                      "is on VOC")
    sbd = pathlib.Path(data.sbd_root).expanduser()
    aug = next((p for p in (sbd, sbd.parent) if (p / "SegmentationClassAug").is_dir()), None)
    train = (readers.voc_aug_source(aug, "train_aug", **_opts(data)) if aug is not None
             else readers.sbd_source(sbd, "train", **_opts(data)))
    split = data.val_split or "seg11valid"
    return Sources(train, readers.voc_source(data.root, split, **_opts(data)),
                   f"SBD + VOC {split}")
  if data.root:
    split = data.val_split or "val"
    return Sources(readers.voc_source(data.root, "train", **_opts(data)),
                   readers.voc_source(data.root, split, **_opts(data)),
                   f"VOC 2012 at {data.root} (val: {split})")
  b = data.builtin
  print_fn(f"No VOC on disk (no --voc-root / data.root): using the built-in VOC-layout dataset "
           f"({b.num_train} train / {b.num_val} val images).")
  root = synthetic.ensure_builtin_dataset(_cache(data), **b.to_dict())
  return Sources(readers.voc_source(root, "train", **_opts(data)),
                 readers.voc_source(root, "val", **_opts(data)), f"built-in VOC layout at {root}")


def folder_sources(data, *, seed: int, print_fn=print) -> Sources:
  names = _class_names(data)
  mask_values = data.mask_values
  if not data.images:
    if data.masks or data.val_images or data.val_masks:
      raise DataError("data.masks / val_images / val_masks are set but data.images (--images) "
                      "is not")
    b = data.builtin
    print_fn(f"No --images given: using the built-in folder dataset (grey images, binary 0/255 "
             f"masks; {b.num_train} train / {b.num_val} val images).")
    paths = synthetic.ensure_builtin_folder(_cache(data), **b.to_dict())
    images, masks = paths["images"], paths["masks"]
    val_images, val_masks = paths["val_images"], paths["val_masks"]
    mask_values = "binary"
  else:
    if not data.masks:
      raise DataError("--images needs --masks (the folder of masks, matched by file stem)")
    images, masks = data.images, data.masks
    val_images, val_masks = data.val_images, data.val_masks
    if bool(val_images) != bool(val_masks):
      raise DataError("--val-images and --val-masks go together")
  opts = dict(mask_values=mask_values, class_names=names,
              num_classes=len(names) if names else None,
              trimap_ignore_border=data.ignore_border, **_opts(data))
  train = readers.folder_source(images, masks, name=_short_name(images), **opts)
  if val_images:
    # The validation set is read with the training set's classes (never re-inferred).
    val = readers.folder_source(val_images, val_masks, mask_values=mask_values,
                                class_names=train.class_names, num_classes=train.num_classes,
                                trimap_ignore_border=data.ignore_border,
                                name=_short_name(val_images), **_opts(data))
    desc = f"{images} (val: {val_images})"
  else:
    n = len(train)
    if n < 2:
      raise DataError(f"{images}: {n} image(s): need at least 2 to hold some out for validation "
                      "(or give --val-images / --val-masks)")
    train, val = readers.split_by_fraction(train, data.val_fraction, seed)
    desc = f"{images} ({data.val_fraction:g} held out for val, seed {seed})"
  print_fn(f"masks read as {mask_values!r}; number of classes {train.num_classes}: "
           f"{train.num_classes_origin}")
  return Sources(train, val, desc)


def pets_sources(data, print_fn=print) -> Sources:
  root = data.root
  if not root:
    b = data.builtin
    print_fn(f"No --root given: using the built-in Oxford-Pets-layout dataset "
             f"({b.num_trainval} trainval / {b.num_test} test images).")
    root = synthetic.ensure_builtin_pets(_cache(data), **b.to_dict())
  train = readers.pets_source(root, "trainval", ignore_border=data.ignore_border, **_opts(data))
  val = readers.pets_source(root, "test", ignore_border=data.ignore_border, **_opts(data))
  return Sources(train, val, f"Oxford-IIIT Pets layout at {root} (val: test)")


def _classification_sources(config, print_fn) -> Sources:
  from fcnjax.data import classification  # class-per-folder images, for the classifiers
  sources = classification.classification_sources(config.data, seed=config.train.seed,
                                                  print_fn=print_fn)
  if tuple(config.data.resize_to):
    from fcnjax.data.squash import ResizedSource
    size = tuple(config.data.resize_to)
    sources = Sources(ResizedSource(sources.train, size), ResizedSource(sources.val, size),
                      f"{sources.description}, every image resized to {size[0]}x{size[1]}")
  return sources


def make_sources(config, *, print_fn=print) -> Sources:
  """The train and val sources of ``config.data`` (``config.train.seed`` splits folder data)."""
  kind = config.data.kind
  makers = {"voc": lambda: voc_sources(config.data, print_fn),
            "folder": lambda: folder_sources(config.data, seed=config.train.seed,
                                             print_fn=print_fn),
            "pets": lambda: pets_sources(config.data, print_fn),
            "classes": lambda: _classification_sources(config, print_fn)}
  if kind not in makers:
    raise DataError(f"data.kind = {kind!r}: must be one of {', '.join(makers)}")
  try:
    return _decode_skips(makers[kind]())
  except DataError as e:
    if getattr(e, "summary", None):  # a run stops on up-front problems: say what to do
      raise DataError(e.summary + (
          "\nNothing was trained: fix or remove these files (or their ids in the split file) "
          "and run again; problems found only when decoding are skipped and counted"),
          e.problem, e.problems) from None
    raise
  except ValueError as e:  # the readers' argument checks (e.g. 3 class names for binary masks)
    raise DataError(f"data: {e}") from e
