"""Folder sources: mask value modes, class inference, subsets / splits, Oxford-IIIT Pets layout."""

import logging
import pathlib

import numpy as np
import pytest
from PIL import Image

from fcnjax.data import check, palette, readers
from fcnjax.data.validation import DataError

RNG = np.random.default_rng(0)


def _img(h, w):
  yy, xx = np.mgrid[0:h, 0:w]
  return (40 + 100 * np.stack([yy / h, xx / w, (yy + xx) / (h + w)], -1)).astype(np.uint8)


def make_folder(root, masks, image_mode="RGB", image_ext=".png"):
  """masks: {stem: PIL mask image}; writes root/images/<stem><ext> + root/masks/<stem>.png."""
  root = pathlib.Path(root)
  (root / "images").mkdir(parents=True, exist_ok=True)
  (root / "masks").mkdir(parents=True, exist_ok=True)
  for stem, m in masks.items():
    w, h = m.size
    Image.fromarray(_img(h, w)).convert(image_mode).save(root / "images" / f"{stem}{image_ext}")
    m.save(root / "masks" / f"{stem}.png")
  return root / "images", root / "masks"


def _l(arr):
  return Image.fromarray(np.asarray(arr, np.uint8), "L")


# -- mask value modes ----------------------------------------------------------------------------
@pytest.mark.parametrize("fg", [1, 255])
def test_binary_masks_zero_one_and_zero_255(tmp_path, fg):
  m = (RNG.random((9, 7)) < 0.4).astype(np.uint8)
  imgs, masks = make_folder(tmp_path, {"a": _l(m * fg), "b": _l(1 - m)}, image_mode="L")
  src = readers.folder_source(imgs, masks, mask_values="binary")
  assert src.num_classes == 2 and src.class_names == ("background", "foreground")
  assert "binary" in src.num_classes_origin
  np.testing.assert_array_equal(src[0]["label"], m)
  np.testing.assert_array_equal(src[1]["label"], 1 - m)
  assert src[0]["image"].shape == (9, 7, 3)


def test_binary_16bit_and_colour_masks(tmp_path):
  m = (RNG.random((6, 8)) < 0.5)
  m16 = Image.fromarray((m * 65535).astype(np.uint16))
  assert m16.mode.startswith("I;16")
  rgb = np.zeros((6, 8, 3), np.uint8)
  rgb[m] = (0, 200, 0)
  imgs, masks = make_folder(tmp_path, {"a": m16, "b": Image.fromarray(rgb, "RGB")})
  g16 = (RNG.integers(0, 65536, (6, 8))).astype(np.uint16)  # a 16-bit grey image too
  Image.fromarray(g16).save(imgs / "a.png")
  src = readers.folder_source(imgs, masks, mask_values="binary", validate="full")
  for i in range(2):
    np.testing.assert_array_equal(src[i]["label"], m.astype(np.uint8))
  np.testing.assert_array_equal(src[0]["image"][..., 0], (g16 >> 8).astype(np.uint8))


@pytest.mark.parametrize("ignore_border", [False, True])
def test_trimap_modes(tmp_path, ignore_border):
  tri = RNG.integers(1, 4, (8, 10))
  imgs, masks = make_folder(tmp_path, {"p": _l(tri)})
  src = readers.folder_source(imgs, masks, mask_values="trimap",
                              trimap_ignore_border=ignore_border)
  if ignore_border:
    assert src.num_classes == 2 and src.class_names == ("background", "pet")
    want = np.select([tri == 1, tri == 2], [1, 0], 255)
  else:
    assert src.num_classes == 3 and src.class_names == ("background", "pet", "border")
    want = np.select([tri == 1, tri == 2], [1, 0], 2)
  np.testing.assert_array_equal(src[0]["label"], want)


