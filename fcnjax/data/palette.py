"""PASCAL VOC class names, the VOC colour palette, and pixel-format conversion.

* ``VOC_CLASSES``: the 21 class names, ``'background'`` first (index 0); label 255 (``IGNORE``) is
  "void" (object borders, difficult regions) and is ignored by the loss and metrics.
* ``VOC_PALETTE``: (256, 3) uint8, the standard VOC colour map (bit-interleaving of the index),
  so ``VOC_PALETTE[label]`` colours a label map and the flattened array is a PIL ``putpalette``.
* ``image_to_rgb(pil)``: any PIL image (grey, 16-bit grey, RGBA, palette, CMYK, 1-bit) -> RGB uint8
  (H, W, 3).
* ``label_to_array(pil)``: a mask -> class-index uint8 (H, W). Palette ("P") PNGs give their
  palette *indices* directly (never a colour -> class guess); grey / 16-bit masks give their values.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

IGNORE = 255

class MaskModeError(ValueError):
  """A mask whose pixel format cannot hold class indices (a colour RGB mask, CMYK, ...): the
  readers report it as a ``bad_labels`` problem naming the file."""


VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)
NUM_VOC_CLASSES = len(VOC_CLASSES)


def voc_colormap(n: int = 256) -> np.ndarray:
  """The VOC colour map: (n, 3) uint8; entry i spreads the bits of i over R, G, B (MSB first)."""
  cmap = np.zeros((n, 3), np.uint8)
  for i in range(n):
    c, r, g, b = i, 0, 0, 0
    for j in range(8):
      r |= ((c >> 0) & 1) << (7 - j)
      g |= ((c >> 1) & 1) << (7 - j)
      b |= ((c >> 2) & 1) << (7 - j)
      c >>= 3
    cmap[i] = (r, g, b)
  return cmap


VOC_PALETTE = voc_colormap(256)
VOC_PALETTE.setflags(write=False)


def colorize(label: np.ndarray) -> np.ndarray:
  """Class-index map (H, W) integer -> RGB uint8 (H, W, 3) in VOC colours (255 is cream-white)."""
  return VOC_PALETTE[np.asarray(label, np.uint8)]


def label_image(label: np.ndarray) -> Image.Image:
  """Class-index map (H, W) uint8 -> a palette ("P") PIL image with the VOC palette."""
  img = Image.fromarray(np.asarray(label, np.uint8), mode="P")
  img.putpalette(VOC_PALETTE.reshape(-1).tolist())
  return img


def image_to_rgb(img: Image.Image) -> np.ndarray:
  """Any PIL image -> RGB uint8 (H, W, 3).

  16-bit grey ("I;16*") is shifted to 8 bits (>> 8); 32-bit "I" likewise when any value exceeds
  255 (else its values are taken as 8-bit); "F" is rounded and clipped to 0..255; RGBA / LA / palette-with-alpha drop the
  alpha channel; everything else goes through PIL's own ``convert('RGB')``.
  """
  mode = img.mode
  if mode.startswith("I;16") or mode == "I" or mode == "F":
    arr = np.asarray(img)
    if mode.startswith("I;16"):
      grey = (arr.astype(np.uint32) >> 8).astype(np.uint8)
    elif mode == "I":  # 32-bit ints: 16-bit data if any value exceeds 255, else 8-bit values
      arr = np.clip(arr.astype(np.int64), 0, 65535)
      grey = (arr >> 8 if arr.max(initial=0) > 255 else arr).astype(np.uint8)
    else:
      grey = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)
  if mode == "P" and "transparency" in img.info:
    img = img.convert("RGBA")
  if img.mode != "RGB":
    img = img.convert("RGB")
  return np.asarray(img, np.uint8)


def label_to_array(img: Image.Image) -> np.ndarray:
  """A mask image -> class indices (H, W) as int32 (values are validated by the caller).

  "P": palette indices as stored. "L" / "I" / "I;16": the stored values. "1": 0/1.
  An "RGB"/"RGBA" mask whose channels are equal is read as grey; a colour mask (or any other mode)
  raises :class:`MaskModeError` (a ValueError): save masks as palette PNGs, guessing classes from
  colours is not done here (the folder reader's ``mask_values="palette"`` maps exact colours).
  """
  mode = img.mode
  if mode in ("P", "L", "I", "1") or mode.startswith("I;16"):
    return np.asarray(img).astype(np.int32)
  if mode in ("LA", "PA"):
    return np.asarray(img)[..., 0].astype(np.int32)
  if mode in ("RGB", "RGBA"):
    arr = np.asarray(img)[..., :3]
    if (arr[..., 0] == arr[..., 1]).all() and (arr[..., 0] == arr[..., 2]).all():
      return arr[..., 0].astype(np.int32)
    ncol = len(np.unique(arr.reshape(-1, 3), axis=0))
    raise MaskModeError(f"colour ({mode}) mask ({ncol} distinct colours) where class indices are "
                        "expected: store class indices as a palette or grey PNG")
  raise MaskModeError(f"unsupported mask mode {mode!r}: store class indices as a palette or grey "
                      "PNG")
