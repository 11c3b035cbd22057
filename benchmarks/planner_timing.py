"""Planning seconds of ``fcnjax.data.buckets.plan_buckets`` on real and synthetic size tables.

    python -m benchmarks.planner_timing [--sbd PATH/sbd_sizes.csv]

Cases: the VOC 2012 segmentation sizes shipped with fcnjax, SBD's sizes when ``--sbd`` is
given (``data/voc_sizes/sbd_sizes.csv`` of the reference material), 5,000 uniform sizes in
100..500 and 200,000 uniform sizes in 100..1000 (seed 0); K = 1, 2, 8, 32 and ``auto`` with the
CPU default cost profile over 50 epochs. One line per case: seconds, buckets, padded-pixel
fraction, and for ``auto`` its reason. Wall-clock seconds of one call, single-threaded numpy.
"""

import argparse
import time
from importlib import resources

import numpy as np

from fcnjax.data import bucket_costs, buckets, stats


def cases(sbd_path=None):
  with resources.as_file(resources.files("fcnjax.data") / "voc2012_seg_sizes.csv") as path:
    out = {"voc2012": stats.read_sizes_csv(path)}
  if sbd_path:
    out["sbd"] = stats.read_sizes_csv(sbd_path)
  rng = np.random.default_rng(0)
  out["uniform-5k"] = rng.integers(100, 501, (5000, 2))
  out["uniform-200k"] = rng.integers(100, 1001, (200_000, 2))
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m benchmarks.planner_timing")
  p.add_argument("--sbd", help="SBD size table (CSV split,image_id,width,height)")
  a = p.parse_args(argv)
  costs = bucket_costs.CPU_PROFILE.plan_kwargs(50)
  for name, sizes in cases(a.sbd).items():
    for k in (1, 2, 8, 32, "auto"):
      t = time.perf_counter()
      plan = buckets.plan_buckets(sizes, k, **costs)
      dt = time.perf_counter() - t
      print(f"{name:13s} K={k!s:5s} {dt:6.2f} s  {plan.num_buckets:2d} buckets "
            f"{100 * plan.padded_fraction:6.2f} % padding  {plan.auto_reason()}", flush=True)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
