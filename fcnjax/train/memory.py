"""Memory is planned, not discovered: per-bucket train-step memory against the device's memory.

Before training, :func:`plan_batch_sizes` estimates the per-device memory of the train step for
each size bucket at its requested batch size, and gives a bucket that would not fit a smaller
batch (a multiple of the device count) - or, if one image per device does not fit, raises
:class:`StepMemoryError` naming the bucket, its largest image, the estimate and the limit. The
capped sizes go back into the loader (``pipeline.make_train_loader(..., max_batch_sizes=...)``).

All sizes are **bytes per device** (int). A batch of global size ``B`` runs ``B / num_devices``
rows on every device ("rows per device", ``b`` below).

Where the numbers come from
---------------------------
:func:`step_memory_bytes` lowers and compiles the jitted train step on abstract inputs
(``jax.ShapeDtypeStruct`` with the state's and the batch's shardings: nothing is allocated) and
reads XLA's ``Compiled.memory_analysis()`` (a ``CompiledMemoryStats`` in jax 0.10, also on CPU;
``None`` where a backend lacks it). The peak is taken as::

    peak = argument_size + output_size - alias_size + temp_size

XLA's buffer assignment gives the program its arguments (here the state and the batch), one
output allocation per result, and one block of ``temp_size`` bytes for every intermediate (the
heap-simulated peak of the buffers it can reuse); outputs that alias donated arguments
(``alias_size``: the donated ``TrainState`` written in place) share those arguments' buffers and
are counted once. The sum is what the step holds at once at worst. ``generated_code_size`` (0 on
CPU, the kernels on GPU) and ``peak_memory_in_bytes`` (on XLA:CPU in jax 0.10 it only repeats the
argument size, so it is not used) are reported but not added. The same compile is what the
training loop's first call at that shape reuses (jit's cache), so compiling a bucket at the batch
size it will train with costs nothing extra. Without ``memory_analysis`` the documented fallback
is :func:`step_memory_bound`: an upper bound from the traced program (arguments plus the bytes
of every intermediate value of the step's jaxpr at the per-device batch, as if nothing were
freed: 6-8x the compiled figure for FCN-8s, so plans made from it are cautious).

The model and its calibration
-----------------------------
Memory is close to ``fixed + b * (row + pixel * H * W)`` (:class:`StepMemoryModel`): ``fixed``
the parameters, optimizer state and gradients, the rest the activations of ``b`` rows of H x W.
``row`` is a per-row overhead: zero for the aligned FCNs (activations scale with H*W), large for
the exact FCNs, whose conv1 pads every image by 100 pixels so that per-row memory grows like
``(H + 200)(W + 200)``. :func:`calibrate` fits it from **3 compiles** (2 when there is only one
bucket): the largest bucket at 1 and ``r`` rows per device (2, or its requested rows when they
surely fit; its exact figures: ``fixed`` and its per-row bytes) and a shape of half its area at 1
row per device (the local slope ``pixel``; then ``row`` = what is left). Shapes larger than
``max_calibration_pixels`` per image are calibrated on a shape of that area (same aspect) and
extrapolated. Compile cost does not depend on the shape (3.8-8 s each for the 1/16-width FCN-8s
on 2 CPU cores, 3.5-10 s for the full-width one): shapes are chosen for accuracy, not cost.

Measured (XLA:CPU, fcn8s, reference SGD, one device; the model from :func:`calibrate` against a
compile at held-out sizes):

* full width, aligned, buckets up to 512x512 (calibrated on 512x512 at 1 and 2 rows and
  352x352, 9.9 s): ``fixed`` 1955.8 MB at every shape, ``pixel`` 2065 B/px, ``row`` 0.2 MB;
  every held-out size from 4x128x128 to 4x512x512 within 0.05 %.
* full width, exact (same shapes, 13.5 s): ``row`` 264 MB (the padding); 4-8 rows of 128x128
  +12..+18 % (cautious), 4x224x320 +2 %, 2-4 rows of 320x480 and 512x512 -0.6..-1.7 % (memory
  grows slightly faster than linearly in the rows; the headroom covers it).
* 1/16 width (the tests' model), calibrated on 96x128 / 64x96 (3 compiles, ~15 s): aligned
  4x96x128 +7 %, 2x96x96 +14 %, 64x64 at 4-8 rows +52..+56 % (feature maps of 2x2 at stride 32:
  cautious, not unsafe); exact +2.5..+15 %.
* Calibrating on *small* shapes instead under-estimates large ones (aligned 1/16: 150-450 B/px at
  32x32-96x96 against 512-521 at 320x480 and up), and a pure per-pixel model without ``row``
  under-estimates the exact FCNs' small buckets 2-4x; hence the largest bucket and the ``row``
  term.

What a plan does not see: other live device arrays (a second copy of the parameters, the eval
step's buffers, a prefetched batch), allocator fragmentation. ``headroom`` (default 0.9 of the
limit) is for those.

Using it (the training loop)::

    limit = memory.device_memory_bytes()          # or FCNJAX_MEMORY_LIMIT; None: unknown
    plan = memory.plan_batch_sizes(train_step, state, loader.bucket_shapes, loader.batch_sizes,
                                   num_devices=mesh.size, limit_bytes=limit,
                                   images_of_bucket=memory.bucket_images(loader))
    # (quick path first: if traced upper bounds fit, 0 compiles and plan.method == "bound")
    for line in plan.log_lines(): print(line)
    if plan.reduced: loader = make_train_loader(..., max_batch_sizes=plan.batch_sizes)
    for line in memory.dummy_row_warnings(loader): print(line)
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from fcnjax.data import augment as augment_lib
from fcnjax.data import buckets as buckets_lib

ENV_VAR = "FCNJAX_MEMORY_LIMIT"
"""Environment variable overriding :func:`device_memory_bytes` (bytes, or "2G", "500M", ...)."""
DEFAULT_HEADROOM = 0.9
"""Fraction of the device's memory a planned step may use."""
DEFAULT_MAX_CALIBRATION_PIXELS = 2048 * 2048
"""Largest image (H*W) the calibration compiles; larger buckets are extrapolated from it."""
CALIBRATION_GRANULARITY = 32
"""Calibration shapes derived from a bucket are rounded to multiples of this (the aligned grid)."""

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


