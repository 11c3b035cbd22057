"""Size statistics and bucket plans of a dataset.

    python -m fcnjax.data.stats ROOT [--split train,val] [--granularity 32] [--epochs 50]
        [--cost-profile cpu|gpu|PROFILE.json]
    python -m fcnjax.data.stats SIZES.csv [--split train,val]      # CSV: split,image_id,width,height

prints the image count, min / mean / max of H and W, the number of distinct shapes and the most
common ones, then the bucket plan and its padded-pixel fraction for K = 1, 2, 4, 8, 16 and "auto".
ROOT is a VOC (VOCdevkit or VOC2012 folder) or SBD root; sizes come from image headers.
"""

from __future__ import annotations

import argparse
import collections
import csv
import pathlib
import sys
import time

import numpy as np

from fcnjax.data import bucket_costs, buckets, readers


def read_sizes_csv(path, splits=None) -> np.ndarray:
  """(N, 2) int (height, width) from a ``split,image_id,width,height`` CSV (optionally filtered)."""
  with open(path, newline="") as f:
    rows = list(csv.DictReader(f))
  missing = {"width", "height"} - set(rows[0] if rows else {})
  if missing:
    raise ValueError(f"{path}: needs columns split,image_id,width,height (missing {missing})")
  sizes = []
  for line, r in enumerate(rows, start=2):  # line 1 is the header
    if splits and r.get("split") not in splits:
      continue
    try:
      h, w = int(r["height"]), int(r["width"])
    except (TypeError, ValueError):
      raise ValueError(f"{path}, line {line}: width/height must be integers, got "
                       f"{r.get('width')!r} x {r.get('height')!r}") from None
    if h < 1 or w < 1:
      raise ValueError(f"{path}, line {line}: width/height must be positive, got {w} x {h}")
    sizes.append((h, w))
  return np.array(sizes, np.int64).reshape(-1, 2)


def size_summary(sizes, top: int = 5) -> str:
  sizes = np.asarray(sizes).reshape(-1, 2)
  h, w = sizes[:, 0], sizes[:, 1]
  common = collections.Counter(map(tuple, sizes.tolist())).most_common(top)
  lines = [f"images: {len(sizes)}",
           f"height: min {h.min()}  mean {h.mean():.1f}  max {h.max()}",
           f"width:  min {w.min()}  mean {w.mean():.1f}  max {w.max()}",
           f"distinct shapes (h x w): {len(np.unique(sizes, axis=0))}",
           "most common: " + ", ".join(f"{a}x{b} {100 * c / len(sizes):.1f}%"
                                       for (a, b), c in common)]
  return "\n".join(lines)


def plans_summary(sizes, ks=(1, 2, 4, 8, 16, "auto"), **plan_kwargs) -> str:
  lines = []
  for k in ks:
    t = time.perf_counter()
    plan = buckets.plan_buckets(sizes, k, **plan_kwargs)
    dt = time.perf_counter() - t
    lines.append(f"--- K = {k}: {plan.num_buckets} buckets, padded-pixel fraction "
                 f"{100 * plan.padded_fraction:.2f}%  (planned in {dt:.2f} s)")
    lines.extend(plan.report().splitlines()[1:])
    if k == "auto":
      lines.append(f"  {plan.auto_reason()}")
  return "\n".join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(prog="python -m fcnjax.data.stats", description=__doc__.split("\n")[0])
  p.add_argument("root", help="dataset root (VOC / SBD) or a sizes CSV")
  p.add_argument("--split", default="train,val", help="comma-separated splits (default train,val)")
  p.add_argument("--granularity", type=int, default=1)
  p.add_argument("--epochs", type=float, default=1.0, help="planned epochs for K='auto'")
  p.add_argument("--cost-profile", metavar="FILE_OR_BACKEND", default="cpu",
                 help="K='auto''s costs: a JSON from python -m benchmarks.buckets --calibrate, or "
                 "'cpu' / 'gpu' for the built-in defaults (default cpu)")
  p.add_argument("--compile-s", type=float, default=None,
                 help="override the profile's compile seconds per bucket")
  p.add_argument("--s-per-pixel", type=float, default=None,
                 help="override the profile's train-step seconds per padded pixel")
  a = p.parse_args(argv)
  try:
    profile = (bucket_costs.default_profile(a.cost_profile)
               if a.cost_profile in ("cpu", "gpu", "tpu")
               else bucket_costs.load_profile(a.cost_profile))
  except (bucket_costs.CostProfileError, ValueError) as e:
    print(f"error: --cost-profile {e}", file=sys.stderr)
    return 2
  for flag, v in (("--compile-s", a.compile_s), ("--s-per-pixel", a.s_per_pixel),
                  ("--epochs", a.epochs)):
    if v is not None and not (np.isfinite(v) and v > 0):
      print(f"error: {flag} {v}: must be a positive number", file=sys.stderr)
      return 2
  splits = [s for s in a.split.split(",") if s]
  root = pathlib.Path(a.root)
  if root.suffix.lower() == ".csv":
    sizes = read_sizes_csv(root, splits)
  else:
    sizes = np.concatenate([readers.open_source(root, s).sizes for s in splits])
  if len(sizes) == 0:
    print(f"{a.root}: no images for splits {splits}", file=sys.stderr)
    return 1
  print(f"{a.root} [{','.join(splits)}]")
  print(size_summary(sizes))
  costs = profile.plan_kwargs(a.epochs)
  costs.update({k: v for k, v in (("compile_s_per_bucket", a.compile_s),
                                  ("s_per_pixel", a.s_per_pixel)) if v is not None})
  print(f"auto: {profile.describe()}" + (" (overridden by --compile-s / --s-per-pixel)"
                                         if a.compile_s or a.s_per_pixel else ""))
  print(plans_summary(sizes, granularity=a.granularity, **costs))
  return 0


if __name__ == "__main__":
  sys.exit(main())
