"""The fault catalogue: every way a run was seen to go wrong, built and run as a user would.

Each test makes one fault (a bad file, a signal, a damaged checkpoint, a full disk, a second run,
a bad number on the command line ...) on a tiny VOC-layout dataset and a tiny model, runs the
command line (in-process through ``main(argv)``, or as a subprocess where a signal is needed),
and asserts what the user sees: the exit code, the one ``error:`` / ``warning:`` line naming the
file or flag, the checkpoints on disk, and that a resumed run equals the uninterrupted one.
"""

import errno
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from fcnjax.experiments import voc_fcn8s
from fcnjax.train import main as train_main
from train_helpers import REPO, env_with_devices, final_state, write_tiny_voc

TINY = ["--preset", "smoke", "--width-multiplier", "0.0625", "--batch-size", "8",
        "--max-buckets", "1", "--eval-every-epochs", "1000", "--steps", "6", "--save-every", "2"]
"""16 train / 8 val images, one bucket, batch 8: 2 steps per epoch; 6 steps, saves at 2, 4, 6."""


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp("xla"))


@pytest.fixture
def voc(tmp_path):
  """A fresh tiny VOC layout per test (the tests damage it)."""
  return write_tiny_voc(tmp_path / "data")


def cli(voc, workdir, *extra, cache=""):
  return voc_fcn8s.main(["--voc-root", str(voc), "--workdir", str(workdir), *TINY,
                         "--compile-cache", cache, *extra])


def errors(text):
  return [line for line in text.splitlines() if line.startswith("error:")]


