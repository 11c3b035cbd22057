"""Alignment, proved numerically: d logit(i, j) / d input is centred on (i, j).

Shape tests cannot see a wrong crop offset (any offset that fits gives the right H×W). Here a
small-width FCN-8s gets random weights that keep only each 3×3 / 7×7 kernel's centre tap (so the
network is "1×1 convs + ceil max-pools + the real bilinear upsampling and crops"), and the
gradient of one output pixel with respect to a batch of random inputs is measured. Max-pooling
picks a random pixel of each window, so the gradient mass of a stride-s path spreads over the
s × s cells around (i, j) and its expected centroid is (i, j) exactly when every crop offset on the
path is right. Each score head (fc7 / pool4 / pool3 path, i.e. offsets 31; 5+31; 9+31) is tested
alone. Near the image border the cells are cut by the edge, which pulls the centroid inward by a
fraction of the stride, so border pixels are tested on the stride-8 (pool3) path with 2 px.
A model whose final offset is moved by 3 px fails the same check (the test proves it can fail).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fcnjax import models

H = W = 128
CENTRE = [(64, 64), (61, 67)]
BORDER = [(2, 2), (2, 64), (125, 125), (64, 125)]


def centre_tap_fcn8s(active_head: str, final_offset_shift: int = 0):
  model = models.fcn8s(1, width_multiplier=1 / 16, rngs=nnx.Rngs(0))
  key = jax.random.key(0)
  for _, module in nnx.iter_graph(model):
    if isinstance(module, nnx.Conv):
      k = module.kernel[...]
      key, sub = jax.random.split(key)
      c = k.shape[0] // 2
      taps = jax.random.uniform(sub, k.shape[2:], minval=0.5, maxval=1.0) / k.shape[2]
      module.kernel[...] = jnp.zeros_like(k).at[c, c].set(taps)
  heads = {"fc7": model.score_fr, "pool4": model.score_skips[0], "pool3": model.score_skips[1]}
  for name, head in heads.items():
    head.conv.kernel[...] = jnp.full_like(head.conv.kernel[...], float(name == active_head))
  model.eval()
  model.final_offset += final_offset_shift
  return model


def gradient_centroids(model, pixels):
  """Centroid (row, col) of |d sum_n logits[n, i, j] / d x| for each pixel (i, j)."""
  x = jax.random.uniform(jax.random.key(1), (32, H, W, 3))

  def out_at(x, i, j):
    return model(x)[:, i, j, :].sum()

  grad = jax.jit(jax.grad(out_at))  # one compile: (i, j) are traced indices
  rows, cols = np.mgrid[:H, :W]
  out = []
  for i, j in pixels:
    mass = np.abs(np.asarray(grad(x, i, j))).sum(axis=(0, 3))
    out.append(((mass * rows).sum() / mass.sum(), (mass * cols).sum() / mass.sum()))
  return np.array(out)


@pytest.mark.parametrize("head", ["fc7", "pool4", "pool3"])
def test_gradient_is_centred_on_the_output_pixel(head):
  model = centre_tap_fcn8s(head)
  pixels = CENTRE + (BORDER if head == "pool3" else [])
  tolerance = np.array([1.0] * len(CENTRE) + [2.0] * (len(pixels) - len(CENTRE)))
  err = np.abs(gradient_centroids(model, pixels) - np.array(pixels)).max(axis=1)
  assert np.all(err <= tolerance), dict(zip(pixels, err.round(2)))


def test_a_wrong_offset_is_caught():
  model = centre_tap_fcn8s("pool3", final_offset_shift=3)
  err = np.abs(gradient_centroids(model, CENTRE) - np.array(CENTRE)).max(axis=1)
  assert np.all(err > 2.0), err
