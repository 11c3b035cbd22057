"""Loading weight files into fcnjax models: validation, conversion, and the input convention.

Every loader reads the whole file, expands the layout into rules (:mod:`fcnjax.weights.layouts`),
checks *everything* first (missing keys, unexpected keys, shapes, number of classes, bilinear
kernels) and only then writes the parameters, so a failed load leaves the model untouched.
After a load, ``model.preprocessing`` is the input convention the weights expect
(:mod:`fcnjax.preprocessing`): Caffe (BGR, 0–255, mean subtracted) for pytorch-fcn's
Caffe-converted files, torchvision (RGB, ImageNet mean/std) for torchvision's VGG16. Pass
``preprocessing=`` to choose another one explicitly.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Mapping

import jax.numpy as jnp
import numpy as np

from fcnjax import preprocessing as pp
from fcnjax.models.layers import bilinear_kernel
from fcnjax.weights import io, layouts as L, surgery
from fcnjax.weights.errors import (MissingKeyError, NumClassesError, ShapeMismatchError,
                                   UnexpectedKeyError, UpsamplingKernelError, WeightsError)

#: Max |difference| allowed between a file's upsampling kernel and the exact bilinear kernel when
#: the model's upsampling is fixed (kernel values lie in [0, 1]; float32 files agree to ~1e-7).
BILINEAR_ATOL = 1e-5

PREPROCESSINGS = {p.name: p for p in (pp.CAFFE, pp.TORCHVISION)}
_ALIASES = {"caffe": pp.CAFFE, "torchvision": pp.TORCHVISION}


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

  def __str__(self):
    return (f"{self.layout}: loaded {len(self.loaded)} tensors, kept {len(self.kept_init)} at "
            f"init{' (' + ', '.join(self.kept_init) + ')' if self.kept_init else ''}, "
            f"{len(self.checked)} bilinear kernels checked, {len(self.ignored)} file keys ignored;"
            f" preprocessing {self.preprocessing.name}")


def _source(src) -> tuple[dict, dict, object]:
  """``(tensors, metadata, path)`` from a path or an in-memory mapping of arrays."""
  if isinstance(src, Mapping):
    return {k: np.asarray(v) for k, v in src.items()}, {}, None
  tensors, metadata = io.read(src)
  return tensors, metadata, src


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


def _class_count(rule: L.Rule, x: np.ndarray) -> int:
  """Number of classes a score_fr kernel in the file scores."""
  return int(x.shape[0] if rule.kind == L.CONV else x.shape[-1])


def _is_head_key(key: str) -> bool:
  return key.startswith(("score", "upscore"))


def apply(model, tensors: Mapping[str, np.ndarray], layout: str, *, metadata=None, path=None,
          reinit_scores: bool = False, lenient_heads: bool = False, heads: bool = True,
          preprocessing=None) -> LoadReport:
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
  Returns a :class:`LoadReport`; raises a :class:`~fcnjax.weights.errors.WeightsError` subclass
  (naming the keys and shapes) before changing anything.
  """
  metadata = dict(metadata or {})
  rules, ignorable = L.rules_for(layout, model, tensors.keys())
  variables = L.flat_variables(model)
  fcn = L.is_fcn(model)
  num_classes = model.num_classes if fcn else None
  report = LoadReport(layout, resolve_preprocessing(preprocessing)
                      or default_preprocessing(layout, metadata, path))

  skip_heads = reinit_scores or not heads
  if fcn and not skip_heads:
    for r in rules:
      if r.group == L.SCORE_FR and r.dst and r.dst.endswith("kernel") and r.src in tensors:
        c = _class_count(r, tensors[r.src])
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
    var = variables.get(r.dst) if r.dst is not None else None
    expected = _expected_shape(r, var, x, num_classes)
    if tuple(x.shape) != expected:
      if lenient_heads and r.group in (L.SKIP, L.UPSCORE):
        if r.dst is not None:
          report.kept_init.append(r.dst)
        report.ignored.append(r.src)
        continue
      raise ShapeMismatchError(r.src, expected, x.shape, r.dst)
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
