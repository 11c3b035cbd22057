"""``python -m fcnjax.weights {inspect,convert}`` on tiny files (subprocess, no PyTorch needed)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from fcnjax import preprocessing as pp
from fcnjax import weights
from fcnjax.weights import io
from fcnjax.weights.__main__ import main

from test_weights import pytorch_fcn_state, torchvision_state  # noqa: E402  (tests/ on sys.path)


def run_cli(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "fcnjax.weights", *map(str, args)],
                        capture_output=True, text=True, env=env, timeout=120)


def test_cli_convert_pytorch_fcn_and_inspect(tmp_path):
  src, dst = tmp_path / "fcn16s_tiny.safetensors", tmp_path / "out.safetensors"
  sd = pytorch_fcn_state(16, seed=1)
  io.write_safetensors(src, sd)
  r = run_cli("convert", src, dst, "--layout", "pytorch-fcn")
  assert r.returncode == 0, r.stderr
  assert "model fcn16s" in r.stdout and "caffe" in r.stdout
  _, meta = io.read(dst)
  assert meta["layout"] == "pytorch-fcn" and meta["model"] == "fcn16s"
  assert meta["num_classes"] == "21" and meta["preprocessing"] == pp.CAFFE.name
  model = weights.load(dst)  # reads back directly
  np.testing.assert_array_equal(np.asarray(model.score_skips[0].conv.kernel.get_value()),
                                sd["score_pool4.weight"].transpose(2, 3, 1, 0))

  r = run_cli("inspect", dst)
  assert r.returncode == 0, r.stderr
  n = sum(v.size for v in io.read(dst)[0].values())
  assert "layout: fcnjax" in r.stdout and f"parameters: {n:,}" in r.stdout
  assert "backbone.fc6.kernel" in r.stdout and "(7, 7, 64, 512)" in r.stdout
  assert "metadata.model: fcn16s" in r.stdout


def test_cli_convert_torchvision_to_fcn8s_in_process(tmp_path, capsys):
  src, dst = tmp_path / "vgg16_tiny.npz", tmp_path / "fcn8s_init.safetensors"
  io.write_npz(src, torchvision_state())
  assert main(["inspect", str(src)]) == 0
  assert "layout: torchvision-vgg16" in capsys.readouterr().out
  assert main(["convert", str(src), str(dst), "--layout", "torchvision-vgg16",
               "--model", "fcn8s"]) == 0
  _, meta = io.read(dst)
  assert meta["model"] == "fcn8s" and meta["preprocessing"] == pp.TORCHVISION.name
  model = weights.load(dst)
  assert not np.any(np.asarray(model.score_fr.conv.kernel.get_value()))  # zero score layers
  # Wrong layout: exit status 2 and a clear message.
  assert main(["convert", str(src), str(dst), "--layout", "pytorch-fcn"]) == 0  # vgg16_from_caffe-style
  assert io.read(dst)[1]["preprocessing"] == pp.CAFFE.name
  io.write_npz(src, pytorch_fcn_state(32))
  assert main(["convert", str(src), str(dst), "--layout", "torchvision-vgg16"]) == 2
  assert "keys look like 'pytorch-fcn'" in capsys.readouterr().err


@pytest.mark.parametrize("bad", ["missing.safetensors"])
def test_cli_missing_file(tmp_path, bad, capsys):
  assert main(["inspect", str(tmp_path / bad)]) == 2
  assert "not found" in capsys.readouterr().err
