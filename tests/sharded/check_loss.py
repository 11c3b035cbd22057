"""Losses and the train step on a batch sharded over 4 simulated devices == one device.

Run from ``tests/``: ``python -m sharded.check_loss`` (exit status 0 = all checks passed).

Tolerances: losses ``rtol=1e-6`` (float32 sums whose order differs across devices), gradients
``rtol=1e-5, atol=1e-7``; train-step metrics ``rtol=1e-5`` and updated parameters
``rtol=1e-5, atol=1e-7``; ``valid_pixels`` exactly.
"""

from .prelude import NUM_CLASSES, batch, check_devices, max_abs_diff, sharded_runs

import jax  # noqa: E402  (after the prelude set XLA_FLAGS)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

LOSS_TOL = dict(rtol=1e-6)
GRAD_TOL = dict(rtol=1e-5, atol=1e-7)


def loss_functions():
  from fcnjax.train.loss import dice_loss, segmentation_loss
  cw = jnp.linspace(0.5, 2.0, NUM_CLASSES)
  return {
      "CE mean": lambda z, y, m: segmentation_loss(z, y, m)[0],
      "CE sum": lambda z, y, m: segmentation_loss(z, y, m, reduction="sum")[0],
      "CE weighted": lambda z, y, m: segmentation_loss(z, y, m, class_weights=cw)[0],
      "Dice all": lambda z, y, m: dice_loss(z, y, m),
      "Dice foreground": lambda z, y, m: dice_loss(z, y, m, classes="foreground", smooth=0.5),
      "CE + 0.5 Dice": lambda z, y, m: (segmentation_loss(z, y, m, class_weights=cw)[0]
                                        + 0.5 * dice_loss(z, y, m, classes="foreground")),
  }


def check_losses() -> None:
  z, y, m = batch(0)
  losses = loss_functions()
  # One program computing every loss and its gradient: one compilation per sharding.
  f = jax.jit(lambda z, y, m: {name: jax.value_and_grad(loss)(z, y, m)
                               for name, loss in losses.items()})
  want = f(z, y, m)
  for name, (want_loss, want_grad) in want.items():
    assert np.isfinite(float(want_loss)) and np.all(np.isfinite(want_grad)), name
  for where, got in sharded_runs(f, z, y, m):
    for name, (want_loss, want_grad) in want.items():
      got_loss, got_grad = got[name]
      np.testing.assert_allclose(got_loss, want_loss, **LOSS_TOL, err_msg=f"{name}, {where}")
      np.testing.assert_allclose(got_grad, want_grad, **GRAD_TOL, err_msg=f"{name}, {where}")
      print(f"ok  {name:16s} {where}: loss diff {max_abs_diff(got_loss, want_loss):.1e}, "
            f"grad diff {max_abs_diff(got_grad, want_grad):.1e}")


def check_train_step() -> None:
  """make_train_step with CE + Dice: replicated state, batch over "data" (as the loop does)."""
  import optax
  from flax import nnx

  from fcnjax.train import parallel, step as step_lib

  z, y, m = batch(1)
  rng = np.random.default_rng(1)
  images = rng.normal(size=z.shape[:3] + (3,)).astype(np.float32)
  host_batch = {"image": images, "label": y, "mask": m}
  tx = optax.sgd(0.1, momentum=0.9)
  kwargs = dict(class_weights=jnp.linspace(0.5, 2.0, NUM_CLASSES), dice_weight=0.5,
                dice_classes="foreground")

  def fresh():
    model = nnx.Conv(3, NUM_CLASSES, (3, 3), rngs=nnx.Rngs(0))
    return step_lib.init_state(model, tx)

  graphdef, state = fresh()
  one = step_lib.make_train_step(graphdef, tx, **kwargs)
  for _ in range(2):
    state, want = one(state, {k: jnp.asarray(v) for k, v in host_batch.items()})
  want_params = jax.device_get(state.params)

  mesh = parallel.make_mesh(4)
  graphdef, state = fresh()
  state = parallel.replicate(state, mesh)
  sharded = step_lib.make_train_step(
      graphdef, tx, **kwargs, state_sharding=jax.tree.map(lambda x: x.sharding, state),
      batch_sharding=parallel.batch_sharding(mesh))
  for _ in range(2):
    state, got = sharded(state, parallel.global_batch(host_batch, mesh))
  assert set(got) == {"loss", "valid_pixels", "grad_norm", "ce", "dice"}, sorted(got)
  assert float(got["valid_pixels"]) == float(want["valid_pixels"])
  for k in ("loss", "ce", "dice", "grad_norm"):
    np.testing.assert_allclose(got[k], want[k], rtol=1e-5, err_msg=f"train step metric {k}")
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, **GRAD_TOL), jax.device_get(
      state.params), want_params)
  print(f"ok  train step (CE + 0.5 Dice, 2 steps): loss {float(got['loss']):.6f} "
        f"(one device {float(want['loss']):.6f})")


def main() -> None:
  check_devices()
  check_losses()
  check_train_step()
  print("OK")


if __name__ == "__main__":
  main()
