"""The named layers of a model: their shapes, the default layer, and where each sits on the image.

Layer names are the keys of ``model(x, return_intermediates=True)[1]``, the rows of
:mod:`fcnjax.models.summary` (``block1`` ... ``scores`` for the FCN classifier; ``conv1_1`` ...
``fc7``, ``score_fr``, ``fuse_pool4`` ... for a VGG FCN; ``stem``, ``layer1.0`` ... for a ResNet).

Models are used in eval mode (dropout off, BatchNorm on its running statistics) without touching
the caller's module: :func:`eval_graph` splits an eval-mode copy that shares the arrays.
"""

from __future__ import annotations

import collections
import weakref

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fcnjax.models import geometry


class UnknownLayer(ValueError):
  """A layer name the model does not record (the message lists the names it does)."""


_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def cache_for(model) -> dict:
  """A per-model dict for compiled functions and shapes (dropped with the model)."""
  return _CACHE.setdefault(model, {})


def eval_graph(model):
  """``(graphdef, state)`` of an eval-mode copy of ``model`` (the caller's module keeps its
  mode); the graphdef is computed once per model."""
  cache = cache_for(model)
  _, state = nnx.split(model)
  if "graphdef" not in cache:
    copy = nnx.merge(*nnx.split(model))
    copy.eval()
    cache["graphdef"] = nnx.split(copy)[0]
  return cache["graphdef"], state


def task_of(model) -> str:
  """``"classification"`` ((B, C) logits) or ``"segmentation"`` ((B, H, W, C) logits)."""
  return getattr(model, "task", "segmentation")


def layer_shapes(model, height: int, width: int, batch: int = 1) -> "collections.OrderedDict":
  """``{layer name: output shape (B, h, w, C)}`` for a ``height x width`` input, in the order
  the forward computes them (``jax.eval_shape``: nothing is run)."""
  key = ("shapes", batch, height, width)
  cache = cache_for(model)
  if key not in cache:
    graphdef, state = eval_graph(model)

    def forward(state, x):
      return nnx.merge(graphdef, state)(x, return_intermediates=True)[1]

    out = jax.eval_shape(forward, state,
                         jax.ShapeDtypeStruct((batch, height, width, 3), jnp.float32))
    cache[key] = collections.OrderedDict((k, tuple(v.shape)) for k, v in out.items())
  return cache[key]


def _probe_size(model) -> tuple:
  from fcnjax.models.classifier import min_input_size
  try:
    mh, mw = min_input_size(model)
  except ValueError:
    mh = mw = 1
  return max(mh, 64), max(mw, 64)


def layer_names(model) -> list:
  """The model's layer names, in forward order."""
  return list(layer_shapes(model, *_probe_size(model)))


