"""Batching of concurrent requests of the same image size (``--batch-window-ms``, off by default).

:class:`Batcher` wraps a model ``fn`` (uint8 (n, h, w, 3) -> (n, ...)): a call joins the open
batch of its (h, w), or opens one and becomes its *leader*. The leader waits up to ``window_s``
(less if the batch fills up to ``max_batch`` rows), runs ``fn`` once on the concatenated images,
and hands every member its rows. Calls of other sizes batch separately; a call of more than
``max_batch`` rows runs alone. A batch's row count is padded (with zero images, whose rows are
dropped) to the next power of two up to ``max_batch``, so a size compiles at most
``log2(max_batch) + 1`` programs however the requests arrive. Results equal unbatched ones (the
models run each image independently in eval mode).
"""

from __future__ import annotations

import threading
import time

import numpy as np


def padded_rows(rows: int, max_batch: int) -> int:
  """The next power of two >= ``rows``, at most ``max(rows, max_batch)``."""
  p = 1
  while p < rows:
    p *= 2
  return max(rows, min(p, max_batch))


def batch_rows(max_batch: int) -> tuple:
  """Every row count a batch is padded to: 1, 2, 4, ... up to ``max_batch`` (included)."""
  rows, p = [], 1
  while p < max_batch:
    rows.append(p)
    p *= 2
  return tuple(rows + [max_batch])


class _Batch:
  def __init__(self):
    self.parts = []        # (images, slot index)
    self.rows = 0
    self.full = False
    self.done = threading.Event()
    self.outputs = None    # list of per-part outputs
    self.error = None


class Batcher:
  """``batcher(images)`` == ``fn(images)``, batched with concurrent calls of the same size.

  Args:
    fn: uint8 (n, h, w, 3) -> array (n, ...); thread-safe.
    window_s: how long a batch stays open for more calls (seconds, > 0).
    max_batch: the most rows a batch gets (>= 1).
  """

  def __init__(self, fn, *, window_s: float, max_batch: int = 16):
    if window_s <= 0 or max_batch < 1:
      raise ValueError(f"window_s must be > 0 and max_batch >= 1, got {window_s}, {max_batch}")
    self.fn = fn
    self.window_s = float(window_s)
    self.max_batch = int(max_batch)
    self._cond = threading.Condition()
    self._open = {}        # (h, w) -> the open _Batch
    self.batches = 0       # batches run (for tests and the metadata)
    self.calls = 0

  def __call__(self, images: np.ndarray) -> np.ndarray:
    n = int(images.shape[0])
    if n >= self.max_batch:
      return self.fn(images)
    key = tuple(images.shape[1:])
    with self._cond:
      self.calls += 1
      batch = self._open.get(key)
      if batch is not None and batch.rows + n > self.max_batch:
        batch.full = True  # no room: its leader runs it now; this call opens the next
        del self._open[key]
        self._cond.notify_all()
        batch = None
      leader = batch is None
      if leader:
        batch = self._open[key] = _Batch()
      part = len(batch.parts)
      batch.parts.append(images)
      batch.rows += n
      if batch.rows >= self.max_batch:
        batch.full = True
        if self._open.get(key) is batch:
          del self._open[key]
        self._cond.notify_all()
      if leader:
        deadline = time.monotonic() + self.window_s
        while not batch.full:
          left = deadline - time.monotonic()
          if left <= 0:
            break
          self._cond.wait(left)
        batch.full = True
        if self._open.get(key) is batch:
          del self._open[key]
    if leader:
      self._run(batch)
    else:
      batch.done.wait()
    if batch.error is not None:
      raise batch.error
    return batch.outputs[part]

  def _run(self, batch: _Batch) -> None:
    try:
      rows = batch.rows
      x = np.concatenate(batch.parts) if len(batch.parts) > 1 else batch.parts[0]
      pad = padded_rows(rows, self.max_batch) - rows
      if pad:
        x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])
      out = self.fn(x)
      outputs, start = [], 0
      for p in batch.parts:
        outputs.append(out[start:start + len(p)])
        start += len(p)
      batch.outputs = outputs
      with self._cond:
        self.batches += 1
    except BaseException as e:  # noqa: BLE001 -- every member gets the error
      batch.error = e
    finally:
      batch.done.set()