class StepMemoryError(ValueError):
  """A bucket's train step does not fit in device memory even at one image per device.

  Attributes: ``bucket`` (H, W); ``estimate_bytes`` per device at ``num_devices`` rows (one per
  device); ``budget_bytes`` (= headroom x limit); ``limit_bytes``; ``largest_image``
  (name, h, w) or None; ``compiled`` (True if the estimate is a compile of exactly that program);
  ``failures``: [((H, W), estimate bytes)] for every bucket found too big, the largest first.
  """

  def __init__(self, message, *, bucket, estimate_bytes, budget_bytes, limit_bytes,
               largest_image=None, compiled=False):
    super().__init__(message)
    self.bucket = bucket
    self.estimate_bytes = estimate_bytes
    self.budget_bytes = budget_bytes
    self.limit_bytes = limit_bytes
    self.largest_image = largest_image
    self.compiled = compiled
    self.failures = [(tuple(bucket), int(estimate_bytes))]


# -- the device's memory ------------------------------------------------------------------------
def parse_bytes(text) -> int:
  """``"2G"`` -> 2147483648. An int, or a number with an optional binary unit K, M, G, T (also
  written KB/KiB, ... - all powers of 1024), case-insensitive; spaces allowed."""
  if isinstance(text, (int, np.integer)):
    value = int(text)
  else:
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([kKmMgGtT]?)(?:i?[bB])?\s*",
                     str(text))
    if not m:
      raise ValueError(f"not a memory size: {text!r} (examples: 2G, 500M, 1.5GiB, 123456)")
    value = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
  if value <= 0:
    raise ValueError(f"memory size must be positive, got {text!r}")
  return value


def format_bytes(n) -> str:
  """Bytes as text with a binary unit: ``format_bytes(3 << 30) == "3.0 GiB"``."""
  n = float(n)
  if abs(n) < 1024:
    return f"{int(n)} B"
  for unit in ("KiB", "MiB", "GiB", "TiB"):
    n /= 1024
    if abs(n) < 1024 or unit == "TiB":
      return f"{n:.1f} {unit}"


def _cgroup_limit() -> int | None:
  """This process's cgroup memory limit (v2 ``memory.max`` or v1), None if unlimited/unknown."""
  for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
    try:
      with open(path) as f:
        text = f.read().strip()
    except OSError:
      continue
    if text.isdigit() and int(text) < (1 << 60):
      return int(text)
  return None


def host_memory_bytes() -> int | None:
  """Physical memory of this host (``SC_PHYS_PAGES * SC_PAGE_SIZE``), lowered to the cgroup
  limit when the process runs under one; None if the OS does not say."""
  try:
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  except (ValueError, OSError, AttributeError):
    total = None
  limit = _cgroup_limit()
  if total is None or total <= 0:
    return limit
  return min(total, limit) if limit else total


def device_memory_bytes(device=None) -> int | None:
  """Bytes one device can use for a step (int), or None when it cannot be told.

  * ``FCNJAX_MEMORY_LIMIT`` set (e.g. ``"2G"``, ``"500M"``, ``"123456"``; units are powers of
    1024, see :func:`parse_bytes`): that, for any device - for users whose limit is wrong or
    shared, and for tests. An unparseable value raises ValueError.
  * GPU / TPU (``device.platform != "cpu"``): ``device.memory_stats()["bytes_limit"]``, the
    allocator's pool (on GPU the ``XLA_PYTHON_CLIENT_MEM_FRACTION`` of the card); None if the
    runtime gives no stats.
  * CPU: the host's physical memory (:func:`host_memory_bytes`, capped by a cgroup limit) divided
    by the number of local CPU devices, since devices forced with
    ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` share it.

  ``device``: a ``jax.Device``; default ``jax.local_devices()[0]``. The figure is the device's
  total, not what is free now: a plan counts the step's own arguments (the train state) itself.
  """
  env = os.environ.get(ENV_VAR, "").strip()
  if env:
    try:
      return parse_bytes(env)
    except ValueError as e:
      raise ValueError(f"{ENV_VAR}={env!r}: {e}") from None
  if device is None:
    device = jax.local_devices()[0]
  if device.platform != "cpu":
    try:
      stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - some runtimes raise instead of returning None
      stats = None
    limit = (stats or {}).get("bytes_limit")
    return int(limit) if limit else None
  host = host_memory_bytes()
  if host is None:
    return None
  n = max(1, len(jax.local_devices(backend="cpu")))
  return int(host // n)


# -- one program's memory -----------------------------------------------------------------------
def _leaf_sharding(x):
  if isinstance(x, (jax.Array, jax.ShapeDtypeStruct)):
    return getattr(x, "sharding", None)
  return None


def abstract_state(state):
  """``state`` (a pytree of arrays, or already of ``ShapeDtypeStruct``) as ``ShapeDtypeStruct``
  leaves with the arrays' shardings (nothing is copied or allocated)."""
  def one(x):
    if isinstance(x, jax.ShapeDtypeStruct):
      return x
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=_leaf_sharding(x))
  return jax.tree.map(one, state)


