"""Fused train step vs a split one: per-shape gradient program + one shape-independent update.

    python -m benchmarks.step_split [--model fcn8s] [--width-multiplier 0.125] [--aligned]
        [--precision fp32|bf16] [--batch-size 8] [--shapes HxW,HxW,...] [--optimizers sgd,adamw]
        [--steps 3] [--ks 4,8] [--out benchmarks/results/step_split-<backend>-<date>.json] [--quick]

Issue 13: does splitting :func:`fcnjax.train.step.make_train_step` (forward + loss + grads + optax
update, one XLA program per batch shape) into

* ``grad_step(params, rest, batch) -> (grads, rest, metrics)``, jitted per batch shape, and
* ``opt_update(params, opt_state, grads) -> (params, opt_state)``, jitted **once** (its inputs
  have the parameters' shapes, whatever the batch shape),

cut the per-bucket compile time enough to keep, without slowing the step? Per optimizer (the
benchmark's SGD-momentum + poly of :class:`benchmarks.buckets.Bench`, and ``optax.adamw`` through
:func:`fcnjax.train.optim.modern_optimizer`, whose update is heavier) and per batch shape:

* compile seconds: ``jit(f).lower(*args)`` + ``.compile()`` wall time, after ``jax.clear_caches()``
  (in-memory caches) with the persistent compilation cache off; the update program once;
* step seconds: median of ``--steps`` timed steps after one warm-up, ``block_until_ready`` on
  every output (split: two dispatches, grad then update).

Fused and split are measured round-robin: per shape both compile back to back (which goes first
alternates), then their timed steps interleave, so machine load hits both alike. Donation follows
the fused step (it donates the whole state): ``grad_step`` donates ``rest``, ``opt_update``
donates ``params`` and ``opt_state``.

Totals for K buckets: fused K compiles; split K grad compiles + 1 update compile, each K x the
mean per-shape compile over the measured shapes (exact sums when K = number of shapes).
Verdict: keep the split only if, for every optimizer, the total compile for every K in ``--ks``
falls by >= 10 % and the median over shapes of (split step / fused step) is <= 1.02.

Correctness: from identical states and one batch, the split step's new params must equal the
fused step's (max |diff| <= 1e-6 x max |param| over all parameters, float32); otherwise the run
fails (exit 2) after writing the JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import sys
import time

import numpy as np

from benchmarks.buckets import (OPTIMIZER_STEPS, SGD_LEARNING_RATE, SGD_MOMENTUM,
                                SGD_WEIGHT_DECAY, Bench, BenchConfig, CompileEvents,
                                default_sizes_csv, load_sizes, machine_info, scale_sizes)

COMPILE_SAVING_MIN = 0.10
"""Keep the split only if total compile seconds fall by at least this fraction ..."""
STEP_SLOWDOWN_MAX = 0.02
"""... and the median step ratio split / fused is at most 1 + this."""
PARAM_RTOL = 1e-6
"""Equality: max |params_split - params_fused| <= PARAM_RTOL * max |params_fused| (and the step
moved the params by more than that, so the check is not vacuous)."""
ADAMW_LEARNING_RATE = 1e-3
DEFAULT_SCALE = 0.25
DEFAULT_BUCKETS = 4
QUICK = dict(width_multiplier=0.0625, aligned=True, batch_size=2, shapes="32x32,32x64", steps=2)
QUICK_XLA_FLAG = "--xla_backend_optimization_level=0"
"""``--quick`` only (tests): cheaper CPU compiles; its timings mean nothing, only the mechanics."""


# ---------------------------------------------------------------------------------------------
# The split step
# ---------------------------------------------------------------------------------------------
def make_split_step(graphdef, tx, *, reduction: str = "mean"):
  """(``grad_step``, ``opt_update``), both jitted; together they compute what
  :func:`fcnjax.train.step.make_train_step` (CE loss, no Dice, no class weights) does.

  ``grad_step(params, rest, batch) -> (grads, rest, metrics)`` (metrics: ``loss``,
  ``valid_pixels``, ``grad_norm``; donates ``rest``). ``opt_update(params, opt_state, grads) ->
  (params, opt_state)`` (donates ``params``, ``opt_state``).
  """
  import jax
  import optax
  from flax import nnx

  from fcnjax.train import step as step_lib
  from fcnjax.train.loss import segmentation_loss

  def grad_step(params, rest, batch):
    def loss_fn(p):
      model = nnx.merge(graphdef, p, rest, copy=True)
      model.train()
      logits = model(batch["image"])
      ce, valid = segmentation_loss(logits, batch["label"], batch["mask"], reduction=reduction)
      _, _, new_rest = step_lib.split_model(model)
      return ce, (valid, new_rest)

    (loss, (valid, new_rest)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return grads, new_rest, {"loss": loss, "valid_pixels": valid,
                             "grad_norm": optax.tree.norm(grads)}

  def opt_update(params, opt_state, grads):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return jax.jit(grad_step, donate_argnums=(1,)), jax.jit(opt_update, donate_argnums=(0, 1))


def make_optimizer(name: str):
  """The benchmark's SGD-momentum + poly (as :class:`Bench`), or AdamW with the same schedule."""
  from fcnjax.train import optim
  if name == "sgd":
    return optim.modern_optimizer("sgd", SGD_LEARNING_RATE, total_steps=OPTIMIZER_STEPS,
                                  schedule="poly", momentum=SGD_MOMENTUM,
                                  weight_decay=SGD_WEIGHT_DECAY)
  if name == "adamw":
    return optim.modern_optimizer("adamw", ADAMW_LEARNING_RATE, total_steps=OPTIMIZER_STEPS,
                                  schedule="poly")
  raise ValueError(f"optimizer must be sgd or adamw, got {name!r}")


