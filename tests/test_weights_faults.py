"""fcnjax.weights on broken inputs: every problem is a WeightsError naming the file (and the key).

Covers: unreadable .safetensors / .npz / .pth (empty, truncated, garbage), a missing file, files
lacking the keys the model is built from, malformed fcnjax metadata, wrong dtypes and ranks, the
path prefix on every load error, the NumClassesError hint, the exact <-> aligned geometry refusal,
and the weights CLI printing one ``error:`` line (no traceback) for each.
"""

from __future__ import annotations

import json
import struct
import zipfile

import numpy as np
import pytest

from fcnjax import weights
from fcnjax.weights import io
from fcnjax.weights.__main__ import main

from test_weights import fcn, pytorch_fcn_state, torchvision_state  # noqa: E402 (tests/ on path)


def raises_about(path, cls, *, key=None):
  """``pytest.raises(cls)`` whose message must start with ``"PATH: "`` (and name ``key``)."""

  class _Check:
    def __enter__(self):
      self.ctx = pytest.raises(cls)
      self.info = self.ctx.__enter__()
      return self.info

    def __exit__(self, *exc):
      suppressed = self.ctx.__exit__(*exc)
      e = self.info.value
      assert isinstance(e, weights.WeightsError)
      assert str(e).startswith(f"{path}: "), str(e)
      assert e.path == str(path)
      if key is not None:
        assert key in str(e) and e.key == key, (key, e.key, str(e))
      return suppressed

  return _Check()


def _trained_fcnjax_arrays(model, bump=1.0):
  """The model's arrays with nonzero (i.e. "trained") score layers, and its metadata."""
  arrays = weights.state_arrays(model)
  for k in arrays:
    if k.startswith("score"):
      arrays[k] = arrays[k] + bump
  return arrays, weights.describe(model)


# ---------------------------------------------------------------------------------------------
# 1-3: unreadable files


@pytest.fixture(scope="module")
def good_files(tmp_path_factory):
  d = tmp_path_factory.mktemp("good")
  sd = pytorch_fcn_state(32)
  io.write_safetensors(d / "a.safetensors", sd, {"note": "x"})
  io.write_npz(d / "a.npz", sd)
  return d, sd


