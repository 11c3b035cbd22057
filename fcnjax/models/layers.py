"""FCN building blocks as Flax NNX modules. All tensors are NHWC.

* :class:`ConvBlock` — VGG-style ``n × (3×3 conv + ReLU)`` then a 2×2/2 max-pool (ceil or floor).
* :class:`ScoreHead` — 1×1 conv to ``num_classes`` (zero-initialised, as the reference).
* :func:`max_pool_2x2_for` / :func:`conv_general_dilated_for` — the op implementations a module
  stores for its ``ops`` choice (``"auto"``, ``"cpu"``, ``"lax"``; see :mod:`fcnjax.models.cpu_ops`).
* :class:`BilinearUpsample` — transposed conv by an integer factor, bilinear-initialised.
* :func:`crop` / :func:`fuse` — crop a score map at an offset, and crop-then-sum skip fusion.

Each layer also reports its :mod:`~fcnjax.models.geometry` coordinate map, so models derive crop
offsets from the layers themselves.
"""

from __future__ import annotations

import collections
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fcnjax.models import cpu_ops, geometry, masking
from fcnjax.models.taps import record


def _check_rounding(rounding: str) -> None:
  if rounding not in ("ceil", "floor"):
    raise ValueError(f"rounding must be 'ceil' or 'floor', got {rounding!r}")


def _ceil_pad(d) -> int:
  """Bottom/right padding of ceil-mode 2×2/2 pooling along a dim of size ``d``: ``d % 2``.

  A symbolic ``d`` (``jax.export`` shape polymorphism) gets 1 instead: the same output size
  ``ceil(d / 2)`` and values (for even ``d`` the padded row is in no window), and a size that
  stays ``floordiv(d - 1, 2) + 1`` rather than nesting ``mod`` terms that shape checks
  downstream cannot decide.
  """
  return 1 if jax.export.is_symbolic_dim(d) else d % 2


def max_pool_2x2(x: jax.Array, rounding: str = "ceil") -> jax.Array:
  """2×2 max-pool, stride 2, on NHWC ``x``, as a plain ``lax.reduce_window`` (``ops="lax"``).

  ``rounding="ceil"`` is Caffe's pooling: an odd H (or W) gives ``(H + 1) // 2`` rows, the last
  window seeing one real row (implemented by padding −inf at the bottom/right).
  ``rounding="floor"`` is Flax/PyTorch's default (``H // 2``; the last odd row is dropped).
  In a tied window the gradient goes to the first maximal element in row-major order.
  """
  _check_rounding(rounding)
  h, w = x.shape[1], x.shape[2]
  pad = ((0, 0), (0, _ceil_pad(h)), (0, _ceil_pad(w)), (0, 0)) if rounding == "ceil" else "VALID"
  return jax.lax.reduce_window(x, np.array(-np.inf, x.dtype), jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), pad)


def max_pool_2x2_cpu(x: jax.Array, rounding: str = "ceil") -> jax.Array:
  """:func:`max_pool_2x2` for ``ops="cpu"``: the same values and gradients (ties included).

  Floating-point inputs go to :func:`fcnjax.models.cpu_ops.max_pool_2x2` (a reshape + max with
  a mask backward, avoiding XLA:CPU's slow select-and-scatter); others to ``reduce_window``.
  """
  _check_rounding(rounding)
  if jnp.issubdtype(x.dtype, jnp.floating):
    return cpu_ops.max_pool_2x2(x, rounding)
  return max_pool_2x2(x, rounding)


_MAX_POOLS = {"cpu": max_pool_2x2_cpu, "lax": max_pool_2x2}
_CONVS = {"cpu": cpu_ops.conv_general_dilated, "lax": jax.lax.conv_general_dilated}


def max_pool_2x2_for(ops: str):
  """The 2×2/2 max-pool ``(x, rounding) -> y`` for ``ops`` (``"auto"``, ``"cpu"`` or ``"lax"``)."""
  return _MAX_POOLS[cpu_ops.resolve_ops(ops)]