OPTIMIZER_NOTES = {
    "sgd": f"SGD momentum {SGD_MOMENTUM}, wd {SGD_WEIGHT_DECAY}, lr {SGD_LEARNING_RATE} poly "
           f"over {OPTIMIZER_STEPS} steps (benchmarks.buckets.Bench)",
    "adamw": f"optax.adamw lr {ADAMW_LEARNING_RATE} poly over {OPTIMIZER_STEPS} steps, wd 1e-2 "
             "(modern_optimizer)",
}


# ---------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------
def _copy(tree):
  import jax
  return jax.tree.map(lambda x: x.copy(), tree)


def _block(tree):
  import jax
  return jax.block_until_ready(tree)


def timed_compile(jitted, args, events: CompileEvents) -> tuple:
  """(compiled, {lower_s, compile_s, total_s, backend_compile_s, xla_compiles}) after
  ``jax.clear_caches()``."""
  import jax
  jax.clear_caches()
  mark = events.mark()
  t0 = time.perf_counter()
  lowered = jitted.lower(*args)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  n, backend = events.since(mark)
  return compiled, {"lower_s": t1 - t0, "compile_s": t2 - t1, "total_s": t2 - t0,
                    "backend_compile_s": backend, "xla_compiles": n}


class Variants:
  """Fused and split states of one optimizer, from identical copies of one initial state."""

  def __init__(self, bench: Bench, opt: str):
    import jax
    import jax.numpy as jnp

    from fcnjax.train import step as step_lib
    self.bench, self.opt, self.step_lib = bench, opt, step_lib
    self.tx = make_optimizer(opt)
    params, rest = _copy(bench.state.params), _copy(bench.state.rest)
    init = bench.parallel.replicate(
        step_lib.TrainState(params, rest, self.tx.init(params), jnp.zeros((), jnp.int32)),
        bench.mesh)
    self.init_params = [np.asarray(x, np.float32) for x in jax.tree.leaves(init.params)]
    self.fused_state = _copy(init)
    self.split = [_copy(init.params), _copy(init.rest), _copy(init.opt_state)]
    self.grad_jit, self.update_jit = make_split_step(bench.graphdef, self.tx)
    self.update = None
    self.ev_fused = CompileEvents("train_step")
    self.ev_grad = CompileEvents("grad_step")
    self.ev_update = CompileEvents("opt_update")

  def compile_update(self) -> dict:
    p, o = self.split[0], self.split[2]
    self.update, m = timed_compile(self.update_jit, (p, o, p), self.ev_update)
    return m

  def compile_fused(self, batch):
    fn = self.step_lib.make_train_step(self.bench.graphdef, self.tx)
    return timed_compile(fn, (self.fused_state, batch), self.ev_fused)

  def compile_grad(self, batch):
    return timed_compile(self.grad_jit, (self.split[0], self.split[1], batch), self.ev_grad)

  def fused_step(self, compiled, batch):
    self.fused_state, m = _block(compiled(self.fused_state, batch))
    return m

  def split_step(self, compiled_grad, batch):
    params, rest, opt_state = self.split
    grads, rest, m = compiled_grad(params, rest, batch)
    params, opt_state = self.update(params, opt_state, grads)
    self.split = _block([params, rest, opt_state])
    _block(m)
    return m

  def check_equal(self) -> dict:
    """New params of the split vs the fused step (both took the same steps from one state)."""
    import jax
    fl = jax.tree.leaves(self.fused_state.params)
    sl = jax.tree.leaves(self.split[0])
    diff = max(float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))
               for a, b in zip(fl, sl))
    scale = max(float(np.max(np.abs(np.asarray(a, np.float32)))) for a in fl)
    moved = max(float(np.max(np.abs(np.asarray(a, np.float32) - b)))
                for a, b in zip(fl, self.init_params))
    tol = PARAM_RTOL * scale
    return {"max_abs_diff": diff, "max_abs_param": scale, "rtol": PARAM_RTOL, "tolerance": tol,
            "max_abs_update": moved, "leaves": len(fl),
            "passed": bool(len(fl) == len(sl) and diff <= tol and moved > tol)}


