"""ResNet backbones and their segmenters: parameter counts, geometry, output sizes, resize."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fcnjax import models
from fcnjax.models import geometry, resnet, resnet_fcn

from test_models_shapes import NON_SQUARE, SQUARE_SIZES, output_shapes

FC = {18: 512 * 1000 + 1000, 34: 512 * 1000 + 1000, 50: 2048 * 1000 + 1000,
      101: 2048 * 1000 + 1000}


def count(name, *args, **kw):
  return models.count_params(nnx.eval_shape(lambda: models.build_model(name, *args, **kw)))


@pytest.mark.parametrize("depth, without_fc, with_fc", [
    (18, 11_176_512, 11_689_512), (50, 23_508_032, 25_557_032), (101, 42_500_160, 44_549_160)])
def test_resnet_parameter_counts_as_torchvision(depth, without_fc, with_fc):
  n = count(f"resnet{depth}")
  assert n == without_fc
  assert n + FC[depth] == with_fc  # torchvision's count with its 1000-class fc


def test_segmenter_parameter_counts():
  assert count("d2l_fcn_resnet18", 21) == 12_993_642
  assert count("fcn_resnet50", 21) == 35_322_218
  assert count("fcn_resnet50", 21, aux=False) == 32_957_013


def test_resnet_geometry_and_dilation():
  bb = resnet.ResNet(50, width_multiplier=1 / 16, rngs=nnx.Rngs(0))
  assert [bb.coord_maps[f"layer{i}"].scale for i in range(1, 5)] == [
      1 / geometry.Fraction(s) for s in (4, 8, 16, 32)]
  assert all(m.shift == 0 for m in bb.coord_maps.values())
  assert bb.output_stride == 32
  dil = resnet.ResNet(50, width_multiplier=1 / 16, replace_stride_with_dilation=(False, True, True),
                      rngs=nnx.Rngs(0))
  assert dil.output_stride == 8 and dil.dilation_per_stage == (1, 1, 2, 4)
  assert dil.layer4[0].conv2.kernel_dilation == 2   # the first block keeps the previous
  assert dil.layer4[1].conv2.kernel_dilation == 4
  v2 = resnet.PreActResNet(101, width_multiplier=1 / 16, rngs=nnx.Rngs(0))
  assert v2.output_stride == 32 and v2.layer1[-1].stride == 2 and v2.layer4[-1].stride == 1
  with pytest.raises(ValueError, match="does not support dilation"):
    resnet.ResNet(18, replace_stride_with_dilation=(False, False, True), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="depth must be one of"):
    resnet.ResNet(20, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="VGG options"):
    models.build_model("fcn_resnet50", 21, aligned=True)


def test_fcn8s_on_resnet_derives_its_crops():
  m = nnx.eval_shape(lambda: models.build_model("fcn8s-resnet50", 21))
  # ResNet maps are centred on the image grid: the centred bilinear kernels align them, and
  # the upsampled maps are the larger ones at each fusion (negative offsets)
  assert m.skip_offsets == (-1, -1) and m.final_offset == 7
  assert all(u.centered for u in [*m.upscore_skips, m.upscore_final])
  assert m.preprocessing.name == "torchvision-rgb-imagenet"


def test_centred_upsampling_interpolates_linearly():
  """A centred factor-f upsampling of a linear ramp, cropped at f - 1, is the ramp at 1/f
  spacing (the grids agree to the pixel); the even kernel would be half a pixel off."""
  up = models.BilinearUpsample(1, 4, centered=True)
  x = jnp.arange(6, dtype=jnp.float32).reshape(1, 6, 1, 1) * jnp.ones((1, 1, 6, 1))
  y = np.asarray(up(x))[0, 3:3 + 21, 3 + 8, 0]
  np.testing.assert_allclose(y, np.arange(21) / 4, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("name, every", [("fcn8s-resnet18", True), ("d2l_fcn_resnet18", False)])
def test_output_size_equals_input_size_every_size(name, every):
  """Every size 1..600 and 200 non-square ones for the FCN skips (derived crops); the d2l FCN
  (a fixed top-left crop) on 1..100 and 50 non-square sizes."""
  model = models.build_model(name, 3, width_multiplier=1 / 32)
  model.eval()
  sizes = ([(s, s) for s in SQUARE_SIZES] + NON_SQUARE if every
           else [(s, s) for s in range(1, 101)] + NON_SQUARE[:50])
  bad = [hw for hw, shape in zip(sizes, output_shapes(model, sizes)) if shape != (*hw, 3)]
  assert not bad, f"{name}: wrong output size for {bad[:10]} ({len(bad)} sizes)"


def test_fcn_resnet50_output_size_sampled():
  model = models.build_model("fcn_resnet50", 3, width_multiplier=1 / 32)
  model.eval()
  sizes = [(1, 1), (2, 3), (7, 600), (31, 33), (97, 64), (600, 599)] + NON_SQUARE[:20]
  assert output_shapes(model, sizes) == [(*hw, 3) for hw in sizes]
  logits, aux = jax.eval_shape(lambda x: model(x, return_aux=True),
                               jax.ShapeDtypeStruct((2, 45, 61, 3), jnp.float32))
  assert logits.shape == aux.shape == (2, 45, 61, 3)


def test_resize_bilinear_matches_torch_interpolate():
  torch = pytest.importorskip("torch")
  x = np.random.default_rng(0).standard_normal((2, 5, 7, 3)).astype(np.float32)
  for h, w in [(40, 56), (37, 61), (5, 7), (3, 4), (11, 7)]:
    want = torch.nn.functional.interpolate(torch.from_numpy(x.transpose(0, 3, 1, 2)), size=(h, w),
                                           mode="bilinear", align_corners=False)
    got = resnet_fcn.resize_bilinear(jnp.asarray(x), h, w)
    np.testing.assert_allclose(np.asarray(got), want.numpy().transpose(0, 2, 3, 1), atol=1e-5)


def test_summary_rows_sum_to_the_parameter_count():
  from fcnjax.models.summary import layer_table
  for name in ("fcn_resnet50", "d2l_fcn_resnet18", "fcn8s-resnet18"):
    model = nnx.eval_shape(lambda: models.build_model(name, 5, width_multiplier=1 / 16))
    rows = layer_table(model, 45, 61)
    assert sum(n for _, _, n in rows) == models.count_params(model), name
    assert rows[-1][1] == (1, 45, 61, 5)