def split_ids(voc, split="train"):
  return (voc / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()


def steps_on_disk(workdir):
  d = pathlib.Path(workdir) / "checkpoints"
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def params_equal(a, b):
  return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def truncate(path, keep=0.5):
  data = pathlib.Path(path).read_bytes()
  pathlib.Path(path).write_bytes(data[:int(len(data) * keep)])


# -- bad files that only show on decode ---------------------------------------------------------
@pytest.mark.slow
def test_decode_time_bad_train_files_are_skipped_named_and_counted(voc, tmp_path, capsys,
                                                                   compile_cache):
  ids = split_ids(voc)
  truncate(voc / "JPEGImages" / f"{ids[0]}.jpg", 0.4)                     # truncated JPEG
  mask = np.array(Image.open(voc / "SegmentationClass" / f"{ids[1]}.png"))
  mask[0, 0] = 37                                                          # a class that is not
  Image.fromarray(mask).save(voc / "SegmentationClass" / f"{ids[1]}.png")
  rc = cli(voc, tmp_path / "w", cache=compile_cache)
  out = capsys.readouterr()
  assert rc == 0, out.err[-2000:]
  text = out.out + out.err
  assert "Traceback" not in text
  warnings = [l for l in text.splitlines() if l.startswith("warning: skipping train example")]
  assert len(warnings) == 2, warnings                 # named once each, when first met
  assert any(ids[0] in l and ".jpg" in l for l in warnings)
  assert any(ids[1] in l and "37" in l for l in warnings)
  assert "epoch 1: 2 bad train example(s) skipped" in text
  records = [json.loads(l) for l in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
  data = [r for r in records if r["kind"] == "data"]
  assert [r["epoch"] for r in data] == [1, 2, 3] and all(r["skipped"] == 2 for r in data)
  assert sorted(data[0]["skipped_ids"]) == sorted(ids[:2])


def test_on_bad_data_raise_saves_first_then_stops_with_one_line(voc, tmp_path, capsys,
                                                                compile_cache):
  ids = split_ids(voc)
  # an RGB colour mask where an index mask is expected: readable header, bad values on decode
  rgb = np.zeros((*np.array(Image.open(voc / "JPEGImages" / f"{ids[3]}.jpg")).shape[:2], 3),
                 np.uint8)
  rgb[..., 0] = 128
  Image.fromarray(rgb).save(voc / "SegmentationClass" / f"{ids[3]}.png")
  rc = cli(voc, tmp_path / "w", "--on-bad-data", "raise", cache=compile_cache)
  out = capsys.readouterr()
  assert rc == 1 and "Traceback" not in out.err
  (line,) = errors(out.err)
  assert ids[3] in line and "--on-bad-data raise" in line


def test_bad_val_file_is_skipped_and_with_raise_the_epoch_is_saved_first(voc, tmp_path, capsys,
                                                                        compile_cache):
  vid = split_ids(voc, "val")[0]
  truncate(voc / "JPEGImages" / f"{vid}.jpg", 0.3)
  rc = cli(voc, tmp_path / "skip", cache=compile_cache)
  out = capsys.readouterr()
  assert rc == 0
  assert f"warning: skipping val example {vid!r}" in out.out
  final = json.loads((tmp_path / "skip" / "final_metrics.json").read_text())
  assert final["skipped"] == 1 and final["skipped_ids"] == [vid]
  rc = cli(voc, tmp_path / "raise", "--on-bad-data", "raise", cache=compile_cache)
  out = capsys.readouterr()
  assert rc == 1 and vid in errors(out.err)[0]
  assert steps_on_disk(tmp_path / "raise")[-1] == 6   # trained and saved before evaluating
  # fix the file: --resume evaluates the saved step and finishes the run
  shutil.copy(voc / "JPEGImages" / f"{split_ids(voc, 'val')[1]}.jpg", voc / "JPEGImages" /
              f"{vid}.jpg")
  lbl = voc / "SegmentationClass" / f"{vid}.png"
  Image.open(voc / "SegmentationClass" / f"{split_ids(voc, 'val')[1]}.png").save(lbl)
  rc = cli(voc, tmp_path / "raise", "--resume", cache=compile_cache)
  out = capsys.readouterr()
  assert rc == 0, out.err[-2000:]
  assert "evaluating it now" in out.out
  assert json.loads((tmp_path / "raise" / "final_metrics.json").read_text())["step"] == 6


# -- checkpoints ------------------------------------------------------------------------------
def test_damaged_latest_checkpoint_falls_back_to_the_previous_intact_one(voc, tmp_path, capsys,
                                                                        compile_cache):
  assert cli(voc, tmp_path / "ref", cache=compile_cache) == 0
  shutil.copytree(tmp_path / "ref", tmp_path / "w")
  capsys.readouterr()
  latest = tmp_path / "w" / "checkpoints" / "6"
  biggest = max((p for p in (latest / "state").rglob("*") if p.is_file()),
                key=lambda p: p.stat().st_size)
  truncate(biggest, 0.3)
  (latest / "meta" / "metadata").unlink()  # and its meta: the damage is total
  rc = cli(voc, tmp_path / "w", "--resume", cache=compile_cache)
  out = capsys.readouterr()
  assert rc == 0, out.err[-3000:]
  assert "Traceback" not in out.err and "Event loop" not in out.err
  (warning,) = [l for l in out.out.splitlines() if "cannot read" in l]
  assert "checkpoints/6" in warning and "damaged_checkpoints" in warning
  assert "resumed from" in out.out and "(step 4 of 6)" in out.out
  assert (tmp_path / "w" / "damaged_checkpoints" / "6").is_dir()
  assert steps_on_disk(tmp_path / "w") == [2, 4, 6]
  # resumed from step 4, it ends exactly where the uninterrupted run did
  assert params_equal(final_state(tmp_path / "w")[0], final_state(tmp_path / "ref")[0])


def test_a_model_mismatch_is_not_called_damage(voc, tmp_path, capsys, compile_cache):
  assert cli(voc, tmp_path / "w", "--steps", "2", cache=compile_cache) == 0
  capsys.readouterr()
  rc = cli(voc, tmp_path / "w", "--resume", "--optimizer", "sgd", "--allow-change", "all",
           cache=compile_cache)
  out = capsys.readouterr()
  assert rc == 1
  (line,) = errors(out.err)
  assert "does not fit the requested model/optimizer" in line and "damaged" not in line
  assert steps_on_disk(tmp_path / "w") == [2]


def test_a_failed_save_is_one_line_at_that_save_and_earlier_checkpoints_stay(
    voc, tmp_path, capsys, monkeypatch, compile_cache):
  import orbax.checkpoint as ocp
  real_save, calls = ocp.CheckpointManager.save, []

  def save(self, step, *a, **k):
    if str(self.directory).endswith("checkpoints"):
      calls.append(step)
      if len(calls) == 2:
        raise OSError(errno.ENOSPC, "No space left on device")
    return real_save(self, step, *a, **k)
  monkeypatch.setattr(ocp.CheckpointManager, "save", save)
  rc = cli(voc, tmp_path / "w", cache=compile_cache)
  out = capsys.readouterr()
  assert rc == 1 and "Traceback" not in out.err
  (line,) = errors(out.err)
  assert "saving checkpoint 4" in line and "No space left on device" in line
  assert "earlier checkpoints (2) are intact" in line
  assert steps_on_disk(tmp_path / "w") == [2]
  monkeypatch.setattr(ocp.CheckpointManager, "save", real_save)
  assert cli(voc, tmp_path / "w", "--resume", cache=compile_cache) == 0   # and it resumes


# -- workdir states ---------------------------------------------------------------------------
def test_one_run_per_workdir_and_stale_locks_are_taken_over(voc, tmp_path, capsys,
                                                            compile_cache):
  import socket
  work = tmp_path / "w"
  work.mkdir()
  lock = work / ".lock"
  lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                              "started": "now"}))
  rc = cli(voc, work, cache=compile_cache)
  out = capsys.readouterr()
  assert rc == 1 and f"in use by process {os.getpid()}" in errors(out.err)[0]
  assert not (work / "checkpoints").exists() and not (work / "metrics.jsonl").exists()
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  lock.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": "then"}))
  rc = cli(voc, work, "--steps", "2", cache=compile_cache)
  out = capsys.readouterr()
  assert rc == 0 and f"taking over a stale lock of process {dead.pid}" in out.out
  assert not lock.exists()  # released at the end


