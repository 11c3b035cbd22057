"""The Grain input pipeline: per-epoch bucket plans turned into padded batches.

What the training loop uses::

    from fcnjax.data import readers, pipeline, augment
    train_src = readers.voc_source(root, "train"); val_src = readers.voc_source(root, "val")
    train = pipeline.make_train_loader(train_src, batch_size=8, num_devices=jax.device_count(),
                                       seed=0, num_epochs=50, max_buckets=8,
                                       augment=augment.Augment(flip=True, scale_range=(0.5, 2.0)))
    it = iter(train)                       # grain DatasetIterator over all epochs
    for step, batch in enumerate(it): ... # it.get_state() -> {"next_batch": n, ...}; set_state
    train.bucket_shapes                    # [(H, W), ...]: one train-step compile each
    train.batches_per_epoch, len(train)    # per-epoch batch counts, total batches
    train.epoch_and_batch(step)            # which epoch / batch-in-epoch a global step is
    print(train.report())                  # bucket plan, waste, batch sizes
    val = pipeline.make_eval_loader(val_src, batch_size=8, num_devices=jax.device_count())
    for batch in val: ...                  # every val image exactly once; dummies have mask False

A batch is a dict of numpy arrays, H x W = its bucket's shape, B = the bucket's batch size (divided
by ``process_count`` on each host):
  * ``"image"`` (B, H, W, 3) float32: ``preprocessing.fn(rgb uint8)`` (default
    :data:`fcnjax.preprocessing.CAFFE`), then zero-padded at the bottom/right (padding is exactly 0).
  * ``"label"`` (B, H, W) uint8: class indices, 255 (ignore) on void pixels and all padding.
  * ``"mask"`` (B, H, W) bool: True on the real image's pixels (False on padding, dummies, and
    examples that failed to decode under ``on_error="skip"``).
  * ``"index"`` (B,) int32: the example's index in the source, -1 for dummy (padding) examples.

Per-epoch plan (pure function of (seed, epoch), see :func:`make_epoch_plan`): draw augmentation
(the scale decides each image's size), assign each image to the smallest bucket that holds it,
shuffle within buckets, cut into batches, shuffle the batch order. Every image appears exactly once
per epoch with ``remainder="pad"`` (the last partial batch of each bucket is filled with masked
dummies; always so for evaluation). ``remainder="drop"`` drops it; ``"fill"`` fills it with other
images of the same bucket drawn at random (those appear twice, unmasked).

Buckets: planned (``max_buckets``, ``granularity``) on the sizes the images can take, i.e. with
scale augmentation on the sizes at a grid of scales up to the largest, so no image is resized down
(see :mod:`fcnjax.data.augment`); with your own smaller ``bucket_shapes`` a training image that fits
none is scaled down to fit the largest, while evaluation refuses (it never resizes). Set
``granularity=32`` for models whose input must be a multiple of 32.

Bad files: with a source opened ``on_error="skip"``, an example whose pixels cannot be decoded comes
out with mask False and label 255 (so the epoch goes on); with ``num_workers > 0`` the warning is
logged by the worker process. Open sources with ``validate="full"`` to find those up front.

Multi-host: every process computes the same global plan; process p loads rows
[p*B/P, (p+1)*B/P) of each batch. Give ``num_devices=jax.device_count()`` (global),
``process_index=jax.process_index()``, ``process_count=jax.process_count()``, then
``jax.make_array_from_process_local_data(sharding, batch[k])``.

Workers: ``num_workers > 0`` decodes in grain ``mp_prefetch`` worker processes (spawned: the main
script needs an ``if __name__ == "__main__":`` guard); the batches are identical to
``num_workers=0`` and are copied out of shared memory before they reach you. Checkpointing: the
iterator's ``get_state()`` is ``{"next_batch": n, <loader fingerprint>}`` (JSON-able, independent of
``num_workers``; ``set_state`` raises if the fingerprint - seed, bucket shapes, ... - differs);
``set_state`` on a fresh iterator of a loader built with the same arguments (any number of workers)
continues with exactly the batches an uninterrupted run would give. To resume at epoch e with a
loader built for later epochs only, pass ``start_epoch=e`` and ``next_batch`` = batches already done
in epoch e. Batch n of a loader does not depend on ``num_epochs``, so a run may be resumed with
a loader built for more (or fewer) epochs. (Python < 3.13 may warn at exit that the resource_tracker sees "leaked shared_memory
objects" after a run with workers: a known double-registration false alarm; grain unlinks the
segments and /dev/shm is left empty.)
"""

