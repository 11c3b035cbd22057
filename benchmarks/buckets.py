"""Batching strategies for variable-size images, timed with the project's real train step.

    python -m benchmarks.buckets [--sizes SIZES.csv | --root VOC_ROOT] [--split train]
        [--model fcn8s] [--width-multiplier 1] [--aligned] [--batch-size 8 | --pixels-per-batch N]
        [--precision fp32|bf16] [--devices 1] [--scale 1.0] [--epochs 50] [--sample-shapes 6]
        [--steps 3] [--ks 2,4,8,16,auto] [--out benchmarks/results/buckets-DATE.json] [--quick]
        [--cost-profile PROFILE.json]
    python -m benchmarks.buckets --calibrate [--calibrate-shapes 4] [--profile-out FILE]
        [the model / precision / devices / batching / sizes flags above]

Images are synthetic random tensors of the real sizes (only the timing matters); every step is
:func:`fcnjax.train.step.make_train_step` with the run's real optimizer (SGD-momentum, poly).
Strategies, each planned over one epoch of the size distribution:

1. ``exact``: every image at its own shape, batch 1 (pytorch-fcn); one compile per distinct shape.
2. ``random-pad``: random batches, each padded to its own max (Keras-style); ~one shape per batch.
3. ``global-max``: everything padded to the largest (H, W); one compile, most padding.
4. ``crop``: a random fixed crop (320 x 480 times ``--scale``, d2l); smaller images are dropped.
5. ``buckets-K``: :func:`fcnjax.data.buckets.plan_buckets` with K buckets (and ``auto``), batches
   from :func:`fcnjax.data.pipeline.make_epoch_plan`.

Each strategy gets a freshly jitted train step, so its XLA compiles are its own; they are counted
from JAX's ``/jax/core/compile/backend_compile_duration`` events whose ``fun_name`` is the train
step's. When a strategy has more distinct batch shapes than ``--sample-shapes``, a stratified
random sample is measured (one shape per equal-size stratum of padded pixels); the other shapes'
step times come from a linear fit ``step_s = a + b * pixels`` over every measured shape (pixels =
B * H * W after the model's own alignment), and their compile times from the strategy's mean
measured compile time. Output: markdown on stdout, JSON (``--out``), a PNG chart next to it.
The ``auto`` strategy uses the costs measured by this run, or those of ``--cost-profile FILE``
(a :class:`fcnjax.data.bucket_costs.CostProfile`, e.g. one written by ``--calibrate``).

``--calibrate`` measures a cost profile instead (:func:`calibrate`): for ``--calibrate-shapes``
bucket shapes spread over the size distribution (:func:`calibration_shapes`), the cold compile
(empty persistent compilation cache), the warm compile (after ``jax.clear_caches()``, the same
program loaded from that cache) and the step time of the real train step; ``s_per_pixel`` is the
least-squares slope of step time vs model pixels. Writes the profile JSON (``--profile-out``,
default ``benchmarks/results/cost-profile-<backend>-<date>.json``) and prints a table.

Units: seconds (s), pixels (px), Mpx/s = 1e6 real (non-padding) pixels per second.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

from fcnjax.data import bucket_costs
from fcnjax.data import buckets as buckets_lib

VOC_CROP = (320, 480)
"""d2l's random crop (height, width) for VOC, in pixels at scale 1."""
STRATEGY_NOTES = {
    "exact": "exact shape, batch 1 per device (pytorch-fcn)",
    "random-pad": "random batches padded to their own max (Keras)",
    "global-max": "everything padded to the global max",
    "crop": "random fixed crop, smaller images dropped (d2l)",
}


# ---------------------------------------------------------------------------------------------
# Size distributions
# ---------------------------------------------------------------------------------------------
def default_sizes_csv() -> pathlib.Path:
  """The VOC 2012 segmentation size table shipped with the package."""
  import fcnjax.data
  return pathlib.Path(fcnjax.data.__file__).parent / "voc2012_seg_sizes.csv"


def load_sizes(csv=None, root=None, splits=("train",)) -> np.ndarray:
  """(N, 2) int64 (height, width) px from a ``split,image_id,width,height`` CSV or a dataset root."""
  if root is not None:
    from fcnjax.data import readers
    return np.concatenate([readers.open_source(root, s).sizes for s in splits]).astype(np.int64)
  from fcnjax.data.stats import read_sizes_csv
  path = csv or default_sizes_csv()
  sizes = read_sizes_csv(path, list(splits))
  if len(sizes) == 0:
    raise ValueError(f"{path}: no rows for splits {list(splits)}")
  return sizes


def scale_sizes(sizes, scale: float) -> np.ndarray:
  """Sizes times ``scale``, rounded, at least 1 px."""
  return np.maximum(np.rint(np.asarray(sizes, np.float64) * scale), 1).astype(np.int64)


# ---------------------------------------------------------------------------------------------
# Epoch batch plans (pure numpy)
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class EpochBatches:
  """One epoch of one strategy: batch ``shapes`` (M, 3) int64 (B, H, W) px, per batch the real
  (non-padding) ``pixels`` (M,), real ``images`` (M,), and ``rows``: a list of (B, 2) int64 real
  (h, w) of each example inside the batch, (0, 0) for dummies."""

  shapes: np.ndarray
  pixels: np.ndarray
  images: np.ndarray
  rows: list

  @property
  def padded_pixels(self) -> np.ndarray:
    return self.shapes.prod(axis=1)


def batches_from_rows(row_sizes: list, hw: list) -> EpochBatches:
  """``row_sizes``: per batch (B, 2) real (h, w) (0 for dummies); ``hw``: per batch (H, W)."""
  shapes = np.array([(len(r), h, w) for r, (h, w) in zip(row_sizes, hw)], np.int64).reshape(-1, 3)
  pixels = np.array([int((r[:, 0] * r[:, 1]).sum()) for r in row_sizes], np.int64)
  images = np.array([int((r[:, 0] > 0).sum()) for r in row_sizes], np.int64)
  return EpochBatches(shapes, pixels, images, [np.asarray(r, np.int64) for r in row_sizes])


def _chunk(idx: np.ndarray, bs: int) -> list:
  """Consecutive chunks of ``bs`` indices; the last is filled with -1 (dummies)."""
  out = []
  for s in range(0, len(idx), bs):
    rows = idx[s:s + bs]
    out.append(np.concatenate([rows, np.full(bs - len(rows), -1, np.int64)]))
  return out


def _rows(sizes, idx) -> np.ndarray:
  """(B, 2) sizes of indices ``idx`` with (0, 0) for -1."""
  idx = np.asarray(idx, np.int64)
  return np.where(idx[:, None] >= 0, sizes[np.maximum(idx, 0)], 0)


def plan_exact(sizes, *, num_devices: int = 1, seed: int = 0, epoch: int = 0) -> EpochBatches:
  """Each image at its own shape; batch = ``num_devices`` images of one shape (1 per device)."""
  rng = np.random.default_rng((seed, epoch, 11))
  shapes, inv = np.unique(sizes, axis=0, return_inverse=True)
  batches = []
  for k in range(len(shapes)):
    batches += _chunk(rng.permutation(np.flatnonzero(inv.ravel() == k)), num_devices)
  batches = [batches[i] for i in rng.permutation(len(batches))]
  return batches_from_rows([_rows(sizes, b) for b in batches],
                           [tuple(sizes[b[0]]) for b in batches])


def plan_random_pad(sizes, batch_size: int, *, seed: int = 0, epoch: int = 0) -> EpochBatches:
  """Random batches of ``batch_size``, each padded to its own max height and max width."""
  rng = np.random.default_rng((seed, epoch, 12))
  batches = _chunk(rng.permutation(len(sizes)), batch_size)
  rows = [_rows(sizes, b) for b in batches]
  return batches_from_rows(rows, [tuple(r.max(axis=0)) for r in rows])


def plan_global_max(sizes, batch_size: int, *, seed: int = 0, epoch: int = 0) -> EpochBatches:
  """Random batches, all padded to the largest height and width of the whole distribution."""
  rng = np.random.default_rng((seed, epoch, 13))
  hw = tuple(sizes.max(axis=0))
  batches = _chunk(rng.permutation(len(sizes)), batch_size)
  return batches_from_rows([_rows(sizes, b) for b in batches], [hw] * len(batches))


