"""Zero-padded batches with a mask: BatchNorm over image cells only, padding never reaches an image.

Reference: each image run alone at its own size (the unpadded batch). Tolerance: 1e-5 of the
reference's max |value| (float32; the padded batch only reorders sums and adds zeros). In train
mode each of up to 50 batch-normalised layers divides the rounding of its statistics by the
features' standard deviation: there merely swapping the two images of the unpadded batch moves
running statistics by up to 1.0e-4 and features by up to 2.7e-4 (ResNet-101 V2 at 1/16 width),
so statistics and features are held to 3e-4 (padding entering the statistics: > 1e-2).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fcnjax.models import build_model, masking
from fcnjax.models.resnet_fcn import resize_bilinear, resize_bilinear_masked

RTOL = 1e-5
TRAIN_RTOL = 3e-4
BUCKET = (64, 72)


def _rel(got, want) -> float:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def _randomise_batch_stats(model, seed):
  """Non-trivial running statistics, so eval-mode BatchNorm is not the identity, and random
  values for zero-initialised parameters (score heads, biases), which would hide the padding."""
  rng = np.random.default_rng(seed)
  for _, m in nnx.iter_modules(model):
    if isinstance(m, nnx.BatchNorm):
      m.mean[...] = jnp.asarray(rng.normal(0, 0.5, m.mean.shape), jnp.float32)
      m.var[...] = jnp.asarray(rng.uniform(0.5, 2.0, m.var.shape), jnp.float32)
  for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    if not np.any(np.asarray(var.get_value())):
      var.set_value(jnp.asarray(rng.normal(0, 0.1, var.shape), jnp.float32))
  return model


def _pad(images, shape, dummies=1):
  """Images (h_i, w_i, 3) -> a zero-padded (n + dummies, H, W, 3) batch and its mask."""
  n = len(images) + dummies
  x = np.zeros((n,) + shape + (3,), np.float32)
  mask = np.zeros((n,) + shape, bool)
  for i, im in enumerate(images):
    h, w = im.shape[:2]
    x[i, :h, :w] = im
    mask[i, :h, :w] = True
  return jnp.asarray(x), jnp.asarray(mask)


MODELS = ["d2l_fcn_resnet18", "fcn_resnet50", "d2l_fcn_resnet101v2"]


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) for n in MODELS[:2]]
                         + MODELS[2:] + ["fcn8s-resnet18"])  # (slow: >= 20 s on 2 cores)
def test_eval_padded_batch_gives_each_image_its_lone_logits(name):
  model = _randomise_batch_stats(build_model(name, 4, width_multiplier=1 / 16, seed=0), 1)
  model.eval()
  rng = np.random.default_rng(0)
  sizes = [(37, 53), (64, 72), (1, 1), (20, 9)]
  images = [rng.normal(size=s + (3,)).astype(np.float32) for s in sizes]
  x, mask = _pad(images, BUCKET)
  padded = np.asarray(model(x, mask=mask))
  if name == "fcn_resnet50":  # resized per image: nothing but zeros on the padding
    assert np.all(padded[~np.asarray(mask)] == 0)
  for i, (im, (h, w)) in enumerate(zip(images, sizes)):
    alone = np.asarray(model(jnp.asarray(im[None])))[0]
    assert _rel(padded[i, :h, :w], alone) <= RTOL, (name, (h, w))
  # without the mask the padding changes the logits near each image's edge (the test can fail)
  unmasked = np.asarray(model(x))
  h, w = sizes[0]
  alone = np.asarray(model(jnp.asarray(images[0][None])))[0]
  assert _rel(unmasked[0, :h, :w], alone) > 1e-3


@pytest.mark.parametrize("name", MODELS)
def test_aux_logits_and_train_mode_statistics_ignore_padding_and_dummies(name):
  """Two images of one size, padded into a bigger bucket with a dummy row, vs the same two
  unpadded: the same backbone features on the images' cells and the same running statistics."""
  rng = np.random.default_rng(1)
  h, w = 37, 53
  images = [rng.normal(1.0, 2.0, size=(h, w, 3)).astype(np.float32) for _ in range(2)]
  lone_x = jnp.asarray(np.stack(images))
  x, mask = _pad(images, BUCKET)

  def train_forward(inputs, m):
    model = build_model(name, 4, width_multiplier=1 / 16, seed=0)
    model.train()
    feats = model.backbone(inputs, mask=m)
    stats = [np.asarray(v) for v in jax.tree.leaves(nnx.state(model, nnx.BatchStat))]
    return feats, stats, model

  feats_lone, stats_lone, _ = train_forward(lone_x, None)
  feats_pad, stats_pad, model = train_forward(x, mask)
  assert len(stats_lone) > 10
  for a, b in zip(stats_pad, stats_lone):
    assert _rel(a, b) <= TRAIN_RTOL
  for stage, f in feats_lone.items():
    fh, fw = f.shape[1:3]
    assert _rel(feats_pad[stage][:2, :fh, :fw], f) <= TRAIN_RTOL, stage
  # the unmasked padded batch does move the statistics (the test can fail)
  _, stats_unmasked, _ = train_forward(x, None)
  assert max(_rel(a, b) for a, b in zip(stats_unmasked, stats_lone)) > 1e-2
  if name == "fcn_resnet50":  # the aux head's logits too, each image at its own size
    model.eval()
    _, aux = model(x, mask=mask, return_aux=True)
    _, aux_lone = model(lone_x, return_aux=True)
    assert _rel(np.asarray(aux)[:2, :h, :w], aux_lone) <= RTOL


