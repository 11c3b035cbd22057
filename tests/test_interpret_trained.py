"""Grad-CAM of trained models peaks inside the object: a tiny classifier and a tiny FCN-8s trained
here on the built-in classification images (one patterned object per image at a known box),
checked on held-out images.

Both models are trained at one size (48 x 64, a size of the built-in photos) so that the test
compiles one train step each; the classifier's Grad-CAM is then also taken at each held-out
image's own size (strips and photos). Measured when written (2-core Xeon, 2026-12-04): the
classifier's peak (layer block5) lies inside the box for 0.79 of 48 held-out images at 48 x 64
and 0.77 of 30 at their own sizes; the FCN-8s (region: the pixels it predicts as the class)
1.00 at fuse_pool3, 0.62 at pool3, 0.52 at pool4 and 0.02 at fc7, whose grid is 2 x 2 at this
size (a bilinear map over 2 x 2 cells peaks at a corner). A map that ignored the object would
peak inside the box about as often as the box's share of the image: 0.17 on average here. The
thresholds leave room for another machine's rounding, not for a misplaced heatmap."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from fcnjax import interpret
from fcnjax import preprocessing as preprocessing_lib
from fcnjax.data import synthetic_classes as sc
from fcnjax.models import build_model
from fcnjax.models import classifier as clf
from fcnjax.train import step as step_lib

H, W = 48, 64
NUM_CLASSES = len(sc.CLASS_NAMES)


def _examples(n, seed, size=(H, W)):
  rng = np.random.default_rng(seed)
  images, boxes, labels = [], [], []
  for i in range(n):
    cls = i % NUM_CLASSES
    h, w = size if size is not None else sc.draw_size(rng, strip=bool(i % 2))
    img, box = sc.render_example(rng, cls, h, w)
    images.append(img)
    boxes.append(box)
    labels.append(cls)
  return images, boxes, np.asarray(labels)


def _batch(images, labels, boxes=None):
  """A training batch: class id in every pixel (classifier), or in the box only (segmenter)."""
  n = len(images)
  label = np.zeros((n, H, W), np.uint8)
  for i, y in enumerate(labels):
    if boxes is None:
      label[i] = y
    else:
      x0, y0, x1, y1 = boxes[i]
      label[i, y0:y1, x0:x1] = y + 1  # 0 = background
  return {"image": jnp.asarray(preprocessing_lib.TORCHVISION(np.stack(images))),
          "label": jnp.asarray(label), "mask": jnp.ones((n, H, W), bool),
          "index": jnp.arange(n, dtype=jnp.int32)}


def _inside(heatmap, box) -> bool:
  y, x = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
  x0, y0, x1, y1 = box
  return heatmap.max() > 0 and x0 <= x < x1 and y0 <= y < y1


@pytest.fixture(scope="module")
def train_images():
  return _examples(400, seed=0)


@pytest.fixture(scope="module")
def trained_classifier(train_images):
  images, _, labels = train_images
  model = clf.fcn_classifier(NUM_CLASSES, widths=(8, 16, 16, 32, 32), head_width=32,
                             dropout=0.0, seed=0)
  tx = optax.adam(3e-3)
  graphdef, state = step_lib.init_state(model, tx)
  train = step_lib.make_classifier_train_step(graphdef, tx)
  rng = np.random.default_rng(1)
  for _ in range(150):
    idx = rng.choice(len(images), 32, replace=False)
    state, _ = train(state, _batch([images[i] for i in idx], labels[idx]))
  model = nnx.merge(graphdef, state.params, state.rest)
  model.eval()
  return model


@pytest.mark.slow
def test_classifier_gradcam_peaks_inside_the_object(trained_classifier):
  model = trained_classifier
  images, boxes, labels = _examples(48, seed=10)
  x = preprocessing_lib.TORCHVISION(np.stack(images))
  logits = interpret.layers.logits(model, x)
  assert (logits.argmax(1) == labels).mean() >= 0.8  # it learnt the classes
  heat = np.stack([interpret.gradcam(model, x[i:i + 1], int(labels[i]))[0]
                   for i in range(len(images))])
  inside = np.mean([_inside(h, b) for h, b in zip(heat, boxes)])
  assert inside >= 0.65, inside
  # at each image's own size (strips and photos of the built-in data), one image at a time
  own, own_boxes, own_labels = _examples(30, seed=11, size=None)
  hits = [_inside(interpret.gradcam(model, preprocessing_lib.TORCHVISION(img[None]),
                                    int(y))[0], b)
          for img, b, y in zip(own, own_boxes, own_labels)]
  assert np.mean(hits) >= 0.65, np.mean(hits)


@pytest.fixture(scope="module")
def trained_fcn8s(train_images):
  images, boxes, labels = train_images
  model = build_model("fcn8s", NUM_CLASSES + 1, width_multiplier=1 / 8, aligned=True, seed=0)
  model.preprocessing = preprocessing_lib.TORCHVISION
  tx = optax.adam(1e-3)
  graphdef, state = step_lib.init_state(model, tx)
  train = step_lib.make_train_step(graphdef, tx)
  rng = np.random.default_rng(2)
  for _ in range(800):
    idx = rng.choice(len(images), 16, replace=False)
    state, _ = train(state, _batch([images[i] for i in idx], labels[idx],
                                   [boxes[i] for i in idx]))
  model = nnx.merge(graphdef, state.params, state.rest)
  model.eval()
  return model


@pytest.mark.slow
def test_segmenter_gradcam_peaks_inside_the_object(trained_fcn8s):
  model = trained_fcn8s
  images, boxes, labels = _examples(48, seed=10)
  x = preprocessing_lib.TORCHVISION(np.stack(images))
  pred = interpret.layers.logits(model, x).argmax(-1)
  found = [np.any(pred[i] == y + 1) for i, y in enumerate(labels)]
  assert np.mean(found) >= 0.9  # it learnt to segment the objects
  # region: the pixels predicted as the class (the default)
  fraction = {}
  for layer in ("fuse_pool3", "pool3"):
    fraction[layer] = np.mean([
        _inside(interpret.gradcam(model, x[i:i + 1], int(y) + 1, layer)[0], b)
        for i, (b, y) in enumerate(zip(boxes, labels))])
  chance = np.mean([(b[2] - b[0]) * (b[3] - b[1]) / (H * W) for b in boxes])
  assert fraction["fuse_pool3"] >= 0.9, fraction
  assert fraction["pool3"] >= 2 * chance, (fraction, chance)
