"""Scan a dataset for bad files and print the report.

    python -m fcnjax.data.check ROOT [--split train,val] [--header-only] [--exif apply|ignore]
    python -m fcnjax.data.check --images DIR --labels DIR [--mask-values index|binary|trimap|palette]
        [--classes NAME,... | --num-classes N] [--map binary|pets] [--exif apply|ignore]

ROOT is a VOC (VOCdevkit or VOC2012), SBD or Oxford-IIIT Pets folder (splits default to train,val;
trainval,test for Pets). Every example is decoded (unless ``--header-only``; a progress bar on a
terminal) and checked: image and mask exist, can be read, have the same size, the id is not listed
twice, and the mask holds only values its mode allows (0..C-1 and 255 for index masks; C inferred
from the masks unless given). Each problem is printed once, in the report. Images carrying an EXIF
orientation tag are counted (informational: ``--exif`` says whether the readers turn them as the
tag says, the default, or use the stored pixels). Exit status 0 when no problem was found, 1
otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import pathlib
import sys

from fcnjax.data import readers
from fcnjax.data.validation import IN_REPORT, DataError, log

MAPS = {"binary": readers.BINARY_MAP, "pets": readers.PETS_TRIMAP}
EXIF_SHOWN = 5
"""How many ids of EXIF-tagged images the check lists."""


class _NotInReport(logging.Filter):
  """Drops log records that only repeat the report (which the check prints itself)."""

  def filter(self, record):
    return not getattr(record, IN_REPORT, False)


@contextlib.contextmanager
def _report_printed_here():
  filt = _NotInReport()
  log.addFilter(filt)
  try:
    yield
  finally:
    log.removeFilter(filt)


def exif_note(src) -> str | None:
  """One line on the images of ``src`` that carry an EXIF orientation tag (None if none)."""
  tagged = src.exif_oriented
  if not tagged:
    return None
  n = len(tagged)
  shown = ", ".join(f"{eid} ({o})" for eid, o in tagged[:EXIF_SHOWN])
  more = f", ... and {n - EXIF_SHOWN} more" if n > EXIF_SHOWN else ""
  how = ("applied (--exif apply; --exif ignore uses the stored orientation)" if src.exif == "apply"
         else "ignored (--exif ignore; --exif apply turns them as their tag says)")
  return (f"{src.name}: exif: {n} image{'s carry' if n != 1 else ' carries'} an EXIF orientation "
          f"tag, {how}: {shown}{more}")


def check(source_fn) -> tuple:
  """Open a source (``source_fn()``, with ``on_error="skip"``); returns (ok: bool, report text).

  The report lists every problem once (the source's own log lines that repeat it are filtered
  out); duplicates are problems; EXIF-tagged images are reported but are not a failure."""
  with _report_printed_here():
    try:
      src = source_fn()
    except (DataError, ValueError) as e:
      return False, f"error: {e}"
  text = src.report.summary()
  note = exif_note(src)
  if note:
    text += "\n" + note
  return not src.report.problems, text


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
  p.add_argument("--exif", choices=readers.EXIF_POLICIES, default="apply",
                 help="EXIF orientation tags: apply them as viewers do (default) or ignore them "
                      "(stored orientation)")
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
          num_classes=a.num_classes, class_names=names, on_error="skip", validate=validate,
          exif=a.exif)
      print(f"classes: {src.num_classes} ({src.num_classes_origin})")
      return src
    jobs = [("folder", folder)]
  elif a.root:
    pets = any((pathlib.Path(a.root) / s / "annotations" / "trimaps").is_dir()
               for s in ("", "oxford-iiit-pet"))
    split = a.split or ("trainval,test" if pets else "train,val")
    jobs = [(s, (lambda s=s: readers.open_source(a.root, s, on_error="skip", validate=validate,
                                                 exif=a.exif)))
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
