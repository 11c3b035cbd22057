"""CPU-friendly versions of ops whose XLA:CPU gradients are slow, with custom VJPs.

Used by :mod:`fcnjax.models.layers` when :func:`enabled` (by default: JAX's default backend is
the CPU), so GPUs and TPUs keep XLA's native kernels. Each op computes the same numbers as the
plain ``lax`` op it replaces (tested in ``tests/test_models_fast_ops.py``).

* :func:`max_pool_2x2` — 2×2/2 max-pool as a reshape + max; its backward is an elementwise mask
  instead of XLA's select-and-scatter (pool1 of FCN-8s at 500×375: ~390 ms on 2 cores). Ties go
  to the first maximal element of the window in row-major order (top-left, top-right,
  bottom-left, bottom-right), which is exactly what ``jax.grad`` of ``lax.reduce_window(max)``
  does; each window passes its whole gradient to exactly one element, so the result is a valid
  subgradient.

Override the automatic choice with the environment variable ``FCNJAX_CPU_OPS=0`` / ``1`` (read
at trace time) or :func:`set_enabled`.

Speed on XLA:CPU also depends on a flag, which only users can set (before JAX starts):
``XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=-individual_convolution`` sends convolutions
to XLA's Eigen kernels instead of YNNPACK, whose weight-gradient convolutions run 2-3× slower.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp

_OVERRIDE: bool | None = None


def set_enabled(value: bool | None) -> None:
  """Force the CPU ops on (True) or off (False); None restores the automatic choice."""
  global _OVERRIDE
  _OVERRIDE = value


def enabled() -> bool:
  """Whether layers should use these ops: the override, else ``FCNJAX_CPU_OPS``, else CPU."""
  if _OVERRIDE is not None:
    return _OVERRIDE
  env = os.environ.get("FCNJAX_CPU_OPS", "").strip().lower()
  if env in ("0", "false", "no", "off"):
    return False
  if env in ("1", "true", "yes", "on"):
    return True
  return jax.default_backend() == "cpu"


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
