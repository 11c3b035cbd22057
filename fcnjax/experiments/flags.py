"""The training flags the experiment CLIs share, and how each maps onto a config field.

Each experiment CLI (``voc_fcn8s``, ``folder``, ``pets``) is a thin layer: its own data flags,
these training flags, the run flags of :func:`fcnjax.train.main.add_run_flags`, and any
``--config.FIELD=VALUE`` override, all applied to the experiment's config and run by
:func:`fcnjax.train.main.run`.
"""

from __future__ import annotations

import argparse

from fcnjax.train import main as runner

# flag dest -> config field (None values are "not given": the preset's value stays)
FIELDS = {
    "model": "model.name", "init": "model.init", "width_multiplier": "model.width_multiplier",
    "aligned": "model.aligned", "batch_norm": "model.batch_norm", "precision": "model.precision",
    "steps": "train.steps", "epochs": "train.epochs", "seed": "train.seed",
    "optimizer": "optim.optimizer", "learning_rate": "optim.learning_rate",
    "grad_accumulation": "optim.accumulate", "eval_every_epochs": "eval.every_epochs",
    "save_every": "checkpoint.save_every", "num_workers": "data.num_workers",
    "data_cache": "data.cache", "compile_cache": "output.compile_cache",
    "cost_profile": "data.cost_profile",
    "tensorboard": "output.tensorboard", "on_bad_data": "data.on_bad_data",
    "validate": "data.validate", "exif": "data.exif", "reinit_scores": "model.reinit_scores",
    "allow_geometry_change": "model.allow_geometry_change",
}
OTHER_FLAGS = {"data.batch_size": "batch_size", "data.pixels_per_batch": "pixels_per_batch",
               "data.max_buckets": "max_buckets", "loss.class_weights": "class_weights",
               "loss.dice_weight": "dice_weight", "data.val_fraction": "val_fraction",
               "data.mask_values": "mask_values", "eval.protocol": "eval_protocol",
               "eval.final_protocol": "eval_protocol", "model.pooling": "pooling",
               "loss.label_smoothing": "label_smoothing"}
"""Config fields set by flags outside :data:`FIELDS` (flag dest by field)."""


def flag_of(field: str, args) -> str | None:
  """The ``--flag`` of this CLI that sets ``field``, if it was given (else None)."""
  dest = OTHER_FLAGS.get(field) or next((d for d, f in FIELDS.items() if f == field), None)
  if dest is None or getattr(args, dest, None) is None:
    return None
  return "--" + dest.replace("_", "-")


def add_training_flags(p: argparse.ArgumentParser, *, models=None) -> None:
  p.add_argument("--model", choices=models, help="the FCN variant (default: the preset's)")
  p.add_argument("--init", help="weights: ImageNet VGG16 (torchvision or Caffe layout), a "
                 "pytorch-fcn checkpoint, or an fcnjax .safetensors of the previous stage")
  p.add_argument("--steps", type=int)
  p.add_argument("--epochs", type=int)
  g = p.add_mutually_exclusive_group()
  g.add_argument("--batch-size", type=int)
  g.add_argument("--pixels-per-batch", type=int)
  p.add_argument("--max-buckets", help="an integer or 'auto' (K from compile vs padding costs, "
                 "for the planned epochs)")
  p.add_argument("--cost-profile", metavar="FILE", default=None,
                 help="with --max-buckets auto: the costs measured on this machine by "
                 "'python -m benchmarks.buckets --calibrate' (default: the backend's built-in "
                 "profile)")
  p.add_argument("--precision", choices=["fp32", "bf16"])
  p.add_argument("--optimizer", choices=["reference", "sgd", "adamw"],
                 help="reference = Caffe SGD (momentum 0.99, summed loss); sgd / adamw with the "
                 "preset's schedule")
  p.add_argument("--learning-rate", type=float)
  p.add_argument("--width-multiplier", type=float)
  p.add_argument("--aligned", action=argparse.BooleanOptionalAction, default=None,
                 help="aligned variant (no pad 100) or --no-aligned for the exact reference")
  p.add_argument("--batch-norm", action=argparse.BooleanOptionalAction, default=None,
                 help="BatchNorm after every 3x3 conv (VGG16-BN); not in the reference")
  p.add_argument("--grad-accumulation", type=int,
                 help="accumulate gradients over N batches per update (Caffe's iter_size)")
  p.add_argument("--eval-every-epochs", type=int)
  p.add_argument("--eval-protocol", choices=["exact", "bucketed"],
                 help="how every evaluation scores the val images: exact (each at its own size, "
                 "the reference; one compile per image size) or bucketed (padded to its size "
                 "bucket). Default: bucketed during training, exact for the final evaluation "
                 "and --eval-only (--config.eval.protocol / --config.eval.final_protocol set "
                 "one of the two)")
  p.add_argument("--save-every", type=int, help="checkpoint every N steps")
  p.add_argument("--num-workers", type=int, help="grain worker processes for decoding")
  p.add_argument("--seed", type=int)
  p.add_argument("--data-cache", help="where the built-in dataset is written (default "
                 "~/.cache/fcnjax or $FCNJAX_CACHE)")
  p.add_argument("--compile-cache", default=None,
                 help="JAX persistent compilation cache folder, so a resumed or repeated run "
                 "skips recompiling its buckets ('' to disable; default ~/.cache/fcnjax/xla)")
  p.add_argument("--tensorboard", action="store_true", default=None,
                 help="also write TensorBoard event files to WORKDIR/tensorboard")
  p.add_argument("--on-bad-data", choices=["skip", "raise"],
                 help="a file that fails to decode during the run: skip it (counted, named, "
                 "default) or stop (after saving)")
  p.add_argument("--validate", choices=["header", "full"],
                 help="up-front check: headers and sizes (default) or decode every file first")
  p.add_argument("--exif", choices=["apply", "ignore"],
                 help="EXIF orientation tags of images: apply them (default) or use the stored "
                 "orientation")
  p.add_argument("--reinit-scores", action="store_true", default=None,
                 help="with --init: load the backbone only; the score layers start fresh (for "
                 "another number of classes)")
  p.add_argument("--allow-geometry-change", action="store_true", default=None,
                 help="with --init: load exact-geometry (pad-100) weights into an aligned model "
                 "(or the reverse) anyway")
  runner.add_run_flags(p)