def conv_general_dilated_for(ops: str):
  """The ``conv_general_dilated`` for ``nnx.Conv`` under ``ops`` (``"auto"``, ``"cpu"``, ``"lax"``).

  ``"cpu"``: :func:`fcnjax.models.cpu_ops.conv_general_dilated`, which routes only stride-1
  non-3×3 convolutions to its custom-VJP conv and passes the rest to ``lax`` unchanged.
  """
  return _CONVS[cpu_ops.resolve_ops(ops)]


def _bias_border(y: jax.Array, bias: jax.Array, extra: int) -> jax.Array:
  """Grow a 3×3 conv's output computed with padding 2 to the output with padding ``2 + extra``.

  With a padding of p > 2 (the reference conv1_1: 100) every output pixel more than 2 px
  outside the image sees only zeros, so it is exactly the bias. The conv is therefore run with
  padding 2 on the image alone (``y``: (N, H + 2, W + 2, C), bias included) and surrounded by
  ``extra`` pixels of bias: (N, H + 2 + 2·extra, W + 2 + 2·extra, C). Same numbers as padding by
  p (to float rounding: the sums are the same terms) for (H + 2)(W + 2) instead of
  (H + 2p − 2)(W + 2p − 2) conv pixels (4.4× fewer at 160×192); the weight gradient sees only
  the image region too. Used on every backend (it saves FLOPs everywhere); the CPU timings are
  in ``benchmarks/RESULTS.md``.
  """
  n, h, w, c = y.shape
  hf, wf = h + 2 * extra, w + 2 * extra
  rows = jax.lax.broadcasted_iota(jnp.int32, (1, hf, wf, 1), 1)
  cols = jax.lax.broadcasted_iota(jnp.int32, (1, hf, wf, 1), 2)
  inside = (rows >= extra) & (rows < extra + h) & (cols >= extra) & (cols < extra + w)
  padded = jnp.pad(y, ((0, 0), (extra, extra), (extra, extra), (0, 0)))
  return jnp.where(inside, padded, bias.astype(y.dtype))


