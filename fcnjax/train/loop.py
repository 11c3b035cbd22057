"""The training loop: a config in, checkpoints and metrics out.

:func:`train` runs one experiment described by a config (:mod:`fcnjax.configs`; every field is
documented in :mod:`fcnjax.configs.base`) in a work directory. The data comes from
``config.data`` (:func:`fcnjax.data.datasets.make_sources`) unless sources are passed in. It works
unchanged on one device, N local devices and many processes (after
:func:`fcnjax.train.parallel.initialize_distributed`).

Every checkpoint stores the *resolved* config (``model.num_classes`` and the reference learning
rate filled in): a resumed run is checked against it field by field (:func:`check_resume`), and
the class names and palette of the data (so a workdir alone can name and colour predictions).

Evaluation protocols (``config.eval``): ``"exact"`` scores every val image at its own size (the
reference protocol of Caffe and pytorch-fcn; an aligned model still pads its input to a multiple
of 32 inside the model), ``"bucketed"`` zero-pads each image (after preprocessing) to its size
bucket, which with the exact pad-100 FCNs lies inside every prediction's receptive field.
``eval.protocol`` (default bucketed) is used by the evaluations during training: they monitor the
run and choose the best checkpoint, and bucketed compiles one program per bucket where exact
compiles one per distinct image size (41 on the built-in val set, hundreds on VOC val).
``eval.final_protocol`` (default exact) is used by the evaluation at the last step, whose numbers
go to ``final_metrics.json``, and by ``--eval-only``: the final number is the one reported, so it
follows the reference protocol.
"""

from __future__ import annotations

import collections
import contextlib
import json
import math
import os
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
import numpy as np

from fcnjax import configs as configs_lib
from fcnjax import models
from fcnjax import preprocessing as preprocessing_lib
from fcnjax.configs import base as base_config
from fcnjax.data import augment as augment_lib
from fcnjax.data import bucket_costs
from fcnjax.data import buckets as buckets_lib
from fcnjax.data import datasets, pipeline
from fcnjax.data.palette import VOC_PALETTE
from fcnjax.data.validation import DataError
from fcnjax import compilation
from fcnjax.compilation import CompileStats
from fcnjax.train import memory, optim, parallel, report
from fcnjax.train import precompile as precompile_lib
from fcnjax.train import step as step_lib
from fcnjax.train.checkpoint import CheckpointDamaged, CheckpointMismatch, Checkpointer
from fcnjax.train.interrupts import Interrupted, StopRequests
from fcnjax.train.workdir_lock import WorkdirLock
from fcnjax.train.metrics import classification_metrics, format_metrics, segmentation_metrics

WARMUP_FRACTION_MAX = 0.2
"""A short run (tests, ``train.steps``) keeps its warm-up under this fraction of its steps."""
ALIGNED_GRANULARITY = 32
"""The aligned model pads its input to a multiple of 32: buckets are planned on that grid."""
PROTOCOLS = ("exact", "bucketed")
"""Evaluation protocols: each val image at its own size, or padded to its size bucket."""
MAX_TRACED_VAL_BUCKETS = 8
"""A val loader with more buckets (exact: one per image size) is memory-checked on this many
covering buckets instead of one trace per bucket (:meth:`Run._plan_many_buckets`)."""


class TrainingDiverged(RuntimeError):
  """The loss became NaN or infinite; nothing after the last good checkpoint was saved."""


class DataChanged(CheckpointMismatch):
  """The checkpoint's data position belongs to another dataset (files added or removed)."""


# -- the run's pieces, each a function of the config --------------------------------------------
def model_description(config) -> dict:
  """What a checkpoint must match to be restored into this config's model."""
  m = config.model
  return {"model": m.name, "num_classes": m.num_classes, "width_multiplier": m.width_multiplier,
          "aligned": m.aligned, "learnable_upsampling": m.learnable_upsampling,
          "batch_norm": m.batch_norm}


def resolve(config, train_source=None) -> ml_collections.ConfigDict:
  """A copy of ``config`` with what it leaves to the run filled in: ``model.num_classes`` from
  the dataset (0 = "from the data"; another number must equal the dataset's) and the reference
  optimizer's learning rate (None = the paper's rate for the model)."""
  cfg = configs_lib.from_dict(configs_lib.to_dict(config))
  if train_source is not None:
    n = int(train_source.num_classes)
    if cfg.model.num_classes == 0:
      cfg.model.num_classes = n
    elif cfg.model.num_classes != n:
      raise DataError(f"model.num_classes = {cfg.model.num_classes} but the dataset "
                      f"{train_source.name} has {n} classes")
  if cfg.optim.learning_rate is None:
    if cfg.model.name not in base_config.REFERENCE_LR:
      raise configs_lib.ConfigError(
          f"optim.learning_rate is unset and the reference has no rate for {cfg.model.name}; "
          f"set --config.optim.learning_rate")
    cfg.optim.learning_rate = base_config.REFERENCE_LR[cfg.model.name]
  return cfg


def build_model(config, seed: int | None = None):
  """The config's model (parameters initialised from ``seed``, default ``train.seed``)."""
  m = config.model
  if m.num_classes < 1:
    raise ValueError("resolve the config first: model.num_classes is 0 (from the dataset)")
  dtype = {"fp32": None, "bf16": jnp.bfloat16}[m.precision]
  seed = config.train.seed if seed is None else seed

  classifier_options = None
  if is_classifier_config(config):
    classifier_options = {"pooling": m.pooling, "dropout": m.classifier_dropout,
                          "masked": m.masked_pooling}
    if m.classifier_widths:
      classifier_options["widths"] = tuple(m.classifier_widths)
    if m.name != "fcn_classifier":  # the head on VGG / ResNet: no conv-block options
      classifier_options.pop("widths", None)

  def build():
    return models.build_model(m.name, m.num_classes, width_multiplier=m.width_multiplier,
                              aligned=m.aligned, learnable_upsampling=m.learnable_upsampling,
                              batch_norm=m.batch_norm, aux=m.aux_head, dtype=dtype, ops=m.ops,
                              seed=seed, classifier_options=classifier_options)

  # One compiled program for the whole initialisation instead of one eager compile per
  # parameter shape, compiled at XLA's lowest backend optimisation level: it runs once, and
  # that level compiles it several times faster (benchmarks/RESULTS.md, "Compiles").
  graphdefs = []

  def init_state():
    graphdef, state = nnx.split(build())
    graphdefs.append(graphdef)  # static: recorded while tracing
    return state

  lowered = jax.jit(init_state).lower()
  state = lowered.compile(compiler_options=INIT_COMPILER_OPTIONS)()
  return nnx.merge(graphdefs[-1], state)


INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}
"""XLA options of the model-initialisation program (run once: its compile time is what counts;
the parameters are the same draws, equal to those of an eager build to float rounding)."""


def is_classifier_config(config) -> bool:
  """Whether the config trains a classifier (``model.name`` of ``models.CLASSIFIERS``)."""
  return config.model.name in models.CLASSIFIERS


def score_metric(config) -> str:
  """The eval metric the best checkpoint is chosen by: ``top1`` (classifier) or ``mean_iu``."""
  return "top1" if is_classifier_config(config) else "mean_iu"


def format_classification(metrics: dict) -> str:
  return (f"top-1 {metrics['top1']:.4f}, mean class acc {metrics['mean_acc']:.4f} "
          f"({metrics['images']} images)")


def per_class_acc_table(metrics: dict) -> str:
  rows = [f"  {name:<16} acc {acc:.3f}" if acc is not None else f"  {name:<16} (absent)"
          for name, acc in metrics["per_class_acc"].items()]
  return "\n".join(rows)


