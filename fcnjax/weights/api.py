"""Public entry points: load ImageNet VGG16, pytorch-fcn and fcnjax weights; save; convert.

``src`` arguments are a path (``.safetensors``, ``.npz``, ``.pth``/``.pt`` with PyTorch) or an
in-memory mapping ``{key: array}`` (e.g. ``{k: v.numpy() for k, v in sd.items()}``).

Contract of every function here: any problem with the weights (missing or unreadable file,
missing / malformed keys or metadata, wrong shapes, ranks, dtypes or class count, a geometry
change) raises a :class:`~fcnjax.weights.errors.WeightsError` — for a path, with the message
starting ``"PATH: "`` and ``err.path`` set — and leaves the model untouched.
"""

from __future__ import annotations

import operator
import os
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fcnjax import models
from fcnjax.models import registry
from fcnjax.models.registry import build_model
from fcnjax.weights import classifiers, io, layouts as L
from fcnjax.weights.errors import (LayoutError, MissingKeyError, ShapeMismatchError, WeightsError,
                                   about_file)
from fcnjax.weights.loading import (LoadReport, apply, default_preprocessing, _source,
                                    parse_fcnjax_metadata, resolve_preprocessing)

FORMAT_VERSION = "1"


def _path_of(src):
  """The file behind ``src`` (``None`` for an in-memory mapping or anything not a path)."""
  return src if isinstance(src, (str, bytes, os.PathLike)) else None


def _has_heads(tensors) -> bool:
  """Whether a file has score/head layers (a segmentation model's file) or only a backbone."""
  from fcnjax.weights.loading import HEAD_KEY_PREFIXES
  return any(k.startswith(HEAD_KEY_PREFIXES) for k in tensors)


def load_vgg16_imagenet(model, src, *, layout: str | None = None, preprocessing=None,
                        allow_geometry_change: bool = False) -> LoadReport:
  """Load ImageNet VGG16 weights into ``model``'s backbone (conv1_1 … conv5_3, fc6, fc7).

  Accepts torchvision's layout (``vgg16-397923af.pth``: fc6/fc7 by surgery from
  ``classifier.0``/``classifier.3``, the ImageNet ``classifier.6`` is dropped), pytorch-fcn's
  ``vgg16_from_caffe.pth`` (same keys, Caffe preprocessing — recognised by ``caffe`` in the file
  name, or pass ``preprocessing="caffe"``), or pytorch-fcn-style named keys (``conv1_1`` …
  ``fc7``). Score and upsampling layers are not touched (they stay as initialised: zeros /
  bilinear). Sets ``model.preprocessing``. Returns a :class:`LoadReport`.

  Given a *trained* FCN file (pytorch-fcn checkpoint), its backbone has that file's geometry
  (exact): loading it into an aligned model raises :class:`~fcnjax.weights.errors.GeometryError`
  unless ``allow_geometry_change=True``. ImageNet files are fine for either geometry.
  """
  with about_file(_path_of(src)):
    tensors, metadata, path = _source(src)
    layout = layout or L.infer_layout(tensors, metadata)
    if layout == L.FCNJAX:
      raise LayoutError("this is an fcnjax file; use fcnjax.weights.load or init_from")
    return apply(model, tensors, layout, metadata=metadata, path=path, heads=False,
                 preprocessing=preprocessing, allow_geometry_change=allow_geometry_change)


