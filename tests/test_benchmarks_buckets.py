"""The batching-strategy benchmark runs end to end in --quick mode (one subprocess, ~1 min)."""

import json
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
STRATEGIES = {"exact", "random-pad", "global-max", "crop", "buckets-2", "buckets-4", "buckets-8",
              "buckets-16", "buckets-auto"}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
  out = tmp_path_factory.mktemp("bench") / "quick.json"
  proc = subprocess.run([sys.executable, "-m", "benchmarks.buckets", "--quick", "--out", str(out)],
                        cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return json.loads(out.read_text()), out, proc.stdout


@pytest.mark.slow
def test_every_strategy_compiles_and_has_sane_numbers(quick_run):
  report, _, _ = quick_run
  by_name = {s["name"]: s for s in report["strategies"]}
  assert set(by_name) == STRATEGIES
  for s in by_name.values():
    assert s["xla_compiles"] > 0, s["name"]
    assert 1 <= s["measured_shapes"] <= s["distinct_shapes"]
    assert s["sampled"] == (s["measured_shapes"] < s["distinct_shapes"])
    p = s["projection"]
    assert p["steps_per_epoch"] > 0 and 0 < p["epoch_s"] < 1e5
    assert 0 <= p["padding_fraction"] < 1 and p["real_pixels_per_s"] > 0
    assert p["run_s"] >= p["epoch_s"] * 0.99
    for b in s["buckets"]:
      assert 0 < b["step_s_min"] <= b["step_s"] <= b["step_s_max"] < 60
      assert b["compile_s"] > 0 and b["xla_compiles"] == 1
      assert 0 <= b["padding_fraction"] < 1 and b["real_pixels_per_s"] > 0
  # One compile per distinct batch shape measured, counted from JAX's own compile events.
  for name in STRATEGIES:
    assert by_name[name]["xla_compiles"] == len(by_name[name]["buckets"]), name
  for k in (2, 4, 8, 16):
    s = by_name[f"buckets-{k}"]
    assert s["distinct_shapes"] <= k
    assert s["xla_compiles"] == s["measured_shapes"] == len({tuple(b["shape"])
                                                             for b in s["buckets"]})
  assert by_name["global-max"]["distinct_shapes"] == by_name["crop"]["distinct_shapes"] == 1
  assert by_name["exact"]["projection"]["padding_fraction"] == 0
  crop = by_name["crop"]["info"]
  assert 0 <= crop["images_dropped_fraction"] < 1 and 0 < crop["pixels_dropped_fraction"] < 1
  # Padding only grows as buckets get fewer; global max pads most.
  pads = [by_name[f"buckets-{k}"]["info"]["planned_padded_fraction"] for k in (16, 8, 4, 2)]
  assert pads == sorted(pads)
  assert by_name["global-max"]["projection"]["padding_fraction"] >= pads[-1]


def test_auto_k_from_measured_costs(quick_run):
  report, _, stdout = quick_run
  auto = report["auto"]
  assert auto["compile_s_per_bucket"] > 0 and auto["s_per_pixel"] > 0
  totals = {r["k"]: r["total_s"] for r in auto["table"]}
  assert auto["auto_k"] == len(report["strategies"][-1]["info"]["bucket_shapes"])
  assert totals[min(totals, key=totals.get)] <= totals.get(auto["auto_k"], float("inf")) + 1e-6
  assert f"**K = {auto['auto_k']}**" in stdout


def test_outputs_markdown_and_png(quick_run):
  report, out, stdout = quick_run
  assert "| strategy |" in stdout and "buckets-auto" in stdout
  png = out.with_suffix(".png")
  assert png.exists() and png.read_bytes()[:4] == b"\x89PNG"
  assert report["machine"]["jax"] and report["config"]["quick"]


# -- the batch plans (pure numpy, no compiles) --------------------------------------------------
def _sizes():
  from benchmarks import buckets as bb
  return bb.scale_sizes(bb.load_sizes(), 0.1)


def test_plans_cover_every_image_once_and_pad_as_described():
  import numpy as np
  from benchmarks import buckets as bb
  sizes = _sizes()
  n = len(sizes)
  ex = bb.plan_exact(sizes)
  assert len(ex.shapes) == n and (ex.shapes[:, 0] == 1).all() and ex.pixels.sum() == (
      sizes[:, 0] * sizes[:, 1]).sum() == ex.padded_pixels.sum()
  rp = bb.plan_random_pad(sizes, 8, seed=1, epoch=0)
  assert rp.images.sum() == n and len(rp.shapes) == -(-n // 8)
  for shape, rows in zip(rp.shapes, rp.rows):  # each batch padded to its own max
    assert tuple(shape[1:]) == tuple(rows.max(axis=0))
  gm = bb.plan_global_max(sizes, 8)
  assert len(np.unique(gm.shapes, axis=0)) == 1 and gm.images.sum() == n
  crop = (32, 48)
  cp = bb.plan_crop(sizes, crop, 8)
  kept = int(bb.crop_fits(sizes, crop).sum())
  assert cp.images.sum() == kept and cp.pixels.sum() == kept * 32 * 48
  loss = bb.crop_loss(sizes, crop)
  assert loss["images_dropped"] == n - kept and 0 < loss["pixels_dropped_fraction"] < 1
  s = bb.bucket_strategy(sizes, 4, lambda sh: np.full(len(sh), 8))
  bk = s.plan(0)
  assert bk.images.sum() == n and len(np.unique(bk.shapes, axis=0)) <= 4
  assert rp.shapes.tolist() != bb.plan_random_pad(sizes, 8, seed=1, epoch=1).shapes.tolist()


def test_sample_shapes_is_stratified_and_fit_recovers_a_line():
  import numpy as np
  from benchmarks import buckets as bb
  pix = np.arange(100) * 10
  idx = bb.sample_shapes(np.zeros((100, 3)), pix, 5, np.random.default_rng(0))
  assert len(idx) == 5 and [i // 20 for i in idx] == [0, 1, 2, 3, 4]
  assert list(bb.sample_shapes(np.zeros((3, 3)), pix[:3], 5, np.random.default_rng(0))) == [0, 1, 2]
  fit = bb.fit_step_time([1e4, 2e4, 4e4], [0.2, 0.3, 0.5])
  assert abs(fit["a_s"] - 0.1) < 1e-9 and abs(fit["b_s_per_px"] - 1e-5) < 1e-12 and fit["r2"] > 0.999


def test_sizes_from_a_dataset_root(tmp_path):
  from benchmarks import buckets as bb
  from fcnjax.data import synthetic
  root = synthetic.write_synthetic_voc(tmp_path, num_train=5, num_val=3, scale=0.1, seed=0)
  sizes = bb.load_sizes(root=root, splits=("train", "val"))
  assert sizes.shape == (8, 2) and (sizes > 0).all()


@pytest.mark.parametrize("content,problem", [
    (None, "No such file"),
    ("split,image_id,width,height\ntrain,a,500,375\ntrain,b,5OO,375\n", "line 3: width/height must be integers"),
    ("split,image_id,width,height\ntrain,a,0,375\n", "line 2: width/height must be positive"),
    ("split,id,w,h\ntrain,a,500,375\n", "needs columns"),
    ("split,image_id,width,height\nval,a,500,375\n", "no rows for splits ['train']"),
])
def test_bad_size_table_is_one_error_line_naming_the_file(tmp_path, capsys, content, problem):
  from benchmarks import buckets
  path = tmp_path / "sizes.csv"
  if content is not None:
    path.write_text(content)
  assert buckets.main(["--quick", "--sizes", str(path), "--out", str(tmp_path / "o.json")]) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: ") and str(path) in err[0], err
  assert problem in err[0]
  assert not (tmp_path / "o.json").exists()


def test_pixel_cost_is_positive_even_when_noise_tilts_the_fit():
  from benchmarks import buckets as bb
  def res(points):
    return [{"buckets": [{"model_pixels": p, "step_s": t} for p, t in points]}]
  rising = res([(1000, 0.2), (2000, 0.3), (4000, 0.5)])
  assert bb.pixel_cost(rising, rising) == pytest.approx(1e-4)
  tilted = res([(1000, 0.31), (2000, 0.30), (4000, 0.29)])  # noise: slope < 0
  assert bb.pixel_cost(tilted, tilted + rising) > 0         # the pooled fit's slope
  assert bb.pixel_cost(tilted, tilted) == pytest.approx(0.30 / (7000 / 3))  # through origin


@pytest.mark.slow
def test_calibrate_writes_a_profile_that_auto_reads(tmp_path):
  # --calibrate measures cold (empty persistent cache) and warm (loaded from it) compiles and the
  # step cost per pixel; the profile it writes is what --cost-profile and the trainer read
  from fcnjax.data import bucket_costs
  out = tmp_path / "profile.json"
  proc = subprocess.run([sys.executable, "-m", "benchmarks.buckets", "--quick", "--calibrate",
                         "--calibrate-shapes", "2", "--profile-out", str(out)],
                        cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  profile = bucket_costs.load_profile(out)
  assert profile.backend == "cpu" and profile.model == "fcn8s" and len(profile.samples) == 2
  assert profile.warm_compile_s_per_bucket < profile.compile_s_per_bucket
  assert all(s["warm_cache_hits"] >= 1 for s in profile.samples)
  assert 0 < profile.s_per_pixel < 1e-3


@pytest.mark.parametrize("flags,problem", [
    (["--calibrate", "--calibrate-shapes", "1"], "--calibrate-shapes must be >= 2"),
    (["--profile-out", "x.json"], "--profile-out needs --calibrate"),
    (["--calibrate", "--out", "x.json"], "--out does not go with --calibrate"),
])
def test_calibrate_flag_problems_are_one_line(flags, problem):
  proc = subprocess.run([sys.executable, "-m", "benchmarks.buckets", *flags], cwd=REPO,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2 and problem in proc.stderr.strip().splitlines()[-1]
  assert "Traceback" not in proc.stderr
