"""Input conventions of the weights fcnjax models are used with.

The Caffe reference FCN (and the Caffe VGG16 it starts from) expects **BGR, 0–255, minus the
per-channel mean** ``CAFFE_MEAN_BGR``. torchvision/timm VGG16 weights expect **RGB in [0, 1],
minus ``IMAGENET_MEAN_RGB``, divided by ``IMAGENET_STD_RGB``**. Keras' ResNet V2 ImageNet weights
(``keras.applications.resnet_v2.preprocess_input``, mode ``"tf"``) expect **RGB scaled to
[-1, 1]**: ``x / 127.5 - 1``. Images in fcnjax's data pipeline are
RGB uint8 (H, W, 3); these functions turn them into the float32 NHWC tensor a model expects.
"""

from __future__ import annotations

import dataclasses

import numpy as np

CAFFE_MEAN_BGR = np.array([104.00698793, 116.66876762, 122.67891434], np.float32)
IMAGENET_MEAN_RGB = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD_RGB = np.array([0.229, 0.224, 0.225], np.float32)


def caffe_preprocess(rgb_uint8):
  """RGB uint8 (..., H, W, 3) -> float32 BGR 0–255 minus ``CAFFE_MEAN_BGR`` (the FCN reference)."""
  x = np.asarray(rgb_uint8, np.float32)[..., ::-1]
  return x - CAFFE_MEAN_BGR


def caffe_deprocess(x):
  """Inverse of :func:`caffe_preprocess`: float32 BGR minus mean -> RGB uint8."""
  rgb = (np.asarray(x, np.float32) + CAFFE_MEAN_BGR)[..., ::-1]
  return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def torchvision_preprocess(rgb_uint8):
  """RGB uint8 (..., H, W, 3) -> float32 RGB, /255, ImageNet mean/std normalised (torchvision)."""
  x = np.asarray(rgb_uint8, np.float32) / 255.0
  return (x - IMAGENET_MEAN_RGB) / IMAGENET_STD_RGB


def keras_tf_preprocess(rgb_uint8):
  """RGB uint8 (..., H, W, 3) -> float32 RGB ``x / 127.5 - 1`` in [-1, 1] (Keras' mode ``"tf"``,
  the ResNet V2 ImageNet weights' convention)."""
  return np.asarray(rgb_uint8, np.float32) / np.float32(127.5) - np.float32(1.0)


@dataclasses.dataclass(frozen=True)
class Preprocessing:
  """A named input convention: ``fn`` maps RGB uint8 (..., H, W, 3) to the model's float32 input.

  ``pad_value_rgb`` is the RGB uint8 colour that ``fn`` maps (nearly) to zero, for padding.
  """

  name: str
  fn: callable
  pad_value_rgb: tuple

  def __call__(self, rgb_uint8):
    return self.fn(rgb_uint8)


CAFFE = Preprocessing("caffe-bgr-mean", caffe_preprocess,
                      tuple(int(round(v)) for v in CAFFE_MEAN_BGR[::-1]))
TORCHVISION = Preprocessing("torchvision-rgb-imagenet", torchvision_preprocess,
                            tuple(int(round(255 * v)) for v in IMAGENET_MEAN_RGB))
KERAS_TF = Preprocessing("keras-tf-rgb-pm1", keras_tf_preprocess, (128, 128, 128))
