"""fcnjax.weights without PyTorch: surgery, layouts, every error case, file round trips, cascade."""

from __future__ import annotations

import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import fcnjax.models as M
from fcnjax import preprocessing as pp
from fcnjax import weights
from fcnjax.models.layers import bilinear_kernel, transposed_conv
from fcnjax.weights import io, layouts, surgery

MULT = 1 / 8  # widths 8, 16, 32, 64, 64; fc 512 (as the parity tests: jit caches are shared)
DEPTHS = (2, 2, 3, 3, 3)
WIDTHS = [8, 16, 32, 64, 64]
FC = 512


def rng(seed=0):
  return np.random.default_rng(seed)


def torchvision_state(seed=0, num_classes=10):
  """A random torchvision-layout VGG16 state dict (numpy) at width 1/8."""
  r, sd, c, n = rng(seed), {}, 3, 0
  for d, w in zip(DEPTHS, WIDTHS):
    for _ in range(d):
      sd[f"features.{n}.weight"] = r.normal(size=(w, c, 3, 3)).astype(np.float32)
      sd[f"features.{n}.bias"] = r.normal(size=(w,)).astype(np.float32)
      c, n = w, n + 2
    n += 1
  for i, (o, inp) in zip((0, 3, 6), ((FC, c * 49), (FC, FC), (num_classes, FC))):
    sd[f"classifier.{i}.weight"] = r.normal(size=(o, inp)).astype(np.float32)
    sd[f"classifier.{i}.bias"] = r.normal(size=(o,)).astype(np.float32)
  return sd


def pytorch_fcn_state(stride=8, n_class=21, seed=0, learned_upscore=False):
  """A random pytorch-fcn-layout FCN state dict (numpy) at width 1/8."""
  r, sd, c = rng(seed), {}, 3
  for b, (d, w) in enumerate(zip(DEPTHS, WIDTHS)):
    for i in range(d):
      sd[f"conv{b + 1}_{i + 1}.weight"] = r.normal(size=(w, c, 3, 3)).astype(np.float32)
      sd[f"conv{b + 1}_{i + 1}.bias"] = r.normal(size=(w,)).astype(np.float32)
      c = w
  sd["fc6.weight"] = r.normal(size=(FC, c, 7, 7)).astype(np.float32)
  sd["fc6.bias"] = r.normal(size=(FC,)).astype(np.float32)
  sd["fc7.weight"] = r.normal(size=(FC, FC, 1, 1)).astype(np.float32)
  sd["fc7.bias"] = r.normal(size=(FC,)).astype(np.float32)
  sd["score_fr.weight"] = r.normal(size=(n_class, FC, 1, 1)).astype(np.float32)
  sd["score_fr.bias"] = r.normal(size=(n_class,)).astype(np.float32)
  heads = {32: [], 16: [("pool4", 64)], 8: [("pool4", 64), ("pool3", 32)]}[stride]
  for name, ch in heads:
    sd[f"score_{name}.weight"] = r.normal(size=(n_class, ch, 1, 1)).astype(np.float32)
    sd[f"score_{name}.bias"] = r.normal(size=(n_class,)).astype(np.float32)
  ups = {32: [("upscore", 32)], 16: [("upscore2", 2), ("upscore16", 16)],
         8: [("upscore2", 2), ("upscore_pool4", 2), ("upscore8", 8)]}[stride]
  for name, f in ups:
    k = surgery.hwio_to_deconv(bilinear_kernel(f, n_class))
    if learned_upscore:
      k = r.normal(size=k.shape).astype(np.float32)
    sd[f"{name}.weight"] = k
  return sd


def fcn(name="fcn8s", num_classes=21, **kw):
  return M.MODELS[name](num_classes, width_multiplier=MULT, rngs=nnx.Rngs(0), **kw)


def arr(v):
  return np.asarray(v.get_value() if isinstance(v, nnx.Variable) else v)


# ---------------------------------------------------------------------------------------------
# Surgery and layouts


