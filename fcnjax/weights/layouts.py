"""Key layouts of weight files and how each maps onto an fcnjax model.

A *layout* is a naming scheme for a flat ``{key: tensor}`` file. For a given model, a layout is
expanded into a list of :class:`Rule` s, one per tensor: which file key (``src``) fills which
fcnjax parameter (``dst``, a dotted path such as ``backbone.blocks.0.convs.0.kernel``) through
which conversion (``kind``, see :mod:`fcnjax.weights.surgery`).

Layouts:

``torchvision-vgg16``
  torchvision/timm ``VGG`` (``features.N.weight/bias`` with convs at N = 0, 2, 5, 7, 10, 12, 14,
  17, 19, 21, 24, 26, 28; ``classifier.0`` = fc6 as ``(4096, 512*7*7)``, ``classifier.3`` = fc7 as
  ``(4096, 4096)``, ``classifier.6`` = the ImageNet fc8, dropped). pytorch-fcn's
  ``vgg16_from_caffe.pth`` uses these keys too (but Caffe preprocessing).
``pytorch-fcn``
  wkentaro/pytorch-fcn's named modules: ``conv1_1`` … ``conv5_3``, ``fc6`` ``(4096, 512, 7, 7)``
  (a ``(4096, 25088)`` linear form is accepted too), ``fc7``, ``score_fr``, ``score_pool4``,
  ``score_pool3`` ``(C, in, 1, 1)``; transposed convs ``(C, C, k, k)``, no bias: ``upscore``
  (FCN-32s, k64), ``upscore2`` + ``upscore16`` (FCN-16s), ``upscore2`` + ``upscore_pool4`` +
  ``upscore8`` (FCN-8s and at-once FCN-8s).
``torchvision-resnet``
  torchvision's ImageNet ResNet (``conv1.weight``, ``bn1.{weight,bias,running_mean,
  running_var}``, ``layer1.0.conv1.weight``, …, ``layerN.0.downsample.{0,1}.*``; ``fc.*``
  dropped, ``*.num_batches_tracked`` ignored) into a ResNet backbone or the backbone of any
  fcnjax ResNet model (the d2l FCN, torchvision's FCN-ResNet, FCN-8s on ResNet). BatchNorm
  ``weight`` / ``bias`` / ``running_mean`` / ``running_var`` become ``scale`` / ``bias`` /
  ``mean`` / ``var``.
``torchvision-fcn-resnet``
  torchvision's ``segmentation.fcn_resnet50/101`` (``backbone.*`` as above, ``classifier.{0,1,4}``
  = the FCNHead's 3×3 conv, BN and 1×1 conv, ``aux_classifier.*`` likewise; an aux head in the
  file is ignored, and reported, when the model has none).
``keras-resnet-v2``
  Keras' ``ResNet50V2`` / ``ResNet101V2`` / ``ResNet152V2`` (``keras.applications``; the ImageNet
  ``*_weights_tf_dim_ordering_tf_kernels_notop.h5`` files): ``conv1_conv/{kernel,bias}``,
  ``conv{s}_block{b}_preact_bn``, ``_1_conv`` / ``_1_bn``, ``_2_conv`` / ``_2_bn``,
  ``_3_conv`` (with bias), ``_0_conv`` (the shortcut, with bias), ``post_bn``; stage ``s`` = 2..5
  is fcnjax's ``layer{s-1}``; BatchNorm ``gamma`` / ``beta`` / ``moving_mean`` /
  ``moving_variance`` become ``scale`` / ``bias`` / ``mean`` / ``var``; kernels are HWIO as
  fcnjax's. The top (``predictions/*``) is dropped. Into a pre-activation ResNet backbone or
  the d2l TF2 FCN's.
``fcnjax``
  fcnjax's own: the model's parameter paths, fcnjax shapes (HWIO), written by
  :func:`fcnjax.weights.save` with metadata.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Iterable, Mapping

import numpy as np
from flax import nnx

from fcnjax.models import registry
from fcnjax.models import resnet as resnet_lib
from fcnjax.models.vgg import VGG
from fcnjax.weights.errors import LayoutError

TORCHVISION_VGG16 = "torchvision-vgg16"
PYTORCH_FCN = "pytorch-fcn"
TORCHVISION_RESNET = "torchvision-resnet"
TORCHVISION_FCN_RESNET = "torchvision-fcn-resnet"
KERAS_RESNET_V2 = "keras-resnet-v2"
FCNJAX = "fcnjax"
LAYOUTS = (TORCHVISION_VGG16, PYTORCH_FCN, TORCHVISION_RESNET, TORCHVISION_FCN_RESNET,
           KERAS_RESNET_V2, FCNJAX)

# Rule kinds: how a file tensor becomes the fcnjax parameter.
IDENTITY = "identity"        # same array (biases; fcnjax files)
CONV = "conv"                # (out, in, kh, kw) -> (kh, kw, in, out)
LINEAR = "linear"            # (out, in*kh*kw) -> (kh, kw, in, out): fc->conv surgery
CONV_OR_LINEAR = "conv-or-linear"  # either of the two, by the file tensor's rank
DECONV = "deconv"            # (in, out, k, k) -> (k, k, in, out), no flip
BILINEAR_DECONV = "bilinear-deconv"  # torch-layout kernel only checked to be bilinear
BILINEAR_HWIO = "bilinear-hwio"      # fcnjax-layout kernel only checked to be bilinear

# Rule groups: backbone (conv1_1 … fc7, or a ResNet), score_fr (the layer whose output count is
# the class count: also a ResNet model's final classifier conv), skip score heads, upsampling
# kernels, and the other head layers of ResNet models (an FCNHead's 3x3 conv / BN, the aux head).
BACKBONE, SCORE_FR, SKIP, UPSCORE, HEAD = "backbone", "score_fr", "skip", "upscore", "head"
HEAD_GROUPS = (SCORE_FR, SKIP, UPSCORE, HEAD)


@dataclasses.dataclass(frozen=True)
class Rule:
  """One file tensor ``src`` -> fcnjax parameter ``dst`` (``None``: only checked) via ``kind``."""

  src: str
  dst: str | None
  kind: str
  group: str
  factor: int = 0          # upsampling factor (bilinear checks)
  optional: bool = False   # absent from the file: keep the model's initial value


# ---------------------------------------------------------------------------------------------
# Model introspection


def backbone_of(model: nnx.Module) -> VGG:
  """The VGG backbone of an FCN (``model.backbone``), or ``model`` itself if it is a VGG."""
  if isinstance(model, VGG):
    return model
  bb = getattr(model, "backbone", None)
  if not isinstance(bb, VGG):
    raise LayoutError(f"expected an fcnjax FCN with a VGG backbone, or a VGG; got "
                      f"{type(model).__name__}")
  return bb


def is_backbone(model: nnx.Module) -> bool:
  """A bare backbone (VGG or ResNet), not a segmentation model."""
  return isinstance(model, (VGG, resnet_lib.ResNet, resnet_lib.PreActResNet))


def is_fcn(model: nnx.Module) -> bool:
  """A segmentation model (it has score layers and ``num_classes``), not a bare backbone."""
  return not is_backbone(model)


def resnet_of(model: nnx.Module):
  """The ResNet backbone of a ResNet model, or ``model`` itself if it is one; ``None`` for a
  VGG model."""
  if isinstance(model, (resnet_lib.ResNet, resnet_lib.PreActResNet)):
    return model
  bb = getattr(model, "backbone", None)
  return bb if isinstance(bb, (resnet_lib.ResNet, resnet_lib.PreActResNet)) else None


def _key(path) -> str:
  return ".".join(str(p) for p in path)


def flat_variables(model: nnx.Module, types=(nnx.Param, nnx.BatchStat)) -> dict[str, nnx.Variable]:
  """``{canonical key: Variable}``; keys are FCN-relative (a bare VGG's get a ``backbone.`` prefix)."""
  prefix = "backbone." if is_backbone(model) else ""
  out = {}
  for path, var in nnx.graph.iter_graph(model):
    if isinstance(var, nnx.Variable) and isinstance(var, tuple(types)):
      out[prefix + _key(path)] = var
  return out


def upsamplers(model) -> list[tuple[str, object]]:
  """``[(fcnjax module path, BilinearUpsample)]`` of an FCN, coarse to fine, final last."""
  ups = [(f"upscore_skips.{i}", u) for i, u in enumerate(model.upscore_skips)]
  return ups + [("upscore_final", model.upscore_final)]


def pytorch_fcn_upscore_names(model) -> list[str]:
  """pytorch-fcn's names for the model's upsampling layers, in :func:`upsamplers` order."""
  skips = tuple(model.skips)
  spec = registry.spec_for_fcn(skips, scaled=False)
  if spec is None or spec.pytorch_fcn_upscore is None:
    raise LayoutError(f"pytorch-fcn has no model with skips {skips} (only FCN-32s/16s/8s)")
  return list(spec.pytorch_fcn_upscore)


def pytorch_fcn_upscore_keys() -> list[str]:
  """Every upsampling kernel key of pytorch-fcn's FCNs (``upscore.weight``, ...), no repeats."""
  names = [n for spec in registry.SPECS.values() for n in spec.pytorch_fcn_upscore or ()]
  return [f"{n}.weight" for n in dict.fromkeys(names)]


# ---------------------------------------------------------------------------------------------
# Rules per layout


def _conv_rules(bb: VGG, name_of) -> list[Rule]:
  if bb.blocks[0].norms is not None:
    raise LayoutError("batch-normalised VGG backbones are not supported by these layouts")
  rules = []
  for b, block in enumerate(bb.blocks):
    for i in range(len(block.convs)):
      src, kind = name_of(b, i)
      dst = f"backbone.blocks.{b}.convs.{i}"
      rules += [Rule(f"{src}.weight", f"{dst}.kernel", kind, BACKBONE),
                Rule(f"{src}.bias", f"{dst}.bias", IDENTITY, BACKBONE)]
  return rules


def torchvision_vgg16_rules(model) -> list[Rule]:
  """Rules for torchvision's VGG16 keys; fc6/fc7 by surgery from ``classifier.0`` / ``.3``."""
  bb = backbone_of(model)
  index = {}
  n = 0
  for b, block in enumerate(bb.blocks):
    for i in range(len(block.convs)):
      index[b, i] = n
      n += 2  # Conv2d, ReLU
    n += 1    # MaxPool2d
  rules = _conv_rules(bb, lambda b, i: (f"features.{index[b, i]}", CONV))
  for src, dst in (("classifier.0", "fc6"), ("classifier.3", "fc7")):
    rules += [Rule(f"{src}.weight", f"backbone.{dst}.kernel", LINEAR, BACKBONE),
              Rule(f"{src}.bias", f"backbone.{dst}.bias", IDENTITY, BACKBONE)]
  return rules


TORCHVISION_IGNORED = ("classifier.6.weight", "classifier.6.bias")  # ImageNet fc8 (1000 classes)


def pytorch_fcn_rules(model) -> list[Rule]:
  """Rules for pytorch-fcn's named keys (VGG part always; score/upscore layers for an FCN)."""
  bb = backbone_of(model)
  rules = _conv_rules(bb, lambda b, i: (f"conv{b + 1}_{i + 1}", CONV))
  for name in ("fc6", "fc7"):
    rules += [Rule(f"{name}.weight", f"backbone.{name}.kernel", CONV_OR_LINEAR, BACKBONE),
              Rule(f"{name}.bias", f"backbone.{name}.bias", IDENTITY, BACKBONE)]
  if not is_fcn(model):
    return rules
  rules += [Rule("score_fr.weight", "score_fr.conv.kernel", CONV, SCORE_FR),
            Rule("score_fr.bias", "score_fr.conv.bias", IDENTITY, SCORE_FR)]
  for i, stage in enumerate(model.skips):
    rules += [Rule(f"score_{stage}.weight", f"score_skips.{i}.conv.kernel", CONV, SKIP),
              Rule(f"score_{stage}.bias", f"score_skips.{i}.conv.bias", IDENTITY, SKIP)]
  for (path, up), name in zip(upsamplers(model), pytorch_fcn_upscore_names(model)):
    if up.learnable:
      rules.append(Rule(f"{name}.weight", f"{path}.kernel", DECONV, UPSCORE))
    else:
      rules.append(Rule(f"{name}.weight", None, BILINEAR_DECONV, UPSCORE, factor=up.factor))
  return rules


def group_of_fcnjax_key(key: str) -> str:
  if key.startswith("backbone."):
    return BACKBONE
  if key.startswith(("score_fr.", "classifier.classifier.", "final_conv.")):
    return SCORE_FR
  if key.startswith("score_skips."):
    return SKIP
  if key.startswith(("classifier.", "aux_classifier.")):
    return HEAD
  return UPSCORE


# -- torchvision ResNets ------------------------------------------------------------------------
_BN = (("weight", "scale"), ("bias", "bias"), ("running_mean", "mean"), ("running_var", "var"))


def _bn_rules(src: str, dst: str, group: str) -> list[Rule]:
  return [Rule(f"{src}.{a}", f"{dst}.{b}", IDENTITY, group) for a, b in _BN]


def torchvision_resnet_rules(model, prefix: str = "") -> list[Rule]:
  """Rules for torchvision's ResNet keys (``prefix`` ``"backbone."`` inside a segmentation
  state dict) onto the model's ResNet backbone."""
  bb = resnet_of(model)
  if not isinstance(bb, resnet_lib.ResNet):
    raise LayoutError(f"the torchvision ResNet layouts need a model with a torchvision-"
                      f"structured ResNet backbone; got {type(model).__name__}")
  rules = [Rule(f"{prefix}conv1.weight", "backbone.conv1.kernel", CONV, BACKBONE),
           *_bn_rules(f"{prefix}bn1", "backbone.bn1", BACKBONE)]
  for i, stage in enumerate(bb.stages()):
    for j, block in enumerate(stage):
      src, dst = f"{prefix}layer{i + 1}.{j}", f"backbone.layer{i + 1}.{j}"
      n = 3 if isinstance(block, resnet_lib.Bottleneck) else 2
      for c in range(1, n + 1):
        rules += [Rule(f"{src}.conv{c}.weight", f"{dst}.conv{c}.kernel", CONV, BACKBONE),
                  *_bn_rules(f"{src}.bn{c}", f"{dst}.bn{c}", BACKBONE)]
      if block.downsample is not None:
        rules += [Rule(f"{src}.downsample.0.weight", f"{dst}.downsample.0.kernel", CONV,
                       BACKBONE),
                  *_bn_rules(f"{src}.downsample.1", f"{dst}.downsample.1", BACKBONE)]
  return rules


def _fcn_head_rules(src: str, dst: str, final_group: str) -> list[Rule]:
  return [Rule(f"{src}.0.weight", f"{dst}.conv.kernel", CONV, HEAD),
          *_bn_rules(f"{src}.1", f"{dst}.bn", HEAD),
          Rule(f"{src}.4.weight", f"{dst}.classifier.kernel", CONV, final_group),
          Rule(f"{src}.4.bias", f"{dst}.classifier.bias", IDENTITY, final_group)]


def torchvision_fcn_resnet_rules(model) -> list[Rule]:
  """Rules for torchvision's ``fcn_resnet50/101`` state dicts (backbone, classifier, aux)."""
  from fcnjax.models.resnet_fcn import TorchvisionFCN
  rules = torchvision_resnet_rules(model, prefix="backbone.")
  if isinstance(model, TorchvisionFCN):
    rules += _fcn_head_rules("classifier", "classifier", SCORE_FR)
    if model.aux_classifier is not None:
      rules += _fcn_head_rules("aux_classifier", "aux_classifier", HEAD)
  return rules


def torchvision_ignored(file_keys: Iterable[str], layout: str, model) -> tuple[str, ...]:
  """File keys a torchvision ResNet layout drops on purpose: ``num_batches_tracked``, the
  ImageNet ``fc``, and an aux head the model does not have."""
  from fcnjax.models.resnet_fcn import TorchvisionFCN
  aux = isinstance(model, TorchvisionFCN) and model.aux_classifier is not None
  out = []
  for k in file_keys:
    if (k.endswith("num_batches_tracked") or k in ("fc.weight", "fc.bias")
        or (k.startswith("aux_classifier.") and not aux)):
      out.append(k)
  return tuple(out)


# -- Keras' pre-activation ResNets (V2) ---------------------------------------------------------
_KERAS_BN = (("gamma", "scale"), ("beta", "bias"), ("moving_mean", "mean"),
             ("moving_variance", "var"))


def _keras_bn_rules(src: str, dst: str) -> list[Rule]:
  return [Rule(f"{src}/{a}", f"{dst}.{b}", IDENTITY, BACKBONE) for a, b in _KERAS_BN]


def _keras_conv_rules(src: str, dst: str, bias: bool) -> list[Rule]:
  rules = [Rule(f"{src}/kernel", f"{dst}.kernel", IDENTITY, BACKBONE)]
  return rules + ([Rule(f"{src}/bias", f"{dst}.bias", IDENTITY, BACKBONE)] if bias else [])


def keras_resnet_v2_rules(model) -> list[Rule]:
  """Rules for Keras' layer names of ``ResNet{50,101,152}V2`` onto the model's
  :class:`~fcnjax.models.resnet.PreActResNet` backbone."""
  bb = resnet_of(model)
  if not isinstance(bb, resnet_lib.PreActResNet):
    raise LayoutError(f"the keras-resnet-v2 layout needs a model with a pre-activation ResNet "
                      f"(V2) backbone (resnet101v2, d2l_fcn_resnet101v2); got "
                      f"{type(bb or model).__name__}")
  rules = _keras_conv_rules("conv1_conv", "backbone.conv1", True)
  for i, stage in enumerate(bb.stages()):
    for j, block in enumerate(stage):
      src, dst = f"conv{i + 2}_block{j + 1}", f"backbone.layer{i + 1}.{j}"
      rules += _keras_bn_rules(f"{src}_preact_bn", f"{dst}.preact_bn")
      if block.shortcut is not None:
        rules += _keras_conv_rules(f"{src}_0_conv", f"{dst}.shortcut", True)
      for c in (1, 2):
        rules += [*_keras_conv_rules(f"{src}_{c}_conv", f"{dst}.conv{c}", False),
                  *_keras_bn_rules(f"{src}_{c}_bn", f"{dst}.bn{c}")]
      rules += _keras_conv_rules(f"{src}_3_conv", f"{dst}.conv3", True)
  return rules + _keras_bn_rules("post_bn", "backbone.post_bn")


def keras_ignored(file_keys: Iterable[str]) -> tuple[str, ...]:
  """File keys the Keras layout drops on purpose: the ImageNet top (``predictions/*``)."""
  return tuple(k for k in file_keys if k.startswith("predictions/"))


def fcnjax_rules(model, file_keys: Iterable[str] = ()) -> list[Rule]:
  """Rules for fcnjax files: identity per parameter.

  Fixed (non-learnable) upsamplers have no parameter: a kernel in the file for them is only
  checked to be bilinear. A file without any ``upscore`` key was saved from a fixed-upsampling
  model, i.e. its kernels *are* bilinear: a learnable model keeps its bilinear initialisation.
  """
  file_keys = set(file_keys)
  file_has_upscore = any(k.startswith("upscore") for k in file_keys)
  rules = []
  for key in flat_variables(model):
    group = group_of_fcnjax_key(key)
    rules.append(Rule(key, key, IDENTITY, group,
                      optional=(group == UPSCORE and not file_has_upscore)))
  if is_fcn(model) and hasattr(model, "upscore_final"):
    for path, up in upsamplers(model):
      if not up.learnable:
        rules.append(Rule(f"{path}.kernel", None, BILINEAR_HWIO, UPSCORE, factor=up.factor,
                          optional=True))
  return rules


def rules_for(layout: str, model, file_keys: Iterable[str] = ()) -> tuple[list[Rule], tuple[str, ...]]:
  """``(rules, ignored file keys)`` mapping a ``layout`` file onto ``model``."""
  if layout == TORCHVISION_VGG16:
    return torchvision_vgg16_rules(model), TORCHVISION_IGNORED
  if layout == PYTORCH_FCN:
    if any(k.startswith("features.") for k in file_keys):  # pytorch-fcn's vgg16_from_caffe.pth
      return torchvision_vgg16_rules(model), TORCHVISION_IGNORED
    return pytorch_fcn_rules(model), ()
  if layout == TORCHVISION_RESNET:
    return torchvision_resnet_rules(model), torchvision_ignored(file_keys, layout, model)
  if layout == TORCHVISION_FCN_RESNET:
    return torchvision_fcn_resnet_rules(model), torchvision_ignored(file_keys, layout, model)
  if layout == KERAS_RESNET_V2:
    return keras_resnet_v2_rules(model), keras_ignored(file_keys)
  if layout == FCNJAX:
    return fcnjax_rules(model, file_keys), ()
  raise LayoutError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")


# ---------------------------------------------------------------------------------------------
# Inference from a file's keys


def infer_layout(keys: Iterable[str], metadata: Mapping[str, str] | None = None) -> str:
  """The layout of a file from its keys (and fcnjax metadata)."""
  keys = set(keys)
  fcnjax_file = (metadata or {}).get("format") == FCNJAX
  if not fcnjax_file and "backbone.conv1.weight" in keys:
    return TORCHVISION_FCN_RESNET
  if not fcnjax_file and "conv1.weight" in keys and any(k.startswith("layer1.") for k in keys):
    return TORCHVISION_RESNET
  if not fcnjax_file and "conv1_conv/kernel" in keys and "post_bn/gamma" in keys:
    return KERAS_RESNET_V2
  if fcnjax_file or any(k.startswith("backbone.") for k in keys):
    return FCNJAX
  if any(k.startswith("features.") for k in keys):
    return TORCHVISION_VGG16
  if "conv1_1.weight" in keys or "score_fr.weight" in keys:
    return PYTORCH_FCN
  sample = ", ".join(sorted(keys)[:6])
  raise LayoutError(f"cannot infer the weight layout from keys ({sample}, ...); expected "
                    f"torchvision VGG16 (features.N...), pytorch-fcn (conv1_1..., score_fr...), "
                    "a torchvision ResNet (conv1, layer1.0...) or FCN-ResNet (backbone.conv1..., "
                    "classifier...), a Keras ResNet V2 (conv1_conv/kernel, post_bn/gamma...) or "
                    "an fcnjax file (backbone....)")


def infer_pytorch_fcn_model(keys: Iterable[str], path=None) -> str:
  """fcnjax model name for a pytorch-fcn file: from its upscore keys; ``vgg16`` if it has none.

  The final upsampling layer's key names the model (``upscore8`` FCN-8s, ``upscore16`` FCN-16s,
  ``upscore`` FCN-32s; the finest model wins). FCN-8s and at-once FCN-8s have the same keys; a
  file name containing ``atonce`` (pytorch-fcn's ``fcn8s-atonce_from_caffe.pth``) selects the
  latter, otherwise name the model explicitly.
  """
  keys = set(keys)
  specs = sorted((s for s in registry.SPECS.values() if s.pytorch_fcn_upscore is not None),
                 key=lambda s: -len(s.skips))  # stable: a plain variant before its scaled one
  found = [s for s in specs if f"{s.pytorch_fcn_upscore[-1]}.weight" in keys]
  if found:
    same = [s for s in found if s.pytorch_fcn_upscore == found[0].pytorch_fcn_upscore]
    name = os.path.basename(os.fspath(path)).lower() if path is not None else ""
    name = name.replace("-", "").replace("_", "")
    tagged = [s for s in same[1:] if s.name.split("-", 1)[-1] in name]
    return (tagged or same)[0].name
  if "score_fr.weight" in keys:
    finals = "/".join(dict.fromkeys(s.pytorch_fcn_upscore[-1] for s in reversed(specs)))
    raise LayoutError(f"pytorch-fcn file has score_fr but no {finals} kernel")
  return registry.BACKBONE


def width_multiplier_of(conv1_out_channels: int) -> float:
  """VGG16 width multiplier from conv1_1's output channels (64 at full width)."""
  return conv1_out_channels / 64.0


def is_bilinear_deconv(w: np.ndarray, atol: float) -> bool:
  """Whether a torch-layout ``(C, C, k, k)`` kernel is the diagonal bilinear kernel."""
  from fcnjax.models.layers import bilinear_kernel
  from fcnjax.weights.surgery import hwio_to_deconv
  if w.ndim != 4 or w.shape[0] != w.shape[1] or w.shape[2] != w.shape[3] or w.shape[2] % 2:
    return False
  ref = hwio_to_deconv(bilinear_kernel(w.shape[2] // 2, w.shape[0]))
  return float(np.max(np.abs(w - ref))) <= atol
