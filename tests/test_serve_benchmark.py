"""benchmarks/serve.py: the load generator against an in-process server of a stand-in model."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks import serve as bench
from fcnjax.serving import api
from fcnjax.serving.models import ServedModel
from fcnjax.serving.server import ModelServer, ServerConfig


def _fake_classifier() -> ServedModel:
  def fn(images):
    return np.tile(np.arange(3, dtype=np.float32), (len(images), 1))
  return ServedModel(fn, task="classification", num_classes=3, class_names="abc",
                     palette=np.zeros((256, 3), np.uint8), source="exported", path="fake",
                     description="fake")


@pytest.fixture()
def server():
  s = ModelServer(_fake_classifier(), ServerConfig(port=0, name="fake", threads=4)).start()
  yield s
  assert s.drain(10)


def test_load_counts_requests_and_latencies(server):
  body = bench.request_body((5, 7), "lists")
  r = bench.load("127.0.0.1", server.port, "/v1/models/fake:predict", body, concurrency=3,
                 seconds=0.5, warmup_requests=1)
  assert r["errors"] == 0 and r["requests"] > 3 and r["concurrency"] == 3
  assert 0 < r["p50_ms"] <= r["p99_ms"] and r["requests_per_s"] == r["requests"] / r["wall_s"]
  report = {"machine": {"cpu": "x", "cpu_count": 2, "platform": "cpu", "loadavg_start": [0.1],
                        "loadavg_end": [0.2], "jax": "j", "date": "d"},
            "rows": [dict(r, model="fake", image="5x7", batch_window_ms=0, body_bytes=len(body))],
            "seconds": 0.5, "warmup_requests": 1, "command": "c"}
  assert "| fake | 5x7 | 0 | 3 |" in bench.markdown(report)


def test_load_reports_a_failing_warmup(server):
  with pytest.raises(RuntimeError, match="warm-up answer 404"):
    bench.load("127.0.0.1", server.port, "/v1/models/other:predict", b"{}", concurrency=2,
               seconds=0.1)


@pytest.mark.parametrize("encoding", ["lists", "b64"])
def test_request_bodies_parse(encoding):
  req = api.parse_predict(bench.request_body((30, 300), encoding), task="classification")
  assert len(req.images) == 1 and req.images[0].shape == (30, 300, 3)


def test_percentile():
  assert bench.percentile([1, 2, 3, 4, 5], 50) == 3
  assert np.isnan(bench.percentile([], 99))