def _damaged(data: bytes):
  return {"empty": b"", "truncated": data[:len(data) // 2], "short-tail": data[:-7],
          "garbage": b"\x00not weights at all\xff" * 9}


@pytest.mark.parametrize("how", ["empty", "truncated", "short-tail", "garbage", "bad-json"])
def test_unreadable_safetensors_is_format_error(tmp_path, good_files, how):
  data = (good_files[0] / "a.safetensors").read_bytes()
  if how == "bad-json":  # a well-framed header that is not JSON
    header = b"{not json" + b" " * 7
    data = struct.pack("<Q", len(header)) + header
  else:
    data = _damaged(data)[how]
  p = tmp_path / f"{how}.safetensors"
  p.write_bytes(data)
  with raises_about(p, weights.FormatError) as e:
    io.read(p)
  assert "not a readable safetensors file (truncated, empty or not safetensors: " in str(e.value)
  with raises_about(p, weights.FormatError):
    weights.load(p)  # the same through the API


@pytest.mark.parametrize("how", ["empty", "truncated", "short-tail", "garbage", "npy",
                                 "bad-member", "flipped-byte"])
def test_unreadable_npz_is_format_error(tmp_path, good_files, how):
  data = (good_files[0] / "a.npz").read_bytes()
  p = tmp_path / f"{how}.npz"
  if how == "npy":  # a single array saved as .npy under an .npz name
    with open(p, "wb") as f:
      np.save(f, np.zeros(3, np.float32))
  elif how == "bad-member":  # a valid zip whose member is not a .npy
    with zipfile.ZipFile(p, "w") as z:
      z.writestr("fc6.weight.npy", b"\x93NUMPY" + b"\x00" * 40)
  elif how == "flipped-byte":  # intact zip directory, damaged member data (bad CRC)
    damaged = bytearray(data)
    damaged[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(damaged))
  else:
    p.write_bytes(_damaged(data)[how])
  with raises_about(p, weights.FormatError) as e:
    weights.init_from(p, fcn("fcn32s"))
  msg = str(e.value)
  if how in ("bad-member", "flipped-byte"):
    assert "cannot be read (damaged archive: " in msg and e.value.key is not None, msg
  else:
    assert "not a readable npz file (truncated, empty or not npz: " in msg, msg


@pytest.mark.parametrize("how", ["empty", "truncated", "garbage", "not-a-dict", "non-tensor"])
def test_unreadable_pth_is_format_error(tmp_path, how):
  torch = pytest.importorskip("torch", reason="reading .pth needs torch")
  p = tmp_path / f"{how}.pth"
  good = tmp_path / "good.pth"
  torch.save({"conv1_1.weight": torch.zeros(8, 3, 3, 3)}, good)
  if how == "not-a-dict":
    torch.save([torch.zeros(2)], p)
  elif how == "non-tensor":
    torch.save({"conv1_1.weight": torch.zeros(2), "epoch": 3}, p)
  else:
    p.write_bytes(_damaged(good.read_bytes())[how])
  with raises_about(p, weights.FormatError):
    weights.load(p)


def test_missing_file_is_weights_file_not_found(tmp_path):
  p = tmp_path / "nope.safetensors"
  for call in (lambda: io.read(p), lambda: weights.load(p), lambda: weights.init_from(p, fcn())):
    with raises_about(p, weights.WeightsFileNotFound) as e:
      call()
    assert isinstance(e.value, FileNotFoundError) and "weight file not found" in str(e.value)
  with pytest.raises(FileNotFoundError):  # existing handlers keep working
    weights.load(p)
  with raises_about(tmp_path, weights.FormatError):  # a directory is not a weight file
    io.read(tmp_path)


# ---------------------------------------------------------------------------------------------
# 5: keys, metadata, dtypes and ranks the load path relies on


@pytest.mark.parametrize("layout,key", [("pytorch-fcn", "conv1_1.weight"),
                                        ("torchvision-vgg16", "features.0.weight")])
def test_load_without_the_width_key_names_file_and_key(tmp_path, layout, key):
  sd = pytorch_fcn_state(32) if layout == "pytorch-fcn" else torchvision_state()
  del sd[key]
  p = tmp_path / "w.npz"
  io.write_npz(p, sd)
  with raises_about(p, weights.MissingKeyError, key=key):
    weights.load(p)
  with raises_about(p, weights.MissingKeyError, key=key):
    weights.convert(p, tmp_path / "out.safetensors", layout=layout)


@pytest.mark.parametrize("name,value", [("model", "fcn99"), ("num_classes", "many"),
                                        ("num_classes", "0"), ("width_multiplier", "-1"),
                                        ("aligned", "yes"), ("learnable_upsampling", "1"),
                                        ("pool", "avg")])
def test_malformed_fcnjax_metadata_names_file_and_key(tmp_path, name, value):
  model = fcn("fcn32s")
  p = tmp_path / "m.safetensors"
  io.write_safetensors(p, weights.state_arrays(model), weights.describe(model) | {name: value})
  with raises_about(p, weights.FormatError) as e:
    weights.load(p)
  assert e.value.key == f"metadata.{name}" and f"metadata {name!r} is {value!r}" in str(e.value)


def test_fcnjax_file_without_model_metadata(tmp_path):
  model = fcn("fcn32s")
  p = tmp_path / "m.safetensors"
  meta = weights.describe(model)
  del meta["model"]
  io.write_safetensors(p, weights.state_arrays(model), meta)
  with raises_about(p, weights.LayoutError):
    weights.load(p)
  assert weights.model_name(weights.load(p, model_name_override="fcn32s")) == "fcn32s"


def test_wrong_dtype_and_rank_are_weights_errors(tmp_path):
  p = tmp_path / "w.npz"
  cases = [("conv1_1.weight", np.zeros((8, 3, 3, 3), np.int32), weights.DTypeError),
           ("conv3_2.bias", np.zeros(32, bool), weights.DTypeError),
           ("conv1_1.weight", np.zeros((8, 3, 3), np.float32), weights.ShapeMismatchError),
           ("score_fr.weight", np.float32(3.0), weights.ShapeMismatchError),
           ("fc7.bias", np.zeros((512, 1), np.float32), weights.ShapeMismatchError)]
  for key, value, cls in cases:
    io.write_npz(p, pytorch_fcn_state(32) | {key: value})
    with raises_about(p, cls, key=key):
      weights.load(p)  # built from the file
    with raises_about(p, cls, key=key):
      weights.load_into(fcn("fcn32s"), p)  # into a model
  # Object arrays can only come from memory (npz refuses pickles): still a WeightsError.
  obj = np.empty((21,), object)
  with pytest.raises(weights.DTypeError, match="score_fr.bias.*object"):
    weights.load_pytorch_fcn(fcn("fcn32s"), pytorch_fcn_state(32) | {"score_fr.bias": obj})
  with pytest.raises(weights.FormatError, match="'fc6.bias' is not an array"):
    weights.load({**pytorch_fcn_state(32), "fc6.bias": [[1.0], [1.0, 2.0]]})


# ---------------------------------------------------------------------------------------------
# 6-7: the path prefix on every load error; the reinit-scores hint


def test_every_load_error_starts_with_the_path(tmp_path):
  p = tmp_path / "fcn8s.npz"
  sd = pytorch_fcn_state(8)
  del sd["score_pool3.bias"]
  io.write_npz(p, sd)
  with raises_about(p, weights.MissingKeyError, key="score_pool3.bias"):
    weights.load_pytorch_fcn(fcn(), p)
  io.write_npz(p, pytorch_fcn_state(8) | {"conv6_1.weight": np.zeros(3, np.float32)})
  with raises_about(p, weights.UnexpectedKeyError, key="conv6_1.weight"):
    weights.load_into(fcn(), p)
  io.write_npz(p, pytorch_fcn_state(16, learned_upscore=True))
  with raises_about(p, weights.UpsamplingKernelError):
    weights.load(p, model=fcn("fcn16s"))
  io.write_npz(p, {"foo.weight": np.zeros(2, np.float32)})
  with raises_about(p, weights.LayoutError):
    weights.init_from(p, fcn())
  io.write_npz(p, pytorch_fcn_state(8))
  with raises_about(p, weights.LayoutError):
    weights.convert(p, tmp_path / "o.safetensors", layout="torchvision-vgg16")
  io.write_npz(p, pytorch_fcn_state(8) | {"conv1_1.weight": np.zeros((64, 3, 3, 3), np.float32)})
  with raises_about(p, weights.ShapeMismatchError, key="conv1_1.weight"):
    weights.load_pytorch_fcn(fcn(), p)  # a full-width conv1_1 into a 1/8-width model
  # In-memory sources have no path: messages are unchanged.
  with pytest.raises(weights.MissingKeyError, match=r"^1 key\(s\) missing") as e:
    weights.load_pytorch_fcn(fcn(), sd)
  assert e.value.path is None


def test_num_classes_error_names_the_flag_and_the_keyword(tmp_path):
  p = tmp_path / "c21.npz"
  io.write_npz(p, pytorch_fcn_state(32, n_class=21))
  with raises_about(p, weights.NumClassesError, key="score_fr.weight") as e:
    weights.init_from(p, fcn("fcn32s", num_classes=5))
  assert "pass --reinit-scores (reinit_scores=True in Python): " in str(e.value)


# ---------------------------------------------------------------------------------------------
# 8: exact <-> aligned geometry


EXACT_MSG = ("these weights were trained with the exact (pad-100) geometry; the aligned model "
             "computes different features from them (README 'Exact vs aligned'): train/evaluate "
             "the exact variant (--no-aligned), or pass --allow-geometry-change "
             "(allow_geometry_change=True) to load them anyway")
ALIGNED_MSG = ("these weights were trained with the aligned (no pad-100) geometry; the exact "
               "model computes different features from them (README 'Exact vs aligned'): "
               "train/evaluate the aligned variant (--aligned), or pass --allow-geometry-change "
               "(allow_geometry_change=True) to load them anyway")


def test_save_records_the_geometry(tmp_path):
  for aligned in (False, True):
    weights.save(fcn("fcn32s", aligned=aligned), tmp_path / "m.safetensors")
    assert io.read(tmp_path / "m.safetensors")[1]["aligned"] == str(aligned).lower()


def test_pytorch_fcn_checkpoint_into_aligned_model_is_refused(tmp_path):
  p = tmp_path / "fcn32s_from_caffe.npz"
  io.write_npz(p, pytorch_fcn_state(32))
  loaders = [lambda m, **k: weights.init_from(p, m, **k),
             lambda m, **k: weights.load_into(m, p, **k),
             lambda m, **k: weights.load(p, model=m, **k),
             lambda m, **k: weights.load_pytorch_fcn(m, p, **k)]
  for load in loaders:
    for reinit in (False, True):  # new score layers do not make the backbone's features match
      model = fcn("fcn32s", aligned=True)
      before = weights.state_arrays(model)
      with raises_about(p, weights.GeometryError) as e:
        load(model, reinit_scores=reinit)
      assert str(e.value) == f"{p}: {EXACT_MSG}" and e.value.file_aligned is False
      after = weights.state_arrays(model)
      assert all(np.array_equal(before[k], after[k]) for k in before)  # untouched
  model = fcn("fcn32s", aligned=True)
  report = weights.init_from(p, model, allow_geometry_change=True)
  assert report.geometry_changed and "GEOMETRY CHANGED" in str(report)
  assert not weights.init_from(p, fcn("fcn32s")).geometry_changed  # exact into exact


def test_fcnjax_files_carry_their_geometry_both_ways(tmp_path):
  exact, aligned = tmp_path / "exact.safetensors", tmp_path / "aligned.safetensors"
  io.write_safetensors(exact, *_trained_fcnjax_arrays(fcn("fcn32s")))
  io.write_safetensors(aligned, *_trained_fcnjax_arrays(fcn("fcn32s", aligned=True)))
  with raises_about(exact, weights.GeometryError) as e:
    weights.init_from(exact, fcn("fcn16s", aligned=True))  # the cascade does not change it
  assert str(e.value).endswith(EXACT_MSG)
  with raises_about(aligned, weights.GeometryError) as e:
    weights.load_into(fcn("fcn32s"), aligned)
  assert str(e.value) == f"{aligned}: {ALIGNED_MSG}" and e.value.file_aligned is True
  weights.init_from(aligned, fcn("fcn16s", aligned=True))  # aligned into aligned
  weights.load_into(fcn("fcn32s"), exact)                  # exact into exact
  weights.load_into(fcn("fcn32s"), aligned, allow_geometry_change=True)
  assert weights.load(aligned).backbone.aligned  # a model built from the file has its geometry
  # Without the "aligned" key the geometry is unknown: not refused.
  arrays, meta = _trained_fcnjax_arrays(fcn("fcn32s"))
  del meta["aligned"]
  unknown = tmp_path / "unknown.safetensors"
  io.write_safetensors(unknown, arrays, meta)
  weights.init_from(unknown, fcn("fcn32s", aligned=True))


def test_imagenet_backbones_initialise_either_geometry(tmp_path):
  tv, caffe = tmp_path / "vgg16-tv.npz", tmp_path / "vgg16_from_caffe.npz"
  io.write_npz(tv, torchvision_state())
  io.write_npz(caffe, torchvision_state(seed=1))
  for aligned in (False, True):
    for p in (tv, caffe):
      assert not weights.init_from(p, fcn(aligned=aligned)).geometry_changed
    weights.load_vgg16_imagenet(fcn(aligned=aligned), tv)
  # An FCN converted from ImageNet VGG16 (zero score layers: never trained) is no geometry either.
  weights.convert(caffe, tmp_path / "fcn8s_init.safetensors", layout="pytorch-fcn", model="fcn8s")
  weights.init_from(tmp_path / "fcn8s_init.safetensors", fcn(aligned=True))


# ---------------------------------------------------------------------------------------------
# 9: the CLI prints one error line


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
  d = tmp_path_factory.mktemp("bad")
  (d / "empty.safetensors").write_bytes(b"")
  io.write_safetensors(d / "ok.safetensors", pytorch_fcn_state(32))
  data = (d / "ok.safetensors").read_bytes()
  (d / "truncated.safetensors").write_bytes(data[:len(data) // 3])
  (d / "garbage.npz").write_bytes(b"garbage" * 20)
  (d / "garbage.pth").write_bytes(b"garbage" * 20)
  sd = pytorch_fcn_state(32)
  del sd["conv1_1.weight"]
  io.write_npz(d / "noconv.npz", sd)
  io.write_npz(d / "int.npz", pytorch_fcn_state(32) | {"fc6.bias": np.zeros(512, np.int64)})
  return d


@pytest.mark.parametrize("argv,name", [
    (["inspect", "{d}/missing.npz"], "missing.npz"),
    (["inspect", "{d}/empty.safetensors"], "empty.safetensors"),
    (["inspect", "{d}/truncated.safetensors"], "truncated.safetensors"),
    (["inspect", "{d}/garbage.npz"], "garbage.npz"),
    (["inspect", "{d}/garbage.pth"], "garbage.pth"),
    (["convert", "{d}/truncated.safetensors", "{d}/o.safetensors", "--layout", "pytorch-fcn"],
     "truncated.safetensors"),
    (["convert", "{d}/noconv.npz", "{d}/o.safetensors", "--layout", "pytorch-fcn"], "noconv.npz"),
    (["convert", "{d}/int.npz", "{d}/o.safetensors", "--layout", "pytorch-fcn"], "int.npz"),
    (["convert", "{d}/ok.safetensors", "{d}/no/such/dir/o.safetensors", "--layout",
      "pytorch-fcn"], "o.safetensors"),
])
def test_cli_prints_one_error_line(bad_files, capsys, argv, name):
  if name.endswith(".pth"):
    pytest.importorskip("torch", reason="reading .pth needs torch")
  assert main([a.format(d=bad_files) for a in argv]) == 2
  err = capsys.readouterr().err
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
  assert name in lines[0]


def test_metadata_json_header_is_what_safetensors_parses(tmp_path):
  """A header whose metadata is not a str->str map is unreadable, not a crash later on."""
  header = json.dumps({"__metadata__": {"model": 3}}).encode()
  p = tmp_path / "m.safetensors"
  p.write_bytes(struct.pack("<Q", len(header)) + header)
  with raises_about(p, weights.FormatError):
    weights.load(p)
