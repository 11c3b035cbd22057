"""Bucket shapes that minimise padding, and batch sizes per bucket.

An image of size (h, w) goes to the **smallest-area bucket (H, W) with H >= h and W >= w** (ties:
smaller H, then smaller W), and is padded at the bottom/right to H x W. Given the image sizes and a
maximum number of buckets K, :func:`plan_buckets` chooses the bucket shapes that minimise the total
padded area (sum over images of H*W), i.e. the padded-pixel fraction ``1 - real / padded pixels``.

Algorithm: candidate shapes are (H, W) pairs of observed heights and widths (rounded up to
``granularity``). Start from (max h, max w), which holds every image; greedy additions (the
candidate that saves most padded area, while one does), then local search (swap any bucket, the
first one included, for the best replacement while it saves area and every image still fits
somewhere: 480x640 + 640x480 photos get exactly those two buckets). Buckets no image is assigned
to are dropped. On the 387 real VOC 2012 shapes this takes well under 2 s and
K = 8 wastes ~2.5 % of pixels (one 500x500 bucket wastes 28.4 %).

``max_buckets="auto"`` picks K minimising ``compile_s_per_bucket * K + s_per_pixel * padded pixels
per epoch * epochs``: each bucket costs one XLA compile of the train step, each padded pixel costs
compute every epoch. Measure both on your machine and pass them in.
"""

from __future__ import annotations

import dataclasses

import numpy as np

DEFAULT_COMPILE_S_PER_BUCKET = 3.0
"""Seconds to compile one new train-step shape: the CPU default of the ``auto`` cost model
(an FCN-8s VGG16 train step on XLA:CPU; measurements in benchmarks/RESULTS.md)."""
DEFAULT_S_PER_PIXEL = 6e-5
"""Train-step seconds per input pixel at batch 1: the CPU default of the ``auto`` cost model
(a full-width FCN-8s float32 step on 2 CPU cores; a GPU is about 1000x less; measurements in
benchmarks/RESULTS.md)."""


def _as_sizes(sizes) -> np.ndarray:
  sizes = np.asarray(sizes, np.int64).reshape(-1, 2)
  if len(sizes) == 0:
    raise ValueError("no sizes to plan buckets for")
  if (sizes <= 0).any():
    raise ValueError("sizes must be positive (height, width) pairs")
  return sizes


def sort_shapes(shapes) -> np.ndarray:
  """Bucket shapes (K, 2) sorted by (area, H, W): the order of the assignment's tie-break."""
  shapes = np.unique(np.asarray(shapes, np.int64).reshape(-1, 2), axis=0)
  order = np.lexsort((shapes[:, 1], shapes[:, 0], shapes[:, 0] * shapes[:, 1]))
  return shapes[order]


def assign_buckets(sizes, shapes) -> np.ndarray:
  """Bucket index (into ``shapes`` as given) for each (h, w): smallest area that holds it.

  Ties are broken by smaller H, then smaller W. Returns (N,) int64, -1 where no bucket holds it.
  """
  sizes = np.asarray(sizes, np.int64).reshape(-1, 2)
  shapes = np.asarray(shapes, np.int64).reshape(-1, 2)
  order = np.lexsort((shapes[:, 1], shapes[:, 0], shapes[:, 0] * shapes[:, 1]))
  fits = ((shapes[order, None, 0] >= sizes[None, :, 0])
          & (shapes[order, None, 1] >= sizes[None, :, 1]))  # (K, N)
  first = fits.argmax(axis=0)
  return np.where(fits.any(axis=0), order[first], -1)


def padded_fraction(sizes, shapes) -> float:
  """Fraction of the padded pixels that are padding: 1 - sum(h*w) / sum(H*W of its bucket)."""
  sizes = _as_sizes(sizes)
  shapes = np.asarray(shapes, np.int64).reshape(-1, 2)
  b = assign_buckets(sizes, shapes)
  if (b < 0).any():
    raise ValueError(f"{int((b < 0).sum())} sizes fit in no bucket")
  padded = (shapes[b, 0] * shapes[b, 1]).sum()
  return float(1.0 - (sizes[:, 0] * sizes[:, 1]).sum() / padded)


