"""``python -m fcnjax.train``: run any experiment config.

    python -m fcnjax.train --list
    python -m fcnjax.train --config voc_fcn8s:smoke --workdir runs/smoke
    python -m fcnjax.train --config folder --workdir runs/scans \\
        --config.data.images=scans/img --config.data.masks=scans/mask \\
        --config.data.mask_values=binary --config.train.epochs=20
    python -m fcnjax.train --config my_config.py:fast --workdir runs/mine
    python -m fcnjax.train --workdir runs/mine --resume          # as it was started
    python -m fcnjax.train --workdir runs/mine --resume --config my_config.py:fast \\
        --config.train.epochs=40 --allow-change train.epochs

``--config NAME_OR_PATH[:PRESET]``: a built-in experiment (``--list``) or your own config file
(a ``get_config(preset=None)`` returning an ``ml_collections.ConfigDict``, see README). Any field
can be overridden with ``--config.SECTION.FIELD=VALUE``; a field that does not exist is an error
naming the closest real ones, and a value of the wrong type is refused. The resolved config is
written to ``WORKDIR/config.json`` and stored in every checkpoint; ``--resume`` without
``--config`` continues with it, and with ``--config`` a changed field is refused unless it is
named in ``--allow-change``.

The environment variable ``FCNJAX_CPU_OPS=0`` / ``1`` sets ``model.ops`` to ``lax`` / ``cpu``.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

CPU_OPS_ENV = "FCNJAX_CPU_OPS"


def override_keys(overrides) -> list[str]:
  """The field names of ``--config.KEY[=VALUE]`` arguments (``--noconfig.KEY`` too)."""
  keys = []
  for arg in overrides:
    if arg.startswith(("--config.", "--noconfig.")):
      keys.append(arg.split(".", 1)[1].split("=", 1)[0])
  return keys


def apply_overrides(config, overrides):
  """``config`` with ``--config.FIELD=VALUE`` overrides applied (typed by ml_collections'
  ``config_flags``); a misspelt field or a wrong-typed value raises ConfigError."""
  from absl import flags
  from ml_collections import config_flags
  from fcnjax import configs
  if not overrides:
    return config
  stray = [a for a in overrides if not a.startswith(("--config.", "--noconfig."))
           and not (a and not a.startswith("-"))]
  if stray:
    raise configs.ConfigError(f"unknown argument {stray[0]} (overrides are --config.FIELD=VALUE)")
  for key in override_keys(overrides):
    configs.check_override(config, key)
  fv = flags.FlagValues()
  argv = ["fcnjax", *overrides]
  config_flags.DEFINE_config_dict("config", config, flag_values=fv, lock_config=True,
                                  sys_argv=argv)
  try:
    rest = fv(argv)
  except (flags.Error, ValueError, TypeError, AttributeError, KeyError) as e:
    raise configs.ConfigError(" ".join(str(e).split())) from None
  if len(rest) > 1:
    raise configs.ConfigError(f"unexpected argument {rest[1]!r} (overrides are "
                              "--config.FIELD=VALUE)")
  return fv.config


def apply_environment(config):
  """The CLIs' one environment knob: ``FCNJAX_CPU_OPS`` -> ``model.ops``."""
  value = os.environ.get(CPU_OPS_ENV, "").strip().lower()
  if value in ("0", "false", "no", "off"):
    config.model.ops = "lax"
  elif value in ("1", "true", "yes", "on"):
    config.model.ops = "cpu"
  return config


def config_error_text(e, flag_of=None) -> str:
  """A :class:`~fcnjax.configs.ConfigError` as the CLI says it: the flag that set the field
  (``--batch-size 0: must be ...``), else ``--config.FIELD=VALUE: ...``."""
  field = getattr(e, "field", None)
  if not field:
    return str(e)
  rule = str(e).split(": ", 1)[1] if str(e).startswith(f"{field} = ") else str(e)
  value = e.value
  shown = ",".join(map(str, value)) if isinstance(value, tuple) else value
  flag = flag_of(field) if flag_of else None
  if flag:
    return f"{flag} {shown}: {rule}"
  return f"--config.{field}={shown}: {rule}"


def add_run_flags(p: argparse.ArgumentParser) -> None:
  """The flags every training CLI has: where, resume / eval-only, and multi-process set-up."""
  p.add_argument("--workdir", help="where checkpoints, metrics and plots go")
  p.add_argument("--resume", action="store_true", help="continue the workdir's run")
  p.add_argument("--allow-change", default="",
                 help="on --resume: comma-separated config fields that may differ from the "
                 "stored config ('all' for any)")
  p.add_argument("--eval-only", action="store_true",
                 help="evaluate (the workdir's latest checkpoint, or model.init) and exit")
  p.add_argument("--restart-epoch", action="store_true",
                 help="on --resume after the dataset changed (files added or removed): start "
                 "the interrupted epoch again with the new data, keeping the learned state")
  p.add_argument("--coordinator-address", help="multi-process: host:port of process 0")
  p.add_argument("--num-processes", type=int)
  p.add_argument("--process-id", type=int)


