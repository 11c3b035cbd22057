"""Predict segmentation maps for your own images.

    python -m fcnjax.predict WEIGHTS INPUT... --out DIR [options]

    python -m fcnjax.predict runs/smoke-fcn8s photos/ --out preds --overlay
    python -m fcnjax.predict fcn8s_from_caffe.pth a.jpg b.png --out preds --probs
    python -m fcnjax.predict model.fcnjax-export big_scan.tif --out preds --tile 1024 1024

WEIGHTS: a training workdir (its best checkpoint, else latest; --step N for another), an fcnjax
.safetensors (fcnjax.weights.save), a pytorch-fcn .pth, or an exported model (python -m
fcnjax.export). INPUT: image files and folders (searched recursively; --glob to filter), any
size, any format Pillow reads; grey, RGBA, palette and 16-bit images are converted to RGB.

For each input, DIR/<path relative to its INPUT folder, extension replaced>.png is the class map:
a palette PNG of exactly the input's width and height, pixel value = class id, coloured with the
model's palette (VOC's by default). --overlay adds <stem>_overlay.png (image blended with the
class colours, legend of the classes present), --probs <stem>.npz (probs: H x W x C float16).

Speed: images are batched in size buckets planned on their sizes (a few programs for any number
of sizes), decoded ahead by grain threads. --exact runs each image at its own size (one program
per distinct size; the reference protocol). Images above --max-pixels (default 2048 x 2048) are
predicted in overlapping 1024 x 1024 tiles; --tile H W sets tiles for every image. --flip and
--scales average the softmax over flipped / rescaled views.

An input that cannot be read is skipped and listed at the end; the exit code is then 1
(--strict stops at the first). Existing outputs are kept unless --overwrite.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import fnmatch
import os
import pathlib
import sys
import time

import numpy as np

EXIT_FAILURES = 1
EXIT_USAGE = 2


def _int_at_least(low: int):
  """An argparse type: an integer >= ``low``, else one message naming the value."""
  what = "a positive integer" if low == 1 else f"an integer >= {low}"

  def parse(text):
    try:
      v = int(text)
    except ValueError:
      v = None
    if v is None or v < low:
      raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return v

  return parse


_positive_int, _non_negative_int = _int_at_least(1), _int_at_least(0)


def _scales(text):
  try:
    values = tuple(float(s) for s in text.split(",") if s.strip())
  except ValueError:
    raise argparse.ArgumentTypeError(
        f"expected comma-separated positive numbers like 0.5,1,1.5, got {text!r}") from None
  if not values or any(not (v > 0) or v == float("inf") for v in values):
    raise argparse.ArgumentTypeError(
        f"expected comma-separated positive numbers like 0.5,1,1.5, got {text!r}")
  return values


def parse_args(argv=None):
  p = argparse.ArgumentParser(prog="python -m fcnjax.predict",
                              description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=__doc__.split("\n\n", 2)[2])
  p.add_argument("weights", help="training workdir, .safetensors, pytorch-fcn .pth, or export")
  p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files and folders")
  p.add_argument("--out", required=True, help="output folder")
  p.add_argument("--step", type=_non_negative_int, help="workdir: the checkpoint step to use")
  p.add_argument("--glob", help="in folders, only files matching this pattern (e.g. '*.jpg'); "
                 "default: every extension Pillow opens")
  p.add_argument("--overlay", action="store_true", help="also write <stem>_overlay.png")
  p.add_argument("--probs", action="store_true", help="also write <stem>.npz (float16 probs)")
  p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
  p.add_argument("--exact", action="store_true",
                 help="each image at its own size (one program per distinct size)")
  p.add_argument("--max-buckets", type=_positive_int, default=8,
                 help="size buckets in bucketed mode (default 8)")
  p.add_argument("--tile", type=_positive_int, nargs=2, metavar=("H", "W"),
                 help="sliding-window tiles of H x W for every image larger than that")
  p.add_argument("--overlap", type=_non_negative_int, default=None,
                 help="pixels shared by neighbouring tiles (default 256, or tile/4 if smaller)")
  p.add_argument("--max-pixels", type=_positive_int, default=None,
                 help="tile images with more pixels than this automatically (default "
                 "4194304 = 2048 x 2048)")
  p.add_argument("--flip", action="store_true", help="TTA: average with the mirrored image")
  p.add_argument("--scales", type=_scales, default=(1.0,),
                 help="TTA: comma-separated input scales, e.g. 0.5,0.75,1,1.25,1.5")
  p.add_argument("--batch-pixels", type=_positive_int, default=None,
                 help="pixels per batch in bucketed mode (default 1048576)")
  p.add_argument("--workers", type=_positive_int, default=4, help="decoding threads (default 4)")
  p.add_argument("--strict", action="store_true", help="stop at the first unreadable input")
  p.add_argument("--compile-cache", default="~/.cache/fcnjax/xla",
                 help="JAX persistent compilation cache folder ('' = off)")
  return p.parse_args(argv)


def find_inputs(inputs, pattern=None, exclude=None) -> list:
  """``[(path, relative output stem), ...]`` for the INPUT arguments (files under the folder
  ``exclude``, the output folder, are left out); raises ``ValueError`` naming an input that does
  not exist or a folder without images."""
  from fcnjax.data.readers import IMAGE_EXTS
  found = []
  for arg in inputs:
    root = pathlib.Path(arg).expanduser()
    if root.is_file():
      found.append((root, pathlib.Path(root.stem)))
    elif root.is_dir():
      files = sorted(p for p in root.rglob("*") if p.is_file() and not any(
          part.startswith(".") for part in p.relative_to(root).parts))
      if exclude is not None:
        skip = pathlib.Path(exclude).resolve()
        files = [p for p in files if skip not in p.resolve().parents]
      if pattern:
        files = [p for p in files if fnmatch.fnmatch(p.name, pattern)
                 or fnmatch.fnmatch(str(p.relative_to(root)), pattern)]
      else:
        files = [p for p in files if p.suffix.lower() in IMAGE_EXTS]
      if not files:
        what = f"matching {pattern!r}" if pattern else "with an image extension"
        raise ValueError(f"{root}: no files {what} in this folder")
      found += [(p, p.relative_to(root).with_suffix("")) for p in files]
    else:
      raise ValueError(f"{root}: no such file or folder")
  return _unique_stems(found)


def _unique_stems(found: list) -> list:
  """Inputs whose outputs would collide (a.jpg and a.png) keep their extension in the stem."""
  seen = {}
  for _, stem in found:
    seen[stem] = seen.get(stem, 0) + 1
  out, used = [], set()
  for path, stem in found:
    if seen[stem] > 1:
      stem = stem.with_name(f"{stem.name}_{path.suffix.lstrip('.').lower() or 'noext'}")
    base, n = stem, 1
    while stem in used:
      stem, n = base.with_name(f"{base.name}_{n}"), n + 1
    used.add(stem)
    out.append((path, stem))
  return out


def output_paths(out_dir: pathlib.Path, stem: pathlib.Path, args) -> list:
  paths = [out_dir / stem.with_name(stem.name + ".png")]
  if args.overlay:
    paths.append(out_dir / stem.with_name(stem.name + "_overlay.png"))
  if args.probs:
    paths.append(out_dir / stem.with_name(stem.name + ".npz"))
  return paths


def _err(text: str) -> None:
  print(f"error: {text}", file=sys.stderr, flush=True)


def main(argv=None) -> int:
  args = parse_args(argv)
  out_dir = pathlib.Path(args.out).expanduser()
  try:
    inputs = find_inputs(args.inputs, args.glob, exclude=out_dir)
  except ValueError as e:
    _err(str(e))
    return EXIT_USAGE
  if out_dir.exists() and not out_dir.is_dir():
    _err(f"--out {out_dir}: exists and is not a folder")
    return EXIT_USAGE
  targets = [output_paths(out_dir, stem, args) for _, stem in inputs]
  existing = [p for paths in targets for p in paths if p.exists()]
  if existing and not args.overwrite:
    more = f" (and {len(existing) - 1} more outputs)" if len(existing) > 1 else ""
    _err(f"{existing[0]} exists{more}: pass --overwrite to replace, or choose another --out")
    return EXIT_USAGE
  overlap = args.overlap
  if overlap is None:
    overlap = 256 if not args.tile else min(256, min(args.tile) // 4)
  if args.tile and overlap >= min(args.tile):
    _err(f"--overlap {overlap} must be smaller than --tile {args.tile[0]} {args.tile[1]}")
    return EXIT_USAGE

  from fcnjax import compilation
  compilation.enable_persistent_cache(args.compile_cache)
  compiles = compilation.CompileStats()
  from fcnjax.inference import images as images_lib
  from fcnjax.inference import loading, outputs
  from fcnjax.inference.predictor import AUTO_TILE_PIXELS, DEFAULT_BATCH_PIXELS, Predictor
  from fcnjax.weights import WeightsError
  from fcnjax.inference.export import ExportError
  start = time.perf_counter()
  try:
    predictor = Predictor(args.weights, step=args.step, exact=args.exact,
                          max_buckets=args.max_buckets, tile=tuple(args.tile) if args.tile
                          else None, overlap=overlap,
                          max_pixels=args.max_pixels or AUTO_TILE_PIXELS, flip=args.flip,
                          scales=args.scales,
                          batch_pixels=args.batch_pixels or DEFAULT_BATCH_PIXELS)
  except (loading.ModelLoadError, WeightsError, ExportError) as e:
    _err(str(e))
    return EXIT_FAILURES
  except ValueError as e:  # an option the predictor refuses
    _err(str(e))
    return EXIT_USAGE
  print(f"model: {predictor.description}; {predictor.num_classes} classes (loaded in "
        f"{time.perf_counter() - start:.1f} s)", flush=True)
  start = time.perf_counter()

  failures = []  # (path, reason)
  sizes, ok = [], []
  for (path, stem), paths in zip(inputs, targets):
    try:
      sizes.append(images_lib.image_size(path))
      ok.append((path, paths))
    except images_lib.ImageReadError as e:
      failures.append((path, str(e)))
      if args.strict:
        _err(f"{e} (--strict: stopped before predicting)")
        return EXIT_FAILURES
  shapes = predictor.plan(sizes)
  if predictor.exact and not args.exact:  # an export whose logits depend on the whole input
    exact_mode = "exact (this export's logits depend on the whole input size: no padding)"
  else:
    exact_mode = "exact"
  mode = (exact_mode if predictor.exact else f"bucketed ({len(shapes)} buckets)") + (
      f", tiles {args.tile[0]}x{args.tile[1]} overlap {overlap}" if args.tile else "") + (
      ", flip" if args.flip else "") + (
      f", scales {','.join(f'{s:g}' for s in args.scales)}" if args.scales != (1.0,) else "")
  print(f"inputs: {len(inputs)} files, {len(ok)} readable; {mode}", flush=True)

  try:
    done = _predict_all(predictor, ok, args, failures, outputs, images_lib)
  except KeyboardInterrupt:
    written = sum(1 for _, paths in ok if paths[0].exists())
    print(f"interrupted: {written} of {len(ok)} class maps are in {out_dir} (the last one may "
          "be incomplete); run the same command with --overwrite to redo them all",
          file=sys.stderr, flush=True)
    return 130
  if done is None:
    return EXIT_FAILURES
  seconds = time.perf_counter() - start
  rate = done / seconds if seconds > 0 else float("inf")
  print(f"predicted {done} images in {seconds:.1f} s ({rate:.2f} images/s), "
        f"{predictor.programs_compiled} programs compiled, {len(failures)} failures; outputs in "
        f"{out_dir}", flush=True)
  print(f"compile: {compiles.counts().describe()} (cache {compilation.cache_dir() or 'off'})",
        flush=True)
  for path, reason in failures:
    print(f"  skipped {reason}" if str(path) in reason else f"  skipped {path}: {reason}",
          flush=True)
  return EXIT_FAILURES if failures else 0


def _decoded(ok: list, workers: int, images_lib):
  """``(index, rgb or ImageReadError)`` for every input, decoded ahead by grain threads."""
  import grain

  def decode(i):
    try:
      return i, images_lib.read_image(ok[i][0])
    except images_lib.ImageReadError as e:
      return i, e

  ds = grain.MapDataset.range(len(ok)).map(decode)
  return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=workers,
                                                   prefetch_buffer_size=2 * workers)))


def _predict_all(predictor, ok, args, failures, outputs, images_lib):
  """Predict and write every readable input; returns the number done (None: --strict stop)."""
  from tqdm.auto import tqdm
  done = 0
  rgbs = {}
  bar = tqdm(total=len(ok), unit="img", file=sys.stderr, disable=None, desc="predict")

  def records():
    for i, rgb in _decoded(ok, args.workers, images_lib):
      if isinstance(rgb, np.ndarray):
        rgbs[i] = rgb
      yield i, rgb

  def write(i, pred):
    rgb = rgbs.pop(i)
    paths = ok[i][1]
    outputs.save_classes(paths[0], pred.classes, predictor.palette)
    k = 1
    if args.overlay:
      outputs.save_overlay(paths[k], rgb, pred.classes, predictor.palette,
                           predictor.class_names)
      k += 1
    if args.probs:
      outputs.save_probs(paths[k], pred.probs, predictor.class_names)

  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    pending = []
    try:
      for i, result in predictor.predict_records(records(), proba=args.probs):
        if isinstance(result, Exception):
          failures.append((ok[i][0], str(result)))
          bar.update(1)
          if args.strict:
            _err(f"{result} (--strict: stopped; {done} images were written)")
            return None
          continue
        pending.append(pool.submit(write, i, result))
        done += 1
        bar.update(1)
      for f in pending:
        f.result()
    except OSError as e:
      where = f"{e.filename}: " if e.filename else ""
      _err(f"{where}{e.strerror or e} (writing the outputs)")
      return None
    finally:
      bar.close()
  return done


if __name__ == "__main__":
  sys.exit(main())
