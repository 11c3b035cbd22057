"""Shared helpers for the training tests: a tiny on-disk VOC dataset and experiment runs."""

import json
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]

# A run small enough for CI: FCN-8s at 1/16 width (aligned), 16 train / 8 val images at 0.15 of
# VOC's sizes, one size bucket, batch 8 (divisible by 8 devices and by 2 processes x 4).
TINY_RUN = ["--preset", "smoke", "--width-multiplier", "0.0625", "--batch-size", "8",
            "--max-buckets", "1", "--eval-every-epochs", "1000"]


def write_tiny_voc(root) -> pathlib.Path:
  from fcnjax.data import synthetic
  return synthetic.write_synthetic_voc(root, num_train=16, num_val=8, scale=0.15, seed=3)


def experiment_cmd(voc_root, workdir, *extra):
  return [sys.executable, "-m", "fcnjax.experiments.voc_fcn8s", "--voc-root", str(voc_root),
          "--workdir", str(workdir), *TINY_RUN, *extra]


def env_with_devices(n: int) -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n}"
  env["JAX_PLATFORMS"] = "cpu"
  env.pop("JAX_COORDINATOR_ADDRESS", None)
  return env


def run_experiment(voc_root, workdir, *extra, devices: int = 1, timeout: int = 600):
  proc = subprocess.run(experiment_cmd(voc_root, workdir, *extra), env=env_with_devices(devices),
                        capture_output=True, text=True, timeout=timeout, cwd=REPO)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc


def final_state(workdir):
  """The latest checkpoint's params (flat dict path -> numpy array) and its meta, read on one
  device whatever topology wrote it."""
  import jax
  import numpy as np
  import orbax.checkpoint as ocp
  ckpt_dir = pathlib.Path(workdir).absolute() / "checkpoints"
  step = max(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit())
  checkpointer = ocp.StandardCheckpointer()
  tree = checkpointer.metadata(ckpt_dir / str(step) / "state").item_metadata
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), tree,
                        is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))
  state = checkpointer.restore(ckpt_dir / str(step) / "state", target)
  meta = json.loads((ckpt_dir / str(step) / "meta" / "metadata").read_text())
  flat = jax.tree_util.tree_flatten_with_path(state["params"])[0]
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in flat}, meta


def max_relative_difference(a: dict, b: dict) -> float:
  import numpy as np
  assert a.keys() == b.keys()
  return max(float(np.abs(a[k] - b[k]).max() / max(np.abs(a[k]).max(), 1e-12)) for k in a)


def run_sharded_check(name: str, timeout: int = 300) -> subprocess.CompletedProcess:
  """Run the check program ``tests/sharded/<name>.py`` as module ``sharded.<name>`` in a fresh
  process with 4 simulated CPU devices; it must exit 0 (its output is shown otherwise)."""
  proc = subprocess.run([sys.executable, "-m", f"sharded.{name}"], env=env_with_devices(4),
                        capture_output=True, text=True, timeout=timeout, cwd=REPO / "tests")
  assert proc.returncode == 0, (f"sharded.{name} exited {proc.returncode}\n--- stdout\n"
                                f"{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-5000:]}")
  return proc