def run(config, args, *, print_fn=print, flag_of=None) -> int:
  """Run ``config`` as a CLI does: compilation cache, distributed set-up, and for bad input or a
  stopped run one ``error:`` line (exit 1; 2 for a bad argument), no traceback. A run stopped by
  SIGINT / SIGTERM exits 128 + the signal number after saving. ``args`` carries
  :func:`add_run_flags`' flags; ``flag_of(field)`` names the CLI flag that set a config field."""
  import jax
  from fcnjax import compilation, configs
  from fcnjax.data.validation import DataError
  from fcnjax.train import parallel
  from fcnjax.train.checkpoint import CheckpointDamaged, CheckpointMismatch, CheckpointSaveError
  from fcnjax.train import memory
  from fcnjax.train.interrupts import Interrupted
  from fcnjax.train.workdir_lock import WorkdirLocked
  from fcnjax.weights import WeightsError
  apply_environment(config)
  compilation.enable_persistent_cache(config.output.compile_cache)
  parallel.initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
  from fcnjax.train.loop import TrainingDiverged, auto_cost_profile, train
  workdir = pathlib.Path(args.workdir or f"runs/{config.name}-{config.preset or 'default'}")
  allow = [a.strip() for a in args.allow_change.split(",") if a.strip()]
  try:
    configs.check_devices(config, jax.device_count(), jax.process_count())
    if os.environ.get(memory.ENV_VAR):
      try:
        memory.parse_bytes(os.environ[memory.ENV_VAR])
      except ValueError as e:
        raise configs.ConfigError(f"{memory.ENV_VAR}={os.environ[memory.ENV_VAR]!r}: {e}")
    if config.data.cost_profile:
      auto_cost_profile(config)  # a bad file: one line now, not after the data is read
    if config.model.init and not os.path.isfile(os.path.expanduser(config.model.init)):
      raise configs.ConfigError(f"model.init = {config.model.init!r}: no such file",
                                field="model.init", value=config.model.init)
  except configs.ConfigError as e:
    print(f"error: {config_error_text(e, flag_of)}", file=sys.stderr)
    return 2
  try:
    print_fn(f"experiment {config.name}{':' + config.preset if config.preset else ''}, "
             f"workdir {workdir}", flush=True)
    metrics = train(config, workdir, resume=args.resume, eval_only=args.eval_only,
                    allow_changes=allow, restart_epoch=getattr(args, "restart_epoch", False),
                    print_fn=print_fn)
  except Interrupted as e:
    print(str(e), file=sys.stderr, flush=True)
    return e.exit_code
  except configs.ConfigError as e:
    print(f"error: {config_error_text(e, flag_of)}", file=sys.stderr)
    return 2
  except (DataError, WeightsError, FileNotFoundError, FileExistsError, TrainingDiverged,
          CheckpointMismatch, CheckpointDamaged, CheckpointSaveError, WorkdirLocked,
          memory.StepMemoryError) as e:
    # Bad input or a stopped run: the message names the file / field / problem.
    print(f"error: {e}", file=sys.stderr)
    return 1
  except KeyboardInterrupt:  # before the run's own handlers were installed
    print("interrupted before training started: nothing was trained or saved", file=sys.stderr)
    return 130
  except OSError as e:  # disk full, permissions: writing the workdir's files
    where = f"{e.filename}: " if e.filename else ""
    print(f"error: {where}{e.strerror or e} (writing the run's outputs in {workdir})",
          file=sys.stderr)
    return 1
  if metrics and "top1" in metrics:
    print_fn(f"final: top-1 {metrics['top1']:.4f}, mean class acc {metrics['mean_acc']:.4f} "
             f"({metrics['images']} val images); confusion matrix in {workdir}/confusion.png, "
             f"outputs in {workdir}")
  elif metrics:
    print_fn(f"final: mean IU {metrics['mean_iu']:.4f}, pixel acc {metrics['pixel_acc']:.4f}, "
             f"mean acc {metrics['mean_acc']:.4f}, fwIU {metrics['fwiu']:.4f}; outputs in "
             f"{workdir}")
  return 0


def parse_args(argv=None):
  p = argparse.ArgumentParser(prog="python -m fcnjax.train", description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=__doc__.split("\n\n", 1)[1])
  p.add_argument("--config", help="NAME_OR_PATH[:PRESET]: a built-in experiment (--list) or a "
                 "config file")
  p.add_argument("--list", action="store_true", help="list the built-in experiments")
  p.add_argument("--print-config", action="store_true",
                 help="print the config (after overrides) and exit")
  add_run_flags(p)
  return p.parse_known_args(argv)


def main(argv=None) -> int:
  args, overrides = parse_args(argv)
  from fcnjax import configs
  if args.list:
    exps = configs.experiments()
    width = max(len(n) for n in exps)
    for name, desc in exps.items():
      mod = __import__(f"fcnjax.configs.{name}", fromlist=["PRESETS"])
      presets = ", ".join(getattr(mod, "PRESETS", {}))
      print(f"{name:<{width}}  {desc}" + (f" [presets: {presets}]" if presets else ""))
    return 0
  try:
    if args.config:
      config = apply_overrides(configs.load(args.config), overrides)
      configs.validate(config)
    elif args.resume or args.eval_only:
      if not args.workdir:
        raise configs.ConfigError("--resume / --eval-only without --config needs --workdir")
      if overrides:
        raise configs.ConfigError("overrides need --config (the stored config is used as it is "
                                  "without one)")
      from fcnjax.train.loop import stored_config
      config = stored_config(args.workdir)
    else:
      raise configs.ConfigError("give --config NAME_OR_PATH[:PRESET] (see --list), or "
                                "--workdir DIR --resume")
  except configs.ConfigError as e:
    print(f"error: {config_error_text(e)}", file=sys.stderr)
    return 2
  except (FileNotFoundError, ValueError) as e:
    # A missing checkpoint or a checkpoint without a config (CheckpointMismatch).
    print(f"error: {e}", file=sys.stderr)
    return 2
  if args.print_config:
    print(config)
    return 0
  return run(config, args)


if __name__ == "__main__":
  sys.exit(main())
