"""VGG backbones for FCN, exactly as the Caffe reference (or the "aligned" variant). NHWC.

The reference VGG16 body: five :class:`~fcnjax.models.layers.ConvBlock` stages of 3×3 convs
(64,64 | 128,128 | 256×3 | 512×3 | 512×3) each ending in a 2×2/2 ceil-mode max-pool, with
**conv1_1 padded by 100**; then fc6 as a 7×7 conv to 4096 (padding 0) and fc7 as a 1×1 conv to
4096, each followed by ReLU and dropout 0.5.

The *aligned* variant drops the pad-100 trick: conv1_1 pads 1, fc6 pads 3 ("SAME"), and the model
pads its input to a multiple of 32 (``input_multiple``). Same output contract, far fewer FLOPs,
but the reference weights are trained for the exact variant.

A backbone is any NNX module with this protocol, which :class:`~fcnjax.models.fcn.FCN` consumes:

* ``__call__(x) -> dict[str, Array]``: named feature maps (``"pool1"`` … ``"pool5"``, ``"fc7"``).
  Optionally a ``mask`` keyword ((N, H, W) bool, each image's pixels in a zero-padded batch:
  :mod:`fcnjax.models.masking`) and ``feature_mask(mask, stage)`` giving the image cells of a
  feature map (the ResNets), with which :class:`~fcnjax.models.fcn.FCN` masks its heads too.
  Optionally ``__call__(x, return_intermediates=True) -> (features, out)``, ``out`` an ordered
  dict of per-layer outputs, and ``layer_modules()`` naming the modules behind them (used by
  ``FCN(..., return_intermediates=True)`` and :mod:`fcnjax.models.summary`).
* ``feature_channels: dict[str, int]`` and ``coord_maps: dict[str, CoordMap]`` (image -> map).
* ``final_stage: str`` (the map FCN scores first) and ``input_multiple: int``.
"""

from __future__ import annotations

import collections
from typing import Sequence

import jax
from flax import nnx

from fcnjax.models import cpu_ops, geometry, masking
from fcnjax.models.layers import ConvBlock, conv_general_dilated_for
from fcnjax.models.taps import record

VGG16_DEPTHS = (2, 2, 3, 3, 3)
VGG16_WIDTHS = (64, 128, 256, 512, 512)
VGG16_FC_WIDTH = 4096


def scale_width(width: int, multiplier: float) -> int:
  """``round(width * multiplier)``, at least 1."""
  return max(1, int(round(width * multiplier)))


