"""benchmarks/predict.py: every mode runs, its numbers are consistent, the table has a row each."""

import numpy as np

from benchmarks import predict as bench
from fcnjax import weights
from test_inference import rgb_image, tiny_fcn


def test_measure_reports_programs_times_and_mean_iu_per_mode(tmp_path):
  path = tmp_path / "m.safetensors"
  weights.save(tiny_fcn(aligned=True), path)
  rng = np.random.default_rng(0)
  images = [rgb_image(rng, h, w) for h, w in [(40, 50), (40, 50), (70, 33), (90, 90)]]
  labels = [rng.integers(0, 5, im.shape[:2]).astype(np.uint8) for im in images]
  modes = ["bucketed", "exact", "flip"]
  rows = bench.measure(str(path), images, labels, 5, modes, log=lambda *a: None)
  assert [r["mode"] for r in rows] == modes
  by = {r["mode"]: r for r in rows}
  assert by["exact"]["programs"] == 3  # three distinct sizes
  assert by["bucketed"]["warm_x_bucketed"] == 1.0
  for r in rows:
    assert r["cold_s"] > 0 and r["warm_s"] > 0 and 0 <= r["mean_iu"] <= 1
    assert r["warm_images_per_s"] == len(images) / r["warm_s"]
  report = {"machine": {"cpu": "x", "cpu_count": 2, "platform": "cpu", "loadavg_start": [0.1],
                        "jax": "j", "flax": "f", "date": "d"}, "model": "m", "rows": rows,
            "command": "c"}
  table = bench.markdown(report)
  assert all(f"| {m} |" in table for m in modes)


def test_mean_iu_is_one_for_perfect_predictions():
  labels = [np.array([[0, 1], [2, 255]], np.uint8)]
  assert bench.mean_iu([np.array([[0, 1], [2, 0]])], labels, 3) == 1.0
