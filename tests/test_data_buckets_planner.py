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


def modelled_cost(plan, compile_s, s_per_pixel, epochs):
  return compile_s * plan.num_buckets + s_per_pixel * plan.padded_pixels * epochs


def test_auto_is_as_cheap_as_the_best_fixed_k():
  # auto sweeps K with greedy plans and refines only the best: its modelled cost must still be
  # within 0.5 % of the best of the fully searched fixed-K plans, for cheap and dear compiles
  sizes = 16 * np.random.default_rng(3).integers(6, 26, (2000, 2))  # 20 heights, 20 widths
  fixed = [buckets.plan_buckets(sizes, k) for k in range(1, 33)]
  for compile_s, s_per_pixel in [(4.0, 1.6e-6), (40.0, 1e-8), (1.0, 1e-5)]:
    kw = dict(compile_s_per_bucket=compile_s, s_per_pixel=s_per_pixel, epochs=50)
    auto = buckets.plan_buckets(sizes, "auto", **kw)
    best = min(modelled_cost(p, compile_s, s_per_pixel, 50) for p in fixed)
    assert modelled_cost(auto, compile_s, s_per_pixel, 50) <= 1.005 * best, (compile_s, s_per_pixel)


def test_auto_says_which_k_and_why():
  sizes = np.random.default_rng(4).integers(100, 500, (2000, 2))
  plan = buckets.plan_buckets(sizes, "auto", compile_s_per_bucket=30.0, s_per_pixel=1e-8,
                              epochs=50)
  reason = plan.auto_reason()
  assert reason.startswith(f"auto chose K = {plan.num_buckets}: ")
  assert "over 50 epochs" in reason and "compiles alone" in reason
  comp, work = plan.auto["costs"][plan.num_buckets]
  assert comp == 30.0 * plan.num_buckets
  assert np.isclose(work, 1e-8 * plan.padded_pixels * 50, rtol=1e-6)
  assert buckets.plan_buckets(sizes, 4).auto_reason() == ""
  # every size its own bucket: more buckets save nothing
  few = np.array([[100, 200], [200, 100]])
  reason = buckets.plan_buckets(few, "auto", compile_s_per_bucket=1e-9).auto_reason()
  assert "a bucket more saves no padding" in reason
