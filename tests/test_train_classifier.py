"""The classifier's loss, train and eval steps against numpy."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fcnjax.models import classifier as clf
from fcnjax.train import metrics as metrics_lib
from fcnjax.train import step as step_lib
from fcnjax.train.loss import classification_loss


def _np_loss(logits, labels, valid, weights=None, eps=0.0):
  c = logits.shape[1]
  z = logits - logits.max(1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(1, keepdims=True))
  t = np.eye(c)[labels] * (1 - eps) + eps / c
  ce = -(t * logp).sum(1)
  w = valid.astype(np.float64) * (np.ones(c) if weights is None else np.asarray(weights))[labels]
  return (w * ce).sum() / w.sum()


@pytest.mark.parametrize("weights,eps", [(None, 0.0), ((1.0, 2.0, 0.5), 0.0), (None, 0.1),
                                         ((1.0, 3.0, 1.0), 0.2)])
def test_classification_loss_matches_numpy(weights, eps):
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(7, 3)).astype(np.float32) * 3
  labels = rng.integers(0, 3, 7)
  valid = np.array([1, 1, 0, 1, 1, 0, 1], bool)
  got, n = classification_loss(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(valid),
                               class_weights=weights, label_smoothing=eps)
  np.testing.assert_allclose(float(got), _np_loss(logits, labels, valid, weights, eps), rtol=1e-5)
  assert float(n) == valid.sum()


def _batch(rng, sizes, labels, H, W):
  b = len(sizes)
  image = np.zeros((b, H, W, 3), np.float32)
  label = np.full((b, H, W), 255, np.uint8)
  mask = np.zeros((b, H, W), bool)
  for i, ((h, w), y) in enumerate(zip(sizes, labels)):
    if y < 0:
      continue  # a dummy row
    image[i, :h, :w] = rng.normal(size=(h, w, 3))
    label[i, :h, :w] = y
    mask[i, :h, :w] = True
  return {"image": jnp.asarray(image), "label": jnp.asarray(label), "mask": jnp.asarray(mask),
          "index": jnp.arange(b, dtype=jnp.int32)}


def test_train_step_learns_and_eval_step_counts_images():
  rng = np.random.default_rng(1)
  model = clf.fcn_classifier(3, widths=(4, 8, 8, 8, 8), dropout=0.0, seed=0)
  tx = optax.adam(1e-2)
  graphdef, state = step_lib.init_state(model, tx)
  train = step_lib.make_classifier_train_step(graphdef, tx, label_smoothing=0.05)
  batch = _batch(rng, [(30, 60), (25, 25), (40, 33), (30, 30)], [0, 1, 2, -1], 40, 60)
  losses = []
  for _ in range(30):
    state, m = train(state, batch)
    losses.append(float(m["loss"]))
  assert float(m["valid_images"]) == 3
  assert losses[-1] < 0.5 * losses[0]
  assert float(m["correct"]) == 3
  evaluate = step_lib.make_classifier_eval_step(graphdef)
  hist = evaluate(state.params, state.rest, jnp.zeros((3, 3), jnp.int32), batch)
  hist = np.asarray(hist)
  assert hist.sum() == 3  # the dummy row is not counted
  probs = step_lib.make_classifier_predict(graphdef)(state.params, state.rest, batch["image"],
                                                      batch["mask"])
  preds = np.asarray(probs).argmax(1)[:3]
  want = np.zeros((3, 3), int)
  for y, p in zip([0, 1, 2], preds):
    want[y, p] += 1
  np.testing.assert_array_equal(hist, want)
  np.testing.assert_allclose(np.asarray(probs).sum(1), 1, rtol=1e-5)


def test_classification_metrics():
  hist = np.array([[5, 1, 0], [0, 3, 1], [0, 0, 0]])
  m = metrics_lib.classification_metrics(hist, ["a", "b", "c"])
  assert m["top1"] == pytest.approx(8 / 10)
  assert m["mean_acc"] == pytest.approx((5 / 6 + 3 / 4) / 2)
  assert m["per_class_acc"] == {"a": pytest.approx(5 / 6), "b": pytest.approx(0.75), "c": None}
  assert m["images"] == 10 and m["confusion"] == hist.tolist()
