"""Filter patterns: the input each filter of a layer responds to most, by gradient ascent.

Deep Learning with Python's recipe (ch. 9): start from a grey image with a little uniform noise
(RGB in [0.4, 0.6]), and for ``steps`` steps move it along the gradient of the filter's mean
activation (the border cells left out), the gradient **L2-normalised** per image so that every
step has the same size whatever the layer's scale. Then show the result with its mean and
spread normalised (:func:`to_display`). Here the ascent runs in RGB space ([0, 1] per channel)
through the model's own preprocessing, so one ``learning_rate`` fits every input convention:
each step changes the image by ``learning_rate`` root-mean-square per value. All filters of a
call run as one batch in one jitted loop; the noise comes from ``jax.random.key(seed)``, so a
seed gives the same patterns on the same machine and software.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fcnjax.interpret import layers as layers_lib


@dataclasses.dataclass(frozen=True)
class FilterPatterns:
  """Attributes:
    images: (F, H, W, 3) uint8, the patterns as shown (:func:`to_display`).
    rgb: (F, H, W, 3) float32, the optimised RGB inputs (0..1 scale, not clipped).
    filters: (F,) int, the filter (channel) of each pattern.
    start: (F,) float32, each filter's mean activation on the starting noise.
    end: (F,) float32, the same after the ascent.
  """

  images: np.ndarray
  rgb: np.ndarray
  filters: np.ndarray
  start: np.ndarray
  end: np.ndarray


def affine_preprocessing(preprocessing) -> tuple:
  """``(A (3, 3), b (3,))`` with ``preprocessing(rgb255) == rgb255 @ A + b`` per pixel, read off
  the function (Caffe's BGR minus mean and torchvision's normalisation are both affine);
  ``ValueError`` if it is not affine."""
  basis = np.concatenate([np.zeros((1, 3)), 255 * np.eye(3)]).astype(np.uint8)[None]  # (1,4,3)
  y = np.asarray(preprocessing(basis), np.float64)[0]
  b = y[0]
  a = (y[1:] - b) / 255.0
  probe = np.random.default_rng(0).integers(0, 256, (1, 8, 3)).astype(np.uint8)
  want = np.asarray(preprocessing(probe), np.float64)
  if not np.allclose(want, probe.astype(np.float64) @ a + b, atol=1e-3):
    raise ValueError(f"preprocessing {getattr(preprocessing, 'name', preprocessing)!r} is not "
                     "an affine map of the RGB values: filter patterns need an affine one")
  return a.astype(np.float32), b.astype(np.float32)


def to_display(rgb: np.ndarray, spread: float = 0.25) -> np.ndarray:
  """(..., H, W, 3) patterns -> uint8 for display: each pattern minus its mean, divided by its
  standard deviation, times ``spread`` plus 0.5, clipped to [0, 1] (DLwP's ``deprocess_image``:
  std 64 around 128 of 255)."""
  x = np.asarray(rgb, np.float64)
  axes = tuple(range(x.ndim - 3, x.ndim))
  x = x - x.mean(axis=axes, keepdims=True)
  x = x / (x.std(axis=axes, keepdims=True) + 1e-5)
  return np.clip(np.rint((x * spread + 0.5) * 255), 0, 255).astype(np.uint8)


def _program(model, layer: str, border: int):
  cache = layers_lib.cache_for(model)
  key = ("filters", layer, border)
  if key not in cache:
    graphdef, _ = layers_lib.eval_graph(model)
    a, b = affine_preprocessing(model.preprocessing)

    def mean_activation(model, rgb, filters):
      x = (rgb * 255.0) @ a + b
      _, out = model(x, return_intermediates=True)
      act = out[layer]
      h, w = act.shape[1], act.shape[2]
      if h > 2 * border and w > 2 * border:
        act = act[:, border:h - border, border:w - border]
      picked = jnp.take_along_axis(act, filters[:, None, None, None], axis=-1)[..., 0]
      return jnp.mean(picked.astype(jnp.float32), axis=(1, 2))               # (F,)

    def run(state, key, filters, shape, steps, learning_rate):
      model = nnx.merge(graphdef, state)
      rgb = jax.random.uniform(key, shape, jnp.float32, 0.4, 0.6)

      def loss(rgb):
        return jnp.sum(mean_activation(model, rgb, filters))

      def step(_, rgb):
        g = jax.grad(loss)(rgb)
        rms = jnp.sqrt(jnp.mean(jnp.square(g), axis=(1, 2, 3), keepdims=True))
        return rgb + learning_rate * g / (rms + 1e-12)

      start = mean_activation(model, rgb, filters)
      rgb = jax.lax.fori_loop(0, steps, step, rgb)
      return rgb, start, mean_activation(model, rgb, filters)

    cache[key] = jax.jit(run, static_argnames=("shape",))
  return cache[key]


def filter_patterns(model, layer: str, filters=16, steps: int = 30, size=(64, 64), *,
                    seed: int = 0, learning_rate: float = 0.03, border: int = 2
                    ) -> FilterPatterns:
  """The input patterns of ``filters`` of ``layer`` by gradient ascent (see the module doc).

  Args:
    model: any fcnjax model with named layers (eval mode is used; the module is not changed).
    layer: a layer name (:func:`fcnjax.interpret.layers.layer_names`).
    filters: channel indices, or an int ``n`` for the first ``n`` channels (at most all).
    steps: ascent steps (DLwP: 30).
    size: (height, width) of the patterns, at least the model's minimum input size; an int for
      a square.
    seed: the starting noise (``jax.random.key(seed)``).
    learning_rate: RMS change per step of the RGB values (0..1 scale).
    border: cells left out at each side of the activation map (when it is larger than twice
      that), as DLwP does, so the pattern is not about the padding.
  """
  size = (int(size), int(size)) if np.ndim(size) == 0 else tuple(int(s) for s in size)
  if len(size) != 2 or min(size) < 1:
    raise ValueError(f"size must be (height, width) >= 1, got {size}")
  if int(steps) < 0:
    raise ValueError(f"steps must be >= 0, got {steps}")
  layers_lib.check_layers(model, [layer])
  if layers_lib.task_of(model) == "classification":
    from fcnjax.models.classifier import check_input_size
    check_input_size(model, *size)
  shape = layers_lib.layer_shapes(model, *size)[layer]
  channels = shape[-1]
  if np.ndim(filters) == 0:
    filters = list(range(min(int(filters), channels)))
  filters = np.asarray(filters, np.int32).reshape(-1)
  if filters.size == 0:
    raise ValueError("no filters asked for")
  bad = filters[(filters < 0) | (filters >= channels)]
  if bad.size:
    raise ValueError(f"filter {int(bad[0])} is not a channel of layer {layer!r} (it has "
                     f"{channels}: 0..{channels - 1})")
  _, state = layers_lib.eval_graph(model)
  rgb, start, end = _program(model, layer, int(border))(
      state, jax.random.key(int(seed)), jnp.asarray(filters), (len(filters), *size, 3),
      jnp.int32(steps), jnp.float32(learning_rate))
  rgb = np.asarray(rgb)
  return FilterPatterns(to_display(rgb), rgb, filters, np.asarray(start), np.asarray(end))