def crop_fits(sizes, crop) -> np.ndarray:
  """(N,) bool: the image holds a ``crop`` (h, w) window."""
  return (sizes[:, 0] >= crop[0]) & (sizes[:, 1] >= crop[1])


def plan_crop(sizes, crop, batch_size: int, *, seed: int = 0, epoch: int = 0) -> EpochBatches:
  """Random batches of fixed ``crop`` windows; images smaller than the crop are dropped (every
  pixel of a batch is real, except dummies filling the last batch)."""
  rng = np.random.default_rng((seed, epoch, 14))
  keep = np.flatnonzero(crop_fits(sizes, crop))
  batches = _chunk(rng.permutation(keep), batch_size)
  crop_rows = [np.where(b[:, None] >= 0, np.asarray(crop, np.int64)[None], 0) for b in batches]
  return batches_from_rows(crop_rows, [tuple(crop)] * len(batches))


def crop_loss(sizes, crop) -> dict:
  """Images and pixels a fixed crop never trains on: dropped images, and outside-crop pixels."""
  fits = crop_fits(sizes, crop)
  area = sizes[:, 0] * sizes[:, 1]
  seen = int(fits.sum()) * crop[0] * crop[1]
  return {"crop_hw": [int(crop[0]), int(crop[1])], "images_dropped": int((~fits).sum()),
          "images_dropped_fraction": float((~fits).mean()),
          "pixels_dropped_fraction": float(1 - seen / area.sum())}


def plan_bucketed(sizes, bucket_shapes, batch_sizes, *, seed: int = 0,
                  epoch: int = 0) -> EpochBatches:
  """The project's own epoch plan (:func:`fcnjax.data.pipeline.make_epoch_plan`), pad remainder."""
  from fcnjax.data import pipeline
  plan = pipeline.make_epoch_plan(sizes, bucket_shapes, batch_sizes, seed=seed, epoch=epoch)
  shapes = np.asarray(bucket_shapes, np.int64)
  return batches_from_rows([_rows(plan.out_sizes, r) for r in plan.rows],
                           [tuple(shapes[b]) for b in plan.bucket])


@dataclasses.dataclass
class Strategy:
  """A named batching strategy: ``plan(epoch) -> EpochBatches``, plus facts to report."""

  name: str
  plan: object
  note: str = ""
  info: dict = dataclasses.field(default_factory=dict)


def make_strategies(sizes, *, batch_size=None, pixels_per_batch=None, num_devices=1, crop=VOC_CROP,
                    ks=(2, 4, 8, 16), granularity=1, seed=0) -> list:
  """The fixed strategies (``auto`` buckets come later, from the measured costs)."""
  def bsz(shapes):
    return buckets_lib.batch_sizes(shapes, batch_size=batch_size,
                                   pixels_per_batch=pixels_per_batch, num_devices=num_devices)

  gmax = sizes.max(axis=0)
  b_max = int(bsz([gmax])[0])
  b_crop = int(bsz([crop])[0])
  out = [
      Strategy("exact", lambda e: plan_exact(sizes, num_devices=num_devices, seed=seed, epoch=e),
               STRATEGY_NOTES["exact"], {"batch_size": num_devices}),
      Strategy("random-pad", lambda e: plan_random_pad(sizes, b_max, seed=seed, epoch=e),
               STRATEGY_NOTES["random-pad"], {"batch_size": b_max}),
      Strategy("global-max", lambda e: plan_global_max(sizes, b_max, seed=seed, epoch=e),
               STRATEGY_NOTES["global-max"], {"batch_size": b_max, "shape": gmax.tolist()}),
      Strategy("crop", lambda e: plan_crop(sizes, crop, b_crop, seed=seed, epoch=e),
               STRATEGY_NOTES["crop"], {"batch_size": b_crop, **crop_loss(sizes, crop)}),
  ]
  for k in ks:
    out.append(bucket_strategy(sizes, k, bsz, granularity=granularity, seed=seed))
  return out


def bucket_strategy(sizes, k, bsz, *, granularity=1, seed=0, **plan_kwargs) -> Strategy:
  """``buckets-K`` with :func:`~fcnjax.data.buckets.plan_buckets` (``plan_kwargs`` for auto)."""
  plan = buckets_lib.plan_buckets(sizes, k, granularity=granularity, **plan_kwargs)
  shapes, bs = plan.shapes, bsz(plan.shapes)
  return Strategy(f"buckets-{k}", lambda e: plan_bucketed(sizes, shapes, bs, seed=seed, epoch=e),
                  f"{plan.num_buckets} size buckets (plan_buckets)",
                  {"bucket_shapes": plan.shape_list, "batch_sizes": bs.tolist(),
                   "planned_padded_fraction": plan.padded_fraction})


# ---------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------
class CompileEvents:
  """XLA backend compiles seen by ``jax.monitoring`` for functions whose name contains ``name``."""

  EVENT = "/jax/core/compile/backend_compile_duration"
  _events: list = []
  _registered = False

  def __init__(self, name: str = "train_step"):
    import jax
    self.name = name
    if not CompileEvents._registered:
      jax.monitoring.register_event_duration_secs_listener(CompileEvents._listen)
      CompileEvents._registered = True

  @staticmethod
  def _listen(event, duration_secs, **kw):
    if event == CompileEvents.EVENT:
      CompileEvents._events.append((str(kw.get("fun_name", "")), float(duration_secs)))

  def mark(self) -> int:
    return len(CompileEvents._events)

  def since(self, mark: int) -> tuple:
    """(compile count, total backend compile seconds) of ``name`` since ``mark``."""
    ev = [d for f, d in CompileEvents._events[mark:] if self.name in f]
    return len(ev), float(sum(ev))


class CacheHits:
  """Persistent compilation cache hits seen by ``jax.monitoring`` (all programs)."""

  EVENT = "/jax/compilation_cache/cache_hits"
  _hits = 0
  _registered = False

  @classmethod
  def count(cls) -> int:
    import jax
    if not cls._registered:
      jax.monitoring.register_event_listener(cls._listen)
      cls._registered = True
    return cls._hits

  @classmethod
  def _listen(cls, event, **kw):
    if event == cls.EVENT:
      cls._hits += 1


# The train step's optimizer: the training defaults (SGD-momentum, poly schedule, no warm-up),
# over a schedule long enough that the measured steps sit at its start.
NUM_CLASSES = 21
SGD_LEARNING_RATE = 0.01
SGD_MOMENTUM = 0.9
SGD_WEIGHT_DECAY = 5e-4
OPTIMIZER_STEPS = 10_000


@dataclasses.dataclass
class BenchConfig:
  model: str = "fcn8s"
  width_multiplier: float = 1.0
  aligned: bool = False
  precision: str = "fp32"
  devices: int = 1
  steps: int = 3        # timed steps per shape, after one warm-up step
  seed: int = 0


