"""What a user sees during training: a progress bar, ``metrics.jsonl``, ``curves.png``,
``predictions.png`` and, optionally, TensorBoard event files. Only process 0 writes; plots use
matplotlib's Agg backend (no display)."""

from __future__ import annotations

import json
import math
import numbers
import os
import pathlib
import sys
import time

import numpy as np


def _isatty(stream) -> bool:
  try:
    return bool(stream.isatty())
  except (AttributeError, ValueError):  # no isatty, or a closed file
    return False


class Progress:
  """A per-epoch progress bar on ``stream`` (stderr): steps, loss, images/s, bucket shape.

  On a terminal it is a tqdm bar (``epoch E/N  40%|####      | 8/20 [00:03<00:05, loss 0.6931,
  12.3 img/s, bucket 320x480]``), redrawn at most every 0.1 s and closed (left on screen) at the
  end of the epoch; without tqdm installed, one line redrawn with ``\\r``. Otherwise (logs, CI,
  tests) it prints a plain line every ``every`` steps and at the end of the epoch::

      epoch 1/3 [######..................] 5/20 loss 0.6931 | 12.3 img/s | bucket 320x480

  ``done`` (steps already done in this epoch) may be set after construction, e.g. when resuming
  mid-epoch; ``images_per_second`` counts the images passed to :meth:`update` since construction.
  Call :meth:`close` when stopping before the end of the epoch (it prints the last state if it
  was not printed yet); it is also a context manager.
  """

  def __init__(self, total: int, epoch: int, num_epochs: int, *, every: int = 10,
               enabled: bool = True, stream=None):
    self.total, self.epoch, self.num_epochs, self.every = total, epoch, num_epochs, every
    self.enabled = enabled
    self.stream = stream or sys.stderr
    self.tty = _isatty(self.stream)
    self.start = time.perf_counter()
    self.images = 0
    self.done = 0
    self._bar = None          # the tqdm bar, made at the first update on a terminal
    self._last = None         # (loss, shape) of the last update
    self._printed = True      # the last update's state has been written
    self._closed = False

  def _postfix(self, loss: float, shape) -> str:
    return (f"loss {loss:.4f}, {self.images_per_second:.1f} img/s, "
            f"bucket {shape[0]}x{shape[1]}")

  def _line(self, loss: float, shape) -> str:
    frac = min(1.0, self.done / max(1, self.total))
    bar = "#" * int(24 * frac) + "." * (24 - int(24 * frac))
    return (f"epoch {self.epoch + 1}/{self.num_epochs} [{bar}] {self.done}/{self.total} "
            f"loss {loss:.4f} | {self.images_per_second:.1f} img/s | "
            f"bucket {shape[0]}x{shape[1]}")

  def _tqdm_bar(self, postfix: str):
    """A tqdm bar at ``done`` steps, drawn now; None without tqdm."""
    try:
      from tqdm import tqdm
    except ImportError:
      return None
    return tqdm(total=self.total, initial=self.done, postfix=postfix,
                desc=f"epoch {self.epoch + 1}/{self.num_epochs}", file=self.stream, leave=True,
                dynamic_ncols=True, unit="step",
                bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]")

  def update(self, loss: float, images: int, shape) -> None:
    """One step done: its loss (float), the number of real images in it, the batch's (H, W)."""
    self.done += 1
    self.images += images
    self._last = (float(loss), tuple(shape))
    self._printed = False
    if not self.enabled or self._closed:
      return
    if self.tty:
      if self._bar is None:
        bar = self._tqdm_bar(self._postfix(loss, shape))
        self._bar = False if bar is None else bar
      elif self._bar is not False:  # redrawn at most every 0.1 s (tqdm's mininterval)
        self._bar.set_postfix_str(self._postfix(loss, shape), refresh=False)
        self._bar.update(self.done - self._bar.n)  # done may have been set by the caller
      if self._bar is False:  # no tqdm: one line redrawn in place
        self.stream.write("\r" + self._line(loss, shape))
        self.stream.flush()
      self._printed = True
      if self.done >= self.total:
        self.close()
    elif self.done % self.every == 0 or self.done == self.total:
      self.stream.write(self._line(loss, shape) + "\n")
      self.stream.flush()
      self._printed = True

  def close(self) -> None:
    """End the bar (idempotent): on a terminal, leave it drawn; otherwise print the last state
    if the last update was not printed. Later updates still count but draw nothing."""
    if self._closed:
      return
    self._closed = True
    if not self.enabled:
      return
    if self._bar is False:
      self.stream.write("\n")
      self.stream.flush()
    elif self._bar is not None:
      self._bar.close()
    elif not self._printed and self._last is not None:
      self.stream.write(self._line(*self._last) + "\n")
      self.stream.flush()
    self._bar = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  @property
  def images_per_second(self) -> float:
    return self.images / max(time.perf_counter() - self.start, 1e-9)


