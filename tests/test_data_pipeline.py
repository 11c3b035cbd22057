"""Grain pipeline on the synthetic VOC-layout dataset: plans, batches, determinism, state, workers."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from fcnjax import preprocessing
from fcnjax.data import augment, palette, pipeline, readers, synthetic

SCALE = 0.15


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
  return synthetic.write_synthetic_voc(tmp_path_factory.mktemp("synth"), num_train=40, num_val=13,
                                       scale=SCALE, seed=3)


@pytest.fixture(scope="module")
def train_src(voc):
  return readers.voc_source(voc, "train")


@pytest.fixture(scope="module")
def val_src(voc):
  return readers.voc_source(voc, "val")


def _all(loader):
  return [b for b in loader]


def _indices(batches):
  return np.concatenate([b["index"] for b in batches])


# -- the synthetic dataset ------------------------------------------------------------------------
def test_synthetic_round_trips_through_voc_reader(voc, train_src, val_src):
  assert len(train_src) == 40 and len(val_src) == 13
  assert (voc / "ImageSets/Segmentation/trainval.txt").read_text().split() == train_src.ids + val_src.ids
  table = {(int(round(h * SCALE)), int(round(w * SCALE))) for h, w in synthetic.voc_sizes()}
  assert {tuple(s) for s in train_src.sizes.tolist()} <= table
  classes = set()
  for i in range(len(train_src)):
    ex = train_src[i]
    assert ex["image"].shape == (*train_src.sizes[i], 3)
    vals = set(np.unique(ex["label"]).tolist())
    assert vals <= set(range(21)) | {255} and 255 in vals and 0 in vals
    assert len(vals - {0, 255}) >= 1  # at least one object
    classes |= vals - {0, 255}
    with Image.open(voc / "SegmentationClass" / f"{ex['id']}.png") as m:
      assert m.mode == "P"
  assert len(classes) >= 15


def test_synthetic_is_deterministic(tmp_path, voc):
  again = synthetic.write_synthetic_voc(tmp_path / "a", num_train=40, num_val=13, scale=SCALE, seed=3)
  for sub in ("JPEGImages/synth_3_000007.jpg", "SegmentationClass/synth_3_000050.png"):
    assert (again / sub).read_bytes() == (voc / sub).read_bytes()
  other = synthetic.write_synthetic_voc(tmp_path / "b", num_train=2, num_val=0, scale=SCALE, seed=4)
  assert (other / "JPEGImages/synth_4_000000.jpg").read_bytes() != (
      voc / "JPEGImages/synth_3_000000.jpg").read_bytes()


def test_objects_are_large_and_colour_does_not_give_the_class():
  rng = np.random.default_rng(0)
  colours, extents = {}, []
  for _ in range(60):
    image, label = synthetic.render_example(rng, 94, 125, band=1)
    for c in set(np.unique(label).tolist()) - {0, 255}:
      ys, xs = np.nonzero(label == c)
      extents.append(max(np.ptp(ys), np.ptp(xs)) + 1)
      colours.setdefault(c, set()).add(tuple(np.median(image[label == c], 0).astype(int) // 40))
  assert np.mean(np.array(extents) >= 0.2 * 94) > 0.95  # objects span >= 20 % of the short side
  assert len(extents) > 90  # 1-3 objects per image
  # the same colour bins occur in many classes
  bins = {}
  for c, s in colours.items():
    for b in s:
      bins.setdefault(b, set()).add(c)
  assert max(len(v) for v in bins.values()) >= 5


def test_stats_and_check_clis_on_a_voc_root(voc, capsys):
  from fcnjax.data import check, stats
  assert stats.main([str(voc)]) == 0
  out = capsys.readouterr().out
  assert "images: 53" in out and "K = 16" in out and "K = auto" in out
  assert check.main([str(voc.parent)]) == 0
  assert "40 examples checked, no problems" in capsys.readouterr().out


def test_ensure_builtin_dataset_is_cached_and_atomic(tmp_path, monkeypatch):
  def boom(*a, **k):
    raise KeyboardInterrupt
  with monkeypatch.context() as m:
    m.setattr(synthetic, "write_synthetic_voc", boom)
    with pytest.raises(KeyboardInterrupt):
      synthetic.ensure_builtin_dataset(tmp_path, num_train=3, num_val=2, scale=0.1)
  assert list(tmp_path.iterdir()) == []  # nothing half-written left behind
  voc = synthetic.ensure_builtin_dataset(tmp_path, num_train=3, num_val=2, scale=0.1)
  assert len(readers.voc_source(voc, "train")) == 3
  stamp = (voc / "JPEGImages/synth_0_000000.jpg").stat().st_mtime_ns
  assert synthetic.ensure_builtin_dataset(tmp_path, num_train=3, num_val=2, scale=0.1) == voc
  assert (voc / "JPEGImages/synth_0_000000.jpg").stat().st_mtime_ns == stamp
  assert [p.name for p in tmp_path.iterdir()] == [f"builtin_voc_v{synthetic.GENERATOR_VERSION}_n3-2_s0.1_seed0"]


# -- plans and batches ----------------------------------------------------------------------------
AUG = augment.Augment(flip=True, scale_range=(0.5, 2.0), color_jitter=0.1)


def test_every_image_exactly_once_per_epoch(train_src):
  loader = pipeline.make_train_loader(train_src, batch_size=4, num_epochs=2, seed=1, augment=AUG,
                                      max_buckets=3)
  batches = _all(loader)
  assert len(batches) == len(loader) == sum(loader.batches_per_epoch)
  n0 = loader.batches_per_epoch[0]
  orders = []
  for ep in (batches[:n0], batches[n0:]):
    idx = _indices(ep)
    real = idx[idx >= 0]
    assert sorted(real.tolist()) == list(range(40))
    orders.append(real)
  assert orders[0].tolist() != orders[1].tolist()
  assert loader.epoch_and_batch(n0) == (1, 0) and loader.epoch_and_batch(n0 - 1) == (0, n0 - 1)


def test_remainder_drop_and_fill(train_src):
  for mode in ("drop", "fill"):
    loader = pipeline.make_train_loader(train_src, batch_size=4, seed=2, augment=None,
                                        remainder=mode, max_buckets=3)
    idx = _indices(_all(loader))
    assert (idx >= 0).all()  # no dummies
    counts = np.bincount(idx, minlength=40)
    assert (counts <= 1).all() if mode == "drop" else (counts >= 1).all()


def test_same_seed_same_batches_other_seed_other_order(train_src):
  make = lambda s: _all(pipeline.make_train_loader(train_src, batch_size=4, seed=s, augment=AUG,
                                                   max_buckets=3))
  a, b, c = make(5), make(5), make(6)
  assert len(a) == len(b)
  for x, y in zip(a, b):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  assert _indices(a).tolist() != _indices(c).tolist()


def test_at_most_k_batch_shapes(train_src):
  loader = pipeline.make_train_loader(train_src, batch_size=4, num_epochs=2, seed=0, augment=AUG,
                                      max_buckets=3)
  assert len(loader.bucket_shapes) <= 3
  shapes = {b["image"].shape[1:3] for b in loader}
  assert shapes <= set(loader.bucket_shapes) and len(shapes) <= 3
  assert "buckets" in loader.report() and "batch" in loader.report()


def test_eval_batches_exact_content_padding_and_dummies(val_src):
  loader = pipeline.make_eval_loader(val_src, batch_size=4, max_buckets=2)
  batches = _all(loader)
  idx = _indices(batches)
  assert sorted(idx[idx >= 0].tolist()) == list(range(13)) and (idx == -1).any()
  for b in batches:
    B, H, W, _ = b["image"].shape
    assert b["image"].dtype == np.float32 and b["label"].dtype == np.uint8
    assert b["mask"].dtype == bool and b["index"].dtype == np.int32
    assert b["label"].shape == b["mask"].shape == (B, H, W)
    for r, i in enumerate(b["index"]):
      if i < 0:
        assert not b["mask"][r].any() and (b["label"][r] == 255).all() and (b["image"][r] == 0).all()
        continue
      ex = val_src[int(i)]
      h, w = ex["label"].shape
      np.testing.assert_array_equal(b["image"][r, :h, :w], preprocessing.CAFFE.fn(ex["image"]))
      np.testing.assert_array_equal(b["label"][r, :h, :w], ex["label"])
      assert (b["image"][r, h:] == 0).all() and (b["image"][r, :, w:] == 0).all()
      assert (b["label"][r, h:] == 255).all() and (b["label"][r, :, w:] == 255).all()
      assert b["mask"][r, :h, :w].all() and b["mask"][r].sum() == h * w
  total = sum(b["mask"].size for b in batches)
  real = sum(b["mask"].sum() for b in batches)
  assert loader.padded_fraction() == pytest.approx(1 - real / total)


def test_augmentation_is_flip_and_scale_from_the_plan(train_src):
  aug = augment.Augment(flip=True, scale_range=(0.6, 1.4))
  loader = pipeline.make_train_loader(train_src, batch_size=2, seed=0, augment=aug, max_buckets=2)
  plan = loader.load.plan(0)
  flips = 0
  for b in _all(loader):
    for r, i in enumerate(b["index"]):
      if i < 0:
        continue
      ex = train_src[int(i)]
      oh, ow = plan.out_sizes[i]
      assert b["mask"][r].sum() == oh * ow and b["mask"][r, :oh, :ow].all()
      want_img, want_lbl = augment.apply(ex["image"], ex["label"], (oh, ow), plan.aug.flip[i],
                                         plan.aug.jitter[i])
      np.testing.assert_array_equal(b["label"][r, :oh, :ow], want_lbl)
      np.testing.assert_allclose(b["image"][r, :oh, :ow], preprocessing.CAFFE.fn(want_img))
      flips += bool(plan.aug.flip[i])
  assert 5 < flips < 35
  assert (plan.aug.scale != 1).all() and len(np.unique(plan.out_sizes, axis=0)) > 10
  # Without scaling, a row is the image or its mirror.
  noscale = pipeline.make_train_loader(train_src, batch_size=2, seed=0, max_buckets=2,
                                       augment=augment.Augment(flip=True, scale_range=None))
  b = next(iter(noscale))
  i = int(b["index"][0])
  ex = train_src[i]
  h, w = ex["label"].shape
  got = b["label"][0, :h, :w]
  assert (got == ex["label"]).all() or (got == ex["label"][:, ::-1]).all()


def test_color_jitter_factors():
  img = np.random.default_rng(0).integers(30, 200, (8, 9, 3)).astype(np.uint8)
  np.testing.assert_array_equal(augment.color_jitter(img, (1, 1, 1)), img)
  darker = augment.color_jitter(img, (0.5, 1, 1)).astype(float)
  assert darker.mean() == pytest.approx(img.mean() / 2, abs=1)
  grey = augment.color_jitter(img, (1, 1, 0)).astype(int)
  assert np.abs(grey[..., 0] - grey[..., 2]).max() <= 1  # saturation 0 -> grey
  flat = augment.color_jitter(img, (1, 0, 1)).astype(int)
  assert flat.std() < 2  # contrast 0 -> one grey level
  p1 = augment.draw_params(AUG, 3, 1, 50)
  p2 = augment.draw_params(AUG, 3, 1, 50)
  p3 = augment.draw_params(AUG, 3, 2, 50)
  np.testing.assert_array_equal(p1.jitter, p2.jitter)
  assert not np.array_equal(p1.scale, p3.scale)
  assert ((p1.jitter >= 0.9) & (p1.jitter <= 1.1)).all() and (p1.jitter != 1).all()


def test_scale_exceeding_given_buckets_is_resized_down_to_fit(train_src):
  shapes = [(40, 40), (60, 80)]
  loader = pipeline.make_train_loader(train_src, batch_size=2, seed=0, bucket_shapes=shapes,
                                      augment=augment.Augment(scale_range=(1.5, 2.0)))
  for b in loader:
    assert b["image"].shape[1:3] in shapes
  out = loader.load.plan(0).out_sizes
  assert (out[:, 0] <= 60).all() and (out[:, 1] <= 80).all()
  with pytest.raises(ValueError, match="never resizes"):
    pipeline.make_eval_loader(train_src, batch_size=2, bucket_shapes=shapes)


def test_pixel_budget_and_device_divisibility(train_src):
  loader = pipeline.make_train_loader(train_src, pixels_per_batch=40_000, num_devices=2, seed=0,
                                      augment=None, max_buckets=3)
  assert all(bs % 2 == 0 for bs in loader.batch_sizes)
  by_shape = dict(zip(loader.bucket_shapes, loader.batch_sizes))
  for b in loader:
    assert b["image"].shape[0] == by_shape[b["image"].shape[1:3]]
  h, w = loader.bucket_shapes[0]
  assert by_shape[(h, w)] == max(2, 40_000 // (h * w) // 2 * 2)


def test_multi_host_rows_concatenate_to_the_global_batch(train_src):
  kw = dict(batch_size=4, num_devices=4, seed=9, augment=AUG, max_buckets=3)
  full = _all(pipeline.make_train_loader(train_src, **kw))
  parts = [_all(pipeline.make_train_loader(train_src, process_index=p, process_count=2, **kw))
           for p in range(2)]
  for g, p0, p1 in zip(full, *parts):
    assert p0["image"].shape[0] == 2
    for k in g:
      np.testing.assert_array_equal(g[k], np.concatenate([p0[k], p1[k]]))


def test_skip_mode_bad_file_gives_masked_example_not_a_crash(tmp_path):
  voc = synthetic.write_synthetic_voc(tmp_path, num_train=6, num_val=0, scale=0.1, seed=0)
  lab = np.array(Image.open(voc / "SegmentationClass/synth_0_000002.png"))
  lab[0, 0] = 77
  palette.label_image(lab).save(voc / "SegmentationClass/synth_0_000002.png")
  src = readers.voc_source(voc, "train", on_error="skip")
  seen = False
  for b in pipeline.make_eval_loader(src, batch_size=2):
    for r, i in enumerate(b["index"]):
      if i == 2:
        seen = True
        assert not b["mask"][r].any() and (b["label"][r] == 255).all()
      elif i >= 0:
        assert b["mask"][r].any()
  assert seen and src.report.counts() == {"bad_labels": 1}


# -- state and workers ----------------------------------------------------------------------------
def test_resume_from_mid_epoch_state_in_fresh_iterator(train_src):
  make = lambda: pipeline.make_train_loader(train_src, batch_size=4, num_epochs=2, seed=4,
                                            augment=AUG, max_buckets=3)
  ref = _all(make())
  it = iter(make())
  for _ in range(7):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  it2 = iter(make())
  it2.set_state(state)
  rest = list(it2)
  assert len(rest) == len(ref) - 7
  for x, y in zip(rest, ref[7:]):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  # A bare batch counter is enough; a state of another loader is refused.
  it3 = iter(make())
  it3.set_state({"next_batch": 7})
  np.testing.assert_array_equal(next(it3)["index"], ref[7]["index"])
  other = iter(pipeline.make_train_loader(train_src, batch_size=4, num_epochs=2, seed=5,
                                          augment=AUG, max_buckets=3))
  with pytest.raises(ValueError, match="different loader.*seed"):
    other.set_state(state)
  # A loader built for more epochs gives the same batches.
  longer = iter(pipeline.make_train_loader(train_src, batch_size=4, num_epochs=3, seed=4,
                                           augment=AUG, max_buckets=3))
  longer.set_state(state)
  for y in ref[7:]:
    x = next(longer)
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


SCRIPT = """
import json, sys
import numpy as np
from fcnjax.data import augment, pipeline, readers

