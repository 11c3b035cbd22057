"""ResNet backbones with torchvision's structure (and Keras' pre-activation V2), NHWC, Flax NNX.

:class:`ResNet` follows ``torchvision.models.resnet``: a 7×7/2 stem conv (no bias), BatchNorm,
ReLU, a 3×3/2 max-pool (padding 1), then four stages ``layer1`` … ``layer4`` of
:class:`BasicBlock` (ResNet-18/34) or :class:`Bottleneck` (ResNet-50/101; the stride on the 3×3
conv, "ResNet v1.5"), each stage's first block with a 1×1 projection (``downsample``) where the
stride or width changes. ``replace_stride_with_dilation`` turns a stage's stride into a dilation
of the 3×3 convs from that stage on, as torchvision does (output stride 8 with
``(False, True, True)``). Attribute names are torchvision's (``conv1``, ``bn1``,
``layer1[0].conv1``, ``layer1[0].downsample[0]`` …), so a state dict maps one to one
(:mod:`fcnjax.weights.torchvision`). BatchNorm uses PyTorch's defaults: ``eps = 1e-5``, momentum
0.1 in PyTorch's convention (``running = 0.9 running + 0.1 batch``; flax ``momentum=0.9``).

:class:`PreActResNet` is the pre-activation variant of Keras' ``ResNet101V2`` (the d2l TF2
chapter): BN + ReLU before each block's convs, the stride on the *last* block of stages 1–3,
a final ``post_bn`` + ReLU.

Both follow the backbone protocol of :mod:`fcnjax.models.vgg`: ``__call__(x, mask=None) ->
{"layer1": ..., "layer4": ...}`` (torchvision: strides 4, 8, 16, 32 without dilation; Keras
V2: 8, 16, 32, 32; ``mask``: each image's pixels in a zero-padded batch, for BatchNorm over
image cells only, :mod:`fcnjax.models.masking`), ``feature_mask(mask, stage)`` (the image
cells of a feature map), ``feature_channels``, ``coord_maps``
(every conv pads ``(k - 1) / 2``·dilation, so every map is ``image / stride`` with shift 0),
``final_stage = "layer4"``, ``input_multiple = 1``, ``layer_modules()`` and
``return_intermediates`` (names: ``stem``, ``maxpool``, ``layer1.0`` … per block, and for V2
``post_bn``). Every input size ≥ 1 works: each stride-2 layer maps ``H`` to ``ceil(H / 2)``.

Input: (N, H, W, 3) float32 in ``preprocessing.TORCHVISION``'s convention (RGB, ImageNet mean
and std). Parameter counts (without ``fc``, which fcnjax never builds): ResNet-18 11,176,512,
ResNet-34 21,284,672, ResNet-50 23,508,032, ResNet-101 42,500,160.
"""

from __future__ import annotations

import collections
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fcnjax.models import geometry, masking
from fcnjax.models.taps import record
from fcnjax.models.vgg import scale_width

DEPTHS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3),
          152: (3, 8, 36, 3)}
"""Blocks per stage of each torchvision ResNet depth."""
BOTTLENECK = {18: False, 34: False, 50: True, 101: True, 152: True}
STAGE_WIDTHS = (64, 128, 256, 512)
TORCH_BN_MOMENTUM = 0.9  # flax's convention for PyTorch's momentum=0.1
TORCH_BN_EPS = 1e-5
KERAS_BN_EPS = 1.001e-5
KERAS_BN_MOMENTUM = 0.99  # Keras' BatchNormalization default (the same convention as flax's)

_kaiming_fan_out = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


def _conv(cin, cout, k, stride=1, dilation=1, *, bias=False, padding=None, dtype, rngs):
  """torchvision's ``conv3x3`` / ``conv1x1`` (padding ``dilation * (k - 1) // 2``, no bias)."""
  p = dilation * (k - 1) // 2 if padding is None else padding
  return nnx.Conv(cin, cout, (k, k), strides=stride, padding=((p, p), (p, p)),
                  kernel_dilation=dilation, use_bias=bias, kernel_init=_kaiming_fan_out,
                  dtype=dtype, rngs=rngs)


def batch_norm(features: int, *, eps: float = TORCH_BN_EPS, momentum: float = TORCH_BN_MOMENTUM,
               dtype=None, rngs) -> nnx.BatchNorm:
  """BatchNorm over the channel axis, by default with PyTorch's defaults (eps 1e-5, momentum
  0.1, i.e. flax's 0.9)."""
  return nnx.BatchNorm(features, momentum=momentum, epsilon=eps, dtype=dtype, rngs=rngs)


