"""Class-per-folder classification sources, stratified splits, the built-in pattern dataset."""

import json
import pathlib

import ml_collections
import numpy as np
import pytest
from PIL import Image

from fcnjax.data import augment, classification, palette, pipeline, synthetic_classes
from fcnjax.data.classification import class_folder_source, stratified_split
from fcnjax.data.validation import DataError

RNG = np.random.default_rng(0)


def _img(h, w):
  yy, xx = np.mgrid[0:h, 0:w]
  return (40 + 150 * np.stack([yy / h, xx / w, (yy + xx) / (h + w)], -1)).astype(np.uint8)


def make_tree(root, spec):
  """spec: {class: {file name: (h, w)}} -> root/<class>/<file> (format from the extension)."""
  root = pathlib.Path(root)
  for cname, files in spec.items():
    (root / cname).mkdir(parents=True, exist_ok=True)
    for fname, (h, w) in files.items():
      Image.fromarray(_img(h, w)).save(root / cname / fname, quality=95)
  return root


def _truncate(path):
  """A 40x60 noise JPEG (pixel data >> header) cut in half."""
  Image.fromarray(RNG.integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(path, quality=95)
  raw = pathlib.Path(path).read_bytes()
  pathlib.Path(path).write_bytes(raw[: len(raw) // 2])


@pytest.fixture
def tree(tmp_path):
  root = make_tree(tmp_path / "flowers", {
      "tulips": {"t1.png": (9, 13), "t0.jpg": (20, 7)},
      "daisy": {"d1.jpg": (16, 24), "d0.png": (5, 31), "d2.bmp": (8, 8)}})
  (root / "daisy" / "README.txt").write_text("not an image\n")
  (root / "daisy" / ".DS_Store").write_bytes(b"\0\1\2")
  (root / "LICENSE.txt").write_text("files in the root are not classes\n")
  (root / ".hidden_dir").mkdir()
  return root


# -- reader ---------------------------------------------------------------------------------------
def test_reader_classes_ids_sizes_and_constant_labels(tree):
  src = class_folder_source(tree)
  assert src.class_names == ("daisy", "tulips") and src.num_classes == 2
  assert "class folders" in src.num_classes_origin
  assert src.ids == ["daisy/d0.png", "daisy/d1.jpg", "daisy/d2.bmp", "tulips/t0.jpg",
                     "tulips/t1.png"]  # README.txt, .DS_Store, root files ignored
  assert src.labels.dtype == np.int32 and src.labels.tolist() == [0, 0, 0, 1, 1]
  assert src.sizes.dtype == np.int32 and src.sizes.shape == (5, 2)
  assert src.sizes.tolist() == [[5, 31], [16, 24], [8, 8], [20, 7], [9, 13]]
  assert src.label_paths == [""] * 5 and src.boxes is None
  assert src.palette.shape == (256, 3) and (src.palette == palette.VOC_PALETTE).all()
  assert src.exif_oriented == [] and src.report.num_skipped == 0 and len(src) == 5
  for i in range(len(src)):
    ex = src[i]
    h, w = src.sizes[i]
    assert ex["image"].dtype == np.uint8 and ex["image"].shape == (h, w, 3)
    assert ex["label"].dtype == np.uint8 and ex["label"].shape == (h, w)
    assert (ex["label"] == src.labels[i]).all()
    assert ex["valid"] and ex["index"] == i and ex["id"] == src.ids[i]
  np.testing.assert_array_equal(src[4]["image"], _img(9, 13))  # PNG: lossless, as written


def test_given_class_names_set_the_order_and_must_match(tree):
  src = class_folder_source(tree, class_names=["tulips", "daisy"])
  assert src.class_names == ("tulips", "daisy") and src.ids[0].startswith("tulips/")
  assert src.labels.tolist() == [0, 0, 1, 1, 1] and (src[2]["label"] == 1).all()
  with pytest.raises(DataError, match=r"no folder for \['roses'\]"):
    class_folder_source(tree, class_names=["tulips", "daisy", "roses"])
  with pytest.raises(DataError, match=r"folders not named \['tulips'\]"):
    class_folder_source(tree, class_names=["daisy"])


def test_subset_keeps_classes_and_exif_orientation_is_applied(tree):
  exif = Image.Exif()
  exif[0x0112] = 6  # rotated 90 degrees clockwise: width and height swap
  Image.fromarray(_img(10, 30)).save(tree / "tulips" / "rot.jpg", exif=exif.tobytes())
  src = class_folder_source(tree)
  i = src.ids.index("tulips/rot.jpg")
  assert tuple(src.sizes[i]) == (30, 10) and src.exif_oriented == [("tulips/rot.jpg", 6)]
  assert src[i]["image"].shape == (30, 10, 3) and (src[i]["label"] == 1).all()
  assert tuple(class_folder_source(tree, exif="ignore").sizes[i]) == (10, 30)
  sub = src.subset([i, 0])
  assert sub.ids == ["tulips/rot.jpg", "daisy/d0.png"] and sub.labels.tolist() == [1, 0]
  assert (sub[1]["label"] == 0).all() and sub.exif_oriented == [("tulips/rot.jpg", 6)]


# -- bad files ------------------------------------------------------------------------------------
def test_truncated_jpeg_is_invalid_on_decode_and_named(tree):
  _truncate(tree / "tulips" / "cut.jpg")
  src = class_folder_source(tree, on_error="skip")
  i = src.ids.index("tulips/cut.jpg")
  assert tuple(src.sizes[i]) == (40, 60)  # the header reads
  ex = src[i]
  assert not ex["valid"] and (ex["label"] == palette.IGNORE).all() and ex["image"].shape == (40,
                                                                                            60, 3)
  p = src.problem_of(i)
  assert p.kind == "unreadable" and p.path.endswith("cut.jpg") and "truncated" in p.detail
  assert src.problem_of(0) is None
  full = class_folder_source(tree, on_error="skip", validate="full")
  assert "tulips/cut.jpg" not in full.ids and full.report.num_skipped == 1
  with pytest.raises(DataError, match="cut.jpg: cannot decode image: the file is truncated"):
    class_folder_source(tree, validate="full")


def test_corrupt_headers_are_skipped_and_counted_or_raised_together(tree):
  (tree / "daisy" / "bad.png").write_bytes(b"not a png at all")
  (tree / "tulips" / "bad.jpg").write_bytes(b"\xff\xd8 garbage")
  src = class_folder_source(tree, on_error="skip")
  assert len(src) == 5 and "daisy/bad.png" not in src.ids
  assert src.report.num_skipped == 2 and src.report.counts() == {"unreadable": 2}
  assert src.labels.tolist() == [0, 0, 0, 1, 1]
  with pytest.raises(DataError) as e:
    class_folder_source(tree)
  msg = str(e.value)
  assert "2 problems" in msg and "bad.png" in msg and "bad.jpg" in msg
  assert len(e.value.problems) == 2


def test_missing_root_no_class_folders_and_empty_class_folder(tmp_path, tree):
  with pytest.raises(DataError, match=f"missing: {tmp_path / 'nope'}"):
    class_folder_source(tmp_path / "nope")
  (tmp_path / "flat").mkdir()
  Image.fromarray(_img(4, 4)).save(tmp_path / "flat" / "a.png")
  with pytest.raises(DataError, match=f"{tmp_path / 'flat'}: no class folders"):
    class_folder_source(tmp_path / "flat")
  (tree / "roses").mkdir()
  (tree / "roses" / "notes.txt").write_text("no images here")
  with pytest.raises(DataError, match=f"{tree / 'roses'}: class folder 'roses' holds no image"):
    class_folder_source(tree, on_error="skip")


def test_boxes_json_is_read_and_checked(tree):
  (tree / "boxes.json").write_text(json.dumps({"daisy/d1.jpg": [1, 2, 24, 16]}))
  src = class_folder_source(tree)
  assert src.boxes.dtype == np.int32 and src.boxes.tolist()[1] == [1, 2, 24, 16]
  assert src.boxes.tolist()[0] == [-1, -1, -1, -1]
  assert src.subset([1]).boxes.tolist() == [[1, 2, 24, 16]]
  (tree / "boxes.json").write_text(json.dumps({"daisy/d1.jpg": [1, 2, 25, 16]}))
  with pytest.raises(DataError, match=r"daisy/d1.jpg: box \[1, 2, 25, 16\] not inside its 16x24"):
    class_folder_source(tree)


# -- stratified split -----------------------------------------------------------------------------
@pytest.fixture
def counts_tree(tmp_path):
  counts = {"a": 10, "b": 5, "c": 2, "d": 1}
  return make_tree(tmp_path / "c", {c: {f"{c}{i}.png": (3, 4) for i in range(n)}
                                    for c, n in counts.items()})


def test_stratified_split_fractions_disjoint_cover_deterministic(counts_tree):
  src = class_folder_source(counts_tree)
  train, val = stratified_split(src, 0.3, seed=0)
  assert set(train.ids).isdisjoint(val.ids) and set(train.ids) | set(val.ids) == set(src.ids)
  assert len(train) + len(val) == len(src)
  # round(0.3 n) clipped to 1..n-1; a class of one stays in train
  assert val.class_counts().tolist() == [3, 2, 1, 0]
  assert train.class_counts().tolist() == [7, 3, 1, 1]
  assert train.ids == sorted(train.ids, key=src.ids.index)  # source order kept
  assert (val.labels == [src.labels[src.ids.index(e)] for e in val.ids]).all()
  assert (val[0]["label"] == val.labels[0]).all()
  again = stratified_split(class_folder_source(counts_tree), 0.3, seed=0)[1]
  assert again.ids == val.ids
  # a function of (ids, seed): the listing order does not matter
  shuffled = src.subset(RNG.permutation(len(src)))
  assert set(stratified_split(shuffled, 0.3, seed=0)[1].ids) == set(val.ids)
  others = {tuple(stratified_split(src, 0.3, seed=s)[1].ids) for s in range(1, 6)}
  assert len(others | {tuple(val.ids)}) > 1
  assert train.name.endswith("/train") and val.name.endswith("/val")
  with pytest.raises(ValueError, match="fraction"):
    stratified_split(src, 1.0)


# -- built-in dataset -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def builtin(tmp_path_factory):
  cache = tmp_path_factory.mktemp("cache")
  return classification.builtin_classification(cache, num_train=200, num_val=100, seed=0), cache


def _grey(image):
  return image.astype(np.float64).mean(-1)


def _best_pattern(patch):
  """The class whose zero-mean pattern (best phase) correlates most with ``patch`` (h, w)."""
  patch = patch - patch.mean()
  h, w = patch.shape
  scores = []
  for name in synthetic_classes.CLASS_NAMES:
    py, px = synthetic_classes.PERIODS[name]
    scores.append(max(abs(float((patch * synthetic_classes.pattern(name, h, w, (dy, dx))).sum()))
                      for dy in range(py) for dx in range(px)))
  return int(np.argmax(scores))


def test_builtin_layout_balance_sizes_and_boxes(builtin):
  (train, val), cache = builtin
  assert train.class_names == synthetic_classes.CLASS_NAMES and val.num_classes == 5
  assert train.class_counts().tolist() == [40] * 5 and val.class_counts().tolist() == [20] * 5
  root = next(cache.glob("classes-*"))
  assert (root / "train" / "boxes.json").is_file() and (root / "val" / "vstripes2").is_dir()
  assert train.ids[0].startswith("vstripes2/") and train.ids[0].endswith(".png")
  h, w = train.sizes[:, 0], train.sizes[:, 1]
  strips = (h <= 40) & (w >= 240)
  photos = (h >= 48) & (w >= 48) & (h <= 160) & (w <= 160)
  assert (strips | photos).all() and 0.4 < strips.mean() < 0.6
  for c in range(5):  # every class has both kinds, in equal numbers
    assert strips[train.labels == c].sum() == 20
  assert len(set(h[strips])) > 5 and len(set(w[strips])) > 5
  assert np.ptp(np.log(h[photos] / w[photos])) > 1.5  # aspect ratios from ~1:2 to ~2:1 and more
  for src in (train, val):
    b = src.boxes
    assert b.shape == (len(src), 4) and b.dtype == np.int32
    assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all()
    assert (b[:, 0] < b[:, 2]).all() and (b[:, 1] < b[:, 3]).all()
    assert (b[:, 2] <= src.sizes[:, 1]).all() and (b[:, 3] <= src.sizes[:, 0]).all()
  assert len(set(map(tuple, train.boxes[:, :2]))) > 150  # random places
  sub = train.subset([5, 3])
  np.testing.assert_array_equal(sub.boxes, train.boxes[[5, 3]])


def test_builtin_pattern_is_in_the_box_and_tells_the_class(builtin):
  (train, val), _ = builtin
  for src in (train, val):
    for i in range(0, len(src), 3):
      x0, y0, x1, y1 = src.boxes[i]
      g = _grey(src[i]["image"])
      assert _best_pattern(g[y0:y1, x0:x1]) == src.labels[i], src.ids[i]
      inside = np.abs(np.diff(g[y0:y1, x0:x1], axis=1)).mean() + np.abs(
          np.diff(g[y0:y1, x0:x1], axis=0)).mean()
      border = np.abs(np.diff(g, axis=1)).mean() + np.abs(np.diff(g, axis=0)).mean()
      assert inside > border  # the fine structure is concentrated in the object


def test_builtin_mean_colour_does_not_tell_the_class(builtin):
  (train, val), _ = builtin
  colour = [np.array([src[i]["image"].reshape(-1, 3).mean(0) for i in range(len(src))])
            for src in (train, val)]
  bright = colour[0].mean(1)
  means = np.array([bright[train.labels == c].mean() for c in range(5)])
  spread = np.mean([bright[train.labels == c].std() for c in range(5)])
  assert np.ptp(means) < 0.5 * spread, (means, spread)
  centroids = np.array([colour[0][train.labels == c].mean(0) for c in range(5)])
  pred = ((colour[1][:, None] - centroids[None]) ** 2).sum(-1).argmin(1)
  assert (pred == val.labels).mean() < 0.35  # chance is 0.2


def test_builtin_deterministic_cached_and_seeded(tmp_path, builtin):
  a = synthetic_classes.write_synthetic_classes(tmp_path / "a", 6, 3, seed=3)
  b = synthetic_classes.write_synthetic_classes(tmp_path / "b", 6, 3, seed=3)
  c = synthetic_classes.write_synthetic_classes(tmp_path / "c", 6, 3, seed=4)
  files = sorted(p.relative_to(a) for p in a.rglob("*.png"))
  assert len(files) == 9 and files == sorted(p.relative_to(b) for p in b.rglob("*.png"))
  for f in files:
    np.testing.assert_array_equal(np.asarray(Image.open(a / f)), np.asarray(Image.open(b / f)))
  assert (a / "val/boxes.json").read_text() == (b / "val/boxes.json").read_text()
  assert (a / "train/boxes.json").read_text() != (c / "train/boxes.json").read_text()
  (train, _), cache = builtin
  root = next(cache.glob("classes-*"))
  stamp = (root / "train" / train.ids[0]).stat().st_mtime_ns
  again, _ = classification.builtin_classification(cache, num_train=200, num_val=100, seed=0)
  assert again.ids == train.ids and (root / "train" / train.ids[0]).stat().st_mtime_ns == stamp
  assert len(list(cache.glob("classes-*"))) == 1 and not list(cache.glob(".tmp*"))
  assert (synthetic_classes.params_hash(num_train=1, seed=0)
          != synthetic_classes.params_hash(num_train=1, seed=1))


# -- the Grain pipeline and the config hook -------------------------------------------------------
def test_pipeline_batches_carry_the_class_and_the_image_mask(builtin):
  (train, _), _ = builtin
  src = train.subset(np.arange(0, 200, 10))  # 20 images, both kinds of size
  loader = pipeline.make_train_loader(src, batch_size=4, num_devices=1, seed=0, num_epochs=1,
                                      max_buckets=4, augment=augment.Augment(scale_range=None))
  seen = []
  for batch in loader:
    for r, idx in enumerate(batch["index"]):
      if idx < 0:
        assert not batch["mask"][r].any()
        continue
      seen.append(int(idx))
      h, w = src.sizes[idx]
      assert batch["label"][r, 0, 0] == src.labels[idx]
      expect = np.zeros(batch["mask"].shape[1:], bool)
      expect[:h, :w] = True
      np.testing.assert_array_equal(batch["mask"][r], expect)
      assert (batch["label"][r][expect] == src.labels[idx]).all()
      assert (batch["label"][r][~expect] == palette.IGNORE).all()
  assert sorted(seen) == list(range(len(src)))
  # with the default (scaling) augmentation the class still sits at every real pixel
  batch = next(iter(pipeline.make_train_loader(src, batch_size=4, num_devices=1, seed=0,
                                               num_epochs=1, max_buckets=4)))
  for r, idx in enumerate(batch["index"]):
    if idx >= 0:
      assert (batch["label"][r][batch["mask"][r]] == src.labels[idx]).all()


def _data_config(**kw):
  d = ml_collections.ConfigDict(dict(
      root="", val_images="", val_fraction=0.25, on_bad_data="skip", validate="header",
      exif="apply", cache="", classes="",
      builtin=ml_collections.ConfigDict(dict(num_train=10, num_val=5, seed=0))))
  d.update(kw)
  return d


def test_classification_sources_from_config(tmp_path, tree, counts_tree):
  lines = []
  s = classification.classification_sources(_data_config(cache=str(tmp_path / "cache")), seed=0,
                                            print_fn=lines.append)
  assert (len(s.train), len(s.val)) == (10, 5) and s.train.boxes is not None
  assert len(lines) == 1 and "built-in" in lines[0] and "10 train / 5 val" in lines[0]
  (tree / "tulips" / "bad.png").write_bytes(b"garbage")
  lines = []
  s = classification.classification_sources(_data_config(root=str(tree), val_fraction=0.4),
                                            seed=1, print_fn=lines.append)
  assert s.train.class_names == ("daisy", "tulips") and (len(s.train), len(s.val)) == (3, 2)
  assert len(lines) == 1 and "1 bad file(s) skipped" in lines[0]
  with pytest.raises(DataError, match="bad.png"):
    classification.classification_sources(_data_config(root=str(tree), on_bad_data="raise"),
                                          seed=0, print_fn=lines.append)
  val_root = make_tree(tmp_path / "v", {"daisy": {"x.png": (4, 4)}, "tulips": {"y.png": (5, 5)}})
  s = classification.classification_sources(
      _data_config(root=str(tree), val_images=str(val_root), classes="tulips, daisy"), seed=0,
      print_fn=lines.append)
  assert s.train.class_names == s.val.class_names == ("tulips", "daisy")
  assert s.val.ids == ["tulips/y.png", "daisy/x.png"] and s.val.labels.tolist() == [0, 1]
