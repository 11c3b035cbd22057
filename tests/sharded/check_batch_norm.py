"""BatchNorm under data parallelism: one train step of a ResNet FCN on a batch sharded over 8
simulated devices == the same step on one device (SyncBN semantics: statistics over the global
batch, over image pixels only: the batch has a partly padded example and a dummy one), and
frozen BatchNorm keeps its running statistics.

Run from ``tests/``: ``python -m sharded.check_batch_norm`` with 8 simulated CPU devices (exit
status 0 = all checks passed). Tolerances: loss ``rtol=1e-5``; BatchNorm running statistics
and updated parameters agree to 1e-5 of each tensor's max |value| (the sharded step only
reorders float32 sums).
"""

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "--xla_force_host_platform_device_count=8" not in os.environ.get("XLA_FLAGS", ""):
  sys.exit("run with XLA_FLAGS=--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from fcnjax.models import build_model  # noqa: E402
from fcnjax.train import parallel, step as step_lib  # noqa: E402

RTOL = 1e-5


def batch():
  rng = np.random.default_rng(0)
  image = rng.normal(size=(8, 37, 45, 3)).astype(np.float32)
  image[4:] *= 3.0      # devices see different statistics: a per-device BN would differ
  image[4:] += 1.0
  label = rng.integers(0, 3, (8, 37, 45)).astype(np.uint8)
  mask = np.ones((8, 37, 45), bool)
  mask[7, 20:] = False
  mask[6] = False       # a dummy example: no pixel of it enters the statistics
  return {"image": image, "label": label, "mask": mask}


def rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(a)), 1e-30))


def flat(tree):
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in
          jax.tree_util.tree_leaves_with_path(tree)
          if not jax.dtypes.issubdtype(v.dtype, jax.dtypes.prng_key)
          and jnp.issubdtype(v.dtype, jnp.floating)}


def main() -> int:
  assert jax.device_count() == 8, jax.device_count()
  failures = []
  for frozen in (False, True):
    tx = optax.sgd(0.1, momentum=0.9)

    def fresh():  # the same initial state each call (the step donates its input)
      return step_lib.init_state(build_model("fcn8s-resnet18", 3, width_multiplier=1 / 16,
                                             seed=0), tx)

    graphdef, state = fresh()
    before = flat(jax.device_get(state.rest))
    b = batch()
    one = step_lib.make_train_step(graphdef, tx, frozen_batch_norm=frozen)
    s1, m1 = one(state, {k: jnp.asarray(v) for k, v in b.items()})
    mesh = parallel.make_mesh(8)
    replicated = parallel.replicate(fresh()[1], mesh)
    sharding = parallel.batch_sharding(mesh)
    eight = step_lib.make_train_step(graphdef, tx, frozen_batch_norm=frozen,
                                     state_sharding=jax.tree.map(lambda x: x.sharding, replicated),
                                     batch_sharding=sharding)
    s8, m8 = eight(replicated, {k: jax.device_put(v, sharding) for k, v in b.items()})
    after1, after8 = flat(s1.rest), flat(s8.rest)
    bn_keys = [k for k in after1 if "['mean']" in k or "['var']" in k]
    assert bn_keys, "no BatchNorm statistics found"
    tag = "frozen" if frozen else "training"
    loss_rel = abs(float(m1["loss"]) - float(m8["loss"])) / abs(float(m1["loss"]))
    worst_bn = max(rel(after1[k], after8[k]) for k in bn_keys)
    p1, p8 = flat(s1.params), flat(s8.params)
    worst_p = max(rel(p1[k], p8[k]) for k in p1)
    moved = max(float(np.max(np.abs(before[k] - after1[k]))) for k in bn_keys)
    print(f"{tag}: loss 1 dev {float(m1['loss']):.6f} vs 8 dev {float(m8['loss']):.6f} "
          f"(rel {loss_rel:.1e}); BN statistics max rel diff {worst_bn:.1e} over {len(bn_keys)} "
          f"tensors; parameters max rel diff {worst_p:.1e}; statistics moved by {moved:.2e}")
    if loss_rel > RTOL or worst_bn > RTOL or worst_p > RTOL:
      failures.append(f"{tag}: 8 devices differ from 1")
    if frozen and moved != 0:
      failures.append("frozen BatchNorm changed its running statistics")
    if not frozen and moved < 1e-3:
      failures.append("training BatchNorm did not update its running statistics")
  # The statistics of half the batch differ: a per-device BatchNorm would be caught above.
  x = batch()["image"]
  if rel(x[:4].mean((0, 1, 2)), x.mean((0, 1, 2))) < 0.1:
    failures.append("the batch halves have the same statistics: the check could not fail")
  for f in failures:
    print("FAIL:", f)
  return 1 if failures else 0


if __name__ == "__main__":
  sys.exit(main())
