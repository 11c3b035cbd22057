"""Orbax checkpoints of a training run: the last ``keep`` and the best by val mean IU.

A checkpoint holds the :class:`~fcnjax.train.step.TrainState` (params, dropout RNG / BatchNorm
state, optimizer state, step), the data iterator's state (so the next batch is the one an
uninterrupted run would see), the run's config and the model's description. Layout::

    WORKDIR/checkpoints/<step>/{state,meta}   every ``save_every`` steps and after each eval
    WORKDIR/best/<step>/{state,meta}          the best val mean IU so far (one kept)

Orbax writes each step to a temporary directory and renames it when complete, so a run killed
mid-save leaves the previous checkpoint intact. Saves are synchronous: a save that fails (disk
full, permissions) raises :class:`CheckpointSaveError` at that save, naming the step, the folder
and the intact earlier steps; nothing is left running in the background.

Damage versus mismatch: every checkpoint's ``meta`` records ``state_spec`` (each state array's
path, shape and dtype). :meth:`Checkpointer.restore_intact` walks back from the newest step: a
checkpoint whose meta cannot be read, or whose arrays cannot be read although their spec matches,
is *damaged* - it is moved to ``WORKDIR/damaged_checkpoints/<step>`` with a warning and the next
older one is tried; a readable checkpoint written for another model (its model description or
state spec differs) raises :class:`CheckpointMismatch` naming the difference.
"""

from __future__ import annotations

import logging
import pathlib
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger("fcnjax.train")
DAMAGED_DIR = "damaged_checkpoints"
"""Where damaged checkpoints are moved (``WORKDIR/damaged_checkpoints/<step>``)."""


class CheckpointMismatch(ValueError):
  """A checkpoint was written for a different model or run than the one requested."""


class CheckpointDamaged(ValueError):
  """A checkpoint's files cannot be read (truncated, deleted, garbage)."""


class CheckpointSaveError(OSError):
  """Writing a checkpoint failed (disk full, permissions, ...); earlier checkpoints are intact."""


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


def state_spec(state) -> dict:
  """``{array path: [shape, dtype]}`` of a state as stored (PRNG keys as their raw data)."""
  flat, _ = jax.tree_util.tree_flatten_with_path(to_saveable(state))
  return {jax.tree_util.keystr(k): [list(map(int, x.shape)), str(np.dtype(x.dtype))]
          for k, x in flat}


def describe_spec_mismatch(saved: dict, wanted: dict, limit: int = 4) -> str | None:
  """Which state arrays differ between two :func:`state_spec` s (None when equal)."""
  if saved == wanted:
    return None
  only_saved = sorted(set(saved) - set(wanted))
  only_wanted = sorted(set(wanted) - set(saved))
  changed = [k for k in sorted(set(saved) & set(wanted)) if saved[k] != wanted[k]]
  parts = []
  if changed:
    parts.append("shapes differ for " + ", ".join(
        f"{k} (checkpoint {tuple(saved[k][0])} {saved[k][1]}, requested {tuple(wanted[k][0])} "
        f"{wanted[k][1]})" for k in changed[:limit]) + (f" and {len(changed) - limit} more"
                                                        if len(changed) > limit else ""))
  if only_saved:
    parts.append(f"{len(only_saved)} arrays only in the checkpoint (e.g. {only_saved[0]})")
  if only_wanted:
    parts.append(f"{len(only_wanted)} arrays only in the requested state (e.g. "
                 f"{only_wanted[0]}): another optimizer or model?")
  return "; ".join(parts)


def _first_line(e: BaseException, n: int = 240) -> str:
  """One readable line of an error (tensorstore's long spec dumps cut off)."""
  text = " ".join(str(e).split()) or type(e).__name__
  for cut in (" See full TensorStore details", " [tensorstore_spec"):
    text = text.split(cut)[0]
  return text[:n] + ("..." if len(text) > n else "")