class TensorBoardWriter:
  """Optional TensorBoard event files (tensorboardX), for ``tensorboard --logdir LOGDIR``.

  Needs the ``tensorboard`` extra (``pip install "fcnjax[tensorboard]"``); constructing it without
  tensorboardX raises an ImportError saying so. With ``enabled=False`` (processes other than 0)
  nothing is imported or written and every method does nothing.

  Note: tensorboardX imports torch when torch is installed, which slows the first construction.

  Args:
    logdir: folder of the event files (created if needed).
    enabled: write at all.
    flush_secs: the background writer flushes at least this often; :meth:`flush` forces it.
  """

  def __init__(self, logdir, *, enabled: bool = True, flush_secs: int = 30):
    self.logdir = pathlib.Path(logdir)
    self.enabled = enabled
    self._writer = None
    if not enabled:
      return
    try:
      from tensorboardX import SummaryWriter
    except ImportError as e:
      raise ImportError('TensorBoard logging needs tensorboardX: pip install '
                        '"fcnjax[tensorboard]"') from e
    self.logdir.mkdir(parents=True, exist_ok=True)
    self._writer = SummaryWriter(logdir=str(self.logdir), flush_secs=flush_secs)

  def scalars(self, step: int, mapping: dict, prefix: str = "") -> int:
    """Write each numeric value of ``mapping`` as scalar ``prefix/key`` at ``step``.

    Nested dicts give nested tags (``{"per_class_iou": {"cat": 0.5}}`` with prefix ``"val"`` ->
    ``val/per_class_iou/cat``). Python / numpy numbers and 0-d numeric arrays (numpy or jax) are
    written, NaN and inf included; None, bools, strings, sequences and other arrays are skipped.
    Returns the number of scalars written.
    """
    if self._writer is None:
      return 0
    count = 0
    for tag, value in _numeric_items(mapping, prefix.strip("/")):
      self._writer.add_scalar(tag, value, global_step=int(step))
      count += 1
    return count

  def image(self, step: int, tag: str, image) -> None:
    """Write an RGB image at ``step``: an (H, W, 3) uint8 array, or the path of an image file
    (e.g. ``predictions.png``; read with Pillow, converted to RGB)."""
    if self._writer is None:
      return
    if isinstance(image, (str, os.PathLike)):
      from PIL import Image
      with Image.open(image) as im:
        image = np.asarray(im.convert("RGB"))
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
      raise ValueError(f"expected an (H, W, 3) uint8 image, got {image.shape} {image.dtype}")
    self._writer.add_image(tag, image, global_step=int(step), dataformats="HWC")

  def flush(self) -> None:
    if self._writer is not None:
      self._writer.flush()

  def close(self) -> None:
    """Flush and close the event file (idempotent)."""
    if self._writer is not None:
      self._writer.close()
      self._writer = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def _numeric_items(mapping: dict, prefix: str):
  """(tag, float) for the numeric leaves of a nested dict, in order."""
  for key, value in mapping.items():
    tag = f"{prefix}/{key}" if prefix else str(key)
    if isinstance(value, dict):
      yield from _numeric_items(value, tag)
      continue
    if value is None or isinstance(value, (bool, np.bool_)):
      continue
    if isinstance(value, numbers.Real):
      yield tag, float(value)
    elif getattr(value, "shape", None) == () and getattr(value, "dtype", None) is not None:
      dtype = np.dtype(value.dtype)  # bfloat16 (ml_dtypes) has kind "V": go by the name too
      if dtype.kind in "iuf" or "float" in dtype.name:
        yield tag, float(value)