class VGG(nnx.Module):
  """VGG feature extractor with fc6/fc7 as convolutions.

  Args:
    depths: convs per stage (VGG16: ``(2, 2, 3, 3, 3)``).
    widths: channels per stage (VGG16: ``(64, 128, 256, 512, 512)``).
    fc_width: channels of fc6/fc7 (VGG16: 4096).
    width_multiplier: scales ``widths`` and ``fc_width`` (e.g. 1/8 for CPU work and tests).
    aligned: the aligned variant (no pad 100, SAME fc6, input multiple of 32).
    pool: ``"ceil"`` (Caffe; required for the exact variant's crops) or ``"floor"``.
    batch_norm: BatchNorm after each 3×3 conv (VGG16-BN style).
    dropout: dropout rate after fc6 and fc7 (reference 0.5).
    in_features: input channels (3).
    dtype: computation dtype, e.g. ``jnp.bfloat16`` (parameters stay float32).
    ops: ``"cpu"``, ``"lax"`` or ``"auto"`` (by JAX's default backend): the implementation of
      the max-pools and of fc6/fc7's convolution (:mod:`fcnjax.models.cpu_ops`), resolved here
      and stored as ``self.ops``.

  Input (N, H, W, in_features) float -> dict of feature maps; with ``aligned=False`` and an
  H×W input, ``pool5`` is ceil((H + 198) / 32) high and ``fc7`` 6 less.
  ``vgg(x, return_intermediates=True)`` returns ``(features, out)``: ``out`` is an ordered dict
  of each layer's output as passed on (``conv1_1`` … ``conv5_3``, ``pool1`` … ``pool5``,
  ``fc6``, ``fc7``; after ReLU and dropout).
  """

  def __init__(self, *, depths: Sequence[int] = VGG16_DEPTHS,
               widths: Sequence[int] = VGG16_WIDTHS, fc_width: int = VGG16_FC_WIDTH,
               width_multiplier: float = 1.0, aligned: bool = False, pool: str = "ceil",
               batch_norm: bool = False, dropout: float = 0.5, in_features: int = 3,
               dtype=None, ops: str = "auto", rngs: nnx.Rngs):
    self.ops = cpu_ops.resolve_ops(ops)
    widths = [scale_width(w, width_multiplier) for w in widths]
    fc_width = scale_width(fc_width, width_multiplier)
    self.aligned = aligned
    self.input_multiple = 2 ** len(depths) if aligned else 1
    blocks = []
    c = in_features
    for i, (d, w) in enumerate(zip(depths, widths)):
      first_padding = 100 if (i == 0 and not aligned) else 1
      blocks.append(ConvBlock(c, [w] * d, first_padding=first_padding, pool=pool,
                              batch_norm=batch_norm, dtype=dtype, ops=self.ops, rngs=rngs))
      c = w
    self.blocks = nnx.List(blocks)
    fc6_pad = 3 if aligned else 0
    # With ops="cpu", fc6 / fc7 take cpu_ops' convolution, whose input gradient is a matrix
    # product: XLA:CPU lowers fc6's input gradient with the cotangent as the window, which is
    # slow (see cpu_ops and benchmarks/RESULTS.md).
    conv = conv_general_dilated_for(self.ops)
    self.fc6 = nnx.Conv(c, fc_width, (7, 7), padding=((fc6_pad, fc6_pad),) * 2, dtype=dtype,
                        conv_general_dilated=conv, rngs=rngs)
    self.fc7 = nnx.Conv(fc_width, fc_width, (1, 1), padding="VALID", dtype=dtype,
                        conv_general_dilated=conv, rngs=rngs)
    self.drop6 = nnx.Dropout(dropout, rngs=rngs)
    self.drop7 = nnx.Dropout(dropout, rngs=rngs)

    names = [f"pool{i + 1}" for i in range(len(blocks))]
    self.final_stage = "fc7"
    self.feature_channels = {n: w for n, w in zip(names, widths)} | {"fc7": fc_width}
    maps, m = {}, geometry.IDENTITY
    for n, block in zip(names, blocks):
      m = m.then(block.coord_map())
      maps[n] = m
    maps["fc7"] = m.then(geometry.conv_map(7, 1, fc6_pad)).then(geometry.conv_map(1, 1, 0))
    self.coord_maps = maps

  @property
  def size_ops(self) -> list:
    """The layers as :class:`~fcnjax.models.geometry.SizeOp` s: the input rounded up to
    ``input_multiple``, each block's convs and pool, fc6, fc7."""
    ops = [geometry.SizeOp(multiple=self.input_multiple)] if self.input_multiple > 1 else []
    for block in self.blocks:
      ops += block.size_ops()
    return ops + [geometry.SizeOp(7, 1, 6 if self.aligned else 0), geometry.SizeOp(1)]

  def layer_modules(self) -> dict[str, tuple[nnx.Module, ...]]:
    """The modules with parameters behind each of ``__call__``'s intermediates (by name)."""
    mods = {}
    for i, block in enumerate(self.blocks):
      mods |= {_layer_name(i, k): v for k, v in block.layer_modules().items()}
    return mods | {"fc6": (self.fc6,), "fc7": (self.fc7,)}

  def __call__(self, x: jax.Array, *, mask: jax.Array | None = None,
               return_intermediates: bool = False):
    """``mask`` (N, H, W) bool marks each image's pixels in a zero-padded batch; with
    ``batch_norm`` its BatchNorms then use the cells a lone run of the image has
    (:func:`fcnjax.models.masking.valid_masks` over :attr:`size_ops`)."""
    feats, out = {}, collections.OrderedDict()
    masks = (masking.valid_masks(mask, self.size_ops)
             if mask is not None and self.blocks[0].norms is not None else None)
    first = 1 if self.input_multiple > 1 else 0  # size_ops[0] rounds up to input_multiple
    for i, block in enumerate(self.blocks):
      block_masks = None if masks is None else masks[first:first + len(block.convs)]
      first += len(block.size_ops())
      x, block_out = block(x, masks=block_masks, return_intermediates=True,
                           name_of=lambda k, i=i: _layer_name(i, k))
      out.update((_layer_name(i, k), v) for k, v in block_out.items())
      feats[f"pool{i + 1}"] = x
    x = record(out, "fc6", self.drop6(jax.nn.relu(self.fc6(x))))
    x = record(out, "fc7", self.drop7(jax.nn.relu(self.fc7(x))))
    feats["fc7"] = x
    return (feats, out) if return_intermediates else feats


def _layer_name(stage: int, block_name: str) -> str:
  """The paper's name of a :class:`ConvBlock` intermediate: ``conv<s>_<i>`` or ``pool<s>``."""
  if block_name == "pool":
    return f"pool{stage + 1}"
  return f"conv{stage + 1}_{block_name[len('conv'):]}"


def vgg16(*, width_multiplier: float = 1.0, aligned: bool = False, pool: str = "ceil",
          batch_norm: bool = False, dtype=None, ops: str = "auto", rngs: nnx.Rngs) -> VGG:
  """The reference FCN VGG16 backbone (134.3M parameters at full width with fc6/fc7)."""
  return VGG(width_multiplier=width_multiplier, aligned=aligned, pool=pool,
             batch_norm=batch_norm, dtype=dtype, ops=ops, rngs=rngs)
