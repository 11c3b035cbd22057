"""Memory planning: device limits, compiled step memory, the linear model, capped batch sizes,
the out-of-memory error, dummy-row warnings, and max_batch_sizes in the bucket/loader code.

The step is a 1/16-width aligned FCN-8s built exactly as ``loop.Run`` builds it (``init_state`` +
``parallel.replicate`` on ``parallel.make_mesh()`` + ``make_train_step`` with its shardings).
Compiles are few and shared: the calibration's three (96x128 at batch 1 and 2, 64x96 at batch 1)
are cached by jit, so later calls at those shapes cost nothing; one more compile (96x128 at batch
4) is the held-out check.
"""

import jax
import numpy as np
import pytest

from fcnjax import models
from fcnjax.data import buckets, pipeline
from fcnjax.train import memory, optim, parallel
from fcnjax.train import step as step_lib

BUCKETS = [(64, 64), (64, 96), (96, 128)]
HELD_OUT_TOLERANCE = (-0.05, 0.25)
"""The model's relative error on a held-out compile may be in this range: cautious (over) by up
to 25 %, under by at most 5 % (measured: +7.3 % for 96x128 at batch 4)."""


@pytest.fixture(scope="module")
def step():
  model = models.build_model("fcn8s", 21, width_multiplier=1 / 16, aligned=True)
  tx = optim.reference_optimizer(1e-4, momentum=0.9, weight_decay=5e-4)
  mesh = parallel.make_mesh()
  graphdef, state = step_lib.init_state(model, tx)
  state = parallel.replicate(state, mesh)
  train_step = step_lib.make_train_step(
      graphdef, tx, state_sharding=jax.tree.map(lambda x: x.sharding, state),
      batch_sharding=parallel.batch_sharding(mesh))
  return train_step, state, mesh.size


@pytest.fixture(scope="module")
def model(step):
  train_step, state, nd = step
  return memory.calibrate(train_step, state, BUCKETS, num_devices=nd)


class FakeSource:
  """Just what the loader needs: sizes, ids, paths, and examples of those sizes."""

  def __init__(self, sizes):
    self.sizes = np.asarray(sizes, np.int32)
    self.ids = [f"img{i}" for i in range(len(sizes))]
    self.image_paths = [f"/data/{i}.jpg" for i in self.ids]

  def __len__(self):
    return len(self.sizes)

  def __getitem__(self, i):
    h, w = (int(v) for v in self.sizes[i])
    return {"image": np.zeros((h, w, 3), np.uint8), "label": np.zeros((h, w), np.uint8),
            "id": self.ids[i]}


# -- the device's memory --------------------------------------------------------------------------
def test_device_memory_bytes_env_override_and_host_default(monkeypatch):
  monkeypatch.setenv(memory.ENV_VAR, "2G")
  assert memory.device_memory_bytes() == 2 << 30
  monkeypatch.setenv(memory.ENV_VAR, "500M")
  assert memory.device_memory_bytes() == 500 << 20
  monkeypatch.setenv(memory.ENV_VAR, "123456")
  assert memory.device_memory_bytes() == 123456
  monkeypatch.setenv(memory.ENV_VAR, "lots")
  with pytest.raises(ValueError, match=memory.ENV_VAR):
    memory.device_memory_bytes()
  monkeypatch.delenv(memory.ENV_VAR)
  got = memory.device_memory_bytes()
  host = memory.host_memory_bytes()
  assert jax.devices()[0].platform == "cpu"
  assert got == host // len(jax.local_devices(backend="cpu")) and got > 1 << 28
  assert memory.parse_bytes("1.5GiB") == 3 << 29 and memory.format_bytes(3 << 30) == "3.0 GiB"