def test_nothing_to_do_is_said_and_changes_nothing(voc, tmp_path, capsys, compile_cache):
  rc = cli(voc, tmp_path / "empty", "--resume", cache=compile_cache)
  out = capsys.readouterr()
  assert rc == 1 and "nothing to resume" in errors(out.err)[0]
  assert not (tmp_path / "empty").exists()
  rc = cli(voc, tmp_path / "none", "--eval-only", cache=compile_cache)
  out = capsys.readouterr()
  assert rc == 1 and "nothing to evaluate" in errors(out.err)[0]
  assert not (tmp_path / "none").exists()
  assert cli(voc, tmp_path / "done", "--steps", "2", cache=compile_cache) == 0
  final = (tmp_path / "done" / "final_metrics.json")
  before = (final.read_bytes(), final.stat().st_mtime_ns,
            (tmp_path / "done" / "metrics.jsonl").read_bytes())
  capsys.readouterr()
  rc = cli(voc, tmp_path / "done", "--steps", "2", "--resume", cache=compile_cache)
  out = capsys.readouterr()
  assert rc == 0 and "already finished" in out.out and "nothing to do" in out.out
  assert before == (final.read_bytes(), final.stat().st_mtime_ns,
                    (tmp_path / "done" / "metrics.jsonl").read_bytes())
  assert steps_on_disk(tmp_path / "done") == [2]


