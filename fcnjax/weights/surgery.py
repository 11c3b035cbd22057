"""Tensor layout conversions between PyTorch/Caffe and fcnjax (Flax NHWC / HWIO), and fc→conv surgery.

PyTorch (and Caffe) store

* ``Conv2d`` weights as ``(out, in, kh, kw)`` (cross-correlation, as Flax: no flip needed);
* ``Linear`` weights as ``(out, in_features)``; for VGG's ``classifier.0`` ``in_features`` is
  the pool5 map flattened by ``torch.flatten(x, 1)`` on NCHW, i.e. index ``c * kh * kw + h * kw + w``
  (C-major, then rows, then columns);
* ``ConvTranspose2d`` weights as ``(in, out, k, k)`` with scatter semantics
  ``out[s*i + a] += x[i] * W[:, :, a]``.

fcnjax stores convolution kernels as ``(kh, kw, in, out)`` (HWIO) and transposed-conv kernels as
``(k, k, in, out)`` with the same scatter semantics as torch (see
:func:`fcnjax.models.layers.transposed_conv`, which flips internally), so a torch transposed-conv
weight converts by a pure transposition, **no spatial flip**.

"Surgery" (the FCN paper's conversion of VGG16's fully connected layers to convolutions):
fc6 ``(4096, 25088)`` → reshape ``(4096, 512, 7, 7)`` → HWIO ``(7, 7, 512, 4096)``; fc7
``(4096, 4096)`` → ``(1, 1, 4096, 4096)``.
"""

from __future__ import annotations

import numpy as np


def conv_to_hwio(w: np.ndarray) -> np.ndarray:
  """Torch ``Conv2d`` weight ``(out, in, kh, kw)`` -> fcnjax kernel ``(kh, kw, in, out)``."""
  _check_ndim(w, 4, "conv weight (out, in, kh, kw)")
  return np.ascontiguousarray(np.transpose(w, (2, 3, 1, 0)))


def hwio_to_conv(k: np.ndarray) -> np.ndarray:
  """Inverse of :func:`conv_to_hwio`: ``(kh, kw, in, out)`` -> ``(out, in, kh, kw)``."""
  _check_ndim(k, 4, "HWIO kernel")
  return np.ascontiguousarray(np.transpose(k, (3, 2, 0, 1)))


def linear_to_hwio(w: np.ndarray, kh: int, kw: int) -> np.ndarray:
  """fc→conv surgery: torch ``Linear`` weight ``(out, in * kh * kw)`` -> ``(kh, kw, in, out)``.

  The input features must be a torch-flattened NCHW map (channel-major), as VGG's
  ``classifier.0`` sees pool5 through ``torch.flatten(x, 1)``.
  """
  _check_ndim(w, 2, "linear weight (out, in_features)")
  out, n = w.shape
  if n % (kh * kw):
    raise ValueError(f"linear in_features {n} is not a multiple of {kh}x{kw}")
  return conv_to_hwio(w.reshape(out, n // (kh * kw), kh, kw))


def hwio_to_linear(k: np.ndarray) -> np.ndarray:
  """Inverse of :func:`linear_to_hwio`: ``(kh, kw, in, out)`` -> ``(out, in * kh * kw)``."""
  w = hwio_to_conv(k)
  return w.reshape(w.shape[0], -1)


def deconv_to_hwio(w: np.ndarray) -> np.ndarray:
  """Torch ``ConvTranspose2d`` weight ``(in, out, k, k)`` -> fcnjax ``(k, k, in, out)`` (no flip)."""
  _check_ndim(w, 4, "transposed-conv weight (in, out, k, k)")
  return np.ascontiguousarray(np.transpose(w, (2, 3, 0, 1)))


def hwio_to_deconv(k: np.ndarray) -> np.ndarray:
  """Inverse of :func:`deconv_to_hwio`: ``(k, k, in, out)`` -> ``(in, out, k, k)``."""
  _check_ndim(k, 4, "transposed-conv kernel (k, k, in, out)")
  return np.ascontiguousarray(np.transpose(k, (2, 3, 0, 1)))


# Expected *source* shapes given the fcnjax parameter's shape (for error messages and checks).

def conv_shape(hwio: tuple) -> tuple:
  kh, kw, i, o = hwio
  return (o, i, kh, kw)


def linear_shape(hwio: tuple) -> tuple:
  kh, kw, i, o = hwio
  return (o, i * kh * kw)


def deconv_shape(hwio: tuple) -> tuple:
  k1, k2, i, o = hwio
  return (i, o, k1, k2)


def _check_ndim(x, ndim, what):
  if np.ndim(x) != ndim:
    raise ValueError(f"expected a {ndim}-D {what}, got shape {np.shape(x)}")