# -- one program's memory -------------------------------------------------------------------------
def test_step_memory_grows_with_batch_and_pixels(step, model):
  train_step, state, nd = step
  one = memory.step_memory_bytes(train_step, state, (nd, 96, 128))  # cached by the calibration
  two = memory.step_memory_bytes(train_step, state, (2 * nd, 96, 128))
  small = memory.step_memory_bytes(train_step, state, (nd, 64, 96))
  assert one["source"] == "memory_analysis"
  assert one["compile_s"] < 1.0  # jit already had it: the plan's compiles are reused
  state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
  for r in (one, two, small):
    assert r["peak"] == r["argument"] + r["output"] - r["alias"] + r["temp"] > state_bytes
    assert r["alias"] >= 0.99 * state_bytes  # the donated state is written in place
  assert small["peak"] < one["peak"] < two["peak"]


def test_fallback_without_memory_analysis_is_an_upper_bound(step, monkeypatch):
  train_step, state, nd = step
  real = memory.step_memory_bytes(train_step, state, (nd, 64, 96))
  monkeypatch.setattr(jax.stages.Compiled, "memory_analysis", lambda self: None)
  bound = memory.step_memory_bytes(train_step, state, (nd, 64, 96))
  assert bound["source"] == "jaxpr" and bound["peak"] >= real["peak"]


def test_linear_model_fits_calibration_and_predicts_held_out_shape(step, model):
  train_step, state, nd = step
  assert model.compiles == 3 and [c[:3] for c in model.calibration] == [
      (nd, 96, 128), (2 * nd, 96, 128), (nd, 64, 96)]
  for B, H, W, peak, _ in model.calibration:  # reproduces what it was fitted on
    assert abs(model.bytes_at(B, (H, W)) - peak) <= 1
  assert model.pixel_bytes > 0 and model.row_bytes >= 0
  held_out = memory.step_memory_bytes(train_step, state, (4 * nd, 96, 128))["peak"]
  err = model.bytes_at(4 * nd, (96, 128)) / held_out - 1
  lo, hi = HELD_OUT_TOLERANCE
  assert lo <= err <= hi, err


# -- plans ----------------------------------------------------------------------------------------
def test_plan_caps_the_biggest_bucket_under_the_limit(step, model):
  train_step, state, nd = step
  requested = [2 * nd, 2 * nd, 4 * nd]
  per_row = model.bytes_at(3 * nd, BUCKETS[2]) - model.bytes_at(2 * nd, BUCKETS[2])
  budget = model.bytes_at(2 * nd, BUCKETS[2]) + per_row // 2  # 2 rows fit, 3 do not
  limit = int(budget / 0.9) + 1
  plan = memory.plan_batch_sizes(train_step, state, BUCKETS, requested, num_devices=nd,
                                 limit_bytes=limit, headroom=0.9)
  assert plan.method == "calibrated"
  assert plan.batch_sizes == [2 * nd, 2 * nd, 2 * nd] and plan.reduced == [2]
  assert plan.verified[2]  # its figure is the compile of batch 2 (cached: no new compile)
  assert plan.estimated_bytes[2] == model.calibration[1][3]
  assert all(e <= plan.budget_bytes < limit for e in plan.estimated_bytes)
  assert plan.requested_bytes[2] > plan.budget_bytes
  assert plan.compiles == 4 and plan.compile_s > 0
  (line,) = plan.log_lines()
  assert line.startswith(f"bucket 96x128: batch {4 * nd} -> {2 * nd} to fit ")
  assert memory.format_bytes(limit) in line and "96 x 128   batch    2 (reduced)" in plan.report()
  # The same caps without compiling (the pure model), and a limit nothing exceeds.
  again = memory.plan_from_model(model, BUCKETS, requested, num_devices=nd, limit_bytes=limit)
  assert again.batch_sizes == plan.batch_sizes
  roomy = memory.plan_from_model(model, BUCKETS, requested, num_devices=nd, limit_bytes=1 << 40)
  assert roomy.batch_sizes == requested and roomy.reduced == [] and roomy.log_lines() == []
  # With room to spare the quick check (upper bounds from traces) plans without compiling.
  quick = memory.plan_batch_sizes(train_step, state, BUCKETS, requested, num_devices=nd,
                                  limit_bytes=1 << 40)
  assert quick.method == "bound" and quick.compiles == 0 and quick.batch_sizes == requested
  assert all(b >= e for b, e in zip(quick.estimated_bytes, roomy.estimated_bytes))


