"""Command line: ``python -m fcnjax.export WEIGHTS OUT [--step N] [--platforms cpu,cuda]
[--overwrite]``.

Writes ``OUT``, a serialized shape-polymorphic ``jax.export`` artifact of the model in WEIGHTS
(uint8 RGB images (N, H, W, 3) -> float32 logits: (N, H, W, C) for a segmentation model, any
N, H, W >= 1; (N, C) for an FCN classifier, H, W at least its minimum input size;
preprocessing inside, parameters baked in), and ``OUT.json`` beside it (task, class names,
palette, input convention, minimum size, translation period, platforms, versions: see
:func:`fcnjax.inference.export.export_model`). Reading it back needs only jax and numpy::

    exp = jax.export.deserialize(open(OUT, "rb").read()); logits = exp.call(images)

WEIGHTS is a training workdir (its best checkpoint, else the latest; ``--step N`` picks one), an
fcnjax ``.safetensors`` or a pytorch-fcn ``.pth``. ``--platforms`` (comma-separated, from cpu,
cuda, rocm, tpu) chooses what to lower for; by default cpu and cuda, falling back to the
current backend alone if lowering for cuda fails. An existing OUT is kept unless
``--overwrite``.

Errors: any problem (a missing or unreadable WEIGHTS, a model that cannot be exported, an
existing or unwritable OUT) prints one line ``error: PATH: ...`` on stderr and exits with
status 1 (2 for a bad flag) — never a traceback.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

from fcnjax import compilation


def _one_line(e: BaseException) -> str:
  """``str(e)`` on one line (a multi-line message would split the ``error:`` line)."""
  return " ".join(str(e).split()) or type(e).__name__


def _platforms(text: str) -> tuple:
  from fcnjax.inference.export import KNOWN_PLATFORMS
  names = tuple(p.strip().lower() for p in text.split(",") if p.strip())
  bad = [p for p in names if p not in KNOWN_PLATFORMS]
  if not names or bad or len(set(names)) != len(names):
    raise argparse.ArgumentTypeError(
        f"{text!r}: give distinct platforms from {', '.join(KNOWN_PLATFORMS)}, comma-separated")
  return names


def _step(text: str) -> int:
  try:
    step = int(text)
  except ValueError:
    step = -1
  if step < 0:
    raise argparse.ArgumentTypeError(f"{text!r}: a checkpoint step is an integer >= 0")
  return step


def _error(message: str) -> int:
  print(f"error: {message}", file=sys.stderr)
  return 1


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m fcnjax.export", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("weights", metavar="WEIGHTS",
                      help="a training workdir, an fcnjax .safetensors or a pytorch-fcn .pth")
  parser.add_argument("out", metavar="OUT", help="the artifact to write (and OUT.json)")
  parser.add_argument("--step", type=_step, default=None,
                      help="the checkpoint step of a workdir (default: best, else latest)")
  parser.add_argument("--platforms", type=_platforms, default=None,
                      help="comma-separated platforms to lower for (default: cpu,cuda, else "
                           "this backend)")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
  parser.add_argument("--compile-cache", default=compilation.DEFAULT_CACHE_DIR,
                      help="JAX persistent compilation cache folder for the check run "
                           "('' = off; $JAX_COMPILATION_CACHE_DIR wins)")
  args = parser.parse_args(argv)

  out = pathlib.Path(args.out).expanduser()
  if out.is_dir():
    return _error(f"{out}: is a directory; give the artifact's file name")
  if out.exists() and not args.overwrite:
    return _error(f"{out}: already exists (pass --overwrite to replace it)")
  if not out.parent.is_dir():
    return _error(f"{out}: the folder {out.parent} does not exist")

  compilation.enable_persistent_cache(args.compile_cache)
  compiles = compilation.CompileStats()
  from fcnjax.inference.export import ExportError, export_model
  from fcnjax.inference.loading import ModelLoadError, load_model
  from fcnjax.weights.errors import WeightsError
  t0 = time.perf_counter()
  try:
    loaded = load_model(args.weights, step=args.step)
  except (ModelLoadError, WeightsError) as e:
    return _error(_one_line(e))
  except OSError as e:
    return _error(f"{args.weights}: cannot read ({_one_line(e)})")
  print(f"loaded {loaded.description}: {loaded.num_classes} classes, preprocessing "
        f"{loaded.preprocessing.name} ({time.perf_counter() - t0:.1f} s)")
  t1 = time.perf_counter()
  try:
    meta = export_model(loaded, out, platforms=args.platforms)
  except ExportError as e:
    return _error(_one_line(e))
  except OSError as e:
    return _error(f"{out}: cannot write the artifact ({_one_line(e)})")
  seconds = time.perf_counter() - t1
  json_path = pathlib.Path(f"{out}.json")
  print(f"wrote {out}: {out.stat().st_size:,} bytes, platforms {','.join(meta['platforms'])} "
        f"({meta['platforms_note']}), {seconds:.1f} s")
  print(f"wrote {json_path}: {json_path.stat().st_size:,} bytes of metadata")
  check = meta.get("check")
  if check:
    print(f"checked on {check['backend']}: max |artifact - model| {check['max_abs_diff']:.3g} "
          f"(max |logit| {check['max_abs_logit']:.3g}) at N x H x W "
          f"{', '.join('x'.join(map(str, s)) for s in check['sizes'])}")
  if meta["task"] == "classification":
    print(f"input uint8 RGB (N, H, W, 3), {meta['shape_constraints']} -> float32 logits "
          f"(N, {meta['num_classes']}) ({meta['task']})")
  else:
    print(f"input uint8 RGB (N, H, W, 3), {meta['shape_constraints']} -> float32 logits "
          f"(N, H, W, {meta['num_classes']}); translation period {meta['translation_period']}")
  print(f"compile: {compiles.counts().describe()} (cache {compilation.cache_dir() or 'off'})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
