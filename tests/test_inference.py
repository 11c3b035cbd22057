"""fcnjax.inference: Predictor against independent computations (the model's own forward, numpy
softmax / flips, PyTorch's bilinear interpolate), sliding windows, TTA, buckets and inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from fcnjax import models, preprocessing, weights
from fcnjax.inference import Predictor, images, tiling
from fcnjax.inference.loading import ModelLoadError, load_model


def tiny_fcn(aligned=False, num_classes=5, seed=0):
  """FCN-8s at 1/16 width with random (non-zero) score layers, so classes vary."""
  model = models.build_model("fcn8s", num_classes, width_multiplier=1 / 16, aligned=aligned,
                             seed=seed)
  key = jax.random.key(seed + 7)
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    if "score" in "/".join(map(str, path)):
      key, sub = jax.random.split(key)
      var.set_value(0.05 * jax.random.normal(sub, var.get_value().shape))
  model.eval()
  return model


def forward(model, rgb):
  """The model's own logits for one RGB uint8 image at its size: (H, W, C) numpy."""
  x = model.preprocessing(rgb)[None]
  return np.asarray(model(jnp.asarray(x)))[0]


def np_softmax(z):
  z = z - z.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


class SmallConvNet(nnx.Module):
  """Receptive field radius 5 px, stride 2 then x2 nearest upsampling: a model whose field fits
  in a small tile overlap; translation period 2."""

  translation_period = 2

  def __init__(self, num_classes=4, *, rngs):
    self.num_classes = num_classes
    self.preprocessing = preprocessing.CAFFE
    self.c1 = nnx.Conv(3, 8, (3, 3), padding="SAME", rngs=rngs)
    self.c2 = nnx.Conv(8, 8, (3, 3), padding="SAME", rngs=rngs)
    self.out = nnx.Conv(8, num_classes, (1, 1), rngs=rngs)

  def __call__(self, x):
    h, w = x.shape[1], x.shape[2]
    y = nnx.relu(self.c1(x / 64.0))
    y = jnp.pad(y, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
    y = nnx.max_pool(y, (2, 2), strides=(2, 2))
    y = nnx.relu(self.c2(y))
    y = jnp.repeat(jnp.repeat(y, 2, axis=1), 2, axis=2)[:, :h, :w]
    return self.out(y)


@pytest.fixture(scope="module")
def rng():
  return np.random.default_rng(0)


def rgb_image(rng, h, w):
  """A smooth random image (random noise alone makes every class map noise)."""
  small = rng.integers(0, 256, (max(2, h // 8), max(2, w // 8), 3), np.uint8)
  return np.asarray(Image.fromarray(small).resize((w, h), Image.BILINEAR))


# -- one image, against the model's own forward --------------------------------------------------
@pytest.mark.parametrize("aligned", [False, True])
def test_predict_and_predict_proba_equal_the_models_forward(rng, aligned):
  model = tiny_fcn(aligned)
  p = Predictor(model)
  for h, w in [(37, 53), (64, 64), (100, 33)]:
    rgb = rgb_image(rng, h, w)
    logits = forward(model, rgb)
    classes = p.predict(rgb)
    assert classes.shape == (h, w) and classes.dtype == np.int32
    np.testing.assert_array_equal(classes, logits.argmax(-1))
    probs = p.predict_proba(rgb)
    assert probs.shape == (h, w, 5)
    np.testing.assert_allclose(probs, np_softmax(logits), atol=1e-6)  # float32 softmax
  assert len(np.unique(classes)) > 1  # a model that predicts one class could not fail this


def test_inputs_grey_rgba_16bit_float_and_paths_become_the_same_rgb(tmp_path, rng):
  rgb = rgb_image(rng, 20, 30)
  grey = rgb[..., 0]
  assert (images.to_rgb(grey) == np.repeat(grey[..., None], 3, -1)).all()
  rgba = np.concatenate([rgb, np.full((20, 30, 1), 7, np.uint8)], -1)
  assert (images.to_rgb(rgba) == rgb).all()
  assert (images.to_rgb(rgb.astype(np.uint16) << 8) == rgb).all()
  assert (images.to_rgb(rgb / 255.0) == rgb).all()
  Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
  assert (images.to_rgb(tmp_path / "a.png") == rgb).all()
  Image.fromarray((grey.astype(np.uint16) << 8)).save(tmp_path / "g16.png")
  assert (images.read_image(tmp_path / "g16.png") == np.repeat(grey[..., None], 3, -1)).all()
  (tmp_path / "bad.jpg").write_bytes(b"garbage")
  with pytest.raises(images.ImageReadError, match="bad.jpg: cannot read the image"):
    images.read_image(tmp_path / "bad.jpg")
  with pytest.raises(images.ImageReadError, match=r"image: expected .* got shape \(3, 4, 5\)"):
    images.to_rgb(np.zeros((3, 4, 5)))


def test_exif_orientation_is_applied_and_sizes_come_from_the_header(tmp_path, rng):
  rgb = rgb_image(rng, 20, 30)
  exif = Image.Exif()
  exif[0x0112] = 6  # rotated 90 degrees clockwise when shown
  Image.fromarray(rgb).save(tmp_path / "r.jpg", exif=exif, quality=95)
  assert images.image_size(tmp_path / "r.jpg") == (30, 20)
  assert images.read_image(tmp_path / "r.jpg").shape == (30, 20, 3)


# -- sliding windows -----------------------------------------------------------------------------
def test_tiles_cover_every_pixel_start_on_the_period_and_end_at_the_edge():
  for n, tile, overlap, period in [(100, 40, 10, 1), (1000, 256, 64, 32), (257, 256, 0, 32),
                                   (33, 40, 8, 4), (500, 96, 64, 32)]:
    segs = tiling.segments(n, tile, overlap, period)
    assert segs[0][0] == 0 and segs[-1][1] == n
    assert all(a % period == 0 and 0 < b - a <= tile for a, b in segs)
    kept = np.zeros(n, int)
    for s in segs:
      a, b = tiling.trusted(s, n, overlap // 2)
      kept[a:b] += 1
    assert (kept >= 1).all()
  with pytest.raises(ValueError, match="overlap 40 must be smaller than the tile 40"):
    tiling.segments(100, 40, 40)


def test_tiled_equals_whole_image_when_the_receptive_field_fits_in_the_overlap(rng):
  model = SmallConvNet(rngs=nnx.Rngs(0))
  whole = Predictor(model, exact=True)
  tiled = Predictor(model, exact=True, tile=(24, 32), overlap=12)  # keeps 6 px > field radius 5
  for h, w in [(61, 90), (24, 33), (100, 47)]:
    rgb = rgb_image(rng, h, w)
    a, b = whole.predict_proba(rgb), tiled.predict_proba(rgb)
    np.testing.assert_allclose(b, a, atol=1e-6)
    assert (tiled.predict(rgb) == whole.predict(rgb)).all()
  # with too little overlap the tiles' borders show: the test can tell
  loose = Predictor(model, exact=True, tile=(24, 32), overlap=2)
  rgb = rgb_image(rng, 61, 90)
  assert np.abs(loose.predict_proba(rgb) - whole.predict_proba(rgb)).max() > 1e-3


def test_tiled_fcn_gives_full_size_maps_with_few_programs(rng):
  model = tiny_fcn(aligned=True)
  p = Predictor(model, tile=(64, 64), overlap=32)
  outs = list(p.predict_many([rgb_image(rng, h, w) for h, w in [(150, 97), (70, 200), (64, 64)]]))
  assert [o.classes.shape for o in outs] == [(150, 97), (70, 200), (64, 64)]
  assert p.programs_compiled == 1  # edge tiles padded to the tile: one program


def test_images_above_max_pixels_are_tiled_automatically(rng, monkeypatch):
  from fcnjax.inference import predictor as predictor_lib
  monkeypatch.setattr(predictor_lib, "AUTO_TILE", (48, 48))
  model = tiny_fcn(aligned=True)
  p = Predictor(model, max_pixels=50 * 50, overlap=16)
  seen = []
  real = tiling.plan_tiles
  monkeypatch.setattr(tiling, "plan_tiles", lambda *a, **k: seen.append(a) or real(*a, **k))
  assert p.predict(rgb_image(rng, 90, 70)).shape == (90, 70)
  assert seen and seen[0][:3] == (90, 70, (48, 48))
  seen.clear()
  p.predict(rgb_image(rng, 40, 40))
  assert not seen


# -- test-time augmentation ----------------------------------------------------------------------
def test_flip_averages_the_softmax_of_the_image_and_of_its_mirror(rng):
  model = tiny_fcn()
  rgb = rgb_image(rng, 45, 61)
  expected = (np_softmax(forward(model, rgb))
              + np_softmax(forward(model, np.ascontiguousarray(rgb[:, ::-1])))[:, ::-1]) / 2
  got = Predictor(model, flip=True).predict_proba(rgb)
  np.testing.assert_allclose(got, expected, atol=1e-6)
  assert (Predictor(model, flip=True).predict(rgb) == expected.argmax(-1)).all()


def test_scales_resize_views_and_probabilities_back_like_pytorch(rng):
  torch = pytest.importorskip("torch")
  model = tiny_fcn()
  rgb = rgb_image(rng, 45, 61)
  expected = np.zeros((45, 61, 5))
  for s in (0.5, 1.5):
    hw = (round(45 * s), round(61 * s))
    view = np.asarray(Image.fromarray(rgb).resize((hw[1], hw[0]), Image.BILINEAR))
    probs = torch.from_numpy(np_softmax(forward(model, view))).permute(2, 0, 1)[None]
    back = torch.nn.functional.interpolate(probs, size=(45, 61), mode="bilinear",
                                           align_corners=False)
    expected += back[0].permute(1, 2, 0).numpy() / 2
  got = Predictor(model, scales=(0.5, 1.5)).predict_proba(rgb)
  np.testing.assert_allclose(got, expected, atol=1e-5)


def test_resize_maps_equals_torch_interpolate_bilinear():
  torch = pytest.importorskip("torch")
  x = np.random.default_rng(1).random((13, 29, 3), np.float32)
  for hw in [(26, 58), (7, 10), (13, 29), (40, 5)]:
    ref = torch.nn.functional.interpolate(torch.from_numpy(x).permute(2, 0, 1)[None], size=hw,
                                          mode="bilinear", align_corners=False)
    # torch computes the source coordinates in float32, we in float64: ~1e-6 apart on [0, 1]
    np.testing.assert_allclose(images.resize_maps(x, hw), ref[0].permute(1, 2, 0).numpy(),
                               atol=5e-6)


# -- many images ---------------------------------------------------------------------------------
def test_predict_many_plans_buckets_keeps_order_and_sizes(rng):
  model = tiny_fcn(aligned=True)
  sizes = [(int(h), int(w)) for h, w in rng.integers(20, 100, (14, 2))]
  ims = [rgb_image(rng, h, w) for h, w in sizes]
  p = Predictor(model, max_buckets=3)
  outs = list(p.predict_many(ims, chunk=7))
  assert [o.index for o in outs] == list(range(14))
  assert [o.classes.shape for o in outs] == sizes
  assert len(p.bucket_shapes) <= 3 and p.programs_compiled <= 3
  exact = Predictor(model, exact=True)
  ex = list(exact.predict_many(ims))
  # one program per size, the aligned model's sizes rounded up to the 32 it pads to itself
  assert exact.programs_compiled == len({(-(-h // 32), -(-w // 32)) for h, w in sizes})
  # the aligned model pads to 32 itself; bucket padding beyond that changes a few pixels at most
  agree = np.mean([np.mean(a.classes == b.classes) for a, b in zip(outs, ex)])
  assert agree > 0.9


def test_predict_many_raises_naming_the_bad_image():
  p = Predictor(tiny_fcn())
  with pytest.raises(images.ImageReadError, match="image 1: expected"):
    list(p.predict_many([np.zeros((8, 8, 3), np.uint8), np.zeros((2, 3, 7))]))


# -- weights -------------------------------------------------------------------------------------
def test_predictor_from_a_safetensors_file_equals_the_model(tmp_path, rng):
  model = tiny_fcn()
  path = tmp_path / "m.safetensors"
  weights.save(model, path, metadata={"class_names": '["a","b","c","d","e"]'})
  p = Predictor(str(path))
  assert p.class_names == ("a", "b", "c", "d", "e")
  rgb = rgb_image(rng, 50, 40)
  assert (p.predict(rgb) == forward(model, rgb).argmax(-1)).all()


def test_load_model_errors_name_the_path(tmp_path):
  with pytest.raises(ModelLoadError, match="nope: no such file or directory"):
    load_model(tmp_path / "nope")
  (tmp_path / "empty").mkdir()
  with pytest.raises(ModelLoadError, match="not a training workdir"):
    load_model(tmp_path / "empty")
  bb = models.build_model("vgg16", width_multiplier=1 / 16)
  weights.save(bb, tmp_path / "bb.safetensors")
  with pytest.raises(ModelLoadError, match="bb.safetensors: a bare backbone \\(VGG16 / ResNet\\)"):
    load_model(tmp_path / "bb.safetensors")
  with pytest.raises(ValueError, match="scales must be positive"):
    Predictor(tiny_fcn(), scales=(0,))