def test_conv_and_deconv_round_trips():
  w = rng().normal(size=(5, 3, 7, 7)).astype(np.float32)
  assert np.array_equal(surgery.hwio_to_conv(surgery.conv_to_hwio(w)), w)
  assert surgery.conv_to_hwio(w)[2, 4, 1, 3] == w[3, 1, 2, 4]
  assert np.array_equal(surgery.hwio_to_deconv(surgery.deconv_to_hwio(w)), w)
  assert surgery.deconv_to_hwio(w)[2, 4, 3, 1] == w[3, 1, 2, 4]


def test_fc6_surgery_flatten_order_is_torch_chw():
  """classifier.0's column c*49 + h*7 + w (torch.flatten of NCHW) -> kernel[h, w, c, :]."""
  out, c = 6, 5
  lin = rng(1).normal(size=(out, c * 49)).astype(np.float32)
  k = surgery.linear_to_hwio(lin, 7, 7)
  assert k.shape == (7, 7, c, out)
  for o, ci, h, w in [(0, 0, 0, 1), (3, 4, 6, 2), (5, 2, 1, 6)]:
    assert k[h, w, ci, o] == lin[o, ci * 49 + h * 7 + w]
  assert np.array_equal(surgery.hwio_to_linear(k), lin)
  # A (7×7 map, flattened as torch does) · fc6 == the 7×7 conv at the single output position.
  x = rng(2).normal(size=(c, 7, 7)).astype(np.float32)
  np.testing.assert_allclose(np.einsum("hwc,hwco->o", x.transpose(1, 2, 0), k),
                             lin @ x.reshape(-1), rtol=1e-5, atol=1e-5)


def test_deconv_conversion_has_no_flip():
  """torch ConvTranspose2d scatter out[s*i+a] += x[i]·W[in,out,a] == transposed_conv(deconv_to_hwio)."""
  r = rng(3)
  x = r.normal(size=(1, 3, 4, 2)).astype(np.float32)  # NHWC
  w = r.normal(size=(2, 2, 4, 4)).astype(np.float32)  # torch (in, out, k, k), asymmetric
  s, k = 2, 4
  want = np.zeros((1, (3 - 1) * s + k, (4 - 1) * s + k, 2), np.float32)
  for i in range(3):
    for j in range(4):
      want[0, s * i:s * i + k, s * j:s * j + k, :] += np.einsum("c,cdab->abd", x[0, i, j], w)
  got = transposed_conv(jnp.asarray(x), jnp.asarray(surgery.deconv_to_hwio(w)), s)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_torchvision_feature_indices():
  rules = layouts.torchvision_vgg16_rules(fcn())
  idx = [int(r.src.split(".")[1]) for r in rules if r.src.startswith("features") and
         r.src.endswith("weight")]
  assert idx == [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]


def test_infer_layout():
  assert weights.infer_layout(torchvision_state()) == "torchvision-vgg16"
  assert weights.infer_layout(pytorch_fcn_state()) == "pytorch-fcn"
  assert weights.infer_layout({"backbone.fc6.kernel": 0}) == "fcnjax"
  with pytest.raises(weights.LayoutError, match="cannot infer"):
    weights.infer_layout({"foo.weight": 0})
  assert layouts.infer_pytorch_fcn_model(pytorch_fcn_state(16)) == "fcn16s"
  assert layouts.infer_pytorch_fcn_model(pytorch_fcn_state(32)) == "fcn32s"
  assert layouts.infer_pytorch_fcn_model(pytorch_fcn_state(8), "fcn8s-atonce_from_caffe.pth") \
      == "fcn8s-atonce"


# ---------------------------------------------------------------------------------------------
# Loading ImageNet VGG16


