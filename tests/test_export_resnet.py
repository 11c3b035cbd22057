"""``python -m fcnjax.export`` for the ResNet segmenters: the d2l FCN (PyTorch's on ResNet-18,
TF2's on Keras' ResNet-101 V2), torchvision's FCN-ResNet50 (with its aux head in the file, absent
from the artifact) and the paper's FCN-8s on a ResNet-18.

Each tiny model gets random weights and random BatchNorm statistics (so that eval-mode BN is not
the identity), is saved as an fcnjax ``.safetensors``, exported through the CLI for the CPU, read
back with ``jax.export.deserialize`` and run at odd, non-square sizes and batch sizes, down to
1x1; its logits must equal the model's own within 1e-4 x max |logit| (the export's float32
contract, the tolerance of tests/test_export.py).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fcnjax import models
from fcnjax import weights
from fcnjax.export import main
from fcnjax.models import resnet_fcn
from test_export_classifier import numpy_init

#: (N, H, W) of the images run through every artifact.
SIZES = ((1, 1, 1), (2, 37, 53), (1, 64, 64), (1, 33, 100), (2, 97, 41))
#: registry name -> build options
MODELS = {
    "d2l_fcn_resnet18": {"width_multiplier": 1 / 8},
    "fcn_resnet50": {"width_multiplier": 1 / 16, "aux": True},
    "fcn8s-resnet18": {"width_multiplier": 1 / 8},
    "d2l_fcn_resnet101v2": {"width_multiplier": 1 / 16},   # Keras' ResNet V2, [-1, 1] input
}


def _random_statistics(model, seed: int):
  """Random BatchNorm means / variances / scales / biases and non-zero head biases, in place."""
  rng = np.random.default_rng(seed)
  for path, var in nnx.to_flat_state(nnx.state(model)):
    leaf = str(path[-1])
    if isinstance(var, nnx.RngKey) or isinstance(var, nnx.RngCount):
      continue
    shape = var.shape
    if leaf == "mean":
      value = rng.normal(0, 0.1, shape)
    elif leaf == "var":
      value = rng.uniform(0.5, 1.5, shape)
    elif leaf == "scale":
      value = rng.uniform(0.5, 1.5, shape)
    elif leaf == "bias" or (leaf == "kernel" and not np.any(np.asarray(var.get_value()))):
      value = rng.normal(0, 0.1, shape)  # zero-initialised heads would make the test blind
    else:
      continue
    var.set_value(jnp.asarray(value, var.dtype))


def _tiny(name: str, seed: int = 0):
  options = MODELS[name]
  model = numpy_init(lambda: models.build_model(name, 4, seed=seed, **options), seed)
  _random_statistics(model, seed + 1)
  model.eval()
  return model


_forward = nnx.jit(lambda model, x: model(x))


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
  work = tmp_path_factory.mktemp("export_resnet")
  out = {}
  for name in MODELS:
    model = _tiny(name)
    wpath, apath = work / f"{name}.safetensors", work / f"{name}.jaxexport"
    weights.save(model, wpath)
    assert main([str(wpath), str(apath), "--platforms", "cpu"]) == 0
    out[name] = (model, apath)
  return out


@pytest.mark.parametrize("name", sorted(MODELS))
def test_resnet_artifact_matches_the_model(artifacts, name):
  model, apath = artifacts[name]
  exp = jax.export.deserialize(bytearray(apath.read_bytes()))
  meta = json.loads(apath.with_name(apath.name + ".json").read_text())
  assert meta["task"] == "segmentation" and meta["min_input_size"] == [1, 1]
  assert meta["preprocessing"]["name"] == model.preprocessing.name == (
      "keras-tf-rgb-pm1" if name.endswith("v2") else "torchvision-rgb-imagenet")
  assert meta["check"]["max_abs_diff"] <= 1e-4 * max(meta["check"]["max_abs_logit"], 1.0)
  rng = np.random.default_rng(3)
  for n, h, w in SIZES:
    images = rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    got = np.asarray(exp.call(images))
    want = np.asarray(_forward(model, jnp.asarray(model.preprocessing.fn(images))))
    assert got.shape == want.shape == (n, h, w, 4)
    scale = max(float(np.abs(want).max()), 1.0)
    assert np.abs(got - want).max() <= 1e-4 * scale, (name, (n, h, w))


def test_fcn_resnet_artifact_has_no_aux_output(artifacts):
  """The file holds the aux head; the artifact returns only the main logits."""
  model, apath = artifacts["fcn_resnet50"]
  assert model.aux_classifier is not None
  exp = jax.export.deserialize(bytearray(apath.read_bytes()))
  assert len(exp.out_avals) == 1


@pytest.mark.parametrize("out_size,in_size", [(1, 1), (7, 1), (1, 9), (37, 5), (64, 8),
                                              (33, 13), (5, 37)])
def test_symbolic_resize_weights_equal_the_numpy_ones(out_size, in_size):
  """The in-program weights (for symbolic sizes) are those of the cached numpy matrix."""
  got = np.asarray(resnet_fcn._interp_matrix_symbolic(out_size, in_size, jnp.float32))
  np.testing.assert_allclose(got, resnet_fcn._interp_matrix(out_size, in_size), rtol=0,
                             atol=1e-6)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_bucketed_prediction_of_a_resnet_model_equals_exact(artifacts, name):
  """The Predictor passes each bucket's mask: a ResNet model's padded prediction is each
  image's lone one. The export of torchvision's FCN-ResNet (no mask input, scores resized to
  the whole input) says padding is unsafe and the Predictor then runs it exact."""
  from fcnjax.inference import Predictor
  model, apath = artifacts[name]
  rng = np.random.default_rng(5)
  images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            for h, w in ((37, 53), (20, 9), (64, 64), (1, 1), (50, 61))]
  bucketed = Predictor(model, max_buckets=1)
  exact = Predictor(model, exact=True)
  got = [r.probs for r in bucketed.predict_many(images, proba=True)]
  assert bucketed.programs_compiled == 1  # every image padded into one bucket
  # float32 rounding of the logits (up to ~160 with random BN statistics) summed in another
  # order moves them by up to 1e-5 x max |logit|, the probabilities by at most that much
  # (measured up to 2.1e-4 on logits of 157); without the mask they differ by up to 0.8
  for im, g in zip(images, got):
    x = jnp.asarray(model.preprocessing.fn(im)[None])
    tol = 1e-5 * float(np.abs(np.asarray(_forward(model, x))).max())
    np.testing.assert_allclose(g, exact.predict_proba(im), rtol=0, atol=tol)
  meta = json.loads(apath.with_name(apath.name + ".json").read_text())
  assert meta["bucket_padding_safe"] is (name != "fcn_resnet50")
  from_export = Predictor(apath, max_buckets=1)
  assert from_export.exact is (name == "fcn_resnet50")
  for im in images[:2]:  # the export's contract: logits within 1e-4 x max |logit|
    x = jnp.asarray(model.preprocessing.fn(im)[None])
    tol = 1e-4 * float(np.abs(np.asarray(_forward(model, x))).max())
    np.testing.assert_allclose(from_export.predict_proba(im), exact.predict_proba(im),
                               rtol=0, atol=tol)
