"""Request images -> RGB uint8 (H, W, 3); class maps -> PNG. numpy, Pillow and base64 only.

Accepted pixel arrays (nested JSON lists, after ``np.asarray``):

* **(H, W, 3)** RGB; **(H, W)** or **(H, W, 1)** grey, broadcast to 3 channels; **(H, W, 4)**
  RGBA, the alpha channel dropped (not composited). Any other channel count (2, 5, ...) or rank
  is an error.
* values **0..255**: integers as they are, floats rounded to the nearest integer (a float image
  is on the 0..255 scale too, never 0..1). Values outside 0..255, NaN / infinity, booleans,
  strings, ``null`` and ragged lists (rows of different lengths) are errors.

Encoded images (``{"b64": "..."}``): standard or URL-safe base64 of a file Pillow decodes (PNG,
JPEG, and the rest of Pillow's formats), the EXIF orientation applied, grey / palette / RGBA /
CMYK / 16-bit converted to RGB (16-bit by ``>> 8``; alpha dropped).

Every problem raises :class:`ImageError` (the message starts with where the image is in the
request, e.g. ``instances[2]``); one over the pixel budget raises :class:`TooLarge`.
"""

from __future__ import annotations

import base64
import binascii
import io

import numpy as np
from PIL import Image, ImageOps

MAX_VALUE = 255
_URLSAFE = str.maketrans("-_", "+/")


class ImageError(ValueError):
  """A request image cannot be used (the message says where and why)."""


class TooLarge(ImageError):
  """The request's images have more pixels than the server's limit."""


def array_image(value, where: str, *, allow_grey: bool = True) -> np.ndarray:
  """Nested lists of pixel values -> RGB uint8 (H, W, 3) (see the module doc).

  ``allow_grey=False`` refuses (H, W) arrays (a batch of images must have a channel axis, or
  an (H, W, 3) image would read as H grey images)."""
  try:
    a = np.asarray(value)
  except (ValueError, TypeError, OverflowError):
    raise ImageError(f"{where}: ragged nested lists (rows or pixels of different lengths)") \
        from None
  if a.dtype.kind == "b":
    raise ImageError(f"{where}: booleans are not pixel values (give integers 0..255)")
  if a.dtype.kind in "OUS":
    raise ImageError(f"{where}: non-numeric pixel values ({_kind_name(a)}); give numbers "
                     "0..255")
  if a.dtype.kind not in "iuf":
    raise ImageError(f"{where}: unsupported pixel values of dtype {a.dtype}")
  if a.size == 0:
    raise ImageError(f"{where}: empty image (shape {a.shape})")
  ranks = "(H, W), (H, W, 1), (H, W, 3) or (H, W, 4)" if allow_grey else "(H, W, 3)"
  if a.ndim == 2 and allow_grey:
    a = a[..., None]
  if a.ndim != 3:
    raise ImageError(f"{where}: expected an image of shape {ranks}, got shape {a.shape}")
  if a.shape[-1] not in (1, 3, 4):
    raise ImageError(f"{where}: {a.shape[-1]} channels (shape {a.shape}); expected 3 (RGB), "
                     "1 (grey) or 4 (RGBA)")
  if a.shape[0] < 1 or a.shape[1] < 1:
    raise ImageError(f"{where}: empty image (shape {a.shape})")
  if a.dtype.kind == "f" and not np.isfinite(a).all():
    raise ImageError(f"{where}: NaN or infinite pixel values")
  lo, hi = a.min(), a.max()
  if lo < 0 or hi > MAX_VALUE:
    raise ImageError(f"{where}: pixel values must be in 0..{MAX_VALUE}, got {_num(lo)}.."
                     f"{_num(hi)}")
  if a.dtype.kind == "f":
    a = np.rint(a)
  return _to_rgb(a.astype(np.uint8))


def _kind_name(a: np.ndarray) -> str:
  return "strings" if a.dtype.kind in "US" else "null, objects or numbers beyond 64 bits"


def _num(v) -> str:
  return f"{float(v):g}"