class ConvBlock(nnx.Module):
  """VGG-style block: ``len(features)`` × (3×3 conv + [BatchNorm] + ReLU + [dropout]), then pool.

  Args:
    in_features: input channels.
    features: output channels of each 3×3 conv, e.g. ``(64, 64)``.
    first_padding: spatial padding of the first conv (the reference's conv1_1 uses 100); the
      others use 1.
    pool: ``"ceil"`` (Caffe, default), ``"floor"``, or ``None`` for no pooling.
    batch_norm: add BatchNorm after each conv.
    dropout: dropout rate after each ReLU (0 disables).
    dtype: computation dtype (parameters stay float32).
    ops: the max-pool implementation, ``"cpu"`` (:func:`max_pool_2x2_cpu`), ``"lax"``
      (:func:`max_pool_2x2`) or ``"auto"`` (by JAX's default backend), resolved here and stored
      as ``self.ops`` / ``self.max_pool``. The 3×3 convs use ``lax`` either way.

  Input (N, H, W, in_features) -> output (N, H', W', features[-1]) with H' = ceil(H'' / 2) for
  ceil pooling, where H'' = H + 2 * (first_padding - 1) is the conv stack's output height.
  ``block(x, return_intermediates=True)`` returns ``(y, out)``, ``out`` an ordered dict of what
  each layer passes on: ``"conv1"``, ``"conv2"``, ... and ``"pool"``.
  """

  def __init__(self, in_features: int, features: Sequence[int], *, first_padding: int = 1,
               pool: str | None = "ceil", batch_norm: bool = False, dropout: float = 0.0,
               dtype=None, ops: str = "auto", rngs: nnx.Rngs):
    if pool is not None:
      _check_rounding(pool)
    self.pool = pool
    self.first_padding = first_padding
    self.ops = cpu_ops.resolve_ops(ops)
    self.max_pool = max_pool_2x2_for(self.ops)
    convs, norms = [], []
    c = in_features
    for i, f in enumerate(features):
      # A first padding above 2 is mostly applied after the conv (see ``__call__``).
      p = min(first_padding, 1) if i == 0 else 1
      convs.append(nnx.Conv(c, f, (3, 3), padding=((p, p), (p, p)), dtype=dtype, rngs=rngs))
      if batch_norm:
        norms.append(nnx.BatchNorm(f, dtype=dtype, rngs=rngs))
      c = f
    self.convs = nnx.List(convs)
    self.norms = nnx.List(norms) if batch_norm else None
    self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout > 0 else None
    self.out_features = c

  def coord_map(self) -> geometry.CoordMap:
    """Coordinate map from this block's input grid to its output grid."""
    maps = [geometry.conv_map(3, 1, self.first_padding if i == 0 else 1)
            for i in range(len(self.convs))]
    if self.pool is not None:
      maps.append(geometry.conv_map(2, 2, 0))
    return geometry.compose(*maps)

  def size_ops(self) -> list:
    """The block's layers as :class:`~fcnjax.models.geometry.SizeOp` s (output lengths)."""
    ops = [geometry.SizeOp(3, 1, 2 * (self.first_padding if i == 0 else 1))
           for i in range(len(self.convs))]
    if self.pool is not None:
      ops.append(geometry.SizeOp(2, 2, 0, ceil=self.pool == "ceil"))
    return ops

  def layer_modules(self) -> dict[str, tuple[nnx.Module, ...]]:
    """The modules with parameters behind each intermediate: ``{"conv1": (conv, [norm]), ...}``."""
    norms = self.norms if self.norms is not None else [None] * len(self.convs)
    return {f"conv{i + 1}": tuple(m for m in (conv, norm) if m is not None)
            for i, (conv, norm) in enumerate(zip(self.convs, norms))}

  def __call__(self, x: jax.Array, *, masks=None, return_intermediates: bool = False,
               name_of=None):
    """``name_of`` maps a local intermediate name (``"conv1"``, ``"pool"``) to the model-wide
    one that :func:`fcnjax.models.taps.perturbed` uses (default: the local name). ``masks``:
    one (N, H_i, W_i) bool mask of image cells per conv output (:mod:`fcnjax.models.masking`),
    for the BatchNorms; ``None`` for none."""
    out = collections.OrderedDict()
    name_of = name_of or (lambda k: k)
    if self.first_padding >= 2:
      # Padding 2 as an explicit pad of 1 plus the conv's own 1: the same numbers, but with
      # padding inside the op XLA:CPU's weight-gradient convolution is very slow (see
      # benchmarks/RESULTS.md).
      x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    for i, conv in enumerate(self.convs):
      x = conv(x)
      if i == 0 and self.first_padding > 2:
        x = _bias_border(x, conv.bias[...], self.first_padding - 2)
      if self.norms is not None:
        x = masking.batch_norm(self.norms[i], x, None if masks is None else masks[i])
      x = jax.nn.relu(x)
      if self.dropout is not None:
        x = self.dropout(x)
      x = record(out, name_of(f"conv{i + 1}"), x, key=f"conv{i + 1}")
    if self.pool is not None:
      x = self.max_pool(x, self.pool)
      x = record(out, name_of("pool"), x, key="pool")
    return (x, out) if return_intermediates else x


