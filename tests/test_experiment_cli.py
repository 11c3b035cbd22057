"""The experiment's command line: flags, presets, and the built-in dataset fallback."""

import subprocess
import sys

from fcnjax.data import readers
from fcnjax.experiments import voc_fcn8s


def test_help_lists_the_documented_flags():
  out = subprocess.run([sys.executable, "-m", "fcnjax.experiments.voc_fcn8s", "--help"],
                       capture_output=True, text=True, check=True).stdout
  for flag in ("--voc-root", "--sbd-root", "--model", "--init", "--preset", "--steps", "--epochs",
               "--batch-size", "--pixels-per-batch", "--max-buckets", "--precision", "--workdir",
               "--resume", "--eval-only"):
    assert flag in out, flag


def test_presets_and_overrides():
  preset, cfg = voc_fcn8s.make_config(voc_fcn8s.parse_args([]))
  assert preset == "smoke" and cfg.model == "fcn8s" and cfg.width_multiplier == 1 / 8
  preset, cfg = voc_fcn8s.make_config(voc_fcn8s.parse_args(["--voc-root", "x"]))
  assert preset == "fast" and cfg.width_multiplier == 1.0 and not cfg.aligned
  preset, cfg = voc_fcn8s.make_config(voc_fcn8s.parse_args(
      ["--preset", "paper", "--model", "fcn32s", "--max-buckets", "auto", "--pixels-per-batch",
       "100000"]))
  assert cfg.optimizer == "reference" and cfg.learning_rate == 1e-10
  assert cfg.loss_reduction == "sum" and cfg.momentum == 0.99 and cfg.steps == 100_000
  assert cfg.max_buckets == "auto" and cfg.batch_size is None and cfg.pixels_per_batch == 100_000


def test_no_voc_on_disk_writes_and_reads_the_builtin_dataset(tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(voc_fcn8s, "SMOKE_DATA", dict(num_train=6, num_val=3, scale=0.1, seed=0))
  args = voc_fcn8s.parse_args(["--data-cache", str(tmp_path)])
  train, val, desc = voc_fcn8s.make_sources(args)
  assert "No VOC on disk" in capsys.readouterr().out
  assert len(train) == 6 and len(val) == 3 and isinstance(train, readers.SegmentationSource)
  # Written once: a second call reuses the cache.
  again, _, _ = voc_fcn8s.make_sources(args)
  assert again.image_paths == train.image_paths


def test_bad_paths_give_one_clear_error_line(tmp_path, capsys):
  rc = voc_fcn8s.main(["--voc-root", str(tmp_path / "nope"), "--workdir", str(tmp_path / "w"),
                       "--compile-cache", ""])
  err = capsys.readouterr().err
  assert rc == 1 and err.startswith("error: ") and str(tmp_path / "nope") in err
  assert "Traceback" not in err
