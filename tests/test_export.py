"""``python -m fcnjax.export``: shape-polymorphic jax.export artifacts of tiny FCN-8s models.

The artifacts are read back in a subprocess where fcnjax and flax cannot be imported (jax and
numpy only) at several odd / non-square sizes and batch sizes, and compared with the models'
own output on the same uint8 images.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fcnjax import preprocessing as preprocessing_lib
from fcnjax import weights
from fcnjax.export import main
from fcnjax.inference import load_model
from fcnjax.inference import export as export_lib
from fcnjax.models import build_model

#: (N, H, W) of the images run through every artifact.
SIZES = ((1, 1, 1), (3, 37, 53), (1, 64, 64), (3, 100, 33), (1, 129, 97))
#: name -> (aligned, whether score_fr keeps its zero init)
MODELS = {"exact": (False, False), "aligned": (True, False), "exact-zero-score-fr": (False, True)}

SUBPROCESS = textwrap.dedent("""
    import sys

    class _Blocked:
      def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("fcnjax", "flax"):
          raise ImportError(f"{name} is blocked in this test")
        return None

    sys.meta_path.insert(0, _Blocked())
    for mod in ("flax", "fcnjax"):
      try:
        __import__(mod)
      except ImportError:
        pass
      else:
        raise SystemExit(f"{mod} is importable")
    import json, pathlib
    import jax
    import numpy as np
    work = pathlib.Path(sys.argv[1])
    jobs = json.loads((work / "jobs.json").read_text())
    for name, artifact in jobs["artifacts"].items():
      exp = jax.export.deserialize(bytearray(open(artifact, "rb").read()))
      for i in range(jobs["num_sizes"]):
        images = np.load(work / f"images_{i}.npy")
        np.save(work / f"logits_{name}_{i}.npy", np.asarray(exp.call(images)))
    blocked = [m for m in sys.modules if m.split(".")[0] in ("flax", "fcnjax")]
    print("ok", "flax-free" if not blocked else blocked)
""")


def _tiny_model(aligned: bool, zero_score_fr: bool, seed: int = 0):
  """A 1/16-width FCN-8s with random (non-zero) score layers (``score_fr`` zero if asked)."""
  model = build_model("fcn8s", 5, width_multiplier=1 / 16, aligned=aligned, seed=seed)
  rng = np.random.default_rng(seed + 1)
  for head in [model.score_fr, *model.score_skips]:
    kernel, bias = head.conv.kernel, head.conv.bias
    kernel.set_value(jnp.asarray(rng.normal(0, 0.1, kernel.shape), jnp.float32))
    bias.set_value(jnp.asarray(rng.normal(0, 0.1, bias.shape), jnp.float32))
  if zero_score_fr:  # an untrained head: an all-zero constant kernel (see _splat_kernel_conv)
    model.score_fr.conv.kernel.set_value(jnp.zeros(model.score_fr.conv.kernel.shape))
  return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """Weights files, artifacts (through the CLI), the images and the subprocess's logits."""
  work = tmp_path_factory.mktemp("export")
  rng = np.random.default_rng(0)
  images = [rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8) for n, h, w in SIZES]
  for i, im in enumerate(images):
    np.save(work / f"images_{i}.npy", im)
  paths, outputs = {}, {}
  for name, (aligned, zero) in MODELS.items():
    wpath, out = work / f"{name}.safetensors", work / f"{name}.jaxexport"
    weights.save(_tiny_model(aligned, zero), wpath)
    rc = main([str(wpath), str(out)])
    assert rc == 0
    paths[name] = (wpath, out)
  (work / "jobs.json").write_text(json.dumps({
      "artifacts": {name: str(out) for name, (_, out) in paths.items()},
      "num_sizes": len(SIZES)}))
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  proc = subprocess.run([sys.executable, "-c", SUBPROCESS, str(work)], cwd=work, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  for name in MODELS:
    outputs[name] = [np.load(work / f"logits_{name}_{i}.npy") for i in range(len(SIZES))]
  return {"work": work, "paths": paths, "images": images, "outputs": outputs,
          "stdout": proc.stdout}


@pytest.mark.slow
def test_subprocess_had_neither_flax_nor_fcnjax(exported):
  assert exported["stdout"].split() == ["ok", "flax-free"]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_artifact_matches_the_model(exported, name):
  loaded = load_model(exported["paths"][name][0])
  for (n, h, w), images, got in zip(SIZES, exported["images"], exported["outputs"][name]):
    want = np.asarray(loaded.model(jnp.asarray(loaded.preprocessing.fn(images))))
    assert got.dtype == np.float32 and got.shape == (n, h, w, 5) == want.shape
    scale = float(np.abs(want).max())
    assert scale > 0.01  # non-trivial logits
    diff = float(np.abs(got - want).max())
    assert diff <= 1e-5 * scale, (name, (n, h, w), diff, scale)


def test_load_exported_round_trip(exported):
  _, out = exported["paths"]["aligned"]
  assert export_lib.is_exported(out)
  model = export_lib.load_exported(out)
  assert model.num_classes == 5 and model.class_names == ("0", "1", "2", "3", "4")
  assert model.task == "segmentation" and model.min_input_size == (1, 1)
  assert model.palette.shape == (256, 3) and model.palette.dtype == np.uint8
  assert model.pad_value_rgb == preprocessing_lib.CAFFE.pad_value_rgb
  assert model.translation_period == 32 and model.input_multiple == 32
  assert isinstance(model.exported, jax.export.Exported)
  for i in (0, 1, 4):
    np.testing.assert_array_equal(model(exported["images"][i]), exported["outputs"]["aligned"][i])
  with pytest.raises(ValueError, match="uint8 RGB images"):
    model(exported["images"][1].astype(np.float32))


def test_json_fields(exported):
  meta = json.loads(pathlib.Path(f"{exported['paths']['exact'][1]}.json").read_text())
  assert meta["format"] == "fcnjax-export" and meta["format_version"] == 1
  assert meta["task"] == "segmentation" and meta["min_input_size"] == [1, 1]
  assert meta["input"] == {"dtype": "uint8", "layout": "NHWC RGB", "shape": ["N", "H", "W", 3]}
  assert meta["output"]["dtype"] == "float32" and meta["output"]["shape"] == ["N", "H", "W", 5]
  assert meta["num_classes"] == 5 and len(meta["class_names"]) == 5
  assert np.asarray(meta["palette"]).shape == (256, 3)
  pre = meta["preprocessing"]
  assert pre["name"] == "caffe-bgr-mean" and pre["channel_order"] == "BGR"
  np.testing.assert_allclose(pre["mean"], preprocessing_lib.CAFFE_MEAN_BGR)
  assert meta["pad_value_rgb"] == list(preprocessing_lib.CAFFE.pad_value_rgb)
  assert meta["model"]["info"]["model"] == "fcn8s" and meta["model"]["info"]["aligned"] == "false"
  assert "exact" in meta["model"]["description"]
  assert meta["translation_period"] == 32 and meta["input_multiple"] == 1
  assert meta["shape_constraints"] == "N >= 1, H >= 1, W >= 1"
  assert set(meta["platforms"]) <= {"cpu", "cuda"} and "cpu" in meta["platforms"]
  assert meta["check"]["max_abs_diff"] <= 1e-5 * meta["check"]["max_abs_logit"]
  assert meta["jax_version"] == jax.__version__ and meta["fcnjax_version"]
  assert meta["created"][:4].isdigit()


@pytest.mark.parametrize("pre", [preprocessing_lib.CAFFE, preprocessing_lib.TORCHVISION])
def test_jnp_preprocessing_matches_numpy(pre):
  assert export_lib.preprocessing_mismatch(pre) <= 1e-6


@pytest.mark.parametrize("kernel, padding", [((1, 1, 6, 5), "VALID"), ((3, 3, 6, 4), "SAME"),
                                             ((7, 7, 6, 3), ((0, 0), (0, 0))),
                                             ((3, 3, 6, 2), ((1, 1), (2, 0)))])
@pytest.mark.parametrize("value", [0.0, 0.37])
def test_splat_kernel_conv(kernel, padding, value):
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 11, 9, 6)), jnp.float32)
  k = jnp.full(kernel, value, jnp.float32)
  dn = ("NHWC", "HWIO", "NHWC")
  want = jax.lax.conv_general_dilated(x, k, (1, 1), padding, dimension_numbers=dn)
  got = export_lib._splat_kernel_conv(x, k, (1, 1), padding, dimension_numbers=dn)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _cli_error(capsys, argv):
  rc = main(argv)
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: "), err
  return rc, err[0]


