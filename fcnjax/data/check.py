"""Scan a dataset for bad files and print the report.

    python -m fcnjax.data.check ROOT [--split train,val] [--header-only]
    python -m fcnjax.data.check --images DIR --labels DIR [--map binary|pets] [--num-classes N]

Every example is decoded (unless ``--header-only``) and checked: image and mask exist, can be read,
have the same size, and the mask holds only 0..C-1 and 255 (or values of ``--map``). Exit status 0
when no problem was found, 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys

from fcnjax.data import readers
from fcnjax.data.validation import DataError

MAPS = {"binary": readers.BINARY_MAP, "pets": readers.PETS_TRIMAP}


def check(source_fn) -> tuple:
  """Open a source with ``on_error="skip"``; returns (ok: bool, report text)."""
  try:
    src = source_fn()
  except DataError as e:
    return False, str(e)
  return not src.report.problems, src.report.summary()


def main(argv=None):
  p = argparse.ArgumentParser(prog="python -m fcnjax.data.check", description=__doc__.split("\n")[0])
  p.add_argument("root", nargs="?", help="VOC (VOCdevkit or VOC2012) or SBD root")
  p.add_argument("--split", default="train,val")
  p.add_argument("--images")
  p.add_argument("--labels")
  p.add_argument("--map", choices=sorted(MAPS))
  p.add_argument("--num-classes", type=int)
  p.add_argument("--header-only", action="store_true", help="skip full decoding")
  a = p.parse_args(argv)
  validate = "header" if a.header_only else "full"
  ok_all = True
  if a.images:
    jobs = [("folder", lambda: readers.folder_source(
        a.images, a.labels, value_map=MAPS.get(a.map), num_classes=a.num_classes,
        on_error="skip", validate=validate))]
  elif a.root:
    jobs = [(s, (lambda s=s: readers.open_source(a.root, s, on_error="skip", validate=validate)))
            for s in a.split.split(",") if s]
  else:
    p.error("give ROOT or --images/--labels")
  for _, fn in jobs:
    ok, text = check(fn)
    ok_all &= ok
    print(text)
  return 0 if ok_all else 1


if __name__ == "__main__":
  sys.exit(main())