@dataclasses.dataclass(frozen=True)
class BucketPlan:
  """Chosen bucket shapes and what they cost on the sizes they were planned for.

  ``shapes``: (K, 2) int (H, W) pixels, sorted by area. ``counts``: (K,) images per bucket.
  ``real_pixels`` / ``padded_pixels``: totals over the planned sizes.
  """

  shapes: np.ndarray
  counts: np.ndarray
  real_pixels: int
  padded_pixels: int
  granularity: int = 1

  @property
  def num_buckets(self) -> int:
    return len(self.shapes)

  @property
  def padded_fraction(self) -> float:
    return 1.0 - self.real_pixels / self.padded_pixels

  @property
  def shape_list(self) -> list:
    return [(int(h), int(w)) for h, w in self.shapes]

  def assign(self, sizes) -> np.ndarray:
    return assign_buckets(sizes, self.shapes)

  def report(self) -> str:
    n = int(self.counts.sum())
    lines = [f"{self.num_buckets} buckets for {n} images: padded-pixel fraction "
             f"{100 * self.padded_fraction:.2f}% ({self.padded_pixels - self.real_pixels:,} of "
             f"{self.padded_pixels:,} pixels are padding)"]
    for (h, w), c in zip(self.shapes, self.counts):
      lines.append(f"  {int(h):5d} x {int(w):<5d} {int(c):6d} images ({100 * c / n:5.1f}%)")
    return "\n".join(lines)


MAX_PROBLEM_CELLS = 6_000_000
"""Candidates x distinct shapes above which sizes are rounded to a coarser multiple first."""


def _candidates(shapes):
  """(H, W) pairs of observed heights and widths that are tight: some shape has exactly that height
  and a width <= W, and some shape has exactly that width and a height <= H (others can shrink)."""
  def min_other_at(col):
    order = np.argsort(shapes[:, col], kind="stable")
    vals, starts = np.unique(shapes[order, col], return_index=True)
    return vals, np.minimum.reduceat(shapes[order, 1 - col], starts)
  hs, min_w_at_h = min_other_at(0)
  ws, min_h_at_w = min_other_at(1)
  keep = (ws[None, :] >= min_w_at_h[:, None]) & (hs[:, None] >= min_h_at_w[None, :])
  hi, wi = np.nonzero(keep)
  return np.stack([hs[hi], ws[wi]], 1)


_UNCOVERED = 1e15
"""Cost (area) of a shape that no chosen bucket holds: larger than any real total, so a search
step that leaves a shape uncovered is never an improvement."""