def test_a_torn_last_metrics_line_does_not_stop_resume(voc, tmp_path, capsys, compile_cache):
  assert cli(voc, tmp_path / "w", "--steps", "4", cache=compile_cache) == 0
  with (tmp_path / "w" / "metrics.jsonl").open("a") as f:
    f.write('{"kind": "train", "step": 5, "lo')
  capsys.readouterr()
  rc = cli(voc, tmp_path / "w", "--resume", "--allow-change", "train.steps", cache=compile_cache)
  out = capsys.readouterr()
  assert rc == 0, out.err[-2000:]
  assert "its last line is not a complete record" in out.out
  for line in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines():
    json.loads(line)


def test_a_changed_dataset_on_resume_is_explained_and_restart_epoch_goes_on(voc, tmp_path, capsys,
                                                                           compile_cache):
  assert cli(voc, tmp_path / "w", "--steps", "3", cache=compile_cache) == 0
  ids = split_ids(voc)
  (voc / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(ids[1:]) + "\n")
  capsys.readouterr()
  args = ("--resume", "--allow-change", "train.steps")
  rc = cli(voc, tmp_path / "w", *args, cache=compile_cache)
  out = capsys.readouterr()
  assert rc == 1 and "Traceback" not in out.err
  (line,) = errors(out.err)
  assert "training data or batches changed" in line and "num_examples" in line and "--restart-epoch" in line
  rc = cli(voc, tmp_path / "w", *args, "--restart-epoch", cache=compile_cache)
  out = capsys.readouterr()
  assert rc == 0, out.err[-2000:]
  assert "epoch 2 starts again from its first batch at step 3" in out.out
  assert steps_on_disk(tmp_path / "w")[-1] == 6


def test_duplicate_ids_stop_before_training_with_every_problem_listed(voc, tmp_path, capsys,
                                                                     compile_cache):
  ids = split_ids(voc)
  (voc / "ImageSets" / "Segmentation" / "train.txt").write_text(
      "\n".join(ids + [ids[0], ids[5]]) + "\n")
  (voc / "SegmentationClass" / f"{ids[7]}.png").unlink()
  rc = cli(voc, tmp_path / "w", cache=compile_cache)
  out = capsys.readouterr()
  assert rc == 1 and "Traceback" not in out.err
  text = out.err
  assert ids[0] in text and ids[5] in text and "duplicate" in text and ids[7] in text
  assert "Nothing was trained" in text
  assert not (tmp_path / "w").exists()  # nothing written, not even the workdir