from __future__ import annotations

import dataclasses
import sys

import grain
import numpy as np

from fcnjax import preprocessing as preprocessing_lib
from fcnjax.data import augment as augment_lib
from fcnjax.data import buckets as buckets_lib
from fcnjax.data.palette import IGNORE

REMAINDER = ("pad", "drop", "fill")


@dataclasses.dataclass(frozen=True)
class EpochPlan:
  """One epoch's batches. ``bucket`` (num_batches,) bucket index per batch; ``rows`` list of
  (B_bucket,) int64 example indices (-1 = dummy); ``out_sizes`` (N, 2) each example's (h, w) after
  scaling; ``aug`` the epoch's :class:`~fcnjax.data.augment.AugmentParams`."""

  bucket: np.ndarray
  rows: list
  out_sizes: np.ndarray
  aug: augment_lib.AugmentParams

  def __len__(self):
    return len(self.rows)


def make_epoch_plan(sizes, bucket_shapes, batch_sizes, *, seed: int, epoch: int,
                    shuffle: bool = True, augment: augment_lib.Augment | None = None,
                    remainder: str = "pad") -> EpochPlan:
  """Deterministic batch plan for one epoch (see module docstring).

  ``sizes`` (N, 2) (h, w) of the source images; ``bucket_shapes`` (K, 2); ``batch_sizes`` (K,).
  Without ``shuffle`` batches come bucket by bucket, images in index order.
  """
  if remainder not in REMAINDER:
    raise ValueError(f"remainder must be one of {REMAINDER}, got {remainder!r}")
  sizes = np.asarray(sizes, np.int64).reshape(-1, 2)
  shapes = np.asarray(bucket_shapes, np.int64).reshape(-1, 2)
  n = len(sizes)
  params = augment_lib.draw_params(augment, seed, epoch, n)
  out = augment_lib.fit_sizes(augment_lib.scaled_sizes(sizes, params.scale), shapes)
  which = buckets_lib.assign_buckets(out, shapes)
  rng = np.random.default_rng((int(seed), int(epoch), 1))
  batches, bucket_of = [], []
  for k in range(len(shapes)):
    idx = np.flatnonzero(which == k)
    if shuffle:
      idx = rng.permutation(idx)
    bs = int(batch_sizes[k])
    for start in range(0, len(idx), bs):
      rows = idx[start:start + bs]
      if len(rows) < bs:
        if remainder == "drop":
          continue
        if remainder == "fill":
          rows = np.concatenate([rows, rng.choice(idx, bs - len(rows), replace=len(idx) < bs)])
        else:
          rows = np.concatenate([rows, np.full(bs - len(rows), -1, np.int64)])
      batches.append(rows.astype(np.int64))
      bucket_of.append(k)
  order = rng.permutation(len(batches)) if shuffle else np.arange(len(batches))
  return EpochPlan(np.asarray(bucket_of, np.int64)[order], [batches[i] for i in order], out, params)


class LoadBatch:
  """Grain transform: global batch number -> this process's rows of that batch (a dict).

  Picklable (sent to worker processes); each process re-derives the epoch plans it needs.
  """

  def __init__(self, source, bucket_shapes, batch_sizes, epoch_starts, *, seed, start_epoch,
               shuffle, augment, remainder, preprocessing, process_index, process_count):
    self.source = source
    self.shapes = np.asarray(bucket_shapes, np.int64)
    self.batch_sizes = np.asarray(batch_sizes, np.int64)
    self.epoch_starts = np.asarray(epoch_starts, np.int64)
    self.seed, self.start_epoch, self.shuffle = seed, start_epoch, shuffle
    self.augment, self.remainder, self.preprocessing = augment, remainder, preprocessing
    self.process_index, self.process_count = process_index, process_count
    self._plans = {}

  def plan(self, epoch: int) -> EpochPlan:
    """The epoch's plan (cached; safe with grain's reader threads: dict ops are atomic)."""
    plan = self._plans.get(epoch)
    if plan is None:
      plan = make_epoch_plan(
          self.source.sizes, self.shapes, self.batch_sizes, seed=self.seed, epoch=epoch,
          shuffle=self.shuffle, augment=self.augment, remainder=self.remainder)
      try:
        while len(self._plans) >= 3:
          self._plans.pop(min(self._plans), None)
      except (RuntimeError, ValueError):  # another thread changed the cache meanwhile
        pass
      self._plans[epoch] = plan
    return plan

  def locate(self, i: int) -> tuple:
    """Global batch number -> (epoch, batch number within that epoch)."""
    e = int(np.searchsorted(self.epoch_starts, i, side="right")) - 1
    return self.start_epoch + e, int(i - self.epoch_starts[e])

  def __call__(self, i):
    epoch, b = self.locate(int(i))
    plan = self.plan(epoch)
    rows = plan.rows[b]
    per = len(rows) // self.process_count
    rows = rows[self.process_index * per:(self.process_index + 1) * per]
    H, W = (int(v) for v in self.shapes[plan.bucket[b]])
    out = {"image": np.zeros((len(rows), H, W, 3), np.float32),
           "label": np.full((len(rows), H, W), IGNORE, np.uint8),
           "mask": np.zeros((len(rows), H, W), bool),
           "index": rows.astype(np.int32)}
    for r, idx in enumerate(rows):
      if idx < 0:
        continue
      ex = self.source[int(idx)]
      image, label = augment_lib.apply(ex["image"], ex["label"], plan.out_sizes[idx],
                                       bool(plan.aug.flip[idx]), plan.aug.jitter[idx])
      h, w = label.shape
      out["image"][r, :h, :w] = self.preprocessing(image)
      out["label"][r, :h, :w] = label
      out["mask"][r, :h, :w] = ex.get("valid", True)
    return out


