"""CPU-friendly versions of ops whose XLA:CPU gradients are slow, with custom VJPs.

Which implementation a model uses is a constructor choice, ``ops``: ``"cpu"`` (these ops),
``"lax"`` (XLA's native ops) or ``"auto"`` (``"cpu"`` when JAX's default backend is the CPU,
else ``"lax"``, so GPUs and TPUs keep XLA's native kernels), resolved once by
:func:`resolve_ops` when the module is built and stored on it
(:func:`fcnjax.models.layers.conv_general_dilated_for` and
:func:`fcnjax.models.layers.max_pool_2x2_for` pick the functions the layers store). Nothing
here reads the environment. Each op computes the same numbers as the plain ``lax`` op it
replaces (tested in ``tests/test_models_fast_ops.py``).

* :func:`max_pool_2x2` — 2×2/2 max-pool as a reshape + max; its backward is an elementwise mask
  instead of XLA's select-and-scatter, which is slow on XLA:CPU. Ties go to the first maximal
  element of the window in row-major order (top-left, top-right, bottom-left, bottom-right),
  which is exactly what ``jax.grad`` of ``lax.reduce_window(max)`` does; each window passes its
  whole gradient to exactly one element, so the result is a valid subgradient.

* :func:`conv_general_dilated` — a drop-in for ``lax.conv_general_dilated`` (``nnx.Conv``'s
  ``conv_general_dilated=`` argument). Stride-1 NHWC/HWIO convolutions whose kernel is not 3×3
  (fc6's 7×7, fc7's and the score layers' 1×1) get a custom VJP whose input gradient is one
  matrix product plus a col2im (:func:`input_grad`). XLA:CPU lowers fc6's input gradient with
  the cotangent as the window, which is slow (far slower than the matrix product, and than
  PyTorch); writing it as a forward convolution does not help, as XLA rewrites it to the same
  swapped form. 3×3 convolutions keep XLA's native input gradient, which is faster than the
  matrix-product form. The weight gradient is always XLA's own. Other convolutions (strides,
  dilations, groups, other layouts) go to ``lax.conv_general_dilated`` unchanged.

The measurements behind each choice are in ``benchmarks/RESULTS.md`` ("Why the CPU ops exist").

Speed on XLA:CPU also depends on a flag, which only users can set (before JAX starts):
``XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=-individual_convolution`` sends convolutions
to XLA's Eigen kernels instead of YNNPACK, whose weight-gradient convolutions are slower.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

#: The values of every ``ops`` argument: these CPU ops, XLA's native ops, or by backend.
OPS = ("auto", "cpu", "lax")


def resolve_ops(ops: str) -> str:
  """``"cpu"`` or ``"lax"`` for an ``ops`` argument; ``"auto"`` picks by JAX's default backend.

  Raises ``ValueError`` for anything but the values in :data:`OPS`.
  """
  if ops not in OPS:
    raise ValueError(f"ops must be one of {OPS}, got {ops!r}")
  if ops == "auto":
    return "cpu" if jax.default_backend() == "cpu" else "lax"
  return ops


def _windows(x: jax.Array, rounding: str) -> jax.Array:
  """(N, H, W, C) -> (N, H2, 2, W2, 2, C): ceil pads −inf at the bottom/right, floor crops."""
  n, h, w, c = x.shape
  if rounding == "ceil":
    x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), constant_values=-jnp.inf)
  else:
    x = x[:, :h - h % 2, :w - w % 2, :]
  return x.reshape(n, x.shape[1] // 2, 2, x.shape[2] // 2, 2, c)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def max_pool_2x2(x: jax.Array, rounding: str = "ceil") -> jax.Array:
  """2×2/2 max-pool of NHWC float ``x``, ``rounding`` "ceil" (Caffe) or "floor"."""
  return jax.lax.reduce_max(_windows(x, rounding), axes=(2, 4))


def _pool_fwd(x, rounding):
  y = max_pool_2x2(x, rounding)
  return y, (x, y)


def _pool_bwd(rounding, res, g):
  x, y = res
  n, h, w, c = x.shape
  xw = _windows(x, rounding)
  a, b = xw[:, :, 0, :, 0], xw[:, :, 0, :, 1]
  cc = xw[:, :, 1, :, 0]
  ma = a == y
  mb = (b == y) & ~ma
  mc = (cc == y) & ~(ma | mb)
  md = ~(ma | mb | mc)                       # the last element takes it if no earlier one did
  mask = jnp.stack([jnp.stack([ma, mb], axis=3), jnp.stack([mc, md], axis=3)], axis=2)
  gx = jnp.where(mask, g[:, :, None, :, None, :], jnp.zeros((), g.dtype))
  gx = gx.reshape(n, 2 * y.shape[1], 2 * y.shape[2], c)
  if rounding == "ceil":
    gx = gx[:, :h, :w, :]
  else:
    gx = jnp.pad(gx, ((0, 0), (0, h - gx.shape[1]), (0, w - gx.shape[2]), (0, 0)))
  return (gx,)


max_pool_2x2.defvjp(_pool_fwd, _pool_bwd)


_NHWC = ("NHWC", "HWIO", "NHWC")


def _explicit_pads(padding, lhs_shape, rhs_shape):
  """``padding`` (a string or pairs) as ((top, bottom), (left, right)) ints, or None."""
  if isinstance(padding, str):
    return tuple(jax.lax.padtype_to_pads(lhs_shape[1:3], rhs_shape[0:2], (1, 1), padding))
  pads = tuple(tuple(int(v) for v in pair) for pair in padding)
  return pads if len(pads) == 2 and all(len(pair) == 2 for pair in pads) else None


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                         precision=None, preferred_element_type=None, **kwargs):
  """``lax.conv_general_dilated``, routed to :func:`conv2d` where that applies (see module doc).

  :func:`conv2d` is used when the convolution is 2-D, stride 1, undilated, ungrouped,
  NHWC/HWIO/NHWC, floating point, with a kernel other than 3×3 and no
  ``preferred_element_type`` or sharding argument; anything else is passed to
  ``lax.conv_general_dilated`` as given.
  """
  plain = functools.partial(
      jax.lax.conv_general_dilated, lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
      rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count, batch_group_count=batch_group_count,
      precision=precision, preferred_element_type=preferred_element_type, **kwargs)
  if (lhs.ndim != 4 or rhs.ndim != 4 or preferred_element_type is not None
      or any(v is not None for v in kwargs.values())
      or feature_group_count != 1 or batch_group_count != 1
      or tuple(window_strides) != (1, 1)
      or (lhs_dilation is not None and tuple(lhs_dilation) != (1, 1))
      or (rhs_dilation is not None and tuple(rhs_dilation) != (1, 1))
      or not jnp.issubdtype(lhs.dtype, jnp.floating) or lhs.dtype != rhs.dtype):
    return plain()
  dn = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  if dn != jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC):
    return plain()
  if rhs.shape[:2] == (3, 3):
    return plain()  # XLA's native input gradient is the fast one for 3×3 (module doc)
  pads = _explicit_pads(padding, lhs.shape, rhs.shape)
  if pads is None:
    return plain()
  return conv2d(lhs, rhs, pads, precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv2d(x: jax.Array, kernel: jax.Array, pads, precision=None) -> jax.Array:
  """Stride-1 2-D convolution, NHWC ``x`` (N, H, W, Cin) * HWIO ``kernel`` (kh, kw, Cin, Cout).

  ``pads`` = ((top, bottom), (left, right)) in pixels. Output (N, H + top + bottom - kh + 1,
  W + left + right - kw + 1, Cout). Same numbers as ``lax.conv_general_dilated``; the input
  gradient is :func:`input_grad`, the weight gradient XLA's own.
  """
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), pads, dimension_numbers=_NHWC,
                                      precision=precision)


def _conv_fwd(x, kernel, pads, precision):
  return conv2d(x, kernel, pads, precision), (x, kernel)


def input_grad(g: jax.Array, kernel: jax.Array, pads, precision=None) -> jax.Array:
  """d(conv2d)/dx applied to the cotangent ``g`` (N, H', W', Cout) -> (N, H, W, Cin).

  One matrix product and a col2im: ``cols = g @ kernelᵀ`` gives, for every output pixel, its
  contribution to each of the kh·kw input pixels it read, (N, H', W', kh, kw, Cin); each tap's
  slab is then added into the padded input grid at its offset, and the padding cropped off.
  """
  n, ho, wo, cout = g.shape
  kh, kw, cin, _ = kernel.shape
  (pt, pb), (pl, pr) = pads
  cols = jnp.dot(g.reshape(n * ho * wo, cout), kernel.reshape(kh * kw * cin, cout).T,
                 precision=precision).reshape(n, ho, wo, kh, kw, cin)
  hp, wp = ho + kh - 1, wo + kw - 1                     # the padded input's size
  dx = jnp.zeros((n, hp, wp, cin), g.dtype)
  for a in range(kh):
    for b in range(kw):
      dx = dx.at[:, a:a + ho, b:b + wo, :].add(cols[:, :, :, a, b, :])
  return dx[:, pt:hp - pb, pl:wp - pr, :]


def _conv_bwd(pads, precision, res, g):
  x, kernel = res
  dx = input_grad(g, kernel, pads, precision).astype(x.dtype)
  _, kernel_vjp = jax.vjp(
      lambda k: jax.lax.conv_general_dilated(x, k, (1, 1), pads, dimension_numbers=_NHWC,
                                             precision=precision), kernel)
  (dk,) = kernel_vjp(g)
  return dx, dk


conv2d.defvjp(_conv_fwd, _conv_bwd)
