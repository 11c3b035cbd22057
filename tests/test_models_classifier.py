"""The FCN classifier: masked global pooling, the minimum input size from the geometry."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fcnjax import models
from fcnjax.models import classifier as clf
from fcnjax.models import geometry

SIZES = [(19, 19), (30, 300), (45, 33), (64, 64), (20, 97)]


def _small(pooling="max", seed=0):
  model = clf.fcn_classifier(5, pooling=pooling, widths=(8, 8, 16, 16, 16), seed=seed)
  # non-trivial BatchNorm statistics: eval mode must use them
  rng = np.random.default_rng(seed)
  for _, m in nnx.iter_modules(model):
    if isinstance(m, nnx.BatchNorm):
      n = m.mean.shape[0]
      m.mean[...] = jnp.asarray(rng.normal(0, 0.3, n), jnp.float32)
      m.var[...] = jnp.asarray(rng.uniform(0.5, 2.0, n), jnp.float32)
      m.scale[...] = jnp.asarray(rng.uniform(0.5, 1.5, n), jnp.float32)
      m.bias[...] = jnp.asarray(rng.normal(0, 0.3, n), jnp.float32)
  model.eval()
  return model


def _padded(images):
  H = max(im.shape[0] for im in images)
  W = max(im.shape[1] for im in images)
  x = np.zeros((len(images), H, W, 3), np.float32)
  mask = np.zeros((len(images), H, W), bool)
  for i, im in enumerate(images):
    x[i, :im.shape[0], :im.shape[1]] = im
    mask[i, :im.shape[0], :im.shape[1]] = True
  return jnp.asarray(x), jnp.asarray(mask)


@pytest.mark.parametrize("pooling", ["max", "avg"])
def test_padded_batch_gives_each_image_its_own_logits(pooling):
  model = _small(pooling)
  rng = np.random.default_rng(1)
  images = [rng.normal(size=(h, w, 3)).astype(np.float32) for h, w in SIZES]
  alone = np.stack([np.asarray(model(jnp.asarray(im[None])))[0] for im in images])
  x, mask = _padded(images)
  got = np.asarray(model(x, mask=mask))
  assert got.shape == (len(SIZES), 5)
  np.testing.assert_allclose(got, alone, atol=1e-5, rtol=0)
  # the tutorial's way (zeros, unmasked pooling) does not: the padding reaches the pool
  unmasked = np.asarray(model(x))
  assert np.abs(unmasked - alone).max() > 1e-3


def test_dummy_rows_get_zero_logits_and_do_not_disturb_the_others():
  model = _small()
  rng = np.random.default_rng(2)
  im = rng.normal(size=(30, 40, 3)).astype(np.float32)
  x, mask = _padded([im, np.zeros((30, 40, 3), np.float32)])
  mask = mask.at[1].set(False)
  got = np.asarray(model(x, mask=mask))
  np.testing.assert_allclose(got[0], np.asarray(model(jnp.asarray(im[None])))[0], atol=1e-5)
  assert np.all(got[1] == 0)


def test_training_batch_norm_statistics_ignore_the_padding():
  """Two same-size images alone vs. padded into a larger bucket with masks: one train-mode
  forward gives the same logits and the same updated running statistics."""
  rng = np.random.default_rng(3)
  images = [rng.normal(size=(25, 41, 3)).astype(np.float32) for _ in range(2)]

  def forward(x, mask):
    model = clf.fcn_classifier(3, widths=(4, 8, 8, 8, 8), dropout=0.0, seed=0)
    model.train()
    logits = model(x, mask=mask)
    stats = [np.asarray(m.mean[...]) for _, m in nnx.iter_modules(model)
             if isinstance(m, nnx.BatchNorm)]
    return np.asarray(logits), stats

  want, want_stats = forward(jnp.asarray(np.stack(images)), None)
  x, mask = _padded(images + [np.zeros((50, 70, 3), np.float32)])
  mask = mask.at[2].set(False)  # a dummy that makes the bucket larger
  got, got_stats = forward(x, mask)
  np.testing.assert_allclose(got[:2], want, atol=1e-5)
  for a, b in zip(got_stats, want_stats):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_min_input_size_of_the_tutorial_stack_is_derived_and_exact():
  model = nnx.eval_shape(lambda: clf.fcn_classifier(5, seed=0))
  assert models.min_input_size(model) == (19, 19)
  graphdef, state = nnx.split(model)

  def shape(h, w):
    return jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state,
                          jax.ShapeDtypeStruct((2, h, w, 3), jnp.float32)).shape

  for n in range(1, 19):
    with pytest.raises(clf.InputTooSmall, match="minimum input size 19x19"):
      shape(n, 40)
    with pytest.raises(clf.InputTooSmall, match="19x19"):
      shape(40, n)
  for n in range(19, 60):
    assert shape(n, n + 3) == (2, 5)


@pytest.mark.parametrize("strides,kernel", [((1, 2, 2), 3), ((2, 2, 2, 2), 3), ((1, 3), 5)])
def test_size_ops_match_the_convs_for_every_size(strides, kernel):
  """The backbone's own output length (eval_shape, no size check) is output_length(size_ops)
  for every size: >= 1 exactly from min_input_size on."""
  stack = nnx.eval_shape(lambda: clf.ConvStack(widths=[4] * len(strides), strides=strides,
                                               kernel_size=kernel, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(stack)
  m = geometry.min_input_length(stack.size_ops)
  for n in range(1, 80):
    out = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x)["features"], state,
                         jax.ShapeDtypeStruct((1, n, 90, 3), jnp.float32))
    want = geometry.output_length(stack.size_ops, n)
    assert out.shape[1] == max(want, 0), n
    assert (out.shape[1] >= 1) == (n >= m), n


@pytest.mark.parametrize("name,options", [
    ("fcn8s", dict(aligned=False)), ("fcn8s", dict(aligned=True)), ("fcn8s-resnet18", {}),
    ("d2l_fcn_resnet18", {}), ("fcn_resnet50", {})])
def test_segmenters_have_min_input_size_1_and_their_backbone_sizes_follow_size_ops(name, options):
  model = nnx.eval_shape(lambda: models.build_model(name, 3, width_multiplier=1 / 16, **options))
  assert models.min_input_size(model) == (1, 1)
  bb = model.backbone
  graphdef, state = nnx.split(bb)
  for n in (1, 2, 5, 17, 31, 32, 33, 64, 97):
    x = jax.ShapeDtypeStruct((1, n, n + 1, 3), jnp.float32)
    if bb.input_multiple > 1:  # the model pads to the multiple before the backbone
      m = bb.input_multiple
      x = jax.ShapeDtypeStruct((1, -(-n // m) * m, -(-(n + 1) // m) * m, 3), jnp.float32)
    feats = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state, x)
    out = feats[bb.final_stage].shape
    assert out[1:3] == (geometry.output_length(bb.size_ops, n),
                        geometry.output_length(bb.size_ops, n + 1)), (n, out)
  mg, ms = nnx.split(model)
  full = jax.eval_shape(lambda s, x: nnx.merge(mg, s)(x), ms,
                        jax.ShapeDtypeStruct((1, 1, 1, 3), jnp.float32))
  assert full.shape == (1, 1, 1, 3)


@pytest.mark.parametrize("name", sorted(models.CLASSIFIERS))
def test_every_registered_classifier_builds_and_pools_masked(name):
  model = models.build_model(name, 4, width_multiplier=1 / 16, seed=0)
  model.eval()
  assert model.task == "classification" and model.num_classes == 4
  mh, mw = models.min_input_size(model)
  rng = np.random.default_rng(4)
  images = [rng.normal(size=(max(mh, 33), max(mw, 47), 3)).astype(np.float32),
            rng.normal(size=(max(mh, 40), max(mw, 40), 3)).astype(np.float32)]
  x, mask = _padded(images)
  got = np.asarray(model(x, mask=mask))
  assert got.shape == (2, 4) and np.all(np.isfinite(got))


def test_build_model_refuses_segmentation_options_for_a_classifier():
  with pytest.raises(ValueError, match="learnable_upsampling=True: segmentation options"):
    models.build_model("fcn_classifier", 5, learnable_upsampling=True)
  with pytest.raises(ValueError, match="unknown classifier backbone"):
    clf.fcn_classifier(5, backbone="alexnet")


def test_masked_global_pool_matches_numpy():
  rng = np.random.default_rng(5)
  x = rng.normal(size=(3, 6, 7, 4)).astype(np.float32)
  valid = np.zeros((3, 6, 7), bool)
  valid[0, :2, :3] = True
  valid[1] = True
  for pooling, fn in (("max", np.max), ("avg", np.mean)):
    got = np.asarray(clf.masked_global_pool(jnp.asarray(x), jnp.asarray(valid), pooling))
    np.testing.assert_allclose(got[0], fn(x[0, :2, :3], axis=(0, 1)), rtol=1e-6)
    np.testing.assert_allclose(got[1], fn(x[1], axis=(0, 1)), rtol=1e-6)
    assert np.all(got[2] == 0)
