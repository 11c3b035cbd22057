"""The summary reproduces the reference's shapes at 500×500 (FCN_REFERENCE.md)."""

import subprocess
import sys

from flax import nnx

from fcnjax import models
from fcnjax.models.summary import layer_table


def test_reference_shapes_at_500():
  model = nnx.eval_shape(lambda: models.fcn8s(21, rngs=nnx.Rngs(0)))
  rows = {name.split(" ")[0]: shape for name, shape, _ in layer_table(model, 500, 500)}
  assert rows["pool3"][1] == 88 and rows["pool4"][1] == 44 and rows["pool5"][1] == 22
  assert rows["fc6"][1] == 16 and rows["fuse_pool4"][1] == 34 and rows["fuse_pool3"][1] == 70
  heights = [shape[1] for name, shape, _ in layer_table(model, 500, 500)]
  assert 568 in heights and heights[-1] == 500


def test_summary_cli():
  out = subprocess.run([sys.executable, "-m", "fcnjax.models.summary", "--model", "fcn16s",
                        "--size", "97", "131", "--width-multiplier", "0.125"],
                       capture_output=True, text=True, check=True).stdout
  assert "crop 27" in out and "(1, 97, 131, 21)" in out
