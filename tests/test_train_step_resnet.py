"""The train step with ResNet models: the aux head's loss, frozen BatchNorm, SyncBN (8 devices)."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from fcnjax.models import build_model
from fcnjax.train import step as step_lib
from fcnjax.train.loss import segmentation_loss

from train_helpers import REPO, env_with_devices


def _batch(n=2, h=29, w=35, classes=3, seed=0):
  rng = np.random.default_rng(seed)
  return {"image": jnp.asarray(rng.normal(size=(n, h, w, 3)).astype(np.float32)),
          "label": jnp.asarray(rng.integers(0, classes, (n, h, w)).astype(np.uint8)),
          "mask": jnp.ones((n, h, w), bool)}


def _fresh(name, **kw):
  """(model, graphdef, state): the same initial state on every call (the step donates it)."""
  model = build_model(name, 3, width_multiplier=1 / 16, seed=0, **kw)
  graphdef, state = step_lib.init_state(model, optax.sgd(0.0))
  return model, graphdef, state


@pytest.mark.slow
def test_aux_loss_is_added_with_its_weight():
  b = _batch()
  model, graphdef, state = _fresh("fcn_resnet50")
  step = step_lib.make_train_step(graphdef, optax.sgd(0.0), aux_weight=0.5)
  _, metrics = step(state, b)
  plain = step_lib.make_train_step(graphdef, optax.sgd(0.0))
  _, base = plain(_fresh("fcn_resnet50")[2], b)
  ce = float(base["loss"])
  aux = float(metrics["aux_ce"])
  assert aux > 0 and abs(float(metrics["loss"]) - (ce + 0.5 * aux)) <= 1e-5 * ce
  # the aux head exists for training only: inference returns the logits alone
  model = _fresh("fcn_resnet50")[0]  # (the step donated the first model's arrays)
  model.eval()
  assert model(b["image"]).shape == (2, 29, 35, 3)


def test_frozen_batch_norm_trains_like_eval_mode_and_keeps_statistics():
  b = _batch()
  model, graphdef, state = _fresh("d2l_fcn_resnet18")
  before = [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.BatchStat))]
  step = step_lib.make_train_step(graphdef, optax.sgd(0.0), frozen_batch_norm=True)
  new, metrics = step(state, b)
  after = [np.asarray(x) for x in jax.tree.leaves(nnx.state(nnx.merge(graphdef, new.params,
                                                                      new.rest), nnx.BatchStat))]
  assert len(before) == len(after) > 0
  for a, c in zip(before, after):
    np.testing.assert_array_equal(a, c)
  model = _fresh("d2l_fcn_resnet18")[0]  # (the step donated the first model's arrays)
  model.eval()  # running statistics: the same loss as the frozen train step (no dropout here)
  want, _ = segmentation_loss(model(b["image"]), b["label"], b["mask"])
  np.testing.assert_allclose(float(metrics["loss"]), float(want), rtol=1e-5)
  unfrozen = step_lib.make_train_step(graphdef, optax.sgd(0.0))
  moved, _ = unfrozen(_fresh("d2l_fcn_resnet18")[2], b)
  moved = [np.asarray(x) for x in jax.tree.leaves(nnx.state(nnx.merge(graphdef, moved.params,
                                                                      moved.rest), nnx.BatchStat))]
  assert any(not np.array_equal(a, c) for a, c in zip(before, moved))


@pytest.mark.slow
def test_batch_norm_on_eight_devices_matches_one():
  """tests/sharded/check_batch_norm.py (8 simulated devices, its tolerances in its docstring)."""
  proc = subprocess.run([sys.executable, "-m", "sharded.check_batch_norm"],
                        env=env_with_devices(8), capture_output=True, text=True, timeout=600,
                        cwd=REPO / "tests")
  print(proc.stdout)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
