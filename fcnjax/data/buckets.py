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


def _unique_rows(a):
  """``np.unique(a, axis=0, return_inverse=True)`` for (N, 2) non-negative ints, through one
  int64 key per row (a 1-D sort: ~10x faster than numpy's row-wise unique on 200k rows)."""
  a = np.asarray(a, np.int64)
  base = int(a[:, 1].max()) + 1 if len(a) else 1
  keys, inverse = np.unique(a[:, 0] * base + a[:, 1], return_inverse=True)
  return np.stack([keys // base, keys % base], 1), inverse.reshape(-1)


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
  auto: dict | None = None
  """For ``max_buckets="auto"``: what the choice was made from (see :meth:`auto_reason`):
  ``compile_s_per_bucket``, ``s_per_pixel``, ``epochs``, ``costs`` (K -> (compile s, compute s)
  of each K solved) and ``stop`` (why larger K were not tried). None for a fixed K."""

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

  def auto_reason(self) -> str:
    """One line: the K ``auto`` chose and why (its modelled seconds against the neighbouring K,
    and why no larger K was tried). "" for a plan made with a fixed K."""
    if not self.auto:
      return ""
    a, k = self.auto, self.num_buckets
    costs = a["costs"]
    comp, work = costs[k]
    line = (f"auto chose K = {k}: {comp:.1f} s of compiles + {work:.1f} s of steps on padded "
            f"pixels = {comp + work:.1f} s over {a['epochs']:g} epochs "
            f"({a['compile_s_per_bucket']:.3g} s/bucket, {a['s_per_pixel']:.3g} s/px)")
    others = [f"K = {j}: {sum(costs[j]):.1f} s" for j in (k - 1, k + 1) if j in costs]
    if others:
      line += "; " + ", ".join(others)
    return line + f"; {a['stop']}"

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
    distinct, inverse = _unique_rows(sizes)
    dw = np.bincount(inverse.reshape(-1), weights=w, minlength=len(distinct))
    step = g
    cap = -(-distinct.max(axis=0) // g) * g  # coarse rounding never goes past the largest size
    while True:
      rounded = np.minimum(-(-distinct // step) * step, cap)
      self.shapes, inv = _unique_rows(rounded)
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

  def used(self, chosen) -> list:
    """The buckets of ``chosen`` that some shape is assigned to (smallest area that holds it)."""
    which = assign_buckets(self.shapes[self.w > 0], self.cand[list(chosen)])
    return [c for i, c in enumerate(chosen) if (which == i).any()]


class _Gains:
  """What adding each candidate would save, kept up to date as the chosen buckets change.

  ``per``: (S,) float64, each shape's cost (area of its bucket) under the current buckets, which
  cover every shape. ``gain``: (C,) float64, ``gain[c] = sum_s w_s * max(per_s - cost[c, s], 0)``:
  the padded area that adding candidate c saves. :meth:`update` corrects ``gain`` only on the
  shapes whose cost changed, so a greedy addition or a local-search swap costs candidates x
  changed shapes, not candidates x shapes.
  """

  def __init__(self, prob: _Problem, chosen):
    self.prob = prob
    self.per = prob.per_shape(chosen).astype(np.float64)
    self.gain = self.contribution(slice(None), self.per)

  def contribution(self, cols, per_cols) -> np.ndarray:
    """(C,) savings of every candidate on the shapes ``cols`` if they cost ``per_cols``."""
    cost = self.prob.cost[:, cols].astype(np.float64)
    return np.maximum(per_cols[None, :] - cost, 0.0) @ self.prob.w[cols]

  def update(self, chosen) -> None:
    per = self.prob.per_shape(chosen).astype(np.float64)
    cols = np.flatnonzero(per != self.per)
    if len(cols):
      self.gain += (self.contribution(cols, per[cols])
                    - self.contribution(cols, self.per[cols]))
      self.per = per

  def total(self) -> float:
    return float(self.prob.w @ self.per)


def _add_greedily(prob: _Problem, chosen: list, gains: _Gains, k: int):
  """Add to ``chosen`` the candidate that saves most area, while one saves some and fewer than
  ``k`` are chosen; yields (chosen, total padded area) after each addition."""
  while len(chosen) < min(k, len(prob.cand)):
    b = int(gains.gain.argmax())
    if b in chosen or gains.gain[b] <= 1e-6:
      return  # nothing saves area any more: fewer buckets than allowed
    chosen.append(b)
    gains.update(chosen)
    yield chosen, gains.total()


def _local_search(prob: _Problem, chosen: list, gains: _Gains) -> list:
  """Swap any bucket of ``chosen`` (which covers every shape) for the best replacement while the
  exact total drops and every shape stays covered; passes over the buckets repeat while a swap
  helps. Removing bucket j changes only the shapes assigned to j (their cost falls back to their
  second-best bucket, or to uncovered), so each removal's gains are ``gains`` corrected on those
  columns. A swap is kept only if the exactly recomputed total is lower, so the search ends."""
  chosen = list(chosen)
  total = prob.total(chosen)
  improved = True
  while improved:
    improved = False
    j = 0
    while j < len(chosen):
      rows = prob.cost[chosen]  # (K, S)
      owner = rows.argmin(axis=0)
      second = (np.partition(rows, 1, axis=0)[1] if len(chosen) > 1
                else np.full(rows.shape[1], _UNCOVERED, np.float32)).astype(np.float64)
      cols = np.flatnonzero(owner == j)
      gain = gains.gain + (gains.contribution(cols, second[cols])
                           - gains.contribution(cols, gains.per[cols]))
      b = int(gain.argmax())
      if b not in chosen:
        candidate = chosen[:j] + [b] + chosen[j + 1:]
        t = prob.total(candidate)
        if t < total - 1e-6:
          chosen, total, improved = candidate, t, True
          gains.update(chosen)
      j += 1
  return chosen


def _solve(prob: _Problem, k: int, init=None):
  """(chosen candidate indices, total padded area): greedy additions from ``init`` (default:
  the bucket of the largest height and width, which holds everything), then local search that
  swaps any bucket - that one included - for the best replacement while the total drops and
  every shape stays covered. Buckets no shape is assigned to are dropped."""
  chosen = list(init) if init else [prob.top]
  gains = _Gains(prob, chosen)
  for _ in _add_greedily(prob, chosen, gains, k):
    pass
  chosen = _local_search(prob, chosen, gains)
  chosen = prob.used(chosen)
  return chosen, prob.total(chosen)


def _solve_auto(prob: _Problem, compile_s: float, s_per_pixel: float, epochs: float,
                max_k: int):
  """(chosen candidate indices, the ``BucketPlan.auto`` record) for ``max_buckets="auto"``.

  Sweeps K = 1, 2, ... with greedy additions (one vectorised pass per K, so every K's modelled
  cost ``compile_s * K + s_per_pixel * padded area * epochs`` is known after K passes), stopping
  once K compiles alone cost more than the best plan or an added bucket saves nothing; then
  refines the best K with the local search of :func:`_solve` (which only lowers its cost, so it
  stays the cheapest K of the sweep)."""
  def cost(chosen, total):
    return compile_s * len(chosen), s_per_pixel * total * epochs

  chosen = [prob.top]
  gains = _Gains(prob, chosen)
  greedy = {1: (list(chosen), gains.total())}
  best_cost = sum(cost(chosen, gains.total()))
  stop = f"K = {max_k} is the largest K tried (max_auto_buckets)"
  for chosen, total in _add_greedily(prob, chosen, gains, max_k):
    k = len(chosen)
    greedy[k] = (list(chosen), total)
    best_cost = min(best_cost, sum(cost(chosen, total)))
    if compile_s * (k + 1) >= best_cost and k < max_k:
      stop = (f"K >= {k + 1} not tried: {k + 1} compiles alone ({compile_s * (k + 1):.1f} s) "
              f"cost more than the best plan")
      break
  else:
    if len(greedy) < max_k:
      k = len(greedy)
      stop = (f"K >= {k + 1} not tried: a bucket more saves no padding ({k} already fit every "
              f"size as tightly as they can)")
  costs = {k: cost(c, t) for k, (c, t) in greedy.items()}
  k_best = min(costs, key=lambda k: sum(costs[k]))
  c, t = _solve(prob, k_best, init=greedy[k_best][0])
  costs[len(c)] = min(costs.get(len(c), (np.inf, np.inf)), cost(c, t), key=sum)
  return c, {
      "compile_s_per_bucket": compile_s, "s_per_pixel": s_per_pixel, "epochs": epochs,
      "costs": costs, "stop": stop}


def plan_buckets(sizes, max_buckets=8, *, granularity: int = 1,
                 compile_s_per_bucket: float = DEFAULT_COMPILE_S_PER_BUCKET,
                 s_per_pixel: float = DEFAULT_S_PER_PIXEL, epochs: float = 1.0,
                 max_auto_buckets: int = 32, weights=None) -> BucketPlan:
  """Bucket shapes for ``sizes`` ((N, 2) height, width in pixels) with at most ``max_buckets``.

  ``granularity``: bucket H and W are multiples of it (e.g. 32). Every bucket holds some image
  (a plan may have fewer than ``max_buckets``). ``max_buckets="auto"``: the K in
  1..``max_auto_buckets`` minimising ``compile_s_per_bucket * K + s_per_pixel * padded_pixels *
  epochs`` (padded_pixels = sum of bucket areas over ``sizes`` weighted by ``weights``, i.e. one
  epoch; K is swept with greedy plans, stopping once K buckets' compile cost alone exceeds the
  best total, and the best K is refined by local search; the plan's
  :meth:`BucketPlan.auto_reason` says what was chosen and why). ``weights``
  (N,): what each size counts for (e.g. ``1 / num_scales`` for sizes at several augmentation
  scales, of which an epoch draws one per image); default 1.
  """
  sizes = _as_sizes(sizes)
  if weights is not None and len(np.asarray(weights).reshape(-1)) != len(sizes):
    raise ValueError(f"{len(np.asarray(weights).reshape(-1))} weights for {len(sizes)} sizes")
  prob = _Problem(sizes, granularity, weights)
  auto = None
  if max_buckets == "auto":
    chosen, auto = _solve_auto(prob, float(compile_s_per_bucket), float(s_per_pixel),
                               float(epochs), int(max_auto_buckets))
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
                    granularity=int(granularity), auto=auto)


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