def _to_rgb(a: np.ndarray) -> np.ndarray:
  """(H, W, 1 | 3 | 4) uint8 -> (H, W, 3) uint8, contiguous."""
  if a.shape[-1] == 1:
    a = np.broadcast_to(a, a.shape[:2] + (3,))
  elif a.shape[-1] == 4:
    a = a[..., :3]
  return np.ascontiguousarray(a)


def decode_b64(text, where: str, *, max_pixels: int | None = None) -> np.ndarray:
  """Base64 of an encoded image (PNG, JPEG, ...) -> RGB uint8 (H, W, 3).

  ``max_pixels``: refuse (:class:`TooLarge`) an image of more pixels, read from its header
  before decoding (so a small file of a huge image is never decoded)."""
  if not isinstance(text, str):
    raise ImageError(f"{where}: \"b64\" must be a base64 string, got {type(text).__name__}")
  try:
    raw = base64.b64decode("".join(text.split()).translate(_URLSAFE), validate=True)
  except (binascii.Error, ValueError):
    raise ImageError(f"{where}: \"b64\" is not valid base64") from None
  if not raw:
    raise ImageError(f"{where}: \"b64\" is empty")
  try:
    im = Image.open(io.BytesIO(raw))
  except Exception:  # noqa: BLE001 -- UnidentifiedImageError, bombs, codec errors
    raise ImageError(f"{where}: \"b64\" is not an image Pillow can read (PNG, JPEG, ...)") \
        from None
  with im:
    w, h = im.size
    if max_pixels is not None and w * h > max_pixels:
      raise TooLarge(f"{where}: a {w}x{h} image ({w * h:,} pixels) is over the limit of "
                     f"{max_pixels:,} pixels")
    try:
      im.load()
      im = ImageOps.exif_transpose(im)
      rgb = _pil_to_rgb(im)
    except Exception as e:  # noqa: BLE001 -- truncated data, bad codecs, ...
      raise ImageError(f"{where}: cannot decode the image ({_reason(e)})") from None
  if rgb.shape[0] < 1 or rgb.shape[1] < 1:
    raise ImageError(f"{where}: empty image ({rgb.shape[1]}x{rgb.shape[0]})")
  return rgb


def _reason(e: BaseException) -> str:
  text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
  return text[:200]


def _pil_to_rgb(im: Image.Image) -> np.ndarray:
  """Any Pillow image -> RGB uint8 (H, W, 3): 16-/32-bit grey by ``>> 8`` / clipping."""
  if im.mode.startswith("I;16") or im.mode == "I":
    a = np.asarray(im).astype(np.int64)
    a = np.clip(a >> 8 if im.mode.startswith("I;16") or a.max(initial=0) > 255 else a, 0, 255)
    return _to_rgb(a.astype(np.uint8)[..., None])
  if im.mode == "F":
    a = np.clip(np.rint(np.nan_to_num(np.asarray(im))), 0, 255).astype(np.uint8)
    return _to_rgb(a[..., None])
  if im.mode != "RGB":
    im = im.convert("RGBA" if "A" in im.mode or "transparency" in im.info else "RGB")
  return _to_rgb(np.asarray(im, np.uint8))


def class_png(classes: np.ndarray, palette: np.ndarray | None = None) -> bytes:
  """(H, W) class ids -> PNG bytes whose pixel values are the ids: a palette ("P") PNG coloured
  by ``palette`` ((256, 3) uint8) for ids 0..255, else a 16-bit grey PNG (ids 0..65535).

  Read back with ``np.asarray(PIL.Image.open(io.BytesIO(png)))``."""
  classes = np.asarray(classes)
  buf = io.BytesIO()
  if classes.size and int(classes.max()) > 255:
    Image.fromarray(classes.astype(np.uint16)).save(buf, format="PNG")
  else:
    img = Image.fromarray(classes.astype(np.uint8), mode="P")
    if palette is not None:
      img.putpalette(np.asarray(palette, np.uint8).reshape(-1).tolist())
    img.save(buf, format="PNG")
  return buf.getvalue()


def encode_b64(data: bytes) -> str:
  """Standard base64 text of ``data``."""
  return base64.b64encode(data).decode("ascii")
