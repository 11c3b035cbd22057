"""Does a classifier trained with unmasked zero padding "learn to ignore the zeros"?

    python experiments/classify/padding_check.py VAL_DIR WORKDIR [WORKDIR ...] [--per-class 10]

For the first ``--per-class`` images of each class of a class-per-folder VAL_DIR, each workdir's
model is run (a) on the image alone at its own size and (b) on the image zero-padded (in the
preprocessed space, where the size buckets pad) to 160 x 400, the extent of the built-in data's
largest images, with the padding mask passed (a masked model ignores what it marks; an unmasked
one pools it). Prints, per workdir, top-1 both ways and the max / median over images of
max |logits(a) - logits(b)|. Used for experiments/classify/README.md.
"""

import argparse
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from fcnjax.inference import loading

CANVAS = (160, 400)


def check(workdir, items):
  loaded = loading.load_model(workdir)
  names = list(loaded.class_names)
  graphdef, state = nnx.split(loaded.model)
  forward = jax.jit(lambda state, x, mask=None: nnx.merge(graphdef, state)(x, mask=mask))
  alone, padded, diffs = [], [], []
  for cls, path in items:
    rgb = np.asarray(Image.open(path).convert("RGB"))
    x = jnp.asarray(loaded.preprocessing(rgb[None]), jnp.float32)
    h, w = rgb.shape[:2]
    canvas = jnp.zeros((1, *CANVAS, 3), jnp.float32).at[:, :h, :w].set(x)
    mask = jnp.zeros((1, *CANVAS), bool).at[:, :h, :w].set(True)
    a = np.asarray(forward(state, x))[0]
    b = np.asarray(forward(state, canvas, mask))[0]
    y = names.index(cls)
    alone.append(a.argmax() == y)
    padded.append(b.argmax() == y)
    diffs.append(float(np.abs(a - b).max()))
  return {"masked": bool(getattr(loaded.model, "masked", True)), "images": len(items),
          "top1_alone": float(np.mean(alone)), "top1_padded": float(np.mean(padded)),
          "max_abs_logit_diff": max(diffs), "median_abs_logit_diff": float(np.median(diffs))}


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("val_dir", type=pathlib.Path)
  p.add_argument("workdirs", nargs="+")
  p.add_argument("--per-class", type=int, default=10)
  args = p.parse_args()
  classes = sorted(d.name for d in args.val_dir.iterdir() if d.is_dir())
  items = [(c, f) for c in classes for f in sorted((args.val_dir / c).iterdir())[:args.per_class]]
  for wd in args.workdirs:
    print(wd, json.dumps(check(wd, items)), flush=True)


if __name__ == "__main__":
  main()
