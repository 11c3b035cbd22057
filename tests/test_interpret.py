"""fcnjax.interpret against independent computations: Grad-CAM by jax.vjp through the model's
second half written out here, activation shapes against the summary, filter patterns' seeds."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fcnjax import interpret
from fcnjax import preprocessing as preprocessing_lib
from fcnjax.interpret import filters as filters_lib
from fcnjax.interpret import grad_cam as gradcam_lib
from fcnjax.interpret import layers as layers_lib
from fcnjax.models import build_model, geometry, taps
from fcnjax.models import classifier as clf
from fcnjax.models.layers import crop
from fcnjax.models.summary import layer_table


def _randomise_bn(model, seed):
  """Non-trivial BatchNorm statistics and scales, so that eval mode matters."""
  rng = np.random.default_rng(seed)
  for _, m in nnx.iter_modules(model):
    if isinstance(m, nnx.BatchNorm):
      n = m.mean.shape[0]
      m.mean.set_value(jnp.asarray(rng.normal(0, 0.3, n), jnp.float32))
      m.var.set_value(jnp.asarray(rng.uniform(0.5, 2.0, n), jnp.float32))
      m.scale.set_value(jnp.asarray(rng.uniform(0.5, 1.5, n), jnp.float32))
      m.bias.set_value(jnp.asarray(rng.normal(0, 0.2, n), jnp.float32))


@pytest.fixture(scope="module")
def small_classifier():
  model = clf.fcn_classifier(4, widths=(4, 6, 8, 8, 8), seed=0)
  _randomise_bn(model, 1)
  model.eval()
  return model


def _sample(n_image, n_layer, scale, shift):
  """Independent bilinear sampling matrix: pixel y -> cell u = scale * y + shift."""
  m = np.zeros((n_image, n_layer))
  for y in range(n_image):
    u = min(max(scale * y + shift, 0.0), n_layer - 1)
    lo = int(np.floor(u))
    hi = min(lo + 1, n_layer - 1)
    m[y, lo] += 1 - (u - lo)
    m[y, hi] += u - lo
  return m


def _cam_numpy(acts, grads):
  alpha = grads.mean(axis=(1, 2))
  return np.maximum(np.einsum("bhwk,bk->bhw", acts, alpha), 0)


def _normalise(up):
  peak = up.max(axis=(1, 2), keepdims=True)
  return np.where(peak > 0, up / np.where(peak > 0, peak, 1), 0)


def test_classifier_gradcam_equals_vjp_of_the_second_half(small_classifier):
  model = small_classifier
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(3, 37, 45, 3)), jnp.float32)
  cls = 2
  bb = model.backbone
  _, out = model(x, return_intermediates=True)
  acts = out["block3"]

  def second_half(a):  # blocks 4, 5, the head, the scores and the global max: by hand
    for i in (3, 4):
      a = jax.nn.relu(bb.norms[i](bb.convs[i](a)))
    a = jax.nn.relu(model.head_norm(model.head(a)))
    s = model.score_norm(model.score(a))
    return jnp.max(s, axis=(1, 2))

  logits, vjp = jax.vjp(second_half, acts)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(model(x)), rtol=1e-5, atol=1e-5)
  (grads,) = vjp(jnp.zeros_like(logits).at[:, cls].set(1.0))
  cam = _cam_numpy(np.asarray(acts, np.float64), np.asarray(grads, np.float64))
  # block3's grid: VALID 3x3 convs with strides 1, 1, 2 -> cell u = (y - 3) / 2
  rows = _sample(37, cam.shape[1], 0.5, -1.5)
  cols = _sample(45, cam.shape[2], 0.5, -1.5)
  want = _normalise(np.einsum("yh,bhw,xw->byx", rows, cam, cols))

  r = interpret.gradcam_result(model, x, cls, "block3")
  assert cam.max() > 0
  np.testing.assert_allclose(r.layer_map, cam, rtol=1e-4, atol=1e-6 * cam.max())
  np.testing.assert_allclose(r.heatmap, want, atol=1e-5)
  np.testing.assert_allclose(r.target, np.asarray(logits)[:, cls], rtol=1e-5)
  assert r.heatmap.shape == (3, 37, 45) and r.region_pixels is None
  # the same call through the default layer (the last conv block: block5) works too
  assert layers_lib.default_layer(model) == "block5"
  assert interpret.gradcam(model, x, cls).shape == (3, 37, 45)


@pytest.fixture(scope="module")
def small_fcn32s():
  model = build_model("fcn32s", 3, width_multiplier=1 / 16, aligned=True, seed=0)
  rng = np.random.default_rng(2)
  k = model.score_fr.conv.kernel
  k.set_value(jnp.asarray(rng.normal(0, 0.5, k.shape), jnp.float32))
  model.eval()
  return model


def test_segmenter_gradcam_equals_vjp_over_a_box_and_the_predicted_pixels(small_fcn32s):
  model = small_fcn32s
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(0, 40, size=(2, 50, 70, 3)), jnp.float32)
  _, out = model(x, return_intermediates=True)
  acts = out["fc7"]

  def second_half(a):  # score_fr, the fixed bilinear upsampling, the crop: by hand
    s = model.upscore_final(model.score_fr(a))
    return crop(s, model.final_offset, 50, 70)

  logits, vjp = jax.vjp(second_half, acts)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(model(x)), rtol=1e-4, atol=1e-4)
  box = (10, 5, 40, 30)
  for cls, region in ((1, box), (2, None)):
    if region is None:
      weights = (np.asarray(logits).argmax(-1) == cls).astype(np.float32)
    else:
      weights = np.zeros((2, 50, 70), np.float32)
      weights[:, 5:30, 10:40] = 1
    assert weights.sum() > 0
    cot = np.zeros(logits.shape, np.float32)
    cot[..., cls] = weights
    (grads,) = vjp(jnp.asarray(cot))
    cam = _cam_numpy(np.asarray(acts, np.float64), np.asarray(grads, np.float64))
    # fc7's grid in the aligned VGG: stride 32, cell u = (y - 15.5) / 32 (backbone.coord_maps)
    cm = model.backbone.coord_maps["fc7"]
    assert (float(cm.scale), float(cm.shift)) == (1 / 32, -15.5 / 32)
    rows, cols = _sample(50, cam.shape[1], 1 / 32, -15.5 / 32), _sample(70, cam.shape[2],
                                                                        1 / 32, -15.5 / 32)
    want = _normalise(np.einsum("yh,bhw,xw->byx", rows, cam, cols))
    r = interpret.gradcam_result(model, x, cls, "fc7", region=region)
    np.testing.assert_allclose(r.layer_map, cam, rtol=1e-4, atol=1e-6 * max(cam.max(), 1e-12))
    np.testing.assert_allclose(r.heatmap, want, atol=1e-5)
    np.testing.assert_array_equal(r.region_pixels, weights.sum(axis=(1, 2)))
  # a mask equal to the box gives the same heatmap as the box
  mask = np.zeros((50, 70), bool)
  mask[5:30, 10:40] = True
  np.testing.assert_allclose(interpret.gradcam(model, x, 1, "fc7", region=mask),
                             interpret.gradcam(model, x, 1, "fc7", region=box), atol=1e-6)


def test_gradcam_errors(small_classifier, small_fcn32s):
  x = jnp.zeros((1, 40, 40, 3))
  with pytest.raises(interpret.UnknownLayer, match="unknown layer 'block9'.*block1, block2"):
    interpret.gradcam(small_classifier, x, 0, "block9")
  with pytest.raises(ValueError, match="class_id 4 is not a class of this 4-class model"):
    interpret.gradcam(small_classifier, x, 4)
  with pytest.raises(ValueError, match="segmenters only"):
    interpret.gradcam(small_classifier, x, 0, region=(0, 0, 5, 5))
  with pytest.raises(clf.InputTooSmall, match="minimum input size 19x19"):
    interpret.gradcam(small_classifier, jnp.zeros((1, 18, 40, 3)), 0)
  with pytest.raises(ValueError, match="not inside the 40x40 image"):
    interpret.gradcam(small_fcn32s, x, 0, "fc7", region=(0, 0, 41, 10))
  with pytest.raises(ValueError, match=r"images must be \(B, H, W, 3\)"):
    interpret.gradcam(small_fcn32s, jnp.zeros((40, 40, 3)), 0)


def test_an_empty_region_gives_an_all_zero_heatmap(small_fcn32s):
  x = jnp.zeros((1, 33, 33, 3))
  r = interpret.gradcam_result(small_fcn32s, x, 0, "fc7", region=np.zeros((33, 33)))
  assert r.region_pixels[0] == 0 and not r.heatmap.any()


def test_taps_are_a_no_op_outside_perturbed_and_typos_raise(small_classifier):
  x = jnp.asarray(np.random.default_rng(4).normal(size=(1, 30, 30, 3)), jnp.float32)
  base = np.asarray(small_classifier(x))
  with taps.perturbed({"block2": jnp.zeros((1, 26, 26, 6))}):
    np.testing.assert_array_equal(np.asarray(small_classifier(x)), base)
  with pytest.raises(KeyError, match="blockk2"):
    with taps.perturbed({"blockk2": jnp.zeros(())}):
      small_classifier(x)


@pytest.mark.parametrize("which", ["classifier", "fcn8s"])
def test_activation_shapes_match_the_summary(which, small_classifier):
  model = (small_classifier if which == "classifier" else
           build_model("fcn8s", 5, width_multiplier=1 / 16, seed=0))
  h, w = 41, 57
  rows = layer_table(model, h, w)
  acts = interpret.activations(model, jnp.zeros((1, h, w, 3)))
  assert list(acts) == [label.split()[0] for label, _, _ in rows]
  assert [a.shape for a in acts.values()] == [shape for _, shape, _ in rows]
  assert list(acts) == interpret.layer_names(model)
  one = interpret.activations(model, jnp.zeros((2, h, w, 3)), "pool3" if which == "fcn8s"
                              else "block2")
  assert len(one) == 1 and next(iter(one.values())).shape[0] == 2


def test_activations_are_the_models_intermediates_in_eval_mode(small_classifier):
  x = jnp.asarray(np.random.default_rng(5).normal(size=(2, 30, 44, 3)), jnp.float32)
  small_classifier.train()  # the caller's mode is left alone; eval mode is used
  try:
    acts = interpret.activations(small_classifier, x, ["block1", "scores"])
    assert not small_classifier.backbone.norms[0].use_running_average
  finally:
    small_classifier.eval()
  _, out = small_classifier(x, return_intermediates=True)
  for k in ("block1", "scores"):
    np.testing.assert_allclose(acts[k], np.asarray(out[k]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pre", [preprocessing_lib.CAFFE, preprocessing_lib.TORCHVISION])
def test_affine_preprocessing(pre):
  a, b = filters_lib.affine_preprocessing(pre)
  rgb = np.random.default_rng(6).integers(0, 256, (4, 5, 3)).astype(np.uint8)
  np.testing.assert_allclose(rgb.astype(np.float32) @ a + b, pre(rgb), atol=1e-4)


def test_filter_patterns_are_reproducible_from_the_seed_and_raise_activation(small_classifier):
  kw = dict(steps=12, size=(32, 40))
  r1 = interpret.filter_patterns(small_classifier, "block3", [0, 3, 5], seed=7, **kw)
  r2 = interpret.filter_patterns(small_classifier, "block3", [0, 3, 5], seed=7, **kw)
  r3 = interpret.filter_patterns(small_classifier, "block3", [0, 3, 5], seed=8, **kw)
  np.testing.assert_array_equal(r1.rgb, r2.rgb)
  np.testing.assert_array_equal(r1.images, r2.images)
  assert np.abs(r1.rgb - r3.rgb).max() > 1e-3
  assert r1.images.shape == (3, 32, 40, 3) and r1.images.dtype == np.uint8
  np.testing.assert_array_equal(r1.filters, [0, 3, 5])
  # the ascent raises every live filter's activation; a filter that is 0 (ReLU) on all of the
  # starting noise has no gradient and stays 0 (filter 5 here: the CLI reports such filters)
  live = r1.start > 0
  assert live.sum() >= 2 and np.all(r1.end[live] > 2 * r1.start[live]), (r1.start, r1.end)
  assert np.all(r1.end >= r1.start)
  all8 = interpret.filter_patterns(small_classifier, "block3", 100, steps=1, size=32)
  assert list(all8.filters) == list(range(8))  # an int: the first n, at most every channel
  with pytest.raises(ValueError, match="filter 8 is not a channel of layer 'block3'"):
    interpret.filter_patterns(small_classifier, "block3", [8], steps=1, size=32)


def test_sampling_matrix_rows_interpolate():
  m = gradcam_lib.sampling_matrix(8, 4)  # a plain 2x half-pixel resize
  np.testing.assert_allclose(m.sum(1), 1)
  np.testing.assert_allclose(m @ np.arange(4.0), np.clip((np.arange(8) + 0.5) / 2 - 0.5, 0, 3))


def test_fcn_head_layers_sit_where_the_crop_offsets_say():
  """The upsampling / fusion layers' grids (interpret.layers._fcn_head_map) against the crop
  offsets the FCN derived independently: the final upsampled map starts ``final_offset`` pixels
  before the image, and each skip's score map is cropped at ``skip_offsets[i]`` cells onto the
  fused grid."""
  for aligned in (False, True):
    model = build_model("fcn8s", 3, width_multiplier=1 / 16, aligned=aligned, seed=0)
    final = layers_lib.layer_coord_map(model, "upscore_pool3")
    assert (final.scale, final.shift) == (1, model.final_offset)
    assert layers_lib.layer_coord_map(model, "crop") == geometry.IDENTITY
    for skip, offset in zip(model.skips, model.skip_offsets):
      fused = layers_lib.layer_coord_map(model, f"fuse_{skip}")
      score = layers_lib.layer_coord_map(model, f"score_{skip}")
      assert fused.scale == score.scale
      assert score.shift - fused.shift == offset
    assert all(layers_lib.layer_coord_map(model, n) is not None
               for n in interpret.layer_names(model))