def default_layer(model) -> str:
  """The last conv block: the backbone's last named layer (``block5`` for the tutorial's
  classifier, ``fc7`` for VGG, ``layer4.<last>`` for a ResNet, ``post_bn`` for a V2)."""
  backbone = getattr(model, "backbone", None)
  if backbone is None:
    return layer_names(model)[-1]
  graphdef, state = nnx.split(backbone)
  h, w = _probe_size(model)
  if backbone.input_multiple > 1:
    m = backbone.input_multiple
    h, w = -(-h // m) * m, -(-w // m) * m

  def forward(state, x):
    return nnx.merge(graphdef, state)(x, return_intermediates=True)[1]

  names = list(jax.eval_shape(forward, state, jax.ShapeDtypeStruct((1, h, w, 3), jnp.float32)))
  return names[-1]


def check_layers(model, names) -> list:
  """``names`` as a list, or :class:`UnknownLayer` naming the first unknown one and listing
  the model's layers."""
  known = layer_names(model)
  for n in names:
    if n not in known:
      raise UnknownLayer(f"unknown layer {n!r}; this {type(model).__name__} has: "
                         f"{', '.join(known)}")
  return list(names)


# ---------------------------------------------------------------------------------------------
# Where a layer's cells sit on the image


def _vgg_map(vgg, name: str):
  if name in ("fc6", "fc7"):
    return vgg.coord_maps["fc7"]
  m = geometry.IDENTITY
  for s, block in enumerate(vgg.blocks, start=1):
    if name == f"pool{s}":
      return m.then(block.coord_map())
    for i in range(len(block.convs)):
      m = m.then(geometry.conv_map(3, 1, block.first_padding if i == 0 else 1))
      if name == f"conv{s}_{i + 1}":
        return m
    if block.pool is not None:
      m = m.then(geometry.conv_map(2, 2, 0))
  return None


def _backbone_map(backbone, name: str):
  from fcnjax.models.classifier import ConvStack
  from fcnjax.models.resnet import PreActResNet, _Backbone
  from fcnjax.models.vgg import VGG
  if isinstance(backbone, ConvStack):
    m = geometry.IDENTITY
    for i, s in enumerate(backbone.strides, start=1):
      m = m.then(geometry.conv_map(backbone.kernel_size, s, 0))
      if name == f"block{i}":
        return m
    return None
  if isinstance(backbone, VGG):
    return _vgg_map(backbone, name)
  if isinstance(backbone, _Backbone):
    stem = geometry.conv_map(7, 2, 3)
    if name == "stem":
      return stem
    if name == "maxpool":
      return stem.then(geometry.conv_map(3, 2, 1))
    if name == "post_bn" and isinstance(backbone, PreActResNet):
      return backbone.coord_maps["layer4"]
    stage = name.split(".", 1)[0]
    if "." in name and stage in backbone.coord_maps:
      return backbone.coord_maps[stage]
  return None


def layer_coord_map(model, name: str):
  """The :class:`~fcnjax.models.geometry.CoordMap` from image pixels to the cells of layer
  ``name`` (``cell = scale * pixel + shift``, at centres), or ``None`` where the model does not
  define one: callers then assume the map spans the image."""
  backbone = getattr(model, "backbone", None)
  if backbone is None:
    return None
  final = backbone.coord_maps.get(backbone.final_stage) if hasattr(backbone, "coord_maps") \
      else None
  if name == "pad":
    return geometry.IDENTITY
  if name in ("head", "scores", "score_fr", "classifier", "final_conv"):
    return final
  if name.startswith("score_") and name[len("score_"):] in getattr(backbone, "coord_maps", {}):
    return backbone.coord_maps[name[len("score_"):]]
  from fcnjax.models.fcn import FCN
  if isinstance(model, FCN) and (name.startswith(("upscore_", "fuse_")) or name == "crop"):
    return _fcn_head_map(model, name)
  return _backbone_map(backbone, name)


def _fcn_head_map(fcn, name: str):
  """The grids of an :class:`~fcnjax.models.fcn.FCN`'s upsampling, fusion and crop layers, by
  the same composition its constructor derives the crop offsets with: ``upscore_<src>`` is the
  current grid upsampled; ``fuse_<skip>`` that grid where the skip was cropped to it (offset
  >= 0), else the skip's grid; ``crop`` is the image's."""
  if name == "crop":
    return geometry.IDENTITY
  backbone = fcn.backbone
  current = backbone.coord_maps[backbone.final_stage]
  ups = list(fcn.upscore_skips) + [fcn.upscore_final]
  for i, (up_name, up) in enumerate(zip(fcn.upscore_names, ups)):
    upsampled = current.then(up.coord_map())
    if name == up_name:
      return upsampled
    if i == len(fcn.skips):
      break
    skip = fcn.skips[i]
    current = upsampled if fcn.skip_offsets[i] >= 0 else backbone.coord_maps[skip]
    if name == f"fuse_{skip}":
      return current
  return None


def logits(model, images) -> np.ndarray:
  """The model's output for (B, H, W, 3) preprocessed ``images`` in eval mode, as numpy
  ((B, C) for a classifier, (B, H, W, C) for a segmenter); jitted once per model."""
  cache = cache_for(model)
  if "forward" not in cache:
    graphdef, _ = eval_graph(model)
    cache["forward"] = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
  _, state = eval_graph(model)
  return np.asarray(cache["forward"](state, jnp.asarray(images, jnp.float32)))
