"""Output H×W == input H×W for every size (jax.eval_shape), parameter counts, ceil vs floor."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fcnjax import models

SQUARE_SIZES = range(1, 601)
RNG = np.random.default_rng(0)
NON_SQUARE = [tuple(int(v) for v in hw) for hw in RNG.integers(1, 1201, size=(200, 2))]


def output_shapes(model, sizes, chunk=100):
  """Output (H, W, C) of ``model`` for each input (h, w), by abstract evaluation only.

  Many sizes are traced in one ``jax.eval_shape`` call (same checks, less per-call overhead).
  """
  graphdef, state = nnx.split(model)

  def forward(state, xs):
    module = nnx.merge(graphdef, state)
    return [module(x) for x in xs]

  shapes = []
  for i in range(0, len(sizes), chunk):
    xs = [jax.ShapeDtypeStruct((1, h, w, 3), jnp.float32) for h, w in sizes[i:i + chunk]]
    shapes += [o.shape[1:] for o in jax.eval_shape(forward, state, xs)]
  return shapes


def output_hw(model, h, w):
  return output_shapes(model, [(h, w)])[0]


@pytest.mark.slow
@pytest.mark.parametrize("name, kwargs", [
    ("fcn32s", {}), ("fcn16s", {}), ("fcn8s", {}), ("fcn8s-atonce", {}),
    ("fcn8s", {"aligned": True}), ("fcn32s", {"aligned": True}),
])
def test_output_size_equals_input_size(name, kwargs):
  model = models.MODELS[name](5, width_multiplier=1 / 64, rngs=nnx.Rngs(0), **kwargs)
  model.eval()
  sizes = [(s, s) for s in SQUARE_SIZES] + NON_SQUARE
  bad = [hw for hw, shape in zip(sizes, output_shapes(model, sizes)) if shape != (*hw, 5)]
  assert not bad, f"{name} {kwargs}: wrong output size for {bad[:10]} ({len(bad)} sizes)"


def test_learnable_parameter_counts():
  counts = {name: models.count_params(nnx.eval_shape(lambda c=c: c(21, rngs=nnx.Rngs(0))))
            for name, c in models.MODELS.items() if name in ("fcn32s", "fcn16s", "fcn8s")}
  # VGG16 convs 14,714,688 + fc6 102,764,544 + fc7 16,781,312 + score heads.
  assert counts["fcn32s"] == 14_714_688 + 102_764_544 + 16_781_312 + 86_037
  assert counts["fcn16s"] == counts["fcn32s"] + 10_773
  assert counts["fcn8s"] == 134_362_751


def test_learnable_upsampling_stores_the_reference_127008_weights():
  fixed = nnx.eval_shape(lambda: models.fcn8s(21, rngs=nnx.Rngs(0)))
  learned = nnx.eval_shape(lambda: models.fcn8s(21, learnable_upsampling=True,
                                                rngs=nnx.Rngs(0)))
  assert models.count_params(learned) - models.count_params(fixed) == 127_008


@pytest.mark.slow
def test_floor_pooling_breaks_reference_crops_ceil_never_does():
  """With floor pooling FCN-32s's final crop fails for 434 heights of 1..1199,
  first at 46 (96 of them in 1..300, checked here); below 26 floor pooling also leaves fc6 empty.
  Ceil pooling never fails."""
  floor = models.fcn32s(5, width_multiplier=1 / 64, pool="floor", rngs=nnx.Rngs(0))
  ceil = models.fcn32s(5, width_multiplier=1 / 64, pool="ceil", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="crop does not fit"):
    output_hw(floor, 46, 46)
  crop_fails, empty = [], []
  for s in range(1, 301):
    try:
      output_hw(floor, s, 100)  # W = 100 works with either rounding
    except ValueError as e:
      (empty if "is empty" in str(e) else crop_fails).append(s)
  assert len(crop_fails) == 96 and crop_fails[0] == 46, crop_fails[:5]
  assert empty == list(range(1, 26))
  sizes = [(s, 100) for s in crop_fails + empty]
  assert all(shape[:2] == hw for hw, shape in zip(sizes, output_shapes(ceil, sizes)))


def test_train_eval_switch_dropout():
  model = models.fcn8s(3, width_multiplier=1 / 32, zero_init_scores=False, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (1, 40, 40, 3)) * 50
  model.eval()
  assert np.array_equal(model(x), model(x))
  model.train()
  assert not np.allclose(model(x), model(x))
