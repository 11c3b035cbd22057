"""The training loop: a config in, checkpoints and metrics out.

:func:`train` runs one experiment described by a config (:mod:`fcnjax.configs`; every field is
documented in :mod:`fcnjax.configs.base`) in a work directory. The data comes from
``config.data`` (:func:`fcnjax.data.datasets.make_sources`) unless sources are passed in. It works
unchanged on one device, N local devices and many processes (after
:func:`fcnjax.train.parallel.initialize_distributed`).

Every checkpoint stores the *resolved* config (``model.num_classes`` and the reference learning
rate filled in): a resumed run is checked against it field by field (:func:`check_resume`).
"""

from __future__ import annotations

import json
import math
import pathlib
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fcnjax import configs as configs_lib
from fcnjax import models
from fcnjax.configs import base as base_config
from fcnjax.data import augment as augment_lib
from fcnjax.data import datasets, pipeline
from fcnjax.data.palette import VOC_PALETTE
from fcnjax.data.validation import DataError
from fcnjax.train import optim, parallel, report
from fcnjax.train import step as step_lib
from fcnjax.train.checkpoint import CheckpointMismatch, Checkpointer
from fcnjax.train.metrics import format_metrics, segmentation_metrics

WARMUP_FRACTION_MAX = 0.2
"""A short run (tests, ``train.steps``) keeps its warm-up under this fraction of its steps."""
ALIGNED_GRANULARITY = 32
"""The aligned model pads its input to a multiple of 32: buckets are planned on that grid."""


class TrainingDiverged(RuntimeError):
  """The loss became NaN or infinite; nothing after the last good checkpoint was saved."""


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
  return models.build_model(m.name, m.num_classes, width_multiplier=m.width_multiplier,
                            aligned=m.aligned, learnable_upsampling=m.learnable_upsampling,
                            batch_norm=m.batch_norm, dtype=dtype, ops=m.ops,
                            seed=config.train.seed if seed is None else seed)


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
  return optim.make_schedule(o.learning_rate, total_steps, warmup_steps(config, total_steps),
                             o.schedule)


def _max_buckets(config):
  mb = str(config.data.max_buckets)
  return mb if mb == "auto" else int(mb)


def build_loaders(config, train_source, val_source, num_devices: int):
  d, a = config.data, config.augment
  granularity = max(d.granularity, ALIGNED_GRANULARITY if config.model.aligned else 1)
  dist = dict(num_devices=num_devices, process_index=jax.process_index(),
              process_count=jax.process_count(), granularity=granularity)
  aug = augment_lib.Augment(flip=a.flip, scale_range=tuple(a.scale_range) or None,
                            color_jitter=a.color_jitter)
  batching = (dict(batch_size=None, pixels_per_batch=d.pixels_per_batch)
              if d.pixels_per_batch else dict(batch_size=d.batch_size, pixels_per_batch=None))

  def train_loader(num_epochs):
    return pipeline.make_train_loader(train_source, seed=config.train.seed,
                                      num_epochs=num_epochs, augment=aug,
                                      max_buckets=_max_buckets(config),
                                      num_workers=d.num_workers, **batching, **dist)

  train = train_loader(config.train.epochs)
  if config.train.steps is not None:
    per_epoch = max(1, min(train.batches_per_epoch))
    train = train_loader(max(1, math.ceil(config.train.steps / per_epoch)))
  eval_batching = dict(batching)
  if d.eval_batch_size:
    eval_batching = dict(batch_size=d.eval_batch_size, pixels_per_batch=None)
  val = pipeline.make_eval_loader(val_source, max_buckets=_max_buckets(config), **eval_batching,
                                  **dist)
  return train, val


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


