"""Pictures of what :mod:`fcnjax.interpret` computes (matplotlib, Agg backend: no display).

* :func:`overlay` - a heatmap blended over its image (jet colours, as DLwP), at the image's size.
* :func:`save_gradcam` - image | overlay side by side with a title, as a PNG.
* :func:`save_activation_grid` - one tile per channel of a layer's map.
* :func:`save_filter_grid` - one tile per filter pattern.
"""

from __future__ import annotations

import math
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 -- after the backend is chosen
import numpy as np  # noqa: E402


def overlay(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.4) -> np.ndarray:
  """RGB uint8 (H, W, 3) image and (H, W) heatmap in [0, 1] -> RGB uint8 (H, W, 3):
  ``(1 - alpha) * image + alpha * jet(heatmap)``."""
  image = np.asarray(image, np.float32)
  heat = np.clip(np.asarray(heatmap, np.float32), 0, 1)
  if heat.shape != image.shape[:2]:
    raise ValueError(f"heatmap {heat.shape} and image {image.shape[:2]} differ in size")
  colours = matplotlib.colormaps["jet"](heat)[..., :3] * 255.0
  return np.clip(np.rint((1 - alpha) * image + alpha * colours), 0, 255).astype(np.uint8)


def _tile_figure(n: int, tile_hw: tuple, max_columns: int = 8):
  cols = min(n, max_columns)
  rows = math.ceil(n / cols)
  h, w = tile_hw
  scale = 1.6 / max(h, w)
  fig, axes = plt.subplots(rows, cols, figsize=(max(2.5, cols * w * scale + 0.4),
                                                max(1.5, rows * (h * scale + 0.3) + 0.4)),
                           squeeze=False)
  for ax in axes.flat:
    ax.axis("off")
  return fig, axes


def save_gradcam(path, image: np.ndarray, heatmap: np.ndarray, title: str,
                 alpha: float = 0.4, box=None) -> pathlib.Path:
  """``path`` (PNG): the image and its Grad-CAM overlay side by side, ``title`` above; ``box``
  ``(x0, y0, x1, y1)`` is outlined on the overlay when given (a region, or a known object)."""
  h, w = image.shape[:2]
  wide = w >= 2 * h
  fig, axes = plt.subplots(2 if wide else 1, 1 if wide else 2,
                           figsize=(8, 8 * h / w + 1.0) if wide else (8, 4 * h / w + 0.8))
  for ax, img, name in zip(np.ravel(axes), (image, overlay(image, heatmap, alpha)),
                           ("image", "Grad-CAM")):
    ax.imshow(img, interpolation="nearest")
    ax.set_title(name, fontsize=9)
    ax.axis("off")
  if box is not None:
    x0, y0, x1, y1 = box
    np.ravel(axes)[1].add_patch(plt.Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0,
                                              fill=False, edgecolor="white", linewidth=1.5))
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  return _save(fig, path)


def _normalised(channel: np.ndarray) -> np.ndarray:
  """DLwP's activation display: minus mean, over std, x 64 + 128, clipped (uint8)."""
  c = channel.astype(np.float64)
  std = c.std()
  c = (c - c.mean()) / std if std > 0 else c - c.mean()
  return np.clip(c * 64 + 128, 0, 255).astype(np.uint8)


def save_activation_grid(path, activation: np.ndarray, title: str,
                         max_channels: int = 64) -> pathlib.Path:
  """``path`` (PNG): channels ``0 .. max_channels - 1`` of an (h, w, C) map, one grey tile each
  (normalised per channel; a constant channel is mid-grey), numbered."""
  act = np.asarray(activation)
  if act.ndim != 3:
    raise ValueError(f"an activation map is (h, w, C), got shape {act.shape}")
  n = min(act.shape[-1], max_channels)
  fig, axes = _tile_figure(n, act.shape[:2])
  for i, ax in zip(range(n), axes.flat):
    ax.imshow(_normalised(act[..., i]), cmap="viridis", vmin=0, vmax=255,
              interpolation="nearest")
    ax.set_title(str(i), fontsize=6)
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  return _save(fig, path)


def save_filter_grid(path, images: np.ndarray, filters, title: str) -> pathlib.Path:
  """``path`` (PNG): one tile per (H, W, 3) uint8 pattern, titled by its filter index."""
  images = np.asarray(images)
  fig, axes = _tile_figure(len(images), images.shape[1:3])
  for img, f, ax in zip(images, filters, axes.flat):
    ax.imshow(img, interpolation="nearest")
    ax.set_title(str(int(f)), fontsize=6)
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  return _save(fig, path)


def _save(fig, path) -> pathlib.Path:
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path