def main():
  voc, workers, state_in, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
  src = readers.voc_source(voc, "train")
  loader = pipeline.make_train_loader(
      src, batch_size=4, num_epochs=1, seed=4, max_buckets=3, num_workers=workers,
      augment=augment.Augment(flip=True, scale_range=(0.5, 2.0), color_jitter=0.1))
  it = iter(loader)
  if state_in != "-":
    it.set_state(json.load(open(state_in)))
  got = {}
  for n, b in enumerate(it):
    for k, v in b.items():
      got[f"{n}_{k}"] = v
    if n == 2 and state_in == "-":
      json.dump(it.get_state(), open(out + ".state.json", "w"))
  np.savez(out, **got)

if __name__ == "__main__":
  main()
"""


def test_workers_and_new_process_resume_match_in_process(train_src, voc, tmp_path):
  script = tmp_path / "run_loader.py"
  script.write_text(textwrap.dedent(SCRIPT))
  env = dict(os.environ, PYTHONPATH=str(pathlib.Path(__file__).resolve().parents[1]))
  ref = _all(pipeline.make_train_loader(train_src, batch_size=4, num_epochs=1, seed=4,
                                        augment=AUG, max_buckets=3))
  # 2 worker processes, full epoch, saving the state after batch 2.
  subprocess.run([sys.executable, str(script), str(voc), "2", "-", str(tmp_path / "w2.npz")],
                 check=True, env=env, timeout=120)
  got = np.load(tmp_path / "w2.npz")
  assert len(got.files) == 4 * len(ref)
  for n, b in enumerate(ref):
    for k in b:
      np.testing.assert_array_equal(got[f"{n}_{k}"], b[k])
  # A new process (no workers) restored from that state continues with batch 3.
  subprocess.run([sys.executable, str(script), str(voc), "0", str(tmp_path / "w2.npz.state.json"),
                  str(tmp_path / "resumed.npz")], check=True, env=env, timeout=120)
  resumed = np.load(tmp_path / "resumed.npz")
  assert len(resumed.files) == 4 * (len(ref) - 3)
  for n, b in enumerate(ref[3:]):
    for k in b:
      np.testing.assert_array_equal(resumed[f"{n}_{k}"], b[k])
