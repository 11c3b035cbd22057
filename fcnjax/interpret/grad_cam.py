"""Grad-CAM (Selvaraju et al. 2017): where in an image a model finds the evidence for a class.

For a layer with activations ``A`` (B, h, w, K) and a class score ``y`` (B,):

* classifier: ``y`` is the class's logit;
* segmenter: ``y`` is the class's logits summed over a region of the image: a mask, a box, or
  (by default) the pixels the model predicts as that class.

The channel weights are the spatial means of ``dy / dA`` (B, K); the map is
``ReLU(sum_k weight_k * A_k)`` (B, h, w), sampled bilinearly at every image pixel's position on
the layer's grid (:func:`fcnjax.interpret.layers.layer_coord_map`: exact for the conv / pool
layers; a resize with half-pixel centres elsewhere). The gradient with respect to the layer is
one ``jax.grad`` through a zero perturbation of the layer (:mod:`fcnjax.models.taps`), so any
named layer works. Jitted (one program per model, layer and input shape; every class and
region reuses it) and batched (every image of a batch has the batch's size).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fcnjax.interpret import layers as layers_lib
from fcnjax.models import taps


@dataclasses.dataclass(frozen=True)
class GradCAM:
  """One Grad-CAM evaluation of a batch.

  Attributes:
    heatmap: (B, H, W) float32 in [0, 1]: the map at image resolution divided by its maximum
      (all zeros where the map is zero everywhere, e.g. an empty region).
    layer_map: (B, h, w) float32, the map on the layer's grid before normalisation.
    target: (B,) float32, the differentiated score (logit, or sum of logits over the region).
    logits: the model's output, (B, C) or (B, H, W, C).
    region_pixels: (B,) int, pixels in the region (segmenters; ``None`` for a classifier).
  """

  heatmap: np.ndarray
  layer_map: np.ndarray
  target: np.ndarray
  logits: np.ndarray
  region_pixels: np.ndarray | None


def sampling_matrix(n_image: int, n_layer: int, coord_map=None) -> np.ndarray:
  """(n_image, n_layer) float32: row ``y`` interpolates the layer's cells at image pixel ``y``'s
  position ``u = scale * y + shift`` (``coord_map``; ``None``: the half-pixel resize
  ``u = (y + 0.5) * n_layer / n_image - 0.5``), linearly, clamped to the layer's extent."""
  y = np.arange(n_image, dtype=np.float64)
  if coord_map is None:
    u = (y + 0.5) * n_layer / n_image - 0.5
  else:
    u = float(coord_map.scale) * y + float(coord_map.shift)
  u = np.clip(u, 0, n_layer - 1)
  lo = np.floor(u).astype(int)
  hi = np.minimum(lo + 1, n_layer - 1)
  frac = u - lo
  m = np.zeros((n_image, n_layer), np.float64)
  m[np.arange(n_image), lo] += 1 - frac
  m[np.arange(n_image), hi] += frac
  return m.astype(np.float32)


def region_masks(region, batch: int, height: int, width: int) -> np.ndarray:
  """A region as (B, H, W) float32 weights: a box ``(x0, y0, x1, y1)`` (pixels, exclusive
  ends) for every image, a list of ``batch`` boxes, or a (B, H, W) / (H, W) mask."""
  if isinstance(region, (tuple, list)) and len(region) == 4 and all(
      np.ndim(v) == 0 for v in region):
    region = [tuple(region)] * batch
  if isinstance(region, (tuple, list)) and all(
      isinstance(b, (tuple, list)) and len(b) == 4 for b in region):
    if len(region) != batch:
      raise ValueError(f"{len(region)} boxes for {batch} images")
    out = np.zeros((batch, height, width), np.float32)
    for i, (x0, y0, x1, y1) in enumerate(region):
      x0, y0, x1, y1 = (int(v) for v in (x0, y0, x1, y1))
      if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise ValueError(f"box {(x0, y0, x1, y1)} is not inside the {width}x{height} image "
                         "(x0,y0,x1,y1 in pixels, 0 <= x0 < x1 <= width, 0 <= y0 < y1 <= "
                         "height)")
      out[i, y0:y1, x0:x1] = 1
    return out
  mask = np.asarray(region, np.float32)
  if mask.shape == (height, width):
    mask = np.broadcast_to(mask, (batch, height, width))
  if mask.shape != (batch, height, width):
    raise ValueError(f"region mask has shape {mask.shape}; expected ({batch}, {height}, "
                     f"{width}) or ({height}, {width})")
  return np.ascontiguousarray(mask)


