"""`python -m benchmarks.vs_torch --quick` runs end to end (tiny FCN-8s, 1 rep)."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("torch", reason="the vs-PyTorch benchmark needs torch (CPU build)")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
