"""The training loop: buckets in, checkpoints and metrics out.

:func:`train` runs one experiment described by a :class:`RunConfig` (plain data: what
``python -m fcnjax.experiments.voc_fcn8s`` builds from its flags and presets) on a train and a val
:class:`~fcnjax.data.readers.SegmentationSource`. It works unchanged on one device, N local
devices and many processes (after :func:`fcnjax.train.parallel.initialize_distributed`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fcnjax import models
from fcnjax.data import augment as augment_lib
from fcnjax.data import pipeline
from fcnjax.data.palette import VOC_CLASSES, colorize
from fcnjax.train import optim, parallel, report
from fcnjax.train import step as step_lib
from fcnjax.train.checkpoint import Checkpointer
from fcnjax.train.metrics import format_metrics, segmentation_metrics


class TrainingDiverged(RuntimeError):
  """The loss became NaN or infinite; nothing after the last good checkpoint was saved."""


@dataclasses.dataclass
class RunConfig:
  """One training run. Plain values only (saved as JSON in every checkpoint)."""

  # model
  model: str = "fcn8s"                 # a key of fcnjax.models.MODELS
  num_classes: int = 21
  width_multiplier: float = 1.0
  aligned: bool = False
  learnable_upsampling: bool = False
  batch_norm: bool = False             # BatchNorm after every 3x3 conv (VGG16-BN style)
  precision: str = "fp32"              # "fp32" or "bf16" (bf16 compute, fp32 params and loss)
  init: str | None = None              # weights file for fcnjax.weights.init_from
  # optimisation
  optimizer: str = "sgd"               # "reference" (Caffe), "sgd" or "adamw"
  learning_rate: float = 0.01
  momentum: float = 0.9
  weight_decay: float = 5e-4
  schedule: str = "poly"               # "poly", "cosine" or "constant" (modern optimizers)
  warmup_steps: int = 0
  loss_reduction: str = "mean"         # "mean" over valid pixels, or "sum" (the reference)
  accumulate: int = 1                  # gradient accumulation (Caffe's iter_size)
  # data
  epochs: int = 1
  steps: int | None = None             # stop after this many steps (overrides epochs)
  batch_size: int | None = 8
  pixels_per_batch: int | None = None
  eval_batch_size: int | None = None
  max_buckets: int | str = 8
  granularity: int = 1
  flip: bool = True
  scale_range: tuple | None = None
  color_jitter: float = 0.0
  num_workers: int = 0
  seed: int = 0
  # evaluation, checkpoints, output
  eval_every_epochs: int = 1
  save_every: int = 200                # steps
  keep_checkpoints: int = 3
  num_prediction_images: int = 4
  log_every: int = 10

  def model_description(self) -> dict:
    """What a checkpoint must match to be restored into this run's model."""
    return {"model": self.model, "num_classes": self.num_classes,
            "width_multiplier": self.width_multiplier, "aligned": self.aligned,
            "learnable_upsampling": self.learnable_upsampling, "batch_norm": self.batch_norm}

  def to_json(self) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v)
            for k, v in dataclasses.asdict(self).items()}


def build_model(cfg: RunConfig, seed: int = 0) -> nnx.Module:
  dtype = {"fp32": None, "bf16": jnp.bfloat16}[cfg.precision]
  return models.MODELS[cfg.model](cfg.num_classes, width_multiplier=cfg.width_multiplier,
                                  aligned=cfg.aligned,
                                  learnable_upsampling=cfg.learnable_upsampling,
                                  batch_norm=cfg.batch_norm, dtype=dtype,
                                  rngs=nnx.Rngs(params=seed, dropout=seed + 1))