def test_bad_trimap_value_names_the_file(tmp_path):
  tri = RNG.integers(1, 4, (8, 10))
  tri[2, 2] = 0
  tri[3, 3] = 7
  imgs, masks = make_folder(tmp_path, {"ok": _l(RNG.integers(1, 4, (8, 10))), "bad": _l(tri)})
  src = readers.folder_source(imgs, masks, mask_values="trimap")
  assert src.ids == ["bad", "ok"]
  with pytest.raises(DataError, match=r"bad_labels: .*masks/bad\.png: mask values \[0, 7\]") as e:
    src[0]
  assert "trimap" in str(e.value) and "[1, 2, 3]" in str(e.value)
  with pytest.raises(DataError, match="bad.png"):
    readers.folder_source(imgs, masks, mask_values="trimap", validate="full")
  skip = readers.folder_source(imgs, masks, mask_values="trimap", validate="full",
                               on_error="skip")
  assert skip.ids == ["ok"] and skip.report.counts() == {"bad_labels": 1}


def _palette_png(idx, pal):
  im = Image.fromarray(np.asarray(idx, np.uint8), "P")
  im.putpalette(np.asarray(pal, np.uint8).reshape(-1).tolist())
  return im


def test_palette_mode_p_masks_and_own_palette(tmp_path):
  idx = RNG.integers(0, 3, (7, 9)).astype(np.uint8)
  idx[0, 0] = 255
  own = np.zeros((256, 3), np.uint8)
  own[:3] = [(10, 10, 10), (250, 0, 0), (0, 0, 250)]
  imgs, masks = make_folder(tmp_path, {"a": _palette_png(idx, own)})
  src = readers.folder_source(imgs, masks, mask_values="palette")
  np.testing.assert_array_equal(src[0]["label"], idx)
  assert src.num_classes == 3 and src.class_names == ("class0", "class1", "class2")
  assert src.palette.shape == (256, 3) and src.palette.dtype == np.uint8
  np.testing.assert_array_equal(src.palette[:3], own[:3])
  # other modes colour with the VOC palette
  assert (readers.folder_source(imgs, masks, num_classes=3).palette == palette.VOC_PALETTE).all()


def test_palette_mode_rgb_colour_masks(tmp_path):
  idx = RNG.integers(0, 4, (6, 5)).astype(np.uint8)
  idx[1, 1] = 255
  rgb = palette.VOC_PALETTE[idx]
  imgs, masks = make_folder(tmp_path, {"c": Image.fromarray(rgb, "RGB")})
  src = readers.folder_source(imgs, masks, mask_values="palette", validate="full")
  np.testing.assert_array_equal(src[0]["label"], idx)
  assert src.num_classes == int(idx[idx != 255].max()) + 1
  assert (src.palette == palette.VOC_PALETTE).all()
  # index mode refuses colour masks (with the file named)
  with pytest.raises(DataError, match=r"c\.png.*colour"):
    readers.folder_source(imgs, masks, num_classes=4)[0]


def test_palette_mode_unknown_colour_is_an_error(tmp_path):
  rgb = palette.VOC_PALETTE[np.zeros((6, 5), np.uint8)].copy()
  rgb[2, 3] = (1, 2, 3)
  imgs, masks = make_folder(tmp_path, {"u": Image.fromarray(rgb, "RGB")})
  src = readers.folder_source(imgs, masks, mask_values="palette", num_classes=2)
  with pytest.raises(DataError, match=r"bad_labels: .*u\.png: RGB colour \(1, 2, 3\) \(1 pixels\)"):
    src[0]


def test_index_mode_and_legacy_value_map(tmp_path):
  lab = RNG.integers(0, 5, (8, 6)).astype(np.uint8)
  lab[0] = 255
  imgs, masks = make_folder(tmp_path, {"x": _l(lab)})
  src = readers.folder_source(imgs, masks, num_classes=5)
  np.testing.assert_array_equal(src[0]["label"], lab)
  assert src.num_classes_origin == "given (num_classes=5)"
  with pytest.raises(DataError, match=r"x\.png: mask values \[4\] not allowed"):
    readers.folder_source(imgs, masks, num_classes=4)[0]
  vm = readers.folder_source(imgs, masks, value_map={i: i for i in range(5)} | {255: 255})
  assert vm.num_classes == 5 and vm.mask_values == "value_map"
  with pytest.raises(ValueError, match="not both"):
    readers.folder_source(imgs, masks, mask_values="binary", value_map=readers.BINARY_MAP)


