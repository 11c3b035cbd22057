"""The fully convolutional *classifier*: images of any size -> class logits, padding ignored.

A Keras tutorial (a "fully convolutional network for image classification", five classes of
images about 30 px high and 300 px wide) builds it as conv blocks (conv + dropout + BN + ReLU), a
1x1 conv to the classes instead of a dense layer, global max (or average) pooling and a softmax.
Here:

* :class:`ConvStack` - the tutorial's conv blocks (``VALID`` 3x3 convs, strides 1, 1, 2, 2, 2;
  widths 32 ... 512, configurable), the default backbone. It follows the backbone protocol of
  :mod:`fcnjax.models.vgg` (``feature_channels``, ``coord_maps``, ``final_stage``,
  ``input_multiple``, ``size_ops``), so VGG16 and the ResNets work as backbones too.
* :class:`FCNClassifier` - backbone + the tutorial's head (1x1 conv + dropout + BN + ReLU, 1x1
  conv to the classes + BN) + **masked** global pooling: ``model(x, mask=...)`` pools each image
  only over the score cells its own pixels produce, so a zero-padded batch gives each image the
  logits it gets alone at its own size (exactly so for :class:`ConvStack`, whose valid convs
  never read the padding; for backbones with padded convs the pooled cells are the image's own,
  but cells at its bottom / right edge see the padding zeros where a lone run sees the conv's
  zero padding).
* :func:`fcn_classifier` - the named constructor; :func:`min_input_size` - the smallest input a
  model accepts, from its layers' geometry (:class:`~fcnjax.models.geometry.SizeOp`).

Shapes: images (B, H, W, C_in) NHWC float; mask (B, H, W) bool, True on each image's pixels,
which must be its top-left h x w rectangle (the size buckets' zero padding is at the bottom and
right); logits (B, num_classes) float32.
"""

from __future__ import annotations

import collections
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from fcnjax import preprocessing as preprocessing_lib
from fcnjax.models import geometry, masking
from fcnjax.models.taps import record

TUTORIAL_WIDTHS = (32, 64, 128, 256, 512)
"""The tutorial's conv widths."""
TUTORIAL_STRIDES = (1, 1, 2, 2, 2)
"""The tutorial's conv strides (its convs are ``VALID`` 3x3)."""
TUTORIAL_HEAD_WIDTH = 64
"""The tutorial's "fully connected" 1x1 conv width."""
POOLINGS = ("max", "avg")


class InputTooSmall(ValueError):
  """An input smaller than the model's minimum input size (the message names both)."""


def _bn(features: int, *, dtype, rngs) -> nnx.BatchNorm:
  # Keras' BatchNormalization: momentum 0.99, epsilon 1e-3.
  return nnx.BatchNorm(features, momentum=0.99, epsilon=1e-3, dtype=dtype, rngs=rngs)


