"""FCN-8s on PASCAL VOC, or on the built-in VOC-layout dataset when no VOC is on disk.

    python -m fcnjax.experiments.voc_fcn8s                      # built-in data, smoke preset
    python -m fcnjax.experiments.voc_fcn8s --voc-root ~/data/VOCdevkit --preset fast
    python -m fcnjax.experiments.voc_fcn8s --sbd-root ~/data/SBD --voc-root ~/data/VOCdevkit \\
        --preset paper --model fcn32s --init vgg16_from_caffe.pth --workdir runs/fcn32s

Presets (plain code below; flags override them):

* ``smoke``: the built-in data (2,000 train / 200 val images at 1/4 of VOC's sizes), an FCN-8s at
  1/8 of VGG16's widths in the *aligned* variant (no pad-100: on 2 CPU cores the exact geometry's
  pad of 100 makes every step ~9x slower on these small images; ``--no-aligned`` for the exact
  one), AdamW with cosine decay, batch 8, 4 size buckets, 4 epochs (1,000 steps). Finishes in
  minutes on a laptop CPU; see experiments/voc_fcn8s/README.md for a recorded run.
* ``fast``: full-width exact FCN-8s, SGD 0.9 with poly decay on the mean loss, bf16 compute,
  batch 8 of real, uncropped images in 8 size buckets, flip + scale 0.5-2 augmentation. A GPU job.
* ``paper``: the reference recipe exactly: SBD train (``train_aug`` ids if ``--sbd-root`` points
  at SegmentationClassAug, else SBD ``train``), seg11valid for evaluation, batch 1, SGD momentum
  0.99, summed loss, fixed learning rate 1e-10 (FCN-32s) / 1e-12 (16s) / 1e-14 (8s), weight decay
  5e-4, biases at 2x lr, no augmentation, 100k iterations (300k at-once), each stage initialised
  from the previous (``--init``). Target: seg11valid mean IU 63.6 / 65.0 / 65.5 for 32s / 16s / 8s.
  It needs VOC + SBD and a GPU (~2 days on a Titan X for the reference); it cannot run here.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys

PRESETS = {
    "smoke": dict(model="fcn8s", width_multiplier=1 / 8, aligned=True, optimizer="adamw",
                  learning_rate=3e-3, weight_decay=1e-4, schedule="cosine", warmup_steps=20,
                  loss_reduction="mean", epochs=4, batch_size=8, max_buckets=4,
                  flip=True, scale_range=None, eval_every_epochs=1, save_every=250),
    "fast": dict(model="fcn8s", optimizer="sgd", learning_rate=0.01, momentum=0.9,
                 weight_decay=5e-4, schedule="poly", warmup_steps=500, loss_reduction="mean",
                 epochs=50, batch_size=8, max_buckets=8, flip=True, scale_range=(0.5, 2.0),
                 precision="bf16", eval_every_epochs=5, save_every=1000),
    "paper": dict(model="fcn8s", optimizer="reference", momentum=0.99, weight_decay=5e-4,
                  loss_reduction="sum", steps=100_000, batch_size=1, max_buckets=16,
                  flip=False, scale_range=None, eval_every_epochs=1, save_every=4000),
}
PAPER_LR = {"fcn32s": 1e-10, "fcn16s": 1e-12, "fcn8s": 1e-14, "fcn8s-atonce": 1e-10}
SMOKE_DATA = dict(num_train=2000, num_val=200, scale=0.25, seed=0)


def parse_args(argv=None):
  p = argparse.ArgumentParser(prog="python -m fcnjax.experiments.voc_fcn8s",
                              description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=__doc__.split("\n\n", 2)[2])
  p.add_argument("--voc-root", help="VOCdevkit (or VOC2012) folder; without it the built-in "
                 "dataset is used")
  p.add_argument("--sbd-root", help="SBD 'dataset' folder (img/, cls/) or a folder with "
                 "SegmentationClassAug: train on it, evaluate on seg11valid (the paper)")
  p.add_argument("--val-split", help="VOC split to evaluate on (default: val; seg11valid with "
                 "--sbd-root)")
  p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                 help="default: smoke on the built-in data, fast with --voc-root")
  p.add_argument("--model", choices=["fcn32s", "fcn16s", "fcn8s", "fcn8s-atonce"])
  p.add_argument("--init", help="weights: ImageNet VGG16 (torchvision or Caffe layout), a "
                 "pytorch-fcn checkpoint, or an fcnjax .safetensors of the previous stage")
  p.add_argument("--steps", type=int)
  p.add_argument("--epochs", type=int)
  g = p.add_mutually_exclusive_group()
  g.add_argument("--batch-size", type=int)
  g.add_argument("--pixels-per-batch", type=int)
  p.add_argument("--max-buckets", help="an integer or 'auto'")
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
  p.add_argument("--save-every", type=int, help="checkpoint every N steps")
  p.add_argument("--num-workers", type=int, help="grain worker processes for decoding")
  p.add_argument("--seed", type=int)
  p.add_argument("--workdir", default=None, help="default: runs/<preset>-<model>")
  p.add_argument("--resume", action="store_true", help="continue from the workdir's checkpoint")
  p.add_argument("--eval-only", action="store_true",
                 help="evaluate (the workdir's latest checkpoint, or --init) and exit")
  p.add_argument("--data-cache", help="where the built-in dataset is written (default "
                 "~/.cache/fcnjax or $FCNJAX_CACHE)")
  p.add_argument("--compile-cache", default="~/.cache/fcnjax/xla",
                 help="JAX persistent compilation cache folder, so a resumed or repeated run "
                 "skips recompiling its buckets ('' to disable)")
  p.add_argument("--coordinator-address", help="multi-process: host:port of process 0")
  p.add_argument("--num-processes", type=int)
  p.add_argument("--process-id", type=int)
  return p.parse_args(argv)


def make_config(args):
  from fcnjax.train.loop import RunConfig
  preset = args.preset or ("fast" if (args.voc_root or args.sbd_root) else "smoke")
  values = dict(PRESETS[preset])
  if args.model:
    values["model"] = args.model
  if preset == "paper":
    values["learning_rate"] = PAPER_LR[values["model"]]
    if values["model"] == "fcn8s-atonce":
      values["steps"] = 300_000
  overrides = {"init": args.init, "steps": args.steps, "epochs": args.epochs,
               "precision": args.precision, "learning_rate": args.learning_rate,
               "optimizer": args.optimizer, "batch_norm": args.batch_norm,
               "accumulate": args.grad_accumulation,
               "width_multiplier": args.width_multiplier, "aligned": args.aligned,
               "eval_every_epochs": args.eval_every_epochs, "save_every": args.save_every,
               "num_workers": args.num_workers, "seed": args.seed}
  values.update({k: v for k, v in overrides.items() if v is not None})
  if args.batch_size is not None:
    values.update(batch_size=args.batch_size, pixels_per_batch=None)
  if args.pixels_per_batch is not None:
    values.update(batch_size=None, pixels_per_batch=args.pixels_per_batch)
  if args.max_buckets is not None:
    values["max_buckets"] = args.max_buckets if args.max_buckets == "auto" else int(
        args.max_buckets)
  if args.epochs is not None and args.steps is None:
    values["steps"] = None
  return preset, RunConfig(**values)


def make_sources(args):
  """(train source, val source, description) for the flags."""
  from fcnjax.data import readers, synthetic
  if args.sbd_root:
    if not args.voc_root:
      raise SystemExit("--sbd-root needs --voc-root too (evaluation is on VOC2011 seg11valid)")
    sbd = pathlib.Path(args.sbd_root)
    if (sbd / "SegmentationClassAug").is_dir() or (sbd.parent / "SegmentationClassAug").is_dir():
      train = readers.voc_aug_source(sbd if (sbd / "SegmentationClassAug").is_dir()
                                     else sbd.parent, "train_aug")
    else:
      train = readers.sbd_source(sbd, "train")
    split = args.val_split or "seg11valid"
    return train, readers.voc_source(args.voc_root, split), f"SBD + VOC {split}"
  if args.voc_root:
    split = args.val_split or "val"
    return (readers.voc_source(args.voc_root, "train"), readers.voc_source(args.voc_root, split),
            f"VOC 2012 at {args.voc_root} (val: {split})")
  print("No VOC on disk (no --voc-root): using the built-in VOC-layout dataset "
        f"({SMOKE_DATA['num_train']} train / {SMOKE_DATA['num_val']} val images).", flush=True)
  root = synthetic.ensure_builtin_dataset(args.data_cache, **SMOKE_DATA)
  return readers.voc_source(root, "train"), readers.voc_source(root, "val"), f"built-in at {root}"


def main(argv=None) -> int:
  args = parse_args(argv)
  import os
  import jax
  if args.compile_cache and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(args.compile_cache))
  from fcnjax.train import parallel
  parallel.initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
  from fcnjax.data.validation import DataError
  from fcnjax.train.checkpoint import CheckpointMismatch
  from fcnjax.train.loop import TrainingDiverged, train
  from fcnjax.weights import WeightsError
  preset, cfg = make_config(args)
  try:
    train_src, val_src, desc = make_sources(args)
    workdir = pathlib.Path(args.workdir or f"runs/{preset}-{cfg.model}")
    print(f"preset {preset}, data {desc}, workdir {workdir}", flush=True)
    metrics = train(cfg, train_src, val_src, workdir, resume=args.resume,
                    eval_only=args.eval_only)
  except (DataError, WeightsError, FileNotFoundError, FileExistsError, TrainingDiverged,
          CheckpointMismatch) as e:
    # Bad input or a stopped run: the message names the file / problem; no traceback needed.
    print(f"error: {e}", file=sys.stderr)
    return 1
  if metrics:
    print(f"final: mean IU {metrics['mean_iu']:.4f}, pixel acc {metrics['pixel_acc']:.4f}, "
          f"mean acc {metrics['mean_acc']:.4f}, fwIU {metrics['fwiu']:.4f}; outputs in {workdir}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
