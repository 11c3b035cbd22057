"""The CPU ops of fcnjax.models.cpu_ops equal the plain lax ops, values and gradients; the
``ops`` constructor argument picks them.

Tolerance: max-pool forward and backward are exact (they select values, no arithmetic), so
they are compared with ``assert_array_equal``. The convolution's input gradient (a matrix
product + col2im instead of XLA's transposed convolution) and the bias-border conv1_1 sum the
same float32 terms in another order: compared at rtol 1e-5, atol 1e-5 × max |reference|.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax import nnx

from fcnjax import models
from fcnjax.models import cpu_ops, layers

DN = ("NHWC", "HWIO", "NHWC")


def _pool_both(x, rounding, cot):
  outs, cache = [], {}
  for f in (lambda x: cpu_ops.max_pool_2x2(x, rounding),
            lambda x: layers.max_pool_2x2(x, rounding)):
    y, vjp = jax.vjp(f, x)
    if y.shape not in cache:  # the same cotangent for both
      cache[y.shape] = cot(y.shape)
    outs.append((np.asarray(y), np.asarray(vjp(cache[y.shape])[0])))
  return outs


@pytest.mark.parametrize("rounding", ["ceil", "floor"])
@pytest.mark.parametrize("hw", [(6, 8), (7, 9), (5, 4), (1, 1), (2, 3)])
def test_max_pool_matches_reduce_window(rounding, hw):
  rng = np.random.default_rng(hash(hw) % 2**32)
  x = jnp.asarray(rng.normal(size=(2, *hw, 3)).astype(np.float32))
  cot = lambda s: jnp.asarray(rng.normal(size=s).astype(np.float32))
  (y1, g1), (y2, g2) = _pool_both(x, rounding, cot)
  np.testing.assert_array_equal(y1, y2)
  np.testing.assert_array_equal(g1, g2)


@pytest.mark.parametrize("rounding", ["ceil", "floor"])
def test_max_pool_ties_follow_reduce_window(rounding):
  """Small integer values: most windows hold ties. Ties go to the first maximum (row-major)."""
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.integers(0, 3, size=(2, 9, 7, 4)).astype(np.float32))
  x = x.at[0, :2, :2, 0].set(1.0)  # a window of four equal values
  (y1, g1), (y2, g2) = _pool_both(x, rounding, lambda s: jnp.ones(s, jnp.float32))
  np.testing.assert_array_equal(y1, y2)
  np.testing.assert_array_equal(g1, g2)
  assert g1[0, 0, 0, 0] == 1 and g1[0, 0, 1, 0] == g1[0, 1, 0, 0] == g1[0, 1, 1, 0] == 0
  # a valid subgradient: every window's gradient lands on exactly one of its maxima
  assert g1.sum() == y1.size


def test_max_pool_negative_infinity_and_bfloat16():
  x = jnp.full((1, 3, 3, 1), -jnp.inf, jnp.float32).at[0, 2, 2, 0].set(-5.0)
  (y1, g1), (y2, g2) = _pool_both(x, "ceil", lambda s: jnp.ones(s, jnp.float32))
  np.testing.assert_array_equal(y1, y2)
  np.testing.assert_array_equal(g1, g2)
  xb = jnp.asarray(np.random.default_rng(2).normal(size=(1, 5, 6, 2)), jnp.bfloat16)
  (y1, g1), (y2, g2) = _pool_both(xb, "ceil", lambda s: jnp.ones(s, jnp.bfloat16))
  np.testing.assert_array_equal(y1, y2)
  np.testing.assert_array_equal(g1, g2)


def test_ops_resolve_once_at_construction():
  """"auto" is the backend's choice; an invalid value names the allowed ones."""
  assert cpu_ops.resolve_ops("auto") == ("cpu" if jax.default_backend() == "cpu" else "lax")
  assert cpu_ops.resolve_ops("cpu") == "cpu" and cpu_ops.resolve_ops("lax") == "lax"
  for bad in ("gpu", "", None, True):
    with pytest.raises(ValueError, match="'auto', 'cpu', 'lax'"):
      cpu_ops.resolve_ops(bad)
  for ctor in (lambda: layers.ScoreHead(4, 3, ops="fast", rngs=nnx.Rngs(0)),
               lambda: layers.ConvBlock(3, (4,), ops="fast", rngs=nnx.Rngs(0)),
               lambda: models.vgg16(width_multiplier=1 / 64, ops="fast", rngs=nnx.Rngs(0)),
               lambda: models.fcn8s(3, width_multiplier=1 / 64, ops="fast", rngs=nnx.Rngs(0)),
               lambda: models.build_model("fcn32s", 3, width_multiplier=1 / 64, ops="fast")):
    with pytest.raises(ValueError, match="ops must be one of"):
      ctor()
  auto = models.fcn8s(3, width_multiplier=1 / 64, rngs=nnx.Rngs(0))
  assert auto.ops == auto.backbone.ops == cpu_ops.resolve_ops("auto")


