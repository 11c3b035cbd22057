"""fcnjax vs PyTorch on CPU: FCN-8s (VGG16, exact variant) forward and SGD train step.

    python -m benchmarks.vs_torch                 # full width 500×375 batch 1, ÷8 width 192×160 batch 8
    python -m benchmarks.vs_torch --quick         # tiny model, 1 rep (a smoke test, < 30 s)
    python -m benchmarks.vs_torch --xla-flags ""  # without the XLA:CPU flag below

Both sides: float32, same shapes and batch, same architecture (``benchmarks/torch_fcn.py`` is a
plain PyTorch FCN-8s loaded with the same weights; the forward outputs are compared), mean
cross-entropy ignoring 255, SGD with momentum 0.9. fcnjax's train step is the project's real one
(``fcnjax.train.step.make_train_step``); PyTorch's is forward + backward + ``optimizer.step()``,
in NCHW and in channels_last. Score layers are zero-initialised as in the reference
(``--score-init random`` for random ones). Forward = eval mode (no dropout), no gradients. Times exclude model
init and compilation (1 warm-up call, then ``--reps`` timed calls; the median is reported).

XLA flags: by default this script sets ``XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=
-individual_convolution`` (convolutions to XLA's Eigen kernels instead of YNNPACK, whose
weight-gradient convolutions are slow) before JAX starts, appending to any XLA_FLAGS already
set. Users get the same by exporting that variable before starting Python. ``--xla-flags ""``
runs JAX without it.

Output: a markdown table on stdout and JSON (``--out``, default
``benchmarks/results/vs_torch-<date>.json``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

DEFAULT_XLA_FLAGS = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"

# name: (width_multiplier, batch, height, width)
SHAPES = {"full-500x375-b1": (1.0, 1, 375, 500), "div8-192x160-b8": (1 / 8, 8, 160, 192)}
QUICK_SHAPES = {"quick-div16-64x48-b2": (1 / 16, 2, 48, 64)}


def _timeit(fn, reps):
  fn()  # warm-up (compiles on the JAX side)
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return {"median_s": statistics.median(times), "min_s": min(times), "times_s": times}


def _cpu_model():
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor()


def bench_shape(name, width_multiplier, batch, height, width, reps, num_classes=21, lr=1e-4,
                score_init="zero"):
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  import torch
  import torch.nn.functional as F
  from flax import nnx

  from benchmarks.torch_fcn import TorchFCN8s, load_from_fcnjax
  from fcnjax import models
  from fcnjax.train import step as step_lib

  rng = np.random.default_rng(0)
  image = rng.normal(0, 50, size=(batch, height, width, 3)).astype(np.float32)
  label = rng.integers(0, num_classes, size=(batch, height, width)).astype(np.uint8)
  label[:, :height // 10] = 255  # some ignored pixels
  res = {"shape": name, "width_multiplier": width_multiplier, "batch": batch, "height": height,
         "width": width, "score_init": score_init, "loadavg_start": os.getloadavg()}

  # --- fcnjax; PyTorch gets the same weights ---
  t0 = time.perf_counter()
  jmodel = models.fcn8s(num_classes, width_multiplier=width_multiplier,
                        zero_init_scores=score_init == "zero", rngs=nnx.Rngs(0))
  res["jax_init_s"] = time.perf_counter() - t0
  tmodel = TorchFCN8s(num_classes, width_multiplier)
  load_from_fcnjax(tmodel, jmodel)

  jmodel.eval()
  graphdef, params, rest = step_lib.split_model(jmodel)
  fwd = jax.jit(lambda p, r, x: nnx.merge(graphdef, p, r, copy=True)(x))
  x_j = jnp.asarray(image)
  out_j = {}

  def jax_fwd():
    out_j["y"] = fwd(params, rest, x_j).block_until_ready()

  res["jax_forward"] = _timeit(jax_fwd, reps)
  jmodel.train()
  tx = optax.sgd(lr, momentum=0.9)
  graphdef, state = step_lib.init_state(jmodel, tx)
  train_step = step_lib.make_train_step(graphdef, tx)
  jbatch = {"image": x_j, "label": jnp.asarray(label), "mask": jnp.ones(label.shape, bool)}
  holder = {"state": state}

  def jax_train():
    s, m = train_step(holder["state"], jbatch)
    jax.block_until_ready((s, m))
    holder["state"] = s

  res["jax_train"] = _timeit(jax_train, reps)
  y_jax = np.asarray(out_j["y"])
  del holder, state, train_step, params, rest, fwd, jmodel, out_j
  jax.clear_caches()

  # --- PyTorch, NCHW and channels_last ---
  x_t = torch.from_numpy(image.transpose(0, 3, 1, 2).copy())
  y_t = torch.from_numpy(label.astype(np.int64))
  for fmt in ("nchw", "channels_last"):
    mf = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
    m = tmodel.to(memory_format=mf)
    x = x_t.contiguous(memory_format=mf)
    m.eval()

    def torch_fwd():
      with torch.no_grad():
        out_j["y"] = m(x)

    out_j = {}
    res[f"torch_{fmt}_forward"] = _timeit(torch_fwd, reps)
    if fmt == "nchw":
      y_torch = out_j["y"].numpy().transpose(0, 2, 3, 1)
      res["forward_max_abs_diff"] = float(np.abs(y_torch - y_jax).max())
      res["forward_max_abs"] = float(np.abs(y_jax).max())
    m.train()
    opt = torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9)

    def torch_train():
      opt.zero_grad(set_to_none=True)
      loss = F.cross_entropy(m(x), y_t, ignore_index=255)
      loss.backward()
      opt.step()

    res[f"torch_{fmt}_train"] = _timeit(torch_train, reps)
  for kind in ("forward", "train"):
    j = res[f"jax_{kind}"]["median_s"]
    for fmt in ("nchw", "channels_last"):
      res[f"ratio_{kind}_{fmt}"] = j / res[f"torch_{fmt}_{kind}"]["median_s"]
  return res


def markdown(results):
  lines = ["| shape | step | fcnjax (s) | torch NCHW (s) | torch channels_last (s) | "
           "fcnjax / torch NCHW | fcnjax / torch CL |", "|---|---|---|---|---|---|---|"]
  for r in results:
    for kind, label in (("forward", "forward"), ("train", "train step")):
      lines.append(
          f"| {r['shape']} | {label} | {r[f'jax_{kind}']['median_s']:.3f} | "
          f"{r[f'torch_nchw_{kind}']['median_s']:.3f} | "
          f"{r[f'torch_channels_last_{kind}']['median_s']:.3f} | "
          f"{r[f'ratio_{kind}_nchw']:.2f}× | {r[f'ratio_{kind}_channels_last']:.2f}× |")
  return "\n".join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--quick", action="store_true", help="tiny model and size, 1 rep (smoke test)")
  p.add_argument("--reps", type=int, default=None, help="timed repetitions (default 3; quick 1)")
  p.add_argument("--shapes", default=None,
                 help=f"comma-separated subset of {sorted(SHAPES)} (default all)")
  p.add_argument("--xla-flags", default=DEFAULT_XLA_FLAGS,
                 help="appended to XLA_FLAGS before JAX starts ('' for none); default %(default)s")
  p.add_argument("--threads", type=int, default=None,
                 help="threads for both (default: all cores). 1 = single-threaded JAX "
                 "(--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1) and torch; "
                 "a fairer comparison on a machine shared with other jobs")
  p.add_argument("--score-init", choices=("zero", "random"), default="zero",
                 help="score layers zero-initialised (the reference, default) or random (then the "
                 "forward outputs of both frameworks are non-trivially compared). Note: XLA:CPU's "
                 "train step is much slower with random scores (÷8: 1.25 -> 3.1 s, 1 thread)")
  p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/"
                 "vs_torch-<date>.json; --quick: not written unless given)")
  args = p.parse_args(argv)

  if "jax" in sys.modules and args.xla_flags:
    import jax  # noqa: F401  (already imported: flags can only apply before the backend starts)
    from jax._src import xla_bridge
    if xla_bridge.backends_are_initialized():
      print("warning: JAX already started; --xla-flags not applied", file=sys.stderr)
  if args.threads == 1:
    args.xla_flags += " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
  elif args.threads is not None and args.threads != os.cpu_count():
    p.error("--threads: only 1 or the number of cores is supported")
  if args.xla_flags.strip():
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + args.xla_flags).strip()

  import jax
  import torch
  cores = os.cpu_count()
  torch.set_num_threads(args.threads or cores)

  shapes = QUICK_SHAPES if args.quick else SHAPES
  if args.shapes and not args.quick:
    shapes = {k: SHAPES[k] for k in args.shapes.split(",")}
  reps = args.reps or (1 if args.quick else 3)
  load = os.getloadavg()
  results = []
  for name, (wm, b, h, w) in shapes.items():
    print(f"[vs_torch] {name}: width ×{wm:g}, batch {b}, {w}×{h} ...", file=sys.stderr, flush=True)
    results.append(bench_shape(name, wm, b, h, w, reps, score_init=args.score_init))
  import flax

  from fcnjax.models import cpu_ops
  meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "cpu": _cpu_model(),
          "fcnjax_cpu_ops": cpu_ops.enabled(),
          "cores": cores, "torch_threads": torch.get_num_threads(),
          "jax_backend": jax.default_backend(), "jax": jax.__version__, "flax": flax.__version__,
          "torch": torch.__version__, "python": platform.python_version(),
          "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""), "reps": reps, "quick": args.quick,
          "score_init": args.score_init,
          "loadavg_before": load, "loadavg_after": os.getloadavg(),
          "command": " ".join(["python", "-m", "benchmarks.vs_torch", *(argv or sys.argv[1:])])}
  table = markdown(results)
  print(f"\nCPU: {meta['cpu']} ({cores} cores), jax {meta['jax']}, torch {meta['torch']}, "
        f"torch threads {meta['torch_threads']}, XLA_FLAGS={meta['XLA_FLAGS']!r}, fcnjax cpu_ops {meta['fcnjax_cpu_ops']}, "
        f"load {load[0]:.2f} -> {meta['loadavg_after'][0]:.2f}, "
        f"median of {reps}\n")
  print(table)
  out = args.out
  if out is None and not args.quick:
    out = os.path.join("benchmarks", "results",
                       f"vs_torch-{datetime.date.today().isoformat()}.json")
  if out:
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
      json.dump({"meta": meta, "results": results, "markdown": table}, f, indent=1)
    print(f"\nwrote {out}", file=sys.stderr)
  return results


if __name__ == "__main__":
  main()
