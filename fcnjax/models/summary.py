"""A per-layer summary of an FCN (layer, output shape, parameters) at a given input size.

Shapes come from ``jax.eval_shape``: nothing is computed, so a full-width FCN-8s at 500×500 is
summarised in about a second. ``python -m fcnjax.models.summary --model fcn8s --size 500 500``.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
from flax import nnx

from fcnjax.models.fcn import FCN, MODELS, count_params
from fcnjax.models.layers import crop


def _params(module) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


def layer_table(model: FCN, height: int, width: int, batch: int = 1) -> list[tuple[str, tuple, int]]:
  """Rows ``(layer name, output shape NHWC, learnable parameters)`` for an H×W input."""
  rows = []
  graphdef, state = nnx.split(model)

  def run(state, x):
    model = nnx.merge(graphdef, state)
    b = model.backbone
    m = b.input_multiple
    h, w = x.shape[1], x.shape[2]
    if m > 1:
      x = jnp.pad(x, ((0, 0), (0, -h % m), (0, -w % m), (0, 0)))
      rows.append((f"pad to multiple of {m}", x.shape, 0))
    feats = {}
    for i, block in enumerate(b.blocks):
      for stage, x in block.stages(x):
        if stage == "pool":
          feats[f"pool{i + 1}"] = x
          rows.append((f"pool{i + 1} ({block.pool})", x.shape, 0))
        else:
          j = int(stage[4:]) - 1
          rows.append((f"conv{i + 1}_{j + 1}", x.shape, _params(block.convs[j])))
    x = jax.nn.relu(b.fc6(x))
    rows.append(("fc6", x.shape, _params(b.fc6)))
    x = jax.nn.relu(b.fc7(x))
    rows.append(("fc7", x.shape, _params(b.fc7)))
    s = model.score_fr(x)
    rows.append(("score_fr", s.shape, _params(model.score_fr)))
    for name, up, head, off in zip(model.skips, model.upscore_skips, model.score_skips,
                                   model.skip_offsets):
      s = up(s)
      rows.append((f"upscore x{up.factor}", s.shape, _params(up)))
      k = head(feats[name])
      rows.append((f"score_{name}", k.shape, _params(head)))
      s = s + crop(k, off, s.shape[1], s.shape[2])
      rows.append((f"fuse_{name} (crop {off})", s.shape, 0))
    s = model.upscore_final(s)
    rows.append((f"upscore x{model.upscore_final.factor}", s.shape, _params(model.upscore_final)))
    s = crop(s, model.final_offset, h, w)
    rows.append((f"crop {model.final_offset}", s.shape, 0))
    return s

  jax.eval_shape(run, state, jax.ShapeDtypeStruct((batch, height, width, 3), jnp.float32))
  return rows


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
  model = nnx.eval_shape(lambda: MODELS[a.model](a.num_classes, width_multiplier=a.width_multiplier,
                                                  aligned=a.aligned, rngs=nnx.Rngs(0)))
  print(f"{a.model}{' (aligned)' if a.aligned else ''}, input {a.size[0]}x{a.size[1]}, "
        f"crop offsets {model.skip_offsets} final {model.final_offset}")
  print(format_table(layer_table(model, *a.size), count_params(model)))


if __name__ == "__main__":
  main()
