"""Command line: ``python -m fcnjax.weights {convert,save,inspect}``.

``convert SRC DST --layout {torchvision-vgg16,pytorch-fcn,torchvision-resnet,torchvision-fcn-resnet,
keras-resnet-v2} [--model fcn8s] [--num-classes N] [--preprocessing caffe|torchvision|keras]`` writes an fcnjax ``.safetensors`` (with metadata: layout,
model, num_classes, preprocessing, ...) that ``fcnjax.weights.load(DST)`` reads back directly.

``save WORKDIR DST [--step N]`` writes the model of a training workdir (its best checkpoint,
else the latest; classifiers and segmenters alike) as an fcnjax ``.safetensors``, with its
class names (and a segmenter's palette) in the metadata.

``inspect FILE`` prints the keys, shapes and dtypes, the parameter count, the inferred layout and
any metadata.

Errors: any problem with a file (missing, empty, truncated, not the format its extension says,
missing keys, wrong shapes or dtypes, malformed metadata, an unwritable output) prints one line
``error: PATH: ...`` on stderr and exits with status 2 — never a traceback.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np


def _inspect(path) -> int:
  from fcnjax.weights import io, layouts
  from fcnjax.weights.errors import LayoutError
  tensors, metadata = io.read(path)
  try:
    layout = layouts.infer_layout(tensors, metadata)
  except LayoutError:
    layout = "unknown"
  width = max((len(k) for k in tensors), default=0)
  for k in sorted(tensors):
    v = tensors[k]
    print(f"{k:<{width}}  {str(tuple(v.shape)):<22} {v.dtype}")
  total = sum(int(np.prod(v.shape)) for v in tensors.values())
  print(f"tensors: {len(tensors)}")
  print(f"parameters: {total:,}")
  print(f"layout: {layout}")
  if layout == layouts.PYTORCH_FCN:
    try:
      print(f"model: {layouts.infer_pytorch_fcn_model(tensors, path)}")
    except LayoutError as e:
      print(f"model: ? ({e})")
  if layout in (layouts.TORCHVISION_RESNET, layouts.TORCHVISION_FCN_RESNET):
    from fcnjax.weights.api import _torchvision_resnet_spec
    from fcnjax.weights.errors import WeightsError
    stats = ("running_mean", "running_var", "num_batches_tracked")
    learnable = sum(int(np.prod(v.shape)) for k, v in tensors.items() if not k.endswith(stats))
    print(f"learnable parameters (without BatchNorm statistics): {learnable:,}")
    try:
      spec = _torchvision_resnet_spec(tensors, layout, None, None)
      extra = (f", {spec['num_classes']} classes, aux head {'yes' if spec['aux'] else 'no'}"
               if "aux" in spec else "")
      print(f"model: {spec['name']} (width x{spec['width_multiplier']:g}{extra})")
    except WeightsError as e:
      print(f"model: ? ({e})")
  if layout == layouts.KERAS_RESNET_V2:
    from fcnjax.weights.api import _keras_resnet_v2_spec
    from fcnjax.weights.errors import WeightsError
    stats = ("moving_mean", "moving_variance")
    learnable = sum(int(np.prod(v.shape)) for k, v in tensors.items() if not k.endswith(stats))
    print(f"learnable parameters (without BatchNorm statistics): {learnable:,}")
    try:
      spec = _keras_resnet_v2_spec(tensors, None, None)
      print(f"model: {spec['name']} (width x{spec['width_multiplier']:g})")
    except WeightsError as e:
      print(f"model: ? ({e})")
  for k, v in sorted(metadata.items()):
    print(f"metadata.{k}: {v}")
  return 0


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m fcnjax.weights", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  c = sub.add_parser("convert", help="convert a torchvision / pytorch-fcn file to fcnjax")
  c.add_argument("src")
  c.add_argument("dst", help="output .safetensors")
  c.add_argument("--layout", required=True,
                 choices=["torchvision-vgg16", "pytorch-fcn", "torchvision-resnet",
                          "torchvision-fcn-resnet", "keras-resnet-v2"])
  c.add_argument("--model", default=None,
                 help="fcnjax model to build: vgg16 / resnet18 ... (default for ImageNet files), "
                      "fcn32s, fcn16s, fcn8s, fcn8s-atonce, fcn_resnet50, d2l_fcn_resnet18, ... "
                      "(default: inferred from a pytorch-fcn or torchvision FCN-ResNet file)")
  c.add_argument("--num-classes", type=int, default=None,
                 help="classes of the model built from an ImageNet backbone (default 21)")
  c.add_argument("--preprocessing", default=None, choices=["caffe", "torchvision", "keras"],
                 help="override the input convention recorded for the weights")
  w = sub.add_parser("save", help="a training workdir's model as an fcnjax .safetensors")
  w.add_argument("workdir")
  w.add_argument("dst", help="output .safetensors")
  w.add_argument("--step", type=int, default=None, help="the checkpoint step (default: best)")
  i = sub.add_parser("inspect", help="keys, shapes, parameter count, inferred layout")
  i.add_argument("file")
  args = parser.parse_args(argv)

  from fcnjax.weights.errors import WeightsError
  try:
    if args.command == "inspect":
      return _inspect(args.file)
    if args.command == "save":
      return _save(args)
    from fcnjax.weights.api import convert, describe
    model, report = convert(args.src, args.dst, layout=args.layout, model=args.model,
                            num_classes=args.num_classes, preprocessing=args.preprocessing)
    meta = describe(model)
    print(f"wrote {args.dst}: model {meta['model']}, "
          f"{meta.get('num_classes', '-')} classes, preprocessing {meta.get('preprocessing')}")
    print(report)
    return 0
  except (WeightsError, OSError, ValueError) as e:  # ValueError: ModelLoadError of `save`;
    # OSError: a safety net, io wraps what it knows of
    print(f"error: {_one_line(e)}", file=sys.stderr)
    return 2


def _save(args) -> int:
  import json
  import pathlib
  from fcnjax.inference import loading
  from fcnjax.weights.api import save
  workdir = pathlib.Path(args.workdir)
  if not workdir.is_dir():
    raise loading.ModelLoadError(f"{workdir}: not a folder (give a training workdir)")
  if not str(args.dst).endswith(".safetensors"):
    raise loading.ModelLoadError(f"{args.dst}: the output must be a .safetensors file")
  loaded = loading.load_model(workdir, step=args.step)
  meta = {"class_names": json.dumps(list(loaded.class_names))}
  if loaded.task == "segmentation":
    meta["palette"] = json.dumps(np.asarray(loaded.palette)[:loaded.num_classes].tolist())
  save(loaded.model, args.dst, metadata=meta)
  print(f"wrote {args.dst}: {loaded.description}; {loaded.num_classes} classes ({loaded.task})")
  return 0


def _one_line(e: BaseException) -> str:
  """``str(e)`` on one line (a multi-line library message would split the ``error:`` line)."""
  return " ".join(str(e).split()) or type(e).__name__


if __name__ == "__main__":
  sys.exit(main())
