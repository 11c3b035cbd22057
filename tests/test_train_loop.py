"""The training loop in-process, driven by a config (as flax's train_test.py): outputs, stored
config and resume checks, divergence, checkpoint mismatch, bf16, eval-only."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from fcnjax import configs
from fcnjax.train import step as step_lib
from fcnjax.train.checkpoint import CheckpointMismatch, Checkpointer
from fcnjax.train.loop import (TrainingDiverged, build_model, build_optimizer, model_description,
                               resolve, stored_config, train)
from train_helpers import write_tiny_voc


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory):
  return write_tiny_voc(tmp_path_factory.mktemp("voc"))


def tiny(voc_root, **fields):
  """The voc_fcn8s smoke config shrunk to a 1/16-width model, 4 steps on the tiny dataset."""
  cfg = configs.load("voc_fcn8s:smoke")
  cfg.data.root = str(voc_root)
  cfg.model.width_multiplier = 1 / 16
  cfg.optim.update(optimizer="sgd", learning_rate=0.01, warmup_steps=0)
  cfg.train.update(steps=4, log_every=1)
  cfg.data.update(batch_size=8, max_buckets="1")
  cfg.checkpoint.save_every = 2
  cfg.eval.every_epochs = 1000
  cfg.output.compile_cache = ""
  for key, value in fields.items():
    section, name = key.split("__")
    setattr(cfg[section], name, value)
  return cfg


def records(workdir):
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_run_writes_metrics_curves_predictions_checkpoints_and_config(voc_root, tmp_path, capsys):
  cfg = tiny(voc_root)
  metrics = train(cfg, tmp_path)
  out = capsys.readouterr()
  assert "devices: 1 x cpu" in out.out and "train buckets:" in out.out
  assert "learnable parameters" in out.out and "eval step 4 (exact, " in out.out
  assert "aeroplane" in out.out and "IoU" in out.out  # the per-class table, with class names
  assert "loss" in out.err and "img/s" in out.err and "bucket" in out.err  # progress bar
  recs = records(tmp_path)
  assert [r["step"] for r in recs if r["kind"] == "train"] == [1, 2, 3, 4]
  assert all(r["learning_rate"] > 0 for r in recs if r["kind"] == "train")
  assert recs[-1]["kind"] == "compile" and recs[-1]["step"] == 4  # what the run compiled
  assert recs[-2]["kind"] == "eval" and recs[-2]["mean_iu"] == metrics["mean_iu"]
  assert set(recs[-2]["per_class_iou"]) >= {"background", "aeroplane"}
  for png in ("curves.png", "predictions.png"):
    assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
  ckpt = Checkpointer(tmp_path)
  assert ckpt.last.all_steps() == [2, 4] and ckpt.best.latest_step() == 4
  meta = ckpt.read_meta(4)
  ckpt.close()
  # Every checkpoint stores the resolved config (num_classes filled in from the dataset).
  saved = configs.from_dict(meta["config"])
  assert configs.differences(saved, resolve(cfg, _Src(21))) == []
  assert saved.model.num_classes == 21
  assert json.loads((tmp_path / "config.json").read_text()) == meta["config"]
  assert configs.differences(stored_config(tmp_path), saved) == []


class _Src:
  def __init__(self, n):
    self.num_classes, self.name = n, "x"


def test_existing_workdir_needs_resume(voc_root, tmp_path):
  train(tiny(voc_root, train__steps=2), tmp_path)
  with pytest.raises(FileExistsError, match="--resume"):
    train(tiny(voc_root, train__steps=2), tmp_path)


def test_resume_refuses_a_changed_field_unless_allowed(voc_root, tmp_path, capsys):
  train(tiny(voc_root, train__steps=2), tmp_path)
  changed = tiny(voc_root, train__steps=4, optim__learning_rate=0.02)
  with pytest.raises(CheckpointMismatch) as err:
    train(changed, tmp_path, resume=True)
  msg = str(err.value)
  assert "optim.learning_rate: checkpoint has 0.01, requested 0.02" in msg
  assert "train.steps: checkpoint has 2, requested 4" in msg and "--allow-change" in msg
  # Explicitly allowed: the run continues and says what changed; a free field needs nothing.
  longer = tiny(voc_root, train__steps=4, train__log_every=2)
  train(longer, tmp_path, resume=True, allow_changes=["train.steps"])
  out = capsys.readouterr().out
  assert "config changes on resume: train.log_every: 1 -> 2; train.steps: 2 -> 4" in out
  assert "resumed from" in out and "(step 2 of 4)" in out


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(voc_root, tmp_path):
  cfg = tiny(voc_root, train__steps=6, checkpoint__save_every=1, optim__learning_rate=1e12)
  with pytest.raises(TrainingDiverged, match="non-finite loss") as err:
    train(cfg, tmp_path)
  ckpt = Checkpointer(tmp_path)
  last = ckpt.latest_step()
  assert last is not None and f"Last good checkpoint: {last}" in str(err.value)
  cfg = resolve(cfg, _Src(21))
  graphdef, like = step_lib.init_state(build_model(cfg), build_optimizer(cfg, 6))
  state, meta = ckpt.restore(like, model_description=model_description(cfg))
  ckpt.close()
  assert meta["step"] == last
  # What was saved is usable: finite parameters (the diverged update was never saved).
  assert all(np.all(np.isfinite(np.asarray(x))) for x in _leaves(state.params))


def _leaves(tree):
  import jax
  return jax.tree.leaves(tree)


def test_resume_with_another_model_is_a_clear_error(voc_root, tmp_path):
  train(tiny(voc_root, train__steps=2), tmp_path)
  with pytest.raises(CheckpointMismatch, match="model.width_multiplier: checkpoint has 0.0625"):
    train(tiny(voc_root, train__steps=2, model__width_multiplier=0.125), tmp_path, resume=True)


def test_num_classes_must_match_the_dataset(voc_root, tmp_path):
  from fcnjax.data.validation import DataError
  with pytest.raises(DataError, match="model.num_classes = 5 but the dataset"):
    train(tiny(voc_root, model__num_classes=5), tmp_path)


@pytest.mark.slow
def test_bf16_compute_trains_with_float32_params(voc_root, tmp_path):
  cfg = tiny(voc_root, train__steps=2, model__precision="bf16")
  train(cfg, tmp_path)
  cfg = resolve(cfg, _Src(21))
  _, state = step_lib.init_state(build_model(cfg), build_optimizer(cfg, 2))
  assert all(x.dtype == jnp.float32 for x in _leaves(state.params))
  assert all(np.isfinite(r["loss"]) for r in records(tmp_path) if r["kind"] == "train")


def test_eval_only_reads_the_checkpoint(voc_root, tmp_path):
  trained = train(tiny(voc_root, train__steps=2), tmp_path)
  again = train(tiny(voc_root, train__steps=2), tmp_path, eval_only=True)
  assert again["mean_iu"] == pytest.approx(trained["mean_iu"])


def test_dice_term_and_class_weights_reach_the_step(voc_root, tmp_path):
  weights = tuple([0.5] + [2.0] * 20)
  train(tiny(voc_root, train__steps=2, loss__dice_weight=0.5, loss__class_weights=weights),
        tmp_path)
  recs = [r for r in records(tmp_path) if r["kind"] == "train"]
  assert all("dice" in r and "ce" in r for r in recs)
  assert all(r["loss"] == pytest.approx(r["ce"] + 0.5 * r["dice"], rel=1e-5) for r in recs)
  with pytest.raises(configs.ConfigError, match="3 weights for 21 classes"):
    train(tiny(voc_root, loss__class_weights=(1.0, 2.0, 3.0)), tmp_path / "w")


def test_tensorboard_event_files_are_written_when_asked(voc_root, tmp_path):
  train(tiny(voc_root, train__steps=2, output__tensorboard=True, eval__every_epochs=1), tmp_path)
  events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
  assert events and events[0].stat().st_size > 0
  data = b"".join(e.read_bytes() for e in events)
  for tag in (b"train/loss", b"train/learning_rate", b"val/mean_iu", b"val/predictions"):
    assert tag in data, tag