def keras_batch_norm(features: int, *, dtype=None, rngs) -> nnx.BatchNorm:
  """BatchNorm with the Keras ResNet V2's settings (eps 1.001e-5, momentum 0.99)."""
  return batch_norm(features, eps=KERAS_BN_EPS, momentum=KERAS_BN_MOMENTUM, dtype=dtype,
                    rngs=rngs)


def max_pool_3x3(x: jax.Array, pad_value: float = -np.inf) -> jax.Array:
  """3×3 max-pool, stride 2, padding 1 (torch pads −inf; Keras' ZeroPadding pads ``0``).
  (N, H, W, C) -> (N, ceil(H / 2), ceil(W / 2), C).

  The padding is explicit: ``reduce_window``'s own padding value is also the initial value
  of every window's max, so padding 0 there would clip every window at 0."""
  pad = ((0, 0), (1, 1), (1, 1), (0, 0))
  if pad_value != -np.inf:
    x, pad = jnp.pad(x, pad, constant_values=np.array(pad_value, x.dtype)), "VALID"
  return jax.lax.reduce_window(x, np.array(-np.inf, x.dtype), jax.lax.max, (1, 3, 3, 1),
                               (1, 2, 2, 1), pad)


def _stride_map(stride: int) -> geometry.CoordMap:
  """The map of a stride-``s`` layer whose padding centres its window (shift 0)."""
  return geometry.conv_map(3, stride, 1) if stride > 1 else geometry.IDENTITY


class BasicBlock(nnx.Module):
  """Two 3×3 convs with BN, identity (or 1×1 projection) shortcut. ``expansion = 1``."""

  expansion = 1

  def __init__(self, cin: int, planes: int, stride: int = 1, dilation: int = 1, *,
               dtype=None, rngs: nnx.Rngs):
    if dilation > 1:
      raise ValueError("BasicBlock (ResNet-18/34) does not support dilation, as in torchvision")
    self.stride = stride
    self.conv1 = _conv(cin, planes, 3, stride, dtype=dtype, rngs=rngs)
    self.bn1 = batch_norm(planes, dtype=dtype, rngs=rngs)
    self.conv2 = _conv(planes, planes, 3, dtype=dtype, rngs=rngs)
    self.bn2 = batch_norm(planes, dtype=dtype, rngs=rngs)
    self.downsample = _projection(cin, planes, stride, dtype, rngs)
    self.out_features = planes

  def __call__(self, x, mask=None):
    """``mask`` (B, H, W) bool: the image cells of ``x`` (:mod:`fcnjax.models.masking`)."""
    out_mask = masking.strided(mask, self.stride)
    identity = _shortcut(self.downsample, x, out_mask)
    y = jax.nn.relu(masking.batch_norm(self.bn1, self.conv1(x), out_mask))
    y = masking.batch_norm(self.bn2, self.conv2(y), out_mask)
    return jax.nn.relu(y + identity)


class Bottleneck(nnx.Module):
  """1×1 reduce, 3×3 (stride, dilation), 1×1 expand (×4), each with BN; projection shortcut
  where the shape changes (torchvision's v1.5 Bottleneck)."""

  expansion = 4

  def __init__(self, cin: int, planes: int, stride: int = 1, dilation: int = 1, *,
               dtype=None, rngs: nnx.Rngs):
    self.stride = stride
    out = planes * self.expansion
    self.conv1 = _conv(cin, planes, 1, dtype=dtype, rngs=rngs)
    self.bn1 = batch_norm(planes, dtype=dtype, rngs=rngs)
    self.conv2 = _conv(planes, planes, 3, stride, dilation, dtype=dtype, rngs=rngs)
    self.bn2 = batch_norm(planes, dtype=dtype, rngs=rngs)
    self.conv3 = _conv(planes, out, 1, dtype=dtype, rngs=rngs)
    self.bn3 = batch_norm(out, dtype=dtype, rngs=rngs)
    self.downsample = _projection(cin, out, stride, dtype, rngs)
    self.out_features = out

  def __call__(self, x, mask=None):
    """``mask`` (B, H, W) bool: the image cells of ``x`` (:mod:`fcnjax.models.masking`)."""
    out_mask = masking.strided(mask, self.stride)
    identity = _shortcut(self.downsample, x, out_mask)
    y = jax.nn.relu(masking.batch_norm(self.bn1, self.conv1(x), mask))
    y = jax.nn.relu(masking.batch_norm(self.bn2, self.conv2(y), out_mask))
    y = masking.batch_norm(self.bn3, self.conv3(y), out_mask)
    return jax.nn.relu(y + identity)


