"""Train an FCN on your own folder of images and masks (or on a built-in grey-scan dataset).

    python -m fcnjax.experiments.folder                         # built-in data: grey + binary
    python -m fcnjax.experiments.folder --images scans/img --masks scans/mask \\
        --mask-values binary --workdir runs/scans
    python -m fcnjax.experiments.folder --images img --masks lbl --classes road,car,person \\
        --val-images val/img --val-masks val/lbl --epochs 30

Images and masks are matched by file stem, any sizes, any format Pillow reads (grey images train
as they are). ``--mask-values`` says how the masks store classes: ``index`` (class ids, 255 =
ignore; the default), ``binary`` (0 = background, any non-zero value = foreground: 0/1 and 0/255
masks both work), ``trimap`` (Oxford Pets 1 = object, 2 = background, 3 = border) or ``palette``
(VOC-style palette PNGs). The number of classes comes from ``--classes`` or from the mask values
found (the log says which). Without ``--val-images`` a fraction of the images (``--val-fraction``,
chosen from the seed) is held out for validation.

A thin layer over the ``folder`` config (``fcnjax/configs/folder.py``): the same run as
``python -m fcnjax.train --config folder --config.data.images=...``; ``--config.FIELD=VALUE``
sets any other field.
"""

from __future__ import annotations

import argparse
import sys

from fcnjax.configs import folder as folder_config
from fcnjax.experiments import flags


def parse_args(argv=None):
  p = argparse.ArgumentParser(prog="python -m fcnjax.experiments.folder",
                              description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=__doc__.split("\n\n", 1)[1])
  p.add_argument("--images", help="folder of training images (default: the built-in dataset)")
  p.add_argument("--masks", help="folder of their masks, matched by file stem")
  p.add_argument("--mask-values", choices=["index", "binary", "trimap", "palette"])
  p.add_argument("--classes", help="comma-separated class names, e.g. background,crack")
  g = p.add_mutually_exclusive_group()
  g.add_argument("--val-fraction", type=float, help="share of the images held out (default 0.1)")
  g.add_argument("--val-images", help="folder of validation images")
  p.add_argument("--val-masks", help="folder of validation masks")
  p.add_argument("--ignore-border", action="store_true", default=None,
                 help="trimap masks: ignore the border (2 classes) instead of a border class")
  flags.add_loss_flags(p)
  p.add_argument("--preset", choices=sorted(folder_config.PRESETS), default=None)
  flags.add_training_flags(p)
  return p.parse_known_args(argv)


def main(argv=None) -> int:
  args, overrides = parse_args(argv)
  config = folder_config.get_config(args.preset)
  flags.apply_data_flags(config, args)
  flags.apply_training_flags(config, args)
  return flags.finish(config, args, overrides)


if __name__ == "__main__":
  sys.exit(main())
