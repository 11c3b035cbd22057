"""Readers: VOC / SBD / SegmentationClassAug / folder layouts, pixel formats, bad input."""

import logging
import pathlib

import numpy as np
import pytest
import scipy.io
from PIL import Image

from fcnjax.data import check, palette, readers
from fcnjax.data.validation import DataError

RNG = np.random.default_rng(0)


def _img(h, w):
  """Smooth colour ramps (JPEG keeps them within a few levels)."""
  yy, xx = np.mgrid[0:h, 0:w]
  c = RNG.integers(0, 128, 3)
  return (c + 120 * np.stack([yy / h, xx / w, (yy + xx) / (h + w)], -1)).astype(np.uint8)


def _lbl(h, w, hi=21):
  lab = RNG.integers(0, hi, (h, w)).astype(np.uint8)
  lab[0, :] = 255
  return lab


def make_voc(root, specs, split="train"):
  """specs: {id: (h, w)}; writes a tiny VOCdevkit/VOC2012; returns {id: (image, label)}."""
  voc = pathlib.Path(root) / "VOCdevkit" / "VOC2012"
  for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
    (voc / d).mkdir(parents=True, exist_ok=True)
  data = {}
  for eid, (h, w) in specs.items():
    im, lab = _img(h, w), _lbl(h, w)
    Image.fromarray(im).save(voc / "JPEGImages" / f"{eid}.jpg", quality=95)
    palette.label_image(lab).save(voc / "SegmentationClass" / f"{eid}.png")
    data[eid] = (im, lab)
  (voc / "ImageSets/Segmentation" / f"{split}.txt").write_text("\n".join(specs) + "\n")
  return voc, data


# -- palette and classes -------------------------------------------------------------------------
def test_voc_classes_and_palette():
  assert len(palette.VOC_CLASSES) == 21 and palette.VOC_CLASSES[0] == "background"
  assert palette.VOC_CLASSES[15] == "person" and palette.VOC_CLASSES[20] == "tvmonitor"
  assert palette.VOC_PALETTE.shape == (256, 3) and palette.VOC_PALETTE.dtype == np.uint8
  assert palette.VOC_PALETTE[1].tolist() == [128, 0, 0]
  assert palette.VOC_PALETTE[15].tolist() == [192, 128, 128]
  assert palette.VOC_PALETTE[255].tolist() == [224, 224, 192]
  assert len({tuple(c) for c in palette.VOC_PALETTE.tolist()}) == 256


def test_palette_png_gives_indices_not_colours(tmp_path):
  lab = np.array([[0, 3], [7, 255]], np.uint8)
  im = Image.fromarray(lab, mode="P")
  pal = np.zeros((256, 3), np.uint8)
  pal[3] = (128, 0, 0)  # the VOC colour of class 1, on index 3: the index must win
  pal[7] = (0, 0, 0)
  im.putpalette(pal.ravel().tolist())
  im.save(tmp_path / "m.png")
  with Image.open(tmp_path / "m.png") as m:
    assert m.mode == "P"
    np.testing.assert_array_equal(palette.label_to_array(m), lab)


def test_image_conversions_to_rgb_uint8(tmp_path):
  grey = RNG.integers(0, 256, (6, 5), dtype=np.uint8)
  Image.fromarray(grey, "L").save(tmp_path / "g.png")
  rgba = RNG.integers(0, 256, (6, 5, 4), dtype=np.uint8)
  Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
  g16 = RNG.integers(0, 65536, (6, 5)).astype(np.uint16)
  Image.fromarray(g16).save(tmp_path / "g16.png")
  pal_idx = RNG.integers(0, 4, (6, 5)).astype(np.uint8)
  p = Image.fromarray(pal_idx, "P")
  p.putpalette([10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 110, 120] + [0] * (3 * 252))
  p.save(tmp_path / "p.png")
  out = {}
  for name in ("g", "a", "g16", "p"):
    with Image.open(tmp_path / f"{name}.png") as im:
      out[name] = palette.image_to_rgb(im)
      assert out[name].shape == (6, 5, 3) and out[name].dtype == np.uint8, (name, im.mode)
  np.testing.assert_array_equal(out["g"], np.repeat(grey[..., None], 3, -1))
  np.testing.assert_array_equal(out["a"], rgba[..., :3])
  np.testing.assert_array_equal(out["g16"][..., 0], (g16 >> 8).astype(np.uint8))
  pal = np.array([[10, 20, 30], [40, 50, 60], [70, 80, 90], [100, 110, 120]], np.uint8)
  np.testing.assert_array_equal(out["p"], pal[pal_idx])