def default_batch_sharding(state):
  """The batch sharding matching ``state``: split over ``"data"`` of the mesh the state lives on
  (as :func:`fcnjax.train.parallel.batch_sharding`), or the state's single device."""
  for leaf in jax.tree.leaves(state):
    s = _leaf_sharding(leaf)
    if isinstance(s, NamedSharding):
      axis = "data" if "data" in s.mesh.axis_names else s.mesh.axis_names[0]
      return NamedSharding(s.mesh, P(axis))
    if s is not None:
      return s
  return None


def abstract_batch(batch_shape, sharding=None, *, index: bool = True) -> dict:
  """The loader's batch for global shape ``(B, H, W)`` as ``ShapeDtypeStruct``s: ``image``
  (B, H, W, 3) float32, ``label`` (B, H, W) uint8, ``mask`` (B, H, W) bool and, with ``index``,
  ``index`` (B,) int32 - the dict :mod:`fcnjax.data.pipeline` yields, so that a compile of it is
  the very program the training loop's jit call reuses."""
  B, H, W = (int(v) for v in batch_shape)
  sds = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
  out = {"image": sds((B, H, W, 3), jnp.float32), "label": sds((B, H, W), jnp.uint8),
         "mask": sds((B, H, W), jnp.bool_)}
  if index:
    out["index"] = sds((B,), jnp.int32)
  return out


def _nbytes(aval) -> int:
  dtype = aval.dtype
  itemsize = getattr(dtype, "itemsize", None)
  if not itemsize:  # extended dtypes (PRNG keys): their key data is 2 or 4 uint32
    itemsize = 8
  return int(math.prod(aval.shape)) * int(itemsize)


def _sub_jaxprs(value):
  if hasattr(value, "jaxpr") and hasattr(value, "consts"):  # ClosedJaxpr
    yield value.jaxpr
  elif hasattr(value, "eqns") and hasattr(value, "outvars"):  # Jaxpr
    yield value
  elif isinstance(value, (tuple, list)):
    for v in value:
      yield from _sub_jaxprs(v)


def _jaxpr_intermediate_bytes(jaxpr) -> int:
  total = 0
  for eqn in jaxpr.eqns:
    subs = [j for v in eqn.params.values() for j in _sub_jaxprs(v)]
    if subs:
      total += sum(_jaxpr_intermediate_bytes(j) for j in subs)
    else:
      total += sum(_nbytes(v.aval) for v in eqn.outvars if hasattr(v.aval, "shape"))
  return total