# -- classes -------------------------------------------------------------------------------------
def test_num_classes_inferred_from_mask_values(tmp_path):
  masks = {f"m{i}": _l(np.full((5, 6), v, np.uint8)) for i, v in enumerate([0, 2, 255, 1])}
  imgs, mdir = make_folder(tmp_path, masks)
  assert readers.scan_mask_values(sorted(mdir.iterdir())) == [0, 1, 2, 255]
  src = readers.folder_source(imgs, mdir)
  assert readers.scan_mask_values(src) == [0, 1, 2, 255]
  assert src.num_classes == 3 and src.class_names == ("class0", "class1", "class2")
  assert src.num_classes_origin == "from mask values found: [0, 1, 2, 255] (in all 4 masks)"
  sampled = readers.folder_source(imgs, mdir, scan_max_files=2)
  assert "in 2 of 4 masks" in sampled.num_classes_origin
  named = readers.folder_source(imgs, mdir, class_names=["bg", "a", "b", "c"])
  assert named.num_classes == 4 and named.class_names == ("bg", "a", "b", "c")
  assert named.num_classes_origin == "from class names (4: bg, a, b, c)"
  with pytest.raises(ValueError, match="2 class names"):
    readers.folder_source(imgs, mdir, num_classes=3, class_names=["a", "b"])
  with pytest.raises(ValueError, match="binary masks have 2 classes"):
    readers.folder_source(imgs, mdir, mask_values="binary", num_classes=3)


def test_gap_in_class_ids_is_reported(tmp_path):
  imgs, mdir = make_folder(tmp_path, {"a": _l(np.array([[0, 4], [4, 0]]))})
  src = readers.folder_source(imgs, mdir)
  assert src.num_classes == 5
  assert "3 of the class ids 0..4 never appear" in src.num_classes_origin


def test_inference_refuses_binary_looking_or_single_class_masks(tmp_path):
  imgs, mdir = make_folder(tmp_path / "a", {"a": _l(np.array([[0, 255], [255, 0]]))})
  with pytest.raises(DataError, match="mask_values='binary'"):
    readers.folder_source(imgs, mdir)
  assert readers.folder_source(imgs, mdir, mask_values="binary").num_classes == 2
  imgs, mdir = make_folder(tmp_path / "b", {"a": _l(np.zeros((3, 3)))})
  with pytest.raises(DataError, match="only class 0"):
    readers.folder_source(imgs, mdir)
  imgs, mdir = make_folder(tmp_path / "c", {"a": Image.fromarray(np.full((3, 3), 300, np.uint16))})
  with pytest.raises(DataError, match="mask values up to 300"):
    readers.folder_source(imgs, mdir)


# -- files ---------------------------------------------------------------------------------------
def test_any_pillow_format_matched_by_stem(tmp_path):
  assert {".png", ".jpg", ".tif", ".gif", ".webp", ".bmp"} <= set(readers.IMAGE_EXTS)
  assert ".pdf" not in readers.IMAGE_EXTS  # Pillow writes PDF but cannot open it
  root = tmp_path
  (root / "images").mkdir()
  (root / "masks").mkdir()
  fmts = {"a": ".tif", "b": ".bmp", "c": ".gif", "d": ".jpeg", "e": ".webp"}
  for stem, ext in fmts.items():
    Image.fromarray(_img(6, 7)).save(root / "images" / f"{stem}{ext}")
    _l(np.ones((6, 7))).save(root / "masks" / f"{stem}.png")
  _l(np.zeros((6, 7))).save(root / "masks" / "a.jpg")  # a JPEG twin: the PNG mask wins
  (root / "images" / "._a.tif").write_bytes(b"macOS resource fork")  # hidden: left out
  (root / "images" / "notes.txt").write_text("not an image")
  src = readers.folder_source(root / "images", root / "masks", mask_values="binary",
                              validate="full")
  assert src.ids == ["a", "b", "c", "d", "e"]
  assert all(src[i]["label"].all() for i in range(5))
  assert src.label_paths[0].endswith("a.png")