def test_load_vgg16_imagenet_torchvision_layout():
  sd = torchvision_state()
  model = fcn()
  report = weights.load_vgg16_imagenet(model, sd)
  bb = model.backbone
  np.testing.assert_array_equal(arr(bb.blocks[2].convs[1].kernel),
                                sd["features.12.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(arr(bb.fc6.kernel),
                                sd["classifier.0.weight"].reshape(FC, 64, 7, 7).transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(arr(bb.fc7.kernel)[0, 0], sd["classifier.3.weight"].T)
  assert not np.any(arr(model.score_fr.conv.kernel)) and not np.any(arr(model.score_skips[1].conv.kernel))
  assert model.preprocessing is pp.TORCHVISION
  assert sorted(report.ignored) == ["classifier.6.bias", "classifier.6.weight"]
  assert len(report.loaded) == 30


def test_vgg16_preprocessing_caffe_by_name_and_override(tmp_path):
  p = tmp_path / "vgg16_from_caffe.npz"
  io.write_npz(p, torchvision_state())
  model = fcn()
  weights.load_vgg16_imagenet(model, p)
  assert model.preprocessing is pp.CAFFE
  weights.load_vgg16_imagenet(model, p, preprocessing="torchvision")  # explicit choice
  assert model.preprocessing is pp.TORCHVISION


# ---------------------------------------------------------------------------------------------
# Error cases


def test_missing_key_names_it():
  sd = torchvision_state()
  del sd["features.7.bias"]
  with pytest.raises(weights.MissingKeyError, match=r"features\.7\.bias"):
    weights.load_vgg16_imagenet(fcn(), sd)


def test_unexpected_key_names_it():
  sd = pytorch_fcn_state()
  sd["conv6_1.weight"] = np.zeros(3, np.float32)
  with pytest.raises(weights.UnexpectedKeyError, match=r"conv6_1\.weight"):
    weights.load_pytorch_fcn(fcn(), sd)


def test_wrong_shape_names_key_and_shapes():
  sd = pytorch_fcn_state()
  sd["conv3_2.weight"] = np.zeros((32, 32, 5, 5), np.float32)
  with pytest.raises(weights.ShapeMismatchError) as e:
    weights.load_pytorch_fcn(fcn(), sd)
  msg = str(e.value)
  assert "conv3_2.weight" in msg and "(32, 32, 3, 3)" in msg and "(32, 32, 5, 5)" in msg
  # Wrong width (a full-width file into a reduced model) is reported the same way.
  with pytest.raises(weights.ShapeMismatchError, match=r"conv1_1\.weight.*\(8, 3, 3, 3\)"):
    weights.load_pytorch_fcn(fcn(), pytorch_fcn_state() | {"conv1_1.weight": np.zeros((64, 3, 3, 3))})


def test_failed_load_leaves_model_untouched():
  model = fcn()
  before = weights.state_arrays(model)
  sd = pytorch_fcn_state()
  del sd["score_pool3.bias"]
  with pytest.raises(weights.MissingKeyError):
    weights.load_pytorch_fcn(model, sd)
  after = weights.state_arrays(model)
  assert all(np.array_equal(before[k], after[k]) for k in before)


def test_wrong_num_classes_and_reinit_scores():
  sd = pytorch_fcn_state(n_class=21)
  model = fcn(num_classes=5)
  with pytest.raises(weights.NumClassesError, match="21 classes.*5.*reinit_scores=True"):
    weights.load_pytorch_fcn(model, sd)
  report = weights.load_pytorch_fcn(model, sd, reinit_scores=True)
  np.testing.assert_array_equal(arr(model.backbone.fc6.kernel),
                                sd["fc6.weight"].transpose(2, 3, 1, 0))
  assert not np.any(arr(model.score_fr.conv.kernel)) and not np.any(arr(model.score_skips[0].conv.kernel))
  assert "score_fr.conv.kernel" in report.kept_init and "score_fr.weight" in report.ignored
  # load() builds a model for the new class count directly.
  m2 = weights.load(sd, num_classes=5, reinit_scores=True)
  assert m2.num_classes == 5 and not np.any(arr(m2.score_fr.conv.kernel))


def test_fixed_upsampling_rejects_learned_kernel_and_learnable_loads_it():
  sd = pytorch_fcn_state(stride=16, learned_upscore=True)
  with pytest.raises(weights.UpsamplingKernelError, match="upscore2.*learnable_upsampling=True"):
    weights.load_pytorch_fcn(fcn("fcn16s"), sd)
  model = fcn("fcn16s", learnable_upsampling=True)
  weights.load_pytorch_fcn(model, sd)
  np.testing.assert_array_equal(arr(model.upscore_final.kernel),
                                sd["upscore16.weight"].transpose(2, 3, 0, 1))
  # Bilinear kernels within BILINEAR_ATOL are accepted for fixed upsampling.
  sd = pytorch_fcn_state(stride=16)
  sd["upscore16.weight"] = sd["upscore16.weight"] + 0.5 * weights.BILINEAR_ATOL
  assert len(weights.load_pytorch_fcn(fcn("fcn16s"), sd).checked) == 2


def test_pth_without_torch_is_a_clear_error(tmp_path, monkeypatch):
  p = tmp_path / "w.pth"
  p.write_bytes(b"not really")
  monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError
  with pytest.raises(weights.FormatError, match="needs PyTorch"):
    io.read(p)


def test_unknown_extension(tmp_path):
  p = tmp_path / "w.h5"
  p.write_bytes(b"")
  with pytest.raises(weights.FormatError, match="extension"):
    io.read(p)


# ---------------------------------------------------------------------------------------------
# File round trips


def test_npz_safetensors_pth_read_identically(tmp_path):
  sd = pytorch_fcn_state(stride=32)
  io.write_npz(tmp_path / "a.npz", sd)
  io.write_safetensors(tmp_path / "a.safetensors", sd, {"note": "x"})
  got_npz, _ = io.read(tmp_path / "a.npz")
  got_st, meta = io.read(tmp_path / "a.safetensors")
  assert meta == {"note": "x"}
  for got in (got_npz, got_st):
    assert got.keys() == sd.keys() and all(np.array_equal(got[k], sd[k]) for k in sd)
  torch = pytest.importorskip("torch", reason="the .pth round trip needs torch")
  torch.save({"model_state_dict": {k: torch.from_numpy(v) for k, v in sd.items()}},
             tmp_path / "a.pth")  # nested like pytorch-fcn's training checkpoints
  got_pth, _ = io.read(tmp_path / "a.pth")
  assert got_pth.keys() == sd.keys() and all(np.array_equal(got_pth[k], sd[k]) for k in sd)


def test_pth_is_read_weights_only(tmp_path):
  torch = pytest.importorskip("torch", reason="needs torch")
  torch.save({"w": torch.zeros(2), "evil": object()}, tmp_path / "bad.pth")
  with pytest.raises(weights.FormatError, match="weights_only"):
    io.read(tmp_path / "bad.pth")


def test_save_load_round_trip(tmp_path):
  model = fcn("fcn16s", learnable_upsampling=True)
  weights.load_pytorch_fcn(model, pytorch_fcn_state(16, learned_upscore=True, seed=4))
  weights.save(model, tmp_path / "m.safetensors")
  _, meta = io.read(tmp_path / "m.safetensors")
  assert meta["model"] == "fcn16s" and meta["num_classes"] == "21"
  assert meta["preprocessing"] == pp.CAFFE.name and meta["learnable_upsampling"] == "true"
  loaded = weights.load(tmp_path / "m.safetensors")  # architecture from metadata
  assert weights.model_name(loaded) == "fcn16s" and loaded.preprocessing is pp.CAFFE
  a, b = weights.state_arrays(model), weights.state_arrays(loaded)
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
  x = jnp.asarray(rng(5).normal(size=(1, 37, 45, 3)).astype(np.float32))
  model.eval(), loaded.eval()
  np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(loaded(x)))
  # Into an existing model of the same architecture (strict).
  weights.load(tmp_path / "m.safetensors", model=fcn("fcn16s", learnable_upsampling=True))
  # A fixed-upsampling model accepts the file only if its kernels are bilinear: here they are not.
  with pytest.raises(weights.UpsamplingKernelError):
    weights.load(tmp_path / "m.safetensors", model=fcn("fcn16s"))


def test_fixed_upsampling_file_into_learnable_model(tmp_path):
  """A fixed-upsampling fcnjax file (no kernels stored) means bilinear kernels."""
  model = fcn("fcn32s")
  weights.save(model, tmp_path / "f.safetensors")
  tensors, _ = io.read(tmp_path / "f.safetensors")
  assert not any(k.startswith("upscore") for k in tensors)
  m2 = weights.load(tmp_path / "f.safetensors", model=fcn("fcn32s", learnable_upsampling=True))
  np.testing.assert_array_equal(arr(m2.upscore_final.kernel), bilinear_kernel(32, 21))


def test_vgg16_backbone_file_round_trip(tmp_path):
  bb = M.vgg16(width_multiplier=MULT, rngs=nnx.Rngs(0))
  weights.load_vgg16_imagenet(bb, torchvision_state())
  weights.save(bb, tmp_path / "vgg.safetensors")
  back = weights.load(tmp_path / "vgg.safetensors")
  assert isinstance(back, M.VGG) and back.preprocessing is pp.TORCHVISION
  model = fcn()
  weights.load(tmp_path / "vgg.safetensors", model=model)  # backbone file into an FCN
  np.testing.assert_array_equal(arr(model.backbone.fc6.kernel), arr(bb.fc6.kernel))


# ---------------------------------------------------------------------------------------------
# init_from: the training --init flag


def test_init_from_cascade_fcn32s_to_fcn16s_to_fcn8s(tmp_path):
  m32 = fcn("fcn32s")
  weights.load_pytorch_fcn(m32, pytorch_fcn_state(32, seed=6))
  weights.save(m32, tmp_path / "32s.safetensors")
  m16 = fcn("fcn16s")
  report = weights.init_from(tmp_path / "32s.safetensors", m16)
  np.testing.assert_array_equal(arr(m16.score_fr.conv.kernel), arr(m32.score_fr.conv.kernel))
  np.testing.assert_array_equal(arr(m16.backbone.fc7.kernel), arr(m32.backbone.fc7.kernel))
  assert not np.any(arr(m16.score_skips[0].conv.kernel))  # new skip head stays zero
  assert "score_skips.0.conv.kernel" in report.kept_init
  # pytorch-fcn FCN-16s checkpoint into an FCN-8s (learnable: the k32 upscore16 is skipped).
  m8 = fcn("fcn8s", learnable_upsampling=True)
  sd16 = pytorch_fcn_state(16, seed=7, learned_upscore=True)
  report = weights.init_from(sd16, m8)
  np.testing.assert_array_equal(arr(m8.score_skips[0].conv.kernel),
                                sd16["score_pool4.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(arr(m8.upscore_skips[0].kernel),
                                sd16["upscore2.weight"].transpose(2, 3, 0, 1))
  assert not np.any(arr(m8.score_skips[1].conv.kernel))
  np.testing.assert_array_equal(arr(m8.upscore_final.kernel), bilinear_kernel(8, 21))


def test_init_from_imagenet_and_wrong_classes():
  model = fcn()
  report = weights.init_from(torchvision_state(), model)
  assert model.preprocessing is pp.TORCHVISION and len(report.loaded) == 30
  with pytest.raises(weights.NumClassesError):
    weights.init_from(pytorch_fcn_state(32, n_class=21), fcn("fcn32s", num_classes=3))
  weights.init_from(pytorch_fcn_state(32, n_class=21), fcn("fcn32s", num_classes=3),
                    reinit_scores=True)
  with pytest.raises(weights.ShapeMismatchError, match="fc6"):  # backbone stays strict
    weights.init_from(pytorch_fcn_state(32) | {"fc6.weight": np.zeros((FC, 64, 3, 3))}, fcn("fcn32s"))


def test_fcnjax_file_wrong_num_classes(tmp_path):
  weights.save(fcn("fcn32s"), tmp_path / "c21.safetensors")
  with pytest.raises(weights.NumClassesError, match="'score_fr.conv.kernel'"):
    weights.load(tmp_path / "c21.safetensors", model=fcn("fcn32s", num_classes=5))
  m = weights.load(tmp_path / "c21.safetensors", model=fcn("fcn32s", num_classes=5),
                   reinit_scores=True)
  assert m.num_classes == 5
