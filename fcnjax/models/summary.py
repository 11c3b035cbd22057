"""A per-layer summary of a segmentation model (layer, output shape, parameters) at a size.

The rows are the model's own named intermediates (``model(x, return_intermediates=True)``), in
the order its forward computes them, so the table shows what the forward does. Shapes come from
``jax.eval_shape``: nothing is computed, so even a full-width model is summarised quickly.
``python -m fcnjax.models.summary --model fcn8s --size 500 500``.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
from flax import nnx

from fcnjax.models.fcn import FCN, count_params
from fcnjax.models.registry import MODELS, build_model


def _params(modules) -> int:
  return sum(int(x.size) for m in modules for x in jax.tree.leaves(nnx.state(m, nnx.Param)))


def _label(model: FCN, name: str, modules) -> str:
  """The row label: the intermediate's name, annotated with what the forward did there."""
  if name == "pad":
    return f"pad to multiple of {model.backbone.input_multiple}"
  if not isinstance(model, FCN):
    return name
  if name == "crop":
    return f"crop {model.final_offset}"
  if name.startswith("fuse_"):
    return f"{name} (crop {model.skip_offsets[model.skips.index(name[len('fuse_'):])]})"
  if name in model.upscore_names:
    return f"{name} x{modules[name][0].factor}"
  if name.startswith("pool") and hasattr(model.backbone, "blocks"):
    block = model.backbone.blocks[int(name[len("pool"):]) - 1]
    return f"{name} ({block.pool})"
  return name


def layer_table(model: FCN, height: int, width: int, batch: int = 1) -> list[tuple[str, tuple, int]]:
  """Rows ``(layer name, output shape NHWC, learnable parameters)`` for an H×W input.

  One row per intermediate of ``model(x, return_intermediates=True)``; the parameters are those
  of the modules that produced it (:meth:`FCN.layer_modules`), so they sum to
  ``count_params(model)``, and the last row (``crop``) is the shape of ``model(x)``.
  """
  graphdef, state = nnx.split(model)

  def forward(state, x):
    return nnx.merge(graphdef, state)(x, return_intermediates=True)

  _, out = jax.eval_shape(forward, state,
                          jax.ShapeDtypeStruct((batch, height, width, 3), jnp.float32))
  modules = model.layer_modules()
  return [(_label(model, name, modules), tuple(v.shape), _params(modules.get(name, ())))
          for name, v in out.items()]


def format_table(rows, total: int) -> str:
  lines = [f"{'layer':<28} {'output (N, H, W, C)':<24} {'params':>13}", "-" * 67]
  for name, shape, n in rows:
    lines.append(f"{name:<28} {str(tuple(shape)):<24} {n:>13,}")
  lines += ["-" * 67, f"{'learnable parameters':<53} {total:>13,}"]
  return "\n".join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", choices=sorted(MODELS), default="fcn8s")
  p.add_argument("--size", type=int, nargs=2, default=(500, 500), metavar=("H", "W"))
  p.add_argument("--num-classes", type=int, default=21)
  p.add_argument("--width-multiplier", type=float, default=1.0)
  p.add_argument("--aligned", action="store_true")
  a = p.parse_args(argv)
  model = nnx.eval_shape(lambda: build_model(a.model, a.num_classes,
                                             width_multiplier=a.width_multiplier,
                                             aligned=a.aligned))
  crops = (f", crop offsets {model.skip_offsets} final {model.final_offset}"
           if isinstance(model, FCN) else "")
  print(f"{a.model}{' (aligned)' if a.aligned else ''}, input {a.size[0]}x{a.size[1]}{crops}")
  print(format_table(layer_table(model, *a.size), count_params(model)))


if __name__ == "__main__":
  main()