class ConvStack(nnx.Module):
  """The tutorial's conv blocks: per block ``VALID`` conv (k x k, stride) + dropout + BN + ReLU.

  Args:
    widths: output channels per block (default :data:`TUTORIAL_WIDTHS`).
    strides: stride per block (default :data:`TUTORIAL_STRIDES`).
    kernel_size: the convs' window (3).
    dropout: dropout rate after each conv (the tutorial's 0.2).
    batch_norm: BatchNorm after each dropout (the tutorial's, Keras' momentum / epsilon).
    width_multiplier: scales ``widths`` (at least 1 channel each).
    in_features: input channels (3).

  ``stack(x, mask=None)`` -> ``{"features": (B, h', w', widths[-1])}``; with
  ``return_intermediates=True`` also the ordered dict of each block's output (``block1`` ...).
  ``mask`` (B, H, W) bool only restricts the BatchNorm statistics in training to real pixels
  (:func:`~fcnjax.models.masking.valid_masks`). Output length per axis: ``floor((n - k) / s) +
  1`` per block.
  """

  def __init__(self, *, widths: Sequence[int] = TUTORIAL_WIDTHS,
               strides: Sequence[int] = TUTORIAL_STRIDES, kernel_size: int = 3,
               dropout: float = 0.2, batch_norm: bool = True, width_multiplier: float = 1.0,
               in_features: int = 3, dtype=None, rngs: nnx.Rngs):
    if len(widths) != len(strides) or not widths:
      raise ValueError(f"widths {tuple(widths)} and strides {tuple(strides)} need the same "
                       "length >= 1")
    widths = [max(1, int(round(w * width_multiplier))) for w in widths]
    self.widths, self.strides, self.kernel_size = tuple(widths), tuple(strides), kernel_size
    convs, norms, drops = [], [], []
    c = in_features
    for w, s in zip(widths, strides):
      convs.append(nnx.Conv(c, w, (kernel_size, kernel_size), strides=s, padding="VALID",
                            dtype=dtype, rngs=rngs))
      norms.append(_bn(w, dtype=dtype, rngs=rngs) if batch_norm else None)
      drops.append(nnx.Dropout(dropout, rngs=rngs))
      c = w
    self.convs = nnx.List(convs)
    self.norms = nnx.List(norms) if batch_norm else None
    self.drops = nnx.List(drops)
    self.final_stage = "features"
    self.feature_channels = {"features": c}
    self.input_multiple = 1
    m = geometry.IDENTITY
    for s in strides:
      m = m.then(geometry.conv_map(kernel_size, s, 0))
    self.coord_maps = {"features": m}

  @property
  def size_ops(self) -> list:
    return [geometry.SizeOp(self.kernel_size, s) for s in self.strides]

  def layer_modules(self) -> dict[str, tuple[nnx.Module, ...]]:
    norms = self.norms if self.norms is not None else [None] * len(self.convs)
    return {f"block{i + 1}": tuple(m for m in (conv, norm) if m is not None)
            for i, (conv, norm) in enumerate(zip(self.convs, norms))}

  def __call__(self, x: jax.Array, *, mask: jax.Array | None = None,
               return_intermediates: bool = False):
    out = collections.OrderedDict()
    masks = masking.valid_masks(mask, self.size_ops) if mask is not None else None
    norms = self.norms if self.norms is not None else [None] * len(self.convs)
    for i, (conv, norm, drop) in enumerate(zip(self.convs, norms, self.drops)):
      x = drop(conv(x))
      x = jax.nn.relu(masking.batch_norm(norm, x, None if masks is None else masks[i]))
      x = record(out, f"block{i + 1}", x)
    feats = {"features": x}
    return (feats, out) if return_intermediates else feats


def masked_global_pool(x: jax.Array, valid: jax.Array | None, pooling: str) -> jax.Array:
  """Global ``"max"`` / ``"avg"`` pooling of (B, H, W, C) over the cells where ``valid``
  (B, H, W) is True (all cells when ``None``) -> (B, C); 0 for an example with no valid cell."""
  if valid is None:
    return jnp.max(x, axis=(1, 2)) if pooling == "max" else jnp.mean(x, axis=(1, 2))
  v = valid[..., None]
  count = jnp.sum(v, axis=(1, 2))
  if pooling == "max":
    pooled = jnp.max(jnp.where(v, x, -jnp.inf), axis=(1, 2))
  else:
    pooled = jnp.sum(jnp.where(v, x, 0), axis=(1, 2)) / jnp.maximum(count, 1)
  return jnp.where(count > 0, pooled, 0)