class MetricsLog:
  """Appends JSON lines to ``WORKDIR/metrics.jsonl`` and keeps the records in memory.

  ``train`` / ``eval`` / ``other`` (e.g. ``"data"``: bad files skipped in an epoch) hold the
  records by kind. A line that is not valid JSON (a run killed while writing its last line) is
  left out with a notice (``notice``: a print function) and dropped from the file by the next
  :meth:`truncate_after`.
  """

  def __init__(self, workdir, enabled: bool = True, notice=None):
    self.path = pathlib.Path(workdir) / "metrics.jsonl"
    self.enabled = enabled
    self.train, self.eval, self.other = [], [], []
    self.torn_lines = 0
    if self.path.exists():  # a resumed run continues the same curves
      lines = self.path.read_text(errors="replace").splitlines()
      for n, line in enumerate(lines, 1):
        if not line.strip():
          continue
        try:
          rec = json.loads(line)
          if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
            raise ValueError("not a record")
        except ValueError:
          self.torn_lines += 1
          if notice is not None:
            where = "its last line" if n == len(lines) else f"line {n}"
            notice(f"notice: {self.path}: {where} is not a complete record (a run stopped while "
                   "writing it?); left out")
          continue
        self._list(rec).append(rec)

  def _list(self, record: dict) -> list:
    kind = record.get("kind")
    return self.eval if kind == "eval" else self.train if kind == "train" else self.other

  def has_eval(self, step: int) -> bool:
    return any(r["step"] == step for r in self.eval)

  def truncate_after(self, step: int) -> None:
    """Drop records past ``step`` (written after the checkpoint a resumed run restarts from)."""
    self.train = [r for r in self.train if r["step"] <= step]
    self.eval = [r for r in self.eval if r["step"] <= step]
    self.other = [r for r in self.other if r["step"] <= step]
    if self.enabled:
      order = {"train": 0, "data": 1, "eval": 2}
      recs = sorted(self.train + self.other + self.eval,
                    key=lambda r: (r["step"], order.get(r.get("kind"), 1)))
      self.path.write_text("".join(json.dumps(r) + "\n" for r in recs))

  def write(self, record: dict) -> None:
    self._list(record).append(record)
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


def plot_curves(log: MetricsLog, path, *, metric: str = "mean_iu",
                label: str = "val mean IU") -> None:
  """Train loss and the val ``metric`` (mean IU; a classifier's ``top1``) against step, in one
  figure (two y axes)."""
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
    rows = [r for r in log.eval if r.get(metric) is not None]
    ax2.plot([r["step"] for r in rows], [r[metric] for r in rows], "o-",
             color="tab:red", label=label)
  ax2.set_ylabel(label, color="tab:red")
  ax2.set_ylim(0, 1)
  ax.set_title("training curves")
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def plot_predictions(images, labels, preds, path, colorize, titles=None, *, class_names=None,
                     palette=None, ignore_index: int = 255) -> None:
  """A grid, one row per example: image (RGB uint8), ground truth and prediction (class maps
  coloured by ``colorize``), and with ``class_names`` + ``palette`` ((256, 3) uint8, the colours
  ``colorize`` uses) a legend of the classes present in the truth or the predictions."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib.patches import Patch
  n = len(images)
  fig, axes = plt.subplots(n, 3, figsize=(9, 2.6 * n + (0.5 if class_names else 0)), dpi=100,
                           squeeze=False)
  for i in range(n):
    for j, (im, t) in enumerate(((images[i], "image"), (colorize(labels[i]), "ground truth"),
                                 (colorize(preds[i]), "prediction"))):
      axes[i, j].imshow(im)
      axes[i, j].set_axis_off()
      axes[i, j].set_title(t if titles is None or j else f"{t} {titles[i]}", fontsize=8)
  if class_names is not None and palette is not None:
    present = sorted(set().union(*(np.unique(np.asarray(a)).tolist() for a in (*labels, *preds))))
    handles = [Patch(facecolor=np.asarray(palette[c]) / 255.0, edgecolor="black", lw=0.5,
                     label=class_names[c] if c < len(class_names) else str(c))
               for c in present if c != ignore_index]
    if ignore_index in present:
      handles.append(Patch(facecolor=np.asarray(palette[ignore_index]) / 255.0,
                           edgecolor="black", lw=0.5, label="ignored"))
    fig.legend(handles=handles, loc="lower center", ncol=min(6, max(1, len(handles))),
               fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.5 / (2.6 * n + 0.5), 1, 1))
  else:
    fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def plot_confusion(confusion, class_names, path, *, title: str = "") -> None:
  """A confusion matrix (rows = truth, columns = prediction; counts of images) as a PNG: each
  cell shows its count, coloured by the row's share (per-class recall on the diagonal)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  cm = np.asarray(confusion, np.int64)
  c = len(cm)
  share = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
  size = max(4.0, 0.55 * c + 2.5)
  fig, ax = plt.subplots(figsize=(size, size * 0.9), dpi=100)
  im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
  ax.set_xticks(range(c), labels=list(class_names), rotation=45, ha="right")
  ax.set_yticks(range(c), labels=list(class_names))
  ax.set_xlabel("predicted")
  ax.set_ylabel("true")
  for i in range(c):
    for j in range(c):
      ax.text(j, i, str(int(cm[i, j])), ha="center", va="center",
              color="white" if share[i, j] > 0.5 else "black", fontsize=8)
  fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
  if title:
    ax.set_title(title)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
