"""Optimizer builders: parameter groups, hand-computed SGD steps, schedules, accumulation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from fcnjax.train import optim


def tiny_params():
  return {
      "conv": {"kernel": jnp.array([[1.0, -2.0], [0.5, 3.0]]), "bias": jnp.array([0.5, -1.0])},
      "bn": {"scale": jnp.array([1.0, 2.0]), "bias": jnp.array([0.0, 0.1])},
      "upscore_final": {"kernel": jnp.array([0.25, 0.75])},
  }


def grads_at(step):
  g = {
      "conv": {"kernel": jnp.array([[0.1, 0.2], [-0.3, 0.4]]), "bias": jnp.array([1.0, -0.5])},
      "bn": {"scale": jnp.array([0.2, -0.2]), "bias": jnp.array([0.3, 0.1])},
      "upscore_final": {"kernel": jnp.array([5.0, -5.0])},
  }
  return jax.tree.map(lambda x: x * (1.0 + step), g)


def run(tx, params, steps):
  state = tx.init(params)
  for t in range(steps):
    updates, state = tx.update(grads_at(t), state, params)
    params = optax.apply_updates(params, updates)
  return params


def caffe_sgd(w, grads, lr, momentum, wd):
  """Caffe's SGDSolver: v = m v + lr (g + wd w); w -= v."""
  w = np.asarray(w, np.float64)
  v = np.zeros_like(w)
  for g in grads:
    v = momentum * v + lr * (np.asarray(g, np.float64) + wd * w)
    w = w - v
  return w


def test_labels():
  p = tiny_params()
  assert optim.param_labels(p) == {"conv": {"kernel": "weight", "bias": "bias"},
                                   "bn": {"scale": "norm", "bias": "bias"},
                                   "upscore_final": {"kernel": "weight"}}
  assert optim.param_labels(p, freeze_upsampling=True)["upscore_final"]["kernel"] == "frozen"
  assert optim.decay_mask(p) == {"conv": {"kernel": True, "bias": False},
                                 "bn": {"scale": False, "bias": False},
                                 "upscore_final": {"kernel": True}}