def load_pytorch_fcn(model, src, *, reinit_scores: bool = False, preprocessing=None,
                     allow_geometry_change: bool = False) -> LoadReport:
  """Load a pytorch-fcn FCN-32s/16s/8s/8s-at-once checkpoint (e.g. ``fcn8s_from_caffe.pth``).

  The model must be the matching architecture. Transposed-conv kernels ``(C, C, k, k)`` are
  loaded into learnable upsamplers (``learnable_upsampling=True``) by transposition (no flip);
  for fixed upsampling they are checked to be the bilinear kernel (|diff| ≤ ``BILINEAR_ATOL``)
  and a learned kernel raises :class:`~fcnjax.weights.errors.UpsamplingKernelError`.
  ``reinit_scores=True`` loads only the backbone (another class count). Caffe preprocessing.
  pytorch-fcn's FCNs are exact (pad 100): into an aligned model they raise
  :class:`~fcnjax.weights.errors.GeometryError` unless ``allow_geometry_change=True`` (even with
  ``reinit_scores=True``: the backbone's features differ too).
  """
  with about_file(_path_of(src)):
    tensors, metadata, path = _source(src)
    return apply(model, tensors, L.PYTORCH_FCN, metadata=metadata, path=path,
                 reinit_scores=reinit_scores, preprocessing=preprocessing,
                 allow_geometry_change=allow_geometry_change)


def load_into(model, src, *, layout: str | None = None, reinit_scores: bool = False,
              preprocessing=None, allow_geometry_change: bool = False) -> LoadReport:
  """Load a file of any layout (inferred unless given) strictly into an existing ``model``.

  Trained FCN weights of the other geometry (exact pad-100 vs aligned; see
  :func:`fcnjax.weights.loading.file_geometry`) raise
  :class:`~fcnjax.weights.errors.GeometryError` unless ``allow_geometry_change=True``.
  """
  with about_file(_path_of(src)):
    tensors, metadata, path = _source(src)
    layout = layout or L.infer_layout(tensors, metadata)
    return apply(model, tensors, layout, metadata=metadata, path=path,
                 reinit_scores=reinit_scores, preprocessing=preprocessing,
                 heads=_has_heads(tensors), allow_geometry_change=allow_geometry_change)


def init_from(src, model, *, reinit_scores: bool = False, preprocessing=None,
              allow_geometry_change: bool = False) -> LoadReport:
  """Initialise ``model`` from any supported file, for training (the experiments' ``--init``).

  * ImageNet VGG16 (torchvision layout, or pytorch-fcn's ``vgg16_from_caffe.pth``): backbone
    loaded, score layers stay at zero (the FCN paper's starting point).
  * a pytorch-fcn FCN checkpoint or an fcnjax ``.safetensors``: backbone and ``score_fr`` are
    loaded strictly; skip score heads and upsampling kernels are loaded where the file has them
    with the same shape, and otherwise keep their init — so FCN-32s weights initialise an
    FCN-16s, and FCN-16s an FCN-8s, with the new skip heads at zero (the paper's cascade).
  * ``reinit_scores=True``: backbone only, for another number of classes.
  * geometry: trained FCN weights (a pytorch-fcn FCN checkpoint — exact —, or an fcnjax file
    whose metadata says ``aligned`` true/false) into a model of the other geometry raise
    :class:`~fcnjax.weights.errors.GeometryError` (also with ``reinit_scores=True``) unless
    ``allow_geometry_change=True`` (``--allow-geometry-change``). ImageNet VGG16 files have no
    geometry and initialise either variant.

  Sets ``model.preprocessing`` to the file's convention unless ``preprocessing`` is given.
  Returns a :class:`LoadReport` (``kept_init`` lists what kept its initialisation).
  """
  with about_file(_path_of(src)):
    tensors, metadata, path = _source(src)
    layout = L.infer_layout(tensors, metadata)
    return apply(model, tensors, layout, metadata=metadata, path=path, lenient_heads=True,
                 reinit_scores=reinit_scores, heads=_has_heads(tensors),
                 preprocessing=preprocessing, allow_geometry_change=allow_geometry_change)


# ---------------------------------------------------------------------------------------------
# Model description (for metadata and for building a model from a file)


def _resnet_model_name(model, bb) -> str:
  from fcnjax.models import resnet as R
  from fcnjax.models import resnet_fcn as RF
  base = f"resnet{bb.depth}" + ("v2" if isinstance(bb, R.PreActResNet) else "")
  if model is bb:
    name = base
  elif isinstance(model, RF.TorchvisionFCN):
    name = f"fcn_{base}"
  elif isinstance(model, RF.D2LFCN):
    name = f"d2l_fcn_{base}"
  else:
    name = f"fcn8s-{base}" if tuple(getattr(model, "skips", ())) == ("layer3", "layer2") else ""
  if name not in registry.SPECS:
    raise WeightsError(f"no fcnjax model name for this {type(model).__name__} on {base}")
  return name


