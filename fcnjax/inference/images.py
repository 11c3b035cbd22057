"""Images in for inference: decoding files, sizes from headers, arrays of any common dtype -> RGB.

Every function returns or takes **RGB uint8 (H, W, 3)** arrays. Files are decoded with Pillow
(any format it reads), with the EXIF orientation applied (as viewers show them) and grey, 16-bit,
palette, RGBA and CMYK images converted as the dataset readers do
(:func:`fcnjax.data.palette.image_to_rgb`). A file that cannot be read raises
:class:`ImageReadError` whose message starts with the path.
"""

from __future__ import annotations

import os
import pathlib

import numpy as np
from PIL import Image

from fcnjax.data import readers
from fcnjax.data.palette import image_to_rgb

MAX_IMAGE_PIXELS = 1 << 30
"""Pillow refuses images above ~179 MP as "decompression bombs"; inference tiles large images, so
files up to this many pixels (1.07 G) are decoded."""


class ImageReadError(ValueError):
  """An input image cannot be read; the message starts with its path (or its index)."""


def _reason(e: BaseException) -> str:
  text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
  return text[:200]


def _open(path):
  Image.MAX_IMAGE_PIXELS = max(Image.MAX_IMAGE_PIXELS or 0, MAX_IMAGE_PIXELS)
  try:
    return Image.open(path)
  except FileNotFoundError:
    raise ImageReadError(f"{path}: no such file") from None
  except IsADirectoryError:
    raise ImageReadError(f"{path}: is a folder, not an image") from None
  except PermissionError:
    raise ImageReadError(f"{path}: permission denied") from None
  except Exception as e:  # noqa: BLE001 - UnidentifiedImageError, OSError, bombs, ...
    raise ImageReadError(f"{path}: cannot read the image: {_reason(e)}") from None


def image_size(path) -> tuple:
  """(height, width) of a file as it will be decoded (after EXIF orientation), from its header."""
  with _open(path) as im:
    w, h = im.size
    o = readers.exif_orientation(im)
  return (w, h) if o in (5, 6, 7, 8) else (h, w)


def read_image(path) -> np.ndarray:
  """Decode ``path`` -> RGB uint8 (H, W, 3), EXIF orientation applied."""
  with _open(path) as im:
    try:
      o = readers.exif_orientation(im)
      im.load()
      if o in readers.EXIF_TRANSPOSE:
        im = im.transpose(readers.EXIF_TRANSPOSE[o])
      rgb = image_to_rgb(im)
    except Exception as e:  # noqa: BLE001 - truncated data, bad codecs, ...
      raise ImageReadError(f"{path}: cannot decode the image: {_reason(e)}") from None
  if rgb.shape[0] < 1 or rgb.shape[1] < 1:
    raise ImageReadError(f"{path}: the image is empty ({rgb.shape[1]}x{rgb.shape[0]})")
  return rgb


def to_rgb(image, name: str = "image") -> np.ndarray:
  """Any image -> RGB uint8 (H, W, 3).

  Accepts a path (decoded by :func:`read_image`), a PIL image, or an array (H, W), (H, W, 1),
  (H, W, 3) or (H, W, 4) (alpha dropped) of dtype uint8 (as is), uint16 (>> 8), bool (0 / 255)
  or float (values in [0, 1] are scaled by 255, otherwise taken as 0..255; clipped). ``name``
  names the image in an :class:`ImageReadError`.
  """
  if isinstance(image, (str, os.PathLike)):
    return read_image(pathlib.Path(image))
  if isinstance(image, Image.Image):
    return image_to_rgb(image)
  try:
    a = np.asarray(image)
  except Exception as e:  # noqa: BLE001
    raise ImageReadError(f"{name}: not an image ({_reason(e)})") from None
  if not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] in (1, 3, 4))) or 0 in a.shape[:2]:
    raise ImageReadError(f"{name}: expected an (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) "
                         f"image, got shape {a.shape}")
  if a.ndim == 3:
    a = a[..., :3] if a.shape[-1] != 1 else a[..., 0]
  if a.dtype == np.uint8:
    pass
  elif a.dtype == np.uint16:
    a = (a >> 8).astype(np.uint8)
  elif a.dtype == bool:
    a = a.astype(np.uint8) * 255
  elif np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer):
    f = a.astype(np.float64)
    if not np.isfinite(f).all():
      raise ImageReadError(f"{name}: the image has NaN or infinite values")
    if np.issubdtype(a.dtype, np.floating) and f.max(initial=0) <= 1.0:
      f = f * 255.0
    a = np.clip(np.rint(f), 0, 255).astype(np.uint8)
  else:
    raise ImageReadError(f"{name}: unsupported dtype {a.dtype}")
  if a.ndim == 2:
    a = np.repeat(a[..., None], 3, axis=-1)
  return np.ascontiguousarray(a)


def resize_rgb(rgb: np.ndarray, hw: tuple) -> np.ndarray:
  """RGB uint8 -> RGB uint8 of size ``hw`` = (h, w), Pillow bilinear (as the scale
  augmentation resizes training images)."""
  h, w = hw
  if rgb.shape[:2] == (h, w):
    return rgb
  return np.asarray(Image.fromarray(rgb).resize((w, h), Image.BILINEAR))


def _axis_weights(n_out: int, n_in: int):
  """Indices and weights of 1-D bilinear resampling ``n_in -> n_out``, half-pixel centres
  (PyTorch ``interpolate(mode="bilinear", align_corners=False)``, no antialiasing)."""
  x = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
  x = np.clip(x, 0, n_in - 1)
  i0 = np.floor(x).astype(np.int64)
  i1 = np.minimum(i0 + 1, n_in - 1)
  t = (x - i0).astype(np.float32)
  return i0, i1, t


def resize_maps(maps: np.ndarray, hw: tuple) -> np.ndarray:
  """(h0, w0, C) float32 -> (h, w, C) by bilinear interpolation (half-pixel centres)."""
  h, w = hw
  if maps.shape[:2] == (h, w):
    return maps
  r0, r1, rt = _axis_weights(h, maps.shape[0])
  rows = maps[r0] * (1 - rt)[:, None, None] + maps[r1] * rt[:, None, None]
  c0, c1, ct = _axis_weights(w, maps.shape[1])
  return rows[:, c0] * (1 - ct)[None, :, None] + rows[:, c1] * ct[None, :, None]