def test_reference_two_steps_match_caffe_formula():
  lr, m, wd = 0.1, 0.9, 0.5
  p = run(optim.reference_optimizer(lr, momentum=m, weight_decay=wd), tiny_params(), 2)
  p0, gs = tiny_params(), [grads_at(0), grads_at(1)]
  g = lambda *keys: [gt[keys[0]][keys[1]] for gt in gs]
  # weights: decay, lr ×1; biases: no decay, lr ×2; norm scale: no decay, lr ×1; upscore frozen.
  np.testing.assert_allclose(p["conv"]["kernel"],
                             caffe_sgd(p0["conv"]["kernel"], g("conv", "kernel"), lr, m, wd),
                             rtol=1e-6)
  np.testing.assert_allclose(p["conv"]["bias"],
                             caffe_sgd(p0["conv"]["bias"], g("conv", "bias"), 2 * lr, m, 0.0),
                             rtol=1e-6)
  np.testing.assert_allclose(p["bn"]["bias"],
                             caffe_sgd(p0["bn"]["bias"], g("bn", "bias"), 2 * lr, m, 0.0),
                             rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(p["bn"]["scale"],
                             caffe_sgd(p0["bn"]["scale"], g("bn", "scale"), lr, m, 0.0),
                             rtol=1e-6)
  np.testing.assert_array_equal(p["upscore_final"]["kernel"], p0["upscore_final"]["kernel"])


def test_bias_gets_twice_the_weight_lr_and_no_decay():
  # Same gradient on a weight and a bias, zero decay: the bias moves exactly twice as far.
  params = {"l": {"kernel": jnp.array([1.0]), "bias": jnp.array([1.0])}}
  grads = {"l": {"kernel": jnp.array([0.3]), "bias": jnp.array([0.3])}}
  tx = optim.reference_optimizer(0.01, weight_decay=0.0)
  u, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(u["l"]["bias"], 2 * u["l"]["kernel"], rtol=1e-7)
  # Zero gradient, decay on: only the weight moves (towards zero).
  zero = jax.tree.map(jnp.zeros_like, grads)
  tx = optim.reference_optimizer(0.01, weight_decay=0.5)
  u, _ = tx.update(zero, tx.init(params), params)
  np.testing.assert_allclose(u["l"]["kernel"], [-0.01 * 0.5], rtol=1e-6)
  assert float(u["l"]["bias"][0]) == 0.0


def test_reference_unfrozen_upsampling_is_trained_as_weight():
  lr, m, wd = 0.1, 0.99, 5e-4
  p = run(optim.reference_optimizer(lr, freeze_upsampling=False), tiny_params(), 2)
  want = caffe_sgd(tiny_params()["upscore_final"]["kernel"],
                   [grads_at(0)["upscore_final"]["kernel"], grads_at(1)["upscore_final"]["kernel"]],
                   lr, m, wd)
  np.testing.assert_allclose(p["upscore_final"]["kernel"], want, rtol=1e-6)


class TinyFCN(nnx.Module):
  """The FCN's parameter layout in miniature (a full model takes seconds to build on CPU)."""

  def __init__(self, rngs):
    from fcnjax.models.layers import BilinearUpsample, ScoreHead
    self.score_fr = ScoreHead(3, 2, zero_init=False, rngs=rngs)
    self.upscore_skips = nnx.List([BilinearUpsample(2, 2, learnable=True, rngs=rngs)])
    self.upscore_final = BilinearUpsample(2, 2, learnable=True, rngs=rngs)
    self.fixed = BilinearUpsample(2, 2, learnable=False, rngs=rngs)


def test_frozen_upscore_in_nnx_model():
  model = TinyFCN(nnx.Rngs(0))
  opt = nnx.Optimizer(model, optim.reference_optimizer(1e-2, clip_global_norm=10.0),
                      wrt=nnx.Param)
  before = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  grads = jax.tree.map(jnp.ones_like, nnx.state(model, nnx.Param))
  nnx.jit(lambda m, o, g: o.update(m, g))(model, opt, grads)
  after = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  labels = optim.param_labels(before, freeze_upsampling=True)
  # Labels are the same on the nnx.State (leaves under Variable(.value)) as on the pure dict.
  assert jax.tree.leaves(optim.param_labels(nnx.state(model, nnx.Param), freeze_upsampling=True)) \
      == jax.tree.leaves(labels)
  moved = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), before, after)
  flat_labels = jax.tree.leaves(labels)
  flat_moved = jax.tree.leaves(moved)
  assert sorted(set(flat_labels)) == ["bias", "frozen", "weight"]
  assert flat_labels.count("frozen") == 2
  for label, did_move in zip(flat_labels, flat_moved):
    assert did_move == (label != "frozen")


def test_clipping():
  params = {"a": {"kernel": jnp.array([0.0, 0.0])}, "upscore": {"kernel": jnp.array([0.0])}}
  grads = {"a": {"kernel": jnp.array([3.0, 4.0])}, "upscore": {"kernel": jnp.array([100.0])}}
  tx = optim.reference_optimizer(1.0, weight_decay=0.0, clip_global_norm=1.0)
  u, _ = tx.update(grads, tx.init(params), params)
  # The frozen gradient does not count in the norm: (3, 4) / 5.
  np.testing.assert_allclose(u["a"]["kernel"], [-0.6, -0.8], rtol=1e-6)
  assert float(u["upscore"]["kernel"][0]) == 0.0


def test_schedules():
  s = optim.make_schedule(0.01, total_steps=100, warmup_steps=10, schedule="poly")
  np.testing.assert_allclose(s(0), 0.0, atol=1e-12)
  np.testing.assert_allclose(s(5), 0.005, rtol=1e-6)
  np.testing.assert_allclose(s(10), 0.01, rtol=1e-6)
  np.testing.assert_allclose(s(55), 0.01 * (1 - 45 / 90) ** 0.9, rtol=1e-5)
  np.testing.assert_allclose(s(100), 0.0, atol=1e-12)
  np.testing.assert_allclose(s(150), 0.0, atol=1e-12)
  s = optim.make_schedule(0.1, total_steps=50, schedule="poly", end_value=1e-4)
  np.testing.assert_allclose(s(0), 0.1, rtol=1e-6)
  np.testing.assert_allclose(s(50), 1e-4, rtol=1e-5)
  s = optim.make_schedule(1.0, total_steps=20, warmup_steps=4, schedule="cosine")
  np.testing.assert_allclose(s(2), 0.5, rtol=1e-6)
  np.testing.assert_allclose(s(4 + 8), 0.5, rtol=1e-5)
  np.testing.assert_allclose(s(20), 0.0, atol=1e-7)
  s = optim.make_schedule(0.3, warmup_steps=3, schedule="constant", warmup_init_value=0.03)
  np.testing.assert_allclose([s(0), s(3), s(1000)], [0.03, 0.3, 0.3], rtol=1e-6)
  with pytest.raises(ValueError):
    optim.make_schedule(0.1, total_steps=None, schedule="poly")
  with pytest.raises(ValueError):
    optim.make_schedule(0.1, total_steps=10, schedule="step")


