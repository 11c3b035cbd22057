"""Keras' ResNet V2 (``keras.applications.ResNet50V2`` / ``ResNet101V2``, Keras 3 on the jax
backend) as the independent reference of fcnjax's pre-activation ResNet and the
``keras-resnet-v2`` weight layout.

Random weights and non-trivial BatchNorm statistics are set in Keras, saved as Keras' layer-named
``.h5`` (the format of the ImageNet files), loaded by ``fcnjax.weights``; inference outputs agree
at odd and non-square sizes within 1e-4 x max |output| (float32, different conv algorithms).
"""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")  # before keras is imported

import jax.numpy as jnp  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from fcnjax import preprocessing  # noqa: E402
from fcnjax.models.resnet import KERAS_BN_EPS, KERAS_BN_MOMENTUM  # noqa: E402
from fcnjax.weights import api, errors, io, layouts  # noqa: E402
from fcnjax.weights.__main__ import main as weights_cli  # noqa: E402

RTOL = 1e-4
SIZES = [(33, 47), (64, 64), (50, 97)]


def _randomised_keras(depth: int, seed: int = 0):
  """A Keras ResNet{depth}V2 without top, every weight random: He-scaled kernels, small biases,
  BatchNorm gamma in [0.5, 1.5], beta ~ N(0, 0.1), moving mean ~ N(0, 0.1), variance in
  [0.5, 2]."""
  build = {50: keras.applications.ResNet50V2, 101: keras.applications.ResNet101V2}[depth]
  model = build(weights=None, include_top=False, input_shape=(None, None, 3))
  rng = np.random.default_rng(seed)
  for layer in model.layers:
    new = []
    for w in layer.weights:
      name, shape = w.path.rsplit("/", 1)[-1], tuple(w.shape)
      if name == "kernel":
        v = rng.normal(0, np.sqrt(2.0 / np.prod(shape[:-1])), shape)
      elif name == "gamma":
        v = rng.uniform(0.5, 1.5, shape)
      elif name == "moving_variance":
        v = rng.uniform(0.5, 2.0, shape)
      else:  # bias, beta, moving_mean
        v = rng.normal(0, 0.1, shape)
      new.append(v.astype(np.float32))
    if new:
      layer.set_weights(new)
  return model


@pytest.fixture(scope="module")
def keras50(tmp_path_factory):
  model = _randomised_keras(50)
  path = tmp_path_factory.mktemp("keras") / "resnet50v2.h5"
  model.save(path)  # Keras' layer-named HDF5, as keras.applications' ImageNet files
  return model, path


def _rel(got, want) -> float:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def test_resnet50v2_matches_keras_at_three_sizes(keras50):
  kmodel, path = keras50
  model = api.load(path)  # architecture from the file: depth from the blocks, width from conv1
  assert type(model.backbone if hasattr(model, "backbone") else model).__name__ == "PreActResNet"
  assert model.depth == 50 and model.preprocessing == preprocessing.KERAS_TF
  model.eval()
  rng = np.random.default_rng(1)
  for h, w in SIZES:
    x = rng.normal(size=(2, h, w, 3)).astype(np.float32)
    want = np.asarray(kmodel(x, training=False))
    got = np.asarray(model(jnp.asarray(x))["layer4"])
    assert got.shape == want.shape, (h, w)
    assert _rel(got, want) <= RTOL, ((h, w), _rel(got, want))


def test_resnet101v2_backbone_of_the_d2l_tf2_fcn_matches_keras(tmp_path):
  kmodel = _randomised_keras(101, seed=3)
  path = tmp_path / "resnet101v2.h5"
  kmodel.save(path)
  model = api.build_model("d2l_fcn_resnet101v2", 21)
  report = api.init_from(path, model)  # the backbone from the file, the head keeps its init
  assert report.layout == layouts.KERAS_RESNET_V2
  assert model.preprocessing == preprocessing.KERAS_TF
  model.eval()
  x = np.random.default_rng(4).normal(size=(1, 45, 71, 3)).astype(np.float32)
  want = np.asarray(kmodel(x, training=False))
  got = np.asarray(model.backbone(jnp.asarray(x))["layer4"])
  assert _rel(got, want) <= RTOL


def test_keras_preprocessing_and_batch_norm_settings_are_keras_own():
  rgb = np.array([[[0, 127, 255]]], np.uint8)
  want = keras.applications.resnet_v2.preprocess_input(rgb.astype(np.float32))
  np.testing.assert_allclose(preprocessing.KERAS_TF(rgb), np.asarray(want), rtol=0, atol=1e-6)
  bn = keras.layers.BatchNormalization()
  assert KERAS_BN_MOMENTUM == bn.momentum
  kmodel = keras.applications.ResNet50V2(weights=None, include_top=False,
                                         input_shape=(None, None, 3))
  assert kmodel.get_layer("post_bn").epsilon == KERAS_BN_EPS


def test_convert_and_inspect_cli(keras50, tmp_path, capsys):
  _, path = keras50
  dst = tmp_path / "r50v2.safetensors"
  assert weights_cli(["convert", str(path), str(dst), "--layout", "keras-resnet-v2"]) == 0
  assert weights_cli(["inspect", str(path)]) == 0
  out = capsys.readouterr().out
  assert "layout: keras-resnet-v2" in out and "model: resnet50v2 (width x1)" in out
  loaded = api.load(dst)
  assert loaded.depth == 50 and loaded.preprocessing == preprocessing.KERAS_TF


def test_bad_keras_files_are_one_clear_error(keras50, tmp_path, capsys):
  kmodel, path = keras50
  native = tmp_path / "model.weights.h5"
  kmodel.save_weights(native)  # Keras 3's own format: layers named by creation order
  with pytest.raises(errors.FormatError, match="model.weights.h5: not a layer-named Keras"):
    io.read(native)
  assert weights_cli(["inspect", str(native)]) == 2
  assert "error:" in capsys.readouterr().err
  garbage = tmp_path / "garbage.h5"
  garbage.write_bytes(b"not hdf5")
  with pytest.raises(errors.FormatError, match="garbage.h5: not a readable HDF5 file"):
    io.read(garbage)
  # a Keras V2 file into a torchvision-structured ResNet: the layout names what it needs
  with pytest.raises(errors.LayoutError, match="pre-activation ResNet"):
    api.load_into(api.build_model("resnet50", 21), path)
