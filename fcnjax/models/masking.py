"""An image's own cells in a zero-padded batch, and BatchNorm over those cells only.

A size bucket holds images of different sizes, each zero-padded at the bottom / right to the
bucket's shape, and dummy examples that are all padding: :mod:`fcnjax.data.pipeline`'s ``mask``
(B, H, W) bool marks each image's top-left ``h x w`` rectangle. After a layer chain that maps a
length ``n`` to ``n'`` (:class:`~fcnjax.models.geometry.SizeOp` s), the image's own cells are
the top-left ``n'(h) x n'(w)`` rectangle of the map: the cells the image has when it runs alone
at its own size. For a chain of padded stride-2 layers (``n' = ceil(n / 2)`` each, the
ResNets) that is the input mask subsampled, ``mask[:, ::s, ::s]`` (:func:`strided`).

:func:`batch_norm` is how the models apply a BatchNorm given those cells: in training its
statistics are taken over the image cells only (padding and dummy examples never enter them,
under data parallelism over the global batch), and its output is zero on every other cell, so
the padding reaches the next convolution as the zeros of a lone run's own zero padding. In a
network whose padding cells are all produced this way (the ResNets), every image of a padded
batch gets on its own cells the values it gets alone at its own size, with statistics of the
batch's image cells (tests/test_models_masking.py).

Shapes: ``mask`` / ``valid`` (B, H, W) bool; ``x`` (B, H, W, C).
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp

from fcnjax.models import geometry


def takes_mask(module) -> bool:
  """Whether ``module(x, mask=...)`` is accepted: its ``__call__`` has a ``mask`` parameter (the
  fcnjax models and backbones; a backbone or model of your own need not)."""
  return "mask" in inspect.signature(type(module).__call__).parameters


def image_sizes(mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-image (heights, widths), each (B,) int32, of the top-left rectangles of ``mask``
  (B, H, W) bool (0 for an all-False row: a dummy example)."""
  h = jnp.sum(jnp.any(mask, axis=2), axis=1).astype(jnp.int32)
  w = jnp.sum(jnp.any(mask, axis=1), axis=1).astype(jnp.int32)
  return h, w


def rectangles(h: jax.Array, w: jax.Array, shape) -> jax.Array:
  """(B, shape[0], shape[1]) bool: True on the top-left ``h[b] x w[b]`` cells of each row."""
  return ((jnp.arange(shape[0])[None, :, None] < h[:, None, None])
          & (jnp.arange(shape[1])[None, None, :] < w[:, None, None]))


def valid_masks(mask: jax.Array, ops) -> list:
  """The image cells after each layer of ``ops`` (a chain of SizeOps applied to ``mask``'s
  grid): a list of (B, H_l, W_l) bool masks, cell (i, j) valid iff ``i < output_length(ops[:l+1],
  h)`` and likewise ``j`` for ``w``; none for an example without pixels (a dummy), whatever a
  padded layer would make of length 0."""
  h, w = image_sizes(mask)
  present = ((h > 0) & (w > 0))[:, None, None]
  H, W = mask.shape[1:3]
  out = []
  for op in ops:
    h, w, H, W = op(h), op(w), op(H), op(W)
    out.append(rectangles(h, w, (H, W)) & present)
  return out


def valid_cells(mask: jax.Array, ops, shape) -> jax.Array:
  """(B, shape[1], shape[2]) bool: the cells of a (B, H', W', C) map that ``mask``'s images
  produce through the layer chain ``ops`` (none for a dummy example)."""
  h, w = image_sizes(mask)
  present = ((h > 0) & (w > 0))[:, None, None]
  return present & rectangles(geometry.output_length(ops, h), geometry.output_length(ops, w),
                              shape[1:3])


def strided(mask: jax.Array | None, stride: int) -> jax.Array | None:
  """The image cells after a padded stride-``stride`` layer (``n -> ceil(n / stride)``):
  ``mask[:, ::stride, ::stride]`` (``None`` stays ``None``)."""
  if mask is None or stride == 1:
    return mask
  return mask[:, ::stride, ::stride]


def zero_outside(x: jax.Array, valid: jax.Array | None) -> jax.Array:
  """``x`` (B, H, W, C) with every cell outside ``valid`` (B, H, W) set to 0 (``None``: ``x``)."""
  return x if valid is None else jnp.where(valid[..., None], x, jnp.zeros((), x.dtype))


def batch_norm(norm, x: jax.Array, valid: jax.Array | None) -> jax.Array:
  """``norm`` (an ``nnx.BatchNorm``, or ``None`` for none) applied to ``x`` (B, H, W, C).

  With ``valid`` (B, H, W) bool: in training the statistics (and so the running averages) are
  the mean and variance over the valid cells only, and the output is 0 outside them (in
  evaluation too). A training batch with no valid cell at all (every example a dummy or an
  unreadable file) normalises over all cells rather than dividing by zero.
  """
  if norm is None:
    return x
  if valid is None:
    return norm(x)
  if norm.use_running_average:
    y = norm(x)
  else:
    stats_cells = valid | ~jnp.any(valid)
    y = norm(x, mask=stats_cells[..., None])
  return zero_outside(y, valid)
