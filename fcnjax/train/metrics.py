"""Segmentation metrics: a confusion matrix accumulated on device, the FCN paper's four scores on host.

Accumulate ``hist`` with :func:`update_confusion` inside a jitted eval step (it is a (C, C) int32
array, cheap to keep on device and to sum across hosts), then call :func:`segmentation_metrics`
once at the end. The four metrics are exactly the reference's (``score.py`` / pytorch-fcn
``label_accuracy_score``), computed in numpy float64:

* pixel acc  = diag.sum() / hist.sum()
* mean acc   = nanmean(diag / hist.sum(1))
* IU         = diag / (hist.sum(1) + hist.sum(0) - diag),  mean IU = nanmean(IU)
* fwIU       = sum(freq[freq > 0] * IU[freq > 0]),  freq = hist.sum(1) / hist.sum()

``nanmean`` skips classes whose ratio is 0/0: for mean acc, classes absent from the ground truth;
for mean IU, classes absent from both the ground truth and the predictions. A class that is
predicted but never true has IU 0 and *does* count in mean IU, as in the reference.
"""

from __future__ import annotations

import math
import warnings
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

IGNORE_INDEX = 255


def confusion_matrix(preds: jax.Array, labels: jax.Array, mask: jax.Array | None,
                     num_classes: int) -> jax.Array:
  """Pixel counts ``hist[truth, prediction]`` over the valid pixels of a batch.

  Args:
    preds: (B, H, W) integer predicted class ids in ``[0, num_classes)`` (pixels predicted
      outside it are skipped too).
    labels: (B, H, W) integer ground truth (uint8 ok). Pixels labelled 255 (void), or with any
      label outside ``[0, num_classes)``, are skipped.
    mask: (B, H, W) bool or None; False pixels (padding, all of a dummy example) are skipped.
    num_classes: C, static.

  Returns:
    (C, C) int32 counts, rows = truth, columns = prediction. Jit-able, works on sharded batches.
    int32 holds up to 2**31 - 1 pixels per cell (about 11,000 images of 500×375 all in one cell).
  """
  if preds.shape != labels.shape:
    raise ValueError(f"preds shape {preds.shape} != labels shape {labels.shape}")
  c = int(num_classes)
  labels = labels.astype(jnp.int32)
  preds = preds.astype(jnp.int32)
  valid = (labels >= 0) & (labels < c) & (preds >= 0) & (preds < c)
  if mask is not None:
    valid = valid & mask.astype(bool)
  # Invalid pixels go to an extra overflow bin c*c that is cut off. A bincount (an XLA
  # scatter-add), not a one-hot (N, C)^T @ (N, C) matmul: on CPU it is much faster
  # (benchmarks/RESULTS.md). It is done per example (vmap), then summed over the batch: one flat
  # bincount over the whole batch, though a little faster still, raises a ShardingTypeError on a
  # batch sharded over an Explicit mesh (jax.make_mesh's default) and an error outside the mesh
  # context; per example, the batch axis stays sharded and the sum is an all-reduce.
  index = jnp.where(valid, c * labels + preds, c * c).reshape(labels.shape[0], -1)
  per_example = jax.vmap(lambda i: jnp.bincount(i, length=c * c + 1))(index)
  counts = per_example[:, : c * c].sum(0)
  return counts.reshape(c, c).astype(jnp.int32)


def update_confusion(hist: jax.Array, logits: jax.Array, labels: jax.Array,
                     mask: jax.Array | None = None) -> jax.Array:
  """``hist + confusion_matrix(argmax(logits, -1), labels, mask, C)``.

  hist: (C, C) int32; logits: (B, H, W, C) any float dtype; labels (B, H, W) integer;
  mask (B, H, W) bool or None. Returns the new (C, C) int32 hist. Jit-able.
  """
  c = hist.shape[0]
  if logits.shape[-1] != c or hist.shape != (c, c):
    raise ValueError(f"hist {hist.shape} does not match logits with {logits.shape[-1]} classes")
  preds = jnp.argmax(logits, axis=-1)
  return hist + confusion_matrix(preds, labels, mask, c).astype(hist.dtype)


