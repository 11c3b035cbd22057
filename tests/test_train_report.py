"""report.Progress (plain lines off a terminal, tqdm on one) and report.TensorBoardWriter (event
files read back as TFRecords of ``Event`` protos, CRCs checked)."""

import glob
import io
import os
import struct
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from fcnjax.train import report


class FakeTerminal(io.StringIO):
  def isatty(self):
    return True


def run_progress(stream, total=25, updates=None, every=10, done=0, **kwargs):
  p = report.Progress(total, 1, 3, every=every, stream=stream, **kwargs)
  p.done = done
  for _ in range(total - done if updates is None else updates):
    p.update(0.5, 4, (8, 16))
  return p


def test_plain_lines_every_n_steps_and_at_the_end():
  out = io.StringIO()
  p = run_progress(out)
  lines = out.getvalue().splitlines()
  assert len(lines) == 3 and "\r" not in out.getvalue()
  for line, n in zip(lines, (10, 20, 25)):
    assert line.startswith("epoch 2/3 [") and f" {n}/25 " in line
    assert "loss 0.5000" in line and "img/s" in line and "bucket 8x16" in line
  assert "#" * 24 in lines[-1]
  assert p.images == 100 and p.images_per_second > 0
  p.close()
  p.close()
  assert len(out.getvalue().splitlines()) == 3  # everything was printed already


def test_plain_close_prints_an_unprinted_last_state():
  out = io.StringIO()
  with run_progress(out, total=100, updates=13, done=40):
    pass
  lines = out.getvalue().splitlines()
  assert [line.split("] ")[1].split()[0] for line in lines] == ["50/100", "53/100"]


def test_disabled_writes_nothing():
  for stream in (io.StringIO(), FakeTerminal()):
    p = run_progress(stream, enabled=False)
    p.close()
    assert stream.getvalue() == "" and p.done == 25


def test_terminal_uses_tqdm():
  out = FakeTerminal()
  p = run_progress(out, total=4, done=1)
  text = out.getvalue()
  assert "\r" in text and text.endswith("\n")  # closed, left on screen, at the end of the epoch
  last = text.rstrip("\n").split("\r")[-1]
  assert last.startswith("epoch 2/3") and "100%" in last and "4/4" in last
  assert "loss 0.5000" in last and "img/s" in last and "bucket 8x16" in last
  assert p._bar is None
  p.update(0.1, 4, (8, 16))  # after close: counted, not drawn
  assert out.getvalue() == text and p.done == 5


def test_terminal_close_mid_epoch():
  out = FakeTerminal()
  p = run_progress(out, total=10, updates=3)
  p.close()
  assert out.getvalue().endswith("\n")
  assert "3/10" in out.getvalue().rstrip("\n").split("\r")[-1]


def test_terminal_without_tqdm_redraws_one_line(monkeypatch):
  monkeypatch.setitem(sys.modules, "tqdm", None)
  out = FakeTerminal()
  run_progress(out, total=3)
  text = out.getvalue()
  assert text.count("\r") == 3 and text.endswith("\n")
  assert "3/3 loss 0.5000 | " in text and "img/s | bucket 8x16" in text


# --- TensorBoard -------------------------------------------------------------------------------

def crc32c(data: bytes) -> int:
  """CRC-32C (Castagnoli), bit by bit."""
  crc = 0xFFFFFFFF
  for byte in data:
    crc ^= byte
    for _ in range(8):
      crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
  return crc ^ 0xFFFFFFFF


