"""The trainer's model initialisation (one program compiled at XLA's optimisation level 0) draws
the same parameters as an eager :func:`fcnjax.models.build_model` with the same seed.

Tolerance: 1e-6 of each variable's largest magnitude (float32 rounding of the initialisers'
arithmetic under different fusion; measured 2.2e-7 for fcn8s and fcn_resnet50 at width 1/8).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from fcnjax import configs, models
from fcnjax.train import loop


def _values(model):
  out = {}
  for path, var in nnx.to_flat_state(nnx.state(model)):
    x = var.get_value()
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    out[path] = np.asarray(x, np.float64)
  return out


@pytest.mark.parametrize("name,aligned", [("fcn8s", True), ("d2l_fcn_resnet18", False)])
def test_trainer_init_equals_eager_build(name, aligned):
  cfg = configs.load("voc_fcn8s")
  cfg.model.update(name=name, num_classes=5, width_multiplier=1 / 16, aligned=aligned)
  got = _values(loop.build_model(cfg, seed=3))
  want = _values(models.build_model(name, 5, width_multiplier=1 / 16, aligned=aligned, seed=3))
  assert got.keys() == want.keys()
  for path, w in want.items():
    scale = max(float(np.abs(w).max(initial=0.0)), 1e-30)
    assert np.abs(got[path] - w).max(initial=0.0) <= 1e-6 * scale, path
