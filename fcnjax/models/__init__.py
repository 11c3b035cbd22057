"""FCN models and their building blocks (Flax NNX, NHWC).

Named architectures come from one table, :mod:`fcnjax.models.registry`: ``build_model(name,
...)``, ``MODELS`` (segmentation model name -> constructor), ``CLASSIFIERS`` (the FCN classifiers of
:mod:`~fcnjax.models.classifier`), ``model_names()`` (name -> description). VGG16 FCNs (:mod:`~fcnjax.models.fcn`, :mod:`~fcnjax.models.vgg`) and ResNet
models (:mod:`~fcnjax.models.resnet`, :mod:`~fcnjax.models.resnet_fcn`).
"""

from fcnjax.models.classifier import (ConvStack, FCNClassifier, InputTooSmall, fcn_classifier,
                                      masked_global_pool, min_input_size)
from fcnjax.models.cpu_ops import OPS, resolve_ops
from fcnjax.models.fcn import FCN, count_params, fcn_vgg16
from fcnjax.models.geometry import CoordMap, compose, conv_map, crop_offset, deconv_map
from fcnjax.models.layers import (BilinearUpsample, ConvBlock, FixedKernel, ScoreHead,
                                  bilinear_kernel, conv_general_dilated_for, crop, fuse,
                                  max_pool_2x2, max_pool_2x2_cpu, max_pool_2x2_for,
                                  transposed_conv)
from fcnjax.models.registry import (CLASSIFIERS, MODELS, SPECS, ModelSpec, build_model, fcn2s,
                                    fcn4s, fcn8s, fcn8s_atonce, fcn16s, fcn32s, get_spec,
                                    model_names)
from fcnjax.models.resnet import PreActResNet, ResNet
from fcnjax.models.resnet_fcn import (D2LFCN, FCNHead, TorchvisionFCN, d2l_fcn_resnet18,
                                      d2l_fcn_resnet101v2, fcn_resnet, fcn_resnet50,
                                      fcn_resnet101, resize_bilinear)
from fcnjax.models.vgg import VGG, vgg16

__all__ = [
    "OPS", "resolve_ops", "FCN", "count_params", "fcn_vgg16", "CoordMap", "compose", "conv_map",
    "crop_offset", "deconv_map", "BilinearUpsample", "ConvBlock", "FixedKernel", "ScoreHead",
    "bilinear_kernel", "conv_general_dilated_for", "crop", "fuse", "max_pool_2x2",
    "max_pool_2x2_cpu", "max_pool_2x2_for", "transposed_conv", "MODELS", "SPECS", "ModelSpec",
    "build_model", "fcn2s", "fcn4s", "fcn8s", "fcn8s_atonce", "fcn16s", "fcn32s", "get_spec",
    "model_names", "VGG", "vgg16", "PreActResNet", "ResNet", "D2LFCN", "FCNHead",
    "TorchvisionFCN", "d2l_fcn_resnet18", "d2l_fcn_resnet101v2", "fcn_resnet", "fcn_resnet50",
    "fcn_resnet101", "resize_bilinear", "CLASSIFIERS", "ConvStack", "FCNClassifier",
    "InputTooSmall", "fcn_classifier", "masked_global_pool", "min_input_size",
]
