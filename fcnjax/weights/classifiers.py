"""fcnjax weight files of the FCN classifiers (:mod:`fcnjax.models.classifier`).

A classifier's ``.safetensors`` holds its parameters and BatchNorm statistics under their fcnjax
keys (``backbone.convs.0.kernel``, ``head.kernel``, ``score_norm.mean``, ...) and metadata that
rebuilds the architecture: ``model`` (``fcn_classifier``, ``fcn_classifier-vgg16``,
``fcn_classifier-resnet18`` ...), ``task`` = ``"classification"``, ``num_classes``,
``width_multiplier`` and ``aligned`` (VGG16), and ``classifier_options``, the JSON of the
:func:`~fcnjax.models.fcn_classifier` options (``pooling``, ``head_width``, ``dropout``,
``batch_norm``, ``masked``; the conv stack's ``widths`` after the multiplier and ``strides``).
Loading is strict: every key of the model must be in the file with its shape, and the file may
hold no other key (the segmenters' layout rules do not apply: there is one layout).
"""

from __future__ import annotations

import json

import numpy as np

from fcnjax.models import classifier as classifier_lib
from fcnjax.weights import layouts as L
from fcnjax.weights.errors import (DTypeError, FormatError, MissingKeyError, ShapeMismatchError,
                                   UnexpectedKeyError, WeightsError)

OPTION_KEYS = ("pooling", "head_width", "dropout", "batch_norm", "masked", "widths", "strides")


def is_classifier(model) -> bool:
  return isinstance(model, classifier_lib.FCNClassifier)


def model_name(model) -> str:
  """The registry name of a classifier, from its backbone."""
  from fcnjax.models import registry
  from fcnjax.models import resnet as R
  from fcnjax.models.vgg import VGG
  bb = model.backbone
  if isinstance(bb, classifier_lib.ConvStack):
    name = "fcn_classifier"
  elif isinstance(bb, VGG):
    name = "fcn_classifier-vgg16"
  elif isinstance(bb, R.ResNet):
    name = f"fcn_classifier-resnet{bb.depth}"
  else:
    name = ""
  if name not in registry.SPECS:
    raise WeightsError(f"no fcnjax model name for a classifier on {type(bb).__name__}"
                       + (f"-{bb.depth}" if hasattr(bb, "depth") else ""))
  return name


def describe(model) -> dict[str, str]:
  """The metadata that rebuilds ``model`` (see the module docstring)."""
  from fcnjax.models.vgg import VGG
  bb = model.backbone
  options = {"pooling": model.pooling,
             "head_width": None if model.head is None else int(model.head.out_features),
             "dropout": float(model.drop.rate), "batch_norm": model.score_norm is not None,
             "masked": bool(model.masked)}
  meta = {"format": L.FCNJAX, "model": model_name(model), "task": "classification",
          "num_classes": str(model.num_classes)}
  if isinstance(bb, classifier_lib.ConvStack):
    options.update(widths=list(bb.widths), strides=list(bb.strides))
    meta["width_multiplier"] = "1.0"  # the widths are stored as built
  elif isinstance(bb, VGG):
    meta["width_multiplier"] = repr(L.width_multiplier_of(
        int(bb.blocks[0].convs[0].kernel.shape[-1])))
    meta["aligned"] = str(bool(bb.aligned)).lower()
  else:
    meta["width_multiplier"] = repr(float(bb.width_multiplier))
  meta["classifier_options"] = json.dumps(options, sort_keys=True)
  pre = getattr(model, "preprocessing", None)
  if pre is not None:
    meta["preprocessing"] = pre.name
  return meta


def _bad(name: str, value, expected: str) -> FormatError:
  return FormatError(f"metadata {name!r} is {value!r}; expected {expected}", key=f"metadata.{name}")


def build_kwargs(metadata, meta: dict) -> dict:
  """:func:`~fcnjax.models.build_model` keyword arguments from a classifier file's metadata
  (``meta``: the typed entries of :func:`~fcnjax.weights.loading.parse_fcnjax_metadata`)."""
  text = metadata.get("classifier_options", "{}")
  try:
    options = json.loads(text)
  except ValueError:
    raise _bad("classifier_options", text, "a JSON object") from None
  if not isinstance(options, dict) or set(options) - set(OPTION_KEYS):
    raise _bad("classifier_options", text, f"a JSON object with keys from {', '.join(OPTION_KEYS)}")
  for key in ("widths", "strides"):
    if key in options:
      v = options[key]
      if not (isinstance(v, list) and v and all(isinstance(i, int) and i >= 1 for i in v)):
        raise _bad("classifier_options", text, f"{key!r} a list of positive integers")
      options[key] = tuple(v)
  if "num_classes" not in meta:
    raise FormatError("classifier file without metadata 'num_classes'", key="metadata.num_classes")
  kwargs = dict(name=meta["model"], num_classes=meta["num_classes"],
                width_multiplier=meta.get("width_multiplier", 1.0), classifier_options=options)
  if meta["model"] == "fcn_classifier-vgg16":
    kwargs["aligned"] = meta.get("aligned", True)
  return kwargs


def load_into(model, tensors) -> None:
  """Write ``tensors`` into ``model`` strictly (keys, shapes, floating dtypes checked first)."""
  variables = L.flat_variables(model)
  missing = sorted(set(variables) - set(tensors))
  if missing:
    raise MissingKeyError(missing, L.FCNJAX)
  extra = sorted(set(tensors) - set(variables))
  if extra:
    raise UnexpectedKeyError(extra, L.FCNJAX)
  for key, var in variables.items():
    x = tensors[key]
    if tuple(x.shape) != tuple(var.get_value().shape):
      raise ShapeMismatchError(key, var.get_value().shape, x.shape)
    if not np.issubdtype(x.dtype, np.floating):
      raise DTypeError(key, x.dtype)
  for key, var in variables.items():
    var.set_value(np.asarray(tensors[key], np.asarray(var.get_value()).dtype))