def _copy_batch(batch):
  """Own copies of the arrays (worker output lives in shared memory that grain recycles)."""
  return {k: np.array(v, copy=True) for k, v in batch.items()}


def _ensure_absl_flags():
  try:
    from absl import flags
  except ImportError:  # grain depends on absl; be tolerant anyway
    return
  if not flags.FLAGS.is_parsed():
    flags.FLAGS(sys.argv[:1], known_only=True)


def _worker_ignores_stop_signals(worker_index: int, worker_count: int) -> None:
  """Grain workers ignore SIGINT / SIGTERM: a Ctrl-C reaches the whole process group, and the
  main process decides (it finishes its step, saves, then closes the workers)."""
  import signal
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  signal.signal(signal.SIGTERM, signal.SIG_IGN)


class LoaderIterator(grain.DatasetIterator):
  """A grain ``DatasetIterator`` over a :class:`Loader`'s batches.

  ``get_state()`` is ``{"next_batch": n, ...}`` (n = batches returned so far, counted from the
  loader's ``start_epoch``), the same whatever ``num_workers`` is, so a run checkpointed with N
  workers resumes with M. The other keys (seed, start_epoch, number of examples, bucket shapes,
  batch sizes) are checked by ``set_state``: restoring into a loader that would give other batches
  raises ValueError; a bare ``{"next_batch": n}`` is accepted. ``set_state`` (re)starts the grain pipeline at that batch; the worker processes
  start lazily at the first ``next``. Works with ``grain.checkpoint.CheckpointSave/Restore``.
  """

  def __init__(self, loader, next_batch: int = 0):
    super().__init__()
    self._loader = loader
    self._next = int(next_batch)
    self._inner = None

  def __next__(self):
    if self._closed:
      raise ValueError("iterator is closed")
    if self._inner is None:
      self._inner = iter(self._loader.dataset_from(self._next))
    try:
      batch = next(self._inner)
    except StopIteration:
      self._close_inner()  # stops worker processes, frees shared memory
      raise
    self._next += 1
    return batch

  def get_state(self) -> dict:
    return {"next_batch": self._next, **self._loader.fingerprint()}

  def set_state(self, state: dict) -> None:
    mine = self._loader.fingerprint()
    diff = {k: (state[k], mine[k]) for k in mine if k in state and state[k] != mine[k]}
    if diff:
      raise ValueError(f"data state is from a different loader (saved vs this one): {diff}")
    n = int(state["next_batch"])
    if not 0 <= n <= len(self._loader):
      raise ValueError(f"state {state} is outside this loader's {len(self._loader)} batches")
    self._close_inner()
    self._next = n

  def _close_inner(self):
    if self._inner is not None:
      self._inner.close()
      self._inner = None

  def close(self) -> None:
    self._close_inner()
    super().close()