class Bench:
  """Model + optimizer state on a mesh; measures train-step shapes with fresh jitted steps."""

  def __init__(self, cfg: BenchConfig):
    import jax
    import jax.numpy as jnp

    from fcnjax import models
    from fcnjax.train import optim, parallel
    from fcnjax.train import step as step_lib
    self.cfg = cfg
    self.jax, self.parallel, self.step_lib = jax, parallel, step_lib
    self.num_classes = NUM_CLASSES
    dtype = {"fp32": None, "bf16": jnp.bfloat16}[cfg.precision]
    model = models.build_model(cfg.model, self.num_classes, width_multiplier=cfg.width_multiplier,
                               aligned=cfg.aligned, dtype=dtype, seed=cfg.seed)
    self.input_multiple = int(getattr(model.backbone, "input_multiple", 1))
    self.num_params = models.count_params(model)
    self.tx = optim.modern_optimizer("sgd", SGD_LEARNING_RATE, total_steps=OPTIMIZER_STEPS,
                                     schedule="poly", momentum=SGD_MOMENTUM,
                                     weight_decay=SGD_WEIGHT_DECAY)
    self.mesh = parallel.make_mesh(cfg.devices)
    self.graphdef, state = step_lib.init_state(model, self.tx)
    self.state = parallel.replicate(state, self.mesh)
    self.events = CompileEvents("train_step")
    self.rng = np.random.default_rng(cfg.seed)
    self.compiled_shapes = set()  # (B, H, W) already compiled by some strategy's step

  def new_step(self):
    """A freshly jitted real train step (empty compile cache)."""
    return self.step_lib.make_train_step(
        self.graphdef, self.tx, state_sharding=self.jax.tree.map(lambda x: x.sharding, self.state),
        batch_sharding=self.parallel.batch_sharding(self.mesh))

  def model_pixels(self, shape) -> int:
    """B * H * W px after the model pads H, W to its input multiple (what it computes on)."""
    b, h, w = (int(v) for v in shape)
    mh, mw = self.model_hw(h, w)
    return b * mh * mw

  def model_hw(self, h: int, w: int) -> tuple:
    """(H, W) px the model computes on for an (h, w) input: each rounded up to its multiple."""
    m = self.input_multiple
    return -(-int(h) // m) * m, -(-int(w) // m) * m

  def compile_timed(self, batch) -> tuple:
    """(compiled step, timings) for ``batch``'s shape from a freshly jitted train step:
    ``jax.jit(train_step).lower(state, batch).compile()`` timed in two parts: ``lower_s``
    (trace + lower to StableHLO, wall s) and ``compile_s`` (XLA compile, or a persistent-cache
    load, wall s); ``total_s`` their sum. ``backend_compile_event_s``: JAX's
    ``backend_compile_duration`` events for the train step meanwhile (the same XLA part, as JAX
    times it); ``cache_hits``: persistent-cache hits meanwhile."""
    step = self.new_step()
    mark, hits = self.events.mark(), CacheHits.count()
    t0 = time.perf_counter()
    lowered = step.lower(self.state, batch)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    n, backend_s = self.events.since(mark)
    return compiled, {"lower_s": t1 - t0, "compile_s": t2 - t1, "total_s": t2 - t0,
                      "backend_compile_event_s": backend_s, "xla_compile_events": n,
                      "cache_hits": CacheHits.count() - hits}

  def time_steps(self, compiled, batch) -> dict:
    """Median / min / max wall seconds of ``cfg.steps`` calls of ``compiled`` on ``batch``
    after one untimed warm-up call (each call blocked until its loss is ready)."""
    times = []
    for i in range(self.cfg.steps + 1):
      t = time.perf_counter()
      self.state, m = compiled(self.state, batch)
      self.jax.block_until_ready(m["loss"])
      if i:
        times.append(time.perf_counter() - t)
    if not np.isfinite(float(m["loss"])):
      raise FloatingPointError(f"non-finite loss at shape {batch['image'].shape[:3]}")
    return {"step_s": float(np.median(times)), "step_s_min": float(min(times)),
            "step_s_max": float(max(times)), "timed_steps": len(times)}

  def synthetic_batch(self, rows, hw) -> dict:
    """Random preprocessed images / labels of the real sizes ``rows`` (B, 2), padded to ``hw``."""
    b, (h, w) = len(rows), hw
    image = np.zeros((b, h, w, 3), np.float32)
    label = np.full((b, h, w), 255, np.uint8)
    mask = np.zeros((b, h, w), bool)
    for i, (rh, rw) in enumerate(rows):
      image[i, :rh, :rw] = self.rng.normal(0, 60, (rh, rw, 3))
      label[i, :rh, :rw] = self.rng.integers(0, self.num_classes, (rh, rw))
      mask[i, :rh, :rw] = True
    return self.parallel.global_batch({"image": image, "label": label, "mask": mask}, self.mesh)

  def measure(self, step_fn, rows, hw) -> dict:
    """Time one batch shape: first call (compile), one warm-up, then ``cfg.steps`` timed steps.

    ``compile_s``: first-call wall seconds minus the median step (trace + lower + compile);
    ``backend_compile_s`` / ``xla_compiles``: from JAX's compile events during the first call.
    ``repeat_shape``: another strategy's step compiled this batch shape earlier in the run. It is
    still a fresh jit and a counted XLA compile, but XLA's in-process caches make it cheaper
    (on a GPU, cached convolution autotuning: ~3 s instead of ~25-37 s for FCN-8s on an H100),
    so cost medians use first compiles only (:func:`cold_compile_median`).
    """
    batch = self.synthetic_batch(rows, hw)
    mark = self.events.mark()
    t = time.perf_counter()
    self.state, m = step_fn(self.state, batch)
    self.jax.block_until_ready(m["loss"])
    first = time.perf_counter() - t
    n_compiles, backend_s = self.events.since(mark)
    times = []
    for i in range(self.cfg.steps + 1):
      t = time.perf_counter()
      self.state, m = step_fn(self.state, batch)
      self.jax.block_until_ready(m["loss"])
      if i:
        times.append(time.perf_counter() - t)
    med = float(np.median(times))
    if not np.isfinite(float(m["loss"])):
      raise FloatingPointError(f"non-finite loss at shape {len(rows)}x{hw}")
    shape = (len(rows), *hw)
    repeat = shape in self.compiled_shapes
    self.compiled_shapes.add(shape)
    return {"compile_s": max(first - med, 0.0), "first_call_s": first, "repeat_shape": repeat,
            "backend_compile_s": backend_s, "xla_compiles": n_compiles, "step_s": med,
            "step_s_min": float(min(times)), "step_s_max": float(max(times)), "timed_steps": len(times)}


def sample_shapes(shapes, pixels, n: int, rng) -> np.ndarray:
  """Indices of distinct ``shapes`` to measure: all if <= ``n``, else one at random from each of
  ``n`` equal-size strata of the shapes sorted by ``pixels`` (covers small to large)."""
  if len(shapes) <= n:
    return np.arange(len(shapes))
  strata = np.array_split(np.argsort(pixels, kind="stable"), n)
  return np.sort([int(rng.choice(s)) for s in strata])


def distinct_shapes(eb: EpochBatches):
  """(distinct (B, H, W) shapes (S, 3), batch index -> shape index (M,))."""
  shapes, inv = np.unique(eb.shapes, axis=0, return_inverse=True)
  return shapes, inv.ravel()


class StrategyRun:
  """Measurement state of one strategy: epoch 0's plan, the sampled shapes, a fresh train step.

  ``xla_compiles`` / ``backend_compile_s`` add up the compile events seen during this strategy's
  own calls (steps run one at a time, so events belong to the call they happen in).
  """

  def __init__(self, bench: Bench, strat: Strategy, sample: int, seed: int = 0):
    self.bench, self.strat = bench, strat
    self.eb = strat.plan(0)
    self.shapes, self.inv = distinct_shapes(self.eb)
    self.pix = np.array([bench.model_pixels(s) for s in self.shapes])
    self.chosen = sample_shapes(self.shapes, self.pix, sample, np.random.default_rng((seed, 99)))
    self.step_fn = bench.new_step()
    self.buckets = []

  @property
  def pending(self) -> bool:
    return len(self.buckets) < len(self.chosen)

  def measure_next(self, log=print) -> None:
    """Measure the next sampled shape (the first batch of the epoch with that shape)."""
    eb, j = self.eb, self.chosen[len(self.buckets)]
    in_shape = np.flatnonzero(self.inv == j)
    b, h, w = (int(v) for v in self.shapes[j])
    m = self.bench.measure(self.step_fn, eb.rows[in_shape[0]], (h, w))
    real, padded = eb.pixels[in_shape].sum(), eb.padded_pixels[in_shape].sum()
    self.buckets.append({"shape": [b, h, w], "batches_per_epoch": int(len(in_shape)),
                         "batch_index": int(in_shape[0]),
                         "model_pixels": int(self.pix[j]), **m,
                         "images_per_s": float(eb.images[in_shape].mean() / m["step_s"]),
                         "real_pixels_per_s": float(eb.pixels[in_shape].mean() / m["step_s"]),
                         "padding_fraction": float(1 - real / padded)})
    log(f"  {self.strat.name:12s} {b}x{h}x{w}: compile {m['compile_s']:.2f} s"
        f"{' (shape compiled before)' if m['repeat_shape'] else ''}, step "
        f"{m['step_s']:.3f} s ({m['step_s_min']:.3f}-{m['step_s_max']:.3f}), load "
        f"{os.getloadavg()[0]:.2f}")

  def result(self) -> dict:
    s = self.strat
    return {"name": s.name, "note": s.note, "info": s.info,
            "distinct_shapes": int(len(self.shapes)), "measured_shapes": int(len(self.chosen)),
            "sampled": bool(len(self.chosen) < len(self.shapes)),
            "xla_compiles": int(sum(b["xla_compiles"] for b in self.buckets)),
            "backend_compile_s": float(sum(b["backend_compile_s"] for b in self.buckets)),
            "buckets": self.buckets}


def measure_round_robin(runs, log=print) -> list:
  """Measure every :class:`StrategyRun`'s sampled shapes round-robin (one shape of each in turn),
  so that a change in machine load during the benchmark hits all strategies alike."""
  while any(r.pending for r in runs):
    for r in runs:
      if r.pending:
        r.measure_next(log)
  return [r.result() for r in runs]


def drift_check(run: StrategyRun) -> dict:
  """Re-time ``run``'s first measured shape at the end (already compiled: no compile expected);
  ``ratio`` = step seconds now / then, a measure of how much the machine's load drifted."""
  first = run.buckets[0]
  rows = run.eb.rows[first["batch_index"]]
  m = run.bench.measure(run.step_fn, rows, tuple(first["shape"][1:]))
  return {"strategy": run.strat.name, "shape": first["shape"], "step_s_before": first["step_s"],
          "step_s_after": m["step_s"], "ratio": m["step_s"] / first["step_s"],
          "xla_compiles": m["xla_compiles"]}


# ---------------------------------------------------------------------------------------------
# Cost model and projections
# ---------------------------------------------------------------------------------------------
def cold_compile_median(results) -> float:
  """Median ``compile_s`` over measured shapes compiled for the first time in the run (all
  shapes if every one was a repeat)."""
  all_s = [b["compile_s"] for r in results for b in r["buckets"]]
  cold = [b["compile_s"] for r in results for b in r["buckets"] if not b.get("repeat_shape")]
  return float(np.median(cold or all_s))


def fit_step_time(pixels, step_s) -> dict:
  """Least-squares ``step_s = a + b * pixels`` (a in s, b in s/px), with R^2 and the largest
  relative residual over the points."""
  x, y = np.asarray(pixels, np.float64), np.asarray(step_s, np.float64)
  if len(np.unique(x)) < 2:
    b = float(y.mean() / x.mean())
    a = 0.0
  else:
    b, a = (float(v) for v in np.polyfit(x, y, 1))
  pred = a + b * x
  ss = float(((y - y.mean()) ** 2).sum())
  return {"a_s": a, "b_s_per_px": b, "points": int(len(x)),
          "r2": float(1 - ((y - pred) ** 2).sum() / ss) if ss > 0 else 1.0,
          "max_rel_residual": float(np.max(np.abs(pred - y) / y))}


def pooled_fit(results) -> dict:
  """:func:`fit_step_time` over every measured shape of ``results``."""
  pts = [(b["model_pixels"], b["step_s"]) for r in results for b in r["buckets"]]
  return fit_step_time(*zip(*pts))


def pixel_cost(bucket_results, results) -> float:
  """Seconds per padded pixel for the ``auto`` planner: the slope of the bucket strategies' fit;
  where timing noise makes that slope <= 0 (few shapes on a busy machine: a per-pixel cost cannot
  be negative), the slope of the fit over every strategy, else the through-origin ratio
  mean(step s) / mean(pixels), which is always positive."""
  for fit in (pooled_fit(bucket_results), pooled_fit(results)):
    if fit["b_s_per_px"] > 0:
      return fit["b_s_per_px"]
  pts = np.asarray([(b["model_pixels"], b["step_s"]) for r in results for b in r["buckets"]],
                   np.float64)
  return float(pts[:, 1].mean() / pts[:, 0].mean())


def own_fit(result, min_points: int = 3):
  """A strategy's own fit when it measured >= ``min_points`` shapes of distinct pixels (its batch
  size and shape mix), else None."""
  pix = [b["model_pixels"] for b in result["buckets"]]
  if len(set(pix)) < min_points:
    return None
  fit = fit_step_time(pix, [b["step_s"] for b in result["buckets"]])
  return dict(fit, source="own") if fit["b_s_per_px"] > 0 else None


def predict_step(fit: dict, pixels) -> np.ndarray:
  """Fitted step seconds for model pixels (never below 10 % of the pure per-pixel cost)."""
  p = np.asarray(pixels, np.float64)
  return np.maximum(fit["a_s"] + fit["b_s_per_px"] * p, 0.1 * abs(fit["b_s_per_px"]) * p)


def shape_step_times(results, extra=()) -> dict:
  """(B, H, W) -> median step seconds over every measurement of that exact batch shape (the same
  XLA program whichever strategy measured it; pooling damps load noise). ``extra``: more
  (shape, step_s) pairs, e.g. the drift re-time."""
  times = {}
  for b in [b for r in results for b in r["buckets"]]:
    times.setdefault(tuple(b["shape"]), []).append(b["step_s"])
  for shape, t in extra:
    times.setdefault(tuple(shape), []).append(t)
  return {k: float(np.median(v)) for k, v in times.items()}


def project(bench_pixels, result: dict, strat: Strategy, fit: dict, epochs: int,
            compile_s: float, measured: dict) -> dict:
  """Projected times for one epoch and for ``epochs`` epochs: ``compile_s`` (the median measured
  compile seconds over all strategies: compile time does not depend on the shape, and the median
  damps load noise) once per distinct shape, plus every batch's step seconds: ``measured[shape]``
  (see :func:`shape_step_times`) where that shape was measured, else the fitted ``fit``."""

  def step_times(eb):
    pix = np.array([bench_pixels(s) for s in eb.shapes], np.float64)
    t = predict_step(fit, pix)
    for i, s in enumerate(map(tuple, eb.shapes.tolist())):
      if s in measured:
        t[i] = measured[s]
    return t

  def compile_total(shapes):
    return compile_s * len(shapes)

  eb0 = strat.plan(0)
  shapes0 = set(map(tuple, eb0.shapes.tolist()))
  steps0 = step_times(eb0)
  epoch_s = compile_total(shapes0) + float(steps0.sum())
  all_shapes, run_steps_s, run_pixels = set(shapes0), float(steps0.sum()), int(eb0.pixels.sum())
  for e in range(1, epochs):
    eb = strat.plan(e)
    all_shapes |= set(map(tuple, eb.shapes.tolist()))
    run_steps_s += float(step_times(eb).sum())
    run_pixels += int(eb.pixels.sum())
  run_s = compile_total(all_shapes) + run_steps_s
  return {"steps_per_epoch": int(len(eb0.shapes)), "images_per_epoch": int(eb0.images.sum()),
          "real_pixels_per_epoch": int(eb0.pixels.sum()),
          "padding_fraction": float(1 - eb0.pixels.sum() / eb0.padded_pixels.sum()),
          "compile_s_epoch": float(compile_total(shapes0)), "step_s_epoch": float(steps0.sum()),
          "epoch_s": epoch_s, "real_pixels_per_s": float(eb0.pixels.sum() / epoch_s),
          "run_epochs": epochs, "run_distinct_shapes": len(all_shapes),
          "run_compile_s": float(compile_total(all_shapes)), "run_s": run_s,
          "run_real_pixels_per_s": float(run_pixels / run_s)}


def auto_cost_table(sizes, *, compile_s_per_bucket, s_per_pixel, epochs, granularity=1,
                    max_k=32) -> dict:
  """The planner's cost ``compile_s_per_bucket * K + s_per_pixel * padded px * epochs`` per K,
  and the K that ``plan_buckets(..., "auto")`` picks with these numbers."""
  rows = []
  for k in range(1, max_k + 1):
    plan = buckets_lib.plan_buckets(sizes, k, granularity=granularity)
    rows.append({"k": k, "buckets": plan.num_buckets, "padded_pixels": plan.padded_pixels,
                 "padded_fraction": plan.padded_fraction,
                 "compile_cost_s": compile_s_per_bucket * plan.num_buckets,
                 "pixel_cost_s": s_per_pixel * plan.padded_pixels * epochs})
    rows[-1]["total_s"] = rows[-1]["compile_cost_s"] + rows[-1]["pixel_cost_s"]
    if plan.num_buckets < k:
      break
  auto = buckets_lib.plan_buckets(sizes, "auto", granularity=granularity, epochs=epochs,
                                  compile_s_per_bucket=compile_s_per_bucket,
                                  s_per_pixel=s_per_pixel, max_auto_buckets=max_k)
  return {"compile_s_per_bucket": compile_s_per_bucket, "s_per_pixel": s_per_pixel,
          "epochs": epochs, "table": rows, "auto_k": auto.num_buckets,
          "auto_shapes": auto.shape_list, "auto_padded_fraction": auto.padded_fraction}


# ---------------------------------------------------------------------------------------------
# Calibration: a cost profile for plan_buckets(..., "auto")
# ---------------------------------------------------------------------------------------------
class CalibrationError(RuntimeError):
  """A calibration whose measurement cannot be trusted (one line: what went wrong)."""


def calibration_shapes(sizes, n: int, bsz, model_hw=lambda h, w: (h, w),
                       granularity: int = 1) -> np.ndarray:
  """Up to ``n`` batch shapes (M, 3) int64 (B, H, W) px, M <= n, sorted by model pixels, spread
  over the size distribution ``sizes`` (N, 2) for a step-time fit.

  Candidates, in order of preference: the bucket shapes of ``plan_buckets(sizes, k)`` for
  k = 1..2n (shapes a bucketed run compiles), then the image sizes at 2n area quantiles from the
  smallest to the largest image (so that the pixel range stays wide when the model's alignment
  maps every bucket onto a few shapes), each rounded up to ``granularity``. Candidates the model
  computes on identically (same ``model_hw(H, W)``) count once. ``bsz(shapes (K, 2)) -> (K,)``
  gives each shape's batch size. Of the candidates' model pixels B * H' * W', the shape nearest
  to each of ``n`` evenly spaced targets from the smallest to the largest is taken (each once;
  ties go to the earlier candidate)."""
  sizes = np.asarray(sizes, np.int64).reshape(-1, 2)
  g = int(granularity)
  pool = []
  for k in range(1, 2 * int(n) + 1):
    pool += buckets_lib.plan_buckets(sizes, k, granularity=g).shape_list
  order = np.argsort(sizes[:, 0] * sizes[:, 1], kind="stable")
  for q in np.linspace(0, 1, 2 * int(n)):
    h, w = sizes[order[int(round(q * (len(sizes) - 1)))]]
    pool.append((int(-(-h // g) * g), int(-(-w // g) * g)))
  seen, cands = set(), []
  for h, w in pool:
    key = tuple(int(v) for v in model_hw(h, w))
    if key not in seen:
      seen.add(key)
      cands.append((h, w))
  hw = np.asarray(cands, np.int64)
  bs = np.asarray(bsz(hw), np.int64)
  px = np.array([b * np.prod(model_hw(h, w)) for b, (h, w) in zip(bs, hw)], np.float64)
  taken = np.zeros(len(cands), bool)
  for target in np.linspace(px.min(), px.max(), min(int(n), len(cands))):
    j = int(np.argmin(np.where(taken, np.inf, np.abs(px - target))))
    taken[j] = True
  idx = np.flatnonzero(taken)
  idx = idx[np.argsort(px[idx], kind="stable")]
  return np.column_stack([bs[idx], hw[idx]]).astype(np.int64)


PERSISTENT_CACHE_OPTIONS = {"jax_enable_compilation_cache": True,
                            "jax_persistent_cache_min_compile_time_secs": 0.0,
                            "jax_persistent_cache_min_entry_size_bytes": -1,
                            "jax_persistent_cache_enable_xla_caches": "all"}
"""JAX options of the calibration's persistent cache: keep every program however fast it
compiled or small it is, plus XLA's own caches (GPU autotuning); an option this jax does not
have is skipped."""


def _reset_persistent_cache() -> None:
  """Make JAX re-read the cache options at its next compile (it reads them once per process)."""
  try:
    from jax._src import compilation_cache
    compilation_cache.reset_cache()
  except (ImportError, AttributeError):  # a jax without it: the hit checks catch a stale cache
    pass


@contextlib.contextmanager
def fresh_persistent_cache():
  """A new empty temporary folder as JAX's persistent compilation cache (with
  :data:`PERSISTENT_CACHE_OPTIONS`); yields its path. Afterwards the previous options are back
  and the folder is deleted."""
  import jax
  folder = tempfile.mkdtemp(prefix="fcnjax-calibrate-xla-cache-")
  opts = {"jax_compilation_cache_dir": folder, **{k: v for k, v in
                                                  PERSISTENT_CACHE_OPTIONS.items()
                                                  if k in jax.config.values}}
  before = {k: jax.config.values[k] for k in opts}
  for k, v in opts.items():
    jax.config.update(k, v)
  _reset_persistent_cache()
  try:
    yield folder
  finally:
    for k, v in before.items():
      jax.config.update(k, v)
    _reset_persistent_cache()
    shutil.rmtree(folder, ignore_errors=True)


def folder_usage(folder) -> tuple:
  """(files, bytes) under ``folder``, recursively."""
  files = nbytes = 0
  for base, _, names in os.walk(folder):
    for name in names:
      try:
        nbytes += os.path.getsize(os.path.join(base, name))
        files += 1
      except OSError:
        pass
  return files, nbytes


CALIBRATION_TIMING = (
    "compile: wall seconds of jax.jit(train_step).lower(state, batch).compile() on a fresh jit "
    "(trace + lower + XLA compile; warm: after jax.clear_caches(), trace + lower + load from the "
    "persistent compilation cache, which held only this run's programs); step: median wall "
    "seconds of the compiled step after 1 warm-up call, each call blocked until ready; "
    "s_per_pixel: least-squares slope of step seconds vs model pixels B*H*W")


def step_cost_fit(pixels, step_s) -> dict:
  """:func:`fit_step_time` plus ``method`` and ``s_per_pixel``: the least-squares slope when
  the shapes span >= 1.25x in pixels and the slope is positive, else (pixels too alike for a
  slope, e.g. ``--pixels-per-batch``; or noise) the through-origin ratio mean(step s) / mean(px),
  which is positive and includes the per-step overhead."""
  px = np.asarray(pixels, np.float64)
  fit = fit_step_time(px, step_s)
  if px.max() >= 1.25 * px.min() and fit["b_s_per_px"] > 0:
    return dict(fit, method="least squares", s_per_pixel=fit["b_s_per_px"])
  why = "pixels span < 1.25x" if px.max() < 1.25 * px.min() else "slope <= 0"
  return dict(fit, method=f"through origin ({why})",
              s_per_pixel=float(np.mean(step_s) / px.mean()))


def calibrate(a, sizes, source: str, argv, log=print) -> int:
  """``--calibrate``: measure a :class:`~fcnjax.data.bucket_costs.CostProfile` for the flags'
  model / precision / devices / batching on ``sizes`` (N, 2) px, write it and print a table.

  Per shape of :func:`calibration_shapes`: a cold compile (the process's fresh persistent cache
  has no entry for it), ``cfg.steps`` timed steps, then ``jax.clear_caches()`` and a warm
  compile of a fresh jit (a persistent-cache load). A cold compile that hit the cache, or a warm
  one that did not, raises :class:`CalibrationError`. Costs: the medians over shapes; per pixel:
  :func:`step_cost_fit`. Returns 0."""
  import jax
  t_start = time.perf_counter()
  backend = jax.default_backend()
  today = datetime.date.today().isoformat()
  out = pathlib.Path(a.profile_out or f"benchmarks/results/cost-profile-{backend}-{today}.json")
  try:  # before the measuring, not after it
    out.parent.mkdir(parents=True, exist_ok=True)
    if not os.access(out.parent, os.W_OK):
      raise PermissionError(f"{out.parent}: folder is not writable")
  except OSError as e:
    raise bucket_costs.CostProfileError(f"{out}: cannot write the cost profile: {e}") from None
  batching = dict(batch_size=a.batch_size, pixels_per_batch=a.pixels_per_batch,
                  num_devices=a.devices)
  samples = []
  with fresh_persistent_cache() as cache:
    bench = Bench(BenchConfig(a.model, a.width_multiplier, a.aligned, a.precision, a.devices,
                              a.steps, a.seed))
    machine = machine_info()
    shapes = calibration_shapes(sizes, a.calibrate_shapes,
                                lambda hw: buckets_lib.batch_sizes(hw, **batching),
                                bench.model_hw, a.granularity)
    log(f"calibrating {len(shapes)} shapes ({len(sizes)} images, {bench.num_params:,} "
        f"parameters, {backend} {machine['device_kind']}); persistent cache {cache}")
    for b, h, w in shapes.tolist():
      batch = bench.synthetic_batch(np.tile([h, w], (b, 1)), (h, w))
      name = f"{b}x{h}x{w}"
      compiled, cold = bench.compile_timed(batch)
      if cold["cache_hits"]:
        raise CalibrationError(f"the cold compile of {name} loaded from the persistent cache "
                               f"{cache}, which should have been empty")
      steps = bench.time_steps(compiled, batch)
      del compiled
      files, nbytes = folder_usage(cache)
      jax.clear_caches()
      _, warm = bench.compile_timed(batch)
      if not warm["cache_hits"]:
        raise CalibrationError(f"the warm compile of {name} did not load from the persistent "
                               f"cache {cache} ({files} files): JAX did not use it (was JAX "
                               "compiling before --calibrate set it up?)")
      mh, mw = bench.model_hw(h, w)
      samples.append({"shape": [b, h, w], "model_hw": [mh, mw], "model_pixels": b * mh * mw,
                      "cold_compile_s": cold["total_s"], "cold_lower_s": cold["lower_s"],
                      "cold_xla_s": cold["compile_s"],
                      "cold_backend_event_s": cold["backend_compile_event_s"],
                      "warm_compile_s": warm["total_s"], "warm_lower_s": warm["lower_s"],
                      "warm_load_s": warm["compile_s"], "warm_cache_hits": warm["cache_hits"],
                      "cache_files": files, "cache_bytes": nbytes, **steps})
      log(f"  {name} (model {mh}x{mw}): compile {cold['total_s']:.2f} s cold, "
          f"{warm['total_s']:.2f} s warm ({files} cache files), step {steps['step_s']:.4f} s, "
          f"load {os.getloadavg()[0]:.2f}")
  fit = step_cost_fit([s["model_pixels"] for s in samples], [s["step_s"] for s in samples])
  machine["loadavg_end"] = list(os.getloadavg())
  profile = bucket_costs.CostProfile(
      compile_s_per_bucket=float(np.median([s["cold_compile_s"] for s in samples])),
      warm_compile_s_per_bucket=float(np.median([s["warm_compile_s"] for s in samples])),
      s_per_pixel=fit.pop("s_per_pixel"), backend=backend, device_kind=machine["device_kind"],
      model=a.model, width_multiplier=float(a.width_multiplier), aligned=bool(a.aligned),
      precision=a.precision, num_devices=int(a.devices), source=str(out), measured=today,
      timing=CALIBRATION_TIMING, fit=fit, samples=tuple(samples), machine=machine,
      run={"command": "python -m benchmarks.buckets " + " ".join(
               argv if argv is not None else sys.argv[1:]),
           "sizes_source": source, "num_images": int(len(sizes)), "scale": a.scale,
           "batch_size": a.batch_size, "pixels_per_batch": a.pixels_per_batch,
           "granularity": a.granularity, "steps": a.steps, "seed": a.seed,
           "wall_s": time.perf_counter() - t_start})
  bucket_costs.save_profile(profile, out)
  print(calibration_markdown(profile, sizes, a.epochs, a.granularity))
  log(f"wrote {out}")
  return 0


def calibration_markdown(profile, sizes, epochs: int, granularity: int = 1) -> str:
  """The calibration as a markdown table, its fit, and the ``auto`` K it gives on ``sizes``."""
  lines = [profile.describe(), "",
           "| shape BxHxW | model HxW | model px | cold compile s | warm compile s | cache files "
           "| step s median (min-max) |", "|---|---|---:|---:|---:|---:|---|"]
  for s in profile.samples:
    lines.append(f"| {'x'.join(map(str, s['shape']))} | {'x'.join(map(str, s['model_hw']))} | "
                 f"{s['model_pixels']:,} | {s['cold_compile_s']:.2f} | {s['warm_compile_s']:.2f} "
                 f"| {s['cache_files']} | {s['step_s']:.4f} ({s['step_s_min']:.4f}-"
                 f"{s['step_s_max']:.4f}) |")
  f = profile.fit
  auto = buckets_lib.plan_buckets(sizes, "auto", granularity=granularity,
                                  **profile.plan_kwargs(epochs))
  lines += ["", f"Step-time fit ({f['method']}, {f['points']} shapes): step_s = {f['a_s']:.4f} + "
            f"{f['b_s_per_px']:.3e} x model pixels, R^2 {f['r2']:.3f}; s_per_pixel "
            f"{profile.s_per_pixel:.3e}. Cold / warm: medians over the shapes. `auto` for "
            f"{epochs:g} epochs of these {len(sizes)} sizes with this profile: "
            f"**K = {auto.num_buckets}** (padding {100 * auto.padded_fraction:.1f} %); wall "
            f"{profile.run['wall_s']:.0f} s."]
  return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------
def machine_info() -> dict:
  """CPU model, core count, load average, library versions, date (for the record)."""
  import flax
  import jax
  import optax
  cpu = platform.processor()
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    cpu = next((l.split(":", 1)[1].strip() for l in out.splitlines()
                if l.startswith("Model name")), cpu)
  except (OSError, subprocess.SubprocessError):
    pass
  devs = jax.devices()
  try:
    repo = pathlib.Path(__file__).resolve().parents[1]
    commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True, timeout=10).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    commit = ""
  return {"date": datetime.datetime.now().isoformat(timespec="seconds"), "cpu": cpu,
          "git_commit": commit,
          "cpu_count": os.cpu_count(), "loadavg_start": list(os.getloadavg()),
          "platform": devs[0].platform, "device_kind": devs[0].device_kind,
          "jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
          "python": platform.python_version(), "xla_flags": os.environ.get("XLA_FLAGS", "")}


def _f(x, nd=2):
  return f"{x:,.{nd}f}"


def markdown(report: dict) -> str:
  """The report as markdown tables (per strategy, per bucket, cost model)."""
  c, m = report["config"], report["machine"]
  lines = [f"### Batching strategies: {c['model']} x{c['width_multiplier']:g} "
           f"{'aligned' if c['aligned'] else 'exact'} {c['precision']}, {c['num_images']} images "
           f"({c['sizes_source']}) at scale {c['scale']:g}, "
           f"{'batch ' + str(c['batch_size']) if c['batch_size'] else str(c['pixels_per_batch']) + ' px/batch'}"
           f", {c['devices']} device(s)",
           "",
           f"{m['cpu']} ({m['cpu_count']} cores, {m['platform']}), load {m['loadavg_start'][0]:.2f}"
           f" at start / {m['loadavg_end'][0]:.2f} at end; jax {m['jax']}, flax {m['flax']}; "
           f"{m['date']}; commit {m.get('git_commit') or '?'}; {c['steps']} timed steps per shape "
           "after 1 warm-up; "
           f"`{c['command']}`", ""]
  best1 = max(s["projection"]["real_pixels_per_s"] for s in report["strategies"])
  bestn = max(s["projection"]["run_real_pixels_per_s"] for s in report["strategies"])
  e = c["epochs"]
  lines += ["| strategy | distinct shapes | measured | XLA compiles (counted) | compile s (measured) "
            f"| steps/epoch | padding % | epoch s (projected) | real Mpx/s | x best | shapes in {e} "
            f"epochs | {e}-epoch s | {e}-epoch x best |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for s in report["strategies"]:
    p = s["projection"]
    measured_compile = sum(b["compile_s"] for b in s["buckets"])
    lines.append(
        f"| {s['name']} | {s['distinct_shapes']} | {s['measured_shapes']}"
        f"{' (sample)' if s['sampled'] else ''} | {s['xla_compiles']} | {_f(measured_compile, 1)} "
        f"| {p['steps_per_epoch']} | {100 * p['padding_fraction']:.1f} | {_f(p['epoch_s'], 0)} | "
        f"{p['real_pixels_per_s'] / 1e6:.3f} | {best1 / p['real_pixels_per_s']:.2f} | "
        f"{p['run_distinct_shapes']} | {_f(p['run_s'], 0)} | "
        f"{bestn / p['run_real_pixels_per_s']:.2f} |")
  crop = next((s["info"] for s in report["strategies"] if s["name"] == "crop"), None)
  lines += [""]
  if crop:
    lines.append(f"crop {crop['crop_hw'][0]}x{crop['crop_hw'][1]}: drops {crop['images_dropped']} "
                 f"images ({100 * crop['images_dropped_fraction']:.1f} %) and never sees "
                 f"{100 * crop['pixels_dropped_fraction']:.1f} % of the pixels per epoch.")
  lines.append(f"Projections charge {report['compile_s_projected']:.2f} s (the median of all "
               "first compiles of a shape in this run) per distinct shape, and per batch the median step time of its "
               "exact batch shape over every measurement of that shape (any strategy, and the "
               "drift re-time), or the fit for unmeasured shapes.")
  d = report.get("drift")
  if d:
    lines.append(f"Load drift: {d['strategy']} {'x'.join(map(str, d['shape']))} re-timed at the end "
                 f"took {d['step_s_after']:.3f} s vs {d['step_s_before']:.3f} s when first measured "
                 f"(x{d['ratio']:.2f}; {d['xla_compiles']} recompiles). Shapes were measured "
                 "round-robin across strategies (auto last).")
  sampled = [s["name"] for s in report["strategies"] if s["sampled"]]
  fit = report["fit"]
  lines.append(f"Step-time model (least squares over all {fit['points']} measured shapes): "
               f"step_s = {fit['a_s']:.4f} + {fit['b_s_per_px']:.3e} x model pixels (B*H*W "
               f"after the model's alignment), R^2 {fit['r2']:.3f}, max relative residual "
               f"{100 * fit['max_rel_residual']:.0f} %. " +
               (f"Strategies measured on a stratified random sample of shapes: "
                f"{', '.join(sampled)}; their unmeasured shapes use a step-time fit: " + "; ".join(
                    f"{s['name']} {s['fit']['source']} (a {s['fit']['a_s']:.4f} s, b "
                    f"{s['fit']['b_s_per_px']:.3e} s/px, R^2 {s['fit']['r2']:.2f})"
                    for s in report["strategies"] if s["sampled"]) + "."
                if sampled else "Every shape was measured."))
  lines += ["", "| strategy | batch shape BxHxW | batches/epoch | compile s | step s median (min-max) "
            "| images/s | real Mpx/s | padding % |", "|---|---|---:|---:|---|---:|---:|---:|"]
  for s in report["strategies"]:
    for b in s["buckets"]:
      lines.append(f"| {s['name']} | {'x'.join(map(str, b['shape']))} | {b['batches_per_epoch']} "
                   f"| {b['compile_s']:.2f}{' (repeat)' if b.get('repeat_shape') else ''} | "
                   f"{b['step_s']:.3f} ({b['step_s_min']:.3f}-"
                   f"{b['step_s_max']:.3f}) | {b['images_per_s']:.2f} | "
                   f"{b['real_pixels_per_s'] / 1e6:.3f} | {100 * b['padding_fraction']:.1f} |")
  a = report["auto"]
  if a.get("profile"):
    where = (f"with the costs of {a['profile']} (compile {a['compile_s_per_bucket']:.2f} s per "
             f"bucket; {a['s_per_pixel']:.3e} s per padded pixel)")
  else:
    where = (f"with the measured costs (compile {a['compile_s_per_bucket']:.2f} s per bucket = "
             f"median first bucket compile; {a['s_per_pixel']:.3e} s per padded pixel, the "
             "fit's slope, see pixel_cost)")
  lines += ["", f"`auto` K for {a['epochs']} epochs {where}: **K = {a['auto_k']}** "
            f"(padding {100 * a['auto_padded_fraction']:.1f} %), minimising compile + pixel cost "
            "(selected K shown; all in the JSON):",
            "", "| K | buckets | padding % | compile cost s | pixel cost s | total s |",
            "|---:|---:|---:|---:|---:|---:|"]
  best_total = min(r["total_s"] for r in a["table"])
  show = {1, 2, 4, 8, 16, a["auto_k"] - 1, a["auto_k"], a["auto_k"] + 1, a["table"][-1]["k"]}
  for r in a["table"]:
    if r["k"] not in show and r["total_s"] != best_total:
      continue
    star = " **min**" if r["total_s"] == best_total else ""
    lines.append(f"| {r['k']} | {r['buckets']} | {100 * r['padded_fraction']:.2f} | "
                 f"{_f(r['compile_cost_s'], 1)} | {_f(r['pixel_cost_s'], 1)} | "
                 f"{_f(r['total_s'], 1)}{star} |")
  return "\n".join(lines)


def plot(report: dict, path) -> None:
  """PNG: per-bucket real-pixel throughput bars (strategies side by side), projected epoch time."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  strategies = report["strategies"]
  fig, (ax, ax2) = plt.subplots(2, 1, figsize=(max(8, 0.35 * sum(len(s["buckets"]) for s in
                                                                 strategies) + 3), 9))
  x, ticks, labels = 0, [], []
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  for i, s in enumerate(strategies):
    xs = x + np.arange(len(s["buckets"]))
    ax.bar(xs, [b["real_pixels_per_s"] / 1e6 for b in s["buckets"]],
           color=colors[i % len(colors)], label=s["name"])
    ticks += list(xs)
    labels += [f"{b['shape'][1]}x{b['shape'][2]}" for b in s["buckets"]]
    x += len(s["buckets"]) + 1
  ax.set_xticks(ticks, labels, rotation=90, fontsize=7)
  ax.set_ylabel("real Mpx/s (steady state)")
  ax.set_title("Per measured batch shape: real-pixel throughput")
  ax.legend(fontsize=7, ncol=3)
  names = [s["name"] for s in strategies]
  comp = [s["projection"]["compile_s_epoch"] for s in strategies]
  steps = [s["projection"]["step_s_epoch"] for s in strategies]
  ax2.barh(names, steps, label="steps")
  ax2.barh(names, comp, left=steps, label="compiles")
  ax2.set_xlabel("projected seconds for one epoch")
  ax2.invert_yaxis()
  ax2.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
QUICK = dict(width_multiplier=0.0625, aligned=True, scale=0.1, steps=2, sample_shapes=1,
             batch_size=2, max_images=64)


class _Parser(argparse.ArgumentParser):
  """argparse whose errors are one ``error: ...`` line (exit 2), without the usage block."""

  def error(self, message):
    self.exit(2, f"error: {message} (see python -m benchmarks.buckets --help)\n")


def parse_args(argv=None):
  p = _Parser(prog="python -m benchmarks.buckets", description=__doc__.split("\n")[0])
  src = p.add_mutually_exclusive_group()
  src.add_argument("--sizes", help="CSV split,image_id,width,height (default: shipped VOC 2012)")
  src.add_argument("--root", help="dataset root to scan (VOC / SBD; image headers only)")
  p.add_argument("--split", default="train", help="comma-separated splits (default train)")
  p.add_argument("--model", default="fcn8s")
  p.add_argument("--width-multiplier", type=float, default=1.0)
  p.add_argument("--aligned", action="store_true")
  g = p.add_mutually_exclusive_group()
  g.add_argument("--batch-size", type=int)
  g.add_argument("--pixels-per-batch", type=int)
  p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
  p.add_argument("--devices", type=int, default=1, help="mesh over the first N devices")
  p.add_argument("--scale", type=float, default=1.0, help="shrink every size (and the crop)")
  p.add_argument("--max-images", type=int, default=None,
                 help="use a random subset of this many images (default: all)")
  p.add_argument("--granularity", type=int, default=1, help="bucket H, W multiple")
  p.add_argument("--ks", default="2,4,8,16,auto", help="bucket counts (and 'auto')")
  p.add_argument("--epochs", type=int, default=50, help="epochs for 'auto' and run projections")
  p.add_argument("--steps", type=int, default=3, help="timed steps per shape (after 1 warm-up)")
  p.add_argument("--sample-shapes", type=int, default=6,
                 help="measure at most this many shapes per strategy (stratified random sample)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", help="JSON path (default benchmarks/results/buckets-<date>.json); the "
                               "PNG goes next to it")
  p.add_argument("--quick", action="store_true",
                 help="CI-sized: width 1/16 aligned, scale 0.1, 64 images, batch 2, 2 steps, "
                      "1 sampled shape per strategy")
  p.add_argument("--cost-profile", metavar="FILE",
                 help="the 'auto' strategy uses this cost profile (JSON, e.g. from --calibrate) "
                      "instead of this run's measured costs")
  p.add_argument("--calibrate", action="store_true",
                 help="measure a cost profile (compile cold / warm, s per pixel) for the model, "
                      "precision, devices and batching flags instead of the strategies")
  p.add_argument("--calibrate-shapes", type=int, default=None, metavar="N",
                 help="with --calibrate: bucket shapes to measure (default 4, at least 2)")
  p.add_argument("--profile-out", metavar="FILE",
                 help="with --calibrate: where to write the profile (default "
                      "benchmarks/results/cost-profile-<backend>-<date>.json)")
  a = p.parse_args(argv)
  problem = _flag_problem(a)
  if problem:
    p.error(problem)
  if a.quick:
    for k, v in QUICK.items():
      if k == "batch_size" and a.pixels_per_batch:
        continue
      if k == "aligned" or getattr(a, k) == p.get_default(k):
        setattr(a, k, v)
  if a.batch_size is None and a.pixels_per_batch is None:
    a.batch_size = 8
  if a.calibrate_shapes is None:
    a.calibrate_shapes = 4
  return a


def _flag_problem(a) -> str | None:
  """Why the parsed flags ``a`` cannot run (None: they can)."""
  positive = {"--steps": a.steps, "--devices": a.devices, "--granularity": a.granularity,
              "--epochs": a.epochs, "--sample-shapes": a.sample_shapes,
              "--max-images": a.max_images, "--batch-size": a.batch_size,
              "--pixels-per-batch": a.pixels_per_batch}
  for flag, v in positive.items():
    if v is not None and v < 1:
      return f"{flag} must be >= 1, got {v}"
  if not (np.isfinite(a.scale) and a.scale > 0):
    return f"--scale must be a positive number, got {a.scale}"
  if not (np.isfinite(a.width_multiplier) and a.width_multiplier > 0):
    return f"--width-multiplier must be a positive number, got {a.width_multiplier}"
  if a.batch_size is not None and a.batch_size % a.devices:
    return f"--batch-size {a.batch_size} is not a multiple of --devices {a.devices}"
  bad = [k for k in a.ks.split(",") if k and k != "auto" and not (k.isdigit() and int(k) >= 1)]
  if bad or not [k for k in a.ks.split(",") if k]:
    return f"--ks takes bucket counts >= 1 and 'auto', got {a.ks!r}"
  if a.calibrate:
    if a.calibrate_shapes is not None and a.calibrate_shapes < 2:
      return f"--calibrate-shapes must be >= 2 (a step-time fit), got {a.calibrate_shapes}"
    for flag, v in (("--out", a.out), ("--cost-profile", a.cost_profile)):
      if v:
        return f"{flag} does not go with --calibrate (it writes --profile-out)"
  else:
    for flag, v in (("--calibrate-shapes", a.calibrate_shapes), ("--profile-out", a.profile_out)):
      if v is not None:
        return f"{flag} needs --calibrate"
  return None


def main(argv=None) -> int:
  a = parse_args(argv)
  if a.devices > 1:  # CPU: simulate N host devices (read when the backend starts; GPUs ignore it)
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
      os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={a.devices}"
  splits = [s for s in a.split.split(",") if s]
  try:
    sizes = load_sizes(a.sizes, a.root, splits)
    profile = bucket_costs.load_profile(a.cost_profile) if a.cost_profile else None
  except (OSError, ValueError) as e:  # missing / unreadable / malformed size table, dataset or
    print(f"error: {e}", file=sys.stderr)  # cost profile (CostProfileError is a ValueError)
    return 1
  source = a.root or (a.sizes or "shipped voc2012_seg_sizes.csv")
  if a.max_images and a.max_images < len(sizes):
    sizes = sizes[np.sort(np.random.default_rng(a.seed).choice(len(sizes), a.max_images, False))]
  sizes = scale_sizes(sizes, a.scale)
  log = lambda *x: print(*x, file=sys.stderr, flush=True)  # noqa: E731
  import jax
  if a.devices > jax.device_count():
    print(f"error: --devices {a.devices}, but {jax.device_count()} {jax.default_backend()} "
          "device(s) are visible", file=sys.stderr)
    return 2
  if a.calibrate:
    try:
      return calibrate(a, sizes, str(source), argv, log)
    except (bucket_costs.CostProfileError, CalibrationError) as e:
      print(f"error: {e}", file=sys.stderr)
      return 1
  if profile is not None:
    for m in profile.mismatches(backend=jax.default_backend(), model=a.model,
                                width_multiplier=a.width_multiplier, aligned=a.aligned,
                                precision=a.precision, num_devices=a.devices):
      log(f"warning: cost profile {profile.source}: {m}")
  crop = tuple(int(v) for v in scale_sizes(np.array([VOC_CROP]), a.scale)[0])
  ks = [k for k in a.ks.split(",") if k]
  fixed_ks = [int(k) for k in ks if k != "auto"]
  out = pathlib.Path(a.out or f"benchmarks/results/buckets-{datetime.date.today()}.json")
  out.parent.mkdir(parents=True, exist_ok=True)

  bench = Bench(BenchConfig(a.model, a.width_multiplier, a.aligned, a.precision, a.devices,
                            a.steps, a.seed))
  machine = machine_info()
  log(f"{len(sizes)} images, {len(np.unique(sizes, axis=0))} distinct shapes; "
      f"{bench.num_params:,} parameters; load {machine['loadavg_start'][0]:.2f}")
  batching = dict(batch_size=a.batch_size, pixels_per_batch=a.pixels_per_batch,
                  num_devices=a.devices)
  strategies = make_strategies(sizes, **batching, crop=crop, ks=fixed_ks,
                               granularity=a.granularity, seed=a.seed)
  t0 = time.perf_counter()
  runs = [StrategyRun(bench, s, a.sample_shapes, a.seed) for s in strategies]
  results = measure_round_robin(runs, log)
  fit = pooled_fit(results)
  bucket_results = [r for r in results if r["name"].startswith("buckets-")] or results
  bucket_fit = pooled_fit(bucket_results)
  if profile is None:
    costs = dict(compile_s_per_bucket=cold_compile_median(bucket_results),
                 s_per_pixel=pixel_cost(bucket_results, results))
  else:
    costs = dict(compile_s_per_bucket=profile.compile_s_per_bucket,
                 s_per_pixel=profile.s_per_pixel)
  auto = auto_cost_table(sizes, **costs, epochs=a.epochs, granularity=a.granularity)
  auto["source"] = profile.source if profile else "measured"
  auto["profile"] = profile.describe() if profile else None
  if "auto" in ks:
    def bsz(shapes):
      return buckets_lib.batch_sizes(shapes, **batching)
    s = bucket_strategy(sizes, "auto", bsz, granularity=a.granularity, seed=a.seed,
                        epochs=a.epochs, compile_s_per_bucket=auto["compile_s_per_bucket"],
                        s_per_pixel=auto["s_per_pixel"])
    strategies.append(s)
    results += measure_round_robin([StrategyRun(bench, s, a.sample_shapes, a.seed)], log)
  drift = drift_check(next((r for r in runs if r.strat.name == "global-max"), runs[0]))
  fit = pooled_fit(results)
  compile_s = cold_compile_median(results)
  step_table = shape_step_times(results, [(drift["shape"], drift["step_s_after"])])
  for r, s in zip(results, strategies):
    r["fit"] = own_fit(r) or dict(fit, source="pooled")
    r["projection"] = project(bench.model_pixels, r, s, r["fit"], a.epochs, compile_s,
                              step_table)
  machine["loadavg_end"] = list(os.getloadavg())
  report = {
      "config": {"command": "python -m benchmarks.buckets " + " ".join(
                     argv if argv is not None else sys.argv[1:]),
                 "sizes_source": str(source), "splits": splits, "num_images": int(len(sizes)),
                 "distinct_sizes": int(len(np.unique(sizes, axis=0))), "scale": a.scale,
                 "model": a.model, "width_multiplier": a.width_multiplier, "aligned": a.aligned,
                 "num_params": bench.num_params, "precision": a.precision,
                 "devices": a.devices, "batch_size": a.batch_size,
                 "pixels_per_batch": a.pixels_per_batch, "granularity": a.granularity,
                 "epochs": a.epochs, "steps": a.steps, "sample_shapes": a.sample_shapes,
                 "seed": a.seed, "quick": a.quick, "optimizer": "sgd momentum 0.9, poly",
                 "cost_profile": a.cost_profile,
                 "measure_wall_s": time.perf_counter() - t0},
      "machine": machine, "fit": fit, "bucket_fit": bucket_fit, "compile_s_projected": compile_s,
      "auto": auto, "drift": drift, "strategies": results}
  out.write_text(json.dumps(report, indent=1))
  png = out.with_suffix(".png")
  plot(report, png)
  print(markdown(report))
  log(f"wrote {out} and {png}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