def masked_crc(data: bytes) -> int:
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_events(logdir):
  """Every Event in the logdir's event files: TFRecords of (uint64 length, uint32 masked CRC of
  the length, data, uint32 masked CRC of the data), little-endian."""
  from tensorboardX.proto import event_pb2
  files = sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*")))
  assert files, f"no event file in {logdir}: {os.listdir(logdir)}"
  events = []
  for path in files:
    raw = open(path, "rb").read()
    pos = 0
    while pos < len(raw):
      header = raw[pos:pos + 8]
      (length,), (length_crc,) = struct.unpack("<Q", header), struct.unpack(
          "<I", raw[pos + 8:pos + 12])
      data = raw[pos + 12:pos + 12 + length]
      (data_crc,) = struct.unpack("<I", raw[pos + 12 + length:pos + 16 + length])
      assert length_crc == masked_crc(header) and data_crc == masked_crc(data)
      events.append(event_pb2.Event.FromString(data))
      pos += 16 + length
  return events


def summaries(events):
  """{(step, tag): Summary.Value}."""
  return {(e.step, v.tag): v for e in events if e.HasField("summary") for v in e.summary.value}


def test_tensorboard_scalars_and_images(tmp_path):
  from PIL import Image
  rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
  png = tmp_path / "grid.png"
  Image.fromarray(np.ascontiguousarray(rgb[::-1])).save(png)
  logdir = tmp_path / "tb"
  with report.TensorBoardWriter(logdir) as tb:
    n = tb.scalars(10, {"loss": 0.5, "learning_rate": np.float32(0.01), "grad_norm": None,
                        "kind": "train", "flag": True, "shape": (8, 16), "hist": np.zeros(3),
                        "jax": jnp.asarray(2.0), "bf16": jnp.asarray(1.5, jnp.bfloat16),
                        "steps": np.int64(3)}, prefix="train")
    assert n == 5
    assert tb.scalars(20, {"mean_iu": 0.25, "per_class_iou": {"cat": 0.75, "dog": None},
                           "fwiu": float("nan")}, prefix="val/") == 3
    tb.image(20, "val/predictions", rgb)
    tb.image(30, "val/predictions", png)
    with pytest.raises(ValueError):
      tb.image(30, "bad", rgb.astype(np.float32))
    with pytest.raises(ValueError):
      tb.image(30, "bad", rgb[..., :2])
    tb.flush()
  tb.close()  # idempotent

  events = read_events(str(logdir))
  assert events[0].file_version.startswith("brain.Event")
  values = summaries(events)
  scalars = {k: v.simple_value for k, v in values.items() if v.HasField("simple_value")}
  assert set(scalars) == {(10, "train/loss"), (10, "train/learning_rate"), (10, "train/jax"),
                          (10, "train/bf16"), (10, "train/steps"), (20, "val/mean_iu"),
                          (20, "val/per_class_iou/cat"), (20, "val/fwiu")}
  assert scalars[10, "train/loss"] == 0.5 and scalars[10, "train/bf16"] == 1.5
  np.testing.assert_allclose(scalars[10, "train/learning_rate"], 0.01, rtol=1e-7)
  assert scalars[10, "train/jax"] == 2.0 and scalars[10, "train/steps"] == 3.0
  assert scalars[20, "val/per_class_iou/cat"] == 0.75 and np.isnan(scalars[20, "val/fwiu"])
  for step, want in ((20, rgb), (30, rgb[::-1])):
    im = values[step, "val/predictions"].image
    assert (im.height, im.width, im.colorspace) == (5, 7, 3)
    decoded = np.asarray(Image.open(io.BytesIO(im.encoded_image_string)).convert("RGB"))
    np.testing.assert_array_equal(decoded, want)


def test_tensorboard_missing_dependency(monkeypatch, tmp_path):
  monkeypatch.setitem(sys.modules, "tensorboardX", None)
  with pytest.raises(ImportError, match=r'pip install "fcnjax\[tensorboard\]"'):
    report.TensorBoardWriter(tmp_path / "tb")
  # Disabled (not process 0): no import, nothing written, every method a no-op.
  tb = report.TensorBoardWriter(tmp_path / "off", enabled=False)
  assert tb.scalars(1, {"loss": 1.0}) == 0
  tb.image(1, "x", np.zeros((2, 2, 3), np.uint8))
  tb.flush()
  tb.close()
  assert not (tmp_path / "off").exists()
