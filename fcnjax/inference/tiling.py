"""Sliding-window (tiled) inference: where the tiles go and how their logits are combined.

An image of H x W is cut into overlapping tiles of at most ``tile`` pixels per side. Tile starts
are multiples of the model's translation period (its total stride, 32 for the VGG16 FCNs), so a
tile sees its pixels exactly as the whole image does; the last tile of each row/column ends at the
image edge (it may be smaller than ``tile``), as the whole image does. Each tile contributes its
logits except within ``overlap // 2`` pixels of an edge it shares with a neighbour; where several
tiles contribute, their logits are averaged. So for a model whose receptive field reaches at most
``overlap // 2`` pixels from the output pixel, the tiled logits equal the whole-image logits.
"""

from __future__ import annotations

import dataclasses

import numpy as np


def segments(n: int, tile: int, overlap: int, period: int = 1) -> list:
  """``[(start, stop), ...]`` covering ``0 .. n`` along one axis.

  Starts are ``k * stride`` with ``stride`` the largest multiple of ``period`` that is at most
  ``tile - overlap`` (at least ``period``); every segment is ``tile`` long except the last, which
  ends at ``n``. ``n <= tile`` gives one segment.
  """
  if tile < 1 or overlap < 0 or period < 1:
    raise ValueError(f"tile {tile} must be >= 1, overlap {overlap} >= 0, period {period} >= 1")
  if overlap >= tile:
    raise ValueError(f"overlap {overlap} must be smaller than the tile {tile}")
  if n <= tile:
    return [(0, n)]
  stride = max(period, (tile - overlap) // period * period)
  out, start = [], 0
  while start + tile < n:
    out.append((start, start + tile))
    start += stride
  out.append((start, n))
  return out


def trusted(seg: tuple, n: int, margin: int) -> tuple:
  """The part of segment ``seg`` (of an axis of length ``n``) whose outputs are kept: ``margin``
  pixels are dropped at each end that is not an image edge."""
  a, b = seg
  return (a + margin if a > 0 else a, b - margin if b < n else b)


@dataclasses.dataclass(frozen=True)
class Tile:
  """One tile: ``rows`` / ``cols`` (start, stop) in the image, and the kept part ``keep_rows`` /
  ``keep_cols`` relative to the tile."""

  rows: tuple
  cols: tuple
  keep_rows: tuple
  keep_cols: tuple

  @property
  def shape(self) -> tuple:
    return (self.rows[1] - self.rows[0], self.cols[1] - self.cols[0])


def plan_tiles(h: int, w: int, tile: tuple, overlap: int, period: int = 1) -> list:
  """The tiles of an ``h x w`` image (``tile`` = (tile_h, tile_w)), row-major."""
  margin = overlap // 2
  out = []
  for rs in segments(h, tile[0], overlap, period):
    tr = trusted(rs, h, margin)
    for cs in segments(w, tile[1], overlap, period):
      tc = trusted(cs, w, margin)
      out.append(Tile(rs, cs, (tr[0] - rs[0], tr[1] - rs[0]), (tc[0] - cs[0], tc[1] - cs[0])))
  return out


class Stitcher:
  """Accumulates tile logits into the image's: ``add(tile, logits)`` then ``result()``.

  ``logits`` of a tile: (tile_h, tile_w, C) float32. ``result()``: (h, w, C) float32, the mean of
  the kept tile logits at every pixel.
  """

  def __init__(self, h: int, w: int, num_classes: int):
    self.sum = np.zeros((h, w, num_classes), np.float32)
    self.count = np.zeros((h, w, 1), np.float32)

  def add(self, tile: Tile, logits: np.ndarray) -> None:
    (r0, r1), (c0, c1) = tile.keep_rows, tile.keep_cols
    y0, x0 = tile.rows[0], tile.cols[0]
    self.sum[y0 + r0:y0 + r1, x0 + c0:x0 + c1] += logits[r0:r1, c0:c1]
    self.count[y0 + r0:y0 + r1, x0 + c0:x0 + c1] += 1

  def result(self) -> np.ndarray:
    if (self.count == 0).any():  # cannot happen for plan_tiles' tiles; guards other callers
      raise ValueError("some pixels are covered by no kept tile region")
    return self.sum / self.count
