"""segmentation_loss against a plain numpy implementation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_helpers import run_sharded_script

from fcnjax.train.loss import segmentation_loss


def numpy_loss(logits, labels, mask=None, reduction="mean", class_weights=None, ignore=255):
  logits = np.asarray(logits, np.float64)
  b, h, w, c = logits.shape
  total, weight_sum, count = 0.0, 0.0, 0
  for idx in np.ndindex(b, h, w):
    y = int(labels[idx])
    if y == ignore or y >= c or (mask is not None and not mask[idx]):
      continue
    z = logits[idx]
    lse = z.max() + np.log(np.exp(z - z.max()).sum())
    wt = 1.0 if class_weights is None else float(class_weights[y])
    total += wt * (lse - z[y])
    weight_sum += wt
    count += 1
  if reduction == "sum":
    return total, count
  return (total / weight_sum if weight_sum > 0 else 0.0), count


def random_batch(seed, b=2, h=5, w=7, c=6):
  rng = np.random.default_rng(seed)
  logits = rng.normal(0, 3, (b, h, w, c)).astype(np.float32)
  labels = rng.integers(0, c, (b, h, w)).astype(np.uint8)
  labels[rng.random((b, h, w)) < 0.2] = 255
  mask = np.ones((b, h, w), bool)
  mask[0, :, w - 2:] = False  # right padding of example 0
  mask[1, h - 1:] = False     # bottom padding of example 1
  return logits, labels, mask


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("use_mask", [False, True])
def test_matches_numpy(reduction, weighted, use_mask):
  logits, labels, mask = random_batch(0)
  cw = np.linspace(0.5, 2.0, 6).astype(np.float32) if weighted else None
  m = mask if use_mask else None
  loss, n = segmentation_loss(jnp.asarray(logits), jnp.asarray(labels),
                              None if m is None else jnp.asarray(m), reduction=reduction,
                              class_weights=None if cw is None else jnp.asarray(cw))
  ref, ref_n = numpy_loss(logits, labels, m, reduction, cw)
  assert loss.dtype == jnp.float32 and n.dtype == jnp.float32
  np.testing.assert_allclose(float(loss), ref, rtol=1e-5)
  assert float(n) == ref_n


def test_jit_and_grad():
  logits, labels, mask = random_batch(1)
  f = jax.jit(lambda z, y, m: segmentation_loss(z, y, m, reduction="sum")[0])
  np.testing.assert_allclose(float(f(logits, labels, mask)),
                             numpy_loss(logits, labels, mask, "sum")[0], rtol=1e-5)
  g = jax.grad(f)(jnp.asarray(logits), labels, mask)
  # d(sum CE)/dz = softmax - onehot at valid pixels, 0 elsewhere.
  valid = mask & (labels != 255)
  p = jax.nn.softmax(logits, -1)
  want = np.where(valid[..., None], p - np.eye(6)[np.minimum(labels, 5)], 0)
  np.testing.assert_allclose(np.asarray(g), want, atol=1e-6)


def test_no_valid_pixels_is_zero_not_nan():
  logits, labels, mask = random_batch(2)
  for kwargs in ({}, {"class_weights": jnp.ones(6)}):
    for reduction in ("mean", "sum"):
      fn = lambda z: segmentation_loss(z, jnp.asarray(labels), jnp.zeros_like(mask),
                                       reduction=reduction, **kwargs)
      loss, n = fn(jnp.asarray(logits))
      assert float(loss) == 0.0 and float(n) == 0.0
      g = jax.grad(lambda z: fn(z)[0])(jnp.asarray(logits))
      assert np.all(np.asarray(g) == 0)
  all_ignored = np.full_like(labels, 255)
  loss, n = segmentation_loss(jnp.asarray(logits), jnp.asarray(all_ignored))
  assert float(loss) == 0.0 and float(n) == 0.0


def test_nonfinite_logits_at_ignored_pixels_do_not_leak():
  logits, labels, mask = random_batch(3)
  logits = logits.copy()
  logits[~mask] = np.nan
  loss, _ = segmentation_loss(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask))
  assert np.isfinite(float(loss))


def test_bf16_logits_computed_in_float32():
  logits, labels, mask = random_batch(4)
  lb = jnp.asarray(logits, jnp.bfloat16)
  loss, n = segmentation_loss(lb, jnp.asarray(labels), jnp.asarray(mask))
  assert loss.dtype == jnp.float32
  ref, _ = numpy_loss(np.asarray(lb.astype(jnp.float32)), labels, mask)
  np.testing.assert_allclose(float(loss), ref, rtol=1e-5)
  # Summed over many pixels, float32 accumulation matters (bf16 has 8 mantissa bits).
  big = jnp.zeros((1, 64, 64, 3), jnp.bfloat16)
  s, _ = segmentation_loss(big, jnp.zeros((1, 64, 64), jnp.uint8), reduction="sum")
  np.testing.assert_allclose(float(s), 64 * 64 * np.log(3), rtol=1e-6)


def test_bad_arguments():
  logits, labels, _ = random_batch(5)
  with pytest.raises(ValueError):
    segmentation_loss(logits, labels, reduction="avg")
  with pytest.raises(ValueError):
    segmentation_loss(logits, labels[:, :-1])
  with pytest.raises(ValueError):
    segmentation_loss(logits, labels, class_weights=jnp.ones(5))


SHARDED_SCRIPT = r"""
from fcnjax.train.loss import segmentation_loss
cw = jnp.linspace(0.5, 2.0, 5)
f = jax.jit(lambda z, y, m: jax.value_and_grad(
    lambda z: segmentation_loss(z, y, m, class_weights=cw)[0])(z))
want_loss, want_grad = f(z, y, m)
for axis_type in (AxisType.Explicit, AxisType.Auto):
  mesh = jax.make_mesh((4,), ("data",), axis_types=(axis_type,))
  args = [jax.device_put(a, NamedSharding(mesh, P("data"))) for a in (z, y, m)]
  with jax.set_mesh(mesh):
    results = [f(*args)]
  results.append(f(*args))
  for loss, grad in results:
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    np.testing.assert_allclose(grad, want_grad, atol=1e-7)
print("OK")
"""


def test_sharded_batch_on_simulated_devices():
  run_sharded_script(SHARDED_SCRIPT)
