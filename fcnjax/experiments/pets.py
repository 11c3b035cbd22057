"""Oxford-IIIT Pets segmentation (pet / background / border), or a built-in Pets-layout dataset.

    python -m fcnjax.experiments.pets                           # built-in data
    python -m fcnjax.experiments.pets --root ~/data/oxford-iiit-pet --workdir runs/pets
    python -m fcnjax.experiments.pets --root ~/data/oxford-iiit-pet --ignore-border

``--root`` holds ``images/*.jpg``, ``annotations/trimaps/*.png`` and ``annotations/trainval.txt``
/ ``test.txt`` (the official download): it trains on trainval and evaluates on test. The trimaps
give 3 classes (background, pet, border), or with ``--ignore-border`` 2 classes with the border
ignored. Augmentation: horizontal flip (as Deep Learning with Python, ch. 9) plus scale jitter.

A thin layer over the ``pets`` config (``fcnjax/configs/pets.py``): the same run as
``python -m fcnjax.train --config pets``; ``--config.FIELD=VALUE`` sets any other field.
"""

from __future__ import annotations

import argparse
import sys

from fcnjax.configs import pets as pets_config
from fcnjax.experiments import flags


def parse_args(argv=None):
  p = argparse.ArgumentParser(prog="python -m fcnjax.experiments.pets",
                              description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=__doc__.split("\n\n", 1)[1])
  p.add_argument("--root", help="the Oxford-IIIT Pets folder (default: the built-in dataset)")
  p.add_argument("--ignore-border", action="store_true", default=None,
                 help="2 classes (background, pet) with the trimap border ignored")
  flags.add_loss_flags(p)
  p.add_argument("--preset", choices=sorted(pets_config.PRESETS), default=None)
  flags.add_training_flags(p)
  return p.parse_known_args(argv)


def main(argv=None) -> int:
  args, overrides = parse_args(argv)
  config = pets_config.get_config(args.preset)
  flags.apply_data_flags(config, args)
  flags.apply_training_flags(config, args)
  return flags.finish(config, args, overrides)


if __name__ == "__main__":
  sys.exit(main())
