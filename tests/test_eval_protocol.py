"""Evaluation protocols: ``exact`` (each val image at its own size) against an independent
per-image loop, ``bucketed`` (padded to its size bucket) told apart from it with the exact pad-100
FCN, which protocol each evaluation of a run uses, the CLI / config checks, the exact val loader's
batches, and the class names and palette stored in every checkpoint's meta.

The model is the exact (pad-100) FCN-8s at 1/16 width with random score heads (``init_weights``):
a model with zero-initialised heads predicts one class everywhere, and then every protocol would
give the same confusion matrix.
"""

import collections
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fcnjax import configs, models, preprocessing, weights
from fcnjax.data import readers
from fcnjax.data.palette import IGNORE, VOC_CLASSES, VOC_PALETTE
from fcnjax.experiments import voc_fcn8s
from fcnjax.train import loop
from fcnjax.train import main as train_main
from fcnjax.train.checkpoint import Checkpointer
from fcnjax.train.metrics import segmentation_metrics
from train_helpers import write_tiny_voc

NUM_CLASSES = 21


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory):
  """16 train / 8 val images; the val images have 6 distinct sizes, one of them 3 times."""
  return write_tiny_voc(tmp_path_factory.mktemp("voc"))


@pytest.fixture(scope="module")
def init_weights(tmp_path_factory):
  """An fcnjax weight file of the exact tiny FCN-8s whose score heads are random (N(0, 0.5))."""
  model = models.build_model("fcn8s", NUM_CLASSES, width_multiplier=1 / 16, aligned=False,
                             seed=0)
  rng = np.random.default_rng(0)
  arrays = {k: (rng.normal(0, 0.5, v.shape).astype(v.dtype) if k.startswith("score") else v)
            for k, v in weights.state_arrays(model).items()}
  path = tmp_path_factory.mktemp("weights") / "random_scores.safetensors"
  weights.io.write_safetensors(path, arrays, weights.describe(model))
  return path


def tiny(voc_root, init_weights, **fields):
  """voc_fcn8s:smoke shrunk: the exact 1/16-width FCN-8s from ``init_weights``, batch 8 in one
  train / one val bucket, 2 steps per epoch, no evaluation before the end."""
  cfg = configs.load("voc_fcn8s:smoke")
  cfg.data.root = str(voc_root)
  cfg.model.update(width_multiplier=1 / 16, aligned=False, init=str(init_weights))
  cfg.optim.update(optimizer="sgd", learning_rate=1e-3, warmup_steps=0)
  cfg.train.update(steps=4, log_every=1)
  cfg.data.update(batch_size=8, max_buckets="1")
  cfg.checkpoint.save_every = 2
  cfg.eval.every_epochs = 1000
  cfg.output.compile_cache = ""
  for key, value in fields.items():
    section, name = key.split("__")
    setattr(cfg[section], name, value)
  return cfg


def records(workdir, kind="eval"):
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  return [r for r in map(json.loads, lines) if r["kind"] == kind]


def per_image_confusion(voc_root, init_weights):
  """(C, C) int64 confusion matrix (rows = truth) of single-image forwards, each val image at its
  own size, label 255 ignored; and the set of predicted classes. Independent of the loaders."""
  model = weights.load(init_weights)
  assert model.preprocessing.name == preprocessing.CAFFE.name  # what the data pipeline applies
  model.eval()
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))  # one compile per size
  source = readers.voc_source(voc_root, "val")
  hist = np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)
  predicted = set()
  for i in range(len(source)):
    example = source[i]
    x = preprocessing.CAFFE(example["image"])[None]
    pred = np.asarray(jnp.argmax(forward(state, jnp.asarray(x)), axis=-1))[0]
    label = np.asarray(example["label"])
    assert pred.shape == label.shape
    keep = label != IGNORE
    predicted.update(np.unique(pred[keep]).tolist())
    hist += np.bincount(label[keep].astype(np.int64) * NUM_CLASSES + pred[keep],
                        minlength=NUM_CLASSES ** 2).reshape(NUM_CLASSES, NUM_CLASSES)
  return hist, predicted


