"""Per-pixel losses for semantic segmentation: softmax cross-entropy and soft Dice.

The Caffe reference trains on the softmax cross-entropy **summed** over all pixels whose label is
not 255 (``SoftmaxWithLoss`` with ``normalize: false``, ``ignore_label: 255``), which is why its
learning rates are so small (1e-10 summed ≈ 1.9e-5 per pixel at 500×375). Modern recipes average
over the valid pixels instead. :func:`segmentation_loss` offers both, plus a padding mask for
batches of mixed-size images padded to one shape (padding and dummy examples: mask False).

For unbalanced masks (binary, small foreground) two options: ``class_weights`` in the
cross-entropy, and :func:`dice_loss`, a soft Dice term added to it (``make_train_step``'s
``dice_weight``).

Everything is pure ``jnp``: it runs under ``jax.jit`` and on batches sharded over devices (the
reductions are global sums, so XLA inserts the cross-device all-reduce).
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

IGNORE_INDEX = 255


def _valid_pixels(labels, mask, num_classes: int, ignore_index: int):
  """(valid (B, H, W) bool, labels as int32 with invalid pixels set to 0)."""
  labels = labels.astype(jnp.int32)
  valid = (labels != ignore_index) & (labels >= 0) & (labels < num_classes)
  if mask is not None:
    if mask.shape != labels.shape:
      raise ValueError(f"mask shape {mask.shape} != labels shape {labels.shape}")
    valid = valid & mask.astype(bool)
  return valid, jnp.where(valid, labels, 0)


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
  valid, safe_labels = _valid_pixels(labels, mask, num_classes, ignore_index)

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
    # batch-sharded index fails under an Explicit mesh.
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


def dice_loss(logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None, *,
              ignore_index: int = IGNORE_INDEX, smooth: float = 1.0,
              classes: Literal["all", "foreground"] = "all") -> jax.Array:
  r"""Soft Dice loss: one minus the mean over classes of the soft Dice coefficient.

  With :math:`p_{ic}` the softmax probability of class :math:`c` at pixel :math:`i`,
  :math:`g_{ic} = [y_i = c]` the one-hot label, :math:`V` the valid pixels of the **whole batch**
  (label not ``ignore_index``, in ``[0, C)``, ``mask`` True) and :math:`K` the classes scored
  (all :math:`C`, or :math:`1 \ldots C-1` with ``classes="foreground"``):

  .. math::

    D_c = \frac{2 \sum_{i \in V} p_{ic} g_{ic} + s}{\sum_{i \in V} p_{ic}
          + \sum_{i \in V} g_{ic} + s},
    \qquad \mathcal{L} = 1 - \frac{1}{|K|} \sum_{c \in K} D_c

  The sums run over all pixels of all examples at once (one Dice per class per batch, not per
  image), so under a batch sharded over devices they are global sums (XLA all-reduces them) and
  the loss equals the one-device value. A class absent from the batch's ground truth has
  :math:`D_c = s / (\sum_{i \in V} p_{ic} + s)`, which the gradient raises by pushing its
  probabilities down. The denominator is linear in :math:`p` (the common form); V-Net squares both
  terms (:math:`\sum p^2 + \sum g^2`).

  Args:
    logits: (B, H, W, C) unnormalised class scores, any float dtype (cast to float32; the loss
      is computed in float32).
    labels: (B, H, W) integer class ids (uint8 is fine). ``ignore_index`` and any id outside
      ``[0, C)`` are skipped, as in :func:`segmentation_loss`.
    mask: optional (B, H, W) bool, False for padding / dummy examples. None = all pixels.
    ignore_index: the label to skip.
    smooth: :math:`s` above, >= 0 (1.0 is the usual choice): keeps :math:`D_c` defined and
      its gradient bounded for classes with few pixels.
    classes: ``"all"`` scores every class; ``"foreground"`` leaves out class 0 (background),
      the usual choice for binary or small-foreground masks (needs C >= 2).

  Returns:
    A float32 scalar in [0, 1]. Pixels that are not valid contribute nothing to the value or the
    gradient (their logits are replaced before the softmax: NaN there cannot leak in). With no
    valid pixel the loss is 0 and so is its gradient (:math:`D_c := 1` where its denominator is
    0).

  References:
    Milletari, Navab & Ahmadi, `V-Net: Fully Convolutional Neural Networks for Volumetric
    Medical Image Segmentation <https://arxiv.org/abs/1606.04797>`_, 3DV 2016.
  """
  if classes not in ("all", "foreground"):
    raise ValueError(f"classes must be 'all' or 'foreground', got {classes!r}")
  if logits.ndim != 4 or labels.shape != logits.shape[:3]:
    raise ValueError(f"expected logits (B, H, W, C) and labels (B, H, W); got {logits.shape} "
                     f"and {labels.shape}")
  if smooth < 0:
    raise ValueError(f"smooth must be >= 0, got {smooth}")
  num_classes = logits.shape[-1]
  if classes == "foreground" and num_classes < 2:
    raise ValueError("classes='foreground' needs at least 2 classes (class 0 is background)")
  valid, safe_labels = _valid_pixels(labels, mask, num_classes, ignore_index)
  v = valid[..., None]
  # Invalid pixels' logits are replaced before the softmax, so neither their value nor (through
  # the softmax's backward pass) their gradient can carry an inf/NaN into the sums.
  probs = jax.nn.softmax(jnp.where(v, logits.astype(jnp.float32), 0.0), axis=-1)
  probs = jnp.where(v, probs, 0.0)
  one_hot = jnp.where(v, jax.nn.one_hot(safe_labels, num_classes, dtype=jnp.float32), 0.0)
  axes = (0, 1, 2)
  intersection = jnp.sum(probs * one_hot, axis=axes)            # (C,)
  denom = jnp.sum(probs, axis=axes) + jnp.sum(one_hot, axis=axes) + smooth
  safe_denom = jnp.where(denom > 0, denom, 1.0)
  dice = jnp.where(denom > 0, (2.0 * intersection + smooth) / safe_denom, 1.0)
  if classes == "foreground":
    dice = dice[1:]
  return 1.0 - jnp.mean(dice)


def classification_loss(logits: jax.Array, labels: jax.Array, valid: jax.Array, *,
                        class_weights=None, label_smoothing: float = 0.0):
  """Mean cross-entropy of image-level logits over the valid examples.

  Args:
    logits: (B, C) float.
    labels: (B,) int class ids.
    valid: (B,) bool; False for dummy rows and images that failed to decode (they add 0).
    class_weights: optional (C,) per-class weights; the mean is then weighted (``sum(w_y *
      ce) / sum(w_y)``, as ``torch.nn.CrossEntropyLoss(weight=...)``).
    label_smoothing: ``eps`` in [0, 1): the target is ``(1 - eps) * one_hot + eps / C``.

  Returns ``(loss, num_valid)``: float32 scalars (loss 0 when no example is valid).
  """
  num_classes = logits.shape[-1]
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  y = jnp.clip(labels.astype(jnp.int32), 0, num_classes - 1)
  target = jax.nn.one_hot(y, num_classes)
  if label_smoothing:
    target = (1.0 - label_smoothing) * target + label_smoothing / num_classes
  ce = -jnp.sum(target * logp, axis=-1)
  w = valid.astype(jnp.float32)
  if class_weights is not None:
    w = w * jnp.asarray(class_weights, jnp.float32)[y]
  return jnp.sum(w * ce) / jnp.maximum(jnp.sum(w), 1e-12), jnp.sum(valid.astype(jnp.float32))