def model_name(model) -> str:
  """``"vgg16"`` for a bare backbone, else the model's name in :mod:`fcnjax.models.registry`."""
  if classifiers.is_classifier(model):
    return classifiers.model_name(model)
  bb = L.resnet_of(model)
  if bb is not None:
    return _resnet_model_name(model, bb)
  if not L.is_fcn(model):
    return registry.BACKBONE
  scaled = bool(model.skips) and model.score_skips[0].input_scale is not None
  spec = registry.spec_for_fcn(model.skips, scaled)
  if spec is None:
    raise WeightsError(f"no fcnjax model name for skips {model.skips}")
  return spec.name


def describe(model) -> dict[str, str]:
  """Metadata that lets :func:`build_model` rebuild ``model``'s architecture."""
  if classifiers.is_classifier(model):
    return classifiers.describe(model) | {"format_version": FORMAT_VERSION}
  rb = L.resnet_of(model)
  if rb is not None:
    meta = {"format": L.FCNJAX, "format_version": FORMAT_VERSION, "model": model_name(model),
            "width_multiplier": repr(float(rb.width_multiplier))}
    if L.is_fcn(model):
      meta["num_classes"] = str(model.num_classes)
      if hasattr(model, "aux_classifier"):
        meta["aux"] = str(model.aux_classifier is not None).lower()
      if hasattr(model, "upscore_final"):
        meta["learnable_upsampling"] = str(bool(model.upscore_final.learnable)).lower()
    pre = getattr(model, "preprocessing", None)
    if pre is not None:
      meta["preprocessing"] = pre.name
    return meta
  bb = L.backbone_of(model)
  conv1 = bb.blocks[0].convs[0].kernel
  meta = {"format": L.FCNJAX, "format_version": FORMAT_VERSION, "model": model_name(model),
          "width_multiplier": repr(L.width_multiplier_of(int(conv1.shape[-1]))),
          "aligned": str(bool(bb.aligned)).lower(), "pool": str(bb.blocks[0].pool)}
  if L.is_fcn(model):
    meta["num_classes"] = str(model.num_classes)
    meta["learnable_upsampling"] = str(bool(model.upscore_final.learnable)).lower()
  pre = getattr(model, "preprocessing", None)
  if pre is not None:
    meta["preprocessing"] = pre.name
  return meta


def _model_from_file(tensors, metadata, layout, path, model_override=None, num_classes=None):
  """The :func:`build_model` keyword arguments of the model a file describes.

  Raises (never a raw ``KeyError`` / ``IndexError``): :class:`MissingKeyError` for a tensor the
  description needs (``conv1_1.weight`` / ``features.0.weight`` for the width),
  :class:`ShapeMismatchError` for one of the wrong rank, :class:`FormatError` for malformed
  fcnjax metadata, :class:`LayoutError` for an unknown layout, :class:`WeightsError` for an
  unknown model name or a class count below 1.
  """
  if num_classes is not None:
    try:
      ok = operator.index(num_classes) >= 1
    except TypeError:
      ok = False
    if not ok:
      raise WeightsError(f"num_classes must be a positive integer, got {num_classes!r}")
  return _checked_name(_spec_from_file(tensors, metadata, layout, path, model_override,
                                       num_classes))


def _checked_name(spec: dict) -> dict:
  if spec["name"] not in registry.SPECS:
    raise WeightsError(f"unknown model {spec['name']!r}; expected 'vgg16' or one of "
                       f"{sorted(models.MODELS)}")
  return spec


def _width_from(tensors, key: str, layout: str) -> float:
  """Width multiplier from the first conv's weight ``key`` (a 4-D ``(out, in, kh, kw)``)."""
  if key not in tensors:
    raise MissingKeyError([key], layout,
                          purpose="needed to build the model from the file: it gives the width")
  w = tensors[key]
  if w.ndim != 4:
    raise ShapeMismatchError(key, "a 4-D conv weight (out, in, kh, kw)", w.shape)
  return L.width_multiplier_of(int(w.shape[0]))


