"""Fully Convolutional Networks: a backbone, 1×1 score heads, skip fusion, bilinear upsampling.

:class:`FCN` is general: give it any backbone (see :mod:`fcnjax.models.vgg` for the protocol) and
the list of skip stages, coarse to fine. FCN-32s has no skips, FCN-16s skips ``pool4``, FCN-8s
``pool4, pool3``, and FCN-4s / FCN-2s add ``pool2`` / ``pool1``. Upsampling factors and every crop
offset are derived from the backbone's coordinate maps (:mod:`fcnjax.models.geometry`).

Input: (N, H, W, 3) float32 in the convention of ``model.preprocessing`` (default: the Caffe
reference's BGR, 0–255, minus the mean; see :mod:`fcnjax.preprocessing`). Output: (N, H, W,
num_classes) logits, for any H, W ≥ 1; ``model(x, return_intermediates=True)`` returns
``(logits, out)`` with the named intermediates (:meth:`FCN.__call__`).

The named variants (``fcn32s`` … ``fcn2s``, ``fcn8s-atonce``) and :func:`build_model` are in
:mod:`fcnjax.models.registry`.
"""

from __future__ import annotations

import collections
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from fcnjax import preprocessing as preprocessing_lib
from fcnjax.models import cpu_ops, geometry, masking
from fcnjax.models.layers import BilinearUpsample, ScoreHead, crop, fuse
from fcnjax.models.taps import record
from fcnjax.models.vgg import VGG