def _shortcut(downsample, x, out_mask):
  """The identity, or the 1×1 projection + BN (image cells ``out_mask``) of ``downsample``."""
  if downsample is None:
    return x
  return masking.batch_norm(downsample[1], downsample[0](x), out_mask)


def _projection(cin, cout, stride, dtype, rngs):
  if stride == 1 and cin == cout:
    return None
  return nnx.List([_conv(cin, cout, 1, stride, dtype=dtype, rngs=rngs),
                   batch_norm(cout, dtype=dtype, rngs=rngs)])


class _Backbone(nnx.Module):
  """The backbone protocol shared by :class:`ResNet` and :class:`PreActResNet`."""

  final_stage = "layer4"
  input_multiple = 1

  def _finish(self, stage_strides, stage_channels):
    m = geometry.compose(geometry.conv_map(7, 2, 3), geometry.conv_map(3, 2, 1))
    self.coord_maps, self.feature_channels = {}, {}
    for i, (s, c) in enumerate(zip(stage_strides, stage_channels)):
      m = m.then(_stride_map(s))
      self.coord_maps[f"layer{i + 1}"] = m
      self.feature_channels[f"layer{i + 1}"] = c
    self.output_stride = int(1 / m.scale)

  @property
  def size_ops(self) -> list:
    """The stride-2 layers as :class:`~fcnjax.models.geometry.SizeOp` s: each maps ``H`` to
    ``ceil(H / 2)`` (every other layer keeps the size)."""
    return [geometry.SizeOp(3, 2, 2)] * (self.output_stride.bit_length() - 1)

  def stages(self):
    return [self.layer1, self.layer2, self.layer3, self.layer4]

  def _blocks_out(self, x, mask, out):
    """Run the stages on ``x`` (image cells ``mask``): (last output, its mask, features)."""
    feats = {}
    for i, stage in enumerate(self.stages()):
      for j, block in enumerate(stage):
        x = record(out, f"layer{i + 1}.{j}", block(x, mask))
        mask = masking.strided(mask, block.stride)
      feats[f"layer{i + 1}"] = x
    return x, mask, feats

  def feature_mask(self, mask: jax.Array | None, stage: str) -> jax.Array | None:
    """The image cells of feature map ``stage`` given the input's ``mask`` (B, H, W) bool:
    ``mask`` subsampled by the stage's stride (every stride-2 layer maps ``n`` to
    ``ceil(n / 2)``)."""
    return masking.strided(mask, int(1 / self.coord_maps[stage].scale))

  def _block_modules(self):
    return {f"layer{i + 1}.{j}": (block,) for i, stage in enumerate(self.stages())
            for j, block in enumerate(stage)}