def _spec_from_file(tensors, metadata, layout, path, model_override, num_classes):
  if layout not in L.LAYOUTS:
    raise LayoutError(f"unknown layout {layout!r}; expected one of {L.LAYOUTS}")
  if layout == L.FCNJAX:
    meta = parse_fcnjax_metadata(metadata)
    if "model" not in metadata and not model_override:
      raise LayoutError("fcnjax file without metadata 'model'; pass model_name_override=... "
                        "(or a model)")
    name = model_override or meta["model"]
    if name in registry.SPECS and registry.SPECS[name].family == "resnet":
      return dict(name=name, num_classes=num_classes or meta.get("num_classes", 21),
                  width_multiplier=meta.get("width_multiplier", 1.0),
                  learnable_upsampling=meta.get("learnable_upsampling", False),
                  aux=meta.get("aux", True))
    return dict(
        name=name,
        num_classes=num_classes or meta.get("num_classes", 21),
        width_multiplier=meta.get("width_multiplier", 1.0), aligned=meta.get("aligned", False),
        pool=meta.get("pool", "ceil"),
        learnable_upsampling=meta.get("learnable_upsampling", False))
  if layout in (L.TORCHVISION_RESNET, L.TORCHVISION_FCN_RESNET):
    return _torchvision_resnet_spec(tensors, layout, model_override, num_classes)
  if layout == L.KERAS_RESNET_V2:
    return _keras_resnet_v2_spec(tensors, model_override, num_classes)
  if layout == L.TORCHVISION_VGG16 or ("conv1_1.weight" not in tensors
                                       and "features.0.weight" in tensors):  # vgg16_from_caffe
    width = _width_from(tensors, "features.0.weight", layout)
    return dict(name=model_override or "vgg16", num_classes=num_classes or 21,
                width_multiplier=width)
  width = _width_from(tensors, "conv1_1.weight", layout)
  name = model_override or L.infer_pytorch_fcn_model(tensors, path)
  file_classes = 21
  if "score_fr.weight" in tensors:
    w = tensors["score_fr.weight"]
    if w.ndim not in (2, 4) or w.shape[0] < 1:
      raise ShapeMismatchError("score_fr.weight", "a 4-D conv weight (classes, in, 1, 1)", w.shape)
    file_classes = int(w.shape[0])
  ups = [k for k in L.pytorch_fcn_upscore_keys() if k in tensors]
  from fcnjax.weights.loading import BILINEAR_ATOL
  learnable = any(not L.is_bilinear_deconv(tensors[k], BILINEAR_ATOL) for k in ups)
  return dict(name=name, num_classes=num_classes or file_classes, width_multiplier=width,
              learnable_upsampling=learnable)


def _torchvision_resnet_spec(tensors, layout, model_override, num_classes) -> dict:
  """The model a torchvision ResNet / FCN-ResNet state dict describes: depth from the number
  of blocks per stage (and whether they are bottlenecks), width from ``conv1``, classes and the
  aux head from ``classifier.4`` / ``aux_classifier.*``."""
  from fcnjax.models import resnet as R
  prefix = "backbone." if layout == L.TORCHVISION_FCN_RESNET else ""
  width = _width_from(tensors, f"{prefix}conv1.weight", layout)
  blocks = []
  for i in range(1, 5):
    idx = {int(k[len(f"{prefix}layer{i}."):].split(".", 1)[0]) for k in tensors
           if k.startswith(f"{prefix}layer{i}.") and k[len(f"{prefix}layer{i}."):][:1].isdigit()}
    blocks.append(len(idx))
  bottleneck = f"{prefix}layer1.0.conv3.weight" in tensors
  depth = next((d for d, n in R.DEPTHS.items()
                if n == tuple(blocks) and R.BOTTLENECK[d] == bottleneck), None)
  if depth is None:
    raise LayoutError(f"a torchvision ResNet with {tuple(blocks)} blocks per stage "
                      f"({'bottleneck' if bottleneck else 'basic'} blocks) is no known depth "
                      f"({', '.join(f'ResNet-{d}: {n}' for d, n in R.DEPTHS.items())})")
  if layout == L.TORCHVISION_RESNET:
    return dict(name=model_override or f"resnet{depth}", num_classes=num_classes or 21,
                width_multiplier=width)
  file_classes = 21
  if "classifier.4.weight" in tensors:
    w = tensors["classifier.4.weight"]
    if w.ndim != 4 or w.shape[0] < 1:
      raise ShapeMismatchError("classifier.4.weight", "a 4-D conv weight (classes, in, 1, 1)",
                               w.shape)
    file_classes = int(w.shape[0])
  return dict(name=model_override or f"fcn_resnet{depth}",
              num_classes=num_classes or file_classes, width_multiplier=width,
              aux=any(k.startswith("aux_classifier.") for k in tensors))


