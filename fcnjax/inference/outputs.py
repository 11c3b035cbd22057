"""What prediction writes: palette PNG class maps, overlays with a legend, float16 probabilities.

* :func:`save_classes`: (H, W) class ids -> a palette ("P") PNG of exactly H x W whose pixel
  values are the class ids and whose palette is the model's (VOC's by default), so it opens in
  colour and reads back (``np.asarray(Image.open(p))``) as the ids.
* :func:`overlay`: the image blended with the class colours, and below it a legend of the
  classes present (colour swatch + name); RGB, width W, height H + the legend's.
* :func:`save_probs`: ``.npz`` with ``probs`` (H, W, C) float16 and ``class_names`` (C,).
"""

from __future__ import annotations

import pathlib

import numpy as np
from PIL import Image, ImageDraw, ImageFont

OVERLAY_ALPHA = 0.5
"""Weight of the class colour in the overlay (the image has 1 - this)."""


def class_image(classes: np.ndarray, palette: np.ndarray) -> Image.Image:
  """(H, W) integer class ids (0..255) -> palette PIL image with ``palette`` ((256, 3) uint8)."""
  img = Image.fromarray(np.asarray(classes, np.uint8), mode="P")
  img.putpalette(np.asarray(palette, np.uint8).reshape(-1).tolist())
  return img


def save_classes(path, classes: np.ndarray, palette: np.ndarray) -> None:
  """Write the class map as a palette PNG (parent folders are created)."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  class_image(classes, palette).save(path, format="PNG")


def _legend(names: list, colours: list, width: int) -> Image.Image:
  """A white strip with one swatch + name per class, wrapped to ``width`` pixels."""
  font = ImageFont.load_default()
  probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
  box, pad = 12, 4
  entries = []
  for name in names:
    l, t, r, b = probe.textbbox((0, 0), name, font=font)
    entries.append((name, r - l, b - t))
  line_h = max(box, max(h for _, _, h in entries)) + 2 * pad
  x, rows, placed = pad, 0, []
  for (name, tw, _), colour in zip(entries, colours):
    need = box + pad + tw + 3 * pad
    if x + need > width and x > pad:
      x, rows = pad, rows + 1
    placed.append((x, rows, name, colour))
    x += need
  strip = Image.new("RGB", (max(width, 1), (rows + 1) * line_h), (255, 255, 255))
  draw = ImageDraw.Draw(strip)
  for x, row, name, colour in placed:
    y = row * line_h + pad
    draw.rectangle([x, y, x + box - 1, y + box - 1], fill=tuple(int(c) for c in colour),
                   outline=(0, 0, 0))
    draw.text((x + box + pad, y), name, fill=(0, 0, 0), font=font)
  return strip


def overlay(rgb: np.ndarray, classes: np.ndarray, palette: np.ndarray, class_names,
            alpha: float = OVERLAY_ALPHA) -> Image.Image:
  """RGB uint8 (H, W, 3) blended with the colours of ``classes`` (H, W), above a legend of the
  classes present (in id order)."""
  colours = np.asarray(palette, np.uint8)[np.asarray(classes, np.uint8)]
  blend = (1 - alpha) * rgb.astype(np.float32) + alpha * colours.astype(np.float32)
  top = Image.fromarray(np.clip(np.rint(blend), 0, 255).astype(np.uint8))
  present = [int(c) for c in np.unique(classes)]
  names = [class_names[c] if c < len(class_names) else str(c) for c in present]
  legend = _legend(names, [palette[c] for c in present], rgb.shape[1])
  out = Image.new("RGB", (rgb.shape[1], rgb.shape[0] + legend.height), (255, 255, 255))
  out.paste(top, (0, 0))
  out.paste(legend.crop((0, 0, rgb.shape[1], legend.height)), (0, rgb.shape[0]))
  return out


def save_overlay(path, rgb, classes, palette, class_names) -> None:
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  overlay(rgb, classes, palette, class_names).save(path, format="PNG")


def save_probs(path, probs: np.ndarray, class_names) -> None:
  """``.npz`` with ``probs`` (H, W, C) float16 and ``class_names`` (C,) str."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  np.savez_compressed(path, probs=np.asarray(probs, np.float16),
                      class_names=np.asarray(list(class_names), dtype=str))
