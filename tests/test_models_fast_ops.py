"""The CPU ops of fcnjax.models.cpu_ops equal the plain lax ops, values and gradients.

Tolerance: max-pool forward and backward are exact (they select values, no arithmetic), so
they are compared with ``assert_array_equal``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fcnjax.models import cpu_ops, layers


def _pool_both(x, rounding, cot):
  outs, cache = [], {}
  for f in (lambda x: cpu_ops.max_pool_2x2(x, rounding),
            lambda x: layers.max_pool_2x2_reduce_window(x, rounding)):
    y, vjp = jax.vjp(f, x)
    if y.shape not in cache:  # the same cotangent for both
      cache[y.shape] = cot(y.shape)
    outs.append((np.asarray(y), np.asarray(vjp(cache[y.shape])[0])))
  return outs


@pytest.mark.parametrize("rounding", ["ceil", "floor"])
@pytest.mark.parametrize("hw", [(6, 8), (7, 9), (5, 4), (1, 1), (2, 3)])
def test_max_pool_matches_reduce_window(rounding, hw):
  rng = np.random.default_rng(hash(hw) % 2**32)
  x = jnp.asarray(rng.normal(size=(2, *hw, 3)).astype(np.float32))
  cot = lambda s: jnp.asarray(rng.normal(size=s).astype(np.float32))
  (y1, g1), (y2, g2) = _pool_both(x, rounding, cot)
  np.testing.assert_array_equal(y1, y2)
  np.testing.assert_array_equal(g1, g2)


@pytest.mark.parametrize("rounding", ["ceil", "floor"])
def test_max_pool_ties_follow_reduce_window(rounding):
  """Small integer values: most windows hold ties. Ties go to the first maximum (row-major)."""
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.integers(0, 3, size=(2, 9, 7, 4)).astype(np.float32))
  x = x.at[0, :2, :2, 0].set(1.0)  # a window of four equal values
  (y1, g1), (y2, g2) = _pool_both(x, rounding, lambda s: jnp.ones(s, jnp.float32))
  np.testing.assert_array_equal(y1, y2)
  np.testing.assert_array_equal(g1, g2)
  assert g1[0, 0, 0, 0] == 1 and g1[0, 0, 1, 0] == g1[0, 1, 0, 0] == g1[0, 1, 1, 0] == 0
  # a valid subgradient: every window's gradient lands on exactly one of its maxima
  assert g1.sum() == y1.size


def test_max_pool_negative_infinity_and_bfloat16():
  x = jnp.full((1, 3, 3, 1), -jnp.inf, jnp.float32).at[0, 2, 2, 0].set(-5.0)
  (y1, g1), (y2, g2) = _pool_both(x, "ceil", lambda s: jnp.ones(s, jnp.float32))
  np.testing.assert_array_equal(y1, y2)
  np.testing.assert_array_equal(g1, g2)
  xb = jnp.asarray(np.random.default_rng(2).normal(size=(1, 5, 6, 2)), jnp.bfloat16)
  (y1, g1), (y2, g2) = _pool_both(xb, "ceil", lambda s: jnp.ones(s, jnp.bfloat16))
  np.testing.assert_array_equal(y1, y2)
  np.testing.assert_array_equal(g1, g2)


def test_layers_dispatch_to_cpu_ops_on_cpu(monkeypatch):
  x = jnp.ones((1, 4, 4, 1))
  cpu_ops.set_enabled(None)
  monkeypatch.delenv("FCNJAX_CPU_OPS", raising=False)
  assert cpu_ops.enabled() == (jax.default_backend() == "cpu")
  monkeypatch.setenv("FCNJAX_CPU_OPS", "0")
  assert not cpu_ops.enabled()
  assert "reduce_window" in str(jax.make_jaxpr(lambda x: layers.max_pool_2x2(x))(x))
  monkeypatch.setenv("FCNJAX_CPU_OPS", "1")
  assert "custom_vjp" in str(jax.make_jaxpr(lambda x: layers.max_pool_2x2(x))(x))
  cpu_ops.set_enabled(False)
  try:
    assert not cpu_ops.enabled()
  finally:
    cpu_ops.set_enabled(None)