def test_modern_sgd_uses_schedule_and_coupled_decay():
  lr0, m, wd = 0.1, 0.9, 0.5
  tx = optim.modern_optimizer("sgd", lr0, total_steps=10, warmup_steps=2, momentum=m,
                              weight_decay=wd)
  sched = optim.make_schedule(lr0, 10, 2)
  params = tiny_params()
  state = tx.init(params)
  w = np.asarray(params["conv"]["kernel"], np.float64)
  b = np.asarray(params["conv"]["bias"], np.float64)
  vw, vb = np.zeros_like(w), np.zeros_like(b)
  for t in range(4):
    g = grads_at(t)
    u, state = tx.update(g, state, params)
    params = optax.apply_updates(params, u)
    vw = m * vw + np.asarray(g["conv"]["kernel"]) + wd * w   # torch.optim.SGD
    vb = m * vb + np.asarray(g["conv"]["bias"])              # biases: no decay
    w, b = w - float(sched(t)) * vw, b - float(sched(t)) * vb
  np.testing.assert_allclose(params["conv"]["kernel"], w, rtol=1e-5)
  np.testing.assert_allclose(params["conv"]["bias"], b, rtol=1e-5)


def test_modern_decoupled_and_adamw_decay_weights_only():
  params = {"l": {"kernel": jnp.array([2.0]), "bias": jnp.array([2.0])}}
  zero = {"l": {"kernel": jnp.array([0.0]), "bias": jnp.array([0.0])}}
  for tx in (optim.modern_optimizer("sgd", 0.1, schedule="constant", weight_decay=0.5,
                                    decoupled_weight_decay=True),
             optim.modern_optimizer("adamw", 0.1, schedule="constant", weight_decay=0.5)):
    u, _ = tx.update(zero, tx.init(params), params)
    np.testing.assert_allclose(u["l"]["kernel"], [-0.1 * 0.5 * 2.0], rtol=1e-6)
    assert float(u["l"]["bias"][0]) == 0.0
  with pytest.raises(ValueError):
    optim.modern_optimizer("lamb", 0.1, schedule="constant")


def test_modern_freeze_flag():
  p = run(optim.modern_optimizer("adamw", 0.1, schedule="constant", freeze_upsampling=True),
          tiny_params(), 2)
  np.testing.assert_array_equal(p["upscore_final"]["kernel"],
                                tiny_params()["upscore_final"]["kernel"])
  assert not np.allclose(p["conv"]["kernel"], tiny_params()["conv"]["kernel"])


@pytest.mark.parametrize("use_grad_mean", [True, False])
def test_accumulation_k2_equals_one_step_on_combined_gradient(use_grad_mean):
  base = lambda: optim.reference_optimizer(0.1, momentum=0.9, weight_decay=0.5)
  acc = optim.with_accumulation(base(), 2, use_grad_mean=use_grad_mean)
  params = tiny_params()
  state = acc.init(params)
  u, state = acc.update(grads_at(0), state, params)
  assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(u))
  u, state = acc.update(grads_at(1), state, params)
  got = optax.apply_updates(params, u)

  k = 0.5 if use_grad_mean else 1.0
  combined = jax.tree.map(lambda a, b: k * (a + b), grads_at(0), grads_at(1))
  tx = base()
  u1, _ = tx.update(combined, tx.init(params), params)
  want = optax.apply_updates(params, u1)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), got, want)
  assert optim.with_accumulation(tx, 1) is tx
