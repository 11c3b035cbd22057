"""Optimizers for FCN training, assembled from optax pieces.

All builders return an ``optax.GradientTransformation`` over the model's learnable parameters,
``nnx.state(model, nnx.Param)``: use it as ``nnx.Optimizer(model, tx, wrt=nnx.Param)``, or call
``tx.init(params)`` / ``tx.update(grads, state, params)`` on the pure pytree (``nnx.split``,
``nnx.to_pure_dict``). ``params`` must be passed to ``update`` (weight decay reads it).

Parameters are grouped by their path in that pytree (:func:`param_labels`):

* ``"weight"``: conv / dense kernels (last key ``kernel``, and any other name): decayed.
* ``"bias"``: last key ``bias``: no decay; in the reference recipe, learning rate ×2.
* ``"norm"``: last key ``scale`` (BatchNorm / LayerNorm): no decay, learning rate ×1.
* ``"frozen"``: with ``freeze_upsampling``, any parameter with ``upscore`` in its path (the
  transposed convs, stored as ``nnx.Param`` only when ``learnable_upsampling=True``): the update
  is exactly zero, as the reference's fixed bilinear deconvolutions (``lr_mult: 0``). With fixed
  upsampling (the default model) they are not parameters at all, so nothing needs freezing.

Learning rates are in units of the loss they multiply: the reference's 1e-10 … 1e-14 go with the
**summed** loss (``segmentation_loss(..., reduction="sum")``); modern recipes' 0.01 with "mean".
"""

from __future__ import annotations

from typing import Any, Callable, Literal

import jax
import optax

Schedule = Callable[[Any], Any]
ScalarOrSchedule = float | Schedule

WEIGHT, BIAS, NORM, FROZEN = "weight", "bias", "norm", "frozen"


def _path_names(path) -> list:
  """Key names of a pytree path, without the trailing ``.value`` of an ``nnx.Variable``."""
  names = []
  for k in path:
    if isinstance(k, jax.tree_util.DictKey):
      names.append(k.key)
    elif isinstance(k, jax.tree_util.GetAttrKey):
      names.append(k.name)
    elif isinstance(k, jax.tree_util.SequenceKey):
      names.append(k.idx)
    elif isinstance(k, jax.tree_util.FlattenedIndexKey):
      names.append(k.key)
    else:
      names.append(str(k))
  if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and names[-1] == "value":
    names.pop()
  return names


def param_kind(path, *, freeze_upsampling: bool = False) -> str:
  """The group (``"weight"``, ``"bias"``, ``"norm"`` or ``"frozen"``) of the leaf at ``path``."""
  names = _path_names(path)
  if freeze_upsampling and any("upscore" in str(n) for n in names):
    return FROZEN
  last = names[-1] if names else None
  if last == "bias":
    return BIAS
  if last == "scale":
    return NORM
  return WEIGHT


def param_labels(params, *, freeze_upsampling: bool = False):
  """A pytree like ``params`` (an ``nnx.State`` or a pure dict) with each leaf's group name."""
  return jax.tree_util.tree_map_with_path(
      lambda p, _: param_kind(p, freeze_upsampling=freeze_upsampling), params)


def decay_mask(params):
  """A pytree like ``params``: True at weights (decayed), False at biases and norm scales."""
  return jax.tree_util.tree_map_with_path(lambda p, _: param_kind(p) == WEIGHT, params)


def _freeze_and_clip(tx: optax.GradientTransformation, freeze_upsampling: bool,
                     clip_global_norm: float | None) -> optax.GradientTransformation:
  """Clip the trainable gradients' global norm, run ``tx`` on them, zero the frozen updates."""
  if clip_global_norm is not None:
    tx = optax.chain(optax.clip_by_global_norm(clip_global_norm), tx)
  if not freeze_upsampling:
    return tx
  return optax.multi_transform(
      {"train": tx, FROZEN: optax.set_to_zero()},
      lambda params: jax.tree_util.tree_map_with_path(
          lambda p, _: FROZEN if param_kind(p, freeze_upsampling=True) == FROZEN else "train",
          params))


def _scaled(learning_rate: ScalarOrSchedule, mult: float) -> ScalarOrSchedule:
  if callable(learning_rate):
    return lambda step: mult * learning_rate(step)
  return mult * learning_rate