@pytest.mark.parametrize("ops", ["cpu", "lax"])
def test_modules_store_the_chosen_ops(ops):
  model = models.fcn8s(3, width_multiplier=1 / 64, ops=ops, rngs=nnx.Rngs(0))
  conv = {"cpu": cpu_ops.conv_general_dilated, "lax": jax.lax.conv_general_dilated}[ops]
  pool = {"cpu": layers.max_pool_2x2_cpu, "lax": layers.max_pool_2x2}[ops]
  bb = model.backbone
  assert model.ops == bb.ops == ops
  assert all(block.ops == ops and block.max_pool is pool for block in bb.blocks)
  assert bb.fc6.conv_general_dilated is conv and bb.fc7.conv_general_dilated is conv
  heads = [model.score_fr, *model.score_skips]
  assert all(h.ops == ops and h.conv.conv_general_dilated is conv for h in heads)
  # what the forward traces: the custom VJPs only with ops="cpu"
  model.eval()
  jaxpr = str(jax.make_jaxpr(lambda x: model(x))(jnp.ones((1, 40, 40, 3))))
  assert ("custom_vjp" in jaxpr and "reduce_window" not in jaxpr) == (ops == "cpu")
  assert ("reduce_window" in jaxpr) == (ops == "lax")


def test_max_pool_for_each_ops():
  x = jnp.ones((1, 4, 4, 1))
  assert "reduce_window" in str(jax.make_jaxpr(layers.max_pool_2x2_for("lax"))(x))
  assert "custom_vjp" in str(jax.make_jaxpr(layers.max_pool_2x2_for("cpu"))(x))
  with pytest.raises(ValueError, match="rounding"):
    layers.max_pool_2x2_cpu(x, "round")


def _close(a, b):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.abs(b).max()))


@pytest.mark.parametrize("k,pads,hw", [
    (7, ((0, 0), (0, 0)), (12, 13)),      # fc6, exact variant
    (7, ((3, 3), (3, 3)), (5, 4)),        # fc6, aligned variant
    (1, ((0, 0), (0, 0)), (6, 7)),        # fc7 / score layers
    (3, ((1, 1), (1, 1)), (9, 8)),
    (5, ((4, 0), (1, 3)), (6, 9)),        # asymmetric
    (3, ((6, 6), (7, 5)), (4, 5)),        # padding larger than the kernel
])
def test_conv2d_matches_lax_values_and_grads(k, pads, hw):
  rng = np.random.default_rng(k * 100 + sum(hw))
  x = jnp.asarray(rng.normal(size=(2, *hw, 5)).astype(np.float32))
  w = jnp.asarray(rng.normal(size=(k, k, 5, 6)).astype(np.float32))
  ref = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), pads, dimension_numbers=DN)
  ours = lambda x, w: cpu_ops.conv2d(x, w, pads)
  y_ref, vjp_ref = jax.vjp(ref, x, w)
  y, vjp = jax.vjp(ours, x, w)
  _close(y, y_ref)
  g = jnp.asarray(rng.normal(size=y.shape).astype(np.float32))
  for a, b in zip(vjp(g), vjp_ref(g)):
    assert a.shape == b.shape
    _close(a, b)


def test_conv_general_dilated_routes_only_non_3x3_stride_1_convs():
  x = jnp.ones((1, 9, 9, 2))
  jaxpr = lambda k, conv=cpu_ops.conv_general_dilated, **kw: str(jax.make_jaxpr(
      lambda x, w: conv(x, w, (1, 1), "VALID", dimension_numbers=DN, **kw))(
          x, jnp.ones((k, k, 2, 3))))
  assert "custom_vjp" in jaxpr(7) and "custom_vjp" in jaxpr(1)
  assert "custom_vjp" not in jaxpr(3)                            # 3×3: XLA's own is faster
  assert "custom_vjp" not in jaxpr(7, rhs_dilation=(2, 2))       # anything unusual: plain lax
  strided = jax.make_jaxpr(lambda x, w: cpu_ops.conv_general_dilated(
      x, w, (2, 2), "VALID", dimension_numbers=DN))(x, jnp.ones((7, 7, 2, 3)))
  assert "custom_vjp" not in str(strided)
  # what was passed on is exactly lax's own convolution
  plain = str(jax.make_jaxpr(lambda x, w: jax.lax.conv_general_dilated(
      x, w, (1, 1), "VALID", dimension_numbers=DN, rhs_dilation=(2, 2)))(x, jnp.ones((7, 7, 2, 3))))
  assert jaxpr(7, rhs_dilation=(2, 2)) == plain
  assert layers.conv_general_dilated_for("cpu") is cpu_ops.conv_general_dilated
  assert layers.conv_general_dilated_for("lax") is jax.lax.conv_general_dilated
  assert "custom_vjp" not in jaxpr(7, conv=layers.conv_general_dilated_for("lax"))