@dataclasses.dataclass
class Loader:
  """Batches of one dataset over some epochs, plus what the training loop needs to know.

  ``iter(loader)``: a :class:`LoaderIterator` (``get_state()``/``set_state()``).
  ``bucket_shapes``: list of (H, W); ``batch_sizes``: global batch size per bucket;
  ``local_batch_sizes``: rows per process; ``batches_per_epoch``: list, one per epoch;
  ``len(loader)``: total batches; ``plan``: the :class:`~fcnjax.data.buckets.BucketPlan`;
  ``dataset_from(n)``: the underlying grain ``IterDataset`` starting at batch n.
  """

  bucket_shapes: list
  batch_sizes: list
  local_batch_sizes: list
  batches_per_epoch: list
  start_epoch: int
  plan: buckets_lib.BucketPlan
  load: LoadBatch
  num_workers: int = 0
  num_threads: int = 2
  prefetch_batches: int = 2

  def __iter__(self) -> LoaderIterator:
    return LoaderIterator(self)

  def __len__(self):
    return int(sum(self.batches_per_epoch))

  def fingerprint(self) -> dict:
    """What a saved iterator state must agree on to mean the same batches (JSON-able)."""
    return {"seed": int(self.load.seed), "start_epoch": int(self.start_epoch),
            "num_examples": int(len(self.load.source)),
            "bucket_shapes": [list(s) for s in self.bucket_shapes],
            "batch_sizes": [int(b) for b in self.batch_sizes]}

  def dataset_from(self, next_batch: int = 0) -> grain.IterDataset:
    """The grain pipeline for batches ``next_batch .. len(self) - 1``."""
    ds = grain.MapDataset.range(int(next_batch), len(self)).map(self.load)
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=max(1, self.num_threads),
                                              prefetch_buffer_size=max(1, self.prefetch_batches)))
    if self.num_workers > 0:
      _ensure_absl_flags()
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(
          num_workers=self.num_workers, per_worker_buffer_size=self.prefetch_batches),
          worker_init_fn=_worker_ignores_stop_signals)
      ds = ds.map(_copy_batch)
    return ds

  def epoch_and_batch(self, step: int) -> tuple:
    """Global step (batch number since ``start_epoch``) -> (epoch, batch within the epoch)."""
    return self.load.locate(step)

  def padded_fraction(self, epoch: int | None = None) -> float:
    """Fraction of this epoch's batch pixels (all rows, all processes) that are not real image
    pixels: bucket padding plus dummy rows. ``epoch`` defaults to ``start_epoch``."""
    plan = self.load.plan(self.start_epoch if epoch is None else epoch)
    shapes = np.asarray(self.bucket_shapes, np.int64)
    total = sum(len(r) * shapes[b].prod() for r, b in zip(plan.rows, plan.bucket))
    real = sum(plan.out_sizes[r[r >= 0]].prod(1).sum() for r in plan.rows)
    return float(1.0 - real / total)

  def report(self) -> str:
    lines = [self.plan.report().splitlines()[0]]
    for (h, w), bs, c in zip(self.bucket_shapes, self.batch_sizes, self.plan.counts):
      lines.append(f"  {h:5d} x {w:<5d} batch {bs:4d}  ({int(c)} planned images)")
    n = len(self.batches_per_epoch)
    lines.append(f"{len(self)} batches over {n} epoch(s) from epoch {self.start_epoch} "
                 f"({min(self.batches_per_epoch)}-{max(self.batches_per_epoch)} per epoch); "
                 f"epoch {self.start_epoch}: {100 * self.padded_fraction():.2f}% of batch pixels "
                 f"are padding or dummy rows")
    return "\n".join(lines)