def test_batch_norm_with_no_valid_cell_does_not_divide_by_zero():
  bn = nnx.BatchNorm(3, rngs=nnx.Rngs(0))
  bn.train()
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 4, 5, 3)), jnp.float32)
  y = masking.batch_norm(bn, x, jnp.zeros((2, 4, 5), bool))
  assert np.all(np.isfinite(np.asarray(bn.mean[...]))) and np.all(np.asarray(y) == 0)


@pytest.mark.parametrize("aligned, pool", [pytest.param(False, "ceil", marks=pytest.mark.slow),
                                           (True, "ceil"), (True, "floor")])
def test_vgg_bn_backbone_features_ignore_padding(aligned, pool):
  """VGG16-BN (``model.batch_norm``): the pad-100 and aligned variants' BatchNorm statistics
  and pool5 cells, padded vs alone (mask from the layers' SizeOps)."""
  rng = np.random.default_rng(2)
  h, w = 37, 45
  images = [rng.normal(size=(h, w, 3)).astype(np.float32) for _ in range(2)]
  x, mask = _pad(images, BUCKET)

  def run(inputs, m):
    model = build_model("fcn8s", 3, width_multiplier=1 / 16, aligned=aligned, pool=pool,
                        batch_norm=True, seed=0)
    model.train()
    feats = model(inputs, mask=m, return_intermediates=True)[1]
    return feats, [np.asarray(v) for v in jax.tree.leaves(nnx.state(model, nnx.BatchStat))]

  lone, stats_lone = run(jnp.asarray(np.stack(images)), None)
  padded, stats_pad = run(x, mask)
  assert len(stats_lone) == 13 * 2
  for a, b in zip(stats_pad, stats_lone):
    assert _rel(a, b) <= TRAIN_RTOL
  ph, pw = lone["pool5"].shape[1:3]
  assert _rel(padded["pool5"][:2, :ph, :pw], lone["pool5"]) <= TRAIN_RTOL


@pytest.mark.parametrize("sizes", [[(5, 7), (3, 2)], [(8, 9), (1, 1)]])
def test_per_image_resize_matches_each_image_resized_alone(sizes):
  rng = np.random.default_rng(3)
  H, W = 40, 50
  maps = [rng.normal(size=((h + 7) // 8, (w + 7) // 8, 2)).astype(np.float32) for h, w in sizes]
  x = np.zeros((len(sizes), (H + 7) // 8, (W + 7) // 8, 2), np.float32)
  valid = np.zeros(x.shape[:3], bool)
  mask = np.zeros((len(sizes), H, W), bool)
  for i, (m, (h, w)) in enumerate(zip(maps, sizes)):
    x[i, :m.shape[0], :m.shape[1]] = m
    valid[i, :m.shape[0], :m.shape[1]] = True
    mask[i, :h, :w] = True
  got = np.asarray(resize_bilinear_masked(jnp.asarray(x), jnp.asarray(valid), jnp.asarray(mask)))
  for i, (m, (h, w)) in enumerate(zip(maps, sizes)):
    want = np.asarray(resize_bilinear(jnp.asarray(m[None]), h, w))[0]
    np.testing.assert_allclose(got[i, :h, :w], want, rtol=0, atol=1e-6 * np.abs(want).max())
    assert np.all(got[i][~mask[i]] == 0)


class _OwnBackbone(nnx.Module):
  """A user's backbone without a ``mask`` parameter (the protocol makes it optional)."""

  final_stage, input_multiple = "feat", 1

  def __init__(self, rngs):
    from fcnjax.models import geometry
    self.conv = nnx.Conv(3, 8, (3, 3), strides=2, padding=((1, 1), (1, 1)), rngs=rngs)
    self.feature_channels = {"feat": 8}
    self.coord_maps = {"feat": geometry.conv_map(3, 2, 1)}

  def __call__(self, x):
    return {"feat": self.conv(x)}


def test_a_backbone_without_mask_still_works_in_fcn_and_predictor():
  from fcnjax.inference import Predictor
  from fcnjax.models import FCN
  model = FCN(_OwnBackbone(nnx.Rngs(0)), 3, (), zero_init_scores=False, rngs=nnx.Rngs(0))
  assert not model.backbone_takes_mask and masking.takes_mask(model)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 9, 11, 3)), jnp.float32)
  np.testing.assert_array_equal(model(x, mask=jnp.ones((1, 9, 11), bool)), model(x))
  assert Predictor(model).predict(np.zeros((9, 11, 3), np.uint8)).shape == (9, 11)
