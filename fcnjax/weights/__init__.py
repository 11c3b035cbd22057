"""Pretrained weights for fcnjax: ImageNet VGG16 (with fc→conv surgery), pytorch-fcn's
Caffe-converted FCN-32s/16s/8s/8s-at-once, and fcnjax's own ``.safetensors``.

Public API (see ``fcnjax/weights/README.md``):

* :func:`load_vgg16_imagenet` (model, src) — torchvision ``vgg16-397923af.pth`` or pytorch-fcn's
  ``vgg16_from_caffe.pth`` into a model's backbone (score layers stay zero).
* :func:`load_pytorch_fcn` (model, src) — pytorch-fcn ``fcn{32s,16s,8s}*.pth`` checkpoints.
* :func:`load` (src, model=None) — any layout; builds the model from the file if none is given.
* :func:`load_into` (model, src) — any layout, strictly into an existing model.
* :func:`init_from` (src, model) — for training's ``--init``: any file, cascade-friendly.
* :func:`save` (model, path) — fcnjax ``.safetensors`` with metadata (no PyTorch needed later).
* :func:`convert` (src, dst, layout=...) — the library form of ``python -m fcnjax.weights convert``.

Every load sets ``model.preprocessing`` to the input convention of the weights. Files are read
without unpickling: safetensors/npz with numpy, ``.pth`` via ``torch.load(weights_only=True)``.

Every weights problem is a :class:`WeightsError` (a ``ValueError``) whose message starts with the
file's path and names the key at fault; a missing file is :class:`WeightsFileNotFound` (also a
``FileNotFoundError``). Trained FCN weights of the other geometry (exact pad-100 vs aligned) are
refused with :class:`GeometryError` unless ``allow_geometry_change=True``.
"""

from fcnjax.weights.api import (build_model, convert, describe, init_from, load, load_into,
                                load_pytorch_fcn, load_vgg16_imagenet, model_name, save,
                                state_arrays)
from fcnjax.weights.errors import (DTypeError, FormatError, GeometryError, LayoutError,
                                   MissingKeyError, NumClassesError, ShapeMismatchError,
                                   UnexpectedKeyError, UpsamplingKernelError, WeightsError,
                                   WeightsFileNotFound)
from fcnjax.weights.io import read
from fcnjax.weights.layouts import FCNJAX, LAYOUTS, PYTORCH_FCN, TORCHVISION_VGG16, infer_layout
from fcnjax.weights.loading import BILINEAR_ATOL, LoadReport, file_geometry

__all__ = [
    "build_model", "convert", "describe", "init_from", "load", "load_into", "load_pytorch_fcn",
    "load_vgg16_imagenet", "model_name", "save", "state_arrays", "FormatError", "LayoutError",
    "MissingKeyError", "NumClassesError", "ShapeMismatchError", "UnexpectedKeyError",
    "UpsamplingKernelError", "WeightsError", "read", "FCNJAX", "LAYOUTS", "PYTORCH_FCN",
    "TORCHVISION_VGG16", "infer_layout", "BILINEAR_ATOL", "LoadReport", "DTypeError",
    "GeometryError", "WeightsFileNotFound", "file_geometry",
]