def _program(model, layer: str):
  cache = layers_lib.cache_for(model)
  key = ("gradcam", layer)
  if key not in cache:
    graphdef, _ = layers_lib.eval_graph(model)
    classifier = layers_lib.task_of(model) == "classification"

    def run(state, x, delta, class_id, region, use_predicted, rows, cols):
      model = nnx.merge(graphdef, state)

      def target(delta):
        with taps.perturbed({layer: delta}):
          logits, out = model(x, return_intermediates=True)
        if classifier:
          score = logits[:, class_id]
          weights = None
        else:
          predicted = (jnp.argmax(logits, axis=-1) == class_id).astype(logits.dtype)
          weights = jax.lax.stop_gradient(jnp.where(use_predicted, predicted, region))
          score = jnp.sum(logits[..., class_id] * weights, axis=(1, 2))
        return jnp.sum(score), (out[layer], logits, score, weights)

      grads, (acts, logits, score, weights) = jax.grad(target, has_aux=True)(delta)
      alpha = jnp.mean(grads.astype(jnp.float32), axis=(1, 2))           # (B, K)
      cam = jax.nn.relu(jnp.einsum("bhwk,bk->bhw", acts.astype(jnp.float32), alpha))
      up = jnp.einsum("yh,bhw,xw->byx", rows, cam, cols)                  # (B, H, W)
      peak = jnp.max(up, axis=(1, 2), keepdims=True)
      heat = jnp.where(peak > 0, up / jnp.where(peak > 0, peak, 1), 0.0)
      pixels = None if weights is None else jnp.sum(weights > 0, axis=(1, 2))
      return heat, cam, score, logits, pixels

    cache[key] = jax.jit(run)
  return cache[key]


def gradcam_result(model, images, class_id: int, layer: str | None = None, *,
                   region=None) -> GradCAM:
  """Grad-CAM of ``class_id`` at ``layer`` for a batch, with its by-products (:class:`GradCAM`).

  Args:
    model: an FCN classifier or segmenter (any fcnjax model with named intermediates); used in
      eval mode, the caller's module is not modified.
    images: (B, H, W, 3) float, already in the model's input convention
      (``model.preprocessing``), every image of the batch the same size.
    class_id: the class (0 <= class_id < num_classes).
    layer: a name of :func:`fcnjax.interpret.layers.layer_names` (default: the last conv block,
      :func:`~fcnjax.interpret.layers.default_layer`).
    region: segmenters only: ``None`` (the pixels predicted as ``class_id``), a box
      ``(x0, y0, x1, y1)`` in pixels (exclusive ends) or one per image, or a (B, H, W) /
      (H, W) mask of weights.
  """
  x = jnp.asarray(images, jnp.float32)
  if x.ndim != 4 or x.shape[-1] != 3:
    raise ValueError(f"images must be (B, H, W, 3), got shape {tuple(x.shape)}")
  b, h, w, _ = x.shape
  num_classes = int(model.num_classes)
  if not 0 <= int(class_id) < num_classes:
    raise ValueError(f"class_id {class_id} is not a class of this {num_classes}-class model")
  layer = layer or layers_lib.default_layer(model)
  layers_lib.check_layers(model, [layer])
  classifier = layers_lib.task_of(model) == "classification"
  if classifier and region is not None:
    raise ValueError("region applies to segmenters only: a classifier's class score is its "
                     "logit for the whole image")
  if classifier:
    from fcnjax.models.classifier import check_input_size
    check_input_size(model, h, w)
  shape = layers_lib.layer_shapes(model, h, w, b)[layer]
  if len(shape) != 4:
    raise ValueError(f"layer {layer!r} has shape {shape}, not a (B, h, w, C) map")
  coord = layers_lib.layer_coord_map(model, layer)
  rows = sampling_matrix(h, shape[1], coord)
  cols = sampling_matrix(w, shape[2], coord)
  use_predicted = region is None
  masks = np.zeros((b, h, w), np.float32) if use_predicted else region_masks(region, b, h, w)
  graphdef, state = layers_lib.eval_graph(model)
  heat, cam, score, logits, pixels = _program(model, layer)(
      state, x, jnp.zeros(shape, x.dtype), jnp.int32(class_id), jnp.asarray(masks),
      jnp.bool_(use_predicted), jnp.asarray(rows), jnp.asarray(cols))
  return GradCAM(np.asarray(heat), np.asarray(cam), np.asarray(score), np.asarray(logits),
                 None if pixels is None else np.asarray(pixels))


def gradcam(model, images, class_id: int, layer: str | None = None, *, region=None) -> np.ndarray:
  """Grad-CAM heatmaps (B, H, W) float32 in [0, 1] (see :func:`gradcam_result`)."""
  return gradcam_result(model, images, class_id, layer, region=region).heatmap