def add_loss_flags(p: argparse.ArgumentParser) -> None:
  """Loss options for unbalanced classes (e.g. a small foreground)."""
  p.add_argument("--class-weights", help="comma-separated cross-entropy weight per class, "
                 "e.g. 1,5")
  p.add_argument("--dice-weight", type=float, help="add this times the soft Dice loss")


def set_field(config, field: str, value) -> None:
  section, name = field.split(".")
  setattr(config[section], name, value)


def apply_training_flags(config, args) -> None:
  """Write every given training flag into ``config`` (flags not given keep the preset's)."""
  for dest, field in FIELDS.items():
    value = getattr(args, dest, None)
    if value is not None:
      set_field(config, field, value)
  if args.batch_size is not None:
    config.data.batch_size = args.batch_size
    config.data.pixels_per_batch = None
  if args.pixels_per_batch is not None:
    config.data.pixels_per_batch = args.pixels_per_batch
  if args.max_buckets is not None:
    config.data.max_buckets = args.max_buckets
  if args.eval_protocol is not None:
    config.eval.protocol = config.eval.final_protocol = args.eval_protocol
  if args.epochs is not None and args.steps is None:
    config.train.steps = None


def apply_data_flags(config, args) -> None:
  """The data and loss flags of the folder / pets CLIs -> config fields."""
  for dest, field in (("images", "data.images"), ("masks", "data.masks"),
                      ("mask_values", "data.mask_values"), ("classes", "data.classes"),
                      ("val_fraction", "data.val_fraction"), ("val_images", "data.val_images"),
                      ("val_masks", "data.val_masks"), ("ignore_border", "data.ignore_border"),
                      ("dice_weight", "loss.dice_weight"), ("root", "data.root")):
    value = getattr(args, dest, None)
    if value is not None:
      set_field(config, field, value)
  if getattr(args, "class_weights", None):
    try:
      config.loss.class_weights = tuple(float(w) for w in args.class_weights.split(","))
    except ValueError:
      raise SystemExit(f"error: --class-weights {args.class_weights!r}: expected "
                       "comma-separated numbers, e.g. 1,5")


def finish(config, args, overrides) -> int:
  """Apply ``--config.*`` overrides, check the config, run it (one ``error:`` line on bad input)."""
  from fcnjax import configs
  import sys
  try:
    config = runner.apply_overrides(config, overrides)
    configs.check_fields(config)
    configs.validate(config)
  except configs.ConfigError as e:
    print(f"error: {runner.config_error_text(e, lambda f: flag_of(f, args))}", file=sys.stderr)
    return 2
  return runner.run(config, args, flag_of=lambda f: flag_of(f, args))