def make_loader(source, *, seed: int = 0, num_epochs: int = 1, start_epoch: int = 0,
                shuffle: bool = True, augment: augment_lib.Augment | None = None,
                remainder: str = "pad", bucket_shapes=None, max_buckets=8, granularity: int = 1,
                batch_size: int | None = None, pixels_per_batch: int | None = None,
                num_devices: int = 1, process_index: int = 0, process_count: int = 1,
                preprocessing=preprocessing_lib.CAFFE, num_workers: int = 0,
                num_threads: int = 2, prefetch_batches: int = 2,
                plan_kwargs: dict | None = None, resize_to_fit: bool = True,
                max_batch_sizes=None) -> Loader:
  """Batches of ``source`` for epochs ``start_epoch .. start_epoch + num_epochs - 1``.

  Buckets: ``bucket_shapes`` [(H, W), ...] if given, else planned with
  :func:`~fcnjax.data.buckets.plan_buckets` (``max_buckets`` int or "auto", ``granularity``,
  ``plan_kwargs`` for the auto cost model) on the source sizes at the scales ``augment`` can draw.
  Batch sizes: ``batch_size`` (fixed) or ``pixels_per_batch`` (per bucket), multiples of
  ``num_devices`` (global device count) and of ``process_count``, each capped by
  ``max_batch_sizes`` if given (one cap per bucket in ``bucket_shapes`` order - sorted by area -
  or a mapping (H, W) -> cap; see :func:`~fcnjax.data.buckets.batch_sizes`; e.g. the batch sizes
  of a :func:`fcnjax.train.memory.plan_batch_sizes` plan). Images too large for every
  given bucket are scaled down to fit the largest (``resize_to_fit``; evaluation raises instead).
  Workers: ``num_workers`` grain worker processes, ``num_threads`` reading threads per process,
  ``prefetch_batches`` batches buffered per worker/thread pool.
  """
  if batch_size is None and pixels_per_batch is None:
    batch_size = num_devices
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  sizes = source.sizes
  plan_sizes = augment_lib.planning_sizes(sizes, augment)
  if bucket_shapes is None:
    kw = dict(plan_kwargs or {})
    if max_buckets == "auto" and len(plan_sizes) != len(sizes):
      # sizes at several scales, of which an epoch draws one per image: auto's cost model
      # must count one epoch's pixels, not every scale's
      kw.setdefault("weights", np.full(len(plan_sizes), len(sizes) / len(plan_sizes)))
    plan = buckets_lib.plan_buckets(plan_sizes, max_buckets, granularity=granularity, **kw)
  else:
    shapes = buckets_lib.sort_shapes(bucket_shapes)
    if not resize_to_fit and (buckets_lib.assign_buckets(plan_sizes, shapes) < 0).any():
      raise ValueError(f"some images are larger than every bucket of {shapes.tolist()}; "
                       f"evaluation never resizes: give larger bucket_shapes")
    fitted = augment_lib.fit_sizes(plan_sizes, shapes)
    b = buckets_lib.assign_buckets(fitted, shapes)
    plan = buckets_lib.BucketPlan(shapes, np.bincount(b, minlength=len(shapes)),
                                  int((fitted[:, 0] * fitted[:, 1]).sum()),
                                  int((shapes[b, 0] * shapes[b, 1]).sum()), granularity)
  shapes = plan.shapes
  bsz = buckets_lib.batch_sizes(shapes, batch_size=batch_size, pixels_per_batch=pixels_per_batch,
                                num_devices=num_devices, max_batch_sizes=max_batch_sizes)
  if (bsz % process_count).any():
    raise ValueError(f"batch sizes {bsz.tolist()} not divisible by process_count {process_count}")
  counts = [len(make_epoch_plan(sizes, shapes, bsz, seed=seed, epoch=e, shuffle=shuffle,
                                augment=augment, remainder=remainder))
            for e in range(start_epoch, start_epoch + num_epochs)]
  starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
  load = LoadBatch(source, shapes, bsz, starts, seed=seed, start_epoch=start_epoch,
                   shuffle=shuffle, augment=augment, remainder=remainder,
                   preprocessing=preprocessing, process_index=process_index,
                   process_count=process_count)
  return Loader(plan.shape_list, bsz.tolist(), (bsz // process_count).tolist(), counts,
                start_epoch, plan, load, num_workers, num_threads, prefetch_batches)


def make_train_loader(source, *, seed: int = 0, num_epochs: int = 1, start_epoch: int = 0,
                      augment: augment_lib.Augment | None = augment_lib.Augment(),
                      remainder: str = "pad", **kw) -> Loader:
  """Shuffled, augmented batches over ``num_epochs`` epochs (see :func:`make_loader`; ``**kw``
  includes ``max_batch_sizes``)."""
  return make_loader(source, seed=seed, num_epochs=num_epochs, start_epoch=start_epoch,
                     shuffle=True, augment=augment, remainder=remainder, **kw)


def make_eval_loader(source, **kw) -> Loader:
  """One pass over ``source``, no augmentation, bucket by bucket in index order, every image
  exactly once (partial batches padded with dummies: ``index`` -1, ``mask`` False). ``**kw``:
  :func:`make_loader`'s other arguments, ``max_batch_sizes`` included."""
  for k in ("augment", "remainder", "shuffle", "num_epochs", "start_epoch", "resize_to_fit"):
    if k in kw:
      raise TypeError(f"make_eval_loader does not take {k!r}")
  return make_loader(source, seed=0, num_epochs=1, shuffle=False, augment=None,
                     remainder="pad", resize_to_fit=False, **kw)