def build_optimizer(cfg: RunConfig, total_steps: int):
  if cfg.optimizer == "reference":
    tx = optim.reference_optimizer(cfg.learning_rate, momentum=cfg.momentum,
                                   weight_decay=cfg.weight_decay)
  else:
    # Short runs (tests, --steps N) keep the warm-up under a fifth of the run.
    warmup = min(cfg.warmup_steps, total_steps // 5)
    tx = optim.modern_optimizer(cfg.optimizer, cfg.learning_rate, total_steps=total_steps,
                                warmup_steps=warmup, schedule=cfg.schedule,
                                momentum=cfg.momentum, weight_decay=cfg.weight_decay)
  return optim.with_accumulation(tx, cfg.accumulate) if cfg.accumulate > 1 else tx


def build_loaders(cfg: RunConfig, train_source, val_source, num_devices: int):
  # The aligned variant pads its input to a multiple of 32 anyway: buckets off that grid would
  # only add compiles, so plan them on it.
  granularity = max(cfg.granularity, 32 if cfg.aligned else 1)
  dist = dict(num_devices=num_devices, process_index=jax.process_index(),
              process_count=jax.process_count(), granularity=granularity)
  aug = augment_lib.Augment(flip=cfg.flip, scale_range=cfg.scale_range,
                            color_jitter=cfg.color_jitter)
  batching = dict(batch_size=cfg.batch_size, pixels_per_batch=cfg.pixels_per_batch)

  def train_loader(num_epochs):
    return pipeline.make_train_loader(train_source, seed=cfg.seed, num_epochs=num_epochs,
                                      augment=aug, max_buckets=cfg.max_buckets,
                                      num_workers=cfg.num_workers, **batching, **dist)

  train = train_loader(cfg.epochs)
  if cfg.steps is not None:
    per_epoch = max(1, min(train.batches_per_epoch))
    train = train_loader(max(1, math.ceil(cfg.steps / per_epoch)))
  eval_batching = dict(batching)
  if cfg.eval_batch_size:
    eval_batching = dict(batch_size=cfg.eval_batch_size, pixels_per_batch=None)
  val = pipeline.make_eval_loader(val_source, max_buckets=cfg.max_buckets, **eval_batching,
                                  **dist)
  return train, val


class Run:
  """State and outputs of one run (kept small: the loop itself is :func:`train`)."""

  def __init__(self, cfg: RunConfig, train_source, val_source, workdir, *, print_fn=print):
    self.cfg = cfg
    self.workdir = pathlib.Path(workdir)
    self.primary = jax.process_index() == 0
    self.print = print_fn if self.primary else (lambda *a, **k: None)
    if self.primary:
      self.workdir.mkdir(parents=True, exist_ok=True)
    self.mesh = parallel.make_mesh()
    self.val_source = val_source
    self.train_loader, self.val_loader = build_loaders(cfg, train_source, val_source,
                                                       self.mesh.size)
    self.total_steps = len(self.train_loader) if cfg.steps is None else min(
        cfg.steps, len(self.train_loader))
    model = build_model(cfg, cfg.seed)
    if cfg.init:
      from fcnjax import weights
      loaded = weights.init_from(cfg.init, model)
      self.print(f"init: {cfg.init}: {loaded}")
    self.preprocessing = model.preprocessing
    self.num_params = models.count_params(model)
    tx = build_optimizer(cfg, self.total_steps)
    self.graphdef, state = step_lib.init_state(model, tx)
    self.state = parallel.replicate(state, self.mesh)
    self.train_step = step_lib.make_train_step(
        self.graphdef, tx, reduction=cfg.loss_reduction,
        state_sharding=jax.tree.map(lambda x: x.sharding, self.state),
        batch_sharding=parallel.batch_sharding(self.mesh))
    self.eval_step = step_lib.make_eval_step(self.graphdef)
    self.predict = step_lib.make_predict(self.graphdef)
    self.ckpt = Checkpointer(self.workdir, keep=cfg.keep_checkpoints)
    self.log = report.MetricsLog(self.workdir, enabled=self.primary)
    self.class_names = (val_source.class_names or
                        (VOC_CLASSES if cfg.num_classes == len(VOC_CLASSES) else None))

  # -- reporting ------------------------------------------------------------------------------
  def describe(self, train_source) -> None:
    devs = jax.devices()
    self.print(f"devices: {len(devs)} x {devs[0].platform} ({devs[0].device_kind}) on "
               f"{jax.process_count()} process(es); mesh {dict(self.mesh.shape)}")
    self.print(f"data: train {len(train_source)} images ({train_source.name}), val "
               f"{len(self.val_source)} images ({self.val_source.name})")
    self.print("train buckets: " + self.train_loader.report().replace("\n", "\n  "))
    self.print("val buckets: " + self.val_loader.report().replace("\n", "\n  "))
    self.print(f"model: {self.cfg.model} ({'aligned' if self.cfg.aligned else 'exact'}, width "
               f"x{self.cfg.width_multiplier:g}, {self.cfg.precision}), {self.num_params:,} "
               f"learnable parameters; {self.total_steps} steps")

  def meta(self, step: int, data_state: dict) -> dict:
    return {"model": self.cfg.model_description(), "config": self.cfg.to_json(), "step": step,
            "data": data_state}

  # -- evaluation -----------------------------------------------------------------------------
  def evaluate(self, step: int) -> dict:
    start = time.perf_counter()
    hist = parallel.replicate(jnp.zeros((self.cfg.num_classes,) * 2, jnp.int32), self.mesh)
    for batch in self.val_loader:
      gb = parallel.global_batch(batch, self.mesh)
      hist = self.eval_step(self.state.params, self.state.rest, hist, gb)
    metrics = segmentation_metrics(np.asarray(jax.device_get(hist)), self.class_names)
    seconds = time.perf_counter() - start
    self.print(f"eval step {step}: {format_metrics(metrics)} ({len(self.val_source)} images, "
               f"{seconds:.1f} s)")
    self.log.write({"kind": "eval", "step": step, "seconds": seconds, **metrics})
    if self.primary:
      report.plot_curves(self.log, self.workdir / "curves.png")
      self.plot_predictions()
    return metrics

  def plot_predictions(self) -> None:
    """A fixed set of val images (the first few), predicted in one padded batch."""
    n = min(self.cfg.num_prediction_images, len(self.val_source))
    examples = [self.val_source[i] for i in range(n)]
    h = max(e["image"].shape[0] for e in examples)
    w = max(e["image"].shape[1] for e in examples)
    batch = np.zeros((n, h, w, 3), np.float32)
    for i, e in enumerate(examples):
      batch[i, :e["image"].shape[0], :e["image"].shape[1]] = self.preprocessing(e["image"])
    images = parallel.replicate(batch, self.mesh)
    preds = np.asarray(jax.device_get(self.predict(self.state.params, self.state.rest, images)))
    preds = [p[:e["label"].shape[0], :e["label"].shape[1]] for p, e in zip(preds, examples)]
    report.plot_predictions([e["image"] for e in examples], [e["label"] for e in examples],
                            preds, self.workdir / "predictions.png", colorize,
                            titles=[e["id"] for e in examples])


def train(cfg: RunConfig, train_source, val_source, workdir, *, resume: bool = False,
          eval_only: bool = False, print_fn=print) -> dict:
  """Train (or with ``eval_only`` just evaluate) and return the last evaluation's metrics."""
  run = Run(cfg, train_source, val_source, workdir, print_fn=print_fn)
  run.describe(train_source)
  it = iter(run.train_loader)
  step = 0
  latest = run.ckpt.latest_step()
  if latest is not None and not (resume or eval_only):
    raise FileExistsError(
        f"{run.workdir} already has checkpoints (latest step {latest}): pass --resume to continue "
        "that run, or choose another --workdir")
  if latest is not None:
    run.state, meta = run.ckpt.restore(run.state, model_description=cfg.model_description())
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
        progress = report.Progress(run.train_loader.batches_per_epoch[epoch], epoch,
                                   len(run.train_loader.batches_per_epoch),
                                   every=cfg.log_every, enabled=run.primary)
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
      if step % cfg.log_every == 0 or step == run.total_steps:
        run.log.write({"kind": "train", "step": step, "epoch": epoch + 1, "loss": loss,
                       "grad_norm": float(m["grad_norm"]),
                       "images_per_s": progress.images_per_second})
      end_of_epoch = (step == run.total_steps or
                      run.train_loader.epoch_and_batch(step)[0] != epoch)
      do_eval = end_of_epoch and ((epoch + 1) % cfg.eval_every_epochs == 0
                                  or step == run.total_steps)
      if do_eval:
        metrics = run.evaluate(step)
      if do_eval or step % cfg.save_every == 0 or step == run.total_steps:
        run.ckpt.save(step, run.state, run.meta(step, it.get_state()),
                      eval_metrics=metrics if do_eval else None)
  finally:
    run.ckpt.wait()
    run.ckpt.close()
    it.close()
  if run.primary:
    (run.workdir / "final_metrics.json").write_text(json.dumps(
        report.jsonable({"step": step, **metrics}), indent=1))
  return metrics
