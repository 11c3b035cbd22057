"""Shared start of the sharded check programs: 4 simulated CPU devices and one random batch.

Import it before anything imports jax: it sets ``XLA_FLAGS`` (the device count is read once,
when JAX starts). ``run_sharded_check`` also sets it in the subprocess's environment.
"""

import os
import sys

NUM_DEVICES = 4
_FLAG = f"--xla_force_host_platform_device_count={NUM_DEVICES}"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # noqa: E402

NUM_CLASSES = 5


def check_devices() -> None:
  """Exit with a message unless JAX sees exactly NUM_DEVICES CPU devices."""
  n = jax.device_count()
  if n != NUM_DEVICES:
    sys.exit(f"expected {NUM_DEVICES} simulated devices, JAX has {n} (was jax imported before "
             f"the prelude? XLA_FLAGS={os.environ.get('XLA_FLAGS')!r})")


def batch(seed: int = 0):
  """A random batch: logits ``z`` (8, 8, 9, 5) float32, labels ``y`` (8, 8, 9) uint8 with the
  first two rows of every image ignored (255) and one out-of-range label, mask ``m`` (8, 8, 9)
  bool with the last example all padding. 8 examples: 2 per device."""
  rng = np.random.default_rng(seed)
  z = rng.normal(size=(8, 8, 9, NUM_CLASSES)).astype(np.float32)
  y = rng.integers(0, NUM_CLASSES, (8, 8, 9)).astype(np.uint8)
  y[:, :2] = 255
  y[0, 3, 4] = NUM_CLASSES + 2
  m = np.ones((8, 8, 9), bool)
  m[7] = False
  return z, y, m


def sharded_runs(f, *arrays):
  """``f(*arrays)`` with the arrays sharded over ``"data"`` on 4 devices: for an Explicit and an
  Auto mesh, called both inside ``jax.set_mesh`` and outside it. Yields (description, result)."""
  for axis_type in (AxisType.Explicit, AxisType.Auto):
    mesh = jax.make_mesh((NUM_DEVICES,), ("data",), axis_types=(axis_type,))
    args = [jax.device_put(a, NamedSharding(mesh, P("data"))) for a in arrays]
    assert all(a.sharding.num_devices == NUM_DEVICES for a in args)
    with jax.set_mesh(mesh):
      inside = f(*args)
    yield f"{axis_type.name} mesh, inside set_mesh", inside
    yield f"{axis_type.name} mesh, outside set_mesh", f(*args)


def max_abs_diff(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