class ResNet(_Backbone):
  """torchvision's ResNet without its average pool and ``fc``.

  Args:
    depth: 18, 34, 50, 101 or 152 (:data:`DEPTHS`).
    width_multiplier: scales every width (the stem's 64 and each stage's planes); 1/8 gives a
      small CPU model.
    replace_stride_with_dilation: three booleans for layer2..layer4 (torchvision's argument).
    dtype: computation dtype (parameters and BN statistics stay float32).

  ``stride_per_stage`` holds each stage's stride and ``dilation_per_stage`` its dilation; the
  output stride is ``self.output_stride`` (32, or 8 with ``(False, True, True)``).
  """

  def __init__(self, depth: int = 50, *, width_multiplier: float = 1.0,
               replace_stride_with_dilation: Sequence[bool] = (False, False, False),
               in_features: int = 3, dtype=None, rngs: nnx.Rngs):
    if depth not in DEPTHS:
      raise ValueError(f"ResNet depth must be one of {sorted(DEPTHS)}, got {depth}")
    dil = tuple(bool(d) for d in replace_stride_with_dilation)
    if len(dil) != 3:
      raise ValueError(f"replace_stride_with_dilation needs 3 values, got {len(dil)}")
    block_cls = Bottleneck if BOTTLENECK[depth] else BasicBlock
    if block_cls is BasicBlock and any(dil):
      raise ValueError(f"ResNet-{depth} (BasicBlock) does not support dilation, as in "
                       "torchvision; use ResNet-50 or deeper")
    self.depth = depth
    self.width_multiplier = width_multiplier
    self.replace_stride_with_dilation = dil
    stem = scale_width(64, width_multiplier)
    self.conv1 = _conv(in_features, stem, 7, 2, dtype=dtype, rngs=rngs)
    self.bn1 = batch_norm(stem, dtype=dtype, rngs=rngs)
    cin, dilation = stem, 1
    strides, dilations, channels, stages = [], [], [], []
    for i, (n, planes) in enumerate(zip(DEPTHS[depth], STAGE_WIDTHS)):
      planes = scale_width(planes, width_multiplier)
      stride = 1 if i == 0 else 2
      previous = dilation
      if i > 0 and dil[i - 1]:
        dilation *= stride
        stride = 1
      blocks = [block_cls(cin, planes, stride, previous, dtype=dtype, rngs=rngs)]
      cin = blocks[0].out_features
      blocks += [block_cls(cin, planes, 1, dilation, dtype=dtype, rngs=rngs)
                 for _ in range(n - 1)]
      stages.append(nnx.List(blocks))
      strides.append(stride)
      dilations.append(dilation)
      channels.append(cin)
    self.layer1, self.layer2, self.layer3, self.layer4 = stages
    self.stride_per_stage = tuple(strides)
    self.dilation_per_stage = tuple(dilations)
    self._finish(strides, channels)

  def layer_modules(self) -> dict[str, tuple[nnx.Module, ...]]:
    return {"stem": (self.conv1, self.bn1), "maxpool": ()} | self._block_modules()

  def __call__(self, x: jax.Array, *, mask: jax.Array | None = None,
               return_intermediates: bool = False):
    """(N, H, W, 3) -> ``{"layer1": ..., "layer4": ...}``. ``mask`` (N, H, W) bool marks each
    image's pixels in a zero-padded batch: BatchNorm then uses image cells only
    (:func:`fcnjax.models.masking.batch_norm`)."""
    out = collections.OrderedDict()
    mask = masking.strided(mask, 2)
    x = record(out, "stem", jax.nn.relu(masking.batch_norm(self.bn1, self.conv1(x), mask)))
    mask = masking.strided(mask, 2)  # (a window at the image's edge may reach a cell beyond it)
    x = record(out, "maxpool", masking.zero_outside(max_pool_3x3(x), mask))
    _, _, feats = self._blocks_out(x, mask, out)
    return (feats, out) if return_intermediates else feats


class PreActBottleneck(nnx.Module):
  """Keras' ``block2`` (ResNet V2): BN + ReLU first, 1×1 (no bias), 3×3 with the stride (no
  bias), 1×1 expand (bias); shortcut a 1×1 conv of the pre-activation (first block of a stage)
  or a stride-``s`` subsampling of the input."""

  expansion = 4

  def __init__(self, cin: int, planes: int, stride: int = 1, *, conv_shortcut: bool,
               dtype=None, rngs: nnx.Rngs):
    out = planes * self.expansion
    self.stride = stride
    self.preact_bn = keras_batch_norm(cin, dtype=dtype, rngs=rngs)
    self.shortcut = (_conv(cin, out, 1, stride, bias=True, dtype=dtype, rngs=rngs)
                     if conv_shortcut else None)
    self.conv1 = _conv(cin, planes, 1, dtype=dtype, rngs=rngs)
    self.bn1 = keras_batch_norm(planes, dtype=dtype, rngs=rngs)
    self.conv2 = _conv(planes, planes, 3, stride, dtype=dtype, rngs=rngs)
    self.bn2 = keras_batch_norm(planes, dtype=dtype, rngs=rngs)
    self.conv3 = _conv(planes, out, 1, bias=True, dtype=dtype, rngs=rngs)
    self.out_features = out

  def __call__(self, x, mask=None):
    """``mask`` (B, H, W) bool: the image cells of ``x`` (:mod:`fcnjax.models.masking`). The
    output is not zeroed outside them (``conv3`` and the shortcut have a bias): every layer
    that reads it spatially reads a BatchNorm's output."""
    out_mask = masking.strided(mask, self.stride)
    pre = jax.nn.relu(masking.batch_norm(self.preact_bn, x, mask))
    if self.shortcut is not None:
      identity = self.shortcut(pre)
    else:
      identity = _subsample(x, self.stride)
    y = jax.nn.relu(masking.batch_norm(self.bn1, self.conv1(pre), mask))
    y = jax.nn.relu(masking.batch_norm(self.bn2, self.conv2(y), out_mask))
    return self.conv3(y) + identity


