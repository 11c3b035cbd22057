"""The planner defects an independent check found, each as a case: buckets only where images are,
the largest image's bucket not forced, grid rounding that keeps round sizes, auto's early stop
and its epoch under scale augmentation, planning time on 200,000 sizes."""

import time

import numpy as np
import pytest

from fcnjax.data import augment, buckets, pipeline


def photos(n=50):
  return np.array([[480, 640]] * n + [[640, 480]] * n)


def test_landscape_and_portrait_get_exactly_their_two_buckets():
  plan = buckets.plan_buckets(photos(), 2)
  assert plan.shape_list == [(480, 640), (640, 480)] and plan.padded_fraction == 0.0


@pytest.mark.parametrize("k", [3, 4, 8, "auto"])
def test_no_bucket_without_images(k):
  plan = buckets.plan_buckets(photos(), k)
  assert plan.shape_list == [(480, 640), (640, 480)]
  assert (plan.counts > 0).all()
  rng = np.random.default_rng(0)
  sizes = rng.integers(50, 300, (500, 2))
  for kk in (2, 5, 16):
    assert (buckets.plan_buckets(sizes, kk, granularity=32).counts > 0).all()


def test_coarse_rounding_keeps_the_largest_size_and_round_multiples():
  rng = np.random.default_rng(0)
  sizes = np.stack([rng.integers(100, 1001, 200_000), rng.integers(100, 1001, 200_000)], 1)
  t = time.perf_counter()
  plan = buckets.plan_buckets(sizes, 8)
  seconds = time.perf_counter() - t
  assert plan.shape_list[-1] == (1000, 1000)  # not 1007 / 1008
  assert all(h % 8 == 0 and w % 8 == 0 for h, w in plan.shape_list)
  assert seconds < 10  # ~1 s on the 2-core CPU; generous for slower CI machines


def test_auto_stops_once_compiles_alone_cost_more_than_the_best():
  sizes = np.random.default_rng(1).integers(50, 500, (2000, 2))
  calls = []
  real = buckets._solve
  try:
    buckets._solve = lambda prob, k, init=None: calls.append(k) or real(prob, k, init)
    plan = buckets.plan_buckets(sizes, "auto", compile_s_per_bucket=100.0, s_per_pixel=1e-9)
  finally:
    buckets._solve = real
  # one bucket costs 100 s + a tiny pixel cost: K = 2 already costs more in compiles alone
  assert plan.num_buckets == 1 and calls == [1]


def test_auto_counts_one_epoch_of_pixels_under_scale_augmentation(monkeypatch):
  sizes = np.random.default_rng(2).integers(100, 400, (300, 2))
  aug = augment.Augment(flip=True, scale_range=(0.5, 2.0))
  seen = {}
  real = buckets.plan_buckets

  def spy(s, k, **kw):
    seen.update(kw, n=len(s))
    return real(s, k, **kw)

  monkeypatch.setattr(buckets, "plan_buckets", spy)

  class Source:
    def __init__(self):
      self.sizes = sizes

    def __len__(self):
      return len(sizes)

  pipeline.make_loader(Source(), max_buckets="auto", augment=aug, num_epochs=1)
  assert seen["n"] > len(sizes)  # planned on every scale's sizes
  assert np.isclose(np.sum(seen["weights"]), len(sizes))  # ... counted as one epoch


def test_weights_count_like_repeated_sizes():
  sizes = np.array([[100, 200], [200, 100], [150, 150]])
  a = buckets.plan_buckets(np.repeat(sizes, [5, 1, 1], axis=0), 2)
  b = buckets.plan_buckets(sizes, 2, weights=[5, 1, 1])
  assert a.shape_list == b.shape_list
  with pytest.raises(ValueError, match="2 weights for 3 sizes"):
    buckets.plan_buckets(sizes, 2, weights=[1, 2])
