"""One table of named architectures (fcnjax.models.registry), read by every builder."""

import jax
import numpy as np
import pytest
from flax import nnx

from fcnjax import models, weights
from fcnjax.weights import layouts

NAMES = ["fcn32s", "fcn16s", "fcn8s", "fcn8s-atonce", "fcn4s", "fcn2s", "vgg16"]
RESNET_SEGMENTERS = ["fcn_resnet50", "fcn_resnet101", "d2l_fcn_resnet18", "d2l_fcn_resnet101v2",
                     "fcn8s-resnet18", "fcn8s-resnet50"]
RESNET_BACKBONES = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet50v2", "resnet101v2",
                    "resnet152v2"]
CLASSIFIERS = ["fcn_classifier", "fcn_classifier-vgg16", "fcn_classifier-resnet18",
               "fcn_classifier-resnet50"]


def abstract(name, **kwargs):
  return nnx.eval_shape(lambda: models.build_model(name, 21, width_multiplier=1 / 16, **kwargs))


def test_names_and_descriptions():
  names = models.model_names()
  assert list(names) == NAMES + RESNET_SEGMENTERS + RESNET_BACKBONES + CLASSIFIERS
  assert all(isinstance(d, str) and d and "\n" not in d for d in names.values())
  # MODELS: the segmenters, name -> constructor
  assert list(models.MODELS) == NAMES[:-1] + RESNET_SEGMENTERS
  assert all(models.MODELS[n] is models.SPECS[n].constructor for n in models.MODELS)
  assert list(models.CLASSIFIERS) == CLASSIFIERS


def test_unknown_name_lists_the_known_ones():
  with pytest.raises(ValueError, match="unknown model 'fcn1s'.*fcn32s.*fcn8s-atonce.*vgg16"):
    models.build_model("fcn1s")


@pytest.mark.parametrize("name", RESNET_SEGMENTERS + RESNET_BACKBONES)
def test_each_resnet_spec_builds_and_names_itself(name):
  model = abstract(name)
  assert weights.model_name(model) == name
  assert models.get_spec(name).is_segmenter == (name in RESNET_SEGMENTERS)


@pytest.mark.parametrize("name", NAMES)
def test_each_spec_builds_its_architecture(name):
  spec = models.get_spec(name)
  model = abstract(name)
  if not spec.is_fcn:
    assert isinstance(model, models.VGG)
    return
  assert isinstance(model, models.FCN) and model.skips == spec.skips
  scales = tuple(h.input_scale for h in model.score_skips)
  assert scales == (spec.skip_scales or (None,) * len(spec.skips))
  assert model.output_stride == 32 // 2 ** len(spec.skips)
  if spec.pytorch_fcn_upscore is not None:
    assert len(spec.pytorch_fcn_upscore) == len(spec.skips) + 1
    assert layouts.pytorch_fcn_upscore_names(model) == list(spec.pytorch_fcn_upscore)
  assert weights.model_name(model) == name                 # the name back from the model


def test_models_constructors_keep_their_call_signature():
  model = nnx.eval_shape(lambda: models.MODELS["fcn16s"](
      7, width_multiplier=1 / 16, aligned=True, learnable_upsampling=True, batch_norm=True,
      dtype=None, rngs=nnx.Rngs(0)))
  assert model.num_classes == 7 and model.upscore_final.learnable
  assert model.backbone.input_multiple == 32 and model.backbone.blocks[0].norms is not None


def test_build_model_seeds_params_and_dropout_streams():
  """``seed`` means ``nnx.Rngs(params=seed, dropout=seed + 1)`` (what training always used)."""
  a = models.build_model("fcn8s", 21, width_multiplier=1 / 16, aligned=True, seed=3)
  b = models.fcn8s(21, width_multiplier=1 / 16, aligned=True,
                   rngs=nnx.Rngs(params=3, dropout=4))
  c = models.build_model("fcn8s", 21, width_multiplier=1 / 16, aligned=True,
                         rngs=nnx.Rngs(params=3, dropout=4))
  leaves = [jax.tree.leaves(nnx.state(m, nnx.Param)) for m in (a, b, c)]
  for x, y, z in zip(*leaves):
    np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(x, z)
  keys = [jax.random.key_data(m.backbone.drop6.rngs.key[...]) for m in (a, b)]
  np.testing.assert_array_equal(*keys)


def test_weights_build_model_is_the_registry_one():
  assert weights.build_model is models.build_model


def test_pytorch_fcn_model_inferred_from_the_registry_names():
  for name in ("fcn32s", "fcn16s", "fcn8s"):
    keys = [f"{n}.weight" for n in models.get_spec(name).pytorch_fcn_upscore]
    assert layouts.infer_pytorch_fcn_model(keys + ["score_fr.weight"]) == name
  keys = ["upscore8.weight", "score_fr.weight"]
  assert layouts.infer_pytorch_fcn_model(keys, "fcn8s-atonce_from_caffe.pth") == "fcn8s-atonce"
  assert layouts.infer_pytorch_fcn_model(["conv1_1.weight"]) == "vgg16"
