"""``python -m fcnjax.interpret {gradcam,activations,filters,layers} ...`` (see :mod:`.cli`)."""

import sys

from fcnjax.interpret.cli import main

if __name__ == "__main__":
  sys.exit(main())