def test_32bit_grey_and_float_images():
  i32 = np.array([[0, 256, 65535], [512, 1024, 300]], np.int32)
  out = palette.image_to_rgb(Image.fromarray(i32, "I"))
  np.testing.assert_array_equal(out[..., 0], (i32 >> 8).astype(np.uint8))
  f = np.array([[-3.0, 12.4, 300.0]], np.float32)
  np.testing.assert_array_equal(palette.image_to_rgb(Image.fromarray(f, "F"))[..., 1], [[0, 12, 255]])


def test_colour_masks_are_refused():
  im = Image.fromarray(np.array([[[1, 2, 3]]], np.uint8), "RGB")
  with pytest.raises(ValueError, match="colour"):
    palette.label_to_array(im)


# -- VOC -----------------------------------------------------------------------------------------
def test_voc_reader_roots_sizes_and_content(tmp_path):
  voc, data = make_voc(tmp_path, {"a": (20, 30), "b": (31, 17)})
  for root in (tmp_path, tmp_path / "VOCdevkit", voc):
    src = readers.voc_source(root, "train")
    assert src.ids == ["a", "b"]
    assert src.sizes.tolist() == [[20, 30], [31, 17]]
  ex = src[1]
  assert ex["image"].shape == (31, 17, 3) and ex["image"].dtype == np.uint8
  assert ex["label"].dtype == np.uint8 and ex["valid"] and ex["id"] == "b"
  np.testing.assert_array_equal(ex["label"], data["b"][1])
  assert np.abs(ex["image"].astype(int) - data["b"][0]).mean() < 4  # JPEG


def test_voc_seg11valid_uses_shipped_list(tmp_path):
  ids = readers.seg11valid_ids()
  assert len(ids) == 736 and len(set(ids)) == 736
  make_voc(tmp_path, {ids[0]: (10, 12), ids[5]: (11, 13)})
  with pytest.raises(DataError, match="missing"):
    readers.voc_source(tmp_path, "seg11valid")
  src = readers.voc_source(tmp_path, "seg11valid", on_error="skip")
  assert src.ids == [ids[0], ids[5]]
  assert src.report.num_skipped == 734 and src.report.counts() == {"missing": 734}


# -- SBD and SegmentationClassAug -----------------------------------------------------------------
def test_sbd_mat_reader(tmp_path):
  ds = tmp_path / "benchmark_RELEASE" / "dataset"
  (ds / "img").mkdir(parents=True)
  (ds / "cls").mkdir()
  lab = _lbl(9, 14)
  Image.fromarray(_img(9, 14)).save(ds / "img" / "2008_000002.jpg")
  scipy.io.savemat(ds / "cls" / "2008_000002.mat",
                   {"GTcls": {"Segmentation": lab, "Boundaries": np.zeros((1, 20), object),
                              "CategoriesPresent": np.array([1, 2])}})
  (ds / "train.txt").write_text("2008_000002\n")
  for root in (tmp_path / "benchmark_RELEASE", ds):
    src = readers.sbd_source(root, "train")
    assert src.sizes.tolist() == [[9, 14]]
    np.testing.assert_array_equal(src[0]["label"], lab)
  src = readers.sbd_source(ds, "train", validate="full")
  assert len(src) == 1


def test_sbd_mat_size_mismatch_found_on_decode(tmp_path):
  ds = tmp_path / "dataset"
  (ds / "img").mkdir(parents=True)
  (ds / "cls").mkdir()
  Image.fromarray(_img(9, 14)).save(ds / "img" / "x.jpg")
  scipy.io.savemat(ds / "cls" / "x.mat", {"GTcls": {"Segmentation": _lbl(8, 14)}})
  (ds / "train.txt").write_text("x\n")
  src = readers.sbd_source(ds, "train")
  with pytest.raises(DataError, match="size_mismatch.*8x14"):
    src[0]
  with pytest.raises(DataError, match="x.mat"):
    readers.sbd_source(ds, "train", validate="full")