class FCN(nnx.Module):
  """An FCN head on a backbone.

  Args:
    backbone: a module following the backbone protocol of :mod:`fcnjax.models.vgg` (VGG16, or
      a ResNet of :mod:`fcnjax.models.resnet`, whose skips are ``layer3``, ``layer2``, ...).
    num_classes: number of output classes (21 for VOC).
    skips: skip stages from coarse to fine, e.g. ``("pool4", "pool3")`` for FCN-8s.
    skip_scales: optional fixed input scale per skip (at-once FCN-8s: ``(0.01, 0.0001)``).
    learnable_upsampling: learn the transposed convs (the reference keeps them fixed bilinear).
    zero_init_scores: zero-initialise the score heads, as the reference.
    preprocessing: the input convention the weights expect (``fcnjax.preprocessing``).
    dtype: computation dtype of the score heads (parameters stay float32).
    ops: the score heads' convolution, ``"cpu"``, ``"lax"`` or ``"auto"`` (by JAX's default
      backend; see :mod:`fcnjax.models.cpu_ops`), resolved here and stored as ``self.ops``.
      The backbone has its own (:func:`fcn_vgg16` passes the same to both).

  Attributes ``skip_offsets`` (one per skip) and ``final_offset`` hold the derived crop offsets;
  ``upscore_names`` the names of the upsampling steps in the intermediates (one per skip, then
  the final one): ``upscore_fr`` upsamples ``score_fr``, ``upscore_<skip>`` the fusion with
  ``<skip>``.
  """

  def __init__(self, backbone: nnx.Module, num_classes: int = 21,
               skips: Sequence[str] = ("pool4", "pool3"), *,
               skip_scales: Sequence[float | None] | None = None,
               learnable_upsampling: bool = False, zero_init_scores: bool = True,
               preprocessing: preprocessing_lib.Preprocessing = preprocessing_lib.CAFFE,
               dtype=None, ops: str = "auto", rngs: nnx.Rngs):
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
    self.ops = cpu_ops.resolve_ops(ops)
    self.backbone_takes_mask = masking.takes_mask(backbone)
    self.upscore_names = tuple(f"upscore_{s}" for s in ("fr",) + skips)
    aligned = backbone.input_multiple > 1

    def upsampler(current, target):
      """The upsampling from grid ``current`` to ``target``'s scale, and the crop offset.

      The paper's even bilinear kernel where it aligns the grids to a whole pixel (VGG);
      otherwise the centred odd one (grids centred on the image, as ResNet's)."""
      factor_fraction = target.scale / current.scale
      if factor_fraction.denominator != 1 or factor_fraction < 1:
        raise ValueError(f"stages are not an integer upsampling factor apart: {factor_fraction}")
      f = int(factor_fraction)
      for centered in (False, True):
        up = BilinearUpsample(num_classes, f, padding=f // 2 if aligned else 0,
                              learnable=learnable_upsampling, centered=centered, rngs=rngs)
        try:
          return up, geometry.crop_offset(target, current.then(up.coord_map()))
        except ValueError:
          continue
      raise ValueError(f"no bilinear upsampling by {f} aligns grid {current} with {target}")

    final = backbone.final_stage
    self.score_fr = ScoreHead(backbone.feature_channels[final], num_classes,
                              zero_init=zero_init_scores, dtype=dtype, ops=self.ops, rngs=rngs)
    heads, ups, offsets = [], [], []
    current = backbone.coord_maps[final]
    for name, scale in zip(skips, skip_scales):
      target = backbone.coord_maps[name]
      up, offset = upsampler(current, target)
      # offset >= 0: the skip's map is cropped and the fused map is the upsampled grid; < 0:
      # the upsampled map is cropped to the skip's grid (layers.fuse)
      current = current.then(up.coord_map()) if offset >= 0 else target
      offsets.append(offset)
      ups.append(up)
      heads.append(ScoreHead(backbone.feature_channels[name], num_classes, input_scale=scale,
                             zero_init=zero_init_scores, dtype=dtype, ops=self.ops, rngs=rngs))
    self.score_skips = nnx.List(heads)
    self.upscore_skips = nnx.List(ups)
    self.upscore_final, neg_offset = upsampler(current, geometry.IDENTITY)
    current = current.then(self.upscore_final.coord_map())
    self.skip_offsets = tuple(offsets)
    self.final_offset = -neg_offset
    if self.final_offset < 0:
      raise ValueError(f"the final upsampled map starts inside the image (offset "
                       f"{self.final_offset}); this backbone's geometry cannot be cropped")

  @property
  def output_stride(self) -> int:
    return self.upscore_final.factor

  def layer_modules(self) -> dict[str, tuple[nnx.Module, ...]]:
    """The modules with parameters behind each intermediate of ``__call__``, by name.

    Every parameter of the model belongs to exactly one entry (the backbone's included, when it
    has ``layer_modules``).
    """
    mods = dict(self.backbone.layer_modules()) if hasattr(self.backbone, "layer_modules") else {}
    mods["score_fr"] = (self.score_fr,)
    ups = list(self.upscore_skips) + [self.upscore_final]
    for i, (up_name, up) in enumerate(zip(self.upscore_names, ups)):
      mods[up_name] = (up,)
      if i < len(self.skips):
        mods[f"score_{self.skips[i]}"] = (self.score_skips[i],)
    return mods

  def __call__(self, x: jax.Array, *, mask: jax.Array | None = None,
               return_intermediates: bool = False):
    """(N, H, W, C_in) preprocessed float -> (N, H, W, num_classes) logits.

    ``mask`` (N, H, W) bool marks each image's pixels in a zero-padded batch (the trainer's
    size buckets); it goes to the backbone, whose BatchNorms (ResNet, VGG16-BN) then use image
    cells only (:mod:`fcnjax.models.masking`; a backbone without a ``mask`` parameter does
    not get it). On a backbone that maps the mask to its feature
    grids (``feature_mask``: the ResNets) the score maps and fusions are also zeroed outside
    each image's cells, so every image gets its lone logits; on VGG, near its bottom / right
    edge an image's logits see the padding's scores through the upsampling.

    With ``return_intermediates=True``: ``(logits, out)``, ``out`` an ordered dict of the
    forward's named intermediates in the order computed: ``pad`` (aligned variant only), the
    backbone's (``conv1_1`` … ``pool5``, ``fc6``, ``fc7`` for VGG; the backbone must then accept
    ``return_intermediates``, see :mod:`fcnjax.models.vgg`),
    ``score_fr``, then per skip ``upscore_<source>``, ``score_<skip>``, ``fuse_<skip>``, then
    the final ``upscore_<source>`` and ``crop`` (the logits). Recording them adds no operation.
    """
    out = collections.OrderedDict()
    h, w = x.shape[1], x.shape[2]
    m = self.backbone.input_multiple
    if m > 1:  # aligned variant: pad bottom/right to a multiple of the total stride
      # m * ceil(h / m) - h (= -h % m), in a form that stays simple for symbolic h (jax.export)
      pad = ((0, 0), (0, m * ((h + m - 1) // m) - h), (0, m * ((w + m - 1) // m) - w))
      x = record(out, "pad", jnp.pad(x, pad + ((0, 0),)))
      mask = None if mask is None else jnp.pad(mask, pad)
    kw = {"mask": mask} if self.backbone_takes_mask else {}
    if return_intermediates:
      feats, backbone_out = self.backbone(x, return_intermediates=True, **kw)
      out.update(backbone_out)
    else:
      feats = self.backbone(x, **kw)
    final = feats[self.backbone.final_stage]
    if final.shape[1] < 1 or final.shape[2] < 1:
      raise ValueError(
          f"input {h}x{w} is too small for this backbone: its {self.backbone.final_stage} map "
          f"is empty ({final.shape[1]}x{final.shape[2]}); floor pooling shrinks maps where the "
          "reference's ceil pooling does not")
    feature_mask = getattr(self.backbone, "feature_mask", None)

    def image_cells_only(x, stage):
      """``x`` on ``stage``'s grid, zero outside the images' cells (when they are known)."""
      if mask is None or feature_mask is None:
        return x
      return masking.zero_outside(x, feature_mask(mask, stage))

    scores = record(out, "score_fr",
                    image_cells_only(self.score_fr(final), self.backbone.final_stage))
    for name, up_name, up, head, offset in zip(self.skips, self.upscore_names, self.upscore_skips,
                                               self.score_skips, self.skip_offsets):
      scores = record(out, up_name, up(scores))
      skip_scores = record(out, f"score_{name}", image_cells_only(head(feats[name]), name))
      scores = fuse(scores, skip_scores, offset)
      if offset < 0:  # the fusion is on the skip's grid
        scores = image_cells_only(scores, name)
      scores = record(out, f"fuse_{name}", scores)
    scores = record(out, self.upscore_names[-1], self.upscore_final(scores))
    logits = record(out, "crop", crop(scores, self.final_offset, h, w))
    return (logits, out) if return_intermediates else logits


def fcn_vgg16(num_classes: int = 21, skips: Sequence[str] = ("pool4", "pool3"), *,
              skip_scales: Sequence[float | None] | None = None, width_multiplier: float = 1.0,
              aligned: bool = False, pool: str = "ceil", learnable_upsampling: bool = False,
              zero_init_scores: bool = True, batch_norm: bool = False, dtype=None,
              ops: str = "auto", rngs: nnx.Rngs) -> FCN:
  """An FCN on the VGG16 backbone with the given skip stages (coarse to fine, from ``pool4``,
  ``pool3``, ``pool2``, ``pool1``); the named variants are in :mod:`fcnjax.models.registry`.

  ``width_multiplier`` scales every VGG width including fc6/fc7 (1/8 gives a 2.1M-parameter
  FCN-8s for CPU work); ``aligned=True`` drops the pad-100 trick (see :mod:`fcnjax.models.vgg`);
  ``ops`` (``"auto"``, ``"cpu"``, ``"lax"``) is resolved once and used by backbone and heads.
  """
  ops = cpu_ops.resolve_ops(ops)
  backbone = VGG(width_multiplier=width_multiplier, aligned=aligned, pool=pool,
                 batch_norm=batch_norm, dtype=dtype, ops=ops, rngs=rngs)
  return FCN(backbone, num_classes, skips, skip_scales=skip_scales,
             learnable_upsampling=learnable_upsampling, zero_init_scores=zero_init_scores,
             dtype=dtype, ops=ops, rngs=rngs)


def count_params(model: nnx.Module, variable_type=nnx.Param) -> int:
  """Number of scalars in the model's variables of ``variable_type`` (learnable by default)."""
  state = nnx.state(model, variable_type)
  return sum(int(x.size) for x in jax.tree.leaves(state))
