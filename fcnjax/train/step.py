"""The jit-compiled train and eval steps, functional over ``nnx.split`` state.

A model is split once into ``graphdef`` (static structure), ``params`` (``nnx.Param``: what the
optimizer updates) and ``rest`` (everything else: dropout RNG state, BatchNorm statistics). The
train step merges them inside the traced function, runs forward + loss + grads + the optax update,
and returns the new state; all of it is one XLA program per batch shape. Under a mesh the batch
arrives sharded over ``"data"`` and the state replicated; XLA inserts the gradient all-reduce.
Buffers that are replaced (params, rest, optimizer state) are donated.

Batches are dicts from :mod:`fcnjax.data.pipeline`: ``image`` (B, H, W, 3) float32 preprocessed,
``label`` (B, H, W) uint8 (255 = ignore), ``mask`` (B, H, W) bool.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from fcnjax.models import masking
from fcnjax.train.loss import classification_loss, dice_loss, segmentation_loss
from fcnjax.train.metrics import update_confusion


@dataclasses.dataclass
class TrainState:
  """Everything that changes during training (a pytree of arrays; ``graphdef`` is static)."""

  params: Any
  rest: Any
  opt_state: Any
  step: jax.Array


jax.tree_util.register_dataclass(TrainState, data_fields=["params", "rest", "opt_state", "step"],
                                 meta_fields=[])


CPU_STEP_COMPILER_OPTIONS = {"xla_backend_optimization_level": 2}
"""XLA options of the train and eval programs on the CPU backend: LLVM's level 2 instead of
XLA's default 3 compiles the default FCN-8s train step ~20 % faster with the step time unchanged
within noise (benchmarks/RESULTS.md, "Compiles"); results agree to float rounding."""


def step_compiler_options() -> dict | None:
  """:data:`CPU_STEP_COMPILER_OPTIONS` on the CPU backend, else ``None`` (XLA's defaults)."""
  return dict(CPU_STEP_COMPILER_OPTIONS) if jax.default_backend() == "cpu" else None


def split_model(model: nnx.Module):
  """``model`` -> (graphdef, params, rest)."""
  return nnx.split(model, nnx.Param, ...)


def init_state(model: nnx.Module, tx: optax.GradientTransformation):
  """(graphdef, TrainState at step 0) for ``model`` and optimizer ``tx``. The optimizer state
  is built by one compiled program (eagerly, each of its zero arrays would be a compile)."""
  graphdef, params, rest = split_model(model)
  return graphdef, TrainState(params, rest, jax.jit(tx.init)(params), jnp.zeros((), jnp.int32))


def make_train_step(graphdef, tx: optax.GradientTransformation, *, reduction: str = "mean",
                    class_weights=None, dice_weight: float = 0.0, dice_classes: str = "all",
                    aux_weight: float = 0.0, frozen_batch_norm: bool = False,
                    state_sharding=None, batch_sharding=None):
  """A jitted ``train_step(state, batch) -> (state, metrics)``.

  The differentiated loss is ``segmentation_loss(..., reduction, class_weights)`` (CE), plus
  ``dice_weight * dice_loss(..., classes=dice_classes)`` when ``dice_weight > 0``. The Dice term
  is in [0, 1] whatever the batch size, so its weight is relative to the per-pixel **mean** CE;
  with ``reduction="sum"`` the CE is larger by the number of valid pixels and ``dice_weight``
  must be scaled to match.

  ``aux_weight > 0`` (a model with an auxiliary head, torchvision's FCN-ResNet: ``model(x,
  return_aux=True) -> (logits, aux_logits)``) adds ``aux_weight`` times the same cross-entropy
  of the aux logits (torchvision's recipe: 0.5). ``frozen_batch_norm``: BatchNorm layers use
  their running statistics in training too and never update them (fine-tuning at small
  per-device batches); their scale and bias are still learnt.

  The model sees ``model(batch["image"], mask=batch["mask"])`` (if it takes a mask): BatchNorm
  statistics in training are over the image pixels' cells of the **global** batch (under a mesh
  the batch is one sharded array and XLA reduces across devices: SyncBN semantics); a size
  bucket's padding and its dummy examples never enter them (:mod:`fcnjax.models.masking`).

  ``metrics``: float32 scalars ``loss`` (the total that was differentiated), ``valid_pixels``,
  ``grad_norm`` (global L2 norm of the gradients, before the optimizer), with Dice on also
  ``ce`` and ``dice`` (the two terms, unweighted), with the aux head ``aux_ce``.
  ``state_sharding`` / ``batch_sharding``:
  optional shardings (replicated state, batch over ``"data"``); without them jit follows the
  inputs' shardings.
  """
  if dice_weight < 0:
    raise ValueError(f"dice_weight must be >= 0, got {dice_weight}")
  if dice_classes not in ("all", "foreground"):
    raise ValueError(f"dice_classes must be 'all' or 'foreground', got {dice_classes!r}")
  if aux_weight < 0:
    raise ValueError(f"aux_weight must be >= 0, got {aux_weight}")
  use_dice = dice_weight > 0

  def train_step(state: TrainState, batch):
    def loss_fn(params):
      model = nnx.merge(graphdef, params, state.rest, copy=True)
      model.train()
      if frozen_batch_norm:
        freeze_batch_norm(model)
      kw = _mask_kwarg(model, batch)
      if aux_weight > 0:
        logits, aux_logits = model(batch["image"], return_aux=True, **kw)
      else:
        logits = model(batch["image"], **kw)
      ce, valid = segmentation_loss(logits, batch["label"], batch["mask"],
                                    reduction=reduction, class_weights=class_weights)
      terms = {"valid_pixels": valid}
      loss = ce
      if aux_weight > 0:
        aux_ce, _ = segmentation_loss(aux_logits, batch["label"], batch["mask"],
                                      reduction=reduction, class_weights=class_weights)
        loss = loss + aux_weight * aux_ce
        terms["aux_ce"] = aux_ce
      if use_dice:
        dice = dice_loss(logits, batch["label"], batch["mask"], classes=dice_classes)
        loss = loss + dice_weight * dice
        terms.update(ce=ce, dice=dice)
      _, _, rest = split_model(model)
      return loss, (terms, rest)

    (loss, (terms, rest)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, **terms, "grad_norm": optax.tree.norm(grads)}
    return TrainState(params, rest, opt_state, state.step + 1), metrics

  kwargs = {}
  if state_sharding is not None:
    kwargs["in_shardings"] = (state_sharding, batch_sharding)
    kwargs["out_shardings"] = (state_sharding, None)
  return jax.jit(train_step, donate_argnums=(0,), compiler_options=step_compiler_options(),
                 **kwargs)


def _mask_kwarg(model, batch) -> dict:
  """``{"mask": batch["mask"]}`` for a model that takes the mask (every fcnjax segmenter),
  else nothing (a model of your own need not take one)."""
  return {"mask": batch["mask"]} if masking.takes_mask(model) else {}


def freeze_batch_norm(model: nnx.Module) -> None:
  """Every ``nnx.BatchNorm`` of ``model`` normalises with (and keeps) its running statistics."""
  for _, m in nnx.iter_modules(model):
    if isinstance(m, nnx.BatchNorm):
      m.use_running_average = True


def make_eval_step(graphdef):
  """A jitted ``eval_step(params, rest, hist, batch) -> hist``.

  ``hist`` (C, C) int32 confusion matrix (rows = truth), accumulated over pixels whose label is
  not 255 and whose mask is True (padding and dummy examples never count). The model sees the
  mask too (``model(image, mask=mask)``), so a ResNet's padding cells stay zero after each
  BatchNorm and torchvision's FCN resizes each image's scores to its own size.
  """

  def eval_step(params, rest, hist, batch):
    model = nnx.merge(graphdef, params, rest, copy=True)
    model.eval()
    logits = model(batch["image"], **_mask_kwarg(model, batch))
    return update_confusion(hist, logits, batch["label"], batch["mask"])

  return jax.jit(eval_step, donate_argnums=(2,), compiler_options=step_compiler_options())


def make_predict(graphdef):
  """A jitted ``predict(params, rest, images) -> (B, H, W) int32`` class map (eval mode)."""

  def predict(params, rest, images):
    model = nnx.merge(graphdef, params, rest, copy=True)
    model.eval()
    return jnp.argmax(model(images), axis=-1).astype(jnp.int32)

  return jax.jit(predict)


# -- the FCN classifier (fcnjax.models.classifier): one class per image ----------------------
def is_classifier(model) -> bool:
  """Whether ``model`` maps images to image-level logits (``task == "classification"``)."""
  return getattr(model, "task", "segmentation") == "classification"


def image_labels(batch) -> tuple[jax.Array, jax.Array]:
  """``(labels (B,) int32, valid (B,) bool)`` of a size-bucket batch of a classification
  source, whose label maps hold the image's class on every pixel: the top-left pixel is the
  image's (padding is at the bottom / right); dummy rows and images that failed to decode have
  mask False there."""
  labels = batch["label"][:, 0, 0].astype(jnp.int32)
  return labels, batch["mask"][:, 0, 0] & (labels != 255)


def make_classifier_train_step(graphdef, tx: optax.GradientTransformation, *,
                               class_weights=None, label_smoothing: float = 0.0,
                               frozen_batch_norm: bool = False, state_sharding=None,
                               batch_sharding=None):
  """A jitted ``train_step(state, batch) -> (state, metrics)`` of a classifier.

  The model sees ``model(batch["image"], mask=batch["mask"])`` (masked pooling and BatchNorm
  statistics over real pixels only); the loss is :func:`~fcnjax.train.loss.classification_loss`
  of the logits against :func:`image_labels`. ``metrics``: float32 scalars ``loss``,
  ``valid_images``, ``correct`` (valid images classified right), ``grad_norm``.
  """
  if not 0 <= label_smoothing < 1:
    raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")

  def train_step(state: TrainState, batch):
    labels, valid = image_labels(batch)

    def loss_fn(params):
      model = nnx.merge(graphdef, params, state.rest, copy=True)
      model.train()
      if frozen_batch_norm:
        freeze_batch_norm(model)
      logits = model(batch["image"], mask=batch["mask"])
      loss, n = classification_loss(logits, labels, valid, class_weights=class_weights,
                                    label_smoothing=label_smoothing)
      _, _, rest = split_model(model)
      return loss, (n, logits, rest)

    (loss, (n, logits, rest)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    correct = jnp.sum((jnp.argmax(logits, -1) == labels) & valid).astype(jnp.float32)
    metrics = {"loss": loss, "valid_images": n, "correct": correct,
               "grad_norm": optax.tree.norm(grads)}
    return TrainState(params, rest, opt_state, state.step + 1), metrics

  kwargs = {}
  if state_sharding is not None:
    kwargs["in_shardings"] = (state_sharding, batch_sharding)
    kwargs["out_shardings"] = (state_sharding, None)
  return jax.jit(train_step, donate_argnums=(0,), compiler_options=step_compiler_options(),
                 **kwargs)


def make_classifier_eval_step(graphdef):
  """A jitted ``eval_step(params, rest, hist, batch) -> hist`` of a classifier: ``hist`` (C, C)
  int32 confusion matrix over **images** (rows = truth, columns = prediction)."""

  def eval_step(params, rest, hist, batch):
    model = nnx.merge(graphdef, params, rest, copy=True)
    model.eval()
    labels, valid = image_labels(batch)
    preds = jnp.argmax(model(batch["image"], mask=batch["mask"]), axis=-1)
    c = hist.shape[0]
    idx = jnp.where(valid, labels * c + preds, c * c)
    return hist + jnp.bincount(idx, length=c * c + 1)[:-1].reshape(c, c).astype(hist.dtype)

  return jax.jit(eval_step, donate_argnums=(2,), compiler_options=step_compiler_options())


def make_classifier_predict(graphdef):
  """A jitted ``predict(params, rest, images, mask) -> (B, C)`` float32 class probabilities."""

  def predict(params, rest, images, mask):
    model = nnx.merge(graphdef, params, rest, copy=True)
    model.eval()
    return jax.nn.softmax(model(images, mask=mask), axis=-1)

  return jax.jit(predict)
