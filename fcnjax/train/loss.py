"""Per-pixel softmax cross-entropy for semantic segmentation.

The Caffe reference trains on the softmax cross-entropy **summed** over all pixels whose label is
not 255 (``SoftmaxWithLoss`` with ``normalize: false``, ``ignore_label: 255``), which is why its
learning rates are so small (1e-10 summed ≈ 1.9e-5 per pixel at 500×375). Modern recipes average
over the valid pixels instead. :func:`segmentation_loss` offers both, plus a padding mask for
batches of mixed-size images padded to one shape (padding and dummy examples: mask False).

Everything is pure ``jnp``: it runs under ``jax.jit`` and on batches sharded over devices (the
reductions are global sums, so XLA inserts the cross-device all-reduce).
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

IGNORE_INDEX = 255


def segmentation_loss(logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None, *,
                      reduction: Literal["mean", "sum"] = "mean",
                      class_weights: jax.Array | None = None,
                      ignore_index: int = IGNORE_INDEX) -> tuple[jax.Array, jax.Array]:
  """Softmax cross-entropy over the valid pixels of a batch.

  Args:
    logits: (B, H, W, C) unnormalised class scores, any float dtype (bfloat16 is fine: they are
      cast to float32 before the log-softmax, and the whole loss is computed in float32).
    labels: (B, H, W) integer class ids (uint8 is fine). ``ignore_index`` (255, VOC's "void"
      border) is skipped; so is any id outside ``[0, C)``, which cannot be checked under jit.
    mask: optional (B, H, W) bool, False for pixels that carry no data (padding to the batch
      shape, whole dummy examples filling the last batch). None = all pixels are data.
    reduction: ``"sum"``: total negative log-likelihood in nats over valid pixels (the Caffe
      reference, ``SoftmaxWithLoss`` with ``normalize: false``). ``"mean"``: that sum divided by
      the number of valid pixels or, with ``class_weights``, by the sum of the weights of the valid
      pixels (as ``torch.nn.CrossEntropyLoss(weight=..., ignore_index=255)``).
    class_weights: optional (C,) float per-class weight of each pixel's loss term.
    ignore_index: the label to skip.

  Returns:
    ``(loss, num_valid)``: float32 scalars. ``loss`` in nats (summed, or per valid pixel);
    ``num_valid`` the number of pixels that counted (unweighted). With no valid pixel at all both
    are 0 (not NaN), and so is the gradient.
  """
  if reduction not in ("mean", "sum"):
    raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
  if logits.ndim != 4 or labels.shape != logits.shape[:3]:
    raise ValueError(f"expected logits (B, H, W, C) and labels (B, H, W); got {logits.shape} "
                     f"and {labels.shape}")
  num_classes = logits.shape[-1]
  labels = labels.astype(jnp.int32)
  valid = (labels != ignore_index) & (labels >= 0) & (labels < num_classes)
  if mask is not None:
    if mask.shape != labels.shape:
      raise ValueError(f"mask shape {mask.shape} != labels shape {labels.shape}")
    valid = valid & mask.astype(bool)
  safe_labels = jnp.where(valid, labels, 0)

  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  # Pick the true class's log-probability (a gather; its gradient is a one-hot scatter).
  nll = -jnp.take_along_axis(log_probs, safe_labels[..., None], axis=-1)[..., 0]

  if class_weights is None:
    pixel_weight = valid.astype(jnp.float32)
  else:
    class_weights = jnp.asarray(class_weights, jnp.float32)
    if class_weights.shape != (num_classes,):
      raise ValueError(f"class_weights shape {class_weights.shape} != ({num_classes},)")
    # A one-hot contraction, not class_weights[labels]: that gather of a replicated table by a
    # batch-sharded index fails under an Explicit mesh (jax 0.10).
    one_hot = jax.nn.one_hot(safe_labels, num_classes, dtype=jnp.float32)
    pixel_weight = jnp.where(valid, one_hot @ class_weights, 0.0)

  # jnp.where (not multiplication) so an inf/NaN at an ignored pixel cannot leak in.
  total = jnp.sum(jnp.where(valid, pixel_weight * nll, 0.0))
  num_valid = jnp.sum(valid, dtype=jnp.float32)
  if reduction == "sum":
    return total, num_valid
  denom = jnp.sum(pixel_weight)
  safe_denom = jnp.where(denom > 0, denom, 1.0)
  return jnp.where(denom > 0, total / safe_denom, 0.0), num_valid
