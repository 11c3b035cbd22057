"""Scan a dataset for bad files and print the report.

    python -m fcnjax.data.check ROOT [--split train,val] [--header-only]
    python -m fcnjax.data.check --images DIR --labels DIR [--mask-values index|binary|trimap|palette]
        [--classes NAME,... | --num-classes N] [--map binary|pets]

ROOT is a VOC (VOCdevkit or VOC2012), SBD or Oxford-IIIT Pets folder (splits default to train,val;
trainval,test for Pets). Every example is decoded (unless ``--header-only``) and checked: image and
mask exist, can be read, have the same size, and the mask holds only values its mode allows (0..C-1
and 255 for index masks; C inferred from the masks unless given). Exit status 0 when no problem was
found, 1 otherwise.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

from fcnjax.data import readers
from fcnjax.data.validation import DataError

MAPS = {"binary": readers.BINARY_MAP, "pets": readers.PETS_TRIMAP}


def check(source_fn) -> tuple:
  """Open a source with ``on_error="skip"``; returns (ok: bool, report text)."""
  try:
    src = source_fn()
  except (DataError, ValueError) as e:
    return False, f"error: {e}"
  return not src.report.problems, src.report.summary()


def main(argv=None):
  p = argparse.ArgumentParser(prog="python -m fcnjax.data.check", description=__doc__.split("\n")[0])
  p.add_argument("root", nargs="?", help="VOC (VOCdevkit or VOC2012) or SBD root")
  p.add_argument("--split", help="comma-separated splits (default train,val; Pets: trainval,test)")
  p.add_argument("--images")
  p.add_argument("--labels", "--masks", dest="labels")
  p.add_argument("--mask-values", choices=readers.MASK_VALUES, default="index")
  p.add_argument("--map", choices=sorted(MAPS), help="an exact value map (older form of "
                 "--mask-values): binary = exactly 0/255, pets = trimap with the border ignored")
  p.add_argument("--classes", help="comma-separated class names")
  p.add_argument("--num-classes", type=int)
  p.add_argument("--header-only", action="store_true", help="skip full decoding")
  a = p.parse_args(argv)
  validate = "header" if a.header_only else "full"
  ok_all = True
  if a.images:
    if not a.labels:
      p.error("--images needs --labels")
    names = [c.strip() for c in a.classes.split(",")] if a.classes else None

    def folder():
      src = readers.folder_source(
          a.images, a.labels, mask_values=a.mask_values, value_map=MAPS.get(a.map),
          num_classes=a.num_classes, class_names=names, on_error="skip", validate=validate)
      print(f"classes: {src.num_classes} ({src.num_classes_origin})")
      return src
    jobs = [("folder", folder)]
  elif a.root:
    pets = any((pathlib.Path(a.root) / s / "annotations" / "trimaps").is_dir()
               for s in ("", "oxford-iiit-pet"))
    split = a.split or ("trainval,test" if pets else "train,val")
    jobs = [(s, (lambda s=s: readers.open_source(a.root, s, on_error="skip", validate=validate)))
            for s in split.split(",") if s]
  else:
    p.error("give ROOT or --images/--labels")
  for _, fn in jobs:
    ok, text = check(fn)
    ok_all &= ok
    print(text)
  return 0 if ok_all else 1


if __name__ == "__main__":
  sys.exit(main())
