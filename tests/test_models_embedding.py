"""An FCN head embedded in other models trains under jax.jit with finite gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax import nnx
from flax.nnx import bridge

from fcnjax import models


class Segmenter(nnx.Module):
  """A user's NNX model: a learned colour transform feeding an FCN-8s."""

  def __init__(self, rngs):
    self.stem = nnx.Conv(3, 3, (1, 1), rngs=rngs)
    self.fcn = models.fcn8s(4, width_multiplier=1 / 32, zero_init_scores=False, rngs=rngs)

  def __call__(self, x):
    return self.fcn(self.stem(x))


def test_fcn_as_nnx_submodule_trains_one_step():
  model = Segmenter(nnx.Rngs(0))
  opt = nnx.Optimizer(model, optax.sgd(1e-3), wrt=nnx.Param)
  x = jax.random.normal(jax.random.key(0), (2, 37, 45, 3))
  y = jax.random.randint(jax.random.key(1), (2, 37, 45), 0, 4)

  @nnx.jit
  def step(model, opt, x, y):
    def loss_fn(model):
      logits = model(x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    opt.update(model, grads)
    return loss, grads

  before = np.asarray(model.fcn.score_fr.conv.kernel[...]).copy()
  loss, grads = step(model, opt, x, y)
  leaves = jax.tree.leaves(grads)
  assert np.isfinite(float(loss)) and all(np.all(np.isfinite(g)) for g in leaves)
  assert any(np.any(g != 0) for g in leaves)
  assert not np.allclose(before, model.fcn.score_fr.conv.kernel[...])


class LinenSegmenter(nn.Module):
  """A user's Linen model with an fcnjax FCN-8s inside, via flax.nnx.bridge."""

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(3, (1, 1))(x)
    fcn = bridge.to_linen(models.fcn8s, 4, width_multiplier=1 / 32, zero_init_scores=False)
    return fcn(x)


def test_fcn_inside_linen_via_bridge_trains_one_step():
  model = LinenSegmenter()
  x = jax.random.normal(jax.random.key(0), (2, 33, 41, 3))
  y = jax.random.randint(jax.random.key(1), (2, 33, 41), 0, 4)
  variables = model.init({"params": jax.random.key(2), "dropout": jax.random.key(3)}, x)
  params = variables["params"]
  tx = optax.sgd(1e-3)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state):
    def loss_fn(p):
      logits = model.apply({**variables, "params": p}, x,
                           rngs={"dropout": jax.random.key(4)})
      assert logits.shape == (2, 33, 41, 4)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, grads

  new_params, _, loss, grads = step(params, opt_state)
  assert np.isfinite(float(loss))
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), params, new_params)
  assert any(jax.tree.leaves(changed))
