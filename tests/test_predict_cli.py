"""python -m fcnjax.predict as a user runs it: a folder of mixed images (sizes, grey, RGBA, 16-bit,
nested, one unreadable file), weights from a .safetensors and from a training workdir, outputs
and their sizes, and every refusal as one line."""

import json
import pathlib

import numpy as np
import pytest
from PIL import Image

from fcnjax import predict, weights
from fcnjax.experiments import voc_fcn8s
from fcnjax.inference import Predictor
from test_inference import rgb_image, tiny_fcn
from train_helpers import write_tiny_voc

SIZES = {"a.jpg": (97, 131), "grey.png": (40, 60), "sub/rgba.png": (64, 64),
         "sub/deep16.png": (50, 70), "sub/deeper/b.jpeg": (33, 101)}


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("w") / "tiny.safetensors"
  weights.save(tiny_fcn(aligned=True), path)
  return path


@pytest.fixture
def folder(tmp_path):
  rng = np.random.default_rng(0)
  root = tmp_path / "photos"
  for name, (h, w) in SIZES.items():
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    rgb = rgb_image(rng, h, w)
    if name == "grey.png":
      Image.fromarray(rgb[..., 0]).save(root / name)
    elif name.endswith("rgba.png"):
      Image.fromarray(np.concatenate([rgb, np.full((h, w, 1), 128, np.uint8)], -1),
                      "RGBA").save(root / name)
    elif name.endswith("deep16.png"):
      Image.fromarray(rgb[..., 1].astype(np.uint16) * 257).save(root / name)
    else:
      Image.fromarray(rgb).save(root / name, quality=95)
  (root / "broken.jpg").write_bytes(b"\xff\xd8\xff this is not a JPEG")
  (root / "notes.txt").write_text("not an image, not listed")
  return root


def run(argv, capsys):
  rc = predict.main([str(a) for a in argv])
  out, err = capsys.readouterr()
  assert "Traceback" not in out + err
  return rc, out, err


def errors(text):
  return [line for line in text.splitlines() if line.startswith("error:")]


def test_a_mixed_folder_gives_one_map_per_image_and_names_the_unreadable_one(
    model_file, folder, tmp_path, capsys):
  out_dir = tmp_path / "out"
  rc, out, err = run([model_file, folder, "--out", out_dir, "--overlay", "--probs", "--exact"],
                     capsys)
  assert rc == 1  # one input could not be read
  assert "predicted 5 images" in out and "1 failures" in out and "programs compiled" in out
  assert f"skipped {folder / 'broken.jpg'}: cannot read the image" in out
  p = Predictor(model_file)
  for name, (h, w) in SIZES.items():
    stem = out_dir / pathlib.Path(name).with_suffix("")
    im = Image.open(f"{stem}.png")
    assert im.mode == "P" and im.size == (w, h)
    classes = np.asarray(im)
    assert (classes == p.predict(folder / name)).all()  # --exact: each image at its own size
    probs = np.load(f"{stem}.npz")["probs"]
    assert probs.dtype == np.float16 and probs.shape == (h, w, 5)
    np.testing.assert_allclose(probs.astype(np.float32).sum(-1), 1, atol=5e-3)  # float16
    assert np.mean(probs.argmax(-1) == classes) > 0.99  # float16 rounding may flip near-ties
    ov = Image.open(f"{stem}_overlay.png")
    assert ov.width == w and ov.height > h  # the legend strip is below the image
  assert not (out_dir / "broken.png").exists() and not (out_dir / "notes.png").exists()

  # again: the outputs exist -> refused up front, nothing predicted
  rc, out, err = run([model_file, folder, "--out", out_dir], capsys)
  assert rc == 2 and len(errors(err)) == 1 and "--overwrite" in err and "predicted" not in out
  rc, out, err = run([model_file, folder, "--out", out_dir, "--overwrite", "--glob", "*.png"],
                     capsys)
  assert rc == 0 and "predicted 3 images" in out and "0 failures" in out


def test_bucketed_runs_few_programs_and_strict_stops_at_the_bad_file(model_file, folder,
                                                                      tmp_path, capsys):
  rc, out, err = run([model_file, folder, "--out", tmp_path / "o", "--max-buckets", "2"], capsys)
  assert rc == 1 and "bucketed (2 buckets)" in out
  assert "2 programs compiled" in out or "1 programs compiled" in out
  rc, out, err = run([model_file, folder, "--out", tmp_path / "o2", "--strict"], capsys)
  assert rc == 1 and len(errors(err)) == 1 and "broken.jpg" in err and "--strict" in err


