"""Built-in folder (grey + binary masks) and Oxford-Pets-lookalike datasets: determinism, formats,
round trip through the readers, caching."""

import numpy as np
import pytest
import scipy.ndimage
from PIL import Image

from fcnjax.data import readers, synthetic

SMALL = dict(min_size=40, max_size=64)


def _files(folder):
  return {p.relative_to(folder).as_posix(): p.read_bytes()
          for p in sorted(folder.rglob("*")) if p.is_file()}


def test_folder_writer_deterministic_and_round_trip(tmp_path):
  a = synthetic.write_synthetic_folder(tmp_path / "a", 5, 2, seed=3, **SMALL)
  b = synthetic.write_synthetic_folder(tmp_path / "b", 5, 2, seed=3, **SMALL)
  assert _files(a.root) == _files(b.root)
  c = synthetic.write_synthetic_folder(tmp_path / "c", 5, 2, seed=4, **SMALL)
  assert _files(c.root) != _files(a.root)
  assert set(a.asdict()) == {"images", "masks", "val_images", "val_masks"}
  assert a["images"] == a.images and dict(a) == a.asdict()
  train = readers.folder_source(a.images, a.masks, mask_values="binary", validate="full")
  val = readers.folder_source(a.val_images, a.val_masks, mask_values="binary", validate="full")
  assert len(train) == 5 and len(val) == 2 and not set(train.ids) & set(val.ids)
  sizes = np.concatenate([train.sizes, val.sizes])
  assert sizes.min() >= 40 and sizes.max() <= 64 and (sizes[:, 0] != sizes[:, 1]).any()
  for p in train.image_paths[:2]:
    with Image.open(p) as im:
      assert im.mode == "L" and im.format == "PNG"
  assert readers.scan_mask_values(train.label_paths) == [0, 255]
  for src in (train, val):
    for i in range(len(src)):
      lab = src[i]["label"]
      assert 0 < lab.mean() < 0.8  # objects and background in every image
      assert src[i]["image"].shape == lab.shape + (3,)


def test_folder_objects_are_brighter_locally_not_globally(tmp_path):
  """Objects stand out against their surroundings, but a global threshold does not separate them."""
  ds = synthetic.write_synthetic_folder(tmp_path, 30, 0, seed=0, **SMALL)
  src = readers.folder_source(ds.images, ds.masks, mask_values="binary")
  fg, bg = [], []
  for i in range(len(src)):
    ex = src[i]
    g = ex["image"][..., 0].astype(float)
    fg.append(g[ex["label"] == 1])
    bg.append(g[ex["label"] == 0])
    m = ex["label"] == 1
    ring = scipy.ndimage.binary_dilation(m, iterations=4) & ~m
    assert g[m].mean() > g[ring].mean() + 8  # brighter than the background around it
  fg, bg = np.concatenate(fg), np.concatenate(bg)
  best = max(((fg > t).mean() + (bg <= t).mean()) / 2 for t in range(0, 256, 4))
  assert best < 0.9  # a global threshold is wrong on > 10 % (balanced)


def test_pets_writer_layout_and_trimaps(tmp_path):
  root = synthetic.write_synthetic_pets(tmp_path / "a", 6, 3, seed=1, **SMALL)
  again = synthetic.write_synthetic_pets(tmp_path / "b", 6, 3, seed=1, **SMALL)
  assert _files(root) == _files(again)
  ann = root / "annotations"
  lines = (ann / "trainval.txt").read_text().splitlines()
  assert len(lines) == 6 and all(len(ln.split()) == 4 for ln in lines)
  assert (ann / "list.txt").read_text().startswith("#")
  eid = lines[0].split()[0]
  breed, n = eid.rsplit("_", 1)
  assert breed in {b[0] for b in synthetic.PET_BREEDS} and int(n) >= 1
  with Image.open(root / "images" / f"{eid}.jpg") as im:
    assert im.format == "JPEG" and im.mode == "RGB"
  trainval = readers.pets_source(root, validate="full")
  test = readers.pets_source(root, "test", ignore_border=True, validate="full")
  assert len(trainval) == 6 and len(test) == 3 and trainval.ids == [ln.split()[0] for ln in lines]
  for i in range(len(trainval)):
    tri = np.asarray(Image.open(trainval.label_paths[i]))
    assert set(np.unique(tri).tolist()) == {1, 2, 3}
    assert 0.2 <= np.isin(tri, (1, 3)).mean() <= 0.75  # one large animal
    lab = trainval[i]["label"]
    np.testing.assert_array_equal(lab, np.select([tri == 1, tri == 2], [1, 0], 2))
  assert set(np.unique(test[0]["label"]).tolist()) == {0, 1, 255}


def test_pets_border_band_follows_the_outline(tmp_path):
  rng = np.random.default_rng(0)
  img, tri = synthetic.render_pet_example(rng, 80, 100, synthetic.PET_BREEDS[0], border=2)
  assert img.shape == (80, 100, 3) and img.dtype == np.uint8
  pet, border = tri == 1, tri == 3
  # pet and background never touch: the band separates them
  assert not (pet[:, 1:] & (tri[:, :-1] == 2)).any() and not (pet[1:] & (tri[:-1] == 2)).any()
  assert 0.03 < border.mean() < 0.25


def test_ensure_builtin_folder_and_pets_cache(tmp_path, monkeypatch):
  def boom(*a, **k):
    raise KeyboardInterrupt
  with monkeypatch.context() as m:
    m.setattr(synthetic, "write_synthetic_folder", boom)
    with pytest.raises(KeyboardInterrupt):
      synthetic.ensure_builtin_folder(tmp_path, num_train=3, num_val=2, **SMALL)
  assert list(tmp_path.iterdir()) == []  # nothing half-written left behind
  ds = synthetic.ensure_builtin_folder(tmp_path, num_train=3, num_val=2, **SMALL)
  assert ds.root.name == f"builtin_folder_v{synthetic.FOLDER_GENERATOR_VERSION}_n3-2_px40-64_seed0"
  assert len(readers.folder_source(ds.images, ds.masks, mask_values="binary")) == 3
  stamp = next(ds.images.iterdir()).stat().st_mtime_ns
  assert synthetic.ensure_builtin_folder(tmp_path, num_train=3, num_val=2, **SMALL) == ds
  assert next(ds.images.iterdir()).stat().st_mtime_ns == stamp
  pets = synthetic.ensure_builtin_pets(tmp_path, num_trainval=3, num_test=2, **SMALL)
  assert pets.name == (f"builtin_pets_v{synthetic.PETS_GENERATOR_VERSION}_n3-2_px40-64_b3_seed0")
  assert synthetic.ensure_builtin_pets(tmp_path, num_trainval=3, num_test=2, **SMALL) == pets
  assert len(readers.pets_source(pets, "test")) == 2
  monkeypatch.setenv("FCNJAX_CACHE", str(tmp_path / "env"))
  assert synthetic.ensure_builtin_pets(num_trainval=2, num_test=1, **SMALL).parent == tmp_path / "env"