def _subsample(x: jax.Array, stride: int) -> jax.Array:
  """Every ``stride``-th row and column of (N, H, W, C): Keras' ``MaxPooling2D(1, strides)``.
  As a window-1 ``reduce_window`` its output length has the conv's form ``(H - 1) // s + 1``,
  which ``jax.export`` can match with the residual branch's for symbolic H (a slice's
  ``ceil(H / s)`` it cannot)."""
  if stride == 1:
    return x
  return jax.lax.reduce_window(x, np.array(-np.inf, x.dtype), jax.lax.max, (1, 1, 1, 1),
                               (1, stride, stride, 1), "VALID")


class PreActResNet(_Backbone):
  """Keras' ResNet V2 (``ResNet50V2`` / ``101V2`` / ``152V2``) without its top, NHWC.

  Stem: 7×7/2 conv with bias (no BN: V2 normalises inside the blocks), a 3×3/2 max-pool over
  zero padding (Keras' ``ZeroPadding2D``); stages of :class:`PreActBottleneck` with the stride
  on each of stages 1–3's *last* block; ``post_bn`` + ReLU after ``layer4`` (its output is the
  ``layer4`` feature). BatchNorm eps 1.001e-5 and momentum 0.99 (Keras'). Output stride 32.
  """

  def __init__(self, depth: int = 101, *, width_multiplier: float = 1.0, in_features: int = 3,
               dtype=None, rngs: nnx.Rngs):
    if depth not in (50, 101, 152):
      raise ValueError(f"pre-activation ResNet depth must be 50, 101 or 152, got {depth}")
    self.depth = depth
    self.width_multiplier = width_multiplier
    stem = scale_width(64, width_multiplier)
    self.conv1 = _conv(in_features, stem, 7, 2, bias=True, dtype=dtype, rngs=rngs)
    cin = stem
    strides, channels, stages = [], [], []
    for i, (n, planes) in enumerate(zip(DEPTHS[depth], STAGE_WIDTHS)):
      planes = scale_width(planes, width_multiplier)
      last_stride = 2 if i < 3 else 1
      blocks = []
      for j in range(n):
        stride = last_stride if j == n - 1 else 1
        blocks.append(PreActBottleneck(cin, planes, stride, conv_shortcut=(j == 0),
                                       dtype=dtype, rngs=rngs))
        cin = blocks[-1].out_features
      stages.append(nnx.List(blocks))
      strides.append(last_stride)
      channels.append(cin)
    self.layer1, self.layer2, self.layer3, self.layer4 = stages
    self.post_bn = keras_batch_norm(cin, dtype=dtype, rngs=rngs)
    # Keras' stride sits on a stage's last block: stage i's output is at the stride of the
    # stem times the strides of stages < i and i itself, as for torchvision (shift 0 either way).
    self._finish(strides, channels)

  def layer_modules(self) -> dict[str, tuple[nnx.Module, ...]]:
    return ({"stem": (self.conv1,), "maxpool": ()} | self._block_modules()
            | {"post_bn": (self.post_bn,)})

  def __call__(self, x: jax.Array, *, mask: jax.Array | None = None,
               return_intermediates: bool = False):
    """As :meth:`ResNet.__call__`; with ``mask`` the stem's output is also zeroed outside the
    image cells (its max-pool reads it, as Keras' over zero padding)."""
    out = collections.OrderedDict()
    mask = masking.strided(mask, 2)
    x = record(out, "stem", masking.zero_outside(self.conv1(x), mask))
    mask = masking.strided(mask, 2)
    x = record(out, "maxpool", masking.zero_outside(max_pool_3x3(x, pad_value=0.0), mask))
    x, mask, feats = self._blocks_out(x, mask, out)
    x = record(out, "post_bn", jax.nn.relu(masking.batch_norm(self.post_bn, x, mask)))
    feats["layer4"] = x
    return (feats, out) if return_intermediates else feats


def resnet(depth: int, *, width_multiplier: float = 1.0,
           replace_stride_with_dilation: Sequence[bool] = (False, False, False), dtype=None,
           rngs: nnx.Rngs) -> ResNet:
  """A torchvision-structured ResNet backbone of ``depth`` (18, 34, 50, 101, 152)."""
  return ResNet(depth, width_multiplier=width_multiplier,
                replace_stride_with_dilation=replace_stride_with_dilation, dtype=dtype, rngs=rngs)