def _keras_resnet_v2_spec(tensors, model_override, num_classes) -> dict:
  """The pre-activation ResNet a Keras ``ResNet*V2`` file describes: depth from the blocks per
  stage (``conv{s}_block{b}_*``), width from ``conv1_conv/kernel`` (HWIO, 64 outputs at full
  width)."""
  from fcnjax.models import resnet as R
  key = "conv1_conv/kernel"
  if key not in tensors:
    raise MissingKeyError([key], L.KERAS_RESNET_V2,
                          purpose="needed to build the model from the file: it gives the width")
  w = tensors[key]
  if w.ndim != 4:
    raise ShapeMismatchError(key, "a 4-D conv kernel (kh, kw, in, out)", w.shape)
  blocks = tuple(len({k.split("_", 2)[1] for k in tensors if k.startswith(f"conv{s}_block")})
                 for s in range(2, 6))
  depth = next((d for d in (50, 101, 152) if R.DEPTHS[d] == blocks), None)
  if depth is None:
    raise LayoutError(f"a Keras ResNet V2 with {blocks} blocks per stage is no known depth "
                      f"(ResNet50V2: {R.DEPTHS[50]}, ResNet101V2: {R.DEPTHS[101]}, "
                      f"ResNet152V2: {R.DEPTHS[152]})")
  return dict(name=model_override or f"resnet{depth}v2", num_classes=num_classes or 21,
              width_multiplier=L.width_multiplier_of(int(w.shape[-1])))


def load(src, model=None, *, layout: str | None = None, model_name_override: str | None = None,
         num_classes: int | None = None, reinit_scores: bool = False, preprocessing=None,
         allow_geometry_change: bool = False):
  """Load weights and return the model.

  With ``model=None`` the architecture is built from the file: an fcnjax file's metadata (model,
  num_classes, width, learnable upsampling...), or inferred from a pytorch-fcn / torchvision file
  (model from its upscore keys, width from conv1_1, learnable upsampling iff a kernel is not
  bilinear; ``model_name_override`` names it explicitly, e.g. ``"fcn8s-atonce"``). With a
  ``model``, loads strictly into it. ``num_classes`` (with ``reinit_scores=True``) builds a model
  for another class count whose score layers start fresh. ``model.preprocessing`` is set to the
  weights' convention (or ``preprocessing``).

  ``allow_geometry_change`` only matters with a ``model`` (a model built from the file has the
  file's geometry): trained FCN weights of the other geometry raise
  :class:`~fcnjax.weights.errors.GeometryError` unless it is ``True``. Building from a file that
  lacks what the description needs (e.g. ``conv1_1.weight``), has malformed metadata or an
  unknown model name raises a :class:`~fcnjax.weights.errors.WeightsError` naming file and key.
  """
  with about_file(_path_of(src)):
    tensors, metadata, path = _source(src)
    layout = layout or L.infer_layout(tensors, metadata)
    if _classifier_file(metadata) or (model is not None and classifiers.is_classifier(model)):
      return _load_classifier(tensors, metadata, model, preprocessing)
    if model is None:
      spec = _model_from_file(tensors, metadata, layout, path, model_name_override, num_classes)
      return _build_and_load(spec, tensors, layout, metadata=metadata, path=path,
                             reinit_scores=reinit_scores, heads=_has_heads(tensors),
                             preprocessing=preprocessing)[0]
    apply(model, tensors, layout, metadata=metadata, path=path, reinit_scores=reinit_scores,
          heads=_has_heads(tensors), preprocessing=preprocessing,
          allow_geometry_change=allow_geometry_change)
    return model