def measure_optimizer(bench: Bench, opt: str, shapes, batch_size: int, steps: int,
                      log=print) -> dict:
  """Round-robin measurement of fused vs split for one optimizer over ``shapes`` (H, W)."""
  v = Variants(bench, opt)
  upd = v.compile_update()
  log(f"[{opt}] update program compile {upd['total_s']:.2f} s (once)")
  rows_out, equality = [], None
  for i, (h, w) in enumerate(shapes):
    batch = bench.synthetic_batch([(h, w)] * batch_size, (h, w))
    order = ("fused", "split") if i % 2 == 0 else ("split", "fused")
    comp = {}
    for name in order:
      comp[name] = v.compile_fused(batch) if name == "fused" else v.compile_grad(batch)
    fused_c, fused_m = comp["fused"]
    grad_c, grad_m = comp["split"]
    # Warm-up: one step each (on the first shape, from identical states: the equality check).
    mf = v.fused_step(fused_c, batch)
    ms = v.split_step(grad_c, batch)
    if i == 0:
      equality = v.check_equal()
      equality.update(shape=[batch_size, h, w], loss_fused=float(mf["loss"]),
                      loss_split=float(ms["loss"]))
    tf, ts = [], []
    for k in range(steps):
      for name in (order if k % 2 == 0 else order[::-1]):
        t = time.perf_counter()
        if name == "fused":
          mf = v.fused_step(fused_c, batch)
          tf.append(time.perf_counter() - t)
        else:
          ms = v.split_step(grad_c, batch)
          ts.append(time.perf_counter() - t)
    for name, m in (("fused", mf), ("split", ms)):
      if not np.isfinite(float(m["loss"])):
        raise FloatingPointError(f"{opt} {name}: non-finite loss at {batch_size}x{h}x{w}")
    row = {"shape": [batch_size, h, w], "model_pixels": bench.model_pixels((batch_size, h, w)),
           "order": list(order), "fused_compile": fused_m, "grad_compile": grad_m,
           "fused_step_s": float(np.median(tf)), "split_step_s": float(np.median(ts)),
           "fused_step_times_s": tf, "split_step_times_s": ts,
           "loadavg_1m": os.getloadavg()[0]}
    row["compile_ratio"] = grad_m["total_s"] / fused_m["total_s"]
    row["step_ratio"] = row["split_step_s"] / row["fused_step_s"]
    rows_out.append(row)
    log(f"[{opt}] {batch_size}x{h}x{w}: compile fused {fused_m['total_s']:.2f} s, grad "
        f"{grad_m['total_s']:.2f} s; step fused {row['fused_step_s']:.4f} s, split "
        f"{row['split_step_s']:.4f} s; load {row['loadavg_1m']:.2f}")
  return {"optimizer": opt, "note": OPTIMIZER_NOTES[opt], "update_compile": upd,
          "equality": equality, "shapes": rows_out}