def test_missing_masks_and_missing_folders(tmp_path):
  imgs, mdir = make_folder(tmp_path, {"a": _l(np.ones((4, 4))), "b": _l(np.ones((4, 4)))})
  (mdir / "b.png").unlink()
  with pytest.raises(DataError, match=r"missing: .*masks/b\.png: file not found"):
    readers.folder_source(imgs, mdir, mask_values="binary")
  src = readers.folder_source(imgs, mdir, mask_values="binary", on_error="skip")
  assert src.ids == ["a"] and src.report.counts() == {"missing": 1}
  with pytest.raises(DataError, match=r"nosuch: mask folder not found") as e:
    readers.folder_source(imgs, tmp_path / "nosuch", mask_values="binary")
  assert e.value.problem.kind == "missing"
  with pytest.raises(DataError, match="image folder not found"):
    readers.folder_source(tmp_path / "nope", mdir)
  (tmp_path / "empty").mkdir()
  with pytest.raises(DataError, match="no image files"):
    readers.folder_source(tmp_path / "empty", mdir)


def test_check_cli_with_mask_values(tmp_path, capsys):
  imgs, mdir = make_folder(tmp_path, {"a": _l(np.array([[0, 255], [255, 0]])),
                                      "b": _l(np.array([[0, 1], [1, 0]]))})
  assert check.main(["--images", str(imgs), "--masks", str(mdir), "--mask-values", "binary"]) == 0
  assert "2 classes" in capsys.readouterr().out
  assert check.main(["--images", str(imgs), "--labels", str(mdir), "--map", "binary"]) == 1
  out = capsys.readouterr().out
  assert "b.png" in out and "bad_labels" in out
  assert check.main(["--images", str(imgs), "--labels", str(mdir)]) == 0  # index mode, inferred
  assert "from mask values found: [0, 1, 255]" in capsys.readouterr().out


# -- subset / split ------------------------------------------------------------------------------
@pytest.fixture
def ten(tmp_path):
  masks = {f"s{i:02d}": _l(np.full((4 + i, 5), i % 2)) for i in range(10)}
  imgs, mdir = make_folder(tmp_path, masks)
  return readers.folder_source(imgs, mdir, mask_values="binary")


def test_subset_is_a_view(ten):
  sub = ten.subset([7, 2, 5], "part")
  assert len(sub) == 3 and sub.name == "part" and sub.ids == ["s07", "s02", "s05"]
  assert sub.sizes.tolist() == [[11, 5], [6, 5], [9, 5]]
  assert sub.class_names == ten.class_names and sub.num_classes == 2
  assert sub.mask_values == "binary" and sub.on_error == ten.on_error
  assert sub.palette is ten.palette
  np.testing.assert_array_equal(sub[1]["label"], ten[2]["label"])
  assert sub[1]["index"] == 1 and sub[1]["id"] == "s02"
  assert len(ten) == 10  # the parent is untouched
  with pytest.raises(IndexError):
    ten.subset([10])
  with pytest.raises(ValueError):
    ten.subset([])


def test_split_by_fraction(ten):
  tr, va = readers.split_by_fraction(ten, 0.3, seed=1)
  assert len(va) == 3 and len(tr) == 7
  assert sorted(tr.ids + va.ids) == ten.ids and not set(tr.ids) & set(va.ids)
  assert tr.ids == sorted(tr.ids) and va.ids == sorted(va.ids)
  assert tr.name.endswith("/train") and va.name.endswith("/val")
  tr2, va2 = readers.split_by_fraction(ten, 0.3, seed=1)
  assert va2.ids == va.ids and tr2.ids == tr.ids
  others = {tuple(readers.split_by_fraction(ten, 0.3, seed=s)[1].ids) for s in range(6)}
  assert len(others) > 1
  assert len(readers.split_by_fraction(ten, 0.01, 0)[1]) == 1   # at least one val example
  assert len(readers.split_by_fraction(ten, 0.99, 0)[0]) == 1   # at least one train example
  assert len(readers.split_by_fraction(ten, 0.25, 0)[1]) == 3   # 2.5 rounds up
  for bad in (0, 1, -0.1, 1.5, float("nan")):
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
      readers.split_by_fraction(ten, bad, 0)
  with pytest.raises(ValueError, match="cannot split"):
    readers.split_by_fraction(ten.subset([0]), 0.5, 0)


