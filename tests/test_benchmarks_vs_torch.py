"""`python -m benchmarks.vs_torch --quick` runs end to end (tiny FCN-8s, 1 rep)."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("torch", reason="the vs-PyTorch benchmark needs torch (CPU build)")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_vs_torch_quick(tmp_path):
  out = tmp_path / "vs_torch.json"
  # A subprocess: the benchmark sets XLA_FLAGS, which only applies before JAX starts.
  proc = subprocess.run([sys.executable, "-m", "benchmarks.vs_torch", "--quick", "--score-init", "random",
                         "--out", str(out)],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "| quick-div16-64x48-b2 | train step |" in proc.stdout
  data = json.loads(out.read_text())
  (r,) = data["results"]
  # the PyTorch model is the same network: same logits from the same weights
  assert r["forward_max_abs_diff"] <= 1e-4 * max(1.0, r["forward_max_abs"])
  for key in ("jax_forward", "jax_train", "torch_nchw_train", "torch_channels_last_train"):
    assert r[key]["median_s"] > 0
  assert "individual_convolution" in data["meta"]["XLA_FLAGS"]


def test_jaxpr_flops_counts_convs_and_matmuls_inside_jit():
  import jax
  import jax.numpy as jnp

  from benchmarks.vs_torch import jaxpr_flops

  def f(x, k, a, b):
    y = jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jnp.sum(y) + jnp.sum(jax.jit(jnp.matmul)(a, b))   # the matmul in a nested jaxpr

  args = (jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 4)), jnp.ones((5, 6)), jnp.ones((6, 7)))
  conv = 2 * (2 * 8 * 8 * 4) * (3 * 3 * 3)
  matmul = 2 * 5 * 7 * 6
  assert jaxpr_flops(jax.make_jaxpr(f)(*args)) == conv + matmul


def test_vs_torch_quick_bf16_then_recount_flops(tmp_path):
  """The bf16 path (GPU mode's precision, here on the CPU) runs, and --recount-flops fills in
  FLOPs and TFLOP/s of a JSON written by a run (as done for the H100 results)."""
  out = tmp_path / "vs_torch_bf16.json"
  run = lambda *a: subprocess.run([sys.executable, "-m", "benchmarks.vs_torch", *a], cwd=ROOT,
                                  capture_output=True, text=True, timeout=300)
  proc = run("--quick", "--precision", "bf16", "--score-init", "random", "--out", str(out))
  assert proc.returncode == 0, proc.stderr[-3000:]
  data = json.loads(out.read_text())
  (r,) = data["results"]
  assert data["meta"]["precision"] == "bf16" and r["precision"] == "bf16"
  # bf16 logits agree with PyTorch autocast to bf16 rounding (8 mantissa bits), not to fp32's
  assert r["forward_max_abs_diff"] <= 0.05 * r["forward_max_abs"]
  flops = r["flops_forward"]
  for key in ("flops_forward", "flops_train"):
    r.pop(key)
  out.write_text(json.dumps(data))
  proc = run("--recount-flops", str(out))
  assert proc.returncode == 0, proc.stderr[-3000:]
  (r2,) = json.loads(out.read_text())["results"]
  assert r2["flops_forward"] == flops > 0 and r2["flops_train"] == 3 * flops
  assert r2["jax_train"]["tflops"] == r2["flops_train"] / r2["jax_train"]["median_s"] / 1e12


@pytest.mark.parametrize("content", [None, "{}", "not json"])
def test_recount_flops_of_a_bad_file_is_a_clear_error(tmp_path, content):
  path = tmp_path / "x.json"
  if content is not None:
    path.write_text(content)
  proc = subprocess.run([sys.executable, "-m", "benchmarks.vs_torch", "--recount-flops", str(path)],
                        cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  last = proc.stderr.strip().splitlines()[-1]
  assert "error: --recount-flops" in last and str(path) in last and "Traceback" not in proc.stderr
  if content is not None:
    assert path.read_text() == content  # left as it was


@pytest.mark.slow
def test_vs_torch_quick_fcn_resnet50(tmp_path):
  """``--model fcn_resnet50``: torchvision's FCN-ResNet50 both sides, the same weights (loaded
  into fcnjax from the PyTorch model's torchvision-keyed state dict), the same logits."""
  out = tmp_path / "vs_torch_r50.json"
  proc = subprocess.run([sys.executable, "-m", "benchmarks.vs_torch", "--quick", "--model",
                         "fcn_resnet50", "--out", str(out)],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  data = json.loads(out.read_text())
  (r,) = data["results"]
  assert r["model"] == data["meta"]["model"] == "fcn_resnet50"
  assert r["forward_max_abs_diff"] <= 1e-4 * max(1.0, r["forward_max_abs"])
  assert r["jax_train"]["median_s"] > 0 and r["torch_nchw_train"]["median_s"] > 0
