"""segmentation_loss, dice_loss and the train step's loss against plain numpy implementations.

Tolerances: float32 losses vs the float64 references ``rtol=1e-5``; gradients ``rtol=1e-4,
atol=1e-7`` (per-pixel gradients of a batch-level Dice are ~1e-3, float32 error ~1e-8).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from train_helpers import run_sharded_check

from fcnjax.train import step as step_lib
from fcnjax.train.loss import dice_loss, segmentation_loss

LOSS_TOL = dict(rtol=1e-5)
GRAD_TOL = dict(rtol=1e-4, atol=1e-7)


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


def softmax64(logits):
  z = np.asarray(logits, np.float64)
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def dice_terms(logits, labels, mask=None, smooth=1.0, classes="all", ignore=255):
  """float64 (probs, one-hot, valid, per-class intersection / denominator, scored classes)."""
  c = logits.shape[-1]
  labels = np.asarray(labels).astype(np.int64)
  valid = (labels != ignore) & (labels >= 0) & (labels < c)
  if mask is not None:
    valid &= np.asarray(mask, bool)
  p = np.where(valid[..., None], softmax64(np.where(valid[..., None], logits, 0.0)), 0.0)
  g = np.zeros(p.shape)
  g[valid, labels[valid]] = 1.0
  inter = (p * g).reshape(-1, c).sum(0)
  denom = p.reshape(-1, c).sum(0) + g.reshape(-1, c).sum(0) + smooth
  scored = np.arange(c) >= (1 if classes == "foreground" else 0)
  return p, g, valid, inter, denom, scored


def numpy_dice(logits, labels, mask=None, smooth=1.0, classes="all", ignore=255):
  """1 - mean over scored classes c of (2 sum p_c g_c + s) / (sum p_c + sum g_c + s), sums over
  the valid pixels of the whole batch; a class with a zero denominator has Dice 1."""
  _, _, _, inter, denom, scored = dice_terms(logits, labels, mask, smooth, classes, ignore)
  with np.errstate(invalid="ignore", divide="ignore"):
    dice = np.where(denom > 0, (2 * inter + smooth) / denom, 1.0)
  return 1.0 - dice[scored].mean()


def numpy_dice_grad(logits, labels, mask=None, smooth=1.0, classes="all", ignore=255):
  """d numpy_dice / d logits, by hand: dL/dp_ic = -(2 g_ic D_c - (2 I_c + s)) / (|K| D_c^2) for
  scored c, then through the softmax: dz_ij = p_ij (dp_ij - sum_c p_ic dp_ic); 0 at invalid."""
  p, g, valid, inter, denom, scored = dice_terms(logits, labels, mask, smooth, classes, ignore)
  k = scored.sum()
  dp = -(2 * g * denom - (2 * inter + smooth)) / (k * denom ** 2) * scored
  dz = p * (dp - (p * dp).sum(-1, keepdims=True))
  return np.where(valid[..., None], dz, 0.0)


@pytest.mark.parametrize("classes", ["all", "foreground"])
@pytest.mark.parametrize("use_mask", [False, True])
@pytest.mark.parametrize("smooth", [1.0, 0.0])
def test_dice_matches_numpy(classes, use_mask, smooth):
  logits, labels, mask = random_batch(10)
  labels[0, 0, :2] = 9  # out of range (C = 6): skipped like 255
  m = mask if use_mask else None
  f = jax.jit(jax.value_and_grad(
      lambda z: dice_loss(z, labels, m, smooth=smooth, classes=classes)))
  loss, grad = f(jnp.asarray(logits))
  assert loss.dtype == jnp.float32
  np.testing.assert_allclose(float(loss), numpy_dice(logits, labels, m, smooth, classes),
                             **LOSS_TOL)
  assert np.all(np.isfinite(grad))
  np.testing.assert_allclose(np.asarray(grad), numpy_dice_grad(logits, labels, m, smooth,
                                                               classes), **GRAD_TOL)


def test_dice_invalid_pixels_contribute_nothing():
  logits, labels, mask = random_batch(11)
  labels[1, 2, :3] = 7  # out of range
  valid = mask & (labels < 6)
  base = float(dice_loss(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask)))
  poisoned = logits.copy()
  poisoned[~valid] = np.nan
  poisoned[~valid, 0] = np.inf
  f = jax.value_and_grad(lambda z: dice_loss(z, jnp.asarray(labels), jnp.asarray(mask)))
  loss, grad = f(jnp.asarray(poisoned))
  np.testing.assert_allclose(float(loss), base, rtol=1e-6)
  assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad)[~valid] == 0)
  # Out-of-range, 255 and mask False are the same thing.
  as_ignored = np.where(valid, labels, 255).astype(np.uint8)
  np.testing.assert_allclose(float(dice_loss(jnp.asarray(logits), jnp.asarray(as_ignored))),
                             base, rtol=1e-6)


@pytest.mark.parametrize("smooth", [1.0, 0.0])
def test_dice_no_valid_pixel_is_zero_not_nan(smooth):
  logits, labels, mask = random_batch(12)
  for y, m in ((labels, np.zeros_like(mask)), (np.full_like(labels, 255), None)):
    for classes in ("all", "foreground"):
      f = jax.value_and_grad(lambda z: dice_loss(z, jnp.asarray(y), m, smooth=smooth,
                                                 classes=classes))
      loss, grad = f(jnp.asarray(logits))
      assert float(loss) == 0.0
      assert np.all(np.asarray(grad) == 0)


def test_dice_on_small_foreground():
  """The reason for the option: on a binary mask with 2% foreground, a model that predicts
  background everywhere has a small CE and a small all-class Dice, but a foreground Dice ~ 1."""
  labels = np.zeros((2, 10, 10), np.uint8)
  labels[0, 4:6, 4:6] = 1  # 4 of 200 pixels
  logits = np.zeros((2, 10, 10, 2), np.float32)
  logits[..., 0] = 4.0  # p(background) = 0.982 everywhere
  z, y = jnp.asarray(logits), jnp.asarray(labels)
  ce = float(segmentation_loss(z, y)[0])
  fg = float(dice_loss(z, y, classes="foreground"))
  assert ce < 0.1 and float(dice_loss(z, y)) < 0.5 and fg > 0.85
  np.testing.assert_allclose(fg, numpy_dice(logits, labels, classes="foreground"), **LOSS_TOL)
  perfect = np.where(np.eye(2, dtype=bool)[labels], 20.0, -20.0).astype(np.float32)
  assert float(dice_loss(jnp.asarray(perfect), y, classes="foreground")) < 1e-6
  assert float(dice_loss(jnp.asarray(perfect), y)) < 1e-6


def test_dice_bf16_logits_computed_in_float32():
  logits, labels, mask = random_batch(13)
  lb = jnp.asarray(logits, jnp.bfloat16)
  loss = dice_loss(lb, jnp.asarray(labels), jnp.asarray(mask))
  assert loss.dtype == jnp.float32
  np.testing.assert_allclose(float(loss), numpy_dice(np.asarray(lb.astype(jnp.float32)), labels,
                                                     mask), **LOSS_TOL)


def test_dice_bad_arguments():
  logits, labels, _ = random_batch(14)
  with pytest.raises(ValueError):
    dice_loss(logits, labels, classes="fg")
  with pytest.raises(ValueError):
    dice_loss(logits, labels, smooth=-1.0)
  with pytest.raises(ValueError):
    dice_loss(logits, labels[:, :-1])
  with pytest.raises(ValueError):
    dice_loss(logits[..., :1], labels, classes="foreground")


def tiny_setup(seed=20, c=4):
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(2, 6, 7, 3)).astype(np.float32)
  labels = rng.integers(0, c, (2, 6, 7)).astype(np.uint8)
  labels[rng.random(labels.shape) < 0.2] = 255
  mask = np.ones((2, 6, 7), bool)
  mask[1, :, 5:] = False
  batch = {"image": jnp.asarray(images), "label": jnp.asarray(labels), "mask": jnp.asarray(mask)}
  model = nnx.Conv(3, c, (3, 3), rngs=nnx.Rngs(seed))
  logits = np.asarray(model(batch["image"]))
  return model, batch, logits


@pytest.mark.parametrize("dice_weight,dice_classes", [(0.0, "all"), (0.5, "all"),
                                                      (2.0, "foreground")])
def test_train_step_loss_terms(dice_weight, dice_classes):
  model, batch, logits = tiny_setup()
  cw = np.array([0.5, 1.0, 1.5, 3.0], np.float32)
  tx = optax.sgd(0.1)
  graphdef, state = step_lib.init_state(model, tx)
  params0 = jax.tree.map(np.array, state.params)

  def objective(params):
    out = nnx.merge(graphdef, params, state.rest, copy=True)(batch["image"])
    loss = segmentation_loss(out, batch["label"], batch["mask"], class_weights=cw)[0]
    if dice_weight:
      loss += dice_weight * dice_loss(out, batch["label"], batch["mask"], classes=dice_classes)
    return loss

  want_grad = jax.tree.map(np.asarray, jax.grad(objective)(state.params))
  train_step = step_lib.make_train_step(graphdef, tx, class_weights=jnp.asarray(cw),
                                        dice_weight=dice_weight, dice_classes=dice_classes)
  state, metrics = train_step(state, batch)

  labels, mask = np.asarray(batch["label"]), np.asarray(batch["mask"])
  ce, n = numpy_loss(logits, labels, mask, "mean", cw)
  assert float(metrics["valid_pixels"]) == n
  if dice_weight:
    assert set(metrics) == {"loss", "valid_pixels", "grad_norm", "ce", "dice"}
    dice = numpy_dice(logits, labels, mask, classes=dice_classes)
    np.testing.assert_allclose(float(metrics["ce"]), ce, **LOSS_TOL)
    np.testing.assert_allclose(float(metrics["dice"]), dice, **LOSS_TOL)
    np.testing.assert_allclose(float(metrics["loss"]), ce + dice_weight * dice, **LOSS_TOL)
  else:
    assert set(metrics) == {"loss", "valid_pixels", "grad_norm"}
    np.testing.assert_allclose(float(metrics["loss"]), ce, **LOSS_TOL)
  leaves = jax.tree.leaves(want_grad)
  np.testing.assert_allclose(float(metrics["grad_norm"]),
                             np.sqrt(sum((g.astype(np.float64) ** 2).sum() for g in leaves)),
                             **LOSS_TOL)
  assert all(np.all(np.isfinite(g)) for g in leaves)
  # SGD: params - 0.1 * grad of the combined objective.
  jax.tree.map(lambda p, p0, g: np.testing.assert_allclose(p, p0 - 0.1 * g, rtol=1e-5,
                                                           atol=1e-7),
               jax.tree.map(np.asarray, state.params), params0, want_grad)


def test_train_step_bad_dice_arguments():
  model, _, _ = tiny_setup()
  graphdef, _ = step_lib.init_state(model, optax.sgd(0.1))
  with pytest.raises(ValueError):
    step_lib.make_train_step(graphdef, optax.sgd(0.1), dice_weight=-1.0)
  with pytest.raises(ValueError):
    step_lib.make_train_step(graphdef, optax.sgd(0.1), dice_weight=1.0, dice_classes="fg")


def test_sharded_batch_on_simulated_devices():
  """tests/sharded/check_loss.py: CE (mean, sum, weighted), Dice (all, foreground), CE + Dice
  and their gradients, and two CE + Dice train steps, on a batch sharded over 4 devices
  (Explicit and Auto meshes) against one device."""
  run_sharded_check("check_loss")