class Run:
  """State and outputs of one run (kept small: the loop itself is :func:`train`)."""

  def __init__(self, config, sources: datasets.Sources, workdir, *, print_fn=print):
    self.cfg = config
    self.workdir = pathlib.Path(workdir)
    self.primary = jax.process_index() == 0
    self.print = print_fn if self.primary else (lambda *a, **k: None)
    if self.primary:
      self.workdir.mkdir(parents=True, exist_ok=True)
      (self.workdir / "config.json").write_text(
          json.dumps(configs_lib.to_dict(config), indent=1, sort_keys=True))
    self.mesh = parallel.make_mesh()
    self.sources = sources
    self.val_source = sources.val
    self.train_loader, self.val_loader = build_loaders(config, sources.train, sources.val,
                                                       self.mesh.size)
    self.total_steps = len(self.train_loader) if config.train.steps is None else min(
        config.train.steps, len(self.train_loader))
    self.lr_at = learning_rate_at(config, self.total_steps)
    model = build_model(config)
    if config.model.init:
      from fcnjax import weights
      loaded = weights.init_from(config.model.init, model)
      self.print(f"init: {config.model.init}: {loaded}")
    self.preprocessing = model.preprocessing
    self.num_params = models.count_params(model)
    tx = build_optimizer(config, self.total_steps)
    self.graphdef, state = step_lib.init_state(model, tx)
    self.state = parallel.replicate(state, self.mesh)
    class_weights = tuple(config.loss.class_weights) or None
    if class_weights is not None and len(class_weights) != config.model.num_classes:
      raise configs_lib.ConfigError(
          f"loss.class_weights has {len(class_weights)} weights for "
          f"{config.model.num_classes} classes")
    self.train_step = step_lib.make_train_step(
        self.graphdef, tx, reduction=config.loss.reduction, class_weights=class_weights,
        dice_weight=config.loss.dice_weight,
        state_sharding=jax.tree.map(lambda x: x.sharding, self.state),
        batch_sharding=parallel.batch_sharding(self.mesh))
    self.eval_step = step_lib.make_eval_step(self.graphdef)
    self.predict = step_lib.make_predict(self.graphdef)
    self.ckpt = Checkpointer(self.workdir, keep=config.checkpoint.keep)
    self.log = report.MetricsLog(self.workdir, enabled=self.primary)
    self.tensorboard = (report.TensorBoardWriter(self.workdir / "tensorboard")
                        if config.output.tensorboard and self.primary else None)
    names = sources.val.class_names or sources.train.class_names
    self.class_names = (tuple(names) if names and len(names) == config.model.num_classes
                        else tuple(str(i) for i in range(config.model.num_classes)))
    self.palette = np.asarray(getattr(sources.val, "palette", None)
                              if getattr(sources.val, "palette", None) is not None
                              else VOC_PALETTE, np.uint8)

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
    self.print("val buckets: " + self.val_loader.report().replace("\n", "\n  "))
    self.print(f"model: {c.model.name} ({'aligned' if c.model.aligned else 'exact'}, width "
               f"x{c.model.width_multiplier:g}, {c.model.precision}), {self.num_params:,} "
               f"learnable parameters; {self.total_steps} steps")

  def meta(self, step: int, data_state: dict) -> dict:
    return {"model": model_description(self.cfg), "config": configs_lib.to_dict(self.cfg),
            "step": step, "data": data_state}

  def colorize(self, label):
    return self.palette[np.asarray(label, np.uint8)]

  # -- evaluation -----------------------------------------------------------------------------
  def evaluate(self, step: int) -> dict:
    start = time.perf_counter()
    c = self.cfg.model.num_classes
    hist = parallel.replicate(jnp.zeros((c, c), jnp.int32), self.mesh)
    for batch in self.val_loader:
      gb = parallel.global_batch(batch, self.mesh)
      hist = self.eval_step(self.state.params, self.state.rest, hist, gb)
    metrics = segmentation_metrics(np.asarray(jax.device_get(hist)), self.class_names)
    seconds = time.perf_counter() - start
    self.print(f"eval step {step}: {format_metrics(metrics)} ({len(self.val_source)} images, "
               f"{seconds:.1f} s)\n{per_class_table(metrics)}")
    self.log.write({"kind": "eval", "step": step, "seconds": seconds, **metrics})
    if self.tensorboard is not None:
      self.tensorboard.scalars(step, {k: metrics[k] for k in
                                      ("mean_iu", "pixel_acc", "mean_acc", "fwiu")}, "val/")
      self.tensorboard.scalars(step, metrics["per_class_iou"], "val/iou/")
    if self.primary:
      report.plot_curves(self.log, self.workdir / "curves.png")
      self.plot_predictions(step)
    return metrics

  def plot_predictions(self, step: int) -> None:
    """A fixed set of val images (the first few), predicted in one padded batch."""
    n = min(self.cfg.eval.num_prediction_images, len(self.val_source))
    examples = [self.val_source[i] for i in range(n)]
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


