"""The summary reproduces the Caffe reference FCN-8s's shapes at 500×500 (pool3 88, pool4 44,
pool5 22, fc6 16, fuse_pool4 34, fuse_pool3 70, upscore8 568, crop 500), and is made of the
model's own forward: its rows are ``model(x, return_intermediates=True)``'s intermediates."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
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


@pytest.mark.parametrize("name, kwargs, hw", [
    ("fcn8s", {}, (500, 500)),
    ("fcn4s", {"aligned": True}, (97, 131)),
    ("fcn16s", {"batch_norm": True, "learnable_upsampling": True}, (64, 80)),
    ("fcn32s", {}, (45, 59)),
])
def test_rows_cover_the_forward_and_every_parameter(name, kwargs, hw):
  model = nnx.eval_shape(lambda: models.build_model(name, 21, width_multiplier=1 / 8, **kwargs))
  rows = layer_table(model, *hw, batch=2)
  graphdef, state = nnx.split(model)
  logits = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state,
                          jax.ShapeDtypeStruct((2, *hw, 3), jnp.float32))
  assert rows[-1][1] == logits.shape == (2, *hw, 21)
  assert sum(n for _, _, n in rows) == models.count_params(model)
  labels = [label.split(" ")[0] for label, _, _ in rows]
  assert len(set(labels)) == len(labels)
  assert set(model.layer_modules()) <= set(labels)  # every parameterised layer has its row
  assert all(n == 0 for label, _, n in rows if label.split(" ")[0] not in model.layer_modules())
  if kwargs.get("aligned"):
    assert rows[0][0] == "pad to multiple of 32"


def test_intermediates_are_the_forward_itself():
  """With the flag, the same logits plus the named intermediates; without it, no extra work."""
  model = models.fcn8s(5, width_multiplier=1 / 16, zero_init_scores=False, rngs=nnx.Rngs(0))
  model.eval()
  x = jax.random.normal(jax.random.key(1), (2, 41, 53, 3)) * 50
  logits, out = model(x, return_intermediates=True)
  np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(logits))
  np.testing.assert_array_equal(np.asarray(out["crop"]), np.asarray(logits))
  assert list(out)[:3] == ["conv1_1", "conv1_2", "pool1"]
  assert list(out)[-11:] == ["fc6", "fc7", "score_fr", "upscore_fr", "score_pool4", "fuse_pool4",
                             "upscore_pool4", "score_pool3", "fuse_pool3", "upscore_pool3", "crop"]
  # the intermediates are what the layers compute from each other
  np.testing.assert_allclose(np.asarray(model.score_fr(out["fc7"])), np.asarray(out["score_fr"]),
                             rtol=1e-6, atol=1e-6)
  plain = jax.make_jaxpr(lambda x: model(x))(x)
  flagged = jax.make_jaxpr(lambda x: model(x, return_intermediates=True))(x)
  assert len(plain.jaxpr.eqns) == len(flagged.jaxpr.eqns)
  assert len(flagged.jaxpr.outvars) == 1 + len(out)


def test_vgg_records_its_layers():
  bb = models.vgg16(width_multiplier=1 / 16, rngs=nnx.Rngs(0))
  bb.eval()
  x = jnp.ones((1, 40, 40, 3))
  feats, out = bb(x, return_intermediates=True)
  want = []
  for stage, depth in enumerate((2, 2, 3, 3, 3), 1):
    want += [f"conv{stage}_{i}" for i in range(1, depth + 1)] + [f"pool{stage}"]
  assert list(out) == want + ["fc6", "fc7"]
  for k in ("pool1", "pool3", "pool5", "fc7"):
    assert out[k] is feats[k]
  assert set(bb.layer_modules()) == {k for k in out if not k.startswith("pool")}


def test_summary_cli():
  out = subprocess.run([sys.executable, "-m", "fcnjax.models.summary", "--model", "fcn16s",
                        "--size", "97", "131", "--width-multiplier", "0.125"],
                       capture_output=True, text=True, check=True).stdout
  assert "crop 27" in out and "(1, 97, 131, 21)" in out
