"""Coordinate geometry of conv/pool/deconv stacks, and the FCN crop offsets derived from it.

Every layer of an FCN maps input coordinates to output coordinates by an affine map
``out = scale * in + shift`` (in pixels of the respective grids, measured at pixel centres).
The maps are exact rationals (``fractions.Fraction``), following the Caffe reference's
``coord_map`` module (``python/caffe/coord_map.py`` in BVLC/caffe):

* convolution / pooling with kernel ``k``, stride ``s``, padding ``p``:
  ``out = in / s + (p - (k - 1) / 2) / s``
* transposed convolution (Caffe "Deconvolution") with kernel ``k``, stride ``s``, padding ``p``:
  ``out = s * in + (k - 1) / 2 - p``

Composing the maps along each path gives every feature map's position relative to the image. To
fuse a larger map ``X`` into a reference map ``R`` of the same scale, ``X`` is cropped at offset
``shift(X) - shift(R)``: element ``R[i]`` and ``X[i + offset]`` see the same image location.
For the reference VGG16 FCNs this derivation gives 19 (FCN-32s), 5 and 27 (FCN-16s), 5, 9 and 31
(FCN-8s); nothing is typed in by hand.

Asymmetric (bottom/right) padding, as used by Caffe's ceil-mode pooling, does not move the map.
"""

from __future__ import annotations

import dataclasses
from fractions import Fraction


@dataclasses.dataclass(frozen=True)
class CoordMap:
  """Affine map ``out = scale * in + shift`` from one grid's coordinates to another's."""

  scale: Fraction = Fraction(1)
  shift: Fraction = Fraction(0)

  def then(self, other: "CoordMap") -> "CoordMap":
    """The map of applying ``self`` first and ``other`` second."""
    return CoordMap(self.scale * other.scale, other.scale * self.shift + other.shift)

  def __call__(self, x):
    return self.scale * x + self.shift


IDENTITY = CoordMap()


def conv_map(kernel: int, stride: int = 1, padding: int = 0) -> CoordMap:
  """Coordinate map of a convolution or pooling window (Caffe semantics, leading padding)."""
  s = Fraction(stride)
  return CoordMap(1 / s, (Fraction(padding) - Fraction(kernel - 1, 2)) / s)


def deconv_map(kernel: int, stride: int, padding: int = 0) -> CoordMap:
  """Coordinate map of a transposed convolution (Caffe Deconvolution / torch ConvTranspose2d)."""
  return CoordMap(Fraction(stride), Fraction(kernel - 1, 2) - padding)


def compose(*maps: CoordMap) -> CoordMap:
  """Compose maps in application order: ``compose(a, b)`` applies ``a`` then ``b``."""
  out = IDENTITY
  for m in maps:
    out = out.then(m)
  return out


def crop_offset(larger: CoordMap, reference: CoordMap) -> int:
  """Offset at which the map ``larger`` must be cropped to align with ``reference``.

  Both maps are from the same input (the image). Raises ``ValueError`` if the two grids have
  different scales or are misaligned by a fraction of a pixel (no integer crop can fix that).
  """
  if larger.scale != reference.scale:
    raise ValueError(f"cannot crop: grids have different scales {larger.scale} vs {reference.scale}")
  offset = larger.shift - reference.shift
  if offset.denominator != 1:
    raise ValueError(f"cannot crop: grids are misaligned by a fractional offset {offset}")
  return int(offset)


# ---------------------------------------------------------------------------------------------
# Output sizes and the minimum input size


@dataclasses.dataclass(frozen=True)
class SizeOp:
  """How one layer maps an input length ``n`` (pixels along one axis) to its output length.

  ``n`` is first rounded up to a multiple of ``multiple`` (an input padded to a grid), then a
  window of ``kernel`` taps (dilated by ``dilation``) slides with ``stride`` over it with
  ``padding`` pixels added in total (both sides together): ``out = floor((n + padding - eff) /
  stride) + 1`` (``ceil`` with ``ceil=True``, Caffe's pooling), ``eff = dilation * (kernel - 1)
  + 1``. An ``out < 1`` means the input is too small for the layer.
  """

  kernel: int = 1
  stride: int = 1
  padding: int = 0
  dilation: int = 1
  ceil: bool = False
  multiple: int = 1

  @property
  def extent(self) -> int:
    return self.dilation * (self.kernel - 1) + 1

  def __call__(self, n):
    """The output length of an input of length ``n`` (an int, or an integer array)."""
    n = -(-n // self.multiple) * self.multiple
    num = n + self.padding - self.extent
    return (-(-num // self.stride) if self.ceil else num // self.stride) + 1

  def min_input(self, out: int) -> int:
    """The smallest input length (>= 1) whose output length is at least ``out``."""
    if self.ceil:  # ceil(num / s) >= out - 1  <=>  num >= (out - 2) * s + 1
      n = (out - 2) * self.stride + 1 + self.extent - self.padding
    else:          # floor(num / s) >= out - 1  <=>  num >= (out - 1) * s
      n = (out - 1) * self.stride + self.extent - self.padding
    n = max(int(n), 1)  # the rounded-up length needed; the smallest n that rounds up to it:
    return (-(-n // self.multiple) - 1) * self.multiple + 1


def output_length(ops, n):
  """The output length of the layer chain ``ops`` (a sequence of :class:`SizeOp`) for an input
  of length ``n`` (int or integer array); ``<= 0`` where the input is too small."""
  for op in ops:
    n = op(n)
  return n


def min_input_length(ops) -> int:
  """The smallest input length for which every layer of ``ops`` has an output of length >= 1
  (each layer's output length is non-decreasing in its input length, so this is computed
  backwards from ``out = 1``, layer by layer, without running anything)."""
  need = 1
  for op in reversed(tuple(ops)):
    need = op.min_input(need)
  return need
