"""Bad data: every up-front problem in one error, duplicate ids, EXIF orientation, the check CLI,
full validation, and naming a decode-time problem from another process."""

import io
import logging
import pathlib
import pickle
import sys

import numpy as np
import pytest
from PIL import Image, ImageFile, ImageOps

from fcnjax.data import check, palette, readers
from fcnjax.data.validation import DataError, ErrorReport, Problem

RNG = np.random.default_rng(0)


def _img(h, w):
  yy, xx = np.mgrid[0:h, 0:w]
  return (40 + 150 * np.stack([yy / h, xx / w, (yy + xx) / (h + w)], -1)).astype(np.uint8)


def _lbl(h, w, hi=21):
  return RNG.integers(0, hi, (h, w)).astype(np.uint8)


def _exif(orientation):
  exif = Image.Exif()
  exif[0x0112] = orientation
  return exif.tobytes()


def make_voc(root, specs, split="train", lines=None):
  """specs: {id: (h, w)} -> VOC2012/{JPEGImages,SegmentationClass,ImageSets/Segmentation}."""
  voc = pathlib.Path(root) / "VOC2012"
  for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
    (voc / d).mkdir(parents=True, exist_ok=True)
  for eid, (h, w) in specs.items():
    Image.fromarray(_img(h, w)).save(voc / "JPEGImages" / f"{eid}.jpg", quality=95)
    palette.label_image(_lbl(h, w)).save(voc / "SegmentationClass" / f"{eid}.png")
  (voc / "ImageSets/Segmentation" / f"{split}.txt").write_text(
      "\n".join(lines if lines is not None else specs) + "\n")
  return voc