def _open_checkpoints_config(workdir) -> tuple[int | None, dict | None]:
  """(latest step, stored config) of a workdir's checkpoints, or (None, None)."""
  ckpt_dir = pathlib.Path(workdir) / "checkpoints"
  if not ckpt_dir.is_dir():
    return None, None
  ckpt = Checkpointer(workdir, async_save=False)
  try:
    step = ckpt.latest_step()
    return (step, ckpt.read_meta(step).get("config")) if step is not None else (None, None)
  finally:
    ckpt.close()


def stored_config(workdir) -> ml_collections.ConfigDict:
  """The config stored in ``workdir``'s latest checkpoint (what ``--resume`` continues)."""
  step, saved = _open_checkpoints_config(workdir)
  if step is None:
    raise FileNotFoundError(f"{workdir}: no checkpoint to resume from (no "
                            f"{pathlib.Path(workdir) / 'checkpoints'}/<step>)")
  if not saved:
    raise CheckpointMismatch(f"{workdir}: checkpoint {step} stores no config (written by an "
                             "older fcnjax): pass --config with the run's settings")
  return configs_lib.from_dict(saved)


def train(config, workdir, *, resume: bool = False, eval_only: bool = False,
          allow_changes=(), sources: datasets.Sources | None = None, print_fn=print) -> dict:
  """Train (or with ``eval_only`` just evaluate) and return the last evaluation's metrics.

  ``config``: a config of :mod:`fcnjax.configs` (checked here). ``sources``: the train / val
  sources (default: built from ``config.data``). ``resume``: continue the workdir's run (its
  stored config must equal ``config`` except for ``allow_changes`` and the free fields).
  """
  configs_lib.check_fields(config)
  configs_lib.validate(config)
  if sources is None:
    sources = datasets.make_sources(config, print_fn=print_fn)
  config = resolve(config, sources.train)
  latest, saved = _open_checkpoints_config(workdir)
  if latest is not None and not (resume or eval_only):
    raise FileExistsError(
        f"{workdir} already has checkpoints (latest step {latest}): pass --resume to continue "
        "that run, or choose another --workdir")
  if latest is not None and saved:
    changed = check_resume(saved, config, allow_changes)
    if changed:
      print_fn("config changes on resume: " + "; ".join(f"{k}: {a!r} -> {b!r}"
                                                        for k, a, b in changed))
  run = Run(config, sources, workdir, print_fn=print_fn)
  run.describe()
  it = iter(run.train_loader)
  step = 0
  if latest is not None:
    run.state, meta = run.ckpt.restore(run.state, model_description=model_description(config))
    step = int(meta["step"])
    it.set_state(meta["data"])
    run.log.truncate_after(step)
    run.print(f"resumed from {run.ckpt.last.directory}/{step} (step {step} of "
              f"{run.total_steps})")
  if eval_only:
    metrics = run.evaluate(step)
    run.ckpt.close()
    return metrics

  metrics = {}
  progress = None
  try:
    while step < run.total_steps:
      epoch, in_epoch = run.train_loader.epoch_and_batch(step)
      if progress is None or progress.epoch != epoch:
        if progress is not None:
          progress.close()
        progress = report.Progress(run.train_loader.batches_per_epoch[epoch], epoch,
                                   len(run.train_loader.batches_per_epoch),
                                   every=config.train.log_every, enabled=run.primary)
        progress.done = in_epoch
      batch = next(it)
      shape = batch["image"].shape[1:3]
      gb = parallel.global_batch(batch, run.mesh)
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
      end_of_epoch = (step == run.total_steps or
                      run.train_loader.epoch_and_batch(step)[0] != epoch)
      do_eval = end_of_epoch and ((epoch + 1) % config.eval.every_epochs == 0
                                  or step == run.total_steps)
      if do_eval:
        metrics = run.evaluate(step)
      if do_eval or step % config.checkpoint.save_every == 0 or step == run.total_steps:
        run.ckpt.save(step, run.state, run.meta(step, it.get_state()),
                      eval_metrics=metrics if do_eval else None)
  finally:
    if progress is not None:
      progress.close()
    run.ckpt.wait()
    run.ckpt.close()
    it.close()
    if run.tensorboard is not None:
      run.tensorboard.close()
  if run.primary:
    (run.workdir / "final_metrics.json").write_text(json.dumps(
        report.jsonable({"step": step, **metrics}), indent=1))
  return metrics
