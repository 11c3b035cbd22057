"""The confusion matrix on a batch sharded over 4 simulated devices == one device (exactly).

Run from ``tests/``: ``python -m sharded.check_metrics`` (exit status 0 = all checks passed).
"""

from .prelude import NUM_CLASSES, batch, check_devices, sharded_runs

import jax  # noqa: E402  (after the prelude set XLA_FLAGS)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


def main() -> None:
  from fcnjax.train.metrics import confusion_matrix, update_confusion

  check_devices()
  z, y, m = batch(0)
  h0 = jnp.zeros((NUM_CLASSES, NUM_CLASSES), jnp.int32)
  update = jax.jit(update_confusion)
  want = np.asarray(update(h0, z, y, m))
  # Independent count: argmax in numpy, valid = mask & label in [0, C).
  preds = z.argmax(-1)
  valid = m & (y < NUM_CLASSES)
  ref = np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)
  np.add.at(ref, (y[valid].astype(int), preds[valid]), 1)
  np.testing.assert_array_equal(want, ref, err_msg="one device vs numpy")
  for where, got in sharded_runs(lambda z, y, m: update(h0, z, y, m), z, y, m):
    np.testing.assert_array_equal(got, want, err_msg=f"update_confusion, {where}")
    print(f"ok  update_confusion   {where}: {int(np.asarray(got).sum())} pixels")
  cm = jax.jit(confusion_matrix, static_argnums=3)
  p = preds.astype(np.int32)
  for where, got in sharded_runs(lambda p, y, m: cm(p, y, m, NUM_CLASSES), p, y, m):
    np.testing.assert_array_equal(got, ref, err_msg=f"confusion_matrix, {where}")
    print(f"ok  confusion_matrix   {where}")
  print("OK")


if __name__ == "__main__":
  main()