def summarize(res: dict, ks) -> dict:
  """Totals for K buckets and the verdict of one optimizer (added to ``res``)."""
  rows = res["shapes"]
  fused_mean = float(np.mean([r["fused_compile"]["total_s"] for r in rows]))
  grad_mean = float(np.mean([r["grad_compile"]["total_s"] for r in rows]))
  upd = res["update_compile"]["total_s"]
  totals = []
  for k in ks:
    f, s = k * fused_mean, k * grad_mean + upd
    totals.append({"k": k, "fused_compile_s": f, "split_compile_s": s, "ratio": s / f,
                   "saving": 1 - s / f, "measured": k == len(rows)})
  step_ratio = float(np.median([r["step_ratio"] for r in rows]))
  compile_ok = all(t["saving"] >= COMPILE_SAVING_MIN for t in totals)
  step_ok = step_ratio <= 1 + STEP_SLOWDOWN_MAX
  res.update(fused_compile_mean_s=fused_mean, grad_compile_mean_s=grad_mean, totals=totals,
             median_step_ratio=step_ratio,
             fused_step_median_s=float(np.median([r["fused_step_s"] for r in rows])),
             split_step_median_s=float(np.median([r["split_step_s"] for r in rows])),
             compile_ok=compile_ok, step_ok=step_ok, keep=bool(compile_ok and step_ok))
  return res


def verdict(results: list, ks) -> dict:
  keep = all(r["keep"] for r in results)
  why = "; ".join(
      f"{r['optimizer']}: compile saving " +
      ", ".join(f"K={t['k']} {100 * t['saving']:.1f} %" for t in r["totals"]) +
      f" (need >= {100 * COMPILE_SAVING_MIN:.0f} %), median step ratio "
      f"{r['median_step_ratio']:.3f} (need <= {1 + STEP_SLOWDOWN_MAX:.2f})" for r in results)
  return {"keep_split": keep, "rule": f"keep only if for every optimizer the total compile for "
          f"K in {list(ks)} falls by >= {100 * COMPILE_SAVING_MIN:.0f} % and the median over "
          f"shapes of split/fused step seconds is <= {1 + STEP_SLOWDOWN_MAX:.2f}",
          "line": f"{'KEEP' if keep else 'DO NOT KEEP'} the split step: {why}."}