@pytest.fixture
def confusions(monkeypatch):
  """The integer confusion matrices the evaluations of this test computed, in order."""
  seen = []

  def recording(hist, class_names=None):
    seen.append(np.asarray(hist).astype(np.int64))
    return segmentation_metrics(hist, class_names)

  monkeypatch.setattr(loop, "segmentation_metrics", recording)
  return seen


def without_protocol(metrics):
  return {k: v for k, v in metrics.items() if k != "protocol"}


# -- exact = the per-image loop; bucketed differs -------------------------------------------------
def test_exact_equals_a_per_image_loop_and_bucketed_differs(voc_root, init_weights, tmp_path,
                                                            confusions, capsys):
  sizes = collections.Counter(map(tuple, readers.voc_source(voc_root, "val").sizes.tolist()))
  assert len(sizes) >= 3 and max(sizes.values()) >= 2  # several sizes, some repeated
  reference, predicted = per_image_confusion(voc_root, init_weights)
  assert len(predicted) >= 3, predicted  # the heads are random: the test can fail

  exact = loop.train(tiny(voc_root, init_weights), tmp_path / "exact", eval_only=True)
  assert exact["protocol"] == "exact"  # --eval-only defaults to eval.final_protocol = exact
  assert f"eval step 0 (exact, {len(sizes)} programs): mIU" in capsys.readouterr().out
  assert [r["protocol"] for r in records(tmp_path / "exact")] == ["exact"]
  # The integer confusion counts are equal, so every metric derived from them is too.
  np.testing.assert_array_equal(confusions[-1], reference)
  assert without_protocol(exact) == segmentation_metrics(reference, VOC_CLASSES)
  for key in ("mean_iu", "pixel_acc", "per_class_iou"):
    assert exact[key] == segmentation_metrics(reference, VOC_CLASSES)[key]

  bucketed = loop.train(tiny(voc_root, init_weights, eval__final_protocol="bucketed"),
                        tmp_path / "bucketed", eval_only=True)
  assert bucketed["protocol"] == "bucketed"
  assert "eval step 0 (bucketed, 1 program): mIU" in capsys.readouterr().out
  padded = confusions[-1]
  # The same pixels are counted (padding is masked out), but the zero padding of the smaller
  # images lies inside the pad-100 model's receptive fields, so some predictions change.
  assert padded.sum() == reference.sum()
  np.testing.assert_array_equal(padded.sum(axis=1), reference.sum(axis=1))
  assert not np.array_equal(padded, reference)


# -- which protocol each evaluation uses -------------------------------------------------------
@pytest.mark.slow
def test_training_evals_are_bucketed_the_final_one_exact_and_meta_names_classes(
    voc_root, init_weights, tmp_path, capsys):
  final = loop.train(tiny(voc_root, init_weights, eval__every_epochs=1), tmp_path)
  out = capsys.readouterr().out
  assert [(r["step"], r["protocol"]) for r in records(tmp_path)] == [(2, "bucketed"),
                                                                     (4, "exact")]
  assert "eval step 2 (bucketed, 1 program): mIU" in out
  assert "eval step 4 (exact, 6 programs): mIU" in out  # the exact model: one per size
  assert "val buckets: 1 buckets" in out and "val (exact): every image at its own size" in out
  saved = json.loads((tmp_path / "final_metrics.json").read_text())
  assert saved["step"] == 4 and saved["protocol"] == "exact" == final["protocol"]
  assert saved["mean_iu"] == records(tmp_path)[-1]["mean_iu"]
  # Every checkpoint's meta names the classes and their colours.
  ckpt = Checkpointer(tmp_path)
  try:
    for step in ckpt.last.all_steps():
      meta = ckpt.read_meta(step)
      assert meta["class_names"] == list(VOC_CLASSES) and len(meta["class_names"]) == 21
      palette = np.asarray(meta["palette"])
      assert palette.shape == (256, 3) and np.array_equal(palette, VOC_PALETTE)
    assert ckpt.read_meta(4, best=True)["class_names"] == list(VOC_CLASSES)
  finally:
    ckpt.close()

  # A resumed run whose last evaluation did not finish evaluates it with the final protocol,
  # which may change on --resume (a free field).
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  kept = [l for l in lines if not (json.loads(l)["kind"] == "eval" and json.loads(l)["step"] == 4)]
  (tmp_path / "metrics.jsonl").write_text("".join(l + "\n" for l in kept))
  loop.train(tiny(voc_root, init_weights, eval__every_epochs=1,
                  eval__final_protocol="bucketed"), tmp_path, resume=True)
  out = capsys.readouterr().out
  assert "config changes on resume: eval.final_protocol: 'exact' -> 'bucketed'" in out
  assert "evaluating it now" in out and "eval step 4 (bucketed, 1 program)" in out
  assert [(r["step"], r["protocol"]) for r in records(tmp_path)] == [(2, "bucketed"),
                                                                     (4, "bucketed")]
  assert json.loads((tmp_path / "final_metrics.json").read_text())["protocol"] == "bucketed"


