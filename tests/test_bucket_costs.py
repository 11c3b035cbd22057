"""Cost profiles for max_buckets="auto": defaults, JSON round trip, one-line errors naming the
file, and what a profile changes in a plan."""

import json

import numpy as np
import pytest

from fcnjax.data import bucket_costs, buckets


def measured(**over):
  kw = dict(compile_s_per_bucket=5.0, warm_compile_s_per_bucket=0.5, s_per_pixel=2e-6,
            backend="cpu", model="fcn8s", width_multiplier=0.125, aligned=True,
            precision="fp32", num_devices=1, measured="2026-12-03",
            samples=({"shape": [8, 64, 64], "step_s": 0.05},))
  kw.update(over)
  return bucket_costs.CostProfile(**kw)


def test_round_trip_keeps_every_field(tmp_path):
  path = bucket_costs.save_profile(measured(), tmp_path / "sub" / "p.json")
  back = bucket_costs.load_profile(path)
  assert back.source == str(path)
  assert back.to_json() == measured().to_json()
  assert json.loads(path.read_text())["version"] == bucket_costs.VERSION


def test_defaults_per_backend():
  assert bucket_costs.default_profile("cpu") is bucket_costs.CPU_PROFILE
  assert bucket_costs.default_profile("gpu") is bucket_costs.GPU_PROFILE
  assert bucket_costs.default_profile("tpu") is bucket_costs.GPU_PROFILE
  with pytest.raises(ValueError, match="no default cost profile for backend 'npu'"):
    bucket_costs.default_profile("npu")
  # an accelerator's compiles dwarf its steps: far fewer buckets than on the CPU
  assert (bucket_costs.GPU_PROFILE.compile_s_per_bucket / bucket_costs.GPU_PROFILE.s_per_pixel
          > 100 * bucket_costs.CPU_PROFILE.compile_s_per_bucket
          / bucket_costs.CPU_PROFILE.s_per_pixel)


@pytest.mark.parametrize("text,problem", [
    (None, "no such cost profile file"),
    ("{not json", "not JSON"),
    ("[1, 2]", "expected a JSON object, got list"),
    ('{"backend": "cpu"}', "missing field 'version'"),
    ('{"version": 2}', "unknown version 2"),
    ('{"version": 1, "backend": "cpu"}', "missing fields 'compile_s_per_bucket'"),
])
def test_bad_files_are_one_line_naming_the_file(tmp_path, text, problem):
  path = tmp_path / "p.json"
  if text is not None:
    path.write_text(text)
  with pytest.raises(bucket_costs.CostProfileError) as e:
    bucket_costs.load_profile(path)
  msg = str(e.value)
  assert msg.startswith(f"{path}: ") and problem in msg and "\n" not in msg


@pytest.mark.parametrize("field,value,problem", [
    ("s_per_pixel", -1.0, "must be a positive finite number"),
    ("compile_s_per_bucket", "fast", "must be a number"),
    ("aligned", "yes", "must be true or false"),
    ("num_devices", 0, "must be an integer >= 1"),
    ("colour", "red", "unknown field 'colour'"),
])
def test_bad_fields_name_the_field(tmp_path, field, value, problem):
  d = measured().to_json()
  d[field] = value
  path = tmp_path / "p.json"
  path.write_text(json.dumps(d))
  with pytest.raises(bucket_costs.CostProfileError, match=problem):
    bucket_costs.load_profile(path)


def test_a_directory_and_an_unwritable_target_are_clear(tmp_path):
  with pytest.raises(bucket_costs.CostProfileError, match="is a directory"):
    bucket_costs.load_profile(tmp_path)
  blocker = tmp_path / "file"
  blocker.write_text("x")
  with pytest.raises(bucket_costs.CostProfileError, match="cannot write the cost profile"):
    bucket_costs.save_profile(measured(), blocker / "p.json")


def test_plan_kwargs_and_mismatches():
  p = measured()
  assert p.plan_kwargs(50) == {"compile_s_per_bucket": 5.0, "s_per_pixel": 2e-6, "epochs": 50.0}
  assert p.plan_kwargs(2, warm=True)["compile_s_per_bucket"] == 0.5
  with pytest.raises(ValueError, match="epochs must be a positive number"):
    p.plan_kwargs(0)
  assert p.mismatches(backend="cpu", model="fcn8s", width_multiplier=0.125, aligned=True,
                      precision="fp32", num_devices=1) == []
  diffs = p.mismatches(backend="gpu", width_multiplier=1.0, num_devices=8)
  assert diffs == ["backend: measured on cpu, this run is on gpu",
                   "width multiplier: measured with x1/8, this run uses x1",
                   "devices: measured with 1, this run uses 8"]
  assert "x1/8 aligned fp32" in p.describe() and "5.0 s/bucket cold" in p.describe()


def test_a_dearer_compile_gives_fewer_buckets():
  sizes = 16 * np.random.default_rng(0).integers(6, 32, (1500, 2))
  cpu = buckets.plan_buckets(sizes, "auto", **bucket_costs.CPU_PROFILE.plan_kwargs(50))
  gpu = buckets.plan_buckets(sizes, "auto", **bucket_costs.GPU_PROFILE.plan_kwargs(50))
  assert gpu.num_buckets < cpu.num_buckets
