"""The experiment command lines: flags map onto configs, built-in data, one error line for bad
input, and one end-to-end run per CLI (``fcnjax.train``, ``voc_fcn8s`` in test_train_parallel,
``folder`` learning a binary task on images this test writes, ``pets`` on its built-in data)."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from fcnjax import configs
from fcnjax.data import datasets, readers
from fcnjax.experiments import flags
from fcnjax.experiments import folder as folder_cli
from fcnjax.experiments import voc_fcn8s
from train_helpers import REPO, env_with_devices


def run_cli(module, *args, timeout=600):
  return subprocess.run([sys.executable, "-m", module, *args], env=env_with_devices(1),
                        capture_output=True, text=True, timeout=timeout, cwd=REPO)


def test_help_lists_the_documented_flags():
  out = run_cli("fcnjax.experiments.voc_fcn8s", "--help").stdout
  for flag in ("--voc-root", "--sbd-root", "--model", "--init", "--preset", "--steps", "--epochs",
               "--batch-size", "--pixels-per-batch", "--max-buckets", "--precision", "--workdir",
               "--resume", "--eval-only", "--grad-accumulation", "--num-workers", "--seed"):
    assert flag in out, flag


def test_voc_flags_map_onto_the_config():
  args, _ = voc_fcn8s.parse_args([])
  preset, cfg = voc_fcn8s.make_config(args)
  assert preset == "smoke" and cfg.model.name == "fcn8s" and cfg.model.width_multiplier == 1 / 8
  preset, cfg = voc_fcn8s.make_config(voc_fcn8s.parse_args(["--voc-root", "x"])[0])
  assert preset == "fast" and cfg.model.width_multiplier == 1.0 and not cfg.model.aligned
  assert cfg.data.root == "x"
  preset, cfg = voc_fcn8s.make_config(voc_fcn8s.parse_args(
      ["--preset", "paper", "--model", "fcn32s", "--max-buckets", "auto", "--pixels-per-batch",
       "100000", "--grad-accumulation", "2", "--no-aligned", "--seed", "3"])[0])
  assert cfg.optim.optimizer == "reference" and cfg.optim.learning_rate is None
  assert cfg.loss.reduction == "sum" and cfg.optim.momentum == 0.99
  assert cfg.train.steps == 100_000 and cfg.optim.accumulate == 2 and cfg.train.seed == 3
  assert cfg.data.max_buckets == "auto" and cfg.data.pixels_per_batch == 100_000
  _, cfg = voc_fcn8s.make_config(voc_fcn8s.parse_args(
      ["--preset", "paper", "--model", "fcn8s-atonce"])[0])
  assert cfg.train.steps == 300_000
  _, cfg = voc_fcn8s.make_config(voc_fcn8s.parse_args(["--epochs", "2"])[0])
  assert cfg.train.epochs == 2 and cfg.train.steps is None


def test_folder_flags_map_onto_the_config():
  args, _ = folder_cli.parse_args(["--images", "i", "--masks", "m", "--mask-values", "binary",
                                   "--classes", "bg,crack", "--val-fraction", "0.2",
                                   "--class-weights", "1,4", "--dice-weight", "0.5"])
  cfg = configs.load("folder")
  flags.apply_data_flags(cfg, args)
  assert (cfg.data.images, cfg.data.masks, cfg.data.mask_values) == ("i", "m", "binary")
  assert cfg.data.classes == "bg,crack" and cfg.data.val_fraction == 0.2
  assert cfg.loss.class_weights == (1.0, 4.0) and cfg.loss.dice_weight == 0.5


def test_no_voc_on_disk_writes_and_reads_the_builtin_dataset(tmp_path, capsys):
  cfg = configs.load("voc_fcn8s:smoke")
  cfg.data.cache = str(tmp_path)
  cfg.data.builtin.update(num_train=6, num_val=3, scale=0.1)
  src = datasets.make_sources(cfg)
  assert "No VOC on disk" in capsys.readouterr().out
  assert len(src.train) == 6 and len(src.val) == 3
  assert isinstance(src.train, readers.SegmentationSource)
  again = datasets.make_sources(cfg)  # written once: a second call reuses the cache
  assert again.train.image_paths == src.train.image_paths


def test_bad_paths_and_fields_give_one_clear_error_line(tmp_path, capsys):
  rc = voc_fcn8s.main(["--voc-root", str(tmp_path / "nope"), "--workdir", str(tmp_path / "w"),
                       "--compile-cache", ""])
  err = capsys.readouterr().err
  assert rc == 1 and err.startswith("error: ") and str(tmp_path / "nope") in err
  assert "Traceback" not in err
  rc = voc_fcn8s.main(["--config.optim.lerning_rate=1", "--workdir", str(tmp_path / "w")])
  err = capsys.readouterr().err
  assert rc == 2 and "did you mean optim.learning_rate" in err and len(err.splitlines()) == 1
  rc = folder_cli.main(["--images", str(tmp_path / "none"), "--masks", str(tmp_path),
                        "--workdir", str(tmp_path / "w2"), "--compile-cache", ""])
  err = capsys.readouterr().err
  assert rc == 1 and err.startswith("error: ") and str(tmp_path / "none") in err


def write_grey_binary_folder(root, n, seed):
  """Grey images (varied sizes) with 0/255 masks: bright rectangles and discs on noise. Written
  here with numpy + Pillow (independent of fcnjax.data.synthetic)."""
  rng = np.random.default_rng(seed)
  (root / "img").mkdir(parents=True)
  (root / "mask").mkdir()
  for i in range(n):
    h, w = int(rng.integers(56, 88)), int(rng.integers(56, 88))
    img = rng.normal(90, 25, (h, w))
    mask = np.zeros((h, w), bool)
    yy, xx = np.mgrid[:h, :w]
    for _ in range(int(rng.integers(1, 3))):
      cy, cx, r = rng.integers(0, h), rng.integers(0, w), rng.integers(6, 16)
      if rng.random() < 0.5:
        mask |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r ** 2
      else:
        mask |= (abs(yy - cy) <= r) & (abs(xx - cx) <= r // 2 + 3)
    img[mask] += 80
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "L").save(root / "img" / f"s{i}.png")
    Image.fromarray((mask * 255).astype(np.uint8), "L").save(root / "mask" / f"s{i}.png")


@pytest.mark.slow
def test_folder_cli_learns_a_binary_task_on_grey_images(tmp_path):
  write_grey_binary_folder(tmp_path / "data", 48, seed=1)
  proc = run_cli("fcnjax.experiments.folder", "--images", str(tmp_path / "data/img"),
                 "--masks", str(tmp_path / "data/mask"), "--mask-values", "binary",
                 "--classes", "background,blob", "--val-fraction", "0.25",
                 "--workdir", str(tmp_path / "run"), "--compile-cache", "", "--steps", "150",
                 "--eval-every-epochs", "1000", "--config.optim.learning_rate=0.005")
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert "classes: 2 (background, blob)" in proc.stdout
  metrics = json.loads((tmp_path / "run/final_metrics.json").read_text())
  print("foreground IoU", metrics["per_class_iou"]["blob"])
  assert metrics["per_class_iou"]["blob"] >= 0.7
  assert "blob" in proc.stdout.split("eval step")[-1]  # the per-class table names the class


@pytest.mark.slow
def test_train_cli_runs_a_users_config_file_and_resumes_it(tmp_path):
  cfg_file = tmp_path / "my_pets.py"
  cfg_file.write_text(
      "from fcnjax.configs import pets\n"
      "def get_config(preset=None):\n"
      "  c = pets.get_config('smoke')\n"
      "  c.model.width_multiplier = 1 / 16\n"
      "  c.data.builtin.update(num_trainval=16, num_test=8)\n"
      "  c.train.steps = 4\n"
      "  c.checkpoint.save_every = 2\n"
      "  c.output.compile_cache = ''\n"
      "  return c\n")
  common = ["--workdir", str(tmp_path / "run"), f"--config.data.cache={tmp_path / 'cache'}"]
  proc = run_cli("fcnjax.train", "--config", str(cfg_file), *common)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert "classes: 3 (background, pet, border)" in proc.stdout and "final: mean IU" in proc.stdout
  # Resume without --config: the stored config, two more steps allowed explicitly via --config.
  proc = run_cli("fcnjax.train", "--config", str(cfg_file), *common, "--resume",
                 "--config.train.steps=6")
  assert proc.returncode == 1 and "train.steps: checkpoint has 4, requested 6" in proc.stderr
  proc = run_cli("fcnjax.train", "--config", str(cfg_file), *common, "--resume",
                 "--config.train.steps=6", "--allow-change", "train.steps")
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert "resumed from" in proc.stdout and "(step 4 of 6)" in proc.stdout
  proc = run_cli("fcnjax.train", "--workdir", str(tmp_path / "run"), "--eval-only")
  assert proc.returncode == 0 and "eval step 6" in proc.stdout, proc.stderr[-3000:]