def segmentation_metrics(hist, class_names: Sequence[str] | None = None) -> dict:
  """The four FCN metrics plus per-class IoU, from a (C, C) confusion matrix (rows = truth).

  Computed on host in numpy float64. Returns a dict:

  * ``"pixel_acc"``, ``"mean_acc"``, ``"mean_iu"``, ``"fwiu"``: floats in [0, 1]; NaN when the
    matrix is empty (no valid pixel), never an exception or a warning.
  * ``"per_class_iou"``: ``{class name: IoU}``, ``None`` for a class that appears neither in the
    ground truth nor in the predictions (0/0; skipped by mean IU).
  * ``"per_class_acc"``: ``{class name: recall}``, ``None`` for a class absent from the truth.
  * ``"num_pixels"``: int, the number of valid pixels counted.

  ``class_names`` defaults to ``"0"``, ``"1"``, …; give ``fcnjax.data.palette.VOC_CLASSES`` for VOC.
  """
  hist = np.asarray(jax.device_get(hist), dtype=np.float64)
  if hist.ndim != 2 or hist.shape[0] != hist.shape[1]:
    raise ValueError(f"hist must be square (C, C), got {hist.shape}")
  c = hist.shape[0]
  names = [str(i) for i in range(c)] if class_names is None else [str(n) for n in class_names]
  if len(names) != c:
    raise ValueError(f"{len(names)} class names for {c} classes")
  total = hist.sum()
  diag = np.diag(hist)
  truth, predicted = hist.sum(1), hist.sum(0)
  with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)  # nanmean of all-NaN: "Mean of empty slice"
    pixel_acc = diag.sum() / total if total > 0 else math.nan
    acc_cls = diag / truth
    mean_acc = np.nanmean(acc_cls)
    iu = diag / (truth + predicted - diag)
    mean_iu = np.nanmean(iu)
    freq = truth / total if total > 0 else np.zeros(c)
    fwiu = (freq[freq > 0] * iu[freq > 0]).sum() if total > 0 else math.nan
  as_dict = lambda v: {n: (None if np.isnan(x) else float(x)) for n, x in zip(names, v)}
  return {
      "pixel_acc": float(pixel_acc),
      "mean_acc": float(mean_acc),
      "mean_iu": float(mean_iu),
      "fwiu": float(fwiu),
      "per_class_iou": as_dict(iu),
      "per_class_acc": as_dict(acc_cls),
      "num_pixels": int(total),
  }


def format_metrics(metrics: dict) -> str:
  """One line: ``"mIU 0.523 | pixel acc 0.874 | mean acc 0.610 | fwIU 0.790"``."""
  return (f"mIU {metrics['mean_iu']:.3f} | pixel acc {metrics['pixel_acc']:.3f} | "
          f"mean acc {metrics['mean_acc']:.3f} | fwIU {metrics['fwiu']:.3f}")


def classification_metrics(hist, class_names: Sequence[str] | None = None) -> dict:
  """Image-level metrics of a (C, C) confusion matrix over images (rows = truth).

  ``top1`` (accuracy), ``mean_acc`` (mean per-class recall over classes present: balanced
  accuracy), ``per_class_acc`` ({name: recall or None}), ``confusion`` (the matrix as lists),
  ``images`` (counted images). Python floats / ints, JSON-able.
  """
  hist = np.asarray(hist, np.int64)
  c = hist.shape[0]
  names = list(class_names) if class_names is not None else [str(i) for i in range(c)]
  total = int(hist.sum())
  support = hist.sum(axis=1)
  recall = [float(hist[i, i] / support[i]) if support[i] else None for i in range(c)]
  present = [r for r in recall if r is not None]
  return {"top1": float(np.trace(hist) / total) if total else 0.0,
          "mean_acc": float(np.mean(present)) if present else 0.0,
          "per_class_acc": dict(zip(names, recall)),
          "confusion": hist.astype(int).tolist(), "images": total}