def reference_optimizer(learning_rate: ScalarOrSchedule = 1e-10, momentum: float = 0.99,
                        weight_decay: float = 5e-4, bias_lr_mult: float = 2.0,
                        freeze_upsampling: bool = True,
                        clip_global_norm: float | None = None) -> optax.GradientTransformation:
  """The Caffe FCN solver: SGD with momentum, L2 decay on weights only, biases at 2× lr.

  Per parameter, with g the gradient of the **summed** loss and lr_p = ``learning_rate`` ×
  (``bias_lr_mult`` for biases, 1 otherwise)::

      d = g + weight_decay * w      (weights only: Caffe adds the decay to the gradient, before
                                     momentum; biases and norm scales: d = g)
      v = momentum * v + d          (optax.trace)
      w = w - lr_p * v

  Caffe keeps lr inside the momentum buffer (v = m v + lr d; w -= v); with the reference's fixed
  learning rate the two are identical. Upscore (upsampling) parameters get a zero update when
  ``freeze_upsampling``. The reference used 1e-10 (FCN-32s), 1e-12 (16s), 1e-14 (8s) at batch 1.

  Args:
    learning_rate: float or optax schedule (per optimizer step), in units of the summed loss.
    momentum: momentum coefficient (0.99 in the reference).
    weight_decay: L2 coefficient on weights (5e-4); biases and norm scales are not decayed.
    bias_lr_mult: learning-rate multiplier of biases (Caffe ``lr_mult: 2``).
    freeze_upsampling: zero the updates of parameters whose path contains ``upscore``.
    clip_global_norm: optional max global L2 norm of the (trainable) gradients, applied first.
  """
  groups = {
      WEIGHT: optax.chain(optax.add_decayed_weights(weight_decay),
                          optax.sgd(learning_rate, momentum=momentum)),
      BIAS: optax.sgd(_scaled(learning_rate, bias_lr_mult), momentum=momentum),
      NORM: optax.sgd(learning_rate, momentum=momentum),
  }
  tx = optax.multi_transform(groups, param_labels)
  return _freeze_and_clip(tx, freeze_upsampling, clip_global_norm)


def make_schedule(learning_rate: float, total_steps: int | None = None, warmup_steps: int = 0,
                  schedule: Literal["poly", "cosine", "constant"] = "poly",
                  poly_power: float = 0.9, end_value: float = 0.0,
                  warmup_init_value: float = 0.0) -> Schedule:
  """Learning rate as a function of the optimizer step (0-based; one step = one update).

  Linear warm-up from ``warmup_init_value`` to ``learning_rate`` over ``warmup_steps``, then over
  the remaining ``total_steps - warmup_steps`` steps:

  * ``"poly"``: ``end + (lr - end) * (1 - t / T) ** poly_power`` (torchvision, mmseg: power 0.9),
  * ``"cosine"``: cosine decay from ``lr`` to ``end_value``,
  * ``"constant"``: ``lr`` (``total_steps`` not needed).

  The value at ``total_steps`` (and after) is ``end_value`` for poly and cosine.
  """
  if schedule not in ("poly", "cosine", "constant"):
    raise ValueError(f"schedule must be 'poly', 'cosine' or 'constant', got {schedule!r}")
  if warmup_steps < 0:
    raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
  if schedule == "constant":
    main = optax.constant_schedule(learning_rate)
  else:
    if total_steps is None or total_steps <= warmup_steps:
      raise ValueError(f"{schedule} schedule needs total_steps > warmup_steps "
                       f"({total_steps} <= {warmup_steps})")
    decay_steps = total_steps - warmup_steps
    if schedule == "poly":
      main = optax.polynomial_schedule(learning_rate, end_value, poly_power, decay_steps)
    else:
      alpha = end_value / learning_rate if learning_rate else 0.0
      main = optax.cosine_decay_schedule(learning_rate, decay_steps, alpha=alpha)
  if warmup_steps == 0:
    return main
  warmup = optax.linear_schedule(warmup_init_value, learning_rate, warmup_steps)
  return optax.join_schedules([warmup, main], [warmup_steps])


