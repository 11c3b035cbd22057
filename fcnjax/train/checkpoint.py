"""Orbax checkpoints of a training run: the last ``keep`` and the best by val mean IU.

A checkpoint holds the :class:`~fcnjax.train.step.TrainState` (params, dropout RNG / BatchNorm
state, optimizer state, step), the data iterator's state (so the next batch is the one an
uninterrupted run would see), the run's config and the model's description. Layout::

    WORKDIR/checkpoints/<step>/{state,meta}   every ``save_every`` steps and after each eval
    WORKDIR/best/<step>/{state,meta}          the best val mean IU so far (one kept)

Orbax writes each step to a temporary directory and renames it when complete, so a run killed
mid-save leaves the previous checkpoint intact; restoring picks the latest complete one.
"""

from __future__ import annotations

import pathlib

import jax
import numpy as np
import orbax.checkpoint as ocp


class CheckpointMismatch(ValueError):
  """A checkpoint was written for a different model or run than the one requested."""


def _is_key(x) -> bool:
  return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _abstract_is_key(x) -> bool:
  return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def to_saveable(state):
  """PRNG key arrays -> their raw uint32 data (orbax stores plain arrays)."""
  return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, state)


def from_saveable(restored, like):
  """Inverse of :func:`to_saveable`, using ``like`` (a real or abstract state) for key types."""
  def back(r, l):
    if _abstract_is_key(l):
      return jax.random.wrap_key_data(r, impl=jax.random.key_impl(l) if isinstance(l, jax.Array)
                                      else None)
    return r
  return jax.tree.map(back, restored, like)


def _abstract(state):
  """ShapeDtypeStructs (with shardings) for restoring into ``state``'s layout."""
  def spec(x):
    if _is_key(x):
      data = jax.random.key_data(x)
      return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=x.sharding)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
  return jax.tree.map(spec, state)


def describe_mismatch(saved: dict, wanted: dict) -> str | None:
  """A readable difference between two model descriptions, or None if they match."""
  diffs = [f"{k}: checkpoint has {saved.get(k)!r}, requested {wanted.get(k)!r}"
           for k in sorted(set(saved) | set(wanted)) if saved.get(k) != wanted.get(k)]
  return "; ".join(diffs) or None


class Checkpointer:
  """The run's checkpoint managers (``last``: keep ``keep``; ``best``: keep 1 by mean IU)."""

  def __init__(self, workdir, *, keep: int = 3, async_save: bool = True):
    workdir = pathlib.Path(workdir).absolute()
    opts = dict(enable_async_checkpointing=async_save, create=True)
    self.last = ocp.CheckpointManager(
        workdir / "checkpoints", options=ocp.CheckpointManagerOptions(max_to_keep=keep, **opts))
    self.best = ocp.CheckpointManager(
        workdir / "best", options=ocp.CheckpointManagerOptions(
            max_to_keep=1, best_fn=lambda m: m["mean_iu"], best_mode="max", **opts))

  def latest_step(self) -> int | None:
    return self.last.latest_step()

  def save(self, step: int, state, meta: dict, *, eval_metrics: dict | None = None) -> None:
    """Save to ``last`` (and to ``best`` when ``eval_metrics`` has a finite ``mean_iu``)."""
    args = ocp.args.Composite(state=ocp.args.StandardSave(to_saveable(state)),
                              meta=ocp.args.JsonSave(meta))
    self.last.save(step, args=args, force=True)
    miu = None if eval_metrics is None else eval_metrics.get("mean_iu")
    if miu is not None and np.isfinite(miu):
      args = ocp.args.Composite(state=ocp.args.StandardSave(to_saveable(state)),
                                meta=ocp.args.JsonSave(meta))
      self.best.save(step, args=args, metrics={"mean_iu": float(miu)}, force=True)

  def read_meta(self, step: int | None = None, *, best: bool = False) -> dict:
    mngr = self.best if best else self.last
    step = mngr.latest_step() if step is None else step
    return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore(self, like_state, *, model_description: dict, step: int | None = None,
              best: bool = False):
    """(state, meta) of ``step`` (default latest), shaped and sharded like ``like_state``.

    Raises :class:`CheckpointMismatch` naming the difference if the checkpoint was written for
    another model (architecture, number of classes, width, ...).
    """
    mngr = self.best if best else self.last
    step = mngr.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {mngr.directory}")
    meta = self.read_meta(step, best=best)
    diff = describe_mismatch(meta.get("model", {}), model_description)
    if diff:
      raise CheckpointMismatch(
          f"checkpoint {mngr.directory}/{step} does not match the requested model: {diff}")
    try:
      restored = mngr.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(_abstract(like_state))))["state"]
    except (ValueError, KeyError, TypeError) as e:
      raise CheckpointMismatch(
          f"checkpoint {mngr.directory}/{step} does not fit the requested model/optimizer: "
          f"{str(e).splitlines()[0][:300]}") from e
    return from_saveable(restored, like_state), meta

  def wait(self) -> None:
    self.last.wait_until_finished()
    self.best.wait_until_finished()

  def close(self) -> None:
    self.last.close()
    self.best.close()
