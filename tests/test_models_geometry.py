"""Crop offsets are derived from layer geometry and reproduce the Caffe reference."""

from fractions import Fraction

import pytest
from flax import nnx

from fcnjax import models
from fcnjax.models import geometry


def abstract(constructor, **kwargs):
  return nnx.eval_shape(lambda: constructor(21, rngs=nnx.Rngs(0), **kwargs))


@pytest.mark.parametrize("constructor, skip_offsets, final_offset", [
    (models.fcn32s, (), 19),
    (models.fcn16s, (5,), 27),
    (models.fcn8s, (5, 9), 31),
    (models.fcn8s_atonce, (5, 9), 31),
])
def test_derived_offsets_match_caffe_reference(constructor, skip_offsets, final_offset):
  model = abstract(constructor)
  assert model.skip_offsets == skip_offsets
  assert model.final_offset == final_offset


def test_offsets_do_not_depend_on_width():
  assert abstract(models.fcn8s, width_multiplier=1 / 8).skip_offsets == (5, 9)


def test_aligned_variant_needs_no_crop():
  model = abstract(models.fcn8s, aligned=True)
  assert model.skip_offsets == (0, 0) and model.final_offset == 0


def test_vgg16_coord_maps_by_hand():
  """pool5 = (u + 99) / 32 - 31/64 for the pad-100 VGG16 (Caffe coord_map arithmetic)."""
  backbone = nnx.eval_shape(lambda: models.vgg16(rngs=nnx.Rngs(0)))
  pool5 = backbone.coord_maps["pool5"]
  assert pool5.scale == Fraction(1, 32)
  assert pool5.shift == Fraction(99, 32) - Fraction(31, 64)
  assert backbone.coord_maps["fc7"].shift == pool5.shift - 3


def test_crop_offset_rejects_fractional_or_scale_mismatch():
  a = geometry.conv_map(2, 2, 0)  # shift -1/4
  with pytest.raises(ValueError, match="fractional"):
    geometry.crop_offset(a, geometry.CoordMap(a.scale, 0))
  with pytest.raises(ValueError, match="scales"):
    geometry.crop_offset(a, geometry.IDENTITY)


def test_fcn4s_fcn2s_geometry():
  m4 = abstract(models.fcn4s, width_multiplier=1 / 16)
  m2 = abstract(models.fcn2s, width_multiplier=1 / 16)
  assert m4.output_stride == 4 and m2.output_stride == 2
  assert m4.skip_offsets[:2] == (5, 9) and m2.skip_offsets[:2] == (5, 9)
  assert len(m2.skip_offsets) == 4


def test_unknown_skip_stage_is_a_clear_error():
  backbone = models.vgg16(width_multiplier=1 / 16, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="unknown skip stages"):
    models.FCN(backbone, 21, ("pool9",), rngs=nnx.Rngs(0))