def test_segmentation_class_aug_reader(tmp_path):
  voc, _ = make_voc(tmp_path, {"p": (12, 16), "q": (16, 12)})
  (voc / "SegmentationClassAug").mkdir()
  labs = {}
  for eid, (h, w) in {"p": (12, 16), "q": (16, 12)}.items():
    labs[eid] = _lbl(h, w)
    Image.fromarray(labs[eid], "L").save(voc / "SegmentationClassAug" / f"{eid}.png")  # grey
  (voc / "list").mkdir()
  (voc / "list" / "train_aug.txt").write_text(
      "/JPEGImages/p.jpg /SegmentationClassAug/p.png\n/JPEGImages/q.jpg /SegmentationClassAug/q.png\n")
  src = readers.voc_aug_source(tmp_path, "train_aug")
  assert src.ids == ["p", "q"] and src.sizes.tolist() == [[12, 16], [16, 12]]
  np.testing.assert_array_equal(src[1]["label"], labs["q"])
  assert readers.open_source(tmp_path, "train_aug").ids == ["p", "q"]


# -- folder reader -------------------------------------------------------------------------------
def test_folder_reader_binary_and_pets_maps(tmp_path):
  (tmp_path / "image").mkdir()
  (tmp_path / "label").mkdir()
  bin_mask = (RNG.random((10, 8)) < 0.5).astype(np.uint8) * 255
  tri = RNG.integers(1, 4, (10, 8)).astype(np.uint8)
  Image.fromarray(_img(10, 8)).save(tmp_path / "image" / "cat_1.jpg")
  Image.fromarray(_img(10, 8)).convert("L").save(tmp_path / "image" / "dog_2.png")
  Image.fromarray(bin_mask, "L").save(tmp_path / "label" / "cat_1.png")
  Image.fromarray(tri, "L").save(tmp_path / "label" / "dog_2.png")
  src = readers.folder_source(tmp_path / "image", tmp_path / "label",
                              value_map=readers.BINARY_MAP, on_error="skip")
  assert src.num_classes == 2 and src.ids == ["cat_1", "dog_2"]
  np.testing.assert_array_equal(src[0]["label"], bin_mask // 255)
  assert src[1]["image"].shape == (10, 8, 3)
  assert not src[1]["valid"]  # trimap values 1..3 are not binary-mask values
  assert src.report.counts() == {"bad_labels": 1}
  pets = readers.folder_source(tmp_path / "image", tmp_path / "label",
                               value_map=readers.PETS_TRIMAP)
  want = np.select([tri == 1, tri == 2], [1, 0], 255)
  np.testing.assert_array_equal(pets[1]["label"], want)
  with pytest.raises(DataError, match=r"cat_1.png.*\[0, 255\]"):
    pets[0]


# -- bad input -----------------------------------------------------------------------------------
@pytest.fixture
def bad_voc(tmp_path):
  specs = {"ok1": (12, 16), "noimg": (12, 16), "nomask": (12, 16), "garbage": (12, 16),
           "trunc": (40, 60), "sizes": (12, 16), "values": (12, 16), "ok2": (14, 10)}
  voc, _ = make_voc(tmp_path, specs)
  (voc / "JPEGImages/noimg.jpg").unlink()
  (voc / "SegmentationClass/nomask.png").unlink()
  (voc / "JPEGImages/garbage.jpg").write_bytes(b"this is not an image")
  noise = RNG.integers(0, 256, (40, 60, 3), dtype=np.uint8)  # pixel data >> header
  Image.fromarray(noise).save(voc / "JPEGImages/trunc.jpg", quality=95)
  raw = (voc / "JPEGImages/trunc.jpg").read_bytes()
  (voc / "JPEGImages/trunc.jpg").write_bytes(raw[: len(raw) // 2])
  palette.label_image(_lbl(13, 16)).save(voc / "SegmentationClass/sizes.png")
  bad = _lbl(12, 16)
  bad[3, 3] = 30
  palette.label_image(bad).save(voc / "SegmentationClass/values.png")
  return tmp_path, voc


@pytest.mark.parametrize("eid,kind,path", [
    ("noimg", "missing", "JPEGImages/noimg.jpg"),
    ("nomask", "missing", "SegmentationClass/nomask.png"),
    ("garbage", "unreadable", "JPEGImages/garbage.jpg"),
    ("sizes", "size_mismatch", "SegmentationClass/sizes.png"),
])
def test_header_problems_raise_at_construction(bad_voc, eid, kind, path):
  root, voc = bad_voc
  (voc / "ImageSets/Segmentation/one.txt").write_text(f"ok1\n{eid}\n")
  with pytest.raises(DataError) as e:
    readers.voc_source(root, "one")
  assert kind in str(e.value) and path in str(e.value)
  assert e.value.problem.kind == kind and e.value.problem.example_id == eid


@pytest.mark.parametrize("eid,kind,text", [
    ("trunc", "unreadable", "trunc.jpg"), ("values", "bad_labels", "[30]")])
def test_decode_problems_raise_on_access_or_full_validation(bad_voc, eid, kind, text):
  root, voc = bad_voc
  (voc / "ImageSets/Segmentation/one.txt").write_text(f"ok1\n{eid}\n")
  src = readers.voc_source(root, "one")  # headers are fine
  src[0]
  with pytest.raises(DataError, match=kind) as e:
    src[1]
  assert text in str(e.value)
  with pytest.raises(DataError, match=kind):
    readers.voc_source(root, "one", validate="full")


def test_skip_policy_counts_and_reports_once(bad_voc, caplog):
  root, _ = bad_voc
  with caplog.at_level(logging.WARNING, logger="fcnjax.data"):
    src = readers.voc_source(root, "train", on_error="skip")
  assert src.ids == ["ok1", "trunc", "values", "ok2"]
  assert src.report.counts() == {"missing": 2, "unreadable": 1, "size_mismatch": 1}
  assert len([r for r in caplog.records if "skipped" in r.getMessage()]) == 1
  caplog.clear()
  with caplog.at_level(logging.WARNING, logger="fcnjax.data"):
    for _ in range(2):  # decode problems: a fully ignored example, reported once per file
      for i in (1, 2):
        ex = src[i]
        assert not ex["valid"] and (ex["label"] == 255).all() and ex["image"].shape[2] == 3
  assert len(caplog.records) == 2
  assert src.report.counts()["bad_labels"] == 1 and src.report.num_skipped == 6
  assert src[0]["valid"] and src[3]["valid"]
  full = readers.voc_source(root, "train", on_error="skip", validate="full")
  assert full.ids == ["ok1", "ok2"] and full.report.num_skipped == 6


def test_empty_split(tmp_path):
  voc, _ = make_voc(tmp_path, {"a": (5, 5)})
  (voc / "ImageSets/Segmentation/empty.txt").write_text("\n")
  with pytest.raises(DataError, match="empty split"):
    readers.voc_source(tmp_path, "empty")
  with pytest.raises(DataError, match="empty split"):
    readers.voc_source(tmp_path, "empty", on_error="skip")
  (voc / "JPEGImages/a.jpg").unlink()
  with pytest.raises(DataError, match="all 1 examples were skipped"):
    readers.voc_source(tmp_path, "train", on_error="skip")
  with pytest.raises(DataError, match="split list not found"):
    readers.voc_source(tmp_path, "nosuchsplit")


def test_check_cli(bad_voc, capsys):
  root, _ = bad_voc
  assert check.main([str(root), "--split", "train"]) == 1
  out = capsys.readouterr().out
  for name in ("noimg.jpg", "nomask.png", "garbage.jpg", "trunc.jpg", "sizes.png", "values.png"):
    assert name in out
  assert "8 examples checked, 6 skipped" in out
  assert "ok1" not in out
  voc, _ = make_voc(root / "clean", {"a": (5, 6)})
  assert check.main([str(voc), "--split", "train"]) == 0
  assert "no problems" in capsys.readouterr().out