def test_cli_errors(exported, tmp_path, capsys):
  wpath, out = exported["paths"]["exact"]
  rc, err = _cli_error(capsys, [str(tmp_path / "missing.safetensors"), str(tmp_path / "o")])
  assert rc == 1 and "missing.safetensors" in err and "no such file" in err
  garbage = tmp_path / "garbage.safetensors"
  garbage.write_bytes(b"this is not a weights file" * 10)
  rc, err = _cli_error(capsys, [str(garbage), str(tmp_path / "o")])
  assert rc == 1 and "garbage.safetensors" in err
  rc, err = _cli_error(capsys, [str(wpath), str(out)])
  assert rc == 1 and str(out) in err and "--overwrite" in err
  rc, err = _cli_error(capsys, [str(wpath), str(tmp_path / "nodir" / "o")])
  assert rc == 1 and "does not exist" in err
  with pytest.raises(SystemExit) as e:
    main([str(wpath), str(tmp_path / "o"), "--platforms", "cpu,gameboy"])
  assert e.value.code == 2 and "gameboy" in capsys.readouterr().err
  assert not (tmp_path / "o").exists()


def test_damaged_artifacts(exported, tmp_path):
  _, out = exported["paths"]["exact"]
  data, meta = out.read_bytes(), pathlib.Path(f"{out}.json").read_text()

  def case(name, blob, meta_text):
    p = tmp_path / name
    p.write_bytes(blob)
    if meta_text is not None:
      pathlib.Path(f"{p}.json").write_text(meta_text)
    return p

  bad = {
      "truncated": case("truncated", data[:len(data) // 3], meta),
      "garbage": case("garbage", b"\x00garbage" * 100, meta),
      "no-json": case("no-json", data, None),
      "bad-json": case("bad-json", data, "{not json"),
      "other-format": case("other-format", data, json.dumps({"format": "something-else"})),
  }
  for name, p in bad.items():
    with pytest.raises(export_lib.ExportError) as e:
      export_lib.load_exported(p)
    assert str(e.value).startswith(str(p)), (name, str(e.value))
  with pytest.raises(export_lib.ExportError, match="no such file"):
    export_lib.load_exported(tmp_path / "absent")
  assert not export_lib.is_exported(bad["no-json"])
  assert not export_lib.is_exported(bad["other-format"])
  assert export_lib.is_exported(bad["truncated"])  # by its JSON; load_exported says why not