# -- Oxford-IIIT Pets ----------------------------------------------------------------------------
def make_pets(root):
  """A tiny Oxford layout, including the real dataset's odd files (PNG / GIF data named .jpg,
  grey, CMYK and RGBA JPEG-named images); returns {id: trimap}."""
  root = pathlib.Path(root)
  (root / "images").mkdir(parents=True)
  (root / "annotations" / "trimaps").mkdir(parents=True)
  kinds = {"Abyssinian_1": ("RGB", "JPEG"), "Abyssinian_2": ("RGB", "PNG"),
           "Bengal_3": ("P", "GIF"), "beagle_4": ("L", "JPEG"), "beagle_5": ("CMYK", "JPEG"),
           "pug_6": ("RGBA", "PNG")}
  tris = {}
  for i, (eid, (mode, fmt)) in enumerate(kinds.items()):
    h, w = 10 + i, 12
    Image.fromarray(_img(h, w)).convert(mode).save(root / "images" / f"{eid}.jpg", format=fmt)
    tris[eid] = RNG.integers(1, 4, (h, w)).astype(np.uint8)
    _l(tris[eid]).save(root / "annotations" / "trimaps" / f"{eid}.png")
    (root / "annotations" / "trimaps" / f"._{eid}.png").write_bytes(b"\0\5\26\7")
  ids = list(kinds)
  (root / "annotations" / "trainval.txt").write_text(
      "".join(f"{e} 1 1 1\n" for e in ids[:4]))
  (root / "annotations" / "test.txt").write_text(
      "# a comment line\n" + "".join(f"{e} 2 2 1\n" for e in ids[4:]) + "\n")
  return tris


def test_pets_source(tmp_path):
  tris = make_pets(tmp_path / "oxford-iiit-pet")
  for root in (tmp_path, tmp_path / "oxford-iiit-pet"):
    src = readers.pets_source(root, validate="full")
    assert src.ids == list(tris)[:4] and src.name == "pets/trainval"
  assert src.num_classes == 3 and src.class_names == readers.PETS_CLASSES
  for i, eid in enumerate(src.ids):
    ex = src[i]
    assert ex["image"].shape == (10 + i, 12, 3) and ex["image"].dtype == np.uint8
    np.testing.assert_array_equal(ex["label"], np.select([tris[eid] == 1, tris[eid] == 2],
                                                         [1, 0], 2))
  test = readers.pets_source(tmp_path, "test", ignore_border=True, validate="full")
  assert test.ids == ["beagle_5", "pug_6"] and test.num_classes == 2
  t = tris["pug_6"]
  np.testing.assert_array_equal(test[1]["label"], np.select([t == 1, t == 2], [1, 0], 255))
  assert "border ignored" in test.num_classes_origin
  assert readers.open_source(tmp_path, "test").ids == ["beagle_5", "pug_6"]
  assert check.main([str(tmp_path)]) == 0  # splits trainval,test by default for a Pets root
  with pytest.raises(DataError, match="split list not found"):
    readers.pets_source(tmp_path, "nosuch")
  with pytest.raises(DataError, match="no Oxford-IIIT Pets layout"):
    readers.pets_source(tmp_path / "oxford-iiit-pet" / "images")


def test_pets_bad_files_named(tmp_path, caplog):
  make_pets(tmp_path)
  (tmp_path / "images" / "Abyssinian_2.jpg").write_bytes(b"junk")
  bad = np.full((12, 12), 4, np.uint8)
  _l(bad).save(tmp_path / "annotations" / "trimaps" / "Bengal_3.png")
  with pytest.raises(DataError, match=r"unreadable: .*Abyssinian_2\.jpg"):
    readers.pets_source(tmp_path)
  with caplog.at_level(logging.WARNING, logger="fcnjax.data"):
    src = readers.pets_source(tmp_path, on_error="skip", validate="full")
  assert src.ids == ["Abyssinian_1", "beagle_4"]
  assert src.report.counts() == {"unreadable": 1, "bad_labels": 1}
  assert "Bengal_3.png" in src.report.summary()