class ScoreHead(nnx.Module):
  """1×1 conv from ``in_features`` to ``num_classes`` logits.

  Zero-initialised by default, as the reference's score layers. ``input_scale`` multiplies the
  input first by a fixed constant (the at-once FCN-8s uses 0.01 for pool4 and 0.0001 for pool3).
  ``ops`` (``"auto"``, ``"cpu"`` or ``"lax"``) picks the convolution
  (:func:`conv_general_dilated_for`), resolved here and stored as ``self.ops``.
  Input (N, H, W, in_features) -> (N, H, W, num_classes).
  """

  def __init__(self, in_features: int, num_classes: int, *, input_scale: float | None = None,
               zero_init: bool = True, dtype=None, ops: str = "auto", rngs: nnx.Rngs):
    init = nnx.initializers.zeros_init() if zero_init else nnx.initializers.lecun_normal()
    self.input_scale = input_scale
    self.ops = cpu_ops.resolve_ops(ops)
    self.conv = nnx.Conv(in_features, num_classes, (1, 1), padding="VALID", kernel_init=init,
                         conv_general_dilated=conv_general_dilated_for(self.ops),
                         dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.input_scale is not None:
      x = x * self.input_scale
    return self.conv(x)


def bilinear_kernel_1d(factor: int, centered: bool = False) -> np.ndarray:
  """The 1-D bilinear interpolation kernel of size ``2 * factor`` (Caffe's ``upsample_filt``).

  ``centered=True``: the odd kernel of size ``2 * factor - 1`` (centre ``factor - 1``: linear
  interpolation between samples ``factor`` apart whose grid puts input pixel ``i`` exactly on
  output pixel ``factor * i``), stored with a trailing zero tap so that it has the same size
  and the same fast implementation. For backbones whose maps are centred on the image grid
  (every ResNet map is ``image / stride`` with shift 0), where the even kernel would leave the
  maps half a pixel apart.
  """
  size = 2 * factor
  center = factor - 1 if centered else factor - 0.5
  og = np.arange(size, dtype=np.float64)
  return np.maximum(1 - np.abs(og - center) / factor, 0).astype(np.float32)


def bilinear_kernel(factor: int, channels: int, centered: bool = False) -> np.ndarray:
  """Per-class bilinear kernel, shape (2f, 2f, channels, channels), zero off the diagonal.

  Layout is (kh, kw, in, out) with *scatter* semantics (as torch's ConvTranspose2d and Caffe's
  Deconvolution): ``out[s*i + a] += x[i] * W[a]``. From torch weight ``(in, out, k, k)`` use
  ``W.transpose(2, 3, 0, 1)``. ``centered``: see :func:`bilinear_kernel_1d`.
  """
  k1 = bilinear_kernel_1d(factor, centered)
  w = np.zeros((2 * factor, 2 * factor, channels, channels), np.float32)
  w[:, :, np.arange(channels), np.arange(channels)] = np.outer(k1, k1)[:, :, None]
  return w


class FixedKernel(nnx.Variable):
  """A stored, non-trainable kernel (excluded from ``nnx.Param`` filters and optimizers)."""


def transposed_conv(x: jax.Array, kernel: jax.Array, stride: int, padding: int = 0) -> jax.Array:
  """Transposed convolution with scatter semantics (Caffe Deconvolution, torch ConvTranspose2d).

  Args:
    x: (N, H, W, Cin).
    kernel: (k, k, Cin, Cout), ``out[s*i + a - padding] += x[i] * kernel[a]``.
    stride: upsampling factor ``s``.
    padding: torch/Caffe padding ``p`` removed from each border of the full output.

  Returns (N, (H - 1) * s + k - 2p, (W - 1) * s + k - 2p, Cout).

  For FCN's ``k == 2s`` every output pixel receives exactly 2×2 input pixels, so the op is
  computed as a 2×2 convolution to ``s·s·Cout`` channels followed by depth-to-space (sub-pixel
  form): the FLOPs of the scatter, none of the multiplications by the zeros of the dilated-input
  form (which spends most of its work on them; XLA:CPU's timings of both are in
  ``benchmarks/RESULTS.md``). Other kernel sizes use the dilated-input convolution.
  """
  k = kernel.shape[0]
  if k != 2 * stride:
    q = k - 1 - padding
    return jax.lax.conv_general_dilated(
        x, kernel[::-1, ::-1].astype(x.dtype), window_strides=(1, 1), padding=((q, q), (q, q)),
        lhs_dilation=(stride, stride), dimension_numbers=("NHWC", "HWIO", "NHWC"))
  s = stride
  n, h, w, cin = x.shape
  cout = kernel.shape[3]
  # K[d1, d2, c, r1, r2, o] = W[r1 + s(1 - d1), r2 + s(1 - d2), c, o]
  wk = kernel.reshape(2, s, 2, s, cin, cout)[::-1, :, ::-1]          # (t1, r1, t2, r2, c, o)
  wk = wk.transpose(0, 2, 4, 1, 3, 5).reshape(2, 2, cin, s * s * cout)
  y = jax.lax.conv_general_dilated(
      x, wk.astype(x.dtype), window_strides=(1, 1), padding=((1, 1), (1, 1)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"))                    # (N, H+1, W+1, s*s*Cout)
  y = y.reshape(n, h + 1, w + 1, s, s, cout).transpose(0, 1, 3, 2, 4, 5)
  y = y.reshape(n, (h + 1) * s, (w + 1) * s, cout)
  return y[:, padding:y.shape[1] - padding, padding:y.shape[2] - padding, :]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def bilinear_upsample_1d(x: jax.Array, factor: int, axis: int, padding: int = 0,
                         centered: bool = False) -> jax.Array:
  """Fixed bilinear transposed conv (kernel 2s, stride s) along one axis, per channel.

  ``out[s*q + r] = x[q] * k[r] + x[q - 1] * k[r + s]`` (sub-pixel form of the scatter, with
  ``x[-1] = x[H] = 0``): elementwise work only, exact to float rounding. Length H -> (H + 1) s - 2p.

  Forward and backward are written as sums of ``s`` scalar-weighted slices, so XLA fuses each
  into one elementwise pass; ``centered`` picks the kernel (:func:`bilinear_kernel_1d`).
  (Differentiating the broadcast-multiply form made XLA:CPU
  materialise the kernel broadcast to the full (N, H+1, s, W, C) shape in both passes; its cost
  is in ``benchmarks/RESULTS.md``.) The backward is the matching 1-D "downsample":
  ``dx[q] = sum_r g[s*q + r] k[r] + sum_r g[s*(q+1) + r] k[r + s]``.
  """
  k1 = bilinear_kernel_1d(factor, centered)
  pad = [(0, 0)] * x.ndim
  pad[axis] = (1, 1)
  xp = jnp.pad(x, pad)
  h1 = x.shape[axis] + 1
  cur = jax.lax.slice_in_dim(xp, 1, h1 + 1, axis=axis)                # x[q], q = 0..H
  prev = jax.lax.slice_in_dim(xp, 0, h1, axis=axis)                   # x[q - 1]
  dt = x.dtype
  y = jnp.stack([cur * dt.type(k1[r]) + prev * dt.type(k1[r + factor]) for r in range(factor)],
                axis=axis + 1)                                        # (..., H+1, s, ...)
  new_shape = list(x.shape)
  new_shape[axis] = h1 * factor
  y = y.reshape(new_shape)
  return jax.lax.slice_in_dim(y, padding, h1 * factor - padding, axis=axis)


def _upsample_fwd(x, factor, axis, padding, centered):
  return bilinear_upsample_1d(x, factor, axis, padding, centered), x.shape[axis]


def _upsample_bwd(factor, axis, padding, centered, h, g):
  k1 = bilinear_kernel_1d(factor, centered)
  pad = [(0, 0)] * g.ndim
  pad[axis] = (padding, padding)
  g = jnp.pad(g, pad)                                                 # (..., (H+1) s, ...)
  shape = list(g.shape)
  shape[axis:axis + 1] = [h + 1, factor]
  g = g.reshape(shape)                                                # (..., H+1, s, ...)
  dt = g.dtype
  taps = [jax.lax.index_in_dim(g, r, axis=axis + 1, keepdims=False) for r in range(factor)]
  gc = sum(t * dt.type(k1[r]) for r, t in enumerate(taps))           # sum_r g[s q + r] k[r]
  gp = sum(t * dt.type(k1[r + factor]) for r, t in enumerate(taps))  # ... k[r + s]
  dx = (jax.lax.slice_in_dim(gc, 0, h, axis=axis)
        + jax.lax.slice_in_dim(gp, 1, h + 1, axis=axis))
  return (dx,)


bilinear_upsample_1d.defvjp(_upsample_fwd, _upsample_bwd)


class BilinearUpsample(nnx.Module):
  """Upsampling by an integer ``factor`` s: transposed conv, kernel 2s, stride s.

  Initialised to bilinear interpolation per class. ``learnable=False`` (the reference) keeps the
  kernel fixed: it is computed, not stored, and applied per channel as two separable 1-D passes,
  exactly the reference's diagonal kernel. ``learnable=True`` stores a full (2s, 2s, C, C)
  ``nnx.Param`` (Caffe's Deconvolution layout, no bias).

  ``padding`` is the torch/Caffe padding: 0 (the reference, output ``(H - 1) s + 2s``) or
  ``s // 2`` (output ``s H`` exactly, used by the aligned variant). ``centered=True`` uses the
  odd bilinear kernel of :func:`bilinear_kernel_1d` (for centred grids such as ResNet's; its
  coordinate map is that of a ``2s - 1`` kernel).
  Input (N, H, W, C) -> (N, (H - 1) s + 2s - 2p, (W - 1) s + 2s - 2p, C).
  """

  def __init__(self, channels: int, factor: int, *, padding: int = 0, learnable: bool = False,
               centered: bool = False, rngs: nnx.Rngs | None = None):
    if factor < 1 or int(factor) != factor:
      raise ValueError(f"upsampling factor must be a positive integer, got {factor}")
    self.channels = channels
    self.factor = int(factor)
    self.padding = int(padding)
    self.learnable = learnable
    self.centered = bool(centered)
    if learnable:
      self.kernel = nnx.Param(jnp.asarray(bilinear_kernel(self.factor, channels, centered)))

  @property
  def kernel_size(self) -> int:
    return 2 * self.factor

  def coord_map(self) -> geometry.CoordMap:
    k = self.kernel_size - 1 if self.centered else self.kernel_size
    return geometry.deconv_map(k, self.factor, self.padding)

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.learnable:
      return transposed_conv(x, self.kernel[...], self.factor, self.padding)
    # The reference's fixed kernel is bilinear per class (diagonal, separable): two 1-D passes.
    x = bilinear_upsample_1d(x, self.factor, 1, self.padding, self.centered)
    return bilinear_upsample_1d(x, self.factor, 2, self.padding, self.centered)


def crop(x: jax.Array, offset: int, height: int, width: int) -> jax.Array:
  """``x[:, offset:offset + height, offset:offset + width]`` with a clear error if it does not fit.

  Shapes are static under ``jit``, so this is a plain slice.
  """
  h, w = x.shape[1], x.shape[2]
  if offset < 0 or offset + height > h or offset + width > w:
    raise ValueError(
        f"crop does not fit: a {height}x{width} window at offset {offset} needs a map of at least "
        f"{offset + height}x{offset + width}, got {h}x{w} (input too small for this geometry, or "
        "floor pooling where the model needs ceil)")
  return x[:, offset:offset + height, offset:offset + width, :]


def fuse(upsampled: jax.Array, skip_scores: jax.Array, offset: int) -> jax.Array:
  """Skip fusion: crop ``skip_scores`` at ``offset`` to ``upsampled``'s H×W and add.

  A negative ``offset`` means the upsampled map is the larger one (centred grids such as
  ResNet's, where the skip's map starts at the image origin): ``upsampled`` is cropped at
  ``-offset`` to ``skip_scores``' H×W instead.
  """
  if offset < 0:
    return crop(upsampled, -offset, skip_scores.shape[1], skip_scores.shape[2]) + skip_scores
  return upsampled + crop(skip_scores, offset, upsampled.shape[1], upsampled.shape[2])
