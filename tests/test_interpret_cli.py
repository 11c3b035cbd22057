"""python -m fcnjax.interpret as a user runs it: a classifier trained by
``python -m fcnjax.experiments.classify`` on a class-per-folder dataset (its workdir), a segmenter
from a .safetensors, each command's outputs, and every refusal as one line (no traceback)."""

import pathlib

import numpy as np
import pytest
from PIL import Image

from fcnjax import export, weights
from fcnjax.weights import __main__ as weights_cli
from fcnjax.data import synthetic_classes as sc
from fcnjax.experiments import classify
from fcnjax.interpret import cli
from test_inference import rgb_image, tiny_fcn

pytestmark = pytest.mark.slow


def run(argv, capsys):
  rc = cli.main([str(a) for a in argv])
  out, err = capsys.readouterr()
  assert "Traceback" not in out + err
  return rc, out, err


def errors(text):
  return [line for line in text.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory):
  """A workdir of the classify CLI (3 steps at 1/16 width) on 6 images per class."""
  tmp = tmp_path_factory.mktemp("classify")
  rng = np.random.default_rng(0)
  root = tmp / "data"
  for cls, name in enumerate(sc.CLASS_NAMES):
    (root / name).mkdir(parents=True)
    for i in range(6):
      h, w = sc.draw_size(rng, strip=bool(i % 2))
      img, _ = sc.render_example(rng, cls, h, w)
      Image.fromarray(img).save(root / name / f"{i}.png")
  workdir = tmp / "run"
  rc = classify.main(["--data", str(root), "--workdir", str(workdir), "--steps", "3",
                      "--width-multiplier", "0.0625", "--batch-size", "8", "--max-buckets", "1",
                      "--val-fraction", "0.2", "--compile-cache", ""])
  assert rc == 0
  # the classify CLI's outputs: top-1 in the metrics, the confusion matrix, a best checkpoint
  assert (workdir / "confusion.png").is_file() and any((workdir / "best").iterdir())
  assert "top1" in (workdir / "final_metrics.json").read_text()
  return workdir, root


@pytest.fixture
def photos(tmp_path):
  rng = np.random.default_rng(1)
  root = tmp_path / "photos"
  root.mkdir()
  img, _ = sc.render_example(rng, 2, 40, 90)
  Image.fromarray(img).save(root / "thing.png")
  Image.fromarray(rgb_image(rng, 31, 200)).save(root / "strip.jpg")
  (root / "broken.png").write_bytes(b"\x89PNG not really")
  grey, _ = sc.render_example(rng, 0, 50, 60)
  Image.fromarray(grey[..., 0]).save(root / "grey.png")  # mode L
  rgba = np.concatenate([rgb_image(rng, 33, 70), np.full((33, 70, 1), 90, np.uint8)], -1)
  Image.fromarray(rgba, "RGBA").save(root / "rgba.png")
  return root


def test_classifier_workdir_gradcam_activations_filters_layers(classifier_run, photos, tmp_path,
                                                              capsys):
  workdir, _ = classifier_run
  out = tmp_path / "o"
  rc, text, err = run(["gradcam", workdir, photos, "--out", out, "--class", sc.CLASS_NAMES[2],
                       "--compile-cache", ""], capsys)
  assert rc == 1  # the broken file is skipped and listed, the others done
  assert "1 input(s) skipped" in err and "broken.png" in err
  name = sc.CLASS_NAMES[2]
  for stem, size in (("thing", (90, 40)), ("strip", (200, 31)), ("grey", (60, 50)),
                     ("rgba", (70, 33))):
    overlay = Image.open(out / f"{stem}_gradcam_{name}.png")
    assert overlay.size == size  # (W, H) of the image
    assert (out / f"{stem}_gradcam_{name}_panel.png").is_file()
  assert f"class {name} at block5" in text and f"p({name}) = " in text
  # default class: the predicted one; --layer by the names `layers` lists
  rc, text, _ = run(["layers", workdir], capsys)
  assert rc == 0 and "(default layer: block5)" in text and "block3" in text
  rc, text, _ = run(["gradcam", workdir, photos / "thing.png", "--out", out, "--layer", "block3"],
                    capsys)
  assert rc == 0 and " at block3 " in text
  rc, text, _ = run(["activations", workdir, photos / "thing.png", "--out", out, "--layer",
                     "block2", "--layer", "block4", "--npz"], capsys)
  assert rc == 0
  saved = np.load(out / "thing_activations.npz")
  assert set(saved) == {"block2", "block4"}
  assert saved["block2"].shape[:2] == ((40 - 2) - 2, (90 - 2) - 2)  # two VALID 3x3 convs
  assert (out / "thing_block2.png").is_file()
  rc, text, _ = run(["filters", workdir, "--out", out, "--filters", "0-3", "--steps", "3",
                     "--size", "32x48"], capsys)
  assert rc == 0 and "block5: 4 filters, 32x48, 3 steps" in text
  patterns = np.load(out / "filters_block5.npz")
  assert patterns["rgb"].shape == (4, 32, 48, 3) and list(patterns["filters"]) == [0, 1, 2, 3]


