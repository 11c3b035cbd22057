"""Building blocks against numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fcnjax import models
from fcnjax.models import layers


def scatter_add_transposed_conv(x, w, stride, padding):
  """numpy reference: out[s*i + a - p, s*j + b - p, o] += x[i, j, c] * w[a, b, c, o]."""
  n, h, wd, _ = x.shape
  k = w.shape[0]
  full = np.zeros((n, (h - 1) * stride + k, (wd - 1) * stride + k, w.shape[3]), np.float64)
  for i in range(h):
    for j in range(wd):
      full[:, i * stride:i * stride + k, j * stride:j * stride + k, :] += np.einsum(
          "nc,abco->nabo", x[:, i, j, :], w)
  return full[:, padding:full.shape[1] - padding, padding:full.shape[2] - padding, :]


@pytest.mark.parametrize("stride, padding, hw", [(2, 0, (5, 7)), (3, 0, (4, 3)), (4, 2, (3, 6)),
                                                  (8, 0, (2, 2))])
def test_transposed_conv_equals_numpy_scatter_add(stride, padding, hw):
  rng = np.random.default_rng(stride)
  x = rng.normal(size=(2, *hw, 3)).astype(np.float32)
  w = rng.normal(size=(2 * stride, 2 * stride, 3, 4)).astype(np.float32)  # asymmetric kernel
  got = np.asarray(layers.transposed_conv(jnp.asarray(x), jnp.asarray(w), stride, padding))
  want = scatter_add_transposed_conv(x, w, stride, padding)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("learnable", [False, True])
def test_fixed_and_learnable_upsampling_agree_with_reference_kernel(learnable):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(1, 4, 5, 3)).astype(np.float32)
  up = layers.BilinearUpsample(3, 4, learnable=learnable, rngs=nnx.Rngs(0))
  want = scatter_add_transposed_conv(x, layers.bilinear_kernel(4, 3), 4, 0)
  np.testing.assert_allclose(np.asarray(up(jnp.asarray(x))), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("factor", [2, 4, 8, 32])
def test_bilinear_upsampling_reproduces_a_ramp_away_from_borders(factor):
  """A linear ramp a*i + b*j + c is reproduced exactly by bilinear interpolation (interior)."""
  h, w = 6, 7
  ii, jj = np.mgrid[:h, :w].astype(np.float32)
  ramp = (0.7 * ii - 1.3 * jj + 2.0)[None, :, :, None]
  up = np.asarray(layers.BilinearUpsample(1, factor)(jnp.asarray(ramp)))[0, :, :, 0]
  # Output pixel o sits at input coordinate (o - (k - 1) / 2) / s  (deconv coord map inverted).
  centre = (2 * factor - 1) / 2
  oi, oj = np.mgrid[:up.shape[0], :up.shape[1]]
  ci, cj = (oi - centre) / factor, (oj - centre) / factor
  want = 0.7 * ci - 1.3 * cj + 2.0
  inside = (ci >= 0) & (ci <= h - 1) & (cj >= 0) & (cj <= w - 1)
  np.testing.assert_allclose(up[inside], want[inside], atol=1e-4)
  assert inside.sum() >= (h - 1) * (w - 1) * factor ** 2


def test_max_pool_ceil_and_floor():
  x = jnp.arange(5 * 7, dtype=jnp.float32).reshape(1, 5, 7, 1)
  ceil = layers.max_pool_2x2(x, "ceil")
  floor = layers.max_pool_2x2(x, "floor")
  assert ceil.shape == (1, 3, 4, 1) and floor.shape == (1, 2, 3, 1)
  ref = np.asarray(x)[0, :, :, 0]
  want = np.array([[ref[2 * i:2 * i + 2, 2 * j:2 * j + 2].max() for j in range(4)]
                   for i in range(3)])
  np.testing.assert_array_equal(np.asarray(ceil)[0, :, :, 0], want)
  np.testing.assert_array_equal(np.asarray(floor)[0, :, :, 0], want[:2, :3])


def test_conv_block_options_and_shapes():
  block = layers.ConvBlock(3, (8, 8), first_padding=100, batch_norm=True, dropout=0.1,
                           rngs=nnx.Rngs(0))
  out = block(jnp.ones((2, 9, 11, 3)))
  assert out.shape == (2, (9 + 198 + 1) // 2, (11 + 198 + 1) // 2, 8)
  assert layers.ConvBlock(3, (4,), pool=None, rngs=nnx.Rngs(0))(jnp.ones((1, 5, 5, 3))).shape == (
      1, 5, 5, 4)


def test_score_head_zero_init_and_input_scale():
  head = layers.ScoreHead(4, 3, rngs=nnx.Rngs(0))
  assert not np.any(np.asarray(head(jnp.ones((1, 2, 2, 4)))))
  scaled = layers.ScoreHead(4, 3, input_scale=0.01, zero_init=False, rngs=nnx.Rngs(0))
  plain = layers.ScoreHead(4, 3, zero_init=False, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (1, 2, 2, 4))
  np.testing.assert_allclose(scaled(x) - scaled.conv.bias[...],
                             0.01 * (plain(x) - plain.conv.bias[...]), rtol=1e-5, atol=1e-7)


def test_fuse_crops_the_skip_at_the_offset():
  up = jnp.zeros((1, 3, 4, 2))
  skip = jnp.arange(8 * 9 * 2, dtype=jnp.float32).reshape(1, 8, 9, 2)
  np.testing.assert_array_equal(layers.fuse(up, skip, 5), skip[:, 5:8, 5:9])
  with pytest.raises(ValueError, match="crop does not fit"):
    layers.fuse(up, skip, 6)
