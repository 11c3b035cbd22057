"""Look inside a trained model: Grad-CAM heatmaps, intermediate activations, filter patterns.

    python -m fcnjax.interpret gradcam WEIGHTS IMAGE... --out DIR [--class NAME] [--layer NAME]
                                       [--region x0,y0,x1,y1]
    python -m fcnjax.interpret activations WEIGHTS IMAGE... --out DIR [--layer NAME ...]
    python -m fcnjax.interpret filters WEIGHTS --out DIR [--layer NAME] [--filters 0-15]
    python -m fcnjax.interpret layers WEIGHTS [--size H W]

WEIGHTS: what ``python -m fcnjax.predict`` takes, except exported models (they keep no named
layers): a training workdir (its best checkpoint, else the latest; --step N for another) of a
classifier or a segmenter, an fcnjax .safetensors or a pytorch-fcn .pth. IMAGE: image files and
folders (searched recursively), any size and format Pillow reads.

gradcam: for each image DIR/<stem>_gradcam_<class>.png (the overlay, the image's size) and
<stem>_gradcam_<class>_panel.png (image | overlay, titled). --class is a class name or id
(default: the predicted class; for a segmenter the most frequent predicted class other than
class 0 (background), else 0). A segmenter's score is the class's logits summed over --region
(a box in pixels, exclusive ends), by default over the pixels predicted as the class.
activations: DIR/<stem>_<layer>.png, a grid of the layer's first --max-channels channels (and
with --npz DIR/<stem>_activations.npz of every asked layer). filters: DIR/filters_<layer>.png,
the patterns that maximise each filter's mean activation, and DIR/filters_<layer>.npz.
--layer names a layer as `layers` lists them (default: the last conv block).

An image that cannot be read (or is below a classifier's minimum size) is skipped and listed at
the end; the exit code is then 1.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np

EXIT_FAILURES = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def _err(msg: str) -> None:
  print(f"error: {msg}", file=sys.stderr, flush=True)


def _box(text: str) -> tuple:
  try:
    values = tuple(int(v) for v in text.split(","))
  except ValueError:
    values = ()
  if len(values) != 4 or values[0] >= values[2] or values[1] >= values[3] or min(values) < 0:
    raise argparse.ArgumentTypeError(f"expected x0,y0,x1,y1 in pixels with x0 < x1 and y0 < y1 "
                                     f"(exclusive ends), got {text!r}")
  return values


def _filters(text: str) -> list:
  out = []
  try:
    for part in text.split(","):
      if "-" in part:
        lo, hi = (int(v) for v in part.split("-"))
        if hi < lo:
          raise ValueError
        out += range(lo, hi + 1)
      else:
        out.append(int(part))
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected filter indices like 0-15 or 0,3,7, got "
                                     f"{text!r}") from None
  if not out or min(out) < 0:
    raise argparse.ArgumentTypeError(f"expected filter indices >= 0, got {text!r}")
  return out


def _size(text: str) -> tuple:
  try:
    parts = [int(v) for v in text.lower().split("x")]
  except ValueError:
    parts = []
  if len(parts) == 1:
    parts = parts * 2
  if len(parts) != 2 or min(parts) < 1:
    raise argparse.ArgumentTypeError(f"expected a size like 64 or 48x96 (HxW), got {text!r}")
  return tuple(parts)


def _positive(kind):
  def parse(text):
    try:
      v = kind(text)
    except ValueError:
      v = None
    if v is None or not v > 0:
      raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return v
  return parse


def _non_negative_int(text):
  try:
    v = int(text)
  except ValueError:
    v = -1
  if v < 0:
    raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
  return v


def parse_args(argv=None):
  doc = __doc__.split("\n\n")
  p = argparse.ArgumentParser(prog="python -m fcnjax.interpret", description=doc[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog="\n\n".join(doc[1:]))
  sub = p.add_subparsers(dest="command", required=True, metavar="{gradcam,activations,filters,"
                         "layers}")

  def common(sp, images: bool):
    sp.add_argument("weights", help="training workdir, fcnjax .safetensors or pytorch-fcn .pth")
    if images:
      sp.add_argument("images", nargs="+", metavar="IMAGE", help="image files and folders")
    sp.add_argument("--step", type=_non_negative_int, help="workdir: the checkpoint step")
    sp.add_argument("--compile-cache", default="~/.cache/fcnjax/xla",
                    help="JAX persistent compilation cache folder ('' = off)")

  g = sub.add_parser("gradcam", help="class activation heatmaps")
  common(g, True)
  g.add_argument("--out", required=True, help="output folder")
  g.add_argument("--class", dest="class_", metavar="NAME", help="class name or id")
  g.add_argument("--layer", help="layer name (default: the last conv block)")
  g.add_argument("--region", type=_box, metavar="x0,y0,x1,y1",
                 help="segmenters: sum the class's logits over this box")
  g.add_argument("--alpha", type=float, default=0.4, help="heatmap opacity (default 0.4)")

  a = sub.add_parser("activations", help="intermediate activation grids")
  common(a, True)
  a.add_argument("--out", required=True, help="output folder")
  a.add_argument("--layer", action="append", help="layer name (repeatable; default: the last "
                 "conv block)")
  a.add_argument("--max-channels", type=_positive(int), default=64,
                 help="channels per grid (default 64)")
  a.add_argument("--npz", action="store_true", help="also write <stem>_activations.npz")

  f = sub.add_parser("filters", help="filter patterns by gradient ascent")
  common(f, False)
  f.add_argument("--out", required=True, help="output folder")
  f.add_argument("--layer", help="layer name (default: the last conv block)")
  f.add_argument("--filters", type=_filters, default=None,
                 help="filter indices, e.g. 0-15 or 0,3,7 (default: the first 16)")
  f.add_argument("--steps", type=_non_negative_int, default=30, help="ascent steps (30)")
  f.add_argument("--size", type=_size, default=None,
                 help="pattern size, e.g. 64 or 48x96 (default 64, at least the model's "
                 "minimum input size)")
  f.add_argument("--seed", type=int, default=0, help="seed of the starting noise (0)")
  f.add_argument("--learning-rate", type=_positive(float), default=0.03,
                 help="RMS change of the RGB values (0..1) per step (0.03)")

  s = sub.add_parser("layers", help="list the layer names and their shapes")
  common(s, False)
  s.add_argument("--size", type=int, nargs=2, default=None, metavar=("H", "W"),
                 help="input size for the shapes (default 64 x 64, or the minimum size)")
  return p.parse_args(argv)


def _load(args):
  """The LoadedModel of WEIGHTS, or an error line (returns None)."""
  from fcnjax.inference import loading
  from fcnjax.serving.artifact import is_exported
  from fcnjax.weights import WeightsError
  path = pathlib.Path(args.weights).expanduser()
  if path.is_file() and is_exported(path):
    _err(f"{path}: an exported model keeps no named layers: give the training workdir or the "
         ".safetensors it was exported from")
    return None
  try:
    return loading.load_model(path, step=args.step)
  except (loading.ModelLoadError, WeightsError) as e:
    _err(str(e))
    return None


def _class_id(text, names) -> int:
  if text in names:
    return names.index(text)
  try:
    i = int(text)
  except ValueError:
    i = -1
  if 0 <= i < len(names):
    return i
  raise ValueError(f"--class {text!r} is not a class of this model; its classes: "
                   f"{', '.join(f'{k} {n}' for k, n in enumerate(names))}")


def _safe(name: str) -> str:
  return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _read_all(args, out_dir):
  """``[(path, stem, rgb)]`` for the readable images, and ``[(path, reason)]`` for the rest."""
  from fcnjax.inference import images as images_lib
  from fcnjax.predict import find_inputs
  found = find_inputs(args.images, exclude=out_dir)
  ok, failed = [], []
  for path, stem in found:
    try:
      ok.append((path, stem, images_lib.read_image(path)))
    except images_lib.ImageReadError as e:
      failed.append((path, str(e)))
  return ok, failed


def _segment_class(logits: np.ndarray) -> int:
  counts = np.bincount(np.argmax(logits, -1).ravel(), minlength=logits.shape[-1])
  if counts[1:].sum() > 0:
    return int(np.argmax(counts[1:]) + 1)
  return 0


def _gradcam(args, loaded, out_dir, items) -> list:
  from PIL import Image
  from fcnjax.interpret import grad_cam as gradcam_lib
  from fcnjax.interpret import layers as layers_lib
  from fcnjax.interpret import plots
  from fcnjax.models.classifier import InputTooSmall
  model, names = loaded.model, list(loaded.class_names)
  classifier = loaded.task == "classification"
  if classifier and args.region is not None:
    raise ValueError("--region applies to segmenters only: a classifier's class score is its "
                     "logit for the whole image")
  layer = args.layer or layers_lib.default_layer(model)
  layers_lib.check_layers(model, [layer])
  fixed = _class_id(args.class_, names) if args.class_ is not None else None
  failed = []
  for path, stem, rgb in items:
    x = loaded.preprocessing(rgb[None])
    h, w = rgb.shape[:2]
    if args.region is not None and not (args.region[2] <= w and args.region[3] <= h):
      failed.append((path, f"{path}: --region {','.join(map(str, args.region))} is outside "
                           f"the {w}x{h} image"))
      continue
    try:
      if fixed is None:  # the predicted class: one forward first
        logits = layers_lib.logits(model, x)[0]
        cls = int(np.argmax(logits)) if classifier else _segment_class(logits)
      else:
        cls = fixed
      r = gradcam_lib.gradcam_result(model, x, cls, layer, region=args.region)
    except InputTooSmall as e:
      failed.append((path, f"{path}: {e}"))
      continue
    name = names[cls]
    if classifier:
      p = np.exp(r.logits[0] - r.logits[0].max())
      p /= p.sum()
      what = f"p({name}) = {p[cls]:.3f}, predicted {names[int(np.argmax(p))]}"
    else:
      where = ("--region " + ",".join(map(str, args.region)) if args.region is not None
               else "its predicted pixels")
      what = f"logits summed over {where} ({int(r.region_pixels[0])} px)"
    note = ""
    if r.layer_map.max() <= 0:
      note = " - the heatmap is empty (no positive evidence at this layer"
      note += (": the class is predicted nowhere; pass --region or --class)"
               if not classifier and args.region is None and r.region_pixels[0] == 0 else ")")
    if r.layer_map.shape[1] * r.layer_map.shape[2] < 16 and args.layer is None:
      note += (f" - note: {layer} is only {r.layer_map.shape[1]}x{r.layer_map.shape[2]} cells at "
               "this image size, too coarse to localise; try a finer layer (`layers` lists them)")
    base = out_dir / f"{stem}_gradcam_{_safe(name)}"
    base.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(plots.overlay(rgb, r.heatmap[0], args.alpha)).save(f"{base}.png")
    plots.save_gradcam(f"{base}_panel.png", rgb, r.heatmap[0],
                       f"{path.name}: Grad-CAM of {name!r} at {layer}; {what}", args.alpha,
                       box=args.region)
    peak = np.unravel_index(int(np.argmax(r.heatmap[0])), r.heatmap[0].shape)
    where = f"peak at x={peak[1]} y={peak[0]}" if r.heatmap[0].max() > 0 else "no peak"
    print(f"{path}: class {name} at {layer} {r.layer_map.shape[1]}x{r.layer_map.shape[2]}, "
          f"{what}; {where} -> {base}.png{note}", flush=True)
  return failed


def _activations(args, loaded, out_dir, items) -> list:
  from fcnjax.interpret import layers as layers_lib
  from fcnjax.interpret import plots
  from fcnjax.interpret.intermediates import activations
  from fcnjax.models.classifier import InputTooSmall
  model = loaded.model
  names = args.layer or [layers_lib.default_layer(model)]
  layers_lib.check_layers(model, names)
  failed = []
  for path, stem, rgb in items:
    try:
      acts = activations(model, loaded.preprocessing(rgb[None]), names)
    except InputTooSmall as e:
      failed.append((path, f"{path}: {e}"))
      continue
    (out_dir / stem).parent.mkdir(parents=True, exist_ok=True)
    for name, a in acts.items():
      target = out_dir / f"{stem}_{_safe(name)}.png"
      plots.save_activation_grid(target, a[0], f"{path.name}: {name} {a.shape[1]}x{a.shape[2]}"
                                 f"x{a.shape[3]}", args.max_channels)
      print(f"{path}: {name} {a.shape[1]}x{a.shape[2]}x{a.shape[3]}, channels "
            f"0..{min(a.shape[3], args.max_channels) - 1} -> {target}", flush=True)
    if args.npz:
      np.savez_compressed(out_dir / f"{stem}_activations.npz", **{n: a[0] for n, a in
                                                                  acts.items()})
  return failed


def _filters_cmd(args, loaded, out_dir) -> None:
  from fcnjax.interpret import filters as filters_lib
  from fcnjax.interpret import layers as layers_lib
  from fcnjax.interpret import plots
  from fcnjax.models.classifier import min_input_size
  model = loaded.model
  layer = args.layer or layers_lib.default_layer(model)
  layers_lib.check_layers(model, [layer])
  mh, mw = min_input_size(model)
  size = args.size or (max(64, mh), max(64, mw))
  if size[0] < mh or size[1] < mw:
    raise ValueError(f"--size {size[0]}x{size[1]} is below the model's minimum input size "
                     f"{mh}x{mw}")
  r = filters_lib.filter_patterns(model, layer, args.filters if args.filters else 16,
                                  args.steps, size, seed=args.seed,
                                  learning_rate=args.learning_rate)
  out_dir.mkdir(parents=True, exist_ok=True)
  target = out_dir / f"filters_{_safe(layer)}.png"
  plots.save_filter_grid(target, r.images, r.filters,
                         f"{layer}: patterns of filters {r.filters[0]}..{r.filters[-1]} "
                         f"({args.steps} steps, seed {args.seed})")
  np.savez_compressed(out_dir / f"filters_{_safe(layer)}.npz", images=r.images, rgb=r.rgb,
                      filters=r.filters, start=r.start, end=r.end)
  dead = [int(f) for f, e in zip(r.filters, r.end) if e <= 0]
  print(f"{layer}: {len(r.filters)} filters, {size[0]}x{size[1]}, {args.steps} steps: mean "
        f"activation {np.mean(r.start):.3g} -> {np.mean(r.end):.3g} -> {target}"
        + (f"; {len(dead)} filter(s) never active (no gradient from the noise): "
           f"{', '.join(map(str, dead))}" if dead else ""), flush=True)


def _layers_cmd(args, loaded) -> None:
  from fcnjax.interpret import layers as layers_lib
  from fcnjax.models.classifier import min_input_size
  mh, mw = min_input_size(loaded.model)
  h, w = args.size or (max(64, mh), max(64, mw))
  if h < mh or w < mw:
    raise ValueError(f"--size {h} {w} is below the model's minimum input size {mh}x{mw}")
  default = layers_lib.default_layer(loaded.model)
  print(f"{loaded.description}: layers at input {h}x{w} (default layer: {default})")
  for name, shape in layers_lib.layer_shapes(loaded.model, h, w).items():
    print(f"  {name:<24} {str(shape)}")


def main(argv=None) -> int:
  args = parse_args(argv)
  try:
    return _run(args)
  except KeyboardInterrupt:
    where = f" in {args.out}" if getattr(args, "out", None) else ""
    print(f"interrupted: the outputs listed above are complete{where}; the rest were not "
          "written", file=sys.stderr, flush=True)
    return EXIT_INTERRUPTED


def _run(args) -> int:
  from fcnjax import compilation
  compilation.enable_persistent_cache(args.compile_cache)
  loaded = _load(args)
  if loaded is None:
    return EXIT_FAILURES
  print(f"model: {loaded.description}; {loaded.num_classes} classes ({loaded.task})",
        flush=True)
  failed = []
  try:
    if args.command == "layers":
      _layers_cmd(args, loaded)
      return 0
    out_dir = pathlib.Path(args.out).expanduser()
    if args.command == "filters":
      _filters_cmd(args, loaded, out_dir)
      return 0
    items, failed = _read_all(args, out_dir)
    run = _gradcam if args.command == "gradcam" else _activations
    failed += run(args, loaded, out_dir, items)
  except ValueError as e:  # unknown layer / class, bad region or size, missing inputs
    _err(str(e).splitlines()[0] if str(e) else type(e).__name__)
    return EXIT_USAGE
  if failed:
    print(f"{len(failed)} input(s) skipped:", file=sys.stderr)
    for _, reason in failed:
      print(f"  {reason}", file=sys.stderr)
    return EXIT_FAILURES
  return 0