# -- memory ---------------------------------------------------------------------------------
def add_image(voc, eid, h, w, split="train"):
  """A plain image of h x w with a two-class mask, appended to ``split``."""
  img = np.zeros((h, w, 3), np.uint8)
  img[: h // 2] = 200
  Image.fromarray(img).save(voc / "JPEGImages" / f"{eid}.jpg")
  lbl = np.zeros((h, w), np.uint8)
  lbl[: h // 2] = 1
  Image.fromarray(lbl).save(voc / "SegmentationClass" / f"{eid}.png")
  lst = voc / "ImageSets" / "Segmentation" / f"{split}.txt"
  lst.write_text(lst.read_text() + eid + "\n")


@pytest.mark.slow
def test_one_huge_image_that_cannot_fit_is_named_before_training(voc, tmp_path, capsys,
                                                                 monkeypatch, compile_cache):
  add_image(voc, "camera_6000x4000", 4000, 6000)
  monkeypatch.setenv("FCNJAX_MEMORY_LIMIT", "4G")
  rc = cli(voc, tmp_path / "w", "--max-buckets", "2", cache=compile_cache)
  out = capsys.readouterr()
  assert rc == 1 and "Traceback" not in out.err
  (line,) = errors(out.err)
  assert "camera_6000x4000.jpg" in line and "4.0 GiB" in line and "FCNJAX_MEMORY_LIMIT" in line
  assert not (tmp_path / "w" / "checkpoints").exists()


@pytest.mark.slow
def test_a_bucket_that_would_not_fit_gets_a_smaller_batch(voc, tmp_path, capsys, monkeypatch,
                                                          compile_cache):
  add_image(voc, "big", 600, 800)
  monkeypatch.setenv("FCNJAX_MEMORY_LIMIT", "1G")
  rc = cli(voc, tmp_path / "w", "--max-buckets", "2", "--steps", "3", cache=compile_cache)
  out = capsys.readouterr()
  assert rc == 0, out.err[-3000:]
  (line,) = [l for l in out.out.splitlines() if l.startswith("memory: bucket")]
  assert "608x800: batch 8 ->" in line and "to fit" in line  # aligned: sides on a 32 grid
  # the single-image bucket is named as mostly dummy rows
  assert any(l.startswith("warning: bucket 608x800") and "2 of its 3 rows are padding" in l
             and "--max-buckets" in l
             for l in out.out.splitlines())


# -- signals ----------------------------------------------------------------------------------
def _start(voc, workdir, *extra):
  cmd = [sys.executable, "-m", "fcnjax.experiments.voc_fcn8s", "--voc-root", str(voc),
         "--workdir", str(workdir), *TINY[:-4], "--steps", "60", "--save-every", "1000",
         "--compile-cache", "", *extra]
  err = open(pathlib.Path(workdir).with_suffix(".err"), "w+")
  return subprocess.Popen(cmd, env=env_with_devices(1), stdout=subprocess.PIPE, stderr=err,
                          text=True, cwd=REPO, start_new_session=True), err


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_and_resume_equals_the_uninterrupted_run(voc, tmp_path, sig):
  ref, _ = _start(voc, tmp_path / "ref")
  proc, err = _start(voc, tmp_path / "w", "--num-workers", "1")
  deadline = time.time() + 300
  while time.time() < deadline:  # wait until training runs (the first epoch line)
    err.seek(0)
    if "epoch 2/" in err.read():
      break
    time.sleep(0.2)
  os.killpg(proc.pid, sig)   # the whole group, as Ctrl-C in a terminal does
  out, _ = proc.communicate(timeout=300)
  err.seek(0)
  stderr = err.read()
  assert proc.returncode == 128 + sig, stderr[-3000:]
  assert "Traceback" not in stderr and "leaked" not in stderr
  (line,) = [l for l in stderr.splitlines() if l.startswith("stopped by")]
  step = steps_on_disk(tmp_path / "w")[-1]
  assert f"saved checkpoint {step}" in line and "--resume" in line and 0 < step < 60
  resumed = subprocess.run(  # the stored config, as README says
      [sys.executable, "-m", "fcnjax.train", "--workdir", str(tmp_path / "w"), "--resume"],
      env=env_with_devices(1), capture_output=True, text=True, cwd=REPO, timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert ref.wait(timeout=600) == 0
  assert params_equal(final_state(tmp_path / "w")[0], final_state(tmp_path / "ref")[0])


# -- command-line numbers -----------------------------------------------------------------------
@pytest.mark.parametrize("flag,value,says", [
    ("--batch-size", "0", "positive integer"), ("--batch-size", "-1", "positive integer"),
    ("--max-buckets", "0", "positive integer"), ("--steps", "0", "positive integer"),
    ("--save-every", "0", "positive integer"), ("--eval-every-epochs", "0", "positive integer"),
    ("--width-multiplier", "0", ">= 1/64"), ("--learning-rate", "-1", "positive number"),
    ("--grad-accumulation", "0", "positive integer"), ("--num-workers", "-1", ">= 0"),
    ("--epochs", "0", "positive integer"), ("--pixels-per-batch", "0", "positive integer"),
])
def test_a_bad_number_names_the_flag_value_and_range(tmp_path, capsys, flag, value, says):
  rc = voc_fcn8s.main(["--workdir", str(tmp_path / "w"), flag, value])
  err = capsys.readouterr().err
  assert rc == 2
  (line,) = errors(err)
  assert line.startswith(f"error: {flag} {value}") and says in line, line
  assert not (tmp_path / "w").exists()


def test_batch_size_not_a_multiple_of_the_devices(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "fcnjax.experiments.voc_fcn8s", "--workdir", str(tmp_path / "w"),
       "--batch-size", "3"], env=env_with_devices(2), capture_output=True, text=True, cwd=REPO,
      timeout=300)
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  assert errors(proc.stderr) == ["error: --batch-size 3: must be a multiple of the 2 devices "
                                 "(each device takes an equal share of a batch)"]
  assert not (tmp_path / "w").exists()


def test_the_train_cli_names_its_config_override(tmp_path, capsys):
  rc = train_main.main(["--config", "voc_fcn8s:smoke", "--workdir", str(tmp_path / "w"),
                        "--config.checkpoint.save_every=0"])
  assert rc == 2
  assert errors(capsys.readouterr().err) == [
      "error: --config.checkpoint.save_every=0: must be a positive integer (1, 2, ...)"]


def test_validate_full_finds_decode_problems_before_training(voc, tmp_path, capsys):
  ids = split_ids(voc)
  truncate(voc / "JPEGImages" / f"{ids[4]}.jpg", 0.5)
  rc = cli(voc, tmp_path / "w", "--validate", "full")
  out = capsys.readouterr()
  assert rc == 1 and "Traceback" not in out.err
  (line,) = errors(out.err)
  assert "1 problem (unreadable=1)" in line and "Nothing was trained" in out.err
  assert ids[4] in out.err and not (tmp_path / "w").exists()


# -- weights given with --init ------------------------------------------------------------------
@pytest.mark.slow
def test_init_weights_problems_are_one_line_and_the_escape_hatches_work(voc, tmp_path, capsys,
                                                                       compile_cache):
  from flax import nnx
  from fcnjax import models, weights

  def trained(model):  # score layers start at zero (no geometry yet): give them values
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
      if any("score" in str(k) for k in path):
        var[...] = var[...] + 0.01
    return model
  exact = tmp_path / "exact.safetensors"
  weights.save(trained(models.build_model("fcn8s", 21, width_multiplier=0.0625, aligned=False)),
               exact)
  rc = cli(voc, tmp_path / "a", "--init", str(exact), cache=compile_cache)  # smoke is aligned
  out = capsys.readouterr()
  assert rc == 1
  (line,) = errors(out.err)
  assert str(exact) in line and "exact (pad-100) geometry" in line
  assert "--allow-geometry-change" in line and not (tmp_path / "a" / "checkpoints").exists()
  assert cli(voc, tmp_path / "b", "--init", str(exact), "--allow-geometry-change", "--steps", "2",
             cache=compile_cache) == 0
  capsys.readouterr()
  five = tmp_path / "five.safetensors"
  weights.save(models.build_model("fcn8s", 5, width_multiplier=0.0625, aligned=True), five)
  rc = cli(voc, tmp_path / "c", "--init", str(five), cache=compile_cache)
  (line,) = errors(capsys.readouterr().err)
  assert rc == 1 and "scores 5 classes" in line and "--reinit-scores" in line
  assert cli(voc, tmp_path / "d", "--init", str(five), "--reinit-scores", "--steps", "2",
             cache=compile_cache) == 0
  capsys.readouterr()
  garbage = tmp_path / "garbage.safetensors"
  garbage.write_bytes(b"\x00\x01 not a weight file")
  rc = cli(voc, tmp_path / "e", "--init", str(garbage), cache=compile_cache)
  out = capsys.readouterr()
  assert rc == 1 and "Traceback" not in out.err
  (line,) = errors(out.err)
  assert str(garbage) in line and "safetensors" in line
  rc = cli(voc, tmp_path / "f", "--init", str(tmp_path / "nope.pth"), cache=compile_cache)
  assert rc == 2 and errors(capsys.readouterr().err) == [
      f"error: --init {tmp_path / 'nope.pth'}: no such file"]