def _classifier_file(metadata) -> bool:
  name = metadata.get("model")
  return (metadata.get("format") == L.FCNJAX and name in registry.SPECS
          and registry.SPECS[name].family == "classifier")


def _load_classifier(tensors, metadata, model, preprocessing):
  """A classifier file into ``model`` or into the model its metadata describes
  (:mod:`fcnjax.weights.classifiers`); ``model.preprocessing`` from the file unless given."""
  if model is not None and not classifiers.is_classifier(model):
    raise LayoutError(f"a classifier's weight file ({metadata.get('model')}) cannot be loaded "
                      f"into a {type(model).__name__}")
  if model is not None and not _classifier_file(metadata):
    raise LayoutError(f"not an fcnjax classifier file (metadata 'model' is "
                      f"{metadata.get('model', 'absent')!r}): cannot load it into a classifier")
  if model is None:
    if not _classifier_file(metadata):
      raise LayoutError("not an fcnjax classifier file (metadata 'model' names no classifier): "
                        "cannot load it into a classifier")
    kwargs = classifiers.build_kwargs(metadata, parse_fcnjax_metadata(metadata))
    model = _build(kwargs)
  classifiers.load_into(model, tensors)
  pre = resolve_preprocessing(preprocessing) or default_preprocessing(L.FCNJAX, metadata, None)
  if metadata.get("preprocessing") or preprocessing is not None:
    model.preprocessing = pre
  return model


def _is_abstract(var) -> bool:
  return isinstance(var.get_value(), jax.ShapeDtypeStruct)


def _build(spec: dict, abstract: bool = False):
  """``build_model(**spec)`` (under ``nnx.eval_shape`` if ``abstract``); a ``ValueError`` /
  ``TypeError`` from it (a description the registry cannot build) becomes a ``WeightsError``."""
  try:
    return nnx.eval_shape(lambda: build_model(**spec)) if abstract else build_model(**spec)
  except WeightsError:
    raise
  except (ValueError, TypeError) as e:
    desc = ", ".join(f"{k}={v!r}" for k, v in sorted(spec.items()))
    raise WeightsError(f"cannot build the model the file describes ({desc}): {e}") from e


def _build_and_load(spec: dict, tensors, layout, **apply_kwargs):
  """``(model, report)``: build ``spec``'s model and load ``tensors``, skipping the random init
  when the file sets every parameter (a full-width FCN's random init takes several times as long
  as loading it; see benchmarks/RESULTS.md).

  The model is first built abstractly (``nnx.eval_shape``) and loaded. If any parameter kept its
  initial value (e.g. zero score layers of an FCN built from a VGG16 file), the model is built
  concretely and loaded again. Otherwise only the dropout RNG state is still abstract: it is
  seeded freshly (key ``fold_in(key(seed), i)``, count 0).
  """
  seed = spec.get("seed", 0)
  model = _build(spec, abstract=True)
  report = apply(model, tensors, layout, **apply_kwargs)
  left = {k: v for k, v in L.flat_variables(model, (nnx.Variable,)).items() if _is_abstract(v)}
  if any(isinstance(v, (nnx.Param, nnx.BatchStat)) for v in left.values()):
    model = _build(spec)
    return model, apply(model, tensors, layout, **apply_kwargs)
  for i, (k, v) in enumerate(sorted(left.items())):
    if isinstance(v, nnx.RngKey):
      v.set_value(jax.random.fold_in(jax.random.key(seed), i))
    elif isinstance(v, nnx.RngCount):
      v.set_value(jnp.zeros(v.shape, v.dtype))
    else:
      raise WeightsError(f"cannot initialise variable {k} of type {type(v).__name__}")
  return model, report