class FCNClassifier(nnx.Module):
  """Backbone + 1x1-conv head + masked global pooling: (B, H, W, 3) -> (B, num_classes) logits.

  Args:
    backbone: a module of the backbone protocol (:class:`ConvStack`, :class:`~fcnjax.models.vgg.
      VGG`, :class:`~fcnjax.models.resnet.ResNet`, ...) with ``size_ops``.
    num_classes: output classes.
    pooling: ``"max"`` (the tutorial's) or ``"avg"``.
    head_width: channels of the "fully connected" 1x1 conv (None: straight to the classes).
    dropout: dropout of the head (the tutorial's 0.2).
    batch_norm: BatchNorm in the head (after the 1x1 convs, as the tutorial).
    (``model.preprocessing``: Caffe's convention with VGG16, torchvision's otherwise.)
    masked: use ``mask`` (default). ``False`` ignores it: padding is pooled and enters the
      BatchNorm statistics like pixels - the tutorial's way, kept for comparison only.

  ``model(x, mask=None)``: ``mask`` (B, H, W) bool marks each image's top-left rectangle in a
  zero-padded batch; each image is pooled over the cells its own pixels produce (``None``: every
  image fills ``x``). Inputs are zero-padded at the bottom / right to ``backbone.input_multiple``
  here (VGG aligned). An input smaller than :func:`min_input_size` raises :class:`InputTooSmall`.
  ``return_intermediates=True`` returns ``(logits, out)``: the backbone's intermediates plus
  ``"head"`` and ``"scores"`` (B, h', w', num_classes), the map that is pooled.
  """

  task = "classification"

  def __init__(self, backbone: nnx.Module, num_classes: int, *, pooling: str = "max",
               head_width: int | None = TUTORIAL_HEAD_WIDTH, dropout: float = 0.2,
               batch_norm: bool = True, masked: bool = True, dtype=None, rngs: nnx.Rngs):
    if pooling not in POOLINGS:
      raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    if not hasattr(backbone, "size_ops"):
      raise ValueError(f"{type(backbone).__name__} has no size_ops: the classifier needs the "
                       "backbone's geometry to find each image's cells")
    self.backbone = backbone
    self.num_classes = int(num_classes)
    self.pooling = pooling
    # the input convention: Caffe's for VGG16 (as its ImageNet weights), torchvision's (RGB / 255,
    # ImageNet mean / std) for the ResNets and the conv stack
    self.preprocessing = (preprocessing_lib.CAFFE if type(backbone).__name__ == "VGG"
                          else preprocessing_lib.TORCHVISION)
    self.masked = masked
    c = backbone.feature_channels[backbone.final_stage]
    if head_width:
      self.head = nnx.Conv(c, head_width, (1, 1), dtype=dtype, rngs=rngs)
      self.head_norm = _bn(head_width, dtype=dtype, rngs=rngs) if batch_norm else None
      c = head_width
    else:
      self.head = self.head_norm = None
    self.drop = nnx.Dropout(dropout, rngs=rngs)
    self.score = nnx.Conv(c, self.num_classes, (1, 1), dtype=dtype, rngs=rngs)
    self.score_norm = _bn(self.num_classes, dtype=dtype, rngs=rngs) if batch_norm else None
    self.score_drop = nnx.Dropout(dropout, rngs=rngs)

  @property
  def size_ops(self) -> list:
    return list(self.backbone.size_ops)

  def layer_modules(self) -> dict[str, tuple[nnx.Module, ...]]:
    mods = dict(self.backbone.layer_modules()) if hasattr(self.backbone, "layer_modules") else {}
    if self.head is not None:
      mods["head"] = tuple(m for m in (self.head, self.head_norm) if m is not None)
    mods["scores"] = tuple(m for m in (self.score, self.score_norm) if m is not None)
    return mods

  def __call__(self, x: jax.Array, *, mask: jax.Array | None = None,
               return_intermediates: bool = False):
    _, H, W, _ = x.shape
    check_input_size(self, H, W)
    if not self.masked:  # the tutorial's way: padding is pooled and normalised like pixels
      mask = None
    if mask is not None and tuple(mask.shape) != tuple(x.shape[:3]):
      raise ValueError(f"mask has shape {tuple(mask.shape)}, images {tuple(x.shape)}: the mask "
                       "must be (B, H, W)")
    m = self.backbone.input_multiple
    if m > 1 and (H % m or W % m):
      pad = ((0, 0), (0, -H % m), (0, -W % m), (0, 0))
      x = jnp.pad(x, pad)
      if mask is None:  # the padding is not the image's
        mask = jnp.ones(x.shape[:1] + (H, W), bool)
      mask = jnp.pad(mask, pad[:3])
    feats, out = self.backbone(x, mask=mask, return_intermediates=True)
    f = feats[self.backbone.final_stage]
    valid = None if mask is None else masking.valid_cells(mask, self.size_ops, f.shape)
    if self.head is not None:
      f = self.drop(self.head(f))
      f = record(out, "head", jax.nn.relu(masking.batch_norm(self.head_norm, f, valid)))
    s = self.score_drop(self.score(f))
    s = record(out, "scores", masking.batch_norm(self.score_norm, s, valid))
    logits = masked_global_pool(s, valid, self.pooling).astype(jnp.float32)
    return (logits, out) if return_intermediates else logits