def test_fc_layers_and_score_heads_give_lax_gradients_through_nnx_conv():
  """nnx.Conv with the "cpu" convolution (as fc6 / fc7 / score heads use it) == with "lax"."""
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(2, 10, 11, 4)).astype(np.float32))
  conv, plain = (nnx.Conv(4, 8, (7, 7), padding="VALID", rngs=nnx.Rngs(0),
                          conv_general_dilated=layers.conv_general_dilated_for(ops))
                 for ops in ("cpu", "lax"))
  loss = lambda m, x: jnp.sum(jnp.sin(m(x)))
  (g1, gx1), (g2, gx2) = (nnx.grad(loss, argnums=(0, 1))(m, x) for m in (conv, plain))
  _close(gx1, gx2)
  _close(g1.kernel[...], g2.kernel[...])
  _close(g1.bias[...], g2.bias[...])


@pytest.mark.slow
@pytest.mark.parametrize("name, kwargs", [("fcn8s", {}), ("fcn16s", {"aligned": True}),
                                          ("fcn32s", {"batch_norm": True})])
def test_cpu_and_lax_models_give_the_same_values_and_gradients(name, kwargs):
  """Whole models built with ops="cpu" and ops="lax" from the same seed: the same parameters,
  logits and parameter gradients (same tolerance as the single ops)."""
  x = jnp.asarray(np.random.default_rng(4).normal(0, 50, size=(2, 37, 45, 3)).astype(np.float32))
  results = []
  for ops in ("cpu", "lax"):
    model = models.build_model(name, 5, width_multiplier=1 / 16, ops=ops, seed=0, **kwargs)
    for head in [model.score_fr, *model.score_skips]:  # nonzero scores: gradients reach fc7
      head.conv.kernel[...] = 1e-2 * jax.random.normal(jax.random.key(5), head.conv.kernel.shape)
    model.eval()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    loss = lambda p: jnp.mean(jnp.sin(nnx.merge(graphdef, p, rest)(x)))
    value, grads = jax.value_and_grad(loss)(params)
    results.append((nnx.merge(graphdef, params, rest)(x), value, grads))
  (y1, v1, g1), (y2, v2, g2) = results
  _close(y1, y2)
  _close(v1, v2)
  leaves1, leaves2 = jax.tree.leaves(g1), jax.tree.leaves(g2)
  assert len(leaves1) == len(leaves2) > 0
  for a, b in zip(leaves1, leaves2):
    _close(a, b)


@pytest.mark.parametrize("first_padding", [0, 1, 2, 3, 100])
def test_conv_block_first_padding_equals_padding_inside_the_conv(first_padding):
  """conv1_1 with padding 100 computed on the image + a bias border == lax with padding 100."""
  rng = np.random.default_rng(first_padding)
  block = layers.ConvBlock(3, (4,), first_padding=first_padding, pool=None, rngs=nnx.Rngs(0))
  conv = block.convs[0]
  conv.bias[...] = jnp.asarray(rng.normal(size=4).astype(np.float32))
  x = jnp.asarray(rng.normal(size=(2, 7, 6, 3)).astype(np.float32))
  p = first_padding

  def ref(kernel, bias):
    y = jax.lax.conv_general_dilated(x, kernel, (1, 1), ((p, p), (p, p)), dimension_numbers=DN)
    return jax.nn.relu(y + bias)

  graphdef, state = nnx.split(block)

  def ours(kernel, bias):
    m = nnx.merge(graphdef, state, copy=True)
    m.convs[0].kernel[...], m.convs[0].bias[...] = kernel, bias
    return m(x)

  args = (conv.kernel[...], conv.bias[...])
  y_ref, vjp_ref = jax.vjp(ref, *args)
  y, vjp = jax.vjp(ours, *args)
  assert y.shape == (2, 7 + 2 * p - 2, 6 + 2 * p - 2, 4)
  _close(y, y_ref)
  g = jnp.asarray(rng.normal(size=y.shape).astype(np.float32))
  for a, b in zip(vjp(g), vjp_ref(g)):
    _close(a, b)


@pytest.mark.parametrize("factor,padding,shape", [
    (2, 0, (2, 5, 7, 3)), (8, 0, (1, 4, 6, 2)), (8, 4, (2, 3, 5, 2)), (2, 1, (1, 6, 6, 3)),
    (3, 0, (1, 3, 4, 1)), (32, 0, (1, 2, 3, 2))])
def test_fixed_bilinear_upsample_values_and_grads_equal_the_transposed_conv(factor, padding, shape):
  """The two separable 1-D passes (custom VJP) == the full transposed conv with the diagonal
  bilinear kernel (scatter semantics, autodiff gradient)."""
  rng = np.random.default_rng(factor * 10 + padding)
  x = jnp.asarray(rng.normal(size=shape).astype(np.float32))
  kernel = jnp.asarray(layers.bilinear_kernel(factor, shape[-1]))
  ref = lambda x: layers.transposed_conv(x, kernel, factor, padding)
  ours = layers.BilinearUpsample(shape[-1], factor, padding=padding)
  y_ref, vjp_ref = jax.vjp(ref, x)
  y, vjp = jax.vjp(ours, x)
  assert y.shape == y_ref.shape
  _close(y, y_ref)
  g = jnp.asarray(rng.normal(size=y.shape).astype(np.float32))
  _close(vjp(g)[0], vjp_ref(g)[0])
