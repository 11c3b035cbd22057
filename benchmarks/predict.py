"""Prediction throughput and accuracy: bucketed vs exact vs tiled vs test-time augmentation.

    python -m benchmarks.predict --weights runs/smoke-fcn8s \\
        --out benchmarks/results/predict-cpu.json

Runs :class:`fcnjax.inference.Predictor` over the built-in VOC-layout val set (200 images, 41
sizes; or ``--voc-root``'s val) once per mode. Each mode gets a fresh predictor with the
persistent compilation cache off, and makes two passes over the images: the first (cold)
includes every XLA compile, the second (warm) is the steady state. Reports per mode: programs
compiled, cold and warm seconds, warm images/s and its ratio to bucketed (measured in the same
run), and val mean IU from the predicted class maps (numpy confusion matrix). Writes a JSON
(``--out``) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

import numpy as np

MODES = {
    "bucketed": dict(),
    "exact": dict(exact=True),
    "tiled 64x64 overlap 32": dict(tile=(64, 64), overlap=32),
    "flip": dict(flip=True),
    "scales 0.75/1/1.25": dict(scales=(0.75, 1.0, 1.25)),
    "flip + scales 0.5..1.5": dict(flip=True, scales=(0.5, 0.75, 1.0, 1.25, 1.5)),
}


def val_images(voc_root: str | None):
  """(images, labels, class count) of the val split (the built-in data without a root)."""
  from fcnjax import configs
  from fcnjax.data import datasets
  c = configs.load("voc_fcn8s")
  c.data.root = voc_root or ""
  src = datasets.make_sources(c, print_fn=lambda *a, **k: None).val
  examples = [src[i] for i in range(len(src))]
  return [e["image"] for e in examples], [e["label"] for e in examples], int(src.num_classes)


def mean_iu(preds, labels, c: int) -> float:
  from fcnjax.train.metrics import segmentation_metrics
  hist = np.zeros((c, c), np.int64)
  for p, l in zip(preds, labels):
    m = l != 255
    hist += np.bincount(c * l[m].astype(np.int64) + p[m], minlength=c * c).reshape(c, c)
  return float(segmentation_metrics(hist)["mean_iu"])


def measure(weights, images, labels, c, modes, log=print) -> list:
  from fcnjax.inference import Predictor, load_model
  loaded = load_model(weights)
  rows = []
  for name in modes:
    p = Predictor(loaded, **MODES[name])
    p.plan([im.shape[:2] for im in images])
    times, preds = [], None
    for _ in range(2):
      t = time.perf_counter()
      preds = [r.classes for r in p.predict_many(images)]
      times.append(time.perf_counter() - t)
    row = {"mode": name, "options": {k: list(v) if isinstance(v, tuple) else v
                                     for k, v in MODES[name].items()},
           "programs": p.programs_compiled, "buckets": len(p.bucket_shapes),
           "cold_s": times[0], "warm_s": times[1], "images": len(images),
           "warm_images_per_s": len(images) / times[1], "mean_iu": mean_iu(preds, labels, c)}
    log(f"{name}: {row['programs']} programs, cold {times[0]:.1f} s, warm {times[1]:.1f} s "
        f"({row['warm_images_per_s']:.1f} img/s), mean IU {row['mean_iu']:.4f}")
    rows.append(row)
  base = next((r for r in rows if r["mode"] == "bucketed"), rows[0])
  for r in rows:
    r["warm_x_bucketed"] = r["warm_s"] / base["warm_s"]
  return rows


def markdown(report: dict) -> str:
  m = report["machine"]
  lines = [f"{m['cpu']} ({m['cpu_count']} cores, {m['platform']}), load "
           f"{m['loadavg_start'][0]:.2f} at start; jax {m['jax']}, flax {m['flax']}; {m['date']}; "
           f"commit {m.get('git_commit') or '?'}; model {report['model']}; "
           f"{report['rows'][0]['images']} images; `{report['command']}`", "",
           "| mode | programs | cold s (incl. compiles) | warm s | warm images/s | warm time x "
           "bucketed | val mean IU |", "|---|---:|---:|---:|---:|---:|---:|"]
  for r in report["rows"]:
    lines.append(f"| {r['mode']} | {r['programs']} | {r['cold_s']:.1f} | {r['warm_s']:.1f} | "
                 f"{r['warm_images_per_s']:.1f} | {r['warm_x_bucketed']:.2f} | "
                 f"{r['mean_iu']:.4f} |")
  return "\n".join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m benchmarks.predict",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("--weights", required=True, help="a training workdir or weights file")
  p.add_argument("--voc-root", help="VOC to take val from (default: the built-in data)")
  p.add_argument("--modes", default=",".join(MODES),
                 help=f"comma-separated subset of: {', '.join(MODES)}")
  p.add_argument("--out", help="JSON path")
  args = p.parse_args(argv)
  modes = [m.strip() for m in args.modes.split(",") if m.strip()]
  unknown = [m for m in modes if m not in MODES]
  if unknown:
    print(f"error: --modes: unknown {unknown}; known: {list(MODES)}", file=sys.stderr)
    return 2
  if not pathlib.Path(args.weights).exists():
    print(f"error: --weights {args.weights}: no such file or folder (train one first: python -m "
          "fcnjax.experiments.voc_fcn8s --workdir runs/smoke-fcn8s)", file=sys.stderr)
    return 2
  os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)  # cold compiles are part of the measurement
  from benchmarks.buckets import machine_info
  images, labels, c = val_images(args.voc_root)
  machine = machine_info()
  rows = measure(args.weights, images, labels, c, modes)
  machine["loadavg_end"] = list(os.getloadavg())
  from fcnjax.inference import load_model
  report = {"machine": machine, "model": load_model(args.weights).description, "rows": rows,
            "command": "python -m benchmarks.predict " + " ".join(argv if argv is not None
                                                                   else sys.argv[1:])}
  print(markdown(report))
  if args.out:
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.out).write_text(json.dumps(report, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
