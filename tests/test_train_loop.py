"""The training loop in-process: outputs, divergence, checkpoint mismatch, bf16, eval-only."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from fcnjax.data import readers
from fcnjax.train import step as step_lib
from fcnjax.train.checkpoint import CheckpointMismatch, Checkpointer
from fcnjax.train.loop import (RunConfig, TrainingDiverged, build_model, build_optimizer,
                               train)
from train_helpers import write_tiny_voc


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
  root = write_tiny_voc(tmp_path_factory.mktemp("voc"))
  return readers.voc_source(root, "train"), readers.voc_source(root, "val")


def tiny(**overrides) -> RunConfig:
  values = dict(model="fcn8s", width_multiplier=1 / 16, aligned=True, optimizer="sgd",
                learning_rate=0.01, steps=4, batch_size=8, max_buckets=1, save_every=2,
                eval_every_epochs=1000, log_every=1)
  values.update(overrides)
  return RunConfig(**values)


def test_run_writes_metrics_curves_predictions_and_checkpoints(sources, tmp_path, capsys):
  metrics = train(tiny(), *sources, tmp_path)
  out = capsys.readouterr()
  assert "devices: 1 x cpu" in out.out and "train buckets:" in out.out
  assert "learnable parameters" in out.out and "eval step 4: mIU" in out.out
  assert "loss" in out.err and "img/s" in out.err and "bucket" in out.err  # progress bar
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4]
  assert records[-1]["kind"] == "eval" and records[-1]["mean_iu"] == metrics["mean_iu"]
  assert set(records[-1]["per_class_iou"]) >= {"background", "aeroplane"}
  for png in ("curves.png", "predictions.png"):
    assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
  ckpt = Checkpointer(tmp_path)
  assert ckpt.last.all_steps() == [2, 4] and ckpt.best.latest_step() == 4
  ckpt.close()


def test_existing_workdir_needs_resume(sources, tmp_path):
  train(tiny(steps=2), *sources, tmp_path)
  with pytest.raises(FileExistsError, match="--resume"):
    train(tiny(steps=2), *sources, tmp_path)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(sources, tmp_path):
  cfg = tiny(steps=6, save_every=1, learning_rate=1e12, optimizer="sgd")
  with pytest.raises(TrainingDiverged, match="non-finite loss") as err:
    train(cfg, *sources, tmp_path)
  ckpt = Checkpointer(tmp_path)
  last = ckpt.latest_step()
  assert last is not None and f"Last good checkpoint: {last}" in str(err.value)
  graphdef, like = step_lib.init_state(build_model(cfg), build_optimizer(cfg, cfg.steps))
  state, meta = ckpt.restore(like, model_description=cfg.model_description())
  ckpt.close()
  assert meta["step"] == last
  # What was saved is usable: finite parameters (the diverged update was never saved).
  assert all(np.all(np.isfinite(np.asarray(x))) for x in _leaves(state.params))


def _leaves(tree):
  import jax
  return jax.tree.leaves(tree)


def test_resume_with_another_model_is_a_clear_error(sources, tmp_path):
  train(tiny(steps=2), *sources, tmp_path)
  with pytest.raises(CheckpointMismatch, match="num_classes: checkpoint has 21, requested 5"):
    train(tiny(steps=4, num_classes=5), *sources, tmp_path, resume=True)


def test_bf16_compute_trains_with_float32_params(sources, tmp_path):
  cfg = tiny(steps=2, precision="bf16")
  train(cfg, *sources, tmp_path)
  model = build_model(cfg)
  _, state = step_lib.init_state(model, build_optimizer(cfg, cfg.steps))
  assert all(x.dtype == jnp.float32 for x in _leaves(state.params))
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert all(np.isfinite(r["loss"]) for r in records if r["kind"] == "train")


def test_eval_only_reads_the_checkpoint(sources, tmp_path):
  trained = train(tiny(steps=2), *sources, tmp_path)
  again = train(tiny(steps=2), *sources, tmp_path, eval_only=True)
  assert again["mean_iu"] == pytest.approx(trained["mean_iu"])
