"""Loading weight files into fcnjax models: validation, conversion, and the input convention.

Every loader reads the whole file, expands the layout into rules (:mod:`fcnjax.weights.layouts`),
checks *everything* first (missing keys, unexpected keys, shapes, number of classes, bilinear
kernels) and only then writes the parameters, so a failed load leaves the model untouched.
After a load, ``model.preprocessing`` is the input convention the weights expect
(:mod:`fcnjax.preprocessing`): Caffe (BGR, 0–255, mean subtracted) for pytorch-fcn's
Caffe-converted files, torchvision (RGB, ImageNet mean/std) for torchvision's VGG16. Pass
``preprocessing=`` to choose another one explicitly.

Geometry: trained FCN weights carry the geometry they were trained with (the exact pad-100
variant, or the aligned one); :func:`apply` refuses to load them into a model of the other
geometry (:class:`~fcnjax.weights.errors.GeometryError`) unless ``allow_geometry_change=True``.
See :func:`file_geometry`.

Every error is a :class:`~fcnjax.weights.errors.WeightsError` whose message starts with the
file's path when the weights come from a file.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Mapping

import jax.numpy as jnp
import numpy as np

from fcnjax import preprocessing as pp
from fcnjax.models.layers import bilinear_kernel
from fcnjax.weights import io, layouts as L, surgery
from fcnjax.weights.errors import (DTypeError, FormatError, GeometryError, LayoutError,
                                   MissingKeyError, NumClassesError, ShapeMismatchError,
                                   UnexpectedKeyError, UpsamplingKernelError, WeightsError,
                                   about_file)

#: Max |difference| allowed between a file's upsampling kernel and the exact bilinear kernel when
#: the model's upsampling is fixed (kernel values lie in [0, 1]; float32 files agree to ~1e-7).
BILINEAR_ATOL = 1e-5

PREPROCESSINGS = {p.name: p for p in (pp.CAFFE, pp.TORCHVISION, pp.KERAS_TF)}
_ALIASES = {"caffe": pp.CAFFE, "torchvision": pp.TORCHVISION, "keras": pp.KERAS_TF}


def resolve_preprocessing(p) -> pp.Preprocessing | None:
  """A :class:`~fcnjax.preprocessing.Preprocessing`, its name, ``"caffe"``/``"torchvision"``, or None."""
  if p is None or isinstance(p, pp.Preprocessing):
    return p
  if p in _ALIASES:
    return _ALIASES[p]
  if p in PREPROCESSINGS:
    return PREPROCESSINGS[p]
  raise WeightsError(f"unknown preprocessing {p!r}; expected 'caffe', 'torchvision', "
                     f"{sorted(PREPROCESSINGS)} or a fcnjax.preprocessing.Preprocessing")


def default_preprocessing(layout: str, metadata: Mapping[str, str], path) -> pp.Preprocessing:
  """The convention the weights expect: fcnjax metadata; else by layout.

  torchvision-layout files are torchvision's (RGB, mean/std) — except pytorch-fcn's
  ``vgg16_from_caffe.pth``, which shares the keys: a file name containing ``caffe`` means Caffe.
  """
  if metadata.get("preprocessing") in PREPROCESSINGS:
    return PREPROCESSINGS[metadata["preprocessing"]]
  if layout == L.TORCHVISION_VGG16:
    name = os.path.basename(os.fspath(path)).lower() if path is not None else ""
    return pp.CAFFE if "caffe" in name else pp.TORCHVISION
  if layout in (L.TORCHVISION_RESNET, L.TORCHVISION_FCN_RESNET):
    return pp.TORCHVISION
  if layout == L.KERAS_RESNET_V2:
    return pp.KERAS_TF
  return pp.CAFFE


@dataclasses.dataclass
class LoadReport:
  """What a load did. Keys in ``loaded``/``kept_init`` are fcnjax parameter paths."""

  layout: str
  preprocessing: pp.Preprocessing
  loaded: list = dataclasses.field(default_factory=list)     # set from the file
  kept_init: list = dataclasses.field(default_factory=list)  # left at their initial value
  checked: list = dataclasses.field(default_factory=list)    # file kernels verified bilinear
  ignored: list = dataclasses.field(default_factory=list)    # file keys deliberately unused
  geometry_changed: bool = False  # trained weights of the other geometry, loaded as allowed

  def __str__(self):
    return (f"{self.layout}: loaded {len(self.loaded)} tensors, kept {len(self.kept_init)} at "
            f"init{' (' + ', '.join(self.kept_init) + ')' if self.kept_init else ''}, "
            f"{len(self.checked)} bilinear kernels checked, {len(self.ignored)} file keys ignored;"
            f" preprocessing {self.preprocessing.name}"
            f"{'; GEOMETRY CHANGED (exact <-> aligned)' if self.geometry_changed else ''}")


def _source(src) -> tuple[dict, dict, object]:
  """``(tensors, metadata, path)`` from a path or an in-memory mapping of arrays.

  ``path`` is ``None`` for a mapping. Keys become ``str``; a value numpy cannot turn into an
  array raises :class:`FormatError` naming the key; file errors are those of :func:`io.read`.
  """
  if isinstance(src, Mapping):
    tensors = {}
    for k, v in src.items():
      try:
        tensors[str(k)] = np.asarray(v)
      except Exception as e:  # noqa: BLE001 (ragged lists, ...)
        raise FormatError(f"entry {str(k)!r} is not an array ({type(v).__name__}: {e})",
                          key=str(k)) from e
    return tensors, {}, None
  tensors, metadata = io.read(src)
  return tensors, metadata, src


# ---------------------------------------------------------------------------------------------
# fcnjax metadata and geometry

_BOOLS = {"true": True, "false": False}
POOLS = ("ceil", "floor")


def _bad_metadata(name: str, value: str, expected: str) -> FormatError:
  return FormatError(f"metadata {name!r} is {value!r}; expected {expected}", key=f"metadata.{name}")


def parse_fcnjax_metadata(metadata: Mapping[str, str]) -> dict:
  """The typed architecture entries of an fcnjax file's metadata (absent keys stay absent).

  ``model`` (str, a name of :mod:`fcnjax.models.registry`), ``num_classes`` (int ≥ 1),
  ``width_multiplier`` (finite float > 0), ``aligned`` / ``learnable_upsampling`` / ``aux``
  (``"true"`` / ``"false"`` -> bool) and ``pool`` (``"ceil"`` / ``"floor"``). A malformed value raises
  :class:`FormatError` ``"metadata 'NAME' is 'VALUE'; expected ..."`` with ``key
  "metadata.NAME"``.
  """
  from fcnjax.models import registry
  out = {}
  if "model" in metadata:
    if metadata["model"] not in registry.SPECS:
      raise _bad_metadata("model", metadata["model"],
                          f"an fcnjax model name: {', '.join(registry.SPECS)}")
    out["model"] = metadata["model"]
  if "num_classes" in metadata:
    v = metadata["num_classes"]
    try:
      n = int(v)
    except ValueError:
      n = 0
    if n < 1:
      raise _bad_metadata("num_classes", v, "a positive integer")
    out["num_classes"] = n
  if "width_multiplier" in metadata:
    v = metadata["width_multiplier"]
    try:
      w = float(v)
    except ValueError:
      w = math.nan
    if not (math.isfinite(w) and w > 0):
      raise _bad_metadata("width_multiplier", v, "a positive number")
    out["width_multiplier"] = w
  for name in ("aligned", "learnable_upsampling", "aux"):
    if name in metadata:
      if metadata[name] not in _BOOLS:
        raise _bad_metadata(name, metadata[name], "'true' or 'false'")
      out[name] = _BOOLS[metadata[name]]
  if "pool" in metadata:
    if metadata["pool"] not in POOLS:
      raise _bad_metadata("pool", metadata["pool"], "'ceil' or 'floor'")
    out["pool"] = metadata["pool"]
  return out


def _trained_scores(tensors: Mapping[str, np.ndarray]) -> bool:
  """Whether the file has score layers that are not all zero (zero ones were never trained:
  an FCN built from ImageNet VGG16, e.g. by ``convert --model fcn8s``)."""
  for k, v in tensors.items():
    if k.startswith("score"):
      try:
        if np.any(v):
          return True
      except Exception:  # noqa: BLE001 (an unusable dtype: treat as trained; rejected later)
        return True
  return False


def file_geometry(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str],
                  layout: str) -> bool | None:
  """The geometry trained weights were trained with: ``True`` aligned, ``False`` exact (pad
  100), ``None`` geometry-neutral or unknown.

  * No score layers, or only all-zero ones (ImageNet VGG16 in any layout, a bare backbone, an
    untrained FCN built from one): ``None`` — fine for either geometry.
  * pytorch-fcn layout with trained score layers: ``False`` (pytorch-fcn's FCNs are all exact).
  * fcnjax layout: the metadata's ``aligned``; without it, ``False`` if the metadata's
    ``layout`` says it was converted from pytorch-fcn, else ``None`` (unknown: not refused).
  * torchvision-vgg16 layout: ``None``.
  """
  if not _trained_scores(tensors):
    return None
  if layout == L.PYTORCH_FCN:
    return False
  if layout == L.FCNJAX:
    parsed = parse_fcnjax_metadata(metadata)
    if "aligned" in parsed:
      return parsed["aligned"]
    return False if metadata.get("layout") == L.PYTORCH_FCN else None
  return None


def model_geometry(model) -> bool | None:
  """``True`` / ``False`` for an aligned / exact fcnjax VGG-backbone model, ``None`` otherwise."""
  if L.resnet_of(model) is not None:
    return None
  bb = L.backbone_of(model)
  aligned = getattr(bb, "aligned", None)
  return None if aligned is None else bool(aligned)


def check_geometry(model, tensors, metadata, layout, path, *,
                   allow_geometry_change: bool = False) -> bool:
  """Raise :class:`GeometryError` if trained weights of one geometry go into a model of the other.

  Returns whether the geometry changes (``True`` only with ``allow_geometry_change=True``).
  """
  fg, mg = file_geometry(tensors, metadata, layout), model_geometry(model)
  if fg is None or mg is None or fg == mg:
    return False
  if not allow_geometry_change:
    raise GeometryError(path, fg)
  return True


def _expected_shape(rule: L.Rule, var, tensor, num_classes) -> tuple:
  if rule.kind == L.BILINEAR_DECONV:
    k = 2 * rule.factor
    return (num_classes, num_classes, k, k)
  if rule.kind == L.BILINEAR_HWIO:
    k = 2 * rule.factor
    return (k, k, num_classes, num_classes)
  shape = tuple(var.shape)
  if rule.kind == L.CONV:
    return surgery.conv_shape(shape)
  if rule.kind == L.LINEAR:
    return surgery.linear_shape(shape)
  if rule.kind == L.CONV_OR_LINEAR:
    return surgery.linear_shape(shape) if tensor.ndim == 2 else surgery.conv_shape(shape)
  if rule.kind == L.DECONV:
    return surgery.deconv_shape(shape)
  return shape


def _convert(rule: L.Rule, x: np.ndarray, var) -> np.ndarray:
  if rule.kind == L.CONV:
    return surgery.conv_to_hwio(x)
  if rule.kind == L.LINEAR or (rule.kind == L.CONV_OR_LINEAR and x.ndim == 2):
    kh, kw = var.shape[0], var.shape[1]
    return surgery.linear_to_hwio(x, kh, kw)
  if rule.kind == L.CONV_OR_LINEAR:
    return surgery.conv_to_hwio(x)
  if rule.kind == L.DECONV:
    return surgery.deconv_to_hwio(x)
  return x


def _class_count(rule: L.Rule, x: np.ndarray, expected: tuple) -> int:
  """Number of classes a score_fr kernel in the file scores (a wrong rank is a
  :class:`ShapeMismatchError`)."""
  if x.ndim != len(expected):
    raise ShapeMismatchError(rule.src, expected, x.shape, rule.dst)
  return int(x.shape[0] if rule.kind == L.CONV else x.shape[-1])


def _is_float(x: np.ndarray) -> bool:
  return bool(jnp.issubdtype(x.dtype, jnp.floating))


HEAD_KEY_PREFIXES = ("score", "upscore", "classifier.", "aux_classifier.", "final_conv.",
                     "transpose_conv.")
"""File keys of score / head layers (every layout): what a backbone-only load skips."""


def _is_head_key(key: str) -> bool:
  return key.startswith(HEAD_KEY_PREFIXES)


def apply(model, tensors: Mapping[str, np.ndarray], layout: str, *, metadata=None, path=None,
          reinit_scores: bool = False, lenient_heads: bool = False, heads: bool = True,
          preprocessing=None, allow_geometry_change: bool = False) -> LoadReport:
  """Validate ``tensors`` (in ``layout``) against ``model`` and write them into it.

  Args:
    reinit_scores: skip every score/upsampling layer (they keep their fresh initialisation) —
      for fine-tuning with another number of classes. Without it, a class-count mismatch raises
      :class:`NumClassesError`.
    lenient_heads: skip-score and upsampling layers that are missing from the file, have another
      shape (e.g. FCN-32s' k64 upscore vs FCN-16s' k32) or have no place in the model are left
      at init / ignored instead of raising (the paper's 32s→16s→8s cascade).
    heads: load score/upsampling layers at all (``False``: backbone only, as for ImageNet VGG16).
    preprocessing: override of the weights' input convention (an explicit choice).
    allow_geometry_change: load trained weights of the other geometry (exact vs aligned) anyway;
      without it that raises :class:`GeometryError` (see :func:`file_geometry`). The check does
      not depend on ``reinit_scores`` / ``heads``: the backbone's features differ too.
  Returns a :class:`LoadReport`; raises a :class:`~fcnjax.weights.errors.WeightsError` subclass
  (naming the file — ``"PATH: "`` prefix when ``path`` is given —, the keys, shapes and dtypes)
  before changing anything. Tensors the model uses must be floating point
  (:class:`DTypeError` otherwise) and of the right rank and shape (:class:`ShapeMismatchError`).
  """
  with about_file(path):
    return _apply(model, tensors, layout, metadata=metadata, path=path,
                  reinit_scores=reinit_scores, lenient_heads=lenient_heads, heads=heads,
                  preprocessing=preprocessing, allow_geometry_change=allow_geometry_change)


def _apply(model, tensors, layout, *, metadata, path, reinit_scores, lenient_heads, heads,
           preprocessing, allow_geometry_change) -> LoadReport:
  metadata = dict(metadata or {})
  rules, ignorable = L.rules_for(layout, model, tensors.keys())
  geometry_changed = check_geometry(model, tensors, metadata, layout, path,
                                    allow_geometry_change=allow_geometry_change)
  variables = L.flat_variables(model)
  fcn = L.is_fcn(model)
  num_classes = model.num_classes if fcn else None
  report = LoadReport(layout, resolve_preprocessing(preprocessing)
                      or default_preprocessing(layout, metadata, path),
                      geometry_changed=geometry_changed)

  skip_heads = reinit_scores or not heads
  if fcn and not skip_heads:
    for r in rules:
      if (r.group == L.SCORE_FR and r.dst and r.dst.endswith("kernel") and r.src in tensors
          and r.dst in variables):
        x = tensors[r.src]
        c = _class_count(r, x, _expected_shape(r, variables[r.dst], x, num_classes))
        if c != num_classes:
          raise NumClassesError(r.src, c, num_classes)

  used, writes, missing = set(), {}, []
  for r in rules:
    if skip_heads and r.group in L.HEAD_GROUPS:
      if r.dst is not None:
        report.kept_init.append(r.dst)
      continue
    if r.src not in tensors:
      if r.optional or (lenient_heads and r.group in (L.SKIP, L.UPSCORE)):
        if r.dst is not None:
          report.kept_init.append(r.dst)
        continue
      missing.append(r.src)
      continue
    used.add(r.src)
    x = tensors[r.src]
    if r.dst is not None and r.dst not in variables:  # the layout does not fit this model
      raise LayoutError(f"the {layout} layout maps {r.src!r} to {r.dst}, which this "
                        f"{type(model).__name__} does not have")
    var = variables.get(r.dst) if r.dst is not None else None
    expected = _expected_shape(r, var, x, num_classes)
    if tuple(x.shape) != expected:
      if lenient_heads and r.group in (L.SKIP, L.UPSCORE):
        if r.dst is not None:
          report.kept_init.append(r.dst)
        report.ignored.append(r.src)
        continue
      raise ShapeMismatchError(r.src, expected, x.shape, r.dst)
    if not _is_float(x):
      raise DTypeError(r.src, x.dtype, r.dst)
    if r.kind in (L.BILINEAR_DECONV, L.BILINEAR_HWIO):
      ref = bilinear_kernel(r.factor, num_classes)
      got = surgery.deconv_to_hwio(x) if r.kind == L.BILINEAR_DECONV else x
      diff = float(np.max(np.abs(got.astype(np.float64) - ref)))
      if diff > BILINEAR_ATOL:
        raise UpsamplingKernelError(r.src, diff, BILINEAR_ATOL)
      report.checked.append(r.src)
      continue
    writes[r.dst] = _convert(r, np.asarray(x), var)
  if missing:
    raise MissingKeyError(missing, layout)

  def is_head(k):
    return (L.group_of_fcnjax_key(k) in L.HEAD_GROUPS) if layout == L.FCNJAX else _is_head_key(k)

  rule_srcs = {r.src for r in rules}
  unexpected = []
  for k in tensors:
    if k in used:
      continue
    if k in ignorable or k in rule_srcs or ((lenient_heads or skip_heads) and is_head(k)):
      if k not in report.ignored:  # dropped on purpose (ImageNet fc8), or a head we skip
        report.ignored.append(k)
      continue
    unexpected.append(k)
  if unexpected:
    raise UnexpectedKeyError(unexpected, layout)

  for dst, x in writes.items():
    var = variables[dst]
    var.set_value(jnp.asarray(x, dtype=var.dtype))
    report.loaded.append(dst)
  model.preprocessing = report.preprocessing
  return report