# -- the exact val loader -----------------------------------------------------------------------
@pytest.mark.parametrize("num_devices", [1, 2])
def test_exact_loader_has_one_bucket_per_size_and_batches_capped_to_its_images(voc_root,
                                                                               num_devices):
  source = readers.voc_source(voc_root, "val")
  count = collections.Counter(map(tuple, source.sizes.tolist()))
  dist = dict(num_devices=num_devices, process_index=0, process_count=1, granularity=1)
  batching = dict(batch_size=8, pixels_per_batch=None)
  loader = loop.exact_eval_loader(source, batching, dist)
  shapes = [tuple(s) for s in loader.bucket_shapes]
  assert sorted(shapes) == sorted(count)
  rounded = {s: -(-n // num_devices) * num_devices for s, n in count.items()}
  assert dict(zip(shapes, loader.batch_sizes)) == rounded
  assert loader.plan.padded_pixels == loader.plan.real_pixels  # no image is padded
  seen = []
  for batch in loader:
    rows = batch["index"] >= 0
    assert {tuple(source.sizes[i]) for i in batch["index"][rows]} == {batch["image"].shape[1:3]}
    assert batch["mask"][rows].all()
    seen += batch["index"][rows].tolist()
  assert sorted(seen) == list(range(len(source)))
  # a memory plan's cap lowers a bucket further; the count cap stays where it is lower
  big = max(count, key=count.get)
  once = next(s for s, n in count.items() if n == 1)
  capped = loop.exact_eval_loader(source, batching, dist,
                                  max_batch_sizes={big: num_devices, once: 8})
  sizes = dict(zip(map(tuple, capped.bucket_shapes), capped.batch_sizes))
  assert sizes[big] == num_devices < rounded[big] and sizes[once] == rounded[once]


def test_a_run_builds_only_the_val_loaders_its_protocols_need(voc_root, init_weights):
  cfg = loop.resolve(tiny(voc_root, init_weights), _Classes())
  train_src = readers.voc_source(voc_root, "train")
  val_src = readers.voc_source(voc_root, "val")
  _, vals = loop.build_loaders(cfg, train_src, val_src, 1, protocols=loop.eval_protocols(cfg))
  assert list(vals) == ["bucketed", "exact"]
  cfg.eval.protocol = "exact"
  assert loop.eval_protocols(cfg) == ("exact",)
  _, vals = loop.build_loaders(cfg, train_src, val_src, 1, protocols=(),
                               eval_max_batch_sizes={"exact": {}})
  assert vals == {}
  with pytest.raises(ValueError, match="unknown evaluation protocol 'padded'"):
    loop.build_loaders(cfg, train_src, val_src, 1, protocols=("padded",))


def test_memory_plan_of_many_val_buckets_costs_a_few_traces(voc_root, init_weights, tmp_path,
                                                            monkeypatch):
  from fcnjax.data import datasets
  from fcnjax.train import memory
  traced = []
  bound = memory.step_memory_bound

  def counting(train_step, state, batch_shape, **kw):
    traced.append(tuple(batch_shape))
    return bound(train_step, state, batch_shape, **kw)

  monkeypatch.setattr(memory, "step_memory_bound", counting)
  monkeypatch.setattr(loop, "MAX_TRACED_VAL_BUCKETS", 2)
  monkeypatch.setenv(memory.ENV_VAR, "64G")
  cfg = loop.resolve(tiny(voc_root, init_weights, eval__protocol="exact"), _Classes())
  sources = datasets.make_sources(cfg, print_fn=lambda *a: None)
  run = loop.Run(cfg, sources, tmp_path, print_fn=lambda *a: None)
  try:
    assert list(run.val_loaders) == ["exact"] and len(run.val_loaders["exact"].bucket_shapes) == 6
    val = run.val_loaders["exact"]
    assert len(traced) == 1 + 2  # the train bucket, then 2 covering val shapes (not 6)
    for (h, w), b in zip(val.bucket_shapes, val.batch_sizes):  # each bucket is covered
      assert any(b <= B and h <= H and w <= W for B, H, W in traced[1:]), (h, w, b, traced)
    # A covering shape over the budget: a calibrated model (here 1 byte per pixel, budget 1.5
    # rows of 50x75) caps the loader's own buckets, and the caps reach the exact loader.
    monkeypatch.setattr(memory, "step_memory_bound", lambda *a, **k: {"peak": 1 << 60})
    monkeypatch.setattr(memory, "calibrate",
                        lambda *a, **k: memory.StepMemoryModel(0.0, 0.0, 1.0, 1))
    plan = run._plan_many_buckets(val, limit=int(1.5 * 50 * 75 / memory.DEFAULT_HEADROOM))
    planned = dict(zip(map(tuple, plan.bucket_shapes), plan.batch_sizes))
    assert dict(zip(map(tuple, val.bucket_shapes), val.batch_sizes))[(50, 75)] == 3
    assert planned[(50, 75)] == 1 and [plan.bucket_shapes[k] for k in plan.reduced] == [(50, 75)]
    _, vals = loop.build_loaders(cfg, sources.train, sources.val, 1, protocols=("exact",),
                                 eval_max_batch_sizes={"exact": planned})
    assert dict(zip(map(tuple, vals["exact"].bucket_shapes), vals["exact"].batch_sizes)) == planned
  finally:
    run.ckpt.close()


class _Classes:
  num_classes, name = NUM_CLASSES, "tiny voc"


# -- configs and command lines ------------------------------------------------------------------
def test_defaults_presets_and_free_on_resume():
  cfg = configs.load("voc_fcn8s:smoke")
  assert (cfg.eval.protocol, cfg.eval.final_protocol) == ("bucketed", "exact")
  assert configs.load("voc_fcn8s:paper").eval.final_protocol == "exact"
  assert {"eval.protocol", "eval.final_protocol"} <= set(configs.FREE_ON_RESUME)


@pytest.mark.parametrize("field", ["protocol", "final_protocol"])
def test_an_unknown_protocol_is_a_config_error_naming_the_choices(field):
  cfg = configs.load("voc_fcn8s:smoke")
  cfg.eval[field] = "padded"
  with pytest.raises(configs.ConfigError) as err:
    configs.validate(cfg)
  assert str(err.value) == f"eval.{field} = 'padded': must be one of exact, bucketed"
  assert (err.value.field, err.value.value) == (f"eval.{field}", "padded")


@pytest.mark.parametrize("flag,expect", [([], ("bucketed", "exact")),
                                         (["--eval-protocol", "exact"], ("exact", "exact")),
                                         (["--eval-protocol", "bucketed"],
                                          ("bucketed", "bucketed"))])
def test_the_eval_protocol_flag_sets_both_fields(flag, expect):
  args, _ = voc_fcn8s.parse_args(flag)
  _, cfg = voc_fcn8s.make_config(args)
  assert (cfg.eval.protocol, cfg.eval.final_protocol) == expect
  from fcnjax.experiments import flags
  assert flags.flag_of("eval.final_protocol", args) == ("--eval-protocol" if flag else None)


def test_the_clis_refuse_an_unknown_protocol_with_exit_2(tmp_path, capsys):
  with pytest.raises(SystemExit) as exit_:
    voc_fcn8s.main(["--workdir", str(tmp_path / "w"), "--eval-protocol", "bogus"])
  assert exit_.value.code == 2
  assert "--eval-protocol: invalid choice: 'bogus'" in capsys.readouterr().err
  rc = train_main.main(["--config", "voc_fcn8s:smoke", "--workdir", str(tmp_path / "w"),
                        "--config.eval.protocol=bogus"])
  assert rc == 2
  errors = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error:")]
  assert errors == ["error: --config.eval.protocol=bogus: must be one of exact, bucketed"]
  assert not (tmp_path / "w").exists()