def drop_too_small(sources: datasets.Sources, min_size, on_bad_data: str,
                   print_fn=print) -> datasets.Sources:
  """``sources`` without the images smaller than ``min_size`` (h, w) (a classifier gives them
  no score cell): counted and named in one line per split, or with ``on_bad_data = "raise"``
  a :class:`DataError` naming them."""
  import dataclasses
  mh, mw = min_size
  out = {}
  for split in ("train", "val"):
    src = getattr(sources, split)
    sizes = np.asarray(src.sizes).reshape(-1, 2)
    small = np.flatnonzero((sizes[:, 0] < mh) | (sizes[:, 1] < mw))
    if small.size:
      ids = [f"{src.ids[i]} ({sizes[i, 0]}x{sizes[i, 1]})" for i in small[:5]]
      more = f" and {small.size - 5} more" if small.size > 5 else ""
      what = (f"{small.size} {split} image(s) smaller than the model's minimum input size "
              f"{mh}x{mw}: {', '.join(ids)}{more}")
      if on_bad_data == "raise" or small.size == len(src):
        raise DataError(f"{what}" + ("" if small.size < len(src) else
                                      f" (that is every {split} image)")
                        + "; use a model with a smaller minimum (fewer stride-2 blocks) or "
                        "--config.data.on_bad_data=skip to leave them out")
      print_fn(f"warning: skipping {what}")
      src = src.subset(np.setdiff1d(np.arange(len(src)), small))
    out[split] = src
  return dataclasses.replace(sources, **out)


def build_optimizer(config, total_steps: int):
  o = config.optim
  if o.optimizer == "reference":
    tx = optim.reference_optimizer(o.learning_rate, momentum=o.momentum,
                                   weight_decay=o.weight_decay)
  else:
    tx = optim.modern_optimizer(o.optimizer, o.learning_rate, total_steps=total_steps,
                                warmup_steps=warmup_steps(config, total_steps),
                                schedule=o.schedule, momentum=o.momentum,
                                weight_decay=o.weight_decay)
  return optim.with_accumulation(tx, o.accumulate) if o.accumulate > 1 else tx


def warmup_steps(config, total_steps: int) -> int:
  return min(config.optim.warmup_steps, int(total_steps * WARMUP_FRACTION_MAX))


def learning_rate_at(config, total_steps: int):
  """``step -> learning rate`` of the config's schedule (for logging)."""
  o = config.optim
  if o.optimizer == "reference":
    return lambda step: o.learning_rate
  # one compiled program for every step (eagerly, each of the schedule's ops compiles once)
  return jax.jit(optim.make_schedule(o.learning_rate, total_steps,
                                     warmup_steps(config, total_steps), o.schedule))


def _max_buckets(config):
  mb = str(config.data.max_buckets)
  return mb if mb == "auto" else int(mb)


def auto_cost_profile(config) -> bucket_costs.CostProfile:
  """The costs ``max_buckets = "auto"`` plans with: the JSON of ``data.cost_profile`` (written
  by ``python -m benchmarks.buckets --calibrate``), else the documented default of this
  backend (:func:`fcnjax.data.bucket_costs.default_profile`). A file that cannot be used raises
  :class:`~fcnjax.configs.ConfigError` naming ``data.cost_profile`` and the problem."""
  path = config.data.cost_profile
  if not path:
    return bucket_costs.default_profile(jax.default_backend())
  try:
    return bucket_costs.load_profile(os.path.expanduser(path))
  except bucket_costs.CostProfileError as e:
    text = str(e)
    for prefix in (f"{os.path.expanduser(path)}: ", f"{path}: "):
      text = text[len(prefix):] if text.startswith(prefix) else text
    raise configs_lib.ConfigError(f"data.cost_profile = {path!r}: {text}",
                                  field="data.cost_profile", value=path) from None


def profile_mismatches(config, profile, num_devices: int) -> list:
  """How this run differs from what ``profile`` was measured for (see
  :meth:`~fcnjax.data.bucket_costs.CostProfile.mismatches`)."""
  m = config.model
  return profile.mismatches(backend=jax.default_backend(), model=m.name,
                            width_multiplier=m.width_multiplier, aligned=m.aligned,
                            precision=m.precision, num_devices=num_devices)


def planned_epochs(config, train_source) -> float:
  """Epochs the run trains: ``train.epochs``, or ``train.steps`` converted at ~one batch of
  ``data.batch_size`` per step when it is set (at least 1)."""
  epochs = float(config.train.epochs)
  if config.train.steps is not None:
    per_epoch = max(1.0, len(train_source) / max(1, config.data.batch_size or 1))
    epochs = max(1.0, config.train.steps / per_epoch)
  return epochs


def _auto_plan_kwargs(config, train_source) -> dict | None:
  """``max_buckets = "auto"``: the cost model of :func:`auto_cost_profile` over the run's
  planned epochs (:func:`planned_epochs`); None for a fixed K."""
  if _max_buckets(config) != "auto":
    return None
  return auto_cost_profile(config).plan_kwargs(planned_epochs(config, train_source))


def _auto_eval_plan_kwargs(config) -> dict | None:
  """The val loader's ``max_buckets = "auto"``: the same costs over the run's evaluations
  (every ``eval.every_epochs`` epochs and the final one; the eval step is charged as the train
  step, whose compile and per-pixel costs are both ~2-3x the eval step's)."""
  if _max_buckets(config) != "auto":
    return None
  evaluations = config.train.epochs // max(1, config.eval.every_epochs) + 1
  return auto_cost_profile(config).plan_kwargs(evaluations)


def eval_protocols(config) -> tuple:
  """The evaluation protocols a training run of ``config`` uses, each once: that of the
  evaluations during training, then that of the final one."""
  return tuple(dict.fromkeys((config.eval.protocol, config.eval.final_protocol)))


def build_loaders(config, train_source, val_source, num_devices: int, *, start_epoch: int = 0,
                  done_steps: int = 0, max_batch_sizes=None, eval_max_batch_sizes=None,
                  protocols=("bucketed",), preprocessing=preprocessing_lib.CAFFE):
  """(train loader, ``{protocol: val loader}``), one val loader per protocol of ``protocols``
  (:data:`PROTOCOLS`; ``()``: none). ``start_epoch``: the train loader starts at that epoch, for
  a run that already did ``done_steps`` steps (``--restart-epoch``). ``max_batch_sizes``:
  ``{(H, W): cap}`` from the memory plan (:mod:`fcnjax.train.memory`); ``eval_max_batch_sizes``:
  ``{protocol: {(H, W): cap}}`` likewise for the val loaders. ``preprocessing``: the model's
  input convention (``model.preprocessing``: that of its ``model.init`` weights)."""
  d, a = config.data, config.augment
  granularity = max(d.granularity, ALIGNED_GRANULARITY if config.model.aligned else 1)
  dist = dict(num_devices=num_devices, process_index=jax.process_index(),
              process_count=jax.process_count(), granularity=granularity,
              preprocessing=preprocessing)
  aug = augment_lib.Augment(flip=a.flip, scale_range=tuple(a.scale_range) or None,
                            color_jitter=a.color_jitter)
  batching = (dict(batch_size=None, pixels_per_batch=d.pixels_per_batch)
              if d.pixels_per_batch else dict(batch_size=d.batch_size, pixels_per_batch=None))

  def train_loader(num_epochs):
    return pipeline.make_train_loader(train_source, seed=config.train.seed,
                                      num_epochs=num_epochs, start_epoch=start_epoch,
                                      augment=aug, max_buckets=_max_buckets(config),
                                      plan_kwargs=_auto_plan_kwargs(config, train_source),
                                      num_workers=d.num_workers, max_batch_sizes=max_batch_sizes,
                                      **batching, **dist)

  train = train_loader(max(1, config.train.epochs - start_epoch))
  if config.train.steps is not None:
    per_epoch = max(1, min(train.batches_per_epoch))
    left = max(1, config.train.steps - done_steps)
    train = train_loader(max(1, math.ceil(left / per_epoch)))
  eval_batching = dict(batching)
  if d.eval_batch_size:
    eval_batching = dict(batch_size=d.eval_batch_size, pixels_per_batch=None)
  caps = eval_max_batch_sizes or {}
  vals = {}
  for protocol in protocols:
    if protocol == "exact":
      vals[protocol] = exact_eval_loader(
          val_source, eval_batching, dist, max_batch_sizes=caps.get(protocol),
          multiple=ALIGNED_GRANULARITY if config.model.aligned else 1)
    elif protocol == "bucketed":
      vals[protocol] = pipeline.make_eval_loader(val_source, max_buckets=_max_buckets(config),
                                                 plan_kwargs=_auto_eval_plan_kwargs(config),
                                                 **eval_batching,
                                                 max_batch_sizes=caps.get(protocol), **dist)
    else:
      raise ValueError(f"unknown evaluation protocol {protocol!r}; protocols: {PROTOCOLS}")
  return train, vals