@pytest.mark.parametrize("argv, says", [
    (["gradcam", "{w}", "{p}", "--out", "{o}", "--layer", "conv9"], "unknown layer 'conv9'"),
    (["gradcam", "{w}", "{p}", "--out", "{o}", "--class", "zebra"], "--class 'zebra' is not"),
    (["gradcam", "{w}", "{p}", "--out", "{o}", "--region", "0,0,5,5"], "segmenters only"),
    (["filters", "{w}", "--out", "{o}", "--size", "8"], "below the model's minimum input size"),
])
def test_classifier_refusals_are_one_line(classifier_run, photos, tmp_path, capsys, argv, says):
  workdir, _ = classifier_run
  argv = [a.format(w=workdir, p=photos / "thing.png", o=tmp_path / "o") for a in argv]
  rc, _, err = run(argv, capsys)
  assert rc == 2
  assert len(errors(err)) == 1 and says in errors(err)[0], err


def test_usage_errors_come_from_argparse(tmp_path, capsys):
  for argv in (["gradcam", "w", "img", "--out", "o", "--region", "5,5,1,1"],
               ["filters", "w", "--out", "o", "--filters", "3-1"]):
    with pytest.raises(SystemExit) as e:
      cli.main(argv)
    assert e.value.code == 2
    assert "Traceback" not in capsys.readouterr().err


def test_segmenter_safetensors_with_a_region_and_exported_models_refused(photos, tmp_path,
                                                                         capsys):
  model_file = tmp_path / "fcn.safetensors"
  weights.save(tiny_fcn(aligned=True), model_file)
  out = tmp_path / "o"
  rc, text, err = run(["gradcam", model_file, photos / "thing.png", photos / "strip.jpg",
                       "--out", out, "--class", "1", "--region", "10,5,60,35"], capsys)
  assert rc == 1  # the strip is 31 px high: the region is outside it, skipped and named
  assert "strip.jpg: --region 10,5,60,35 is outside the 200x31 image" in err
  assert "logits summed over --region 10,5,60,35 (1500 px)" in text
  rc, text, _ = run(["gradcam", model_file, photos / "thing.png", "--out", out, "--class", "3",
                     "--region", "0,0,2,2", "--layer", "pool1"], capsys)
  assert rc == 0 and ("no peak" in text) == ("heatmap is empty" in text)
  assert Image.open(next(out.glob("thing_gradcam_*.png"))).size == (90, 40)
  artifact = tmp_path / "fcn.exported"
  assert export.main([str(model_file), str(artifact), "--compile-cache", ""]) == 0
  capsys.readouterr()
  rc, _, err = run(["layers", artifact], capsys)
  assert rc == 1 and "an exported model keeps no named layers" in errors(err)[0]
  rc, _, err = run(["layers", tmp_path / "missing.safetensors"], capsys)
  assert rc == 1 and len(errors(err)) == 1 and "missing.safetensors" in errors(err)[0]


def test_a_classifier_saved_from_its_workdir_is_the_same_model(classifier_run, photos, tmp_path,
                                                               capsys):
  """python -m fcnjax.weights save WORKDIR OUT.safetensors; interpret takes either."""
  workdir, _ = classifier_run
  path = tmp_path / "clf.safetensors"
  assert weights_cli.main(["save", str(workdir), str(path)]) == 0
  assert "5 classes (classification)" in capsys.readouterr().out
  outs = []
  for i, source in enumerate((workdir, path)):
    out = tmp_path / f"out{i}"
    rc, text, _ = run(["gradcam", source, photos / "thing.png", "--out", out], capsys)
    assert rc == 0
    outs.append(next(out.glob("thing_gradcam_*.png")))
  assert outs[0].name == outs[1].name  # the same class names, from the file's metadata
  np.testing.assert_array_equal(np.asarray(Image.open(outs[0])), np.asarray(Image.open(outs[1])))
  assert weights_cli.main(["save", str(tmp_path / "nowhere"), str(path)]) == 2
  assert "nowhere: not a folder" in capsys.readouterr().err


def test_ctrl_c_is_one_line_and_exit_130(classifier_run, photos, tmp_path, capsys, monkeypatch):
  from fcnjax.interpret import grad_cam

  def interrupted(*a, **k):
    raise KeyboardInterrupt
  monkeypatch.setattr(grad_cam, "gradcam_result", interrupted)
  workdir, _ = classifier_run
  rc, _, err = run(["gradcam", workdir, photos / "thing.png", "--out", tmp_path / "o"], capsys)
  assert rc == 130
  assert err.strip().splitlines()[-1].startswith("interrupted: the outputs listed above are "
                                                 f"complete in {tmp_path / 'o'}")