def test_plan_refuses_a_bucket_where_one_image_does_not_fit(step, model, monkeypatch):
  train_step, state, nd = step
  one = model.calibration[0][3]  # 96x128 at one row per device
  fits = max(model.bytes_at(nd, s) for s in BUCKETS[:2])
  assert fits < one
  limit = (fits + one) // 2
  monkeypatch.setenv(memory.ENV_VAR, str(limit))  # the limit comes from the override
  images = {(96, 128): [("/data/small.jpg", 90, 100), ("/data/huge.jpg", (96, 128))]}
  with pytest.raises(memory.StepMemoryError) as info:
    memory.plan_batch_sizes(train_step, state, BUCKETS, [nd, nd, nd], num_devices=nd,
                            headroom=1.0, images_of_bucket=images)
  err = info.value
  assert isinstance(err, ValueError)
  assert err.bucket == (96, 128) and err.limit_bytes == limit and err.compiled
  msg = str(err)
  for text in ("bucket 96x128", memory.format_bytes(one), memory.format_bytes(limit),
               "/data/huge.jpg (96x128)", "Downscale it", memory.ENV_VAR):
    assert text in msg, (text, msg)


# -- max_batch_sizes in the bucket and loader code ----------------------------------------------
def test_batch_sizes_caps():
  shapes = [(10, 10), (20, 20), (40, 40)]
  assert buckets.batch_sizes(shapes, batch_size=8).tolist() == [8, 8, 8]
  assert buckets.batch_sizes(shapes, batch_size=8, max_batch_sizes=None).tolist() == [8, 8, 8]
  assert buckets.batch_sizes(shapes, batch_size=8, max_batch_sizes=[16, None, 2]).tolist() == [
      8, 8, 2]
  got = buckets.batch_sizes(shapes, pixels_per_batch=6400, num_devices=2,
                            max_batch_sizes={(10, 10): 8, (40, 40): 2})
  assert got.tolist() == [8, 16, 2]
  for bad in ([3, 4, 4], [8, 8], [0, 8, 8], {(5, 5): 2}):
    with pytest.raises(ValueError):
      buckets.batch_sizes(shapes, batch_size=8, num_devices=2, max_batch_sizes=bad)


def _outlier_source():
  rng = np.random.default_rng(0)
  sizes = np.concatenate([rng.integers(30, 41, (15, 2)), [[200, 300]]])
  return FakeSource(sizes)


def test_make_loader_max_batch_sizes_and_dummy_row_warnings():
  src = _outlier_source()
  kw = dict(batch_size=4, max_buckets=2, augment=None, seed=0)
  plain = pipeline.make_train_loader(src, **kw)
  assert plain.bucket_shapes[-1] == (200, 300) and plain.batch_sizes == [4, 4]
  assert pipeline.make_train_loader(src, max_batch_sizes=None, **kw).batch_sizes == [4, 4]
  # the single 200x300 image: 3 dummy rows in its only batch, 75 % of that bucket wasted
  (line,) = memory.dummy_row_warnings(plain)
  assert line.startswith("bucket 200x300: 1 image(s) in epoch 0 but batch 4: 3 of its 4 rows")
  assert "75.0% of this bucket's compute" in line and "pixels_per_batch" in line
  assert memory.bucket_images(plain)[(200, 300)] == [("/data/img15.jpg", 200, 300)]
  capped = pipeline.make_train_loader(src, max_batch_sizes=[4, 1], **kw)
  assert capped.batch_sizes == [4, 1] and capped.fingerprint()["batch_sizes"] == [4, 1]
  assert memory.dummy_row_warnings(capped) == []
  first = next(b for b in capped if b["image"].shape[1:3] == (200, 300))
  assert first["image"].shape[0] == 1 and first["index"].tolist() == [15]
  dropped = pipeline.make_train_loader(src, remainder="drop", **kw)
  assert "dropped, never trained on" in memory.dummy_row_warnings(dropped)[0]
  ev = pipeline.make_eval_loader(src, batch_size=4, max_buckets=2, max_batch_sizes={(200, 300): 1})
  assert ev.batch_sizes == [4, 1]