def markdown(report: dict) -> str:
  c, m = report["config"], report["machine"]
  lines = [f"## Fused vs split train step: {c['model']} x{c['width_multiplier']}"
           f"{' aligned' if c['aligned'] else ''}, {c['precision']}, batch {c['batch_size']}, "
           f"{c['steps']} timed steps",
           "", f"{m['cpu']} ({m['platform']}, {m['cpu_count']} cores), load average "
           f"{m['loadavg_start'][0]:.2f} at start, {m['loadavg_end'][0]:.2f} at end; compile = "
           "lower + compile wall s after jax.clear_caches(), no persistent cache."]
  for r in report["optimizers"]:
    e = r["equality"]
    lines += ["", f"### {r['optimizer']}: {r['note']}", "",
              "| shape BxHxW | fused compile s | split grad compile s | grad/fused | "
              "fused step s | split step s | split/fused |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for s in r["shapes"]:
      lines.append(f"| {'x'.join(map(str, s['shape']))} | {s['fused_compile']['total_s']:.2f} "
                   f"| {s['grad_compile']['total_s']:.2f} | {s['compile_ratio']:.3f} | "
                   f"{s['fused_step_s']:.4f} | {s['split_step_s']:.4f} | {s['step_ratio']:.3f} |")
    lines += ["", f"Update program compile (once): {r['update_compile']['total_s']:.2f} s. "
              f"Median step ratio split/fused: {r['median_step_ratio']:.3f}. Params after one "
              f"step: max |diff| {e['max_abs_diff']:.2e} vs tolerance {e['tolerance']:.2e} "
              f"({'pass' if e['passed'] else 'FAIL'}).", "",
              "| K buckets | fused compile s (K) | split compile s (K grad + 1 update) | "
              "split/fused | saving % |", "|---:|---:|---:|---:|---:|"]
    for t in r["totals"]:
      lines.append(f"| {t['k']}{'' if t['measured'] else ' (proj.)'} | "
                   f"{t['fused_compile_s']:.2f} | {t['split_compile_s']:.2f} | "
                   f"{t['ratio']:.3f} | {100 * t['saving']:.1f} |")
  lines += ["", f"**Verdict:** {report['verdict']['line']}"]
  return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def default_shapes(aligned: bool, batch_size: int) -> list:
  """The CPU default run's buckets: plan_buckets(VOC train sizes x 0.25, 4, granularity 32 when
  aligned else 1)."""
  from fcnjax.data import buckets as buckets_lib
  sizes = scale_sizes(load_sizes(default_sizes_csv()), DEFAULT_SCALE)
  plan = buckets_lib.plan_buckets(sizes, DEFAULT_BUCKETS, granularity=32 if aligned else 1)
  return [tuple(int(v) for v in s) for s in plan.shapes]


def parse_shapes(text: str) -> list:
  out = []
  for part in (p for p in text.split(",") if p.strip()):
    try:
      h, w = (int(v) for v in part.lower().split("x"))
    except ValueError:
      raise argparse.ArgumentTypeError(f"bad shape {part!r}, want HxW") from None
    if h < 1 or w < 1:
      raise argparse.ArgumentTypeError(f"bad shape {part!r}")
    out.append((h, w))
  if not out:
    raise argparse.ArgumentTypeError("no shapes")
  return out


def parse_args(argv=None):
  p = argparse.ArgumentParser(prog="python -m benchmarks.step_split",
                              description=__doc__.split("\n")[0])
  p.add_argument("--model", default="fcn8s")
  p.add_argument("--width-multiplier", type=float, default=1.0)
  p.add_argument("--aligned", action="store_true")
  p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
  p.add_argument("--batch-size", type=int, default=8)
  p.add_argument("--shapes", type=parse_shapes, default=None,
                 help="HxW,HxW,... (default: the 4 buckets of the VOC sizes x 0.25, granularity "
                      "32 with --aligned)")
  p.add_argument("--optimizers", default="sgd,adamw")
  p.add_argument("--steps", type=int, default=3, help="timed steps per shape, after 1 warm-up")
  p.add_argument("--ks", default="4,8", help="bucket counts for the compile totals / verdict")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", help="JSON (default benchmarks/results/step_split-<backend>-<date>.json)")
  p.add_argument("--quick", action="store_true",
                 help="test-sized: width 1/16 aligned, batch 2, shapes 32x32,32x64, 2 steps, "
                      f"XLA_FLAGS {QUICK_XLA_FLAG} (timings meaningless; mechanics only)")
  a = p.parse_args(argv)
  if a.quick:
    for k, v in QUICK.items():
      if k == "aligned" or getattr(a, k) == p.get_default(k):
        setattr(a, k, parse_shapes(v) if k == "shapes" else v)
  if a.shapes is None:
    a.shapes = default_shapes(a.aligned, a.batch_size)
  a.optimizers = [o for o in a.optimizers.split(",") if o]
  a.ks = [int(k) for k in a.ks.split(",") if k]
  if a.steps < 1 or a.batch_size < 1 or not a.ks or min(a.ks) < 1:
    p.error("--steps, --batch-size and --ks must be >= 1")
  return a


def main(argv=None) -> int:
  a = parse_args(argv)
  if a.quick:  # read when the backend starts, so before the first jax computation
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_backend_optimization_level" not in flags:
      os.environ["XLA_FLAGS"] = f"{flags} {QUICK_XLA_FLAG}".strip()
  import jax
  jax.config.update("jax_enable_compilation_cache", False)  # measure real compiles only
  log = lambda *x: print(*x, file=sys.stderr, flush=True)  # noqa: E731
  machine = machine_info()
  t0 = time.perf_counter()
  bench = Bench(BenchConfig(a.model, a.width_multiplier, a.aligned, a.precision, 1, a.steps,
                            a.seed))
  log(f"{bench.num_params:,} parameters; shapes {a.shapes}; load "
      f"{machine['loadavg_start'][0]:.2f} ({time.perf_counter() - t0:.1f} s model init)")
  # Warm-up: one throwaway compile + step (the fused step at batch 1, smallest shape), so one-time
  # backend start-up costs hit no measurement; --quick warms up with the cheap update program.
  wv = Variants(bench, "sgd")
  if a.quick:
    wm = wv.compile_update()
  else:
    h0, w0 = min(a.shapes, key=lambda s: s[0] * s[1])
    wb = bench.synthetic_batch([(h0, w0)], (h0, w0))
    wc, wm = wv.compile_fused(wb)
    wv.fused_step(wc, wb)
    del wc
  del wv
  log(f"warm-up compile {wm['total_s']:.2f} s ({time.perf_counter() - t0:.1f} s since start)")
  results = []
  for opt in a.optimizers:
    results.append(summarize(measure_optimizer(bench, opt, a.shapes, a.batch_size, a.steps, log),
                             a.ks))
  machine["loadavg_end"] = list(os.getloadavg())
  report = {
      "config": {"command": "python -m benchmarks.step_split " + " ".join(
                     argv if argv is not None else sys.argv[1:]),
                 "model": a.model, "width_multiplier": a.width_multiplier, "aligned": a.aligned,
                 "precision": a.precision, "batch_size": a.batch_size,
                 "shapes": [list(s) for s in a.shapes], "optimizers": a.optimizers,
                 "steps": a.steps, "ks": a.ks, "seed": a.seed, "quick": a.quick,
                 "num_params": bench.num_params, "warmup_compile_s": wm["total_s"],
                 "compile_timing": "jit(f).lower(*args).compile() wall s after jax.clear_caches(),"
                                   " persistent compilation cache off",
                 "k_totals": "K x mean per-shape compile over the measured shapes (+1 update "
                             "compile for split); exact sum when K = number of shapes",
                 "measure_wall_s": time.perf_counter() - t0},
      "machine": machine, "optimizers": results}
  report["verdict"] = verdict(results, a.ks)
  report["equality_passed"] = all(r["equality"]["passed"] for r in results)
  out = pathlib.Path(a.out or f"benchmarks/results/step_split-{machine['platform']}-"
                              f"{datetime.date.today()}.json")
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(report, indent=1))
  print(markdown(report))
  log(f"wrote {out}")
  if not report["equality_passed"]:
    bad = [(r["optimizer"], r["equality"]) for r in results if not r["equality"]["passed"]]
    print(f"error: split step's params differ from the fused step's: {bad}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