# ---------------------------------------------------------------------------------------------
# Saving


def state_arrays(model) -> dict[str, np.ndarray]:
  """``{fcnjax key: numpy array}`` of the model's parameters (and batch statistics, if any)."""
  return {k: np.asarray(v.get_value()) for k, v in L.flat_variables(model).items()}


def save(model, path, *, metadata: Mapping[str, str] | None = None) -> None:
  """Write ``model``'s weights to an fcnjax ``.safetensors`` (readable without PyTorch).

  Metadata (:func:`describe`) records the architecture (``model``, ``num_classes``,
  ``width_multiplier``, ``aligned`` — ``"true"``/``"false"``, the geometry the loaders check —,
  ``pool``, ``learnable_upsampling``) and ``preprocessing``, plus ``metadata`` (e.g. ``layout``:
  the source layout of a conversion). ``fcnjax.weights.load(path)`` rebuilds and loads the
  model. A ``.npz`` path writes the arrays only (no metadata). A failed write raises
  :class:`~fcnjax.weights.errors.FormatError` ``"PATH: cannot write the weight file (...)"``.
  """
  with about_file(path):
    meta = describe(model) | {str(k): str(v) for k, v in (metadata or {}).items()}
    if str(path).endswith(".npz"):
      io.write_npz(path, state_arrays(model))
      return
    io.write_safetensors(path, state_arrays(model), meta)


def convert(src, dst, *, layout: str, model: str | None = None, num_classes: int | None = None,
            preprocessing=None) -> tuple[object, LoadReport]:
  """Convert a torchvision / pytorch-fcn file to an fcnjax ``.safetensors``.

  ``model`` defaults to ``vgg16`` / ``resnetN`` (backbone only) for ImageNet files and to the
  architecture inferred from a pytorch-fcn or torchvision FCN-ResNet file's keys (a ResNet
  ImageNet file with ``model="d2l_fcn_resnet18"`` etc. gives that model with fresh heads). Building an FCN from an ImageNet VGG16 file gives
  zero score layers (``num_classes``, default 21). Returns ``(model, report)``.

  Errors about ``src`` start with ``"SRC: "``, a failed write with ``"DST: "``.
  """
  if layout not in L.LAYOUTS:
    raise LayoutError(f"unknown layout {layout!r}; expected one of {L.LAYOUTS}")
  with about_file(_path_of(src)):
    tensors, metadata, path = _source(src)
    found = L.infer_layout(tensors, metadata)
    compatible = {L.TORCHVISION_VGG16: (L.TORCHVISION_VGG16,),
                  L.PYTORCH_FCN: (L.PYTORCH_FCN, L.TORCHVISION_VGG16), L.FCNJAX: (L.FCNJAX,),
                  L.TORCHVISION_RESNET: (L.TORCHVISION_RESNET,),
                  L.TORCHVISION_FCN_RESNET: (L.TORCHVISION_FCN_RESNET,),
                  L.KERAS_RESNET_V2: (L.KERAS_RESNET_V2,)}
    if found not in compatible[layout]:
      raise LayoutError(f"asked for layout {layout!r} but the keys look like {found!r}")
    spec = _model_from_file(tensors, metadata, found, path, model, num_classes)
    pre = resolve_preprocessing(preprocessing)
    if pre is None and layout == L.PYTORCH_FCN:
      pre = resolve_preprocessing("caffe")  # pytorch-fcn's files (its VGG16 too) are Caffe's
    m, report = _build_and_load(spec, tensors, found, metadata=metadata, path=path,
                                heads=_has_heads(tensors), preprocessing=pre)
  save(m, dst, metadata={"layout": layout})
  return m, report


__all__ = ["load_vgg16_imagenet", "load_pytorch_fcn", "load_into", "init_from", "load", "save",
           "convert", "build_model", "describe", "model_name", "state_arrays",
           "default_preprocessing"]
