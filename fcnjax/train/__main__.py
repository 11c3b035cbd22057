"""``python -m fcnjax.train``: see :mod:`fcnjax.train.main`."""

import sys

from fcnjax.train.main import main

if __name__ == "__main__":  # grain's spawned workers re-import this module
  sys.exit(main())
