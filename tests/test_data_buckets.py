"""Bucket planner: the 3 % bar on real VOC sizes, assignment rule, padded fraction, batch sizes."""

import time

import numpy as np
import pytest

from fcnjax.data import buckets, stats, synthetic


@pytest.fixture(scope="module")
def voc_sizes():
  return synthetic.voc_sizes()


def test_shipped_size_table_matches_readme(voc_sizes):
  assert voc_sizes.shape == (2905, 2)
  assert len(np.unique(voc_sizes, axis=0)) == 387
  assert voc_sizes.max() == 500


def test_shipped_shape_table_agrees_with_size_table(voc_sizes):
  from importlib import resources
  text = resources.files("fcnjax.data").joinpath("voc2012_seg_shapes.csv").read_text()
  rows = [tuple(map(int, line.split(","))) for line in text.split()[1:]]
  assert len(rows) == 387 and sum(c for _, _, c in rows) == 2905
  shapes, counts = np.unique(voc_sizes, axis=0, return_counts=True)
  assert sorted(rows) == sorted((int(h), int(w), int(c)) for (h, w), c in zip(shapes, counts))


def test_one_bucket_is_500x500_and_wastes_28_4_percent(voc_sizes):
  plan = buckets.plan_buckets(voc_sizes, 1)
  assert plan.shape_list == [(500, 500)]
  assert plan.padded_fraction == pytest.approx(0.284, abs=0.001)


def test_k8_on_real_voc_sizes_wastes_at_most_3_percent_fast(voc_sizes):
  t = time.perf_counter()
  plan = buckets.plan_buckets(voc_sizes, 8)
  assert time.perf_counter() - t < 2.0
  assert plan.num_buckets == 8
  assert plan.padded_fraction <= 0.03
  assert plan.counts.sum() == 2905
  # The report's number is the brute-force one.
  assert plan.padded_fraction == pytest.approx(buckets.padded_fraction(voc_sizes, plan.shapes))


def test_waste_decreases_with_k(voc_sizes):
  w = [buckets.plan_buckets(voc_sizes, k).padded_fraction for k in (1, 2, 4, 8, 16)]
  assert all(a > b for a, b in zip(w, w[1:]))


def test_assignment_is_smallest_area_bucket_brute_force():
  rng = np.random.default_rng(0)
  sizes = rng.integers(1, 40, (300, 2))
  shapes = np.array([[40, 40], [20, 30], [30, 20], [25, 24], [24, 25], [10, 40], [35, 12]])
  got = buckets.assign_buckets(sizes, shapes)
  padded = 0
  for (h, w), b in zip(sizes, got):
    fit = [(H * W, H, W, k) for k, (H, W) in enumerate(shapes) if H >= h and W >= w]
    best = min(fit)  # area, then H, then W
    assert b == best[3]
    padded += best[0]
  assert buckets.padded_fraction(sizes, shapes) == pytest.approx(
      1 - (sizes[:, 0] * sizes[:, 1]).sum() / padded)


def test_assignment_reports_unfit_sizes():
  assert buckets.assign_buckets([[5, 5], [50, 5]], [[10, 10]]).tolist() == [0, -1]
  with pytest.raises(ValueError, match="fit in no bucket"):
    buckets.padded_fraction([[50, 5]], [[10, 10]])


def test_planner_is_optimal_on_small_problems_brute_force():
  rng = np.random.default_rng(1)
  for trial in range(3):
    sizes = rng.integers(5, 30, (40, 2))
    plan = buckets.plan_buckets(sizes, 3)
    hs, ws = np.unique(sizes[:, 0]), np.unique(sizes[:, 1])
    cands = np.array([(h, w) for h in hs for w in ws])
    # cost[c, i]: area of candidate c if image i fits in it, else inf.
    fits = (cands[:, None, 0] >= sizes[None, :, 0]) & (cands[:, None, 1] >= sizes[None, :, 1])
    cost = np.where(fits, (cands[:, 0] * cands[:, 1])[:, None], np.inf)
    top = sizes.max(0).prod() * np.ones(len(sizes))
    best = min(np.minimum(np.minimum(top, cost[a]), cost[a + 1:]).sum(1).min()
               for a in range(len(cands) - 1))
    real = (sizes[:, 0] * sizes[:, 1]).sum()
    assert plan.padded_pixels <= best * 1.01, trial
    assert plan.padded_fraction == pytest.approx(1 - real / plan.padded_pixels)


def test_granularity_gives_multiples(voc_sizes):
  plan = buckets.plan_buckets(voc_sizes, 8, granularity=32)
  assert (plan.shapes % 32 == 0).all()
  assert (buckets.assign_buckets(voc_sizes, plan.shapes) >= 0).all()
  assert plan.padded_fraction == pytest.approx(buckets.padded_fraction(voc_sizes, plan.shapes))


def test_auto_trades_compile_time_against_pixels(voc_sizes):
  cheap_pixels = buckets.plan_buckets(voc_sizes, "auto", s_per_pixel=1e-12)
  assert cheap_pixels.num_buckets == 1
  many = buckets.plan_buckets(voc_sizes, "auto", s_per_pixel=1e-6, epochs=10,
                              compile_s_per_bucket=3.0)
  mid = buckets.plan_buckets(voc_sizes, "auto", s_per_pixel=1e-8, epochs=10,
                             compile_s_per_bucket=3.0)
  assert 1 <= mid.num_buckets <= many.num_buckets
  # The chosen K is a minimum of the cost model among the plans the planner makes.
  def cost(p, spp):
    return 3.0 * p.num_buckets + spp * p.padded_pixels * 10
  for k in (1, 2, 4, 8):
    assert cost(mid, 1e-8) <= cost(buckets.plan_buckets(voc_sizes, k), 1e-8) + 1e-6


def test_batch_sizes_fixed_and_pixel_budget():
  shapes = [[100, 100], [200, 200], [500, 500]]
  assert buckets.batch_sizes(shapes, batch_size=8, num_devices=4).tolist() == [8, 8, 8]
  with pytest.raises(ValueError):
    buckets.batch_sizes(shapes, batch_size=6, num_devices=4)
  bs = buckets.batch_sizes(shapes, pixels_per_batch=400_000, num_devices=4)
  assert bs.tolist() == [40, 8, 4]  # 40, 10->8, 1.6->4 (at least one per device)
  assert (bs % 4 == 0).all()


def test_stats_cli_on_shipped_csv(capsys):
  from importlib import resources
  path = resources.files("fcnjax.data").joinpath("voc2012_seg_sizes.csv")
  assert stats.main([str(path)]) == 0
  out = capsys.readouterr().out
  assert "images: 2905" in out and "distinct shapes (h x w): 387" in out
  assert "K = 8: 8 buckets, padded-pixel fraction 2." in out
  assert "K = auto" in out


def test_plans_for_augmented_sizes_stay_fast_and_hold_every_scale(voc_sizes):
  from fcnjax.data import augment
  sizes = augment.planning_sizes(voc_sizes, augment.Augment(scale_range=(0.5, 2.0)))
  assert len(np.unique(sizes, axis=0)) > 3000
  t = time.perf_counter()
  plan = buckets.plan_buckets(sizes, 8)
  assert time.perf_counter() - t < 6.0
  assert plan.shape_list[-1] == (1000, 1000)
  assert (plan.assign(sizes) >= 0).all() and plan.padded_fraction < 0.25
