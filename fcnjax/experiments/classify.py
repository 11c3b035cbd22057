"""Train the variable-size FCN classifier on class-per-folder images (or the built-in data).

    python -m fcnjax.experiments.classify                       # built-in 5-class data, cpu preset
    python -m fcnjax.experiments.classify --data flowers/ --workdir runs/flowers --epochs 20
    python -m fcnjax.experiments.classify --data train/ --val-data val/ --pooling avg \\
        --label-smoothing 0.1 --class-weights 1,1,2,1,1

``--data DIR`` holds one folder per class (``DIR/<class>/*.jpg``, the tf_flowers / ImageFolder
layout), images of any size and format Pillow reads; without ``--val-data`` a stratified
``--val-fraction`` of each class (chosen from the seed) is held out. Every image trains at its own
size in size buckets with masked global pooling: no resizing, and the padding never reaches the
pooled value. Images below the model's minimum input size (19 x 19 for the default network) are
skipped and counted. Outputs in the workdir: metrics.jsonl, curves.png, confusion.png (the val
confusion matrix), checkpoints and best/ (by val top-1).

A thin layer over the ``classify`` config (``fcnjax/configs/classify.py``): the same run as
``python -m fcnjax.train --config classify:PRESET``; ``--config.FIELD=VALUE`` sets any other field.
"""

from __future__ import annotations

import argparse
import sys

from fcnjax.configs import classify as classify_config
from fcnjax.experiments import flags


def parse_args(argv=None):
  p = argparse.ArgumentParser(prog="python -m fcnjax.experiments.classify",
                              description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=__doc__.split("\n\n", 1)[1])
  p.add_argument("--data", dest="root", help="class-per-folder training images (default: the "
                 "built-in dataset)")
  g = p.add_mutually_exclusive_group()
  g.add_argument("--val-fraction", type=float, help="share of each class held out (default 0.1)")
  g.add_argument("--val-data", dest="val_images", help="class-per-folder validation images")
  p.add_argument("--classes", help="comma-separated class names (must be the folder names)")
  p.add_argument("--pooling", choices=["max", "avg"], help="masked global pooling (default max)")
  p.add_argument("--label-smoothing", type=float)
  p.add_argument("--class-weights", help="comma-separated cross-entropy weight per class")
  p.add_argument("--preset", choices=sorted(classify_config.PRESETS), default=None)
  flags.add_training_flags(p, models=["fcn_classifier", "fcn_classifier-vgg16",
                                      "fcn_classifier-resnet18", "fcn_classifier-resnet50"])
  return p.parse_known_args(argv)


def main(argv=None) -> int:
  args, overrides = parse_args(argv)
  config = classify_config.get_config(args.preset)
  flags.apply_data_flags(config, args)
  for dest, field in (("pooling", "model.pooling"), ("label_smoothing", "loss.label_smoothing")):
    if getattr(args, dest) is not None:
      flags.set_field(config, field, getattr(args, dest))
  flags.apply_training_flags(config, args)
  if not args.workdir:
    args.workdir = f"runs/classify-{config.preset}"
  return flags.finish(config, args, overrides)


if __name__ == "__main__":
  sys.exit(main())
