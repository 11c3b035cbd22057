"""What a user sees during training: a progress line, ``metrics.jsonl``, ``curves.png``,
``predictions.png``. Only process 0 writes; plots use matplotlib's Agg backend (no display)."""

from __future__ import annotations

import json
import math
import pathlib
import sys
import time

import numpy as np


class Progress:
  """A per-epoch progress bar on stderr: steps, loss, images/s, current bucket shape.

  On a terminal it redraws one line; otherwise (logs, CI) it prints a line every ``every`` steps
  and at the end of the epoch.
  """

  def __init__(self, total: int, epoch: int, num_epochs: int, *, every: int = 10,
               enabled: bool = True, stream=None):
    self.total, self.epoch, self.num_epochs, self.every = total, epoch, num_epochs, every
    self.enabled = enabled
    self.stream = stream or sys.stderr
    self.tty = self.stream.isatty()
    self.start = time.perf_counter()
    self.images = 0
    self.done = 0

  def update(self, loss: float, images: int, shape) -> None:
    self.done += 1
    self.images += images
    if not self.enabled:
      return
    if self.tty or self.done % self.every == 0 or self.done == self.total:
      elapsed = time.perf_counter() - self.start
      frac = self.done / max(1, self.total)
      bar = "#" * int(24 * frac) + "." * (24 - int(24 * frac))
      line = (f"epoch {self.epoch + 1}/{self.num_epochs} [{bar}] {self.done}/{self.total} "
              f"loss {loss:.4f} | {self.images / max(elapsed, 1e-9):.1f} img/s | "
              f"bucket {shape[0]}x{shape[1]}")
      if self.tty:
        self.stream.write("\r" + line + ("\n" if self.done == self.total else ""))
      else:
        self.stream.write(line + "\n")
      self.stream.flush()

  @property
  def images_per_second(self) -> float:
    return self.images / max(time.perf_counter() - self.start, 1e-9)


class MetricsLog:
  """Appends JSON lines to ``WORKDIR/metrics.jsonl`` and keeps the curves in memory."""

  def __init__(self, workdir, enabled: bool = True):
    self.path = pathlib.Path(workdir) / "metrics.jsonl"
    self.enabled = enabled
    self.train, self.eval = [], []
    if self.path.exists():  # a resumed run continues the same curves
      for line in self.path.read_text().splitlines():
        rec = json.loads(line)
        (self.eval if rec.get("kind") == "eval" else self.train).append(rec)

  def truncate_after(self, step: int) -> None:
    """Drop records past ``step`` (written after the checkpoint a resumed run restarts from)."""
    self.train = [r for r in self.train if r["step"] <= step]
    self.eval = [r for r in self.eval if r["step"] <= step]
    if self.enabled:
      recs = sorted(self.train + self.eval, key=lambda r: (r["step"], r.get("kind") == "eval"))
      self.path.write_text("".join(json.dumps(r) + "\n" for r in recs))

  def write(self, record: dict) -> None:
    (self.eval if record.get("kind") == "eval" else self.train).append(record)
    if self.enabled:
      with self.path.open("a") as f:
        f.write(json.dumps(jsonable(record)) + "\n")


def jsonable(x):
  """``x`` with numpy scalars as Python numbers and non-finite floats as None (valid JSON)."""
  if isinstance(x, dict):
    return {k: jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [jsonable(v) for v in x]
  if isinstance(x, (np.floating, float)):
    return None if not math.isfinite(float(x)) else float(x)
  if isinstance(x, np.integer):
    return int(x)
  return x


def plot_curves(log: MetricsLog, path) -> None:
  """Train loss and val mean IU against step, in one figure (two y axes)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
  if log.train:
    ax.plot([r["step"] for r in log.train], [r["loss"] for r in log.train], color="tab:blue",
            lw=1, label="train loss")
  ax.set_xlabel("step")
  ax.set_ylabel("train loss", color="tab:blue")
  ax2 = ax.twinx()
  if log.eval:
    ax2.plot([r["step"] for r in log.eval], [r["mean_iu"] for r in log.eval], "o-",
             color="tab:red", label="val mean IU")
  ax2.set_ylabel("val mean IU", color="tab:red")
  ax2.set_ylim(0, 1)
  ax.set_title("training curves")
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def plot_predictions(images, labels, preds, path, colorize, titles=None) -> None:
  """A grid, one row per example: image (RGB uint8), ground truth and prediction (VOC palette)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  n = len(images)
  fig, axes = plt.subplots(n, 3, figsize=(9, 2.6 * n), dpi=100, squeeze=False)
  for i in range(n):
    for j, (im, t) in enumerate(((images[i], "image"), (colorize(labels[i]), "ground truth"),
                                 (colorize(preds[i]), "prediction"))):
      axes[i, j].imshow(im)
      axes[i, j].set_axis_off()
      axes[i, j].set_title(t if titles is None or j else f"{t} {titles[i]}", fontsize=8)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
