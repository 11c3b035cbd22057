"""Intermediate activations: what each named layer of a model computes for an image.

The maps are the model's own intermediates (``model(x, return_intermediates=True)``, the rows of
:mod:`fcnjax.models.summary`), so their shapes are the summary's. One jitted program per model,
set of layers and input shape.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fcnjax.interpret import layers as layers_lib


def _program(model, names: tuple):
  cache = layers_lib.cache_for(model)
  key = ("activations", names)
  if key not in cache:
    graphdef, _ = layers_lib.eval_graph(model)

    def run(state, x):
      _, out = nnx.merge(graphdef, state)(x, return_intermediates=True)
      return {n: out[n] for n in names}

    cache[key] = jax.jit(run)
  return cache[key]


def activations(model, images, layers=None) -> dict:
  """``{layer: (B, h, w, C) float32 numpy}`` for the named ``layers`` (a name or a list;
  default: every layer), in eval mode.

  ``images``: (B, H, W, 3) float in the model's input convention (``model.preprocessing``),
  every image the same size. Unknown names raise
  :class:`~fcnjax.interpret.layers.UnknownLayer` listing the model's layers."""
  x = jnp.asarray(images, jnp.float32)
  if x.ndim != 4 or x.shape[-1] != 3:
    raise ValueError(f"images must be (B, H, W, 3), got shape {tuple(x.shape)}")
  if layers is None:
    names = tuple(layers_lib.layer_names(model))
  else:
    names = (layers,) if isinstance(layers, str) else tuple(layers)
    layers_lib.check_layers(model, names)
  if layers_lib.task_of(model) == "classification":
    from fcnjax.models.classifier import check_input_size
    check_input_size(model, x.shape[1], x.shape[2])
  _, state = layers_lib.eval_graph(model)
  out = _program(model, names)(state, x)
  return {n: np.asarray(out[n], np.float32) for n in names}
