"""A view of a classification source with every image resized (squashed) to one size.

This is the Keras tutorial's first way to batch variable-size images, kept only to compare
against (``data.resize_to``): a 30 x 300 strip squashed to 64 x 64 loses the fine structure
that decides its class. fcnjax itself never resizes (size buckets + masks instead).
"""

from __future__ import annotations

import numpy as np
from PIL import Image


class ResizedSource:
  """``source`` with ``src[i]["image"]`` bilinearly resized to ``size`` (h, w) and its label map
  (the image's class on every pixel) rebuilt at that size; ``sizes`` are all ``size``. Every
  other attribute is the wrapped source's."""

  def __init__(self, source, size):
    self.source = source
    self.size = (int(size[0]), int(size[1]))
    self.sizes = np.tile(np.asarray(self.size, np.int32), (len(source), 1))

  def __len__(self):
    return len(self.source)

  def __getitem__(self, i):
    ex = dict(self.source[i])
    h, w = self.size
    image = np.asarray(ex["image"], np.uint8)
    label = np.asarray(ex["label"])
    value = int(label.reshape(-1)[0]) if label.size else 255
    ex["image"] = np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR), np.uint8)
    ex["label"] = np.full((h, w), value, np.uint8)
    return ex

  def subset(self, indices, name=None) -> "ResizedSource":
    return ResizedSource(self.source.subset(indices, name), self.size)

  def __getattr__(self, name):
    if name in ("source", "size", "sizes"):  # not set yet (unpickling)
      raise AttributeError(name)
    return getattr(self.source, name)

  def __repr__(self):
    return f"ResizedSource({self.source!r}, {self.size[0]}x{self.size[1]})"