def exact_eval_loader(val_source, batching: dict, dist: dict, *, max_batch_sizes=None,
                      multiple: int = 1):
  """The val loader of the exact protocol: one bucket per distinct (h, w) of
  ``val_source.sizes``, so no image is padded. ``multiple`` > 1 (the aligned model, which pads
  its input with zeros to a multiple of 32 itself): sizes are rounded up to it, which gives the
  model the very input it would build from the image alone, in fewer programs. Each bucket's
  batch (``batching``: ``batch_size`` or ``pixels_per_batch``) is capped to its number of images
  rounded up to a multiple of the device count (``dist["num_devices"]``; a size seen once runs no extra dummy rows), and by
  ``max_batch_sizes`` (``{(H, W): cap}``, a memory plan's) where given. ``dist``: the
  distribution arguments of :func:`~fcnjax.data.pipeline.make_loader`."""
  nd = int(dist["num_devices"])
  sizes = np.asarray(val_source.sizes, np.int64).reshape(-1, 2)
  sizes = -(-sizes // multiple) * multiple
  shapes, counts = np.unique(sizes, axis=0, return_counts=True)
  memory_caps = {tuple(int(v) for v in k): int(c) for k, c in (max_batch_sizes or {}).items()}
  caps = {}
  for (h, w), n in zip(shapes.tolist(), counts.tolist()):
    cap = -(-int(n) // nd) * nd
    caps[(h, w)] = min(cap, memory_caps.get((h, w), cap))
  return pipeline.make_eval_loader(val_source, bucket_shapes=[tuple(s) for s in shapes.tolist()],
                                   max_batch_sizes=caps, **batching, **dist)


def check_resume(saved: dict, config, allow=()) -> list:
  """Compare a checkpoint's stored config with the requested one.

  Returns the fields that differ and were allowed (``allow``: field names, or ``"all"``) or are
  free to change (:data:`fcnjax.configs.FREE_ON_RESUME`); raises :class:`CheckpointMismatch`
  listing any other difference.
  """
  diffs = configs_lib.differences(configs_lib.from_dict(saved), config, ignore=())
  allowed = set(configs_lib.FREE_ON_RESUME) | set(allow)
  refused = [d for d in diffs if "all" not in allowed and d[0] not in allowed]
  if refused:
    lines = "; ".join(f"{k}: checkpoint has {a!r}, requested {b!r}" for k, a, b in refused)
    raise CheckpointMismatch(
        f"the requested config differs from the one this run was started with: {lines}. "
        "Resume without --config to continue it as it was, or pass --allow-change "
        f"{','.join(k for k, _, _ in refused)} to change those fields")
  return diffs


def per_class_table(metrics: dict) -> str:
  """The per-class IoU and accuracy as aligned text lines, one class per line."""
  iou, acc = metrics["per_class_iou"], metrics["per_class_acc"]
  width = max(len(n) for n in iou)
  fmt = lambda v: "   -  " if v is None else f"{v:6.3f}"
  lines = [f"  {'class':<{width}}    IoU    acc"]
  lines += [f"  {n:<{width}} {fmt(iou[n])} {fmt(acc[n])}" for n in iou]
  return "\n".join(lines)


def val_loader_report(protocol: str, loader) -> str:
  """The ``describe`` lines of one val loader: the bucket plan (bucketed), or one line (exact:
  one bucket per image size, which would be hundreds of lines)."""
  if protocol != "exact":
    return "val buckets: " + loader.report().replace("\n", "\n  ")
  bs = loader.batch_sizes
  return (f"val (exact): every image at its own size, {len(loader.bucket_shapes)} programs (one "
          f"per distinct size; the aligned model's sizes rounded up to the 32 it pads to "
          f"itself); batch {min(bs)}-{max(bs)}, {len(loader)} batches")


class Run:
  """State and outputs of one run (kept small: the loop itself is :func:`train`).

  ``protocols``: the evaluation protocols the run will use (default :func:`eval_protocols`); one
  val loader each, in ``val_loaders`` (``{protocol: Loader}``).
  """

  def __init__(self, config, sources: datasets.Sources, workdir, *, print_fn=print,
               protocols=None):
    self.cfg = config
    self.workdir = pathlib.Path(workdir)
    self.primary = jax.process_index() == 0
    self.print = print_fn if self.primary else (lambda *a, **k: None)
    self.mesh = parallel.make_mesh()
    self.sources = sources
    self.val_source = sources.val
    self.data_offset = 0  # global step at which the train loader's batch 0 is (--restart-epoch)
    self.protocols = tuple(protocols or eval_protocols(config))
    model = build_model(config)
    if step_lib.is_classifier(model):  # images below the model's minimum have no score cell
      sources = drop_too_small(sources, models.min_input_size(model), config.data.on_bad_data,
                               self.print)
      self.sources, self.val_source = sources, sources.val
    if config.model.init:
      from fcnjax import weights
      loaded = weights.init_from(config.model.init, model,
                                 reinit_scores=config.model.reinit_scores,
                                 allow_geometry_change=config.model.allow_geometry_change)
      self.print(f"init: {config.model.init}: {loaded}")
    self.preprocessing = model.preprocessing
    self.train_loader, self.val_loaders = build_loaders(config, sources.train, sources.val,
                                                        self.mesh.size, protocols=self.protocols,
                                                        preprocessing=self.preprocessing)
    self.num_params = models.count_params(model)
    self.model = model
    class_weights = tuple(config.loss.class_weights)
    if class_weights and len(class_weights) != config.model.num_classes:
      raise configs_lib.ConfigError(
          f"loss.class_weights has {len(class_weights)} weights for "
          f"{config.model.num_classes} classes", field="loss.class_weights",
          value=class_weights)
    self.memory_caps = None  # {(H, W): batch cap} of the memory plan (None: no bucket capped)
    self._build_steps()
    self._plan_memory()
    self.classifier = step_lib.is_classifier(model)
    self.score_metric = score_metric(config)
    self.ckpt = Checkpointer(self.workdir, keep=config.checkpoint.keep,
                             best_metric=self.score_metric)
    self.log = report.MetricsLog(self.workdir, enabled=self.primary, notice=self.print)
    self.tensorboard = None
    names = sources.val.class_names or sources.train.class_names
    self.class_names = (tuple(names) if names and len(names) == config.model.num_classes
                        else tuple(str(i) for i in range(config.model.num_classes)))
    self.palette = np.asarray(getattr(sources.val, "palette", None)
                              if getattr(sources.val, "palette", None) is not None
                              else VOC_PALETTE, np.uint8)
    self.bad = {"train": {}, "val": {}}  # split -> {example index: Problem text}
    self.compiler = precompile_lib.Precompiler({}, print_fn=self.print)  # see precompile()
    self.bad_in_epoch = collections.Counter()

  def _build_steps(self, state=None):
    """Optimizer, train/eval programs for the current train loader (its total steps)."""
    config = self.cfg
    left = len(self.train_loader)
    self.total_steps = self.data_offset + left
    if config.train.steps is not None:
      self.total_steps = min(config.train.steps, self.total_steps)
    self.lr_at = learning_rate_at(config, self.total_steps)
    tx = build_optimizer(config, self.total_steps)
    if state is None:
      self.graphdef, state = step_lib.init_state(self.model, tx)
      self.state = parallel.replicate(state, self.mesh)
    class_weights = tuple(config.loss.class_weights) or None
    if step_lib.is_classifier(self.model):
      self.train_step = step_lib.make_classifier_train_step(
          self.graphdef, tx, class_weights=class_weights,
          label_smoothing=config.loss.label_smoothing,
          frozen_batch_norm=config.model.frozen_batch_norm,
          state_sharding=jax.tree.map(lambda x: x.sharding, self.state),
          batch_sharding=parallel.batch_sharding(self.mesh))
      self.eval_step = step_lib.make_classifier_eval_step(self.graphdef)
      self.predict = step_lib.make_classifier_predict(self.graphdef)
      return
    has_aux = getattr(self.model, "aux_classifier", None) is not None
    self.train_step = step_lib.make_train_step(
        self.graphdef, tx, reduction=config.loss.reduction, class_weights=class_weights,
        dice_weight=config.loss.dice_weight,
        aux_weight=config.loss.aux_weight if has_aux else 0.0,
        frozen_batch_norm=config.model.frozen_batch_norm,
        state_sharding=jax.tree.map(lambda x: x.sharding, self.state),
        batch_sharding=parallel.batch_sharding(self.mesh))
    self.eval_step = step_lib.make_eval_step(self.graphdef)
    self.predict = step_lib.make_predict(self.graphdef)

  def _plan_memory(self) -> None:
    """Fit every bucket's step into the device's memory before training (see
    :mod:`fcnjax.train.memory`): lower a bucket's batch where needed, or raise
    :class:`~fcnjax.train.memory.StepMemoryError` naming an image that does not fit alone.
    Evaluation batches (every val loader's, :meth:`_plan_val`) are capped with the train step's
    figures (an upper bound for them)."""
    limit = memory.device_memory_bytes()
    if limit is None:
      self.print(f"memory: this device's memory is unknown, batches not planned (set "
                 f"{memory.ENV_VAR}, e.g. {memory.ENV_VAR}=16G)")
      return
    loader = self.train_loader
    plan = memory.plan_batch_sizes(self.train_step, self.state, loader.bucket_shapes,
                                   loader.batch_sizes, num_devices=self.mesh.size,
                                   limit_bytes=limit,
                                   images_of_bucket=memory.bucket_images(loader))
    for line in plan.log_lines():
      self.print("memory: " + line)
    eval_caps = {}  # protocol -> {(H, W): cap}, for the val loaders with a reduced bucket
    for protocol, val in self.val_loaders.items():
      vplan = self._plan_val(val, plan, limit)
      for line in vplan.log_lines():
        self.print(f"memory (val, {protocol}): " + line)
      if vplan.reduced:
        eval_caps[protocol] = {tuple(s): b for s, b in zip(vplan.bucket_shapes,
                                                           vplan.batch_sizes)}
    if plan.reduced or eval_caps:
      self.memory_caps = {tuple(s): b for s, b in zip(plan.bucket_shapes, plan.batch_sizes)}
      self.train_loader, self.val_loaders = build_loaders(
          self.cfg, self.sources.train, self.sources.val, self.mesh.size,
          max_batch_sizes=self.memory_caps, eval_max_batch_sizes=eval_caps,
          protocols=self.protocols, preprocessing=self.preprocessing)
      self._build_steps(state=self.state)

  def _plan_val(self, loader, plan: memory.MemoryPlan, limit: int) -> memory.MemoryPlan:
    """The memory plan of one val loader's batches, from the train ``plan``'s memory model when
    it has one (no compile); else the quick check of :func:`memory.plan_batch_sizes` (a trace
    per bucket), or for a loader with more than :data:`MAX_TRACED_VAL_BUCKETS` buckets (the
    exact protocol: one per image size) :meth:`_plan_many_buckets`."""
    kw = dict(num_devices=self.mesh.size, limit_bytes=limit,
              images_of_bucket=memory.bucket_images(loader))
    if plan.model is not None:
      return memory.plan_from_model(plan.model, loader.bucket_shapes, loader.batch_sizes, **kw)
    if len(loader.bucket_shapes) > MAX_TRACED_VAL_BUCKETS:
      return self._plan_many_buckets(loader, limit)
    return memory.plan_batch_sizes(self.train_step, self.state, loader.bucket_shapes,
                                   loader.batch_sizes, **kw)

  def _plan_many_buckets(self, loader, limit: int) -> memory.MemoryPlan:
    """A memory plan for a loader with many buckets at the cost of a few traces.

    The loader's bucket shapes are covered by :data:`MAX_TRACED_VAL_BUCKETS` larger shapes
    (:func:`~fcnjax.data.buckets.plan_buckets`), each checked with the train step's bound
    (:func:`memory.step_memory_bound`) at the largest batch among the buckets it covers: memory
    grows with the batch and with both sides, so a covering shape under the budget vouches for
    all its buckets (plan ``method="bound"``, nothing reduced). If one is over, a memory model
    calibrated on the loader's own buckets (2-3 compiles) caps them (no verification compile).
    """
    nd = self.mesh.size
    shapes = [(int(h), int(w)) for h, w in loader.bucket_shapes]
    requested = [int(b) for b in loader.batch_sizes]
    budget = int(memory.DEFAULT_HEADROOM * limit)
    cover = buckets_lib.plan_buckets(np.asarray(shapes), MAX_TRACED_VAL_BUCKETS).shapes
    which = buckets_lib.assign_buckets(np.asarray(shapes), cover)
    batch = {int(k): max(b for b, j in zip(requested, which) if j == k) for k in set(which)}
    bounds = {}
    for k in sorted(batch, key=lambda k: -batch[k] * int(cover[k].prod())):
      bounds[k] = memory.step_memory_bound(self.train_step, self.state,
                                           (batch[k], *(int(v) for v in cover[k])),
                                           num_devices=nd)["peak"]
      if bounds[k] > budget:
        break
    else:
      est = [int(bounds[int(k)]) for k in which]
      return memory.MemoryPlan(shapes, requested, list(requested), est, list(est),
                               [False] * len(shapes), [], int(limit), memory.DEFAULT_HEADROOM,
                               nd, None, method="bound")
    model = memory.calibrate(self.train_step, self.state, shapes, num_devices=nd,
                             batch_sizes=requested, budget_bytes=budget)
    return memory.plan_from_model(model, shapes, requested, num_devices=nd, limit_bytes=limit,
                                  images_of_bucket=memory.bucket_images(loader))

  def protocols_ahead(self, step: int, *, train: bool = True, pending: bool = False) -> list:
    """The evaluation protocols the run still uses from ``step`` on, in order of first use:
    that of a ``pending`` evaluation at ``step``, ``eval.protocol`` if an evaluation before the
    last step is due (every ``eval.every_epochs`` epochs), and ``eval.final_protocol``;
    ``train=False`` (``--eval-only``): the final protocol alone."""
    e = self.cfg.eval
    if not train:
      return [e.final_protocol]
    out = [self.protocol_at(step)] if pending else []
    if step < self.total_steps:
      first, last = self.epoch_of(step)[0], self.epoch_of(self.total_steps - 1)[0]
      if any((epoch + 1) % e.every_epochs == 0 for epoch in range(first, last)):
        out.append(e.protocol)
    out.append(e.final_protocol)
    return list(dict.fromkeys(out))

  def precompile(self, step: int, *, train: bool = True, pending: bool = False) -> None:
    """Start compiling every program the run will run from ``step`` on
    (:mod:`fcnjax.train.precompile`): the train step of each train bucket, then the eval step
    of each bucket of the val loaders of :meth:`protocols_ahead`, so that the loop only ever
    waits for a program that is still compiling (``train=False``: no train programs, for
    ``--eval-only``). ``train.precompile = False``: nothing (each program compiles at its first
    use, as a plain jit call does)."""
    jobs, counts = {}, collections.Counter()
    threads = (self.cfg.train.compile_threads
               or precompile_lib.default_threads(jax.default_backend()))
    if self.cfg.train.precompile and threads == 0 and self.primary:
      self.print(f"compile: each program at its first use ({os.cpu_count()} CPU cores shared "
                 "with the steps: compiling ahead would slow both; "
                 "--config.train.compile_threads=N compiles ahead on N threads)")
    if self.cfg.train.precompile and threads > 0:
      abs_state = memory.abstract_state(self.state)
      sharding = parallel.batch_sharding(self.mesh)
      train_step, eval_step = self.train_step, self.eval_step
      loader = self.train_loader
      if train:
        for (h, w), b in zip(loader.bucket_shapes, loader.batch_sizes):
          shape = (int(b), int(h), int(w))
          batch = memory.abstract_batch(shape, sharding)
          jobs.setdefault(("train", shape), lambda batch=batch: train_step.lower(
              abs_state, batch).compile())
        counts["train"] = len(jobs)
      order = self.protocols_ahead(step, train=train, pending=pending)
      c = self.cfg.model.num_classes
      hist = jax.ShapeDtypeStruct((c, c), jnp.int32,
                                  sharding=parallel.replicated(self.mesh))
      for protocol in (p for p in order if p in self.val_loaders):
        val = self.val_loaders[protocol]
        for (h, w), b in zip(val.bucket_shapes, val.batch_sizes):
          shape = (int(b), int(h), int(w))
          if ("eval", shape) in jobs:
            continue
          batch = memory.abstract_batch(shape, sharding)
          jobs[("eval", shape)] = lambda batch=batch: eval_step.lower(
              abs_state.params, abs_state.rest, hist, batch).compile()
          counts["eval"] += 1
    what = " + ".join(f"{n} {k}" for k, n in counts.items() if n)
    self.compiler = precompile_lib.Precompiler(
        jobs, threads=max(1, threads), print_fn=self.print,
        label=f" ({what})" if what else "", progress=None if self.primary else False)

  def start_outputs(self) -> None:
    """Write config.json and open TensorBoard (only once the run is known to go ahead)."""
    if self.primary:
      self.workdir.mkdir(parents=True, exist_ok=True)
      (self.workdir / "config.json").write_text(
          json.dumps(configs_lib.to_dict(self.cfg), indent=1, sort_keys=True))
      if self.cfg.output.tensorboard:
        self.tensorboard = report.TensorBoardWriter(self.workdir / "tensorboard")

  # -- resuming -------------------------------------------------------------------------------
  def resume_data(self, meta: dict, step: int, restart_epoch: bool):
    """A fresh train iterator positioned where the checkpoint's data state says.

    If the checkpoint's loader started at a later epoch (an earlier ``--restart-epoch``), the
    loader is rebuilt the same way. If the dataset changed since the checkpoint (another number
    of images, other buckets), raises :class:`DataChanged` unless ``restart_epoch``: then the
    interrupted epoch starts again from its first batch with the new data.
    """
    data = dict(meta.get("data") or {})
    start_epoch = int(data.get("start_epoch", 0))
    offset = int(meta.get("data_offset", 0))
    saved_bs, mine = data.get("batch_sizes"), self.train_loader.fingerprint()
    if (saved_bs and data.get("bucket_shapes") == mine["bucket_shapes"]
        and saved_bs != mine["batch_sizes"]
        and all(a <= b for a, b in zip(saved_bs, mine["batch_sizes"]))):
      # smaller batches than this device needs (the run started where memory was tighter):
      # keep them, so the run continues exactly
      self.memory_caps = {tuple(s): int(b) for s, b in zip(mine["bucket_shapes"], saved_bs)}
      self._rebuild_train(start_epoch, offset)
    elif start_epoch != self.train_loader.start_epoch or offset != self.data_offset:
      self._rebuild_train(start_epoch, offset)
    it = iter(self.train_loader)
    try:
      it.set_state(data)
      return it
    except ValueError as e:
      mine = self.train_loader.fingerprint()
      changed = "; ".join(f"{k}: checkpoint {data.get(k)!r}, now {mine[k]!r}" for k in mine
                          if k in data and data[k] != mine[k] and k != "bucket_shapes")
      if data.get("bucket_shapes") != mine["bucket_shapes"]:
        changed += ("; " if changed else "") + "the size buckets differ"
      if data.get("batch_sizes") != mine["batch_sizes"]:
        changed += " (batch sizes follow the memory plan of the device, see the 'memory:' lines)"
      if not restart_epoch:
        raise DataChanged(
            f"the training data or batches changed since checkpoint {step} ({changed or e}): "
            "the saved "
            "position in the epoch no longer means the same images. Pass --restart-epoch to "
            "start the interrupted epoch again with the new data (the learned state is kept), "
            "or restore the dataset as it was") from None
    epoch = int(meta.get("epoch", 0)) + (1 if meta.get("epoch_done", False) else 0)
    self.print(f"data changed since checkpoint {step} ({changed}): --restart-epoch: epoch "
               f"{epoch + 1} starts again from its first batch at step {step}")
    self._rebuild_train(epoch, step)
    return iter(self.train_loader)

  def _rebuild_train(self, start_epoch: int, offset: int):
    if start_epoch >= self.cfg.train.epochs and self.cfg.train.steps is None:
      raise DataChanged(f"the checkpoint's data position is epoch {start_epoch + 1} of "
                        f"{self.cfg.train.epochs}: nothing left to train")
    self.data_offset = offset
    self.train_loader, _ = build_loaders(self.cfg, self.sources.train, self.sources.val,
                                         self.mesh.size, start_epoch=start_epoch,
                                         done_steps=offset, max_batch_sizes=self.memory_caps,
                                         protocols=(), preprocessing=self.preprocessing)
    self._build_steps(state=self.state)

  def epoch_of(self, step: int) -> tuple:
    """(epoch, batch within the epoch) of global step ``step`` (0-based)."""
    return self.train_loader.epoch_and_batch(step - self.data_offset)

  def data_state(self, step: int, it) -> dict:
    """The iterator state that makes a resumed run's next batch the one of step ``step``."""
    return {**it.get_state(), "next_batch": int(step - self.data_offset)}

  # -- reporting ------------------------------------------------------------------------------
  def describe(self) -> None:
    c = self.cfg
    devs = jax.devices()
    self.print(f"devices: {len(devs)} x {devs[0].platform} ({devs[0].device_kind}) on "
               f"{jax.process_count()} process(es); mesh {dict(self.mesh.shape)}")
    self.print(f"data: train {len(self.sources.train)} images ({self.sources.train.name}), val "
               f"{len(self.val_source)} images ({self.val_source.name})")
    self.print(f"classes: {c.model.num_classes} ({', '.join(self.class_names)})")
    self.print("train buckets: " + self.train_loader.report().replace("\n", "\n  "))
    if _max_buckets(c) == "auto":
      profile = auto_cost_profile(c)
      self.print(f"buckets auto: {profile.describe()}")
      for line in profile_mismatches(c, profile, len(devs)):
        self.print(f"warning: {line} (measure this run's costs with python -m "
                   "benchmarks.buckets --calibrate and pass --cost-profile)")
      if self.train_loader.plan.auto_reason():
        self.print(f"  train {self.train_loader.plan.auto_reason()}")
    for protocol, loader in self.val_loaders.items():
      self.print(val_loader_report(protocol, loader))
    for line in memory.dummy_row_warnings(self.train_loader):
      line = line.split(" Fix: ")[0]
      self.print(f"warning: {line} Fix: --max-buckets (fewer or other buckets, so these images "
                 "share one) or --pixels-per-batch (large buckets get small batches)")
    geometry = ("" if models.SPECS[c.model.name].family != "vgg"
                else ("aligned, " if c.model.aligned else "exact, "))
    self.print(f"model: {c.model.name} ({geometry}width "
               f"x{c.model.width_multiplier:g}, {c.model.precision}), {self.num_params:,} "
               f"learnable parameters; {self.total_steps} steps")

  def meta(self, step: int, it, **extra) -> dict:
    """What a checkpoint at ``step`` stores besides the state: model, config, data position,
    the epoch of the last trained step (0-based) and whether that step ended it, the class
    names (list of ``num_classes`` str), the palette ((256, 3) uint8 as nested lists) and the
    input convention's name (``preprocessing``)."""
    if step <= self.data_offset:
      epoch, done = self.train_loader.start_epoch, False
    else:
      epoch = self.epoch_of(step - 1)[0]
      done = (step >= self.data_offset + len(self.train_loader)
              or self.epoch_of(step)[0] != epoch)
    return {"model": model_description(self.cfg), "config": configs_lib.to_dict(self.cfg),
            "step": step, "data": self.data_state(step, it), "data_offset": self.data_offset,
            "epoch": int(epoch), "epoch_done": bool(done), "total_steps": self.total_steps,
            "class_names": list(self.class_names), "palette": self.palette.tolist(),
            "preprocessing": self.preprocessing.name, **extra}

  def colorize(self, label):
    return self.palette[np.asarray(label, np.uint8)]

  # -- bad files met while decoding -------------------------------------------------------------
  def check_rows(self, batch, split: str, step: int, it=None) -> None:
    """Name (once) and count the examples of ``batch`` that failed to decode (rows with an
    index but no valid pixel). With ``data.on_bad_data = "raise"`` the run stops: for the train
    split after saving ``step`` (this batch not trained)."""
    index = np.asarray(batch["index"])
    rows = np.flatnonzero((index >= 0) & ~np.asarray(batch["mask"]).any(axis=(1, 2)))
    if not rows.size:
      return
    source = self.sources.train if split == "train" else self.val_source
    for r in rows:
      i = int(index[r])
      self.bad_in_epoch[(split, i)] += 1
      if i in self.bad[split]:
        continue
      problem = source.problem_of(i)  # decoded again here: the worker's record is not ours
      text = str(problem) if problem is not None else (
          f"{source.image_paths[i]}: could not be decoded")
      self.bad[split][i] = text
      if self.cfg.data.on_bad_data == "raise":
        where = ""
        if split == "train" and it is not None and step > 0:
          self.save(step, it)
          where = f"; saved checkpoint {step} first (this batch not trained)"
        elif split == "val":
          where = f"; checkpoint {step} was saved before the evaluation"
        raise DataError(f"{split} example {source.ids[i]!r}: {text} (--on-bad-data raise{where}"
                        "). Fix or remove the file and --resume, or use --on-bad-data skip")
      self.print(f"warning: skipping {split} example {source.ids[i]!r} (bad on decode): {text}")

  def bad_summary(self, split: str, step: int, epoch: int | None) -> dict:
    """One line and one metrics.jsonl record for the bad examples ``split`` met since the last
    summary; returns ``{"skipped": n, "skipped_ids": [...]}`` (empty when none)."""
    keys = [k for k in self.bad_in_epoch if k[0] == split]
    if not keys:
      return {}
    source = self.sources.train if split == "train" else self.val_source
    ids = sorted(source.ids[i] for _, i in keys)
    kinds = collections.Counter(self.bad[split][i].split(":", 1)[0] for _, i in keys)
    for k in keys:
      del self.bad_in_epoch[k]
    what = "epoch " + str(epoch + 1) if epoch is not None else f"evaluation at step {step}"
    self.print(f"{what}: {len(ids)} bad {split} example(s) skipped ("
               + ", ".join(f"{k}={v}" for k, v in sorted(kinds.items())) + "): "
               + ", ".join(ids[:10]) + (f" and {len(ids) - 10} more" if len(ids) > 10 else ""))
    out = {"skipped": len(ids), "skipped_ids": ids}
    if split == "train":
      self.log.write({"kind": "data", "split": split, "step": step, "epoch": epoch + 1, **out,
                      "problems": dict(kinds)})
    return out

  # -- saving -----------------------------------------------------------------------------------
  def save(self, step: int, it, **extra) -> None:
    """Checkpoint ``step`` (once: a step already saved is not saved again)."""
    if self.ckpt.latest_step() == step:
      return
    self.ckpt.save(step, self.state, self.meta(step, it, **extra))

  def save_best(self, step: int, it, metrics: dict) -> None:
    self.ckpt.save_best(step, self.state, self.meta(step, it), metrics)

  def stop(self, step: int, it, stop: StopRequests, during: str = "") -> None:
    """Save at ``step`` and raise :class:`Interrupted` (a signal asked the run to stop)."""
    if it is not None and step > 0:
      self.save(step, it, **({"eval_pending": True} if during == "evaluation" else {}))
    saved = self.ckpt.latest_step()
    where = (f"saved checkpoint {saved} in {self.ckpt.last.directory}" if saved is not None
             else "no checkpoint yet: nothing was trained")
    raise Interrupted(f"stopped by {stop.name}{' during ' + during if during else ''} at step "
                      f"{step} of {self.total_steps}: {where}; continue with the same command "
                      f"plus --resume, or: python -m fcnjax.train --workdir {self.workdir} "
                      "--resume", stop.signal)

  # -- evaluation -----------------------------------------------------------------------------
  def protocol_at(self, step: int) -> str:
    """The protocol of an evaluation at ``step``: ``eval.final_protocol`` at the last step (or
    beyond), ``eval.protocol`` before."""
    e = self.cfg.eval
    return e.final_protocol if step >= self.total_steps else e.protocol

  def evaluate(self, step: int, stop: StopRequests | None = None, it=None, *,
               protocol: str) -> dict:
    """Evaluate the state on the val set with ``protocol`` (one of ``self.protocols``): print
    the metrics and per-class table, log an ``eval`` record; returns the metrics of
    :func:`~fcnjax.train.metrics.segmentation_metrics` plus ``"protocol"`` (and ``skipped`` /
    ``skipped_ids`` when val files were bad)."""
    start = time.perf_counter()
    c = self.cfg.model.num_classes
    hist = parallel.replicate(jnp.zeros((c, c), jnp.int32), self.mesh)
    loader = self.val_loaders[protocol]
    val_it = iter(loader)
    try:
      for batch in val_it:
        if stop is not None and stop.requested:
          self.stop(step, it, stop, during="evaluation")
        self.check_rows(batch, "val", step)
        gb = parallel.global_batch(batch, self.mesh)
        self.compiler.wait(("eval", tuple(gb["image"].shape[:3])), stop)
        hist = self.eval_step(self.state.params, self.state.rest, hist, gb)
    finally:
      val_it.close()
    hist = np.asarray(jax.device_get(hist))
    seconds = time.perf_counter() - start
    n = len(loader.bucket_shapes)
    head = f"eval step {step} ({protocol}, {n} program{'s' if n != 1 else ''}): "
    if self.classifier:
      metrics = {"protocol": protocol, **classification_metrics(hist, self.class_names)}
      self.print(f"{head}{format_classification(metrics)}, {seconds:.1f} s\n"
                 f"{per_class_acc_table(metrics)}")
      scalars, per_class = ("top1", "mean_acc"), metrics["per_class_acc"]
    else:
      metrics = {"protocol": protocol, **segmentation_metrics(hist, self.class_names)}
      self.print(f"{head}{format_metrics(metrics)} ({len(self.val_source)} images, "
                 f"{seconds:.1f} s)\n{per_class_table(metrics)}")
      scalars, per_class = ("mean_iu", "pixel_acc", "mean_acc", "fwiu"), metrics["per_class_iou"]
    metrics.update(self.bad_summary("val", step, None))  # skipped, skipped_ids (if any)
    self.log.write({"kind": "eval", "step": step, "seconds": seconds, **metrics})
    if self.tensorboard is not None:
      self.tensorboard.scalars(step, {k: metrics[k] for k in scalars}, "val/")
      self.tensorboard.scalars(step, {k: v for k, v in per_class.items() if v is not None},
                               "val/acc/" if self.classifier else "val/iou/")
    if self.primary:
      if self.classifier:
        report.plot_curves(self.log, self.workdir / "curves.png", metric="top1",
                           label="val top-1")
        report.plot_confusion(metrics["confusion"], self.class_names,
                              self.workdir / "confusion.png",
                              title=f"val confusion, step {step} (top-1 {metrics['top1']:.3f})")
      else:
        report.plot_curves(self.log, self.workdir / "curves.png")
        self.plot_predictions(step)
    return metrics

  def plot_predictions(self, step: int) -> None:
    """A fixed set of val images (the first few that decode), predicted in one padded batch."""
    n = min(self.cfg.eval.num_prediction_images, len(self.val_source))
    examples = []
    for i in range(len(self.val_source)):
      if len(examples) == n:
        break
      if i in self.bad["val"]:
        continue
      e = self.val_source[i]
      if e.get("valid", True):
        examples.append(e)
    if not examples:
      return
    n = len(examples)
    h = max(e["image"].shape[0] for e in examples)
    w = max(e["image"].shape[1] for e in examples)
    m = self.cfg.model
    if m.aligned:  # the same grid the buckets use: no extra program for odd sizes
      g = ALIGNED_GRANULARITY
      h, w = -(-h // g) * g, -(-w // g) * g
    batch = np.zeros((n, h, w, 3), np.float32)
    for i, e in enumerate(examples):
      batch[i, :e["image"].shape[0], :e["image"].shape[1]] = self.preprocessing(e["image"])
    images = parallel.replicate(batch, self.mesh)
    preds = np.asarray(jax.device_get(self.predict(self.state.params, self.state.rest, images)))
    preds = [p[:e["label"].shape[0], :e["label"].shape[1]] for p, e in zip(preds, examples)]
    path = self.workdir / "predictions.png"
    report.plot_predictions([e["image"] for e in examples], [e["label"] for e in examples],
                            preds, path, self.colorize, titles=[e["id"] for e in examples],
                            class_names=self.class_names, palette=self.palette)
    if self.tensorboard is not None:
      from PIL import Image
      with Image.open(path) as im:
        self.tensorboard.image(step, "val/predictions", np.asarray(im.convert("RGB")))


def _open_checkpoints_config(workdir) -> tuple[int | None, dict | None, int]:
  """(newest step whose meta reads, its stored config, number of checkpoint folders), or
  (None, None, n) when there is none (n > 0: all damaged)."""
  ckpt_dir = pathlib.Path(workdir) / "checkpoints"
  if not ckpt_dir.is_dir():
    return None, None, 0
  ckpt = Checkpointer(workdir)
  try:
    steps = ckpt.all_steps()
    for step in reversed(steps):
      try:
        return step, ckpt.read_meta(step).get("config"), len(steps)
      except CheckpointDamaged:
        continue
    return None, None, len(steps)
  finally:
    ckpt.close()


def stored_config(workdir) -> ml_collections.ConfigDict:
  """The config stored in ``workdir``'s latest readable checkpoint (what ``--resume`` continues)."""
  step, saved, n = _open_checkpoints_config(workdir)
  if step is None:
    raise FileNotFoundError(_nothing_to_resume(workdir, n))
  if not saved:
    raise CheckpointMismatch(f"{workdir}: checkpoint {step} stores no config (written by an "
                             "older fcnjax): pass --config with the run's settings")
  return configs_lib.from_dict(saved)


def _nothing_to_resume(workdir, num_damaged: int) -> str:
  ckpt_dir = pathlib.Path(workdir) / "checkpoints"
  if num_damaged:
    return (f"{workdir}: nothing to resume: all {num_damaged} checkpoint(s) in {ckpt_dir} are "
            "damaged (their meta cannot be read); start the run again in a new --workdir")
  return (f"{workdir}: nothing to resume (no checkpoint in {ckpt_dir}); start the run without "
          "--resume")


def _read_final(workdir) -> dict:
  try:
    return json.loads((pathlib.Path(workdir) / "final_metrics.json").read_text())
  except (OSError, ValueError):
    return {}


def train(config, workdir, *, resume: bool = False, eval_only: bool = False,
          allow_changes=(), restart_epoch: bool = False,
          sources: datasets.Sources | None = None, print_fn=print) -> dict:
  """Train (or with ``eval_only`` just evaluate) and return the last evaluation's metrics.

  ``config``: a config of :mod:`fcnjax.configs` (checked here). ``sources``: the train / val
  sources (default: built from ``config.data``). ``resume``: continue the workdir's run (its
  stored config must equal ``config`` except for ``allow_changes`` and the free fields);
  ``restart_epoch``: if the dataset changed since the checkpoint, start the interrupted epoch
  again with the new data instead of refusing.

  Guarantees (README, "When things go wrong"): the workdir is locked for the run
  (:class:`~fcnjax.train.workdir_lock.WorkdirLock`); every evaluation runs after a save; SIGINT /
  SIGTERM stop after the current step with a save (:class:`Interrupted`); a damaged checkpoint
  is skipped for the previous intact one; files bad on decode are skipped and counted, or with
  ``data.on_bad_data = "raise"`` stop the run after a save. Nothing is written when there is
  nothing to do (``resume`` without a checkpoint, or on a finished run; ``eval_only`` with
  neither a checkpoint nor ``model.init``).
  """
  configs_lib.check_fields(config)
  configs_lib.validate(config)
  workdir = pathlib.Path(workdir)
  latest, saved, num_ckpts = _open_checkpoints_config(workdir)
  if resume and latest is None:
    raise FileNotFoundError(_nothing_to_resume(workdir, num_ckpts))
  if eval_only and latest is None and not config.model.init:
    raise FileNotFoundError(
        f"--eval-only: nothing to evaluate: {workdir} has no checkpoint and no --init "
        "(model.init) weights were given")
  if latest is not None and not (resume or eval_only):
    raise FileExistsError(
        f"{workdir} already has checkpoints (latest step {latest}): pass --resume to continue "
        "that run, or choose another --workdir")
  notice = lambda m: print(m, file=sys.stderr, flush=True)
  with contextlib.ExitStack() as guards:
    if jax.process_index() == 0:
      guards.enter_context(WorkdirLock(workdir, notice=print_fn))
    stop = guards.enter_context(StopRequests(notice=notice))
    return _train(config, workdir, latest, saved, stop, resume=resume, eval_only=eval_only,
                  allow_changes=allow_changes, restart_epoch=restart_epoch, sources=sources,
                  print_fn=print_fn)


def _train(config, workdir, latest, saved, stop, *, resume, eval_only, allow_changes,
           restart_epoch, sources, print_fn) -> dict:
  start, stats = time.perf_counter(), CompileStats()
  if sources is None:
    sources = datasets.make_sources(config, print_fn=print_fn)
  if stop.requested:
    raise Interrupted(f"stopped by {stop.name} before training started: nothing was trained or "
                      "saved", stop.signal)
  config = resolve(config, sources.train)
  if latest is not None and saved:
    changed = check_resume(saved, config, allow_changes)
    if changed:
      print_fn("config changes on resume: " + "; ".join(f"{k}: {a!r} -> {b!r}"
                                                        for k, a, b in changed))
  protocols = (config.eval.final_protocol,) if eval_only else None
  run = Run(config, sources, workdir, print_fn=print_fn, protocols=protocols)
  it = None
  try:
    step, meta = 0, {}
    if latest is not None:
      run.state, meta = run.ckpt.restore_intact(run.state,
                                                model_description=model_description(config),
                                                warn=print_fn)
      step = int(meta["step"])
      if not eval_only:
        it = run.resume_data(meta, step, restart_epoch)
    run.describe()
    if latest is not None:
      run.print(f"resumed from {run.ckpt.last.directory}/{step} (step {step} of "
                f"{run.total_steps})")
    pending = _same_on_all_processes(bool(meta.get("eval_pending"))
                                     and not run.log.has_eval(step))
    if resume and not eval_only and step >= run.total_steps and not pending:
      final = _read_final(workdir)
      run.print(f"{workdir}: this run already finished (step {step} of {run.total_steps}"
                + (f", final {run.score_metric} {final[run.score_metric]:.4f}"
                   if final.get(run.score_metric) is not None else "") + "): nothing to do. To train longer, resume with --config ... "
                "--config.train.epochs=N --allow-change train.epochs")
      return {}
    run.start_outputs()
    if latest is not None:
      run.log.truncate_after(step)
    run.precompile(step, train=not eval_only, pending=pending)
    if eval_only:
      metrics = run.evaluate(step, stop, protocol=config.eval.final_protocol)
    else:
      if it is None:
        it = iter(run.train_loader)
      metrics = _loop(run, it, step, pending, stop)
    report_compiles(run, stats.counts(), time.perf_counter() - start,
                    step if eval_only else run.total_steps)
    return metrics
  finally:
    run.compiler.close()
    if it is not None:
      it.close()
    run.ckpt.close()
    if run.tensorboard is not None:
      run.tensorboard.close()


def report_compiles(run: Run, counts, wall_s: float, step: int) -> None:
  """One line and one ``metrics.jsonl`` record (``kind: "compile"``, at ``step``) of what this
  run (this process, from its start) compiled: programs and seconds, cold (XLA compile) and warm
  (persistent-cache load) apart, tracing + lowering apart, and ``waited_s``: the wall seconds
  the train and eval steps were blocked on a compile. Compiles overlap with each other and with
  training (:mod:`fcnjax.train.precompile`), so ``compile_s`` is work done, ``waited_s`` time
  lost. Without ahead-of-time compiles every program compiled inside the step that first used
  it, so ``waited_s`` is then all of ``compile_s``."""
  ahead = bool(run.compiler.jobs)
  waited = run.compiler.waited_s if ahead else counts.total_s
  pct = lambda x: 100 * x / wall_s if wall_s > 0 else 0.0  # noqa: E731
  run.print(f"compile (whole run): {counts.describe()}; XLA {counts.cold_s + counts.warm_s:.1f} s "
            f"= {pct(counts.cold_s + counts.warm_s):.1f} % of the run's {wall_s:.1f} s wall"
            + (f" (on all threads); steps waited {waited:.1f} s for compiles ({pct(waited):.1f} %)"
               if ahead else " (each program compiled at its first use, inside the steps)"))
  run.log.write({"kind": "compile", "step": int(step), "wall_s": wall_s,
                 "compile_s": counts.total_s, "waited_s": waited,
                 "precompile_wall_s": run.compiler.seconds,
                 "cache_dir": compilation.cache_dir(), **counts.as_dict()})


def _same_on_all_processes(flag: bool) -> bool:
  """Process 0's ``flag`` on every process (decisions read from process 0's metrics.jsonl)."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils
  return bool(multihost_utils.broadcast_one_to_all(np.asarray(flag)))


def _loop(run: Run, it, step: int, pending: bool, stop: StopRequests) -> dict:
  config = run.cfg
  metrics = {}
  progress = None
  try:
    if pending:
      run.print(f"checkpoint {step} was saved before an evaluation that did not finish: "
                "evaluating it now")
      metrics = run.evaluate(step, stop, it, protocol=run.protocol_at(step))
      run.save_best(step, it, metrics)
    while step < run.total_steps:
      if stop.requested:
        run.stop(step, it, stop)
      epoch, in_epoch = run.epoch_of(step)
      if progress is None or progress.epoch != epoch:
        if progress is not None:
          progress.close()
        loader = run.train_loader
        progress = report.Progress(loader.batches_per_epoch[epoch - loader.start_epoch], epoch,
                                   loader.start_epoch + len(loader.batches_per_epoch),
                                   every=config.train.log_every, enabled=run.primary)
        progress.done = in_epoch
      batch = next(it)
      run.check_rows(batch, "train", step, it)
      shape = batch["image"].shape[1:3]
      gb = parallel.global_batch(batch, run.mesh)
      run.compiler.wait(("train", tuple(gb["image"].shape[:3])), stop)
      if stop.requested:
        run.stop(step, it, stop)
      run.state, m = run.train_step(run.state, gb)
      loss = float(m["loss"])
      step += 1
      if not math.isfinite(loss):
        raise TrainingDiverged(
            f"non-finite loss ({loss}) at step {step} (epoch {epoch + 1}, bucket "
            f"{shape[0]}x{shape[1]}); stopped without saving. Last good checkpoint: "
            f"{run.ckpt.latest_step()} in {run.ckpt.last.directory}. Lower the learning rate "
            "(with reduction='sum' the reference uses 1e-10..1e-14) or check the data.")
      images = int((np.asarray(batch["index"]) >= 0).sum()) * jax.process_count()
      progress.update(loss, images, shape)
      if step % config.train.log_every == 0 or step == run.total_steps:
        record = {"kind": "train", "step": step, "epoch": epoch + 1, "loss": loss,
                  "grad_norm": float(m["grad_norm"]),
                  "learning_rate": float(run.lr_at(step - 1)),
                  "images_per_s": progress.images_per_second}
        record.update({k: float(m[k]) for k in ("ce", "dice") if k in m})
        run.log.write(record)
        if run.tensorboard is not None:
          run.tensorboard.scalars(step, {k: v for k, v in record.items()
                                         if k not in ("kind", "step")}, "train/")
      end_of_epoch = step == run.total_steps or run.epoch_of(step)[0] != epoch
      if end_of_epoch:
        run.bad_summary("train", step, epoch)
      do_eval = end_of_epoch and ((epoch + 1) % config.eval.every_epochs == 0
                                  or step == run.total_steps)
      if do_eval:  # save first: an evaluation that fails or is interrupted loses nothing
        run.save(step, it, eval_pending=True)
        metrics = run.evaluate(step, stop, it, protocol=run.protocol_at(step))
        run.save_best(step, it, metrics)
      elif step % config.checkpoint.save_every == 0 or step == run.total_steps:
        run.save(step, it)
  finally:
    if progress is not None:
      progress.close()
  if run.primary:
    (run.workdir / "final_metrics.json").write_text(json.dumps(
        report.jsonable({"step": step, **metrics}), indent=1))
  return metrics