class _Problem:
  """Weighted distinct shapes + candidate buckets, with vectorised cost evaluation.

  Sizes are rounded up to multiples of ``granularity``; if candidates x shapes would exceed
  :data:`MAX_PROBLEM_CELLS` (e.g. sizes at many augmentation scales), to ``granularity`` times
  the smallest power of two that fits (``self.step``), capped at the largest size (so a largest
  image of 1000 x 1000 keeps a 1000 x 1000 bucket), found in O(log) roundings of the distinct
  sizes. ``weights``: per-size weight (default 1).
  """

  def __init__(self, sizes, granularity, weights=None):
    g = int(granularity)
    w = np.ones(len(sizes)) if weights is None else np.asarray(weights, np.float64)
    distinct, inverse = np.unique(sizes, axis=0, return_inverse=True)
    dw = np.bincount(inverse.reshape(-1), weights=w, minlength=len(distinct))
    step = g
    cap = -(-distinct.max(axis=0) // g) * g  # coarse rounding never goes past the largest size
    while True:
      rounded = np.minimum(-(-distinct // step) * step, cap)
      self.shapes, inv = np.unique(rounded, axis=0, return_inverse=True)
      cand = _candidates(self.shapes)
      if len(cand) * len(self.shapes) <= MAX_PROBLEM_CELLS:
        break
      step *= 2
    self.step = step
    self.w = np.bincount(inv.reshape(-1), weights=dw, minlength=len(self.shapes))
    hs, ws = self.shapes[:, 0], self.shapes[:, 1]
    self.cand = cand
    fits = (cand[:, None, 0] >= hs[None]) & (cand[:, None, 1] >= ws[None])
    self.area = (cand[:, 0] * cand[:, 1]).astype(np.float64)
    self.top = int(np.flatnonzero((cand[:, 0] == hs.max()) & (cand[:, 1] == ws.max()))[0])
    # Cost of a shape inside each candidate; _UNCOVERED where it does not fit.
    self.cost = np.where(fits, self.area[:, None], _UNCOVERED).astype(np.float32)

  def per_shape(self, chosen):
    if not chosen:
      return np.full(len(self.shapes), _UNCOVERED, np.float32)
    return self.cost[list(chosen)].min(axis=0)

  def total(self, chosen) -> float:
    return float(self.w @ self.per_shape(chosen).astype(np.float64))

  def best_addition(self, per_shape):
    """(candidate, total after adding it) minimising the total."""
    # Covered shapes in float32 (the big matrix); shapes left uncovered (a search step that
    # removed their only bucket) in float64 on their few columns, so candidates that would cover
    # them are still told apart by area.
    uncovered = per_shape >= _UNCOVERED / 2
    per0 = np.where(uncovered, 0, per_shape).astype(np.float32)
    gain = (np.maximum(per0[None, :] - self.cost, 0.0) @ self.w.astype(np.float32)).astype(
        np.float64)
    if uncovered.any():
      cu = self.cost[:, uncovered].astype(np.float64)
      gain += np.where(cu < _UNCOVERED / 2, _UNCOVERED - cu, 0.0) @ self.w[uncovered]
    b = int(gain.argmax())
    return b, float(self.w @ per_shape.astype(np.float64) - gain[b])

  def used(self, chosen) -> list:
    """The buckets of ``chosen`` that some shape is assigned to (smallest area that holds it)."""
    which = assign_buckets(self.shapes[self.w > 0], self.cand[list(chosen)])
    return [c for i, c in enumerate(chosen) if (which == i).any()]


def _solve(prob: _Problem, k: int, init=None):
  """(chosen candidate indices, total padded area): greedy additions from ``init`` (default:
  the bucket of the largest height and width, which holds everything), then local search that
  swaps any bucket - that one included - for the best replacement while the total drops and
  every shape stays covered. Buckets no shape is assigned to are dropped."""
  chosen = list(init) if init else [prob.top]
  per = prob.per_shape(chosen)
  total = float(prob.w @ per.astype(np.float64))
  while len(chosen) < min(k, len(prob.cand)):
    b, t = prob.best_addition(per)
    if b in chosen or t >= total - 1e-6:
      break  # nothing saves area any more: fewer buckets than allowed
    chosen.append(b)
    per = np.minimum(per, prob.cost[b])
    total = t
  improved = True
  while improved:  # one pass over the buckets, repeated while some swap helps
    improved = False
    for j in range(len(chosen)):
      rest = chosen[:j] + chosen[j + 1:]
      b, t = prob.best_addition(prob.per_shape(rest))
      if t < total - 1e-6 and b not in rest:
        chosen = rest[:j] + [b] + rest[j:]
        total = t
        improved = True
  chosen = prob.used(chosen)
  return chosen, prob.total(chosen)


def plan_buckets(sizes, max_buckets=8, *, granularity: int = 1,
                 compile_s_per_bucket: float = DEFAULT_COMPILE_S_PER_BUCKET,
                 s_per_pixel: float = DEFAULT_S_PER_PIXEL, epochs: float = 1.0,
                 max_auto_buckets: int = 32, weights=None) -> BucketPlan:
  """Bucket shapes for ``sizes`` ((N, 2) height, width in pixels) with at most ``max_buckets``.

  ``granularity``: bucket H and W are multiples of it (e.g. 32). Every bucket holds some image
  (a plan may have fewer than ``max_buckets``). ``max_buckets="auto"``: the K in
  1..``max_auto_buckets`` minimising ``compile_s_per_bucket * K + s_per_pixel * padded_pixels *
  epochs`` (padded_pixels = sum of bucket areas over ``sizes`` weighted by ``weights``, i.e. one
  epoch; the search stops once K buckets' compile cost alone exceeds the best total). ``weights``
  (N,): what each size counts for (e.g. ``1 / num_scales`` for sizes at several augmentation
  scales, of which an epoch draws one per image); default 1.
  """
  sizes = _as_sizes(sizes)
  if weights is not None and len(np.asarray(weights).reshape(-1)) != len(sizes):
    raise ValueError(f"{len(np.asarray(weights).reshape(-1))} weights for {len(sizes)} sizes")
  prob = _Problem(sizes, granularity, weights)
  if max_buckets == "auto":
    best, best_cost, prev = None, np.inf, None
    for k in range(1, int(max_auto_buckets) + 1):
      if compile_s_per_bucket * k >= best_cost:
        break  # the compiles alone cost more than the best plan found
      chosen, total = _solve(prob, k, init=prev)
      cost = compile_s_per_bucket * len(chosen) + s_per_pixel * total * epochs
      if cost < best_cost - 1e-9:
        best, best_cost = chosen, cost
      if len(chosen) < k:
        break  # more buckets save nothing: every further K gives this plan
      prev = chosen
    chosen = best
  else:
    k = int(max_buckets)
    if k < 1:
      raise ValueError("max_buckets must be >= 1 or 'auto'")
    chosen, _ = _solve(prob, k)
  shapes = sort_shapes(prob.cand[chosen])
  b = assign_buckets(sizes, shapes)
  counts = np.bincount(b, minlength=len(shapes))
  return BucketPlan(shapes=shapes, counts=counts,
                    real_pixels=int((sizes[:, 0] * sizes[:, 1]).sum()),
                    padded_pixels=int((shapes[b, 0] * shapes[b, 1]).sum()),
                    granularity=int(granularity))


def batch_sizes(shapes, *, batch_size: int | None = None, pixels_per_batch: int | None = None,
                num_devices: int = 1, max_batch_sizes=None) -> np.ndarray:
  """Global batch size per bucket: fixed ``batch_size`` or ``pixels_per_batch // (H*W)``.

  Always a positive multiple of ``num_devices`` (the global data-parallel device count; a pixel
  budget too small for one image per device still gives ``num_devices``).

  ``max_batch_sizes``: optional per-bucket caps applied after that (e.g. a memory plan's, see
  :func:`fcnjax.train.memory.plan_batch_sizes`): a sequence with one entry per row of ``shapes``
  (same order), or a mapping ``(H, W) -> cap`` (buckets it does not name are not capped); an
  entry ``None`` means no cap. Each cap must be a positive multiple of ``num_devices``; a bucket's
  size becomes ``min(size, cap)``. ``None`` (default) changes nothing.
  """
  shapes = np.asarray(shapes, np.int64).reshape(-1, 2)
  nd = int(num_devices)
  if nd < 1:
    raise ValueError("num_devices must be >= 1")
  if (batch_size is None) == (pixels_per_batch is None):
    raise ValueError("give exactly one of batch_size, pixels_per_batch")
  if batch_size is not None:
    if batch_size < 1 or batch_size % nd:
      raise ValueError(f"batch_size {batch_size} is not a positive multiple of {nd} devices")
    sizes = np.full(len(shapes), int(batch_size), np.int64)
  else:
    per = pixels_per_batch // (shapes[:, 0] * shapes[:, 1])
    sizes = np.maximum(per // nd * nd, nd).astype(np.int64)
  if max_batch_sizes is None:
    return sizes
  return np.minimum(sizes, _caps(shapes, max_batch_sizes, nd))


def _caps(shapes, max_batch_sizes, nd) -> np.ndarray:
  """``max_batch_sizes`` (sequence or mapping, see :func:`batch_sizes`) -> (K,) int64 caps."""
  no_cap = np.iinfo(np.int64).max
  if hasattr(max_batch_sizes, "keys"):
    known = {(int(h), int(w)) for h, w in shapes}
    by_shape = {}
    for key, cap in max_batch_sizes.items():
      hw = tuple(int(v) for v in key)
      if hw not in known:
        raise ValueError(f"max_batch_sizes names bucket {hw[0]}x{hw[1]}, which is not one of the "
                         f"buckets {sorted(known)}")
      by_shape[hw] = cap
    caps = [by_shape.get((int(h), int(w))) for h, w in shapes]
  else:
    caps = list(max_batch_sizes)
    if len(caps) != len(shapes):
      raise ValueError(f"max_batch_sizes has {len(caps)} entries for {len(shapes)} buckets")
  out = np.full(len(shapes), no_cap, np.int64)
  for k, cap in enumerate(caps):
    if cap is None:
      continue
    if int(cap) != cap or cap < 1 or int(cap) % nd:
      h, w = (int(v) for v in shapes[k])
      raise ValueError(f"max_batch_sizes: cap {cap!r} for bucket {h}x{w} is not a positive "
                       f"multiple of {nd} devices")
    out[k] = int(cap)
  return out