def _truncate(path, mask=None):
  """A 40x60 noise JPEG (pixel data >> header) cut in half (and a mask of its size)."""
  noise = RNG.integers(0, 256, (40, 60, 3), dtype=np.uint8)
  if mask is not None:
    palette.label_image(_lbl(40, 60)).save(mask)
  Image.fromarray(noise).save(path, quality=95)
  raw = pathlib.Path(path).read_bytes()
  pathlib.Path(path).write_bytes(raw[: len(raw) // 2])


@pytest.fixture
def bad_voc(tmp_path):
  """ok, missing image, missing mask, garbage header, size mismatch, a duplicated id (header
  problems) + a bad label value and a truncated JPEG (decode problems)."""
  ids = ["ok", "noimg", "nomask", "garbage", "sizes", "values", "trunc", "ok2"]
  voc = make_voc(tmp_path, {i: (12, 16) for i in ids},
                 lines=ids[:3] + ["ok"] + ids[3:])  # "ok" on lines 1 and 4
  (voc / "JPEGImages/noimg.jpg").unlink()
  (voc / "SegmentationClass/nomask.png").unlink()
  (voc / "JPEGImages/garbage.jpg").write_bytes(b"not an image")
  palette.label_image(_lbl(13, 16)).save(voc / "SegmentationClass/sizes.png")
  bad = _lbl(12, 16)
  bad[2, 2] = 37
  palette.label_image(bad).save(voc / "SegmentationClass/values.png")
  _truncate(voc / "JPEGImages/trunc.jpg", voc / "SegmentationClass/trunc.png")
  return voc


# -- one up-front error ----------------------------------------------------------------------------
def test_one_upfront_error_lists_every_problem(bad_voc):
  split = bad_voc / "ImageSets/Segmentation/train.txt"
  with pytest.raises(DataError) as e:
    readers.voc_source(bad_voc, "train")
  msg = str(e.value)
  head = msg.splitlines()[0]
  assert head == ("voc2012/train: 9 examples checked, 5 problems "
                  "(duplicate=1, missing=2, size_mismatch=1, unreadable=1)")
  assert f"  duplicate: {split}: id ok appears 2 times (lines 1, 4)" in msg
  for text in ("missing: ", "JPEGImages/noimg.jpg: file not found",
               "SegmentationClass/nomask.png: file not found",
               "garbage.jpg: cannot read image header",
               "sizes.png: mask is 13x16 (HxW), image is 12x16"):
    assert text in msg
  assert "values.png" not in msg and "trunc.jpg" not in msg  # decode problems: validate="full"
  assert len(e.value.problems) == 5 and e.value.problem is e.value.problems[0]
  assert "on_error='skip'" in msg
  # validate="full": the decode problems join the same one error
  with pytest.raises(DataError) as e:
    readers.voc_source(bad_voc, "train", validate="full")
  msg = str(e.value)
  assert msg.splitlines()[0] == ("voc2012/train: 9 examples checked, 7 problems (bad_labels=1, "
                                 "duplicate=1, missing=2, size_mismatch=1, unreadable=2)")
  assert "values.png: mask values [37] not allowed" in msg
  assert "trunc.jpg: cannot decode image: the file is truncated" in msg
  assert {p.kind for p in e.value.problems} == {"duplicate", "missing", "unreadable",
                                                "size_mismatch", "bad_labels"}


def test_upfront_error_listing_is_capped_but_counts_all(tmp_path):
  ids = [f"m{i:02d}" for i in range(25)]
  voc = make_voc(tmp_path, {"ok": (5, 6)}, lines=["ok"] + ids)
  with pytest.raises(DataError) as e:
    readers.voc_source(voc, "train")
  lines = str(e.value).splitlines()
  assert lines[0] == "voc2012/train: 26 examples checked, 25 problems (missing=25)"
  assert sum(ln.startswith("  missing: ") for ln in lines) == 20
  assert "  ... and 5 more" in lines
  assert len(e.value.problems) == 25
  assert ErrorReport("x", [Problem("a", "p", "missing", "d")], 1).summary(skipped=False) == (
      "x: 1 examples checked, 1 problem (missing=1)\n  missing: p: d")


# -- duplicates ------------------------------------------------------------------------------------
def test_duplicate_ids_in_a_split_file(tmp_path):
  voc = make_voc(tmp_path, {"a": (6, 7), "b": (6, 7), "c": (6, 7)},
                 lines=["a", "b", "# comment", "a", "c", "a", "b"])
  split = voc / "ImageSets/Segmentation/train.txt"
  ids = readers.read_id_list(split)
  assert ids == ["a", "b", "a", "c", "a", "b"] and ids.lines == [1, 2, 4, 5, 6, 7]
  with pytest.raises(DataError) as e:
    readers.voc_source(voc, "train")
  assert str(e.value).splitlines()[1:3] == [
      f"  duplicate: {split}: id a appears 3 times (lines 1, 4, 6)",
      f"  duplicate: {split}: id b appears 2 times (lines 2, 7)"]
  assert e.value.problem.kind == "duplicate" and e.value.problem.example_id == "a"
  src = readers.voc_source(voc, "train", on_error="skip")
  assert src.ids == ["a", "b", "c"]  # first occurrences, in order: never trained twice
  assert src.report.counts() == {"duplicate": 2}
  assert src.report.num_duplicates_dropped == 3 and src.report.num_skipped == 3
  assert "6 examples checked, 3 skipped (duplicate=2)" in src.report.summary()
  # ids given directly (no split file): positions
  direct = readers.SegmentationSource("direct", ["a", "a"], [voc / "JPEGImages/a.jpg"] * 2,
                                      [voc / "SegmentationClass/a.png"] * 2, on_error="skip")
  assert direct.ids == ["a"]
  assert str(direct.report.problems[0]) == (
      "duplicate: <ids of direct>: id a appears 2 times (positions 1, 2)")


def test_duplicate_stems_in_an_image_folder(tmp_path):
  imgs, masks = tmp_path / "images", tmp_path / "masks"
  imgs.mkdir()
  masks.mkdir()
  Image.fromarray(_img(6, 5)).save(imgs / "a.jpg")
  Image.fromarray(_img(6, 5)).save(imgs / "a.png")
  Image.fromarray(_img(6, 5)).save(imgs / "b.png")
  for s in "ab":
    Image.fromarray(np.zeros((6, 5), np.uint8)).save(masks / f"{s}.png")
  with pytest.raises(DataError) as e:
    readers.folder_source(imgs, masks, mask_values="binary")
  assert str(e.value.problem) == (f"duplicate: {imgs}: id a names 2 images (a.jpg, a.png): ids "
                                  "are file stems and must be unique")
  src = readers.folder_source(imgs, masks, mask_values="binary", on_error="skip")
  assert src.ids == ["a", "b"] and src.image_paths[0].endswith("a.jpg")
  assert src.report.counts() == {"duplicate": 1} and src.report.num_skipped == 1


# -- EXIF orientation ------------------------------------------------------------------------------
def _exif_folder(tmp_path, stored_hw, orientation, mask_hw, name="x"):
  imgs, masks = tmp_path / "images", tmp_path / "masks"
  imgs.mkdir(exist_ok=True)
  masks.mkdir(exist_ok=True)
  stored = RNG.integers(0, 256, stored_hw + (3,), dtype=np.uint8)
  Image.fromarray(stored).save(imgs / f"{name}.jpg", quality=95, exif=_exif(orientation))
  Image.fromarray((np.arange(np.prod(mask_hw)).reshape(mask_hw) % 2).astype(np.uint8)).save(
      masks / f"{name}.png")
  return imgs, masks


def test_exif_orientation_6_applied_by_default(tmp_path, caplog):
  imgs, masks = _exif_folder(tmp_path, (6, 10), 6, (10, 6))  # stored 6x10, shown 10x6
  with caplog.at_level(logging.INFO, logger="fcnjax.data"):
    src = readers.folder_source(imgs, masks, mask_values="binary", validate="full")
  assert src.exif == "apply" and src.exif_oriented == [("x", 6)]
  assert src.sizes.tolist() == [[10, 6]]  # from the header
  ex = src[0]
  assert ex["image"].shape == (10, 6, 3) and ex["label"].shape == (10, 6) and ex["valid"]
  with Image.open(imgs / "x.jpg") as im:
    want = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
  np.testing.assert_array_equal(ex["image"], want)
  notes = [r.getMessage() for r in caplog.records if "EXIF" in r.getMessage()]
  assert notes == ["folder/images: 1 image carries an EXIF orientation tag; applied (exif='apply'; "
                   "pass exif='ignore' / --exif ignore to use the stored orientation)"]
  # ignore: stored orientation, so the mask (made on the shown image) no longer fits
  with pytest.raises(DataError) as e:
    readers.folder_source(imgs, masks, mask_values="binary", exif="ignore")
  assert str(e.value.problem) == (
      f"size_mismatch: {masks / 'x.png'}: mask is 10x6 (HxW), image is 6x10; the image carries "
      "EXIF orientation 6 (shown rotated 90 degrees clockwise), ignored (exif='ignore'): with "
      "exif='apply' they would match")
  with pytest.raises(ValueError, match="exif must be one of"):
    readers.folder_source(imgs, masks, mask_values="binary", exif="rotate")


def test_exif_ignore_reads_stored_pixels_and_apply_mismatch_names_exif(tmp_path):
  imgs, masks = _exif_folder(tmp_path, (6, 10), 8, (6, 10))  # mask made on the stored pixels
  src = readers.folder_source(imgs, masks, mask_values="binary", exif="ignore")
  assert src.sizes.tolist() == [[6, 10]] and src.exif_oriented == [("x", 8)]
  with Image.open(imgs / "x.jpg") as im:
    np.testing.assert_array_equal(src[0]["image"], np.asarray(im.convert("RGB")))
  with pytest.raises(DataError, match=r"mask is 6x10 \(HxW\), image is 10x6; the image carries "
                     r"EXIF orientation 8 .*applied \(exif='apply'\): with exif='ignore' they "
                     "would match"):
    readers.folder_source(imgs, masks, mask_values="binary")


def test_transposed_mask_without_exif_tag_is_named(tmp_path):
  voc = make_voc(tmp_path, {"t": (8, 12)})
  palette.label_image(_lbl(12, 8)).save(voc / "SegmentationClass/t.png")
  with pytest.raises(DataError) as e:
    readers.voc_source(voc, "train")
  assert e.value.problem.detail == ("mask is 12x8 (HxW), image is 8x12; mask is the image "
                                    "transposed (HxW vs WxH): was one of them rotated (EXIF "
                                    "orientation?)")


def test_square_exif_images_every_orientation(tmp_path):
  imgs, masks = tmp_path / "images", tmp_path / "masks"
  imgs.mkdir()
  masks.mkdir()
  stored = RNG.integers(0, 256, (8, 8, 3), dtype=np.uint8)
  for o in range(1, 9):
    Image.fromarray(stored).save(imgs / f"o{o}.jpg", quality=95, exif=_exif(o))
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(masks / f"o{o}.png")
  apply = readers.folder_source(imgs, masks, mask_values="binary")
  ignore = readers.folder_source(imgs, masks, mask_values="binary", exif="ignore")
  assert apply.exif_oriented == [(f"o{o}", o) for o in range(2, 9)]
  for i, o in enumerate(range(1, 9)):
    got, raw = apply[i]["image"], ignore[i]["image"]
    with Image.open(imgs / f"o{o}.jpg") as im:
      np.testing.assert_array_equal(got, np.asarray(ImageOps.exif_transpose(im).convert("RGB")))
    if o == 1:
      np.testing.assert_array_equal(got, raw)
    if o == 6:  # shown rotated 90 degrees clockwise
      np.testing.assert_array_equal(got, np.rot90(raw, -1))
      assert not np.array_equal(got, raw)
    if o == 8:
      np.testing.assert_array_equal(got, np.rot90(raw, 1))


def test_mask_with_an_exif_tag_gets_the_same_policy(tmp_path):
  imgs, masks = tmp_path / "images", tmp_path / "masks"
  imgs.mkdir()
  masks.mkdir()
  Image.fromarray(_img(6, 10)).save(imgs / "m.jpg", exif=_exif(6))
  lab = (np.arange(60).reshape(6, 10) % 3).astype(np.uint8)
  Image.fromarray(lab).save(masks / "m.png", exif=_exif(6))  # both stored 6x10, both tagged 6
  for exif, hw, want in (("apply", (10, 6), np.rot90(lab, -1)), ("ignore", (6, 10), lab)):
    src = readers.folder_source(imgs, masks, num_classes=3, exif=exif, validate="full")
    assert src.sizes.tolist() == [list(hw)]
    np.testing.assert_array_equal(src[0]["label"], want)


# -- check CLI -------------------------------------------------------------------------------------
def test_check_cli_reports_each_problem_once_and_exif(bad_voc, capsys, caplog):
  Image.fromarray(_img(16, 12)).save(bad_voc / "JPEGImages/ok2.jpg", exif=_exif(6))  # 12x16 shown
  with caplog.at_level(logging.INFO, logger="fcnjax.data"):
    assert check.main([str(bad_voc), "--split", "train"]) == 1
  cap = capsys.readouterr()
  everything = cap.out + cap.err + caplog.text
  for name in ("train.txt", "noimg.jpg", "nomask.png", "garbage.jpg", "sizes.png", "values.png",
               "trunc.jpg"):
    assert sum(name in ln for ln in everything.splitlines()) == 1, (name, everything)
  assert "9 examples checked, 7 skipped" in cap.out  # 6 bad examples + 1 dropped duplicate row
  assert ("voc2012/train: exif: 1 image carries an EXIF orientation tag, applied (--exif apply; "
          "--exif ignore uses the stored orientation): ok2 (6)") in cap.out
  assert "EXIF" not in caplog.text
  # --exif ignore: ok2's mask (12x16) no longer matches its stored 16x12 pixels
  assert check.main([str(bad_voc), "--split", "train", "--exif", "ignore", "--header-only"]) == 1
  out = capsys.readouterr().out
  assert "ok2.png: mask is 12x16 (HxW), image is 16x12; the image carries EXIF orientation 6" in out
  assert "exif: " not in out  # ok2 is left out: the EXIF count covers the examples kept


def test_check_cli_duplicates_fail(tmp_path, capsys):
  voc = make_voc(tmp_path, {"a": (5, 6)}, lines=["a", "a"])
  assert check.main([str(voc), "--split", "train"]) == 1
  out = capsys.readouterr().out
  assert out.count("id a appears 2 times (lines 1, 2)") == 1


# -- full validation -------------------------------------------------------------------------------
class _TTY(io.StringIO):
  def isatty(self):
    return True


def test_validate_full_in_order_and_one_error(tmp_path, monkeypatch):
  ids = [f"e{i:02d}" for i in range(12)]
  voc = make_voc(tmp_path, {i: (9, 7) for i in ids})
  for i in (3, 8):
    lab = _lbl(9, 7)
    lab[0, 0] = 40
    palette.label_image(lab).save(voc / f"SegmentationClass/e{i:02d}.png")
  _truncate(voc / "JPEGImages/e05.jpg", voc / "SegmentationClass/e05.png")
  src = readers.voc_source(voc, "train")
  with pytest.raises(DataError) as e:
    src.validate_full(progress=False)
  assert [p.example_id for p in e.value.problems] == ["e03", "e05", "e08"]  # in order
  assert str(e.value).splitlines()[0] == ("voc2012/train: 12 examples checked, 3 problems "
                                          "(bad_labels=2, unreadable=1)")
  assert len(src) == 12 and not src.report.problems  # left as it was
  skip = readers.voc_source(voc, "train", on_error="skip")
  tty = _TTY()
  monkeypatch.setattr(sys, "stderr", tty)
  assert skip.validate_full(progress=True) is skip
  monkeypatch.undo()
  assert "voc2012/train: decoding" in tty.getvalue() and "12/12" in tty.getvalue()
  assert skip.ids == [i for i in ids if i not in ("e03", "e05", "e08")]
  assert skip.sizes.shape == (9, 2) and skip.report.num_skipped == 3
  again = readers.voc_source(voc, "train", on_error="skip", validate="full")  # stderr: no TTY
  assert again.ids == skip.ids and again.report.counts() == skip.report.counts()


# -- decode-time problems, named from any process -----------------------------------------------
def test_problem_of_names_decode_problems(tmp_path):
  voc = make_voc(tmp_path, {"good": (12, 16), "v37": (12, 16), "cut": (40, 60),
                            "rgb": (12, 16)})
  lab = _lbl(12, 16)
  lab[5, 5] = 37
  palette.label_image(lab).save(voc / "SegmentationClass/v37.png")
  _truncate(voc / "JPEGImages/cut.jpg", voc / "SegmentationClass/cut.png")
  colours = RNG.integers(0, 256, (12, 16, 3), dtype=np.uint8)
  Image.fromarray(colours, "RGB").save(voc / "SegmentationClass/rgb.png")
  assert ImageFile.LOAD_TRUNCATED_IMAGES is False
  with Image.open(voc / "JPEGImages/cut.jpg") as im:  # the header reads, the pixels do not
    assert im.size == (60, 40)
    with pytest.raises(OSError, match="truncated"):
      im.load()
  src = readers.voc_source(voc, "train", on_error="skip")  # headers are all fine
  assert len(src) == 4
  worker = pickle.loads(pickle.dumps(src))  # a grain worker's copy
  assert [worker[i]["valid"] for i in range(4)] == [True, False, False, False]
  assert not src.report.problems  # the worker's problems stay in the worker
  assert src.problem_of(0) is None
  p = src.problem_of(1)
  assert p.kind == "bad_labels" and p.path.endswith("v37.png") and p.example_id == "v37"
  assert "mask values [37] not allowed" in p.detail
  p = src.problem_of(2)
  assert p.kind == "unreadable" and p.path.endswith("cut.jpg") and "truncated" in p.detail
  p = src.problem_of(3)
  assert p.kind == "bad_labels" and p.path.endswith("rgb.png")
  assert p.detail.startswith("colour (RGB) mask (") and "class indices are expected" in p.detail
  assert not src.report.problems  # problem_of records nothing
  with pytest.raises(DataError, match=r"bad_labels: .*rgb\.png: colour \(RGB\) mask"):
    readers.voc_source(voc, "train")[3]


def test_rgb_colour_mask_in_index_folder_is_bad_labels(tmp_path):
  imgs, masks = tmp_path / "images", tmp_path / "masks"
  imgs.mkdir()
  masks.mkdir()
  Image.fromarray(_img(5, 4)).save(imgs / "c.png")
  rgb = palette.VOC_PALETTE[RNG.integers(0, 3, (5, 4))]
  Image.fromarray(rgb, "RGB").save(masks / "c.png")
  src = readers.folder_source(imgs, masks, num_classes=3, on_error="skip")
  assert not src[0]["valid"]
  p = src.report.problems[0]
  assert p.kind == "bad_labels" and p.path.endswith("c.png") and "mask_values='palette'" in p.detail
  grey = readers.folder_source(imgs, masks, mask_values="palette", validate="full")
  assert grey[0]["valid"]