def test_tta_and_tiles_through_the_cli(model_file, folder, tmp_path, capsys):
  rc, out, err = run([model_file, folder / "a.jpg", "--out", tmp_path / "o", "--flip",
                      "--scales", "0.5,1", "--tile", "48", "48", "--overlap", "16"], capsys)
  assert rc == 0, err
  assert "flip" in out and "scales 0.5,1" in out and "tiles 48x48" in out
  assert Image.open(tmp_path / "o" / "a.png").size == (131, 97)


@pytest.mark.parametrize("argv, code, says", [
    (["{w}", "{missing}", "--out", "{o}"], 2, "no such file or folder"),
    (["{nope}", "{folder}", "--out", "{o}"], 1, "no such file or directory"),
    (["{w}", "{folder}", "--out", "{o}", "--tile", "32", "32", "--overlap", "40"], 2,
     "--overlap 40 must be smaller than --tile 32 32"),
    (["{w}", "{folder}", "--out", "{o}", "--glob", "*.tif"], 2, "no files matching '*.tif'"),
    (["{w}", "{folder}", "--out", "{o}", "--step", "3"], 1, "--step only applies to a training"),
])
def test_bad_arguments_are_one_line(model_file, folder, tmp_path, capsys, argv, code, says):
  names = dict(w=model_file, missing=tmp_path / "missing", nope=tmp_path / "nope.safetensors",
               folder=folder, o=tmp_path / "o")
  rc, out, err = run([a.format(**names) for a in argv], capsys)
  assert rc == code and len(errors(err)) == 1 and says in err, err


def test_scales_flag_is_checked_by_argparse(model_file, folder, tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    predict.main([str(model_file), str(folder), "--out", str(tmp_path), "--scales", "0,1"])
  assert e.value.code == 2 and "positive numbers" in capsys.readouterr().err


@pytest.mark.slow
def test_predict_from_a_training_workdir(tmp_path, capsys):
  voc = write_tiny_voc(tmp_path / "data")
  workdir = tmp_path / "run"
  rc = voc_fcn8s.main(["--voc-root", str(voc), "--workdir", str(workdir), "--preset", "smoke",
                       "--width-multiplier", "0.0625", "--batch-size", "8", "--max-buckets",
                       "1", "--steps", "2", "--compile-cache", ""])
  assert rc == 0
  capsys.readouterr()
  val = voc / "JPEGImages"
  rc, out, err = run([workdir, val, "--out", tmp_path / "o", "--compile-cache", ""], capsys)
  assert rc == 0, err
  assert f"model: {workdir} (best step 2, fcn8s, aligned, width x0.0625)" in out
  n = len(list(val.iterdir()))
  assert f"predicted {n} images" in out
  rc, out, err = run([workdir, val, "--out", tmp_path / "o3", "--step", "2"], capsys)
  assert rc == 0 and "step 2" in out
  rc, out, err = run([workdir, val, "--out", tmp_path / "o4", "--step", "7"], capsys)
  assert rc == 1 and "no checkpoint 7 (best: [2]; checkpoints: [2])" in err
  meta = json.loads((workdir / "final_metrics.json").read_text())
  assert "mean_iu" in meta


def test_predict_from_an_exported_artifact_equals_the_weights(model_file, folder, tmp_path,
                                                              capsys):
  from fcnjax import export
  art = tmp_path / "tiny.fcnjax-export"
  assert export.main([str(model_file), str(art), "--platforms", "cpu"]) == 0
  capsys.readouterr()
  rc, out, err = run([art, folder / "a.jpg", folder / "grey.png", "--out", tmp_path / "o",
                      "--exact"], capsys)
  assert rc == 0, err
  assert "(exported" in out and "predicted 2 images" in out
  p = Predictor(model_file)
  for name in ("a", "grey"):
    got = np.asarray(Image.open(tmp_path / "o" / f"{name}.png"))
    ref = p.predict(folder / (name + (".jpg" if name == "a" else ".png")))
    assert np.mean(got == ref) > 0.999  # float rounding may flip a near-tie pixel


def test_inputs_skip_the_output_folder_and_keep_colliding_stems_apart(folder):
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "a.png")  # beside a.jpg
  (folder / "preds").mkdir()
  Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / "preds" / "old.png")
  found = predict.find_inputs([folder], exclude=folder / "preds")
  stems = {str(stem) for _, stem in found}
  assert "preds/old" not in stems and {"a_jpg", "a_png"} <= stems
  assert len(stems) == len(found)


def test_ctrl_c_is_one_line_and_exit_130(model_file, folder, tmp_path, capsys, monkeypatch):
  def interrupted(*a, **k):
    raise KeyboardInterrupt
  monkeypatch.setattr(predict, "_predict_all", interrupted)
  rc, out, err = run([model_file, folder, "--out", tmp_path / "o"], capsys)
  assert rc == 130 and err.startswith("interrupted: 0 of 5 class maps") and "--overwrite" in err
