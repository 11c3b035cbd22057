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
