"""The fused-vs-split train step benchmark runs end to end in --quick mode (one subprocess)."""

import json
import math
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
  out = tmp_path_factory.mktemp("bench") / "quick.json"
  proc = subprocess.run([sys.executable, "-m", "benchmarks.step_split", "--quick", "--out",
                         str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return json.loads(out.read_text()), proc.stdout


def _pos(x):
  return isinstance(x, float) and math.isfinite(x) and x > 0


@pytest.mark.slow
def test_quick_report(quick_run):
  from benchmarks import step_split as ss
  report, stdout = quick_run
  c = report["config"]
  assert c["quick"] and c["shapes"] == [[32, 32], [32, 64]] and c["steps"] == 2
  assert c["optimizers"] == ["sgd", "adamw"] and c["ks"] == [4, 8]
  for key in ("cpu", "loadavg_start", "loadavg_end", "platform", "jax"):
    assert key in report["machine"]
  assert report["equality_passed"] is True
  keeps = []
  for r in report["optimizers"]:
    e = r["equality"]
    assert e["passed"] and e["max_abs_diff"] <= e["tolerance"] < e["max_abs_update"]
    assert math.isclose(e["tolerance"], ss.PARAM_RTOL * e["max_abs_param"])
    assert _pos(r["update_compile"]["total_s"]) and r["update_compile"]["xla_compiles"] == 1
    assert len(r["shapes"]) == 2
    for s in r["shapes"]:
      for k in ("fused_compile", "grad_compile"):
        assert _pos(s[k]["total_s"]) and _pos(s[k]["lower_s"]) and _pos(s[k]["compile_s"])
        assert s[k]["xla_compiles"] == 1  # one fresh XLA compile each: caches really cleared
      assert _pos(s["fused_step_s"]) and _pos(s["split_step_s"])
      assert len(s["fused_step_times_s"]) == len(s["split_step_times_s"]) == 2
      assert all(_pos(t) for t in s["fused_step_times_s"] + s["split_step_times_s"])
      assert math.isclose(s["step_ratio"], s["split_step_s"] / s["fused_step_s"])
    # Totals follow from the per-shape numbers: K fused compiles vs K grad + 1 update compile.
    fm = sum(s["fused_compile"]["total_s"] for s in r["shapes"]) / 2
    gm = sum(s["grad_compile"]["total_s"] for s in r["shapes"]) / 2
    for t in r["totals"]:
      assert math.isclose(t["fused_compile_s"], t["k"] * fm)
      assert math.isclose(t["split_compile_s"], t["k"] * gm + r["update_compile"]["total_s"])
      assert math.isclose(t["saving"], 1 - t["split_compile_s"] / t["fused_compile_s"])
    ratios = sorted(s["step_ratio"] for s in r["shapes"])
    assert math.isclose(r["median_step_ratio"], sum(ratios) / 2)
    keep = (all(t["saving"] >= ss.COMPILE_SAVING_MIN for t in r["totals"])
            and r["median_step_ratio"] <= 1 + ss.STEP_SLOWDOWN_MAX)
    assert r["keep"] == keep
    keeps.append(keep)
  v = report["verdict"]
  assert v["keep_split"] == all(keeps)
  assert v["line"].startswith("KEEP" if all(keeps) else "DO NOT KEEP")
  assert "| shape BxHxW |" in stdout and v["line"] in stdout
