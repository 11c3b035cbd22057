"""``export_model`` / ``load_exported`` for classifiers: (N, H, W, 3) uint8 -> (N, C) logits.

A tiny stand-in classifier (one conv + global max pooling, ``task = "classification"``) keeps
these tests independent of the real model's code; one test exports the real
:func:`fcnjax.models.fcn_classifier` (its minimum input size becomes the artifact's constraint).
:class:`StandInClassifier` and :func:`standin_loaded` are reused by the serving tests.
"""

from __future__ import annotations

import json
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fcnjax import preprocessing as preprocessing_lib
from fcnjax.inference import export as export_lib
from fcnjax.inference.loading import LoadedModel

CLASS_NAMES = ("cat", "dog", "bird")


class StandInClassifier(nnx.Module):
  """(N, H, W, 3) preprocessed float32 -> (N, num_classes) logits: a 3x3 SAME conv to the
  classes, then global max pooling. Any size >= 1 x 1."""

  task = "classification"

  def __init__(self, num_classes: int = len(CLASS_NAMES), seed: int = 0):
    self.conv = nnx.Conv(3, num_classes, (3, 3), padding="SAME", rngs=nnx.Rngs(seed))
    self.num_classes = num_classes
    self.preprocessing = preprocessing_lib.CAFFE

  def __call__(self, x, mask=None):
    return jnp.max(self.conv(x / 64.0), axis=(1, 2))


def standin_loaded(seed: int = 0) -> LoadedModel:
  """The stand-in wrapped as a :class:`LoadedModel` (what ``export_model`` takes)."""
  model = StandInClassifier(seed=seed)
  palette = np.zeros((256, 3), np.uint8)
  return LoadedModel(model, CLASS_NAMES, palette, preprocessing_lib.CAFFE,
                     "stand-in classifier (conv + global max)", {"model": "stand-in"})


def numpy_init(constructor, seed: int = 0):
  """``constructor()``'s module with its parameters drawn by numpy (He-normal conv kernels,
  zero biases, BatchNorm scale 1 / statistics 0 and 1) into its abstract state: jax's random
  initialisers compile a program per parameter shape, tens of seconds on a cold cache."""
  import jax
  graphdef, state = nnx.split(nnx.eval_shape(constructor))
  rng = np.random.default_rng(seed)
  for path, var in nnx.to_flat_state(state):
    shape, leaf = var.shape, str(path[-1])
    if isinstance(var, nnx.RngKey):
      value = jax.random.key(seed)
    elif isinstance(var, nnx.Param) and len(shape) == 4:
      value = rng.normal(0, np.sqrt(2 / np.prod(shape[:-1])), shape)
    elif leaf in ("scale", "var"):
      value = np.ones(shape)
    else:
      value = np.zeros(shape)
    var.set_value(value if isinstance(var, nnx.RngKey) else jnp.asarray(value, var.dtype))
  return nnx.merge(graphdef, state)


_forward = nnx.jit(lambda model, x: model(x))  # one program per shape (eagerly: one per op)


def _reference(loaded, images):
  return np.asarray(_forward(loaded.model, jnp.asarray(loaded.preprocessing.fn(images))))


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
  out = tmp_path_factory.mktemp("export-cls") / "standin.jaxexport"
  loaded = standin_loaded()
  meta = export_lib.export_model(loaded, out, platforms=("cpu",))
  return loaded, out, meta


def test_standin_meta(standin):
  _, out, meta = standin
  assert meta == json.loads(pathlib.Path(f"{out}.json").read_text())
  assert meta["task"] == "classification"
  assert meta["output"] == {"dtype": "float32", "layout": "NC logits", "kind": "logits",
                            "shape": ["N", 3]}
  assert meta["input"]["shape"] == ["N", "H", "W", 3]
  assert meta["min_input_size"] == [1, 1] and meta["shape_constraints"] == "N >= 1, H >= 1, W >= 1"
  assert meta["class_names"] == list(CLASS_NAMES) and meta["num_classes"] == 3
  assert meta["translation_period"] is None and meta["input_multiple"] == 1
  assert meta["check"]["max_abs_diff"] <= 1e-5 * max(1.0, meta["check"]["max_abs_logit"])


def test_standin_round_trip(standin):
  loaded, out, _ = standin
  model = export_lib.load_exported(out)
  assert model.task == "classification" and model.num_classes == 3
  assert model.class_names == CLASS_NAMES and model.translation_period is None
  rng = np.random.default_rng(0)
  for shape in ((1, 1, 1, 3), (2, 30, 300, 3), (3, 17, 9, 3)):
    images = rng.integers(0, 256, shape, dtype=np.uint8)
    got, want = model(images), _reference(loaded, images)
    assert got.dtype == np.float32 and got.shape == (shape[0], 3) == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_task_in_meta_decides_the_signature(standin, tmp_path):
  _, out, meta = standin
  data = out.read_bytes()

  def variant(name, **changes):
    p = tmp_path / name
    p.write_bytes(data)
    m = {k: v for k, v in meta.items() if k != "task"}
    m.update({k: v for k, v in changes.items() if v is not None})
    pathlib.Path(f"{p}.json").write_text(json.dumps(m))
    return p

  # metadata written before "task" existed means segmentation: (N, H, W, C) expected
  with pytest.raises(export_lib.ExportError, match=r"\(N, H, W, 3\) \(segmentation\)"):
    export_lib.load_exported(variant("no-task"))
  with pytest.raises(export_lib.ExportError, match="unknown task 'detection'"):
    export_lib.load_exported(variant("other-task", task="detection"))
  assert export_lib.load_exported(variant("same", task="classification")).task == \
      "classification"


def test_real_fcn_classifier_export(tmp_path):
  classifier = pytest.importorskip("fcnjax.models.classifier")
  model = numpy_init(lambda: classifier.fcn_classifier(4, width_multiplier=1 / 8, seed=0))
  model.eval()
  model.preprocessing = preprocessing_lib.CAFFE
  mh, mw = classifier.min_input_size(model)
  loaded = LoadedModel(model, ("a", "b", "c", "d"), np.zeros((256, 3), np.uint8),
                       preprocessing_lib.CAFFE, "fcn_classifier x1/8", {"model": "convstack"})
  out = tmp_path / "cls.jaxexport"
  meta = export_lib.export_model(loaded, out, platforms=("cpu",))
  assert meta["task"] == "classification" and meta["min_input_size"] == [mh, mw]
  assert meta["shape_constraints"] == f"N >= 1, H >= {mh}, W >= {mw}"
  exported = export_lib.load_exported(out)
  assert exported.min_input_size == (mh, mw)
  rng = np.random.default_rng(1)
  for shape in ((2, 30, 300, 3), (1, mh, mw, 3)):
    images = rng.integers(0, 256, shape, dtype=np.uint8)
    np.testing.assert_allclose(exported(images), _reference(loaded, images), rtol=1e-4,
                               atol=1e-4)
  with pytest.raises(ValueError, match=f"minimum input size {mh}x{mw}"):
    exported(np.zeros((1, mh - 1, 300, 3), np.uint8))