def step_memory_bound(train_step, state, batch_shape, *, num_devices: int = 1,
                      index: bool = True) -> dict:
  """A per-device upper bound on the step's memory without compiling (a trace, ~0.2-0.5 s).

  Traces the step's Python function (``train_step.__wrapped__`` for a jitted one) at the
  per-device batch ``(B / num_devices, H, W)`` on unsharded abstract inputs - the data-parallel
  step is the same program on every device, plus the gradient all-reduce - and adds the bytes of
  its arguments to those of **every** intermediate value of its jaxpr, as if none were ever
  freed or fused. Measured on XLA:CPU for FCN-8s (1/16 width, aligned and exact): 6.2-7.8x the
  compiled figure. It is a heuristic bound (XLA could in principle add buffers the jaxpr does not
  have, e.g. convolution scratch space), used for the quick "everything fits" check of
  :func:`plan_batch_sizes` and as :func:`step_memory_bytes`' fallback.

  Returns a dict like :func:`step_memory_bytes` with ``source="jaxpr"`` and ``compile_s`` 0.
  """
  B, H, W = (int(v) for v in batch_shape)
  nd = int(num_devices)
  if B < 1 or B % nd:
    raise ValueError(f"batch size {B} is not a positive multiple of {nd} devices")
  strip = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)
  abs_state = jax.tree.map(strip, abstract_state(state))
  abs_batch = abstract_batch((B // nd, H, W), None, index=index)
  fn = getattr(train_step, "__wrapped__", train_step)
  closed = jax.make_jaxpr(fn)(abs_state, abs_batch)
  args = sum(_nbytes(x) for x in jax.tree.leaves((abs_state, abs_batch)))
  temp = _jaxpr_intermediate_bytes(closed.jaxpr)
  return {"argument": args, "output": 0, "alias": 0, "temp": temp, "generated_code": 0,
          "peak": args + temp, "xla_peak": None, "source": "jaxpr", "compile_s": 0.0}


def step_memory_bytes(train_step, state, batch_shape, *, batch_sharding=None,
                      index: bool = True) -> dict:
  """Per-device memory of the compiled ``train_step(state, batch)`` for a global batch shape.

  Args:
    train_step: the jitted step of :func:`fcnjax.train.step.make_train_step` (anything with
      ``.lower(state, batch)``).
    state: its ``TrainState`` (arrays, possibly replicated over a mesh; only shapes, dtypes and
      shardings are used) or the same tree of ``ShapeDtypeStruct``.
    batch_shape: ``(B, H, W)``: global batch size and bucket shape in pixels. ``B`` must be a
      multiple of the batch sharding's device count.
    batch_sharding: default :func:`default_batch_sharding` of ``state``.
    index: include the loader's ``index`` field (see :func:`abstract_batch`).

  Returns a dict of ints (bytes per device): ``argument``, ``output``, ``alias``, ``temp``,
  ``generated_code``, ``peak`` = argument + output - alias + temp (see the module docstring),
  ``xla_peak`` (``peak_memory_in_bytes`` where the runtime has it; not used), plus ``source``
  (``"memory_analysis"`` or ``"jaxpr"``, the fallback) and ``compile_s`` (seconds, float; ~0
  when jit already had the program). Nothing is allocated on the device.
  """
  if batch_sharding is None:
    batch_sharding = default_batch_sharding(state)
  B = int(batch_shape[0])
  n = len(batch_sharding.device_set) if batch_sharding is not None else 1
  if B < 1 or B % n:
    raise ValueError(f"batch size {B} is not a positive multiple of the {n} devices it is "
                     "split over")
  abs_state = abstract_state(state)
  abs_batch = abstract_batch(batch_shape, batch_sharding, index=index)
  start = time.perf_counter()
  compiled = train_step.lower(abs_state, abs_batch).compile()
  seconds = time.perf_counter() - start
  try:
    stats = compiled.memory_analysis()
  except NotImplementedError:
    stats = None
  if stats is None or getattr(stats, "temp_size_in_bytes", None) is None:
    out = step_memory_bound(train_step, state, batch_shape, num_devices=n, index=index)
    out["compile_s"] = seconds
    return out
  get = lambda name: int(getattr(stats, name, 0) or 0)
  out = {"argument": get("argument_size_in_bytes"), "output": get("output_size_in_bytes"),
         "alias": get("alias_size_in_bytes"), "temp": get("temp_size_in_bytes"),
         "generated_code": get("generated_code_size_in_bytes")}
  out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
  out["xla_peak"] = get("peak_memory_in_bytes") or None
  out.update(source="memory_analysis", compile_s=seconds)
  return out


# -- the linear model ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class StepMemoryModel:
  """Per-device step memory ``fixed + b * (row + pixel * H * W)`` for ``b`` rows per device.

  ``fixed_bytes``: what does not grow with the batch (state, gradients, optimizer temporaries).
  ``row_bytes``: per-row overhead independent of H*W (>= 0; the exact FCNs' 100-pixel padding).
  ``pixel_bytes``: bytes per pixel of one row (activations, their gradients, the batch itself).
  ``calibration``: the compiles it was fitted on, tuples ``(B, H, W, peak bytes, source)`` at
  global batch ``B``; ``compiles`` / ``compile_s``: how many and their seconds in all;
  ``max_pixels``: the largest H*W it was calibrated on (beyond it, it extrapolates).
  """

  fixed_bytes: float
  row_bytes: float
  pixel_bytes: float
  num_devices: int
  calibration: tuple = ()
  compile_s: float = 0.0
  max_pixels: int = 0

  @property
  def compiles(self) -> int:
    return len(self.calibration)

  def bytes_at(self, batch_size: int, shape) -> int:
    """Estimated per-device bytes of global batch ``batch_size`` of bucket ``shape`` (H, W)."""
    b = int(batch_size) / self.num_devices
    h, w = (int(v) for v in shape)
    return int(math.ceil(self.fixed_bytes + b * (self.row_bytes + self.pixel_bytes * h * w)))

  def max_rows(self, shape, budget_bytes) -> int:
    """Most rows per device of bucket ``shape`` whose estimate is <= ``budget_bytes`` (may be 0)."""
    h, w = (int(v) for v in shape)
    per_row = self.row_bytes + self.pixel_bytes * h * w
    if per_row <= 0:
      return 1 << 30
    return max(0, int(math.floor((budget_bytes - self.fixed_bytes) / per_row)))


def _round_to(v: float, g: int) -> int:
  return max(g, int(round(v / g)) * g)


def calibration_shapes(bucket_shapes, *, max_pixels: int = DEFAULT_MAX_CALIBRATION_PIXELS,
                       granularity: int = CALIBRATION_GRANULARITY) -> list:
  """The (H, W) shapes :func:`calibrate` compiles: the largest bucket (scaled down, aspect kept,
  to ``max_pixels`` if larger) and, unless it is the only bucket, one of about half its area."""
  shapes = [(int(h), int(w)) for h, w in np.asarray(bucket_shapes, np.int64).reshape(-1, 2)]
  if not shapes:
    raise ValueError("no bucket shapes")
  H, W = max(shapes, key=lambda s: (s[0] * s[1], s))
  g = int(granularity)
  big = (H, W)
  if H * W > max_pixels:
    f = math.sqrt(max_pixels / (H * W))
    big = (max(g, int(H * f) // g * g), max(g, int(W * f) // g * g))
  if len(set(shapes)) == 1 and big == (H, W):
    return [big]
  small = (_round_to(big[0] / math.sqrt(2), g), _round_to(big[1] / math.sqrt(2), g))
  if small[0] * small[1] >= big[0] * big[1]:
    small = (max(1, big[0] // 2), big[1])
  return [big, small] if small[0] * small[1] < big[0] * big[1] else [big]


def calibrate(train_step, state, bucket_shapes, *, num_devices: int, batch_sizes=None,
              budget_bytes: int | None = None,
              max_calibration_pixels: int = DEFAULT_MAX_CALIBRATION_PIXELS,
              granularity: int = CALIBRATION_GRANULARITY, batch_sharding=None,
              index: bool = True) -> StepMemoryModel:
  """Fit :class:`StepMemoryModel` from 3 compiles (2 with a single bucket).

  With ``S1`` the largest bucket (or its stand-in of ``max_calibration_pixels``), ``S2`` a shape
  of half its area (:func:`calibration_shapes`), ``n = num_devices`` and ``M(B, S)`` the compiled
  peak (:func:`step_memory_bytes`), it compiles ``M(n, S1)``, ``M(r n, S1)`` and ``M(n, S2)``::

      per_row(S1) = (M(r n, S1) - M(n, S1)) / (r - 1);   fixed = M(n, S1) - per_row(S1)
      pixel = (per_row(S1) - (M(n, S2) - fixed)) / (area(S1) - area(S2)), clipped to
              [0, per_row(S1) / area(S1)];   row = per_row(S1) - pixel * area(S1)

  ``r`` (rows per device of the second compile) is 2, or - given ``batch_sizes`` (requested,
  per bucket) and ``budget_bytes`` - the largest bucket's requested rows, lowered to
  ``budget / M(n, S1)`` (at most what surely fits, so the compile itself cannot run out of
  memory), at least 2: when that is the batch training will use, training reuses the compile.

  The model reproduces the largest bucket at 1 and ``r`` rows per device exactly and has the
  local slope there. Per-row memory is concave in H*W when a model pads its input by a constant
  (exact FCNs) and linear otherwise, so that secant over-estimates the smaller buckets rather
  than under-estimating them (the clip keeps ``row >= 0``); memory is slightly convex in the rows
  (exact full-width FCN-8s at 512x512: +5 % per row from 2 to 4 rows), so rows between 1 and
  ``r`` are over-estimated too and rows beyond ``r`` a little under.
  """
  nd = int(num_devices)
  shapes = calibration_shapes(bucket_shapes, max_pixels=max_calibration_pixels,
                              granularity=granularity)
  runs = []

  def measure(B, shape):
    r = step_memory_bytes(train_step, state, (B, *shape), batch_sharding=batch_sharding,
                          index=index)
    runs.append((B, shape[0], shape[1], r["peak"], r["source"], r["compile_s"]))
    return r["peak"]

  s1 = shapes[0]
  m1 = measure(nd, s1)
  rows2 = 2
  all_shapes = [(int(h), int(w)) for h, w in np.asarray(bucket_shapes, np.int64).reshape(-1, 2)]
  if batch_sizes is not None and s1 in all_shapes:
    rows2 = int(batch_sizes[all_shapes.index(s1)]) // nd
    if budget_bytes is not None:
      rows2 = min(rows2, int(budget_bytes // max(m1, 1)))
    rows2 = max(rows2, 2)
  m2 = measure(rows2 * nd, s1)
  a1 = s1[0] * s1[1]
  per_row1 = max((m2 - m1) / (rows2 - 1), 1.0)
  fixed = m1 - per_row1
  pixel = per_row1 / a1
  if len(shapes) > 1:
    s2 = shapes[1]
    a2 = s2[0] * s2[1]
    per_row2 = measure(nd, s2) - fixed
    pixel = min(max((per_row1 - per_row2) / (a1 - a2), 0.0), per_row1 / a1)
  row = per_row1 - pixel * a1
  return StepMemoryModel(float(fixed), float(row), float(pixel), nd,
                         tuple(r[:5] for r in runs), float(sum(r[5] for r in runs)), a1)


# -- the plan -----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class MemoryPlan:
  """Batch sizes that fit, per bucket (in the order of ``bucket_shapes``).

  ``bucket_shapes``: list of (H, W). ``requested``: the global batch sizes asked for;
  ``batch_sizes``: the planned ones (multiples of ``num_devices``, never above the requested;
  pass them to ``make_train_loader(..., max_batch_sizes=plan.batch_sizes)``).
  ``estimated_bytes`` / ``requested_bytes``: per-device bytes at the planned / requested sizes
  (a verified bucket's figure is its compile's). ``verified``: per bucket, True if its planned
  figure is a compile of exactly that program. ``reduced``: indices of buckets whose batch was
  lowered. ``limit_bytes``, ``headroom``; ``budget_bytes`` = headroom x limit. ``model``: the
  :class:`StepMemoryModel` (None when ``method == "bound"``); ``compiles`` / ``compile_s``: every
  compile made (calibration and verification) and their total seconds. ``method``:
  ``"calibrated"`` (estimates from the model / compiles) or ``"bound"`` (the quick check: every
  bucket's :func:`step_memory_bound` at its requested size is under the budget; the estimates
  are those bounds and nothing was compiled).
  """

  bucket_shapes: list
  requested: list
  batch_sizes: list
  estimated_bytes: list
  requested_bytes: list
  verified: list
  reduced: list
  limit_bytes: int
  headroom: float
  num_devices: int
  model: StepMemoryModel | None
  compiles: int = 0
  compile_s: float = 0.0
  method: str = "calibrated"

  @property
  def budget_bytes(self) -> int:
    return int(self.headroom * self.limit_bytes)

  def log_lines(self) -> list:
    """One line per reduced bucket, e.g. ``bucket 4000x6000: batch 8 -> 2 to fit 72.0 GiB (0.9 of
    80.0 GiB) (est. 71.2 GiB at batch 2, 280.3 GiB at batch 8)``."""
    lines = []
    for k in self.reduced:
      h, w = self.bucket_shapes[k]
      how = "compiled" if self.verified[k] else "est."
      lines.append(
          f"bucket {h}x{w}: batch {self.requested[k]} -> {self.batch_sizes[k]} to fit "
          f"{format_bytes(self.budget_bytes)} ({self.headroom:g} of "
          f"{format_bytes(self.limit_bytes)} per device) ({how} "
          f"{format_bytes(self.estimated_bytes[k])} at batch {self.batch_sizes[k]}, est. "
          f"{format_bytes(self.requested_bytes[k])} at batch {self.requested[k]})")
    return lines

  def report(self) -> str:
    """The whole plan, one line per bucket, plus the model."""
    m = self.model
    if m is None:
      how = "upper bounds from the traced step, no compile"
    else:
      how = (f"model {format_bytes(m.fixed_bytes)} + rows x ({format_bytes(m.row_bytes)} + "
             f"{m.pixel_bytes:.0f} B/px) from {self.compiles} compiles ({self.compile_s:.1f} s)")
    lines = [f"memory plan: budget {format_bytes(self.budget_bytes)} per device "
             f"({self.headroom:g} of {format_bytes(self.limit_bytes)}); {how}"]
    for k, (h, w) in enumerate(self.bucket_shapes):
      mark = " (reduced)" if k in self.reduced else ""
      kind = "<=" if self.method == "bound" else "compiled" if self.verified[k] else "est."
      lines.append(f"  {h:5d} x {w:<5d} batch {self.batch_sizes[k]:4d}{mark}  {kind} "
                   f"{format_bytes(self.estimated_bytes[k])}")
    return "\n".join(lines)


def _image_entries(entries) -> list:
  """Normalise ``images_of_bucket`` values to [(name, h, w)]."""
  out = []
  for e in entries or ():
    if isinstance(e, dict):
      name, (h, w) = e.get("name", e.get("id", "?")), e["size"]
    elif len(e) == 2:
      name, (h, w) = e
    else:
      name, h, w = e
    out.append((str(name), int(h), int(w)))
  return out


def _largest_image(images_of_bucket, k, shape):
  if not images_of_bucket:
    return None
  entries = None
  if hasattr(images_of_bucket, "get"):
    entries = images_of_bucket.get(tuple(shape), images_of_bucket.get(k))
  elif k < len(images_of_bucket):
    entries = images_of_bucket[k]
  entries = _image_entries(entries)
  return max(entries, key=lambda e: (e[1] * e[2], e[0])) if entries else None


def _too_big(failures, budget, limit, headroom, nd):
  """StepMemoryError for ``failures``: [(shape, estimate, largest_image, compiled)], the largest
  bucket first."""
  (h, w), estimate, largest, compiled = failures[0]
  rows = "1 image" if nd == 1 else f"1 image per device (batch {nd} on {nd} devices)"
  how = "a compile of that program needs" if compiled else "the estimate is"
  where = ""
  if largest is not None:
    where = f"; the largest image in it is {largest[0]} ({largest[1]}x{largest[2]})"
  also = ""
  if len(failures) > 1:
    also = " Also too big: " + ", ".join(
        f"bucket {fh}x{fw} ({format_bytes(fe)}"
        + (f", largest image {fl[0]} ({fl[1]}x{fl[2]})" if fl else "") + ")"
        for (fh, fw), fe, fl, _ in failures[1:]) + "."
  msg = (f"bucket {h}x{w} does not fit in device memory even at {rows}: {how} "
         f"{format_bytes(estimate)} per device, over the budget of {format_bytes(budget)} "
         f"({headroom:g} of the {format_bytes(limit)} limit){where}.{also} Downscale it, remove "
         f"it from the split, or set {ENV_VAR} (bytes, or e.g. 80G) if the limit is wrong.")
  err = StepMemoryError(msg, bucket=(h, w), estimate_bytes=int(estimate), budget_bytes=budget,
                        limit_bytes=limit, largest_image=largest, compiled=compiled)
  err.failures = [(tuple(f[0]), int(f[1])) for f in failures]
  return err


def _is_oom(error: Exception) -> bool:
  text = str(error)
  return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def plan_from_model(model: StepMemoryModel, bucket_shapes, batch_sizes, *, num_devices: int,
                    limit_bytes: int, headroom: float = DEFAULT_HEADROOM,
                    images_of_bucket=None) -> MemoryPlan:
  """:func:`plan_batch_sizes` without compiling: caps from ``model`` alone (no verification)."""
  return _plan(model, bucket_shapes, batch_sizes, num_devices=num_devices,
               limit_bytes=limit_bytes, headroom=headroom, images_of_bucket=images_of_bucket,
               measure=None)


def _check_request(bucket_shapes, batch_sizes, num_devices, headroom):
  """-> (shapes [(H, W)], requested [int], nd), or ValueError."""
  nd = int(num_devices)
  shapes = [(int(h), int(w)) for h, w in np.asarray(bucket_shapes, np.int64).reshape(-1, 2)]
  requested = [int(b) for b in batch_sizes]
  if not shapes or len(requested) != len(shapes):
    raise ValueError(f"{len(requested)} batch sizes for {len(shapes)} buckets")
  if nd < 1 or any(b < nd or b % nd for b in requested):
    raise ValueError(f"batch sizes {requested} are not positive multiples of {nd} devices")
  if not 0 < headroom <= 1:
    raise ValueError(f"headroom must be in (0, 1], got {headroom}")
  return shapes, requested, nd


def _plan(model, bucket_shapes, batch_sizes, *, num_devices, limit_bytes, headroom,
          images_of_bucket, measure):
  shapes, requested, nd = _check_request(bucket_shapes, batch_sizes, num_devices, headroom)
  limit = int(limit_bytes)
  budget = int(headroom * limit)
  K = len(shapes)
  planned = list(requested)
  est = [model.bytes_at(b, s) for b, s in zip(requested, shapes)]
  req_est = list(est)
  verified = [False] * K
  for k in range(K):  # the model's caps
    rows = model.max_rows(shapes[k], budget)
    if rows < requested[k] // nd:
      planned[k] = max(rows, 1) * nd
      est[k] = model.bytes_at(planned[k], shapes[k])

  def verify(k):
    """Compile bucket k at planned[k], lowering it by num_devices while over the budget."""
    while True:
      try:
        est[k], verified[k] = measure(planned[k], shapes[k]), True
      except Exception as e:  # noqa: BLE001 - an out-of-memory compile means "does not fit"
        if not _is_oom(e):
          raise
        est[k], verified[k] = max(model.bytes_at(planned[k], shapes[k]), budget + 1), False
      if est[k] <= budget or planned[k] <= nd:
        return
      planned[k] -= nd

  capped = [k for k in range(K) if planned[k] < requested[k] or est[k] > budget]
  # Buckets that look too big even at one row per device go first; once one is confirmed, the
  # plan fails and nothing more is compiled (the others are reported from the model).
  order = sorted(capped, key=lambda k: (planned[k] > nd or est[k] <= budget, k))
  failures = []
  for k in order:
    if measure is not None and not failures:
      verify(k)
    if est[k] > budget:
      failures.append((shapes[k], est[k], _largest_image(images_of_bucket, k, shapes[k]),
                       verified[k]))
  if failures:
    failures.sort(key=lambda f: (-(f[0][0] * f[0][1]), f[0]))
    raise _too_big(failures, budget, limit, headroom, nd)
  reduced = [k for k in range(K) if planned[k] < requested[k]]
  return MemoryPlan(shapes, requested, planned, [int(e) for e in est], req_est, verified,
                    reduced, limit, float(headroom), nd, model)


def plan_batch_sizes(train_step, state, bucket_shapes, batch_sizes, *, num_devices: int,
                     limit_bytes: int | None = None, headroom: float = DEFAULT_HEADROOM,
                     images_of_bucket=None, verify: bool = True, quick: bool = True,
                     max_calibration_pixels: int = DEFAULT_MAX_CALIBRATION_PIXELS,
                     granularity: int = CALIBRATION_GRANULARITY, batch_sharding=None,
                     index: bool = True) -> MemoryPlan:
  """Per-bucket global batch sizes whose train step fits ``headroom * limit_bytes`` per device.

  Args:
    train_step, state: the jitted step and its (replicated) ``TrainState``, as the training loop
      builds them (:func:`step_memory_bytes`).
    bucket_shapes: (K, 2) (H, W) pixels; batch_sizes: (K,) requested global batch sizes
      (multiples of ``num_devices``), e.g. ``loader.bucket_shapes`` / ``loader.batch_sizes``.
    num_devices: global data-parallel device count (the mesh's size).
    limit_bytes: one device's memory; default :func:`device_memory_bytes` (ValueError if unknown).
    headroom: fraction of ``limit_bytes`` a step may use (the rest is for what the estimate does
      not see).
    images_of_bucket: optional, for the error message: mapping ``(H, W)`` (or bucket index) ->
      entries ``(name, h, w)`` or ``(name, (h, w))``, e.g. :func:`bucket_images`.
    verify: compile each bucket the model caps, at its capped size, and lower it further while
      the compile says it is over the budget (a compile that itself runs out of memory counts as
      over). Those are the programs training will run (jit reuses them); buckets that fit as
      asked are not compiled.
    quick: first check every bucket's :func:`step_memory_bound` (a trace each, no compile) at
      its requested size; if all are under the budget, return that plan (``method="bound"``,
      0 compiles) - the common case of a small model on a large device. Else calibrate.
    max_calibration_pixels, granularity: see :func:`calibrate`.

  Each bucket gets the largest multiple of ``num_devices`` not above its request whose estimate
  is <= ``headroom * limit_bytes``. Raises :class:`StepMemoryError` (a ValueError) when even
  ``num_devices`` rows (one image per device) are over: the message names the bucket, the
  estimate, the budget and limit, the largest image in the bucket (given ``images_of_bucket``)
  and what to do. Costs nothing (``quick``) or 2-3 compiles for the calibration (the second of
  them at the largest bucket's requested size when that surely fits) plus one per verified
  capped bucket.
  """
  shapes, requested, nd = _check_request(bucket_shapes, batch_sizes, num_devices, headroom)
  if limit_bytes is None:
    limit_bytes = device_memory_bytes()
    if limit_bytes is None:
      raise ValueError(f"cannot tell this device's memory; set {ENV_VAR} (e.g. {ENV_VAR}=16G)")
  budget = int(headroom * int(limit_bytes))
  if quick:  # the biggest batches first: the first bound over the budget ends the check
    bounds = [0] * len(shapes)
    for k in sorted(range(len(shapes)), key=lambda k: -requested[k] * shapes[k][0] * shapes[k][1]):
      bounds[k] = step_memory_bound(train_step, state, (requested[k], *shapes[k]),
                                    num_devices=nd, index=index)["peak"]
      if bounds[k] > budget:
        break
    else:
      return MemoryPlan(shapes, requested, list(requested), bounds, list(bounds),
                        [False] * len(shapes), [], int(limit_bytes), float(headroom), nd, None,
                        method="bound")
  model = calibrate(train_step, state, shapes, num_devices=nd, batch_sizes=requested,
                    budget_bytes=budget, max_calibration_pixels=max_calibration_pixels,
                    granularity=granularity, batch_sharding=batch_sharding, index=index)
  extra = []

  def measure(B, shape):
    r = step_memory_bytes(train_step, state, (B, *shape), batch_sharding=batch_sharding,
                          index=index)
    extra.append(r["compile_s"])
    return r["peak"]

  plan = _plan(model, bucket_shapes, batch_sizes, num_devices=num_devices,
               limit_bytes=limit_bytes, headroom=headroom, images_of_bucket=images_of_bucket,
               measure=measure if verify else None)
  return dataclasses.replace(plan, compiles=model.compiles + len(extra),
                             compile_s=model.compile_s + sum(extra))


# -- what the loader wastes ---------------------------------------------------------------------
def bucket_images(loader) -> dict:
  """``(H, W) -> [(name, h, w), ...]``: the images of ``loader``'s source that can land in each
  bucket at the augmentation's largest scale (their own, unscaled sizes), for
  :func:`plan_batch_sizes`'s ``images_of_bucket``. ``name`` is the image path when the source
  has ``image_paths``, else its id."""
  source = loader.load.source
  sizes = np.asarray(source.sizes, np.int64).reshape(-1, 2)
  aug = loader.load.augment
  scale = max(aug.scale_range) if aug is not None and aug.scale_range else 1.0
  shapes = np.asarray(loader.bucket_shapes, np.int64).reshape(-1, 2)
  reach = augment_lib.fit_sizes(augment_lib.scaled_sizes(sizes, np.full(len(sizes), scale)),
                                shapes)
  which = buckets_lib.assign_buckets(reach, shapes)
  names = (getattr(source, "image_paths", None) or getattr(source, "ids", None)
           or [str(i) for i in range(len(sizes))])
  out = {tuple(int(v) for v in s): [] for s in shapes}
  for i, k in enumerate(which):
    if k >= 0:
      out[tuple(int(v) for v in shapes[k])].append((str(names[i]), int(sizes[i, 0]),
                                                     int(sizes[i, 1])))
  return out


def dummy_row_warnings(loader, epoch: int | None = None) -> list:
  """Warnings for buckets that hold fewer images in an epoch than their batch size.

  For ``epoch``'s plan (default the loader's ``start_epoch``; ``loader.load.plan``), each bucket
  with 0 < images < batch size gets one line: how many rows of each of its batches are padding
  (dummy rows, ``index`` -1; with ``remainder="fill"`` repeated images), the fraction of that
  bucket's compute and memory they waste, their share of the epoch's batch pixels, and the fix.
  With ``remainder="drop"`` such a bucket yields no batch at all, and the line says its images are
  never trained on. Empty list when no bucket is short.
  """
  e = loader.start_epoch if epoch is None else int(epoch)
  plan = loader.load.plan(e)
  shapes = [tuple(int(v) for v in s) for s in loader.bucket_shapes]
  which = buckets_lib.assign_buckets(plan.out_sizes, np.asarray(shapes, np.int64))
  epoch_pixels = sum(len(r) * shapes[b][0] * shapes[b][1] for r, b in zip(plan.rows, plan.bucket))
  lines = []
  for k, ((h, w), bs) in enumerate(zip(shapes, loader.batch_sizes)):
    n_img = int((which == k).sum())
    if n_img == 0 or n_img >= bs:
      continue
    rows = [r for r, b in zip(plan.rows, plan.bucket) if b == k]
    fix = ("Fix: fewer or other buckets (max_buckets, bucket_shapes) so these images share a "
           "bucket, pixels_per_batch (large buckets get small batches), or max_batch_sizes.")
    if not rows:
      lines.append(f"bucket {h}x{w}: {n_img} image(s) in epoch {e} but batch {bs} and "
                   f"remainder='drop': they are dropped, never trained on. {fix}")
      continue
    total = sum(len(r) for r in rows)
    real = sum(len(np.unique(r[r >= 0])) for r in rows)
    pad = total - real
    share = pad * h * w / epoch_pixels if epoch_pixels else 0.0
    lines.append(f"bucket {h}x{w}: {n_img} image(s) in epoch {e} but batch {bs}: {pad} of its "
                 f"{total} rows are padding ({bs - n_img} per batch: dummies, or repeats with "
                 f"remainder='fill'), "
                 f"{100 * pad / total:.1f}% of this bucket's compute and memory is wasted "
                 f"({100 * share:.1f}% of the epoch's batch pixels). {fix}")
  return lines


__all__ = ["ENV_VAR", "DEFAULT_HEADROOM", "StepMemoryError", "StepMemoryModel", "MemoryPlan",
           "parse_bytes", "format_bytes", "host_memory_bytes", "device_memory_bytes",
           "abstract_state", "abstract_batch", "default_batch_sharding", "step_memory_bytes",
           "step_memory_bound",
           "calibration_shapes", "calibrate", "plan_from_model", "plan_batch_sizes",
           "bucket_images", "dummy_row_warnings"]
