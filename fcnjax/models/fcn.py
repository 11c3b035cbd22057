"""Fully Convolutional Networks: a backbone, 1×1 score heads, skip fusion, bilinear upsampling.

:class:`FCN` is general: give it any backbone (see :mod:`fcnjax.models.vgg` for the protocol) and
the list of skip stages, coarse to fine. FCN-32s has no skips, FCN-16s skips ``pool4``, FCN-8s
``pool4, pool3``, and FCN-4s / FCN-2s add ``pool2`` / ``pool1``. Upsampling factors and every crop
offset are derived from the backbone's coordinate maps (:mod:`fcnjax.models.geometry`).

Input: (N, H, W, 3) float32 in the convention of ``model.preprocessing`` (default: the Caffe
reference's BGR, 0–255, minus the mean; see :mod:`fcnjax.preprocessing`). Output: (N, H, W,
num_classes) logits, for any H, W ≥ 1.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from fcnjax import preprocessing as preprocessing_lib
from fcnjax.models import geometry
from fcnjax.models.layers import BilinearUpsample, ScoreHead, crop, fuse
from fcnjax.models.vgg import VGG


class FCN(nnx.Module):
  """An FCN head on a backbone.

  Args:
    backbone: a module following the backbone protocol of :mod:`fcnjax.models.vgg`.
    num_classes: number of output classes (21 for VOC).
    skips: skip stages from coarse to fine, e.g. ``("pool4", "pool3")`` for FCN-8s.
    skip_scales: optional fixed input scale per skip (at-once FCN-8s: ``(0.01, 0.0001)``).
    learnable_upsampling: learn the transposed convs (the reference keeps them fixed bilinear).
    zero_init_scores: zero-initialise the score heads, as the reference.
    preprocessing: the input convention the weights expect (``fcnjax.preprocessing``).
    dtype: computation dtype of the score heads (parameters stay float32).

  Attributes ``skip_offsets`` (one per skip) and ``final_offset`` hold the derived crop offsets.
  """

  def __init__(self, backbone: nnx.Module, num_classes: int = 21,
               skips: Sequence[str] = ("pool4", "pool3"), *,
               skip_scales: Sequence[float | None] | None = None,
               learnable_upsampling: bool = False, zero_init_scores: bool = True,
               preprocessing: preprocessing_lib.Preprocessing = preprocessing_lib.CAFFE,
               dtype=None, rngs: nnx.Rngs):
    skips = tuple(skips)
    skip_scales = tuple(skip_scales) if skip_scales is not None else (None,) * len(skips)
    if len(skip_scales) != len(skips):
      raise ValueError(f"{len(skip_scales)} skip_scales for {len(skips)} skips")
    unknown = [s for s in skips if s not in backbone.feature_channels]
    if unknown:
      raise ValueError(f"unknown skip stages {unknown}; backbone has "
                       f"{sorted(backbone.feature_channels)}")
    self.backbone = backbone
    self.num_classes = num_classes
    self.skips = skips
    self.preprocessing = preprocessing
    aligned = backbone.input_multiple > 1

    def upsampler(factor_fraction):
      if factor_fraction.denominator != 1 or factor_fraction < 1:
        raise ValueError(f"stages are not an integer upsampling factor apart: {factor_fraction}")
      f = int(factor_fraction)
      return BilinearUpsample(num_classes, f, padding=f // 2 if aligned else 0,
                              learnable=learnable_upsampling, rngs=rngs)

    final = backbone.final_stage
    self.score_fr = ScoreHead(backbone.feature_channels[final], num_classes,
                              zero_init=zero_init_scores, dtype=dtype, rngs=rngs)
    heads, ups, offsets = [], [], []
    current = backbone.coord_maps[final]
    for name, scale in zip(skips, skip_scales):
      target = backbone.coord_maps[name]
      up = upsampler(target.scale / current.scale)
      current = current.then(up.coord_map())
      offsets.append(geometry.crop_offset(target, current))
      ups.append(up)
      heads.append(ScoreHead(backbone.feature_channels[name], num_classes, input_scale=scale,
                             zero_init=zero_init_scores, dtype=dtype, rngs=rngs))
    self.score_skips = nnx.List(heads)
    self.upscore_skips = nnx.List(ups)
    self.upscore_final = upsampler(1 / current.scale)
    current = current.then(self.upscore_final.coord_map())
    self.skip_offsets = tuple(offsets)
    self.final_offset = geometry.crop_offset(current, geometry.IDENTITY)

  @property
  def output_stride(self) -> int:
    return self.upscore_final.factor

  def __call__(self, x: jax.Array) -> jax.Array:
    """(N, H, W, C_in) preprocessed float -> (N, H, W, num_classes) logits."""
    h, w = x.shape[1], x.shape[2]
    m = self.backbone.input_multiple
    if m > 1:  # aligned variant: pad bottom/right to a multiple of the total stride
      x = jnp.pad(x, ((0, 0), (0, -h % m), (0, -w % m), (0, 0)))
    feats = self.backbone(x)
    final = feats[self.backbone.final_stage]
    if final.shape[1] < 1 or final.shape[2] < 1:
      raise ValueError(
          f"input {h}x{w} is too small for this backbone: its {self.backbone.final_stage} map "
          f"is empty ({final.shape[1]}x{final.shape[2]}); floor pooling shrinks maps where the "
          "reference's ceil pooling does not")
    scores = self.score_fr(final)
    for name, up, head, offset in zip(self.skips, self.upscore_skips, self.score_skips,
                                      self.skip_offsets):
      scores = fuse(up(scores), head(feats[name]), offset)
    scores = self.upscore_final(scores)
    return crop(scores, self.final_offset, h, w)


SKIPS_BY_STRIDE = {32: (), 16: ("pool4",), 8: ("pool4", "pool3"), 4: ("pool4", "pool3", "pool2"),
                   2: ("pool4", "pool3", "pool2", "pool1")}


def fcn_vgg16(num_classes: int = 21, stride: int = 8, *, width_multiplier: float = 1.0,
              aligned: bool = False, pool: str = "ceil", skip_scales=None,
              learnable_upsampling: bool = False, zero_init_scores: bool = True,
              batch_norm: bool = False, dtype=None, rngs: nnx.Rngs) -> FCN:
  """A VGG16 FCN with output stride 32, 16, 8, 4 or 2 (skips from pool4, pool3, pool2, pool1).

  ``width_multiplier`` scales every VGG width including fc6/fc7 (1/8 gives a 2.1M-parameter
  FCN-8s for CPU work); ``aligned=True`` drops the pad-100 trick (see :mod:`fcnjax.models.vgg`).
  """
  if stride not in SKIPS_BY_STRIDE:
    raise ValueError(f"stride must be one of {sorted(SKIPS_BY_STRIDE)}, got {stride}")
  backbone = VGG(width_multiplier=width_multiplier, aligned=aligned, pool=pool,
                 batch_norm=batch_norm, dtype=dtype, rngs=rngs)
  return FCN(backbone, num_classes, SKIPS_BY_STRIDE[stride], skip_scales=skip_scales,
             learnable_upsampling=learnable_upsampling, zero_init_scores=zero_init_scores,
             dtype=dtype, rngs=rngs)


def fcn32s(num_classes: int = 21, *, rngs: nnx.Rngs, **kwargs) -> FCN:
  """FCN-32s (VGG16): score fc7, upsample ×32 (kernel 64), crop at 19. See :func:`fcn_vgg16`."""
  return fcn_vgg16(num_classes, 32, rngs=rngs, **kwargs)


def fcn16s(num_classes: int = 21, *, rngs: nnx.Rngs, **kwargs) -> FCN:
  """FCN-16s (VGG16): fuse pool4 (crop 5), upsample ×16 (kernel 32), crop at 27."""
  return fcn_vgg16(num_classes, 16, rngs=rngs, **kwargs)


def fcn8s(num_classes: int = 21, *, rngs: nnx.Rngs, **kwargs) -> FCN:
  """FCN-8s (VGG16): fuse pool4 (crop 5) and pool3 (crop 9), upsample ×8, crop at 31."""
  return fcn_vgg16(num_classes, 8, rngs=rngs, **kwargs)


def fcn8s_atonce(num_classes: int = 21, *, rngs: nnx.Rngs, **kwargs) -> FCN:
  """At-once FCN-8s: as FCN-8s, with pool4 scaled ×0.01 and pool3 ×0.0001 before scoring."""
  return fcn_vgg16(num_classes, 8, skip_scales=(0.01, 0.0001), rngs=rngs, **kwargs)


def fcn4s(num_classes: int = 21, *, rngs: nnx.Rngs, **kwargs) -> FCN:
  """FCN-4s (VGG16): FCN-8s plus a pool2 skip."""
  return fcn_vgg16(num_classes, 4, rngs=rngs, **kwargs)


def fcn2s(num_classes: int = 21, *, rngs: nnx.Rngs, **kwargs) -> FCN:
  """FCN-2s (VGG16): FCN-4s plus a pool1 skip."""
  return fcn_vgg16(num_classes, 2, rngs=rngs, **kwargs)


MODELS = {"fcn32s": fcn32s, "fcn16s": fcn16s, "fcn8s": fcn8s, "fcn8s-atonce": fcn8s_atonce,
          "fcn4s": fcn4s, "fcn2s": fcn2s}


def count_params(model: nnx.Module, variable_type=nnx.Param) -> int:
  """Number of scalars in the model's variables of ``variable_type`` (learnable by default)."""
  state = nnx.state(model, variable_type)
  return sum(int(x.size) for x in jax.tree.leaves(state))