class Checkpointer:
  """The run's checkpoint managers (``last``: keep ``keep``; ``best``: keep 1 by the eval
  metric ``best_metric``: val mean IU for segmentation, ``top1`` accuracy for a classifier).

  Saves are synchronous (``async_save=True`` overlaps them with training, at the price of a
  failure being noticed one save late).
  """

  def __init__(self, workdir, *, keep: int = 3, async_save: bool = False,
               best_metric: str = "mean_iu"):
    self.workdir = pathlib.Path(workdir).absolute()
    self.keep, self.async_save, self.best_metric = keep, async_save, best_metric
    self._open()

  def _open(self):
    opts = dict(enable_async_checkpointing=self.async_save, create=True)
    self.last = ocp.CheckpointManager(
        self.workdir / "checkpoints",
        options=ocp.CheckpointManagerOptions(max_to_keep=self.keep, **opts))
    self.best = ocp.CheckpointManager(
        self.workdir / "best", options=ocp.CheckpointManagerOptions(
            max_to_keep=1, best_fn=lambda m: m.get("score", m.get("mean_iu")),
            best_mode="max", **opts))

  def latest_step(self) -> int | None:
    return self.last.latest_step()

  def all_steps(self) -> list:
    return sorted(self.last.all_steps())

  def _save(self, mngr, step, state, meta, metrics=None):
    meta = {**meta, "state_spec": state_spec(state)}
    args = ocp.args.Composite(state=ocp.args.StandardSave(to_saveable(state)),
                              meta=ocp.args.JsonSave(meta))
    try:
      mngr.save(step, args=args, force=True, metrics=metrics)
      mngr.wait_until_finished()
    except Exception as e:  # noqa: BLE001 - tensorstore / OS errors of every kind
      self._remove_temporaries(mngr)
      intact = [s for s in sorted(mngr.all_steps(read=True)) if s != step]
      what = "best checkpoint" if mngr is self.best else "checkpoint"
      raise CheckpointSaveError(
          f"saving {what} {step} to {mngr.directory} failed: {_first_line(e)}; "
          + (f"the earlier checkpoints ({', '.join(map(str, intact))}) are intact"
             if intact else "there is no earlier checkpoint in it")) from e

  @staticmethod
  def _remove_temporaries(mngr):
    """Delete the half-written step folders a failed save leaves (they only take space)."""
    d = pathlib.Path(mngr.directory)
    for p in d.glob("*orbax-checkpoint-tmp*") if d.is_dir() else ():
      shutil.rmtree(p, ignore_errors=True)

  def save(self, step: int, state, meta: dict) -> None:
    """Save ``step`` to ``last`` (raises :class:`CheckpointSaveError` if it fails)."""
    self._save(self.last, step, state, meta)

  def save_best(self, step: int, state, meta: dict, eval_metrics: dict) -> None:
    """Save to ``best`` when ``eval_metrics`` has a finite ``best_metric`` (kept if the best)."""
    miu = eval_metrics.get(self.best_metric)
    if step in self.best.all_steps():  # a resumed run re-evaluating a step it already kept
      return
    if miu is not None and np.isfinite(miu):
      self._save(self.best, step, state, meta, metrics={"score": float(miu),
                                                               self.best_metric: float(miu)})

  def read_meta(self, step: int | None = None, *, best: bool = False) -> dict:
    """The stored meta of ``step`` (default latest); :class:`CheckpointDamaged` if unreadable."""
    mngr = self.best if best else self.last
    step = mngr.latest_step() if step is None else step
    try:
      meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:  # noqa: BLE001 - missing file, bad JSON, ...
      raise CheckpointDamaged(f"checkpoint {mngr.directory}/{step}: cannot read its meta "
                              f"({_first_line(e)})") from e
    if not isinstance(meta, dict):
      raise CheckpointDamaged(f"checkpoint {mngr.directory}/{step}: its meta is not a dict")
    return meta

  def restore(self, like_state, *, model_description: dict, step: int | None = None,
              best: bool = False):
    """(state, meta) of ``step`` (default latest), shaped and sharded like ``like_state``.

    Raises :class:`CheckpointMismatch` naming the difference if the checkpoint was written for
    another model (architecture, number of classes, width, optimizer, ...), and
    :class:`CheckpointDamaged` if its files cannot be read.
    """
    mngr = self.best if best else self.last
    step = mngr.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {mngr.directory}")
    where = f"checkpoint {mngr.directory}/{step}"
    meta = self.read_meta(step, best=best)
    diff = describe_mismatch(meta.get("model", {}), model_description)
    if diff:
      raise CheckpointMismatch(f"{where} does not match the requested model: {diff}")
    saved_spec = meta.get("state_spec")
    if saved_spec is not None:
      diff = describe_spec_mismatch(saved_spec, state_spec(like_state))
      if diff:
        raise CheckpointMismatch(f"{where} does not fit the requested model/optimizer: {diff}")
    try:
      restored = mngr.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(_abstract(like_state))))["state"]
    except Exception as e:  # noqa: BLE001
      if saved_spec is None:  # an older checkpoint: cannot tell damage from mismatch
        raise CheckpointMismatch(
            f"{where} does not fit the requested model/optimizer, or is damaged: "
            f"{_first_line(e)}") from e
      raise CheckpointDamaged(f"{where}: cannot read its arrays ({_first_line(e)})") from e
    return from_saveable(restored, like_state), meta

  def restore_intact(self, like_state, *, model_description: dict, warn=None):
    """(state, meta) of the newest checkpoint that can be read, walking back over damaged ones.

    A damaged checkpoint is moved to ``WORKDIR/damaged_checkpoints/<step>`` and ``warn`` (a
    print function; default: the ``fcnjax.train`` logger) is called with one line naming it.
    Raises :class:`CheckpointMismatch` at the first readable checkpoint of another model, and
    :class:`CheckpointDamaged` when every checkpoint is damaged.
    """
    warn = warn or log.warning
    damaged = []
    for step in sorted(self.last.all_steps(), reverse=True):
      try:
        return self.restore(like_state, model_description=model_description, step=step)
      except CheckpointDamaged as e:
        moved = self._quarantine(step)
        damaged.append(step)
        warn(f"warning: {e}; moved it to {moved} and trying the previous checkpoint")
    raise CheckpointDamaged(
        f"every checkpoint in {self.last.directory} is damaged (steps "
        f"{', '.join(map(str, damaged))}, moved to {self.workdir / DAMAGED_DIR}): start the run "
        "again without --resume in a new --workdir")

  def _quarantine(self, step: int) -> pathlib.Path:
    """Move ``checkpoints/<step>`` out of orbax's sight; reopen the managers."""
    src = pathlib.Path(self.last.directory) / str(step)
    dst_dir = self.workdir / DAMAGED_DIR
    dst_dir.mkdir(exist_ok=True)
    dst = dst_dir / str(step)
    n = 1
    while dst.exists():
      dst, n = dst_dir / f"{step}.{n}", n + 1
    self.close()
    shutil.move(str(src), str(dst))
    self._open()
    return dst

  def wait(self) -> None:
    self.last.wait_until_finished()
    self.best.wait_until_finished()

  def close(self) -> None:
    self.last.close()
    self.best.close()
