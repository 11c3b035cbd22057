"""Confusion matrix and the four FCN metrics against the reference's numpy code."""

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_helpers import run_sharded_check

from fcnjax.train.metrics import (confusion_matrix, format_metrics, segmentation_metrics,
                                  update_confusion)


def fast_hist(a, b, n):
  """The FCN reference's ``score.fast_hist`` (a = truth, b = prediction)."""
  k = (a >= 0) & (a < n)
  return np.bincount(n * a[k].astype(int) + b[k], minlength=n ** 2).reshape(n, n)


def reference_scores(hist):
  """pytorch-fcn ``label_accuracy_score`` on a given hist."""
  with np.errstate(divide="ignore", invalid="ignore"):
    acc = np.diag(hist).sum() / hist.sum()
    acc_cls = np.nanmean(np.diag(hist) / hist.sum(axis=1))
    iu = np.diag(hist) / (hist.sum(axis=1) + hist.sum(axis=0) - np.diag(hist))
    mean_iu = np.nanmean(iu)
    freq = hist.sum(axis=1) / hist.sum()
    fwavacc = (freq[freq > 0] * iu[freq > 0]).sum()
  return acc, acc_cls, mean_iu, fwavacc, iu


def random_case(seed, b=3, h=17, w=23, c=7):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, c - 2, (b, h, w)).astype(np.uint8)  # classes c-2, c-1 never true
  labels[rng.random(labels.shape) < 0.15] = 255
  labels[0, 0, :3] = c + 1                                       # out-of-range label: skipped
  preds = rng.integers(0, c - 1, (b, h, w)).astype(np.int32)     # class c-1 never predicted
  mask = np.ones((b, h, w), bool)
  mask[0, :, -5:] = False
  mask[2] = False                                                # a dummy example
  return preds, labels, mask, c


def test_confusion_matches_fast_hist():
  preds, labels, mask, c = random_case(0)
  got = jax.jit(confusion_matrix, static_argnums=3)(preds, labels, mask, c)
  assert got.dtype == jnp.int32 and got.shape == (c, c)
  lab = np.where(mask, labels, 255).astype(int)
  np.testing.assert_array_equal(got, fast_hist(lab.ravel(), preds.ravel(), c))
  assert int(got.sum()) == int((mask & (labels < c)).sum())
  nomask = confusion_matrix(jnp.asarray(preds), jnp.asarray(labels), None, c)
  np.testing.assert_array_equal(nomask, fast_hist(labels.ravel().astype(int), preds.ravel(), c))


def test_update_confusion_accumulates_argmax():
  preds, labels, mask, c = random_case(1)
  rng = np.random.default_rng(1)
  logits = rng.normal(size=preds.shape + (c,)).astype(np.float32)
  step = jax.jit(update_confusion)
  hist = jnp.zeros((c, c), jnp.int32)
  hist = step(hist, jnp.asarray(logits, jnp.bfloat16), labels, mask)
  hist = step(hist, jnp.asarray(logits, jnp.bfloat16), labels, mask)
  am = np.asarray(jnp.argmax(jnp.asarray(logits, jnp.bfloat16), -1))
  lab = np.where(mask, labels, 255).astype(int)
  np.testing.assert_array_equal(hist, 2 * fast_hist(lab.ravel(), am.ravel(), c))
  with pytest.raises(ValueError):
    update_confusion(jnp.zeros((c + 1, c + 1), jnp.int32), logits, labels, mask)


def test_metrics_match_reference_on_random_data():
  preds, labels, mask, c = random_case(2)
  hist = np.asarray(confusion_matrix(jnp.asarray(preds), jnp.asarray(labels),
                                     jnp.asarray(mask), c))
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # no RuntimeWarning from 0/0 classes
    m = segmentation_metrics(hist)
  acc, acc_cls, mean_iu, fw, iu = reference_scores(hist.astype(np.float64))
  assert m["pixel_acc"] == pytest.approx(acc, rel=1e-12)
  assert m["mean_acc"] == pytest.approx(acc_cls, rel=1e-12)
  assert m["mean_iu"] == pytest.approx(mean_iu, rel=1e-12)
  assert m["fwiu"] == pytest.approx(fw, rel=1e-12)
  # class c-2: predicted, never true -> IoU 0 (counted); c-1: neither -> None (skipped).
  assert m["per_class_iou"][str(c - 2)] == 0.0
  assert m["per_class_iou"][str(c - 1)] is None
  assert m["per_class_acc"][str(c - 2)] is None
  for i in range(c - 2):
    assert m["per_class_iou"][str(i)] == pytest.approx(iu[i], rel=1e-12)
  assert m["num_pixels"] == hist.sum()


def test_hand_computed_tiny_case():
  # truth:  0 0 1 1 2 | prediction: 0 1 1 1 0  (class 3 nowhere)
  hist = np.zeros((4, 4), np.int64)
  for t, p in zip([0, 0, 1, 1, 2], [0, 1, 1, 1, 0]):
    hist[t, p] += 1
  np.testing.assert_array_equal(
      confusion_matrix(jnp.array([[[0, 1, 1, 1, 0, 3]]]), jnp.array([[[0, 0, 1, 1, 2, 255]]]),
                       None, 4), hist)
  m = segmentation_metrics(hist, class_names=["bg", "cat", "dog", "cow"])
  assert m["pixel_acc"] == pytest.approx(3 / 5)
  assert m["mean_acc"] == pytest.approx((1 / 2 + 1 + 0) / 3)
  iu = [1 / 3, 2 / 3, 0.0]  # bg: 1/(2+2-1); cat: 2/(2+3-2); dog: 0/(1+0-0)
  assert m["mean_iu"] == pytest.approx(sum(iu) / 3)
  assert m["fwiu"] == pytest.approx(2 / 5 * iu[0] + 2 / 5 * iu[1] + 1 / 5 * iu[2])
  assert m["per_class_iou"] == pytest.approx({"bg": 1 / 3, "cat": 2 / 3, "dog": 0.0, "cow": None})
  assert format_metrics(m) == "mIU 0.333 | pixel acc 0.600 | mean acc 0.500 | fwIU 0.400"


def test_empty_hist_gives_nan_without_warnings():
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    m = segmentation_metrics(jnp.zeros((3, 3), jnp.int32))
  for k in ("pixel_acc", "mean_acc", "mean_iu", "fwiu"):
    assert math.isnan(m[k])
  assert m["per_class_iou"] == {"0": None, "1": None, "2": None}
  assert m["num_pixels"] == 0
  assert format_metrics(m) == "mIU nan | pixel acc nan | mean acc nan | fwIU nan"
  with pytest.raises(ValueError):
    segmentation_metrics(np.zeros((3, 3)), class_names=["a"])


def test_sharded_batch_on_simulated_devices():
  """tests/sharded/check_metrics.py: the confusion matrix of a batch sharded over 4 devices
  (Explicit and Auto meshes) equals the one-device one and a numpy count, exactly."""
  run_sharded_check("check_metrics")