def modern_optimizer(name: Literal["sgd", "adamw"] = "sgd", learning_rate: float = 0.01,
                     total_steps: int | None = None, warmup_steps: int = 0,
                     schedule: Literal["poly", "cosine", "constant"] = "poly",
                     poly_power: float = 0.9, momentum: float = 0.9,
                     weight_decay: float | None = None, nesterov: bool = False, *,
                     decoupled_weight_decay: bool = False, end_value: float = 0.0,
                     warmup_init_value: float = 0.0, b1: float = 0.9, b2: float = 0.999,
                     freeze_upsampling: bool = False,
                     clip_global_norm: float | None = None) -> optax.GradientTransformation:
  """SGD-momentum or AdamW with a scheduled learning rate (per-pixel **mean** loss).

  * ``"sgd"``: momentum ``momentum`` (optionally Nesterov). Weight decay on weights only,
    coupled by default (``g + wd * w`` before momentum, as torch.optim.SGD / torchvision /
    mmseg) or decoupled (``w -= lr * (v + wd * w)``, SGDW) with ``decoupled_weight_decay``.
    Default ``weight_decay`` 1e-4 (torchvision; mmseg uses 5e-4).
  * ``"adamw"``: ``optax.adamw`` with its decoupled decay masked to weights. Default
    ``weight_decay`` 1e-2.

  The learning rate follows :func:`make_schedule` (``learning_rate``, ``total_steps``,
  ``warmup_steps``, ``schedule``, ``poly_power``, ``end_value``, ``warmup_init_value``), counted in
  optimizer updates (with :func:`with_accumulation`, one update per ``every_k`` micro-batches).
  ``freeze_upsampling`` zeroes the updates of ``upscore`` parameters; ``clip_global_norm`` clips
  the trainable gradients' global L2 norm first.
  """
  lr = make_schedule(learning_rate, total_steps, warmup_steps, schedule, poly_power, end_value,
                     warmup_init_value)
  if name == "sgd":
    wd = 1e-4 if weight_decay is None else weight_decay
    if decoupled_weight_decay:
      tx = optax.chain(optax.trace(momentum, nesterov=nesterov),
                       optax.add_decayed_weights(wd, mask=decay_mask),
                       optax.scale_by_learning_rate(lr))
    else:
      tx = optax.chain(optax.add_decayed_weights(wd, mask=decay_mask),
                       optax.sgd(lr, momentum=momentum, nesterov=nesterov))
  elif name == "adamw":
    wd = 1e-2 if weight_decay is None else weight_decay
    tx = optax.adamw(lr, b1=b1, b2=b2, weight_decay=wd, mask=decay_mask, nesterov=nesterov)
  else:
    raise ValueError(f"name must be 'sgd' or 'adamw', got {name!r}")
  return _freeze_and_clip(tx, freeze_upsampling, clip_global_norm)


def with_accumulation(tx: optax.GradientTransformation, every_k: int, *,
                      use_grad_mean: bool = True) -> optax.GradientTransformation:
  """Gradient accumulation (Caffe's ``iter_size``): one real update every ``every_k`` calls.

  Wraps ``tx`` in ``optax.MultiSteps``. The first ``every_k - 1`` calls return zero updates and
  only accumulate; the ``every_k``-th applies ``tx`` once to the **mean** of the accumulated
  gradients (``use_grad_mean=True``) or to their **sum** (``use_grad_mean=False``).

  Which one matches what: Caffe's solver sums the gradients of ``iter_size`` forward/backward
  passes and then divides by ``iter_size`` (``SGDSolver::Normalize``) before decay and momentum,
  i.e. the mean, the default here. The *summed* per-pixel loss of the reference is a separate
  matter (``segmentation_loss(reduction="sum")``): within one pass, pixels are summed. Use
  ``use_grad_mean=False`` to make ``every_k`` micro-batches of a summed loss act exactly like one
  big batch of that summed loss (same learning rate).

  Schedules inside ``tx`` advance once per real update. ``every_k == 1`` returns ``tx``.
  """
  if every_k < 1:
    raise ValueError(f"every_k must be >= 1, got {every_k}")
  if every_k == 1:
    return tx
  return optax.MultiSteps(tx, every_k, use_grad_mean=use_grad_mean).gradient_transformation()
