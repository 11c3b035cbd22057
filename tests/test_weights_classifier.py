"""fcnjax .safetensors of the FCN classifiers: save / load round trips for each backbone (with
non-trivial BatchNorm statistics), the metadata that rebuilds them, and each bad file as one
WeightsError naming the file and the key."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fcnjax import weights
from fcnjax.models import build_model
from fcnjax.models import classifier as clf
from fcnjax.weights import io
from fcnjax.weights.errors import (FormatError, LayoutError, MissingKeyError, ShapeMismatchError,
                                   UnexpectedKeyError, WeightsError)


def _with_random_statistics(model, seed=0):
  """Random BatchNorm means / variances, so that a lost statistic changes the logits."""
  key = jax.random.key(seed)
  for _, var in nnx.to_flat_state(nnx.state(model, nnx.BatchStat)):
    key, sub = jax.random.split(key)
    v = var.get_value()
    var.set_value(jax.random.uniform(sub, v.shape, v.dtype, 0.5, 1.5))
  model.eval()
  return model


CASES = {
    "convstack": dict(widths=(8, 16, 16, 32, 32), strides=(1, 2, 1, 2, 2), head_width=24,
                      dropout=0.1, pooling="avg"),
    "convstack-nohead-nobn": dict(widths=(4, 8, 8, 8, 8), head_width=None, batch_norm=False,
                                  masked=False),
    "vgg16": dict(backbone="vgg16", width_multiplier=1 / 16),
    "vgg16-exact": dict(backbone="vgg16", width_multiplier=1 / 16, aligned=False),
    "resnet18": dict(backbone="resnet18", width_multiplier=1 / 8, pooling="avg"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_round_trip_rebuilds_the_same_classifier(case, tmp_path):
  model = _with_random_statistics(clf.fcn_classifier(4, seed=1, **CASES[case]))
  path = tmp_path / "c.safetensors"
  weights.save(model, path)
  back = weights.load(path)
  back.eval()
  assert type(back.backbone) is type(model.backbone)
  assert (back.pooling, back.masked, back.num_classes) == (model.pooling, model.masked, 4)
  assert back.preprocessing == model.preprocessing
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 45, 70, 3)), jnp.float32)
  np.testing.assert_array_equal(np.asarray(back(x)), np.asarray(model(x)))
  assert weights.describe(back) == weights.describe(model)
  # and strictly into a model of the same architecture
  other = clf.fcn_classifier(4, seed=9, **CASES[case])
  weights.load(path, other)
  other.eval()
  np.testing.assert_array_equal(np.asarray(other(x)), np.asarray(model(x)))


@pytest.fixture
def saved(tmp_path):
  model = _with_random_statistics(clf.fcn_classifier(3, widths=(4, 4, 8, 8, 8), seed=0))
  path = tmp_path / "c.safetensors"
  weights.save(model, path)
  tensors, meta = io.read(path)
  return model, path, tensors, meta


def _write(tmp_path, tensors, meta, name="bad.safetensors"):
  p = tmp_path / name
  io.write_safetensors(p, tensors, meta)
  return p


def test_bad_classifier_files_name_the_file_and_the_key(saved, tmp_path):
  model, path, tensors, meta = saved
  key = "score_norm.mean"
  assert key in tensors
  cases = [
      ({k: v for k, v in tensors.items() if k != key}, meta, MissingKeyError, key),
      (tensors | {"extra.kernel": np.zeros(3, np.float32)}, meta, UnexpectedKeyError,
       "extra.kernel"),
      (tensors | {"head.kernel": np.zeros((1, 1, 8, 7), np.float32)}, meta, ShapeMismatchError,
       "head.kernel"),
      (tensors, meta | {"classifier_options": "{not json"}, FormatError, "classifier_options"),
      (tensors, meta | {"classifier_options": '{"widths": [4, 0]}'}, FormatError,
       "positive integers"),
      (tensors, meta | {"num_classes": "zero"}, FormatError, "num_classes"),
  ]
  for tensors_, meta_, error, says in cases:
    bad = _write(tmp_path, tensors_, meta_)
    with pytest.raises(error) as e:
      weights.load(bad)
    assert str(e.value).startswith(f"{bad}: ") and says in str(e.value), str(e.value)


def test_classifier_and_segmenter_files_do_not_mix(saved, tmp_path):
  model, path, _, _ = saved
  with pytest.raises(LayoutError, match="cannot be loaded into a FCN"):
    weights.load(path, build_model("fcn8s", 3, width_multiplier=1 / 16))
  seg = tmp_path / "seg.safetensors"
  weights.save(build_model("fcn32s", 3, width_multiplier=1 / 16), seg)
  with pytest.raises(LayoutError, match="'fcn32s'.*cannot load it into a classifier"):
    weights.load(seg, clf.fcn_classifier(3, widths=(4, 4, 8, 8, 8)))
  # a classifier of another architecture: strict keys / shapes
  with pytest.raises(ShapeMismatchError):
    weights.load(path, clf.fcn_classifier(3, widths=(4, 4, 8, 8, 16), seed=0))


def test_metadata_rebuilds_the_architecture(saved):
  model, path, _, meta = saved
  assert meta["model"] == "fcn_classifier" and meta["task"] == "classification"
  options = json.loads(meta["classifier_options"])
  assert options["widths"] == [4, 4, 8, 8, 8] and options["strides"] == [1, 1, 2, 2, 2]
  assert options["pooling"] == "max" and options["masked"] is True
