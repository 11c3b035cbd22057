"""The named architectures, in one table: name -> constructor, skip stages, description, weights.

Each entry of :data:`SPECS` is a :class:`ModelSpec`: the FCN variants ``fcn32s``, ``fcn16s``,
``fcn8s``, ``fcn8s-atonce``, ``fcn4s``, ``fcn2s`` (VGG16 FCNs differing in their skip stages and
skip scales) and the bare ``vgg16`` backbone; the ResNet models (:mod:`fcnjax.models.resnet_fcn`:
torchvision's ``fcn_resnet50`` / ``fcn_resnet101``, the d2l FCNs, the paper's FCN-8s on
ResNet-18/50) and the bare ``resnet18`` … ``resnet101`` / ``resnet101v2`` backbones. Everything that maps a name to an architecture
reads this table: :func:`build_model` (training, the weights loader, the summary),
:func:`spec_for_fcn` (a built model's name, for weight files' metadata) and the pytorch-fcn
layout (its upsampling layer names; ``None`` where pytorch-fcn has no such model).

    model = build_model("fcn8s", 21, width_multiplier=1 / 8, aligned=True, seed=0)
    for name, description in model_names().items(): ...
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from flax import nnx

from fcnjax.models import classifier as classifier_lib
from fcnjax.models import resnet as resnet_lib
from fcnjax.models import resnet_fcn
from fcnjax.models.fcn import FCN, fcn_vgg16
from fcnjax.models.vgg import vgg16

BACKBONE = "vgg16"
"""The name of the bare VGG16 backbone (no score layers)."""


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """One named architecture.

  Attributes:
    name: the registry key, e.g. ``"fcn8s-atonce"``.
    constructor: ``constructor(num_classes=21, *, rngs, **options) -> FCN`` for an FCN (the
      options of :func:`~fcnjax.models.fcn.fcn_vgg16`); :func:`~fcnjax.models.vgg.vgg16` (no
      ``num_classes``) for the backbone.
    description: one line, for listings (:func:`model_names`).
    skips: skip stages, coarse to fine (``()`` for FCN-32s); ``None`` for the bare backbone.
    skip_scales: fixed input scale per skip (at-once FCN-8s), or ``None`` for none.
    pytorch_fcn_upscore: pytorch-fcn's names of the upsampling layers, coarse to fine, final
      last; ``None`` where pytorch-fcn has no such model.
    family: ``"vgg"``, ``"resnet"`` or ``"classifier"`` (:mod:`fcnjax.models.classifier`:
      images -> class logits): which of :func:`build_model`'s options apply.
    segmenter: for entries without ``skips``: whether it is a segmentation model (takes
      ``num_classes``) rather than a bare backbone.
  """

  name: str
  constructor: Callable[..., nnx.Module]
  description: str
  skips: tuple[str, ...] | None = None
  skip_scales: tuple[float, ...] | None = None
  pytorch_fcn_upscore: tuple[str, ...] | None = None
  family: str = "vgg"
  segmenter: bool = False

  @property
  def is_fcn(self) -> bool:
    """A VGG16 FCN of the paper (skips over VGG's pools)."""
    return self.skips is not None

  @property
  def is_segmenter(self) -> bool:
    """Takes ``num_classes`` and maps images to per-pixel logits (every FCN, the ResNet
    segmenters); ``False`` for bare backbones."""
    return self.is_fcn or self.segmenter


def _build_fcn(name: str, num_classes: int, rngs: nnx.Rngs, options: dict) -> FCN:
  spec = SPECS[name]
  options = {"skip_scales": spec.skip_scales} | options
  return fcn_vgg16(num_classes, spec.skips, rngs=rngs, **options)


def fcn32s(num_classes: int = 21, *, rngs: nnx.Rngs, **options) -> FCN:
  """FCN-32s (VGG16): score fc7, upsample ×32 (kernel 64), crop at 19. Options: ``fcn_vgg16``'s."""
  return _build_fcn("fcn32s", num_classes, rngs, options)


def fcn16s(num_classes: int = 21, *, rngs: nnx.Rngs, **options) -> FCN:
  """FCN-16s (VGG16): fuse pool4 (crop 5), upsample ×16 (kernel 32), crop at 27."""
  return _build_fcn("fcn16s", num_classes, rngs, options)


def fcn8s(num_classes: int = 21, *, rngs: nnx.Rngs, **options) -> FCN:
  """FCN-8s (VGG16): fuse pool4 (crop 5) and pool3 (crop 9), upsample ×8, crop at 31."""
  return _build_fcn("fcn8s", num_classes, rngs, options)


def fcn8s_atonce(num_classes: int = 21, *, rngs: nnx.Rngs, **options) -> FCN:
  """At-once FCN-8s: as FCN-8s, with pool4 scaled ×0.01 and pool3 ×0.0001 before scoring."""
  return _build_fcn("fcn8s-atonce", num_classes, rngs, options)


def fcn4s(num_classes: int = 21, *, rngs: nnx.Rngs, **options) -> FCN:
  """FCN-4s (VGG16): FCN-8s plus a pool2 skip."""
  return _build_fcn("fcn4s", num_classes, rngs, options)


def fcn2s(num_classes: int = 21, *, rngs: nnx.Rngs, **options) -> FCN:
  """FCN-2s (VGG16): FCN-4s plus a pool1 skip."""
  return _build_fcn("fcn2s", num_classes, rngs, options)


def _backbone(depth: int, preact: bool = False):
  def build(*, width_multiplier: float = 1.0, dtype=None, rngs: nnx.Rngs):
    if preact:
      return resnet_lib.PreActResNet(depth, width_multiplier=width_multiplier, dtype=dtype,
                                     rngs=rngs)
    return resnet_lib.ResNet(depth, width_multiplier=width_multiplier, dtype=dtype, rngs=rngs)
  build.__doc__ = f"The ResNet-{depth}{' V2' if preact else ''} backbone alone."
  return build


def _fcn_on_resnet(depth: int, skips: tuple[str, ...]):
  def build(num_classes: int = 21, *, rngs: nnx.Rngs, **options) -> FCN:
    return resnet_fcn.fcn_resnet(depth, num_classes, skips, rngs=rngs, **options)
  build.__doc__ = f"The paper's FCN on ResNet-{depth}, skips {skips}."
  return build


SPECS: dict[str, ModelSpec] = {s.name: s for s in (
    ModelSpec("fcn32s", fcn32s, "FCN-32s: score fc7, upsample x32", skips=(),
              pytorch_fcn_upscore=("upscore",)),
    ModelSpec("fcn16s", fcn16s, "FCN-16s: fuse pool4, upsample x16", skips=("pool4",),
              pytorch_fcn_upscore=("upscore2", "upscore16")),
    ModelSpec("fcn8s", fcn8s, "FCN-8s: fuse pool4 and pool3, upsample x8",
              skips=("pool4", "pool3"),
              pytorch_fcn_upscore=("upscore2", "upscore_pool4", "upscore8")),
    ModelSpec("fcn8s-atonce", fcn8s_atonce,
              "at-once FCN-8s: FCN-8s with pool4 scaled x0.01 and pool3 x0.0001",
              skips=("pool4", "pool3"), skip_scales=(0.01, 0.0001),
              pytorch_fcn_upscore=("upscore2", "upscore_pool4", "upscore8")),
    ModelSpec("fcn4s", fcn4s, "FCN-4s: FCN-8s plus a pool2 skip, upsample x4",
              skips=("pool4", "pool3", "pool2")),
    ModelSpec("fcn2s", fcn2s, "FCN-2s: FCN-4s plus a pool1 skip, upsample x2",
              skips=("pool4", "pool3", "pool2", "pool1")),
    ModelSpec(BACKBONE, vgg16, "the VGG16 backbone alone (conv1_1 ... fc7, no score layers)"),
    ModelSpec("fcn_resnet50", resnet_fcn.fcn_resnet50,
              "torchvision's FCN-ResNet50: dilated ResNet-50 (stride 8), FCNHead, aux head",
              family="resnet", segmenter=True),
    ModelSpec("fcn_resnet101", resnet_fcn.fcn_resnet101,
              "torchvision's FCN-ResNet101: dilated ResNet-101 (stride 8), FCNHead, aux head",
              family="resnet", segmenter=True),
    ModelSpec("d2l_fcn_resnet18", resnet_fcn.d2l_fcn_resnet18,
              "the d2l FCN: ResNet-18, 1x1 conv, bilinear-initialised transposed conv x32",
              family="resnet", segmenter=True),
    ModelSpec("d2l_fcn_resnet101v2", resnet_fcn.d2l_fcn_resnet101v2,
              "the d2l TF2 FCN: Keras ResNet-101 V2, 1x1 conv + ReLU, transposed conv x32",
              family="resnet", segmenter=True),
    ModelSpec("fcn8s-resnet18", _fcn_on_resnet(18, ("layer3", "layer2")),
              "FCN-8s on ResNet-18: fuse layer3 and layer2, upsample x8", family="resnet",
              segmenter=True),
    ModelSpec("fcn8s-resnet50", _fcn_on_resnet(50, ("layer3", "layer2")),
              "FCN-8s on ResNet-50: fuse layer3 and layer2, upsample x8", family="resnet",
              segmenter=True),
    *(ModelSpec(f"resnet{d}", _backbone(d), f"the ResNet-{d} backbone alone (torchvision's, "
                "no pooling or fc)", family="resnet") for d in (18, 34, 50, 101)),
    *(ModelSpec(f"resnet{d}v2", _backbone(d, preact=True),
                f"the Keras ResNet-{d} V2 backbone alone (pre-activation, no top)",
                family="resnet") for d in (50, 101, 152)),
)}



def _classifier(backbone: str):
  def build(num_classes: int = 5, *, rngs: nnx.Rngs, **options):
    return classifier_lib.fcn_classifier(num_classes, backbone=backbone, rngs=rngs, **options)
  build.__doc__ = f"The FCN classifier on {backbone} (:func:`~fcnjax.models.fcn_classifier`)."
  return build


SPECS.update({s.name: s for s in (
    ModelSpec("fcn_classifier", _classifier("convstack"),
              "FCN classifier: the Keras tutorial's conv blocks, 1x1 convs, masked global pool",
              family="classifier"),
    ModelSpec("fcn_classifier-vgg16", _classifier("vgg16"),
              "FCN classifier on VGG16 (aligned): 1x1 conv head, masked global pool",
              family="classifier"),
    *(ModelSpec(f"fcn_classifier-resnet{d}", _classifier(f"resnet{d}"),
                f"FCN classifier on ResNet-{d}: 1x1 conv head, masked global pool",
                family="classifier") for d in (18, 50)),
)})

MODELS: dict[str, Callable[..., nnx.Module]] = {
    s.name: s.constructor for s in SPECS.values() if s.is_segmenter}
"""Segmentation model name -> constructor ``(num_classes, *, rngs, **options)`` (the options
of :func:`build_model` that apply to its family)."""
RESNET_BACKBONES = tuple(n for n, s in SPECS.items() if s.family == "resnet" and not s.is_segmenter)
"""The bare ResNet backbones' names."""
CLASSIFIERS: dict[str, Callable[..., nnx.Module]] = {
    s.name: s.constructor for s in SPECS.values() if s.family == "classifier"}
"""Classifier name -> constructor ``(num_classes, *, rngs, **options)``: images -> logits."""


def model_names() -> dict[str, str]:
  """``{name: one-line description}`` of every registered architecture, in registry order."""
  return {name: spec.description for name, spec in SPECS.items()}


def get_spec(name: str) -> ModelSpec:
  """The :class:`ModelSpec` of ``name``; ``ValueError`` listing the known names otherwise."""
  if name not in SPECS:
    raise ValueError(f"unknown model {name!r}; known models: {', '.join(SPECS)}")
  return SPECS[name]


def spec_for_fcn(skips, scaled: bool) -> ModelSpec | None:
  """The FCN spec with these skip stages (``scaled``: whether the skips have input scales).

  Where only one spec has these skips it is returned whatever ``scaled`` says; ``None`` if no
  spec has them.
  """
  same = [s for s in SPECS.values() if s.is_fcn and s.skips == tuple(skips)]
  if not same:
    return None
  return next((s for s in same if (s.skip_scales is not None) == scaled), same[0])


def build_model(name: str, num_classes: int = 21, *, width_multiplier: float = 1.0,
                aligned: bool = False, pool: str = "ceil", learnable_upsampling: bool = False,
                batch_norm: bool = False, aux: bool = True, dtype=None, ops: str = "auto",
                seed: int = 0, rngs: nnx.Rngs | None = None,
                classifier_options: dict | None = None) -> nnx.Module:
  """Build the registered architecture ``name`` (see :func:`model_names`).

  Args:
    name: a key of :data:`SPECS` (``"fcn8s"``, ..., ``"fcn_resnet50"``, or a bare backbone:
      ``"vgg16"``, ``"resnet50"``, ...).
    num_classes: output classes of a segmenter (ignored for a backbone).
    width_multiplier: scales every width of the backbone (VGG or ResNet).
    aligned, pool, batch_norm: the VGG16 backbone's options (:class:`~fcnjax.models.vgg.VGG`);
      a ResNet model refuses non-default values (its BatchNorm is always there).
    learnable_upsampling: learn the transposed convs (the paper's FCNs, VGG or ResNet).
    aux: torchvision's FCN-ResNets: build the auxiliary head on ``layer3`` (default, as
      torchvision); ignored by other models.
    dtype: computation dtype (parameters stay float32).
    ops: ``"auto"``, ``"cpu"`` or ``"lax"`` (:mod:`fcnjax.models.cpu_ops`; VGG models and the
      score heads of the paper's FCNs).
    seed: with ``rngs=None``, parameters come from ``nnx.Rngs(params=seed, dropout=seed + 1)``.
    rngs: the RNG streams to use instead.
    classifier_options: a classifier's options of :func:`~fcnjax.models.fcn_classifier`
      (``pooling``, ``widths``, ``strides``, ``head_width``, ``dropout``, ``batch_norm``);
      ``aligned`` / ``ops`` apply to ``fcn_classifier-vgg16``.

  Raises ``ValueError`` for an unknown name (listing the known ones), an ``ops`` value, or a
  VGG-only option given to a ResNet model.
  """
  spec = get_spec(name)
  if rngs is None:
    rngs = nnx.Rngs(params=seed, dropout=seed + 1)
  if spec.family == "classifier":
    wrong = [f"{k}={v!r}" for k, v, default in (("pool", pool, "ceil"),
                                                 ("learnable_upsampling", learnable_upsampling,
                                                  False), ("batch_norm", batch_norm, False))
             if v != default]
    if wrong:
      raise ValueError(f"{', '.join(wrong)}: segmentation options; {name} is a classifier "
                       "(its BatchNorm is set by classifier_options)")
    options = dict(width_multiplier=width_multiplier, dtype=dtype, rngs=rngs,
                   **(classifier_options or {}))
    if name == "fcn_classifier-vgg16":
      options.update(aligned=aligned, ops=ops)
    return spec.constructor(num_classes, **options)
  if spec.family == "resnet":
    wrong = [f"{k}={v!r}" for k, v, default in (("aligned", aligned, False), ("pool", pool, "ceil"),
                                                 ("batch_norm", batch_norm, False)) if v != default]
    if wrong:
      raise ValueError(f"{', '.join(wrong)}: VGG options; {name} is a ResNet model (its "
                       "geometry needs no alignment and it always has BatchNorm)")
    options = dict(width_multiplier=width_multiplier, dtype=dtype, rngs=rngs)
    if not spec.is_segmenter:
      return spec.constructor(**options)
    if name.startswith("fcn_resnet"):
      options["aux"] = aux
    elif name.startswith("fcn") and "resnet" in name:
      options.update(learnable_upsampling=learnable_upsampling, ops=ops)
    return spec.constructor(num_classes, **options)
  options = dict(width_multiplier=width_multiplier, aligned=aligned, pool=pool,
                 batch_norm=batch_norm, dtype=dtype, ops=ops, rngs=rngs)
  if not spec.is_fcn:
    return spec.constructor(**options)
  return spec.constructor(num_classes, learnable_upsampling=learnable_upsampling, **options)
