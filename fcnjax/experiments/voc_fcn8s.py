"""FCN-8s on PASCAL VOC, or on the built-in VOC-layout dataset when no VOC is on disk.

    python -m fcnjax.experiments.voc_fcn8s                      # built-in data, smoke preset
    python -m fcnjax.experiments.voc_fcn8s --voc-root ~/data/VOCdevkit --preset fast
    python -m fcnjax.experiments.voc_fcn8s --sbd-root ~/data/SBD --voc-root ~/data/VOCdevkit \\
        --preset paper --model fcn32s --init vgg16_from_caffe.pth --workdir runs/fcn32s

A thin layer over the ``voc_fcn8s`` config (``fcnjax/configs/voc_fcn8s.py``, where the presets
are written): the flags below set its fields, ``--config.FIELD=VALUE`` sets any other, and the
run is the same as ``python -m fcnjax.train --config voc_fcn8s:PRESET``.

Presets:

* ``smoke`` (default without --voc-root): the built-in data (2,000 train / 200 val images at 1/4
  of VOC's sizes), an aligned FCN-8s at 1/8 of VGG16's widths (``--no-aligned`` for the exact
  one), AdamW with cosine decay, batch 8, ``auto`` size buckets (K from this backend's compile and
  step costs: 3 on the built-in data), 4 epochs (1,000 steps). Minutes on a
  laptop CPU; see experiments/voc_fcn8s/README.md for a recorded run.
* ``fast`` (default with --voc-root): full-width exact FCN-8s, SGD 0.9 with poly decay on the
  mean loss, bf16 compute, batch 8 of real, uncropped images in 8 size buckets, flip + scale
  0.5-2 augmentation. A GPU job.
* ``paper``: the reference recipe exactly: SBD train (``train_aug`` ids if ``--sbd-root`` points
  at SegmentationClassAug, else SBD ``train``), seg11valid for evaluation, batch 1, SGD momentum
  0.99, summed loss, fixed learning rate 1e-10 (FCN-32s) / 1e-12 (16s) / 1e-14 (8s), weight decay
  5e-4, biases at 2x lr, no augmentation, 100k iterations (300k at-once), each stage initialised
  from the previous (``--init``). Target: seg11valid mean IU 63.6 / 65.0 / 65.5 for 32s / 16s / 8s.
  It needs VOC + SBD and a GPU (~2 days on a Titan X for the reference); it cannot run here.
"""

from __future__ import annotations

import argparse
import sys

from fcnjax.configs import voc_fcn8s as voc_config
from fcnjax.experiments import flags

ATONCE_STEPS = 300_000
"""The at-once FCN-8s trains 3x longer than the staged models in the reference."""


def parse_args(argv=None):
  p = argparse.ArgumentParser(prog="python -m fcnjax.experiments.voc_fcn8s",
                              description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=__doc__.split("\n\n", 2)[2])
  p.add_argument("--voc-root", help="VOCdevkit (or VOC2012) folder; without it the built-in "
                 "dataset is used")
  p.add_argument("--sbd-root", help="SBD 'dataset' folder (img/, cls/) or a folder with "
                 "SegmentationClassAug: train on it, evaluate on seg11valid (the paper)")
  p.add_argument("--val-split", help="VOC split to evaluate on (default: val; seg11valid with "
                 "--sbd-root)")
  p.add_argument("--preset", choices=sorted(voc_config.PRESETS), default=None,
                 help="default: smoke on the built-in data, fast with --voc-root")
  flags.add_training_flags(p, models=["fcn32s", "fcn16s", "fcn8s", "fcn8s-atonce"])
  return p.parse_known_args(argv)


def make_config(args):
  """(preset, config) for the flags."""
  preset = args.preset or ("fast" if (args.voc_root or args.sbd_root) else "smoke")
  config = voc_config.get_config(preset)
  config.data.root = args.voc_root or ""
  config.data.sbd_root = args.sbd_root or ""
  config.data.val_split = args.val_split or ""
  flags.apply_training_flags(config, args)
  if preset == "paper" and config.model.name == "fcn8s-atonce" and args.steps is None:
    config.train.steps = ATONCE_STEPS
  return preset, config


def main(argv=None) -> int:
  args, overrides = parse_args(argv)
  preset, config = make_config(args)
  if not args.workdir:
    args.workdir = f"runs/{preset}-{config.model.name}"
  return flags.finish(config, args, overrides)


if __name__ == "__main__":
  sys.exit(main())
