"""FCN models and their building blocks (Flax NNX, NHWC)."""

from fcnjax.models.fcn import (FCN, MODELS, SKIPS_BY_STRIDE, count_params, fcn2s, fcn4s, fcn8s,
                               fcn8s_atonce, fcn16s, fcn32s, fcn_vgg16)
from fcnjax.models.geometry import CoordMap, compose, conv_map, crop_offset, deconv_map
from fcnjax.models.layers import (BilinearUpsample, ConvBlock, FixedKernel, ScoreHead,
                                  bilinear_kernel, crop, fuse, max_pool_2x2, transposed_conv)
from fcnjax.models.vgg import VGG, vgg16

__all__ = [
    "FCN", "MODELS", "SKIPS_BY_STRIDE", "count_params", "fcn2s", "fcn4s", "fcn8s", "fcn8s_atonce",
    "fcn16s", "fcn32s", "fcn_vgg16", "CoordMap", "compose", "conv_map", "crop_offset",
    "deconv_map", "BilinearUpsample", "ConvBlock", "FixedKernel", "ScoreHead", "bilinear_kernel",
    "crop", "fuse", "max_pool_2x2", "transposed_conv", "VGG", "vgg16",
]