def min_input_size(model) -> tuple[int, int]:
  """The smallest (height, width) ``model`` accepts: every layer's output is at least 1x1.

  Computed from the layers' geometry (``model.size_ops``, else ``model.backbone.size_ops``:
  :func:`~fcnjax.models.geometry.min_input_length`), not by running the model. 1 x 1 for the
  segmentation models (their convs are padded), e.g. 19 x 19 for the tutorial's classifier."""
  ops = getattr(model, "size_ops", None)
  if ops is None:
    ops = getattr(getattr(model, "backbone", None), "size_ops", None)
  if ops is None:
    raise ValueError(f"{type(model).__name__} has no size_ops (nor its backbone): its minimum "
                     "input size is unknown")
  n = geometry.min_input_length(ops)
  return n, n


def check_input_size(model, height: int, width: int) -> None:
  """Raise :class:`InputTooSmall` naming the minimum if ``height x width`` is below it."""
  mh, mw = min_input_size(model)
  if height < mh or width < mw:
    raise InputTooSmall(f"input {height}x{width} is smaller than the minimum input size "
                        f"{mh}x{mw} of this {type(model).__name__} (every side must be >= "
                        f"{min(mh, mw)} px)")


BACKBONES = ("convstack", "vgg16", "resnet18", "resnet34", "resnet50", "resnet101")


def fcn_classifier(num_classes: int = 5, *, backbone: str = "convstack",
                   pooling: str = "max", widths: Sequence[int] = TUTORIAL_WIDTHS,
                   strides: Sequence[int] = TUTORIAL_STRIDES,
                   head_width: int | None = TUTORIAL_HEAD_WIDTH, dropout: float = 0.2,
                   batch_norm: bool = True, masked: bool = True, width_multiplier: float = 1.0,
                   aligned: bool = True,
                   dtype=None, ops: str = "auto", seed: int = 0,
                   rngs: nnx.Rngs | None = None) -> FCNClassifier:
  """The tutorial's classifier (``backbone="convstack"``, widths / strides / dropout / BN as
  given), or the same head on ``"vgg16"`` (``aligned``: the aligned variant, input padded to
  a multiple of 32) or a torchvision ResNet (``"resnet18"`` ... ``"resnet101"``), each scaled by
  ``width_multiplier``. ``rngs`` default: ``nnx.Rngs(params=seed, dropout=seed + 1)``."""
  if rngs is None:
    rngs = nnx.Rngs(params=seed, dropout=seed + 1)
  if backbone == "convstack":
    bb = ConvStack(widths=widths, strides=strides, dropout=dropout, batch_norm=batch_norm,
                   width_multiplier=width_multiplier, dtype=dtype, rngs=rngs)
  elif backbone == "vgg16":
    from fcnjax.models.vgg import vgg16
    bb = vgg16(width_multiplier=width_multiplier, aligned=aligned, dtype=dtype, ops=ops,
               rngs=rngs)
  elif backbone.startswith("resnet") and backbone[len("resnet"):].isdigit():
    from fcnjax.models.resnet import ResNet
    bb = ResNet(int(backbone[len("resnet"):]), width_multiplier=width_multiplier, dtype=dtype,
                rngs=rngs)
  else:
    raise ValueError(f"unknown classifier backbone {backbone!r}; known: {', '.join(BACKBONES)}")
  return FCNClassifier(bb, num_classes, pooling=pooling, head_width=head_width, dropout=dropout,
                       batch_norm=batch_norm, masked=masked, dtype=dtype, rngs=rngs)
