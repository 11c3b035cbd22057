"""Segmentation heads on ResNet backbones: torchvision's FCN-ResNet, the d2l FCN, FCN skips.

* :class:`TorchvisionFCN` (:func:`fcn_resnet50`, :func:`fcn_resnet101`): torchvision's
  ``segmentation.fcn_resnet*``: a dilated ResNet (output stride 8), :class:`FCNHead` on
  ``layer4``, logits resized to the input with :func:`resize_bilinear` (PyTorch's
  ``interpolate(mode="bilinear", align_corners=False)``), and an optional auxiliary
  :class:`FCNHead` on ``layer3`` used only in training (loss weight 0.5 in torchvision's
  recipe; ``model(x, return_aux=True)``).
* :class:`D2LFCN` (:func:`d2l_fcn_resnet18`, :func:`d2l_fcn_resnet101v2`): the d2l chapter's
  network: ResNet-18 without pooling and classifier, a 1×1 conv to the classes, one learnable
  transposed conv (kernel 64, stride 32, padding 16) initialised to bilinear interpolation. The
  TF2 version uses Keras' pre-activation ResNet-101 V2 and a ReLU after the 1×1 conv.
* :func:`fcn_resnet`: the paper's FCN skip architecture on a ResNet through the general
  :class:`~fcnjax.models.fcn.FCN` (e.g. FCN-8s fusing ``layer3`` and ``layer2``): upsampling
  factors and crops are derived from the ResNet's coordinate maps.

Every model maps (N, H, W, 3) input in ``preprocessing.TORCHVISION``'s convention to (N, H, W,
num_classes) logits for any H, W ≥ 1.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fcnjax import preprocessing as preprocessing_lib
from fcnjax.models import masking, resnet as resnet_lib
from fcnjax.models.fcn import FCN
from fcnjax.models.layers import bilinear_kernel, transposed_conv
from fcnjax.models.taps import record


@functools.lru_cache(maxsize=256)
def _interp_matrix(out_size: int, in_size: int) -> np.ndarray:
  """(out_size, in_size) float32 weights of PyTorch's bilinear resize along one axis
  (``align_corners=False``: ``src = (dst + 0.5) in / out - 0.5``, clamped at 0)."""
  scale = np.float32(in_size) / np.float32(out_size)
  src = np.maximum((np.arange(out_size, dtype=np.float32) + 0.5) * scale - 0.5, 0)
  i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  i1 = np.minimum(i0 + 1, in_size - 1)
  lam = (src - i0).astype(np.float32)
  m = np.zeros((out_size, in_size), np.float32)
  np.add.at(m, (np.arange(out_size), i0), 1 - lam)
  np.add.at(m, (np.arange(out_size), i1), lam)
  return m


def _interp_matrix_symbolic(out_size, in_size, dtype) -> jax.Array:
  """:func:`_interp_matrix` built in jax, for sizes that are symbolic dimensions (a
  ``jax.export`` with symbolic H, W): the same float32 arithmetic, one-hot rows."""
  scale = jnp.asarray(in_size, jnp.float32) / jnp.asarray(out_size, jnp.float32)
  src = jnp.maximum((jnp.arange(out_size, dtype=jnp.float32) + 0.5) * scale - 0.5, 0)
  i0 = jnp.minimum(jnp.floor(src).astype(jnp.int32), in_size - 1)
  i1 = jnp.minimum(i0 + 1, in_size - 1)
  lam = src - i0.astype(jnp.float32)
  cols = jnp.arange(in_size, dtype=jnp.int32)[None, :]
  m = ((1 - lam)[:, None] * (cols == i0[:, None]) + lam[:, None] * (cols == i1[:, None]))
  return m.astype(dtype)


def _weights(out_size, in_size, dtype) -> jax.Array:
  if isinstance(out_size, int) and isinstance(in_size, int):
    return jnp.asarray(_interp_matrix(out_size, in_size), dtype)
  return _interp_matrix_symbolic(out_size, in_size, dtype)


def resize_bilinear(x: jax.Array, height, width) -> jax.Array:
  """(N, h, w, C) -> (N, height, width, C), exactly PyTorch's ``F.interpolate(x, size=(height,
  width), mode="bilinear", align_corners=False)`` (to float rounding): two small matrix
  products with the interpolation weights. Sizes are ints (weights from numpy, cached) or
  symbolic dimensions of ``jax.export`` (weights computed in the program, same arithmetic)."""
  mh = _weights(height, x.shape[1], x.dtype)
  mw = _weights(width, x.shape[2], x.dtype)
  x = jnp.einsum("oh,nhwc->nowc", mh, x)
  return jnp.einsum("pw,nowc->nopc", mw, x)


def _interp_matrices_per_image(out_sizes, in_sizes, out_len: int, in_len: int, dtype):
  """(B, out_len, in_len) weights of :func:`_interp_matrix` for per-image ``out_sizes`` and
  ``in_sizes`` ((B,) int arrays): rows ``>= out_size`` and columns ``>= in_size`` of an image
  are zero. The same float32 arithmetic as :func:`_interp_matrix`."""
  out_f = jnp.maximum(out_sizes, 1).astype(jnp.float32)[:, None]
  in_i = jnp.maximum(in_sizes, 1)[:, None]
  scale = in_i.astype(jnp.float32) / out_f
  src = jnp.maximum((jnp.arange(out_len, dtype=jnp.float32)[None] + 0.5) * scale - 0.5, 0)
  i0 = jnp.minimum(jnp.floor(src).astype(jnp.int32), in_i - 1)
  i1 = jnp.minimum(i0 + 1, in_i - 1)
  lam = src - i0.astype(jnp.float32)
  cols = jnp.arange(in_len, dtype=jnp.int32)[None, None, :]
  m = ((1 - lam)[..., None] * (cols == i0[..., None])
       + lam[..., None] * (cols == i1[..., None]))
  rows = jnp.arange(out_len)[None, :, None] < out_sizes[:, None, None]
  return jnp.where(rows, m, 0).astype(dtype)


def resize_bilinear_masked(x: jax.Array, valid: jax.Array, mask: jax.Array) -> jax.Array:
  """Each image of a zero-padded batch resized on its own: (N, h, w, C) -> (N, H, W, C).

  ``valid`` (N, h, w) bool marks each image's cells of ``x`` and ``mask`` (N, H, W) bool its
  pixels of the output (top-left rectangles, :mod:`fcnjax.models.masking`). Image ``n``'s
  pixels get :func:`resize_bilinear` of its own ``h_n x w_n`` cells to its own ``H_n x W_n``
  size, exactly what it gets alone; every other pixel is 0. (A plain resize of the padded map
  would stretch each image's cells by the bucket's ratio instead of its own.)"""
  h_in, w_in = masking.image_sizes(valid)
  h_out, w_out = masking.image_sizes(mask)
  mh = _interp_matrices_per_image(h_out, h_in, mask.shape[1], x.shape[1], x.dtype)
  mw = _interp_matrices_per_image(w_out, w_in, mask.shape[2], x.shape[2], x.dtype)
  x = jnp.einsum("noh,nhwc->nowc", mh, x)
  return jnp.einsum("npw,nowc->nopc", mw, x)


class FCNHead(nnx.Module):
  """torchvision's ``FCNHead``: 3×3 conv to ``in // 4`` (no bias), BN, ReLU, dropout 0.1, 1×1
  conv to the classes. (N, h, w, in) -> (N, h, w, num_classes). Attributes ``conv``, ``bn``,
  ``classifier`` (torchvision's ``0``, ``1``, ``4``)."""

  def __init__(self, in_features: int, num_classes: int, *, dropout: float = 0.1, dtype=None,
               rngs: nnx.Rngs):
    inter = max(1, in_features // 4)
    self.conv = nnx.Conv(in_features, inter, (3, 3), padding=((1, 1), (1, 1)), use_bias=False,
                         dtype=dtype, rngs=rngs)
    self.bn = resnet_lib.batch_norm(inter, dtype=dtype, rngs=rngs)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)
    self.classifier = nnx.Conv(inter, num_classes, (1, 1), padding="VALID", dtype=dtype,
                               rngs=rngs)

  def __call__(self, x, mask=None):
    """``mask`` (N, h, w) bool: the image cells of ``x`` (:mod:`fcnjax.models.masking`)."""
    y = jax.nn.relu(masking.batch_norm(self.bn, self.conv(x), mask))
    return self.classifier(self.dropout(y))


class TorchvisionFCN(nnx.Module):
  """torchvision's FCN-ResNet: ``backbone`` (a dilated :class:`~fcnjax.models.resnet.ResNet`),
  ``classifier`` (:class:`FCNHead` on ``layer4``), ``aux_classifier`` (on ``layer3``, or
  ``None``).

  ``model(x)`` -> (N, H, W, num_classes) logits; ``model(x, return_aux=True)`` -> ``(logits,
  aux_logits)`` (``aux_logits`` is ``None`` without the aux head); with
  ``return_intermediates=True`` also the backbone's intermediates (``(logits, out)``).
  ``mask`` (N, H, W) bool marks each image's pixels in a zero-padded batch: BatchNorm uses its
  cells only and each image's scores are resized to its own size
  (:func:`resize_bilinear_masked`; logits are 0 on padding).
  """

  resizes_to_input_size = True
  """The logits are the scores resized to the whole input's size: zero-padding an image without
  its mask stretches its scores by the padded size's ratio (exports record this)."""

  def __init__(self, backbone: resnet_lib.ResNet, num_classes: int = 21, *, aux: bool = True,
               dtype=None, rngs: nnx.Rngs):
    self.backbone = backbone
    self.num_classes = num_classes
    self.preprocessing = preprocessing_lib.TORCHVISION
    self.classifier = FCNHead(backbone.feature_channels["layer4"], num_classes, dtype=dtype,
                              rngs=rngs)
    self.aux_classifier = (FCNHead(backbone.feature_channels["layer3"], num_classes,
                                   dtype=dtype, rngs=rngs) if aux else None)
    self.output_stride = backbone.output_stride

  def layer_modules(self) -> dict[str, tuple[nnx.Module, ...]]:
    mods = dict(self.backbone.layer_modules()) | {"classifier": (self.classifier,),
                                                  "resize": ()}
    if self.aux_classifier is not None:
      mods["aux_classifier"] = (self.aux_classifier,)
    return mods

  def __call__(self, x: jax.Array, *, mask: jax.Array | None = None, return_aux: bool = False,
               return_intermediates: bool = False):
    h, w = x.shape[1], x.shape[2]
    if return_intermediates:
      feats, out = self.backbone(x, mask=mask, return_intermediates=True)
    else:
      feats, out = self.backbone(x, mask=mask), {}
    masks = {s: self.backbone.feature_mask(mask, s) for s in ("layer3", "layer4")}

    def resize(scores, stage):
      if mask is None:
        return resize_bilinear(scores, h, w)
      return resize_bilinear_masked(scores, masks[stage], mask)

    if return_intermediates and self.aux_classifier is not None:
      # its own row in summaries (not part of the logits)
      out["aux_classifier"] = self.aux_classifier(feats["layer3"], masks["layer3"])
    scores = record(out, "classifier", self.classifier(feats["layer4"], masks["layer4"]))
    logits = record(out, "resize", resize(scores, "layer4"))
    if return_intermediates:
      return logits, out
    if not return_aux:
      return logits
    if self.aux_classifier is None:
      return logits, None
    return logits, resize(self.aux_classifier(feats["layer3"], masks["layer3"]), "layer3")


def fcn_resnet50(num_classes: int = 21, *, aux: bool = True, width_multiplier: float = 1.0,
                 dtype=None, rngs: nnx.Rngs) -> TorchvisionFCN:
  """torchvision's ``fcn_resnet50``: 35,322,218 parameters at 21 classes with the aux head,
  32,957,013 without."""
  bb = resnet_lib.ResNet(50, width_multiplier=width_multiplier,
                         replace_stride_with_dilation=(False, True, True), dtype=dtype, rngs=rngs)
  return TorchvisionFCN(bb, num_classes, aux=aux, dtype=dtype, rngs=rngs)


def fcn_resnet101(num_classes: int = 21, *, aux: bool = True, width_multiplier: float = 1.0,
                  dtype=None, rngs: nnx.Rngs) -> TorchvisionFCN:
  """torchvision's ``fcn_resnet101`` (dilated ResNet-101, output stride 8)."""
  bb = resnet_lib.ResNet(101, width_multiplier=width_multiplier,
                         replace_stride_with_dilation=(False, True, True), dtype=dtype, rngs=rngs)
  return TorchvisionFCN(bb, num_classes, aux=aux, dtype=dtype, rngs=rngs)


class TransposedConv(nnx.Module):
  """A learnable per-class transposed conv (kernel ``2 stride``, torch's ``ConvTranspose2d``
  with bias), ``kernel`` (2s, 2s, C, C) in scatter layout initialised to bilinear interpolation
  on the diagonal, ``bias`` (C,) zero. (N, h, w, C) -> (N, (h - 1) s + 2s - 2p, ..., C)."""

  def __init__(self, channels: int, stride: int, padding: int, *, dtype=None):
    self.stride, self.padding, self.dtype = stride, padding, dtype
    self.kernel = nnx.Param(jnp.asarray(bilinear_kernel(stride, channels)))
    self.bias = nnx.Param(jnp.zeros((channels,), jnp.float32))

  def __call__(self, x):
    dt = self.dtype or x.dtype
    y = transposed_conv(x.astype(dt), self.kernel[...].astype(dt), self.stride, self.padding)
    return y + self.bias[...].astype(dt)


class D2LFCN(nnx.Module):
  """The d2l FCN: ``backbone`` features at ``layer4`` (stride 32), ``final_conv`` (1×1 to the
  classes, with bias; a ReLU after it with ``relu_after_score``, the TF2 version), and
  ``transpose_conv``: a learnable transposed conv, kernel 64, stride 32, padding 16, with bias,
  initialised to per-class bilinear interpolation (d2l's ``bilinear_kernel``) and zero bias.

  d2l runs it on 320×480 crops, where the output is exactly the input size. For any other size
  the transposed conv gives ``32 ceil(H / 32)`` rows and fcnjax keeps the top-left H×W (for
  multiples of 32 that is the whole output: d2l's network unchanged). d2l's kernel and padding
  put output pixel ``o`` at layer-4 coordinate ``(o - 15.5) / 32``, a 15.5-pixel shift against
  the backbone's grid; fcnjax reproduces it rather than correcting it, so that d2l-trained
  weights mean what they meant. ``mask`` (N, H, W) bool marks each image's pixels in a
  zero-padded batch: BatchNorm uses its cells only and the 1×1 conv's output is zeroed outside
  them (as a lone run, whose transposed conv sees no cell beyond the image's).
  """

  def __init__(self, backbone: nnx.Module, num_classes: int = 21, *,
               relu_after_score: bool = False, dtype=None, rngs: nnx.Rngs):
    self.backbone = backbone
    self.num_classes = num_classes
    self.relu_after_score = relu_after_score
    # Keras' ResNet V2 weights expect inputs in [-1, 1]; torchvision's ResNets their mean / std
    self.preprocessing = (preprocessing_lib.KERAS_TF
                          if isinstance(backbone, resnet_lib.PreActResNet)
                          else preprocessing_lib.TORCHVISION)
    c = backbone.feature_channels["layer4"]
    self.final_conv = nnx.Conv(c, num_classes, (1, 1), padding="VALID", dtype=dtype, rngs=rngs)
    stride = backbone.output_stride  # 32
    self.transpose_conv = TransposedConv(num_classes, stride, stride // 2, dtype=dtype)

  def layer_modules(self) -> dict[str, tuple[nnx.Module, ...]]:
    return dict(self.backbone.layer_modules()) | {"final_conv": (self.final_conv,),
                                                  "transpose_conv": (self.transpose_conv,),
                                                  "crop": ()}

  def __call__(self, x: jax.Array, *, mask: jax.Array | None = None,
               return_intermediates: bool = False):
    h, w = x.shape[1], x.shape[2]
    if return_intermediates:
      feats, out = self.backbone(x, mask=mask, return_intermediates=True)
    else:
      feats, out = self.backbone(x, mask=mask), {}
    y = self.final_conv(feats["layer4"])
    if self.relu_after_score:
      y = jax.nn.relu(y)
    y = masking.zero_outside(y, self.backbone.feature_mask(mask, "layer4"))
    y = record(out, "final_conv", y)
    y = record(out, "transpose_conv", self.transpose_conv(y))
    logits = record(out, "crop", y[:, :h, :w, :])
    return (logits, out) if return_intermediates else logits


def d2l_fcn_resnet18(num_classes: int = 21, *, width_multiplier: float = 1.0, dtype=None,
                     rngs: nnx.Rngs) -> D2LFCN:
  """The d2l (PyTorch) FCN on ResNet-18: 12,993,642 parameters at 21 classes."""
  bb = resnet_lib.ResNet(18, width_multiplier=width_multiplier, dtype=dtype, rngs=rngs)
  return D2LFCN(bb, num_classes, dtype=dtype, rngs=rngs)


def d2l_fcn_resnet101v2(num_classes: int = 21, *, width_multiplier: float = 1.0, dtype=None,
                        rngs: nnx.Rngs) -> D2LFCN:
  """The d2l TF2 FCN: Keras' ResNet-101 V2, 1×1 conv + ReLU, the same transposed conv."""
  bb = resnet_lib.PreActResNet(101, width_multiplier=width_multiplier, dtype=dtype, rngs=rngs)
  return D2LFCN(bb, num_classes, relu_after_score=True, dtype=dtype, rngs=rngs)


def fcn_resnet(depth: int = 50, num_classes: int = 21,
               skips: Sequence[str] = ("layer3", "layer2"), *, width_multiplier: float = 1.0,
               learnable_upsampling: bool = False, zero_init_scores: bool = True, dtype=None,
               ops: str = "auto", rngs: nnx.Rngs) -> FCN:
  """The paper's FCN on a ResNet (no dilation): score ``layer4``, fuse the ``skips`` coarse to
  fine (FCN-8s: ``layer3``, ``layer2``), with torchvision's preprocessing."""
  bb = resnet_lib.ResNet(depth, width_multiplier=width_multiplier, dtype=dtype, rngs=rngs)
  return FCN(bb, num_classes, skips, learnable_upsampling=learnable_upsampling,
             zero_init_scores=zero_init_scores, preprocessing=preprocessing_lib.TORCHVISION,
             dtype=dtype, ops=ops, rngs=rngs)
