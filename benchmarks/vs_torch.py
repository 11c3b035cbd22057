"""fcnjax vs PyTorch, same machine: FCN-8s (VGG16, exact variant) or torchvision's FCN-ResNet50,
forward and SGD train step.

    python -m benchmarks.vs_torch                 # CPU fp32: full width 500×375 b1, ÷8 width 192×160 b8
    python -m benchmarks.vs_torch --model fcn_resnet50  # CPU fp32: full width 320×240 b1, ÷8 192×160 b8
    python -m benchmarks.vs_torch --quick         # tiny model, 1 rep (a smoke test, < 30 s)
    python -m benchmarks.vs_torch --xla-flags ""  # without the XLA:CPU flag below
    python -m benchmarks.vs_torch --device gpu    # GPU bf16: VOC bucket shapes at batch 8 and 16

GPU mode (``--device gpu``, default ``--precision bf16``): fcnjax computes in bfloat16 with float32
parameters (``dtype=jnp.bfloat16``, what ``--precision bf16`` trains with); PyTorch runs under
``torch.autocast("cuda", torch.bfloat16)``, NCHW and channels_last. Shapes are the K = 4 size
buckets of the real VOC 2012 train sizes (``fcnjax.data.buckets.plan_buckets``), batch 8 and 16.
Each step is also reported as achieved TFLOP/s: model FLOPs over the median step time. Forward
FLOPs are the convolution and matrix-product FLOPs of fcnjax's forward program
(:func:`jaxpr_flops`, counted from its jaxpr; XLA's own cost analysis agrees to 0.3 %); a train
step counts 3× the forward (forward, input gradients, weight gradients: the usual model-FLOPs
convention; the literal backward jaxpr has more, mostly multiplications by the zero padding of
fc6's transposed convolution). The same network, so the same counts are used for PyTorch; and as a fraction of the card's dense bf16
peak (``--peak-tflops``, or looked up from the device name). ``--recount-flops JSON`` fills in
the counts of an earlier run's JSON (computed on this machine: they do not depend on it) and
prints its table again. JAX's GPU memory preallocation is turned off and capped at 45 %
so that PyTorch can run in the same process afterwards.

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
# fcn_resnet50 (dilated: layer3/4 at stride 8, several times FCN-8s' cost per pixel at ÷8 width)
RESNET_SHAPES = {"r50-full-320x240-b1": (1.0, 1, 240, 320), "r50-div8-192x160-b8": (1 / 8, 8, 160, 192)}
# K = 4 buckets of the VOC 2012 train sizes (H x W; plan_buckets(sizes, 4) -> 416 / 212 / 697 /
# 137 images), at batch 8, and the two largest-count shapes at batch 16.
GPU_SHAPES = {"voc-335x500-b8": (1.0, 8, 335, 500), "voc-500x375-b8": (1.0, 8, 500, 375),
              "voc-377x500-b8": (1.0, 8, 377, 500), "voc-500x500-b8": (1.0, 8, 500, 500),
              "voc-377x500-b16": (1.0, 16, 377, 500), "voc-500x500-b16": (1.0, 16, 500, 500)}
# Dense bf16 tensor-core peak, TFLOP/s, by device-name fragment (vendor data sheets, no sparsity).
BF16_PEAK_TFLOPS = {"H100 80GB HBM3": 989.4, "H100 SXM": 989.4, "H100 PCIe": 756.0,
                    "H100 NVL": 835.0, "H200": 989.4, "A100": 312.0, "L4": 121.0}


def _timeit(fn, reps, warmup=1):
  for _ in range(warmup):
    fn()  # warm-up (compiles on the JAX side; cuDNN autotuning on the PyTorch side)
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
          "times_s": times}


def jaxpr_flops(jaxpr) -> float:
  """Multiply-add FLOPs (2 per MAC) of the convolutions and matrix products in a (closed) jaxpr,
  nested jaxprs included; elementwise work is not counted. A property of the program, not of the
  machine: the same count on CPU and GPU, for fcnjax and for the same network in PyTorch."""
  import numpy as np
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "conv_general_dilated":
      out = eqn.outvars[0].aval.shape
      rhs = eqn.invars[1].aval.shape
      spec = eqn.params["dimension_numbers"].rhs_spec       # (out, in, *spatial) dims of rhs
      window = np.prod([rhs[d] for d in spec[2:]])
      total += 2.0 * np.prod(out) * window * rhs[spec[1]]
    elif name == "dot_general":
      (lhs_contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += 2.0 * np.prod(eqn.outvars[0].aval.shape) * np.prod([lhs[d] for d in lhs_contract])
    for v in eqn.params.values():
      for sub in (v if isinstance(v, (list, tuple)) else (v,)):
        if hasattr(sub, "eqns") or hasattr(getattr(sub, "jaxpr", None), "eqns"):
          total += jaxpr_flops(sub)
  return float(total)


def _flops(fn, *args):
  """FLOPs of one call of ``fn`` (jitted or not): :func:`jaxpr_flops` of its jaxpr."""
  import jax
  return jaxpr_flops(jax.make_jaxpr(fn)(*args))


def bf16_peak_tflops(device_kind):
  for frag, peak in BF16_PEAK_TFLOPS.items():
    if frag in device_kind:
      return peak
  return None


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
                score_init="zero", device="cpu", precision="fp32", warmup=1, model="fcn8s"):
  import contextlib

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
         "width": width, "score_init": score_init, "precision": precision, "device": device,
         "loadavg_start": os.getloadavg()}
  bf16 = precision == "bf16"
  tdev = torch.device("cuda" if device == "gpu" else "cpu")

  def sync():
    if device == "gpu":
      torch.cuda.synchronize()

  def autocast():
    if not bf16:
      return contextlib.nullcontext()
    return torch.autocast(tdev.type, dtype=torch.bfloat16)

  # --- fcnjax; PyTorch gets the same weights ---
  t0 = time.perf_counter()
  res["model"] = model
  if model == "fcn_resnet50":
    from benchmarks.torch_resnet import (TorchFCNResNet50, numpy_state_dict,
                                         randomise_batch_norm)
    from fcnjax.weights import layouts
    from fcnjax.weights.loading import apply
    torch.manual_seed(0)
    tmodel = TorchFCNResNet50(num_classes, width_multiplier)
    randomise_batch_norm(tmodel)
    jmodel = models.build_model("fcn_resnet50", num_classes, width_multiplier=width_multiplier,
                                aux=False, dtype=jnp.bfloat16 if bf16 else None)
    apply(jmodel, numpy_state_dict(tmodel), layouts.TORCHVISION_FCN_RESNET)
    res["jax_init_s"] = time.perf_counter() - t0
  else:
    jmodel = models.fcn8s(num_classes, width_multiplier=width_multiplier,
                          zero_init_scores=score_init == "zero",
                          dtype=jnp.bfloat16 if bf16 else None, rngs=nnx.Rngs(0))
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

  res["flops_forward"] = _flops(fwd, params, rest, x_j)
  res["jax_forward"] = _timeit(jax_fwd, reps, warmup)
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

  res["flops_train"] = 3 * res["flops_forward"]  # model FLOPs: forward + 2 x forward (backward)
  res["jax_train"] = _timeit(jax_train, reps, warmup)
  y_jax = np.asarray(out_j["y"]).astype(np.float32)
  del holder, state, train_step, params, rest, fwd, jmodel, out_j
  jax.clear_caches()

  # --- PyTorch, NCHW and channels_last ---
  x_t = torch.from_numpy(image.transpose(0, 3, 1, 2).copy()).to(tdev)
  y_t = torch.from_numpy(label.astype(np.int64)).to(tdev)
  tmodel = tmodel.to(tdev)
  if device == "gpu":
    torch.backends.cudnn.benchmark = True
  for fmt in ("nchw", "channels_last"):
    mf = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
    m = tmodel.to(memory_format=mf)
    x = x_t.contiguous(memory_format=mf)
    m.eval()

    def torch_fwd():
      with torch.no_grad(), autocast():
        out_j["y"] = m(x)
      sync()

    out_j = {}
    res[f"torch_{fmt}_forward"] = _timeit(torch_fwd, reps, warmup)
    if fmt == "nchw":
      y_torch = out_j["y"].float().cpu().numpy().transpose(0, 2, 3, 1)
      res["forward_max_abs_diff"] = float(np.abs(y_torch - y_jax).max())
      res["forward_max_abs"] = float(np.abs(y_jax).max())
    m.train()
    opt = torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9)

    def torch_train():
      opt.zero_grad(set_to_none=True)
      with autocast():
        logits = m(x)
      loss = F.cross_entropy(logits.float(), y_t, ignore_index=255)
      loss.backward()
      opt.step()
      sync()

    res[f"torch_{fmt}_train"] = _timeit(torch_train, reps, warmup)
    del opt, m
  del tmodel, x_t, y_t, x
  if device == "gpu":
    torch.cuda.empty_cache()
  for kind in ("forward", "train"):
    j = res[f"jax_{kind}"]["median_s"]
    for fmt in ("nchw", "channels_last"):
      res[f"ratio_{kind}_{fmt}"] = j / res[f"torch_{fmt}_{kind}"]["median_s"]
  add_tflops(res)
  return res


def add_tflops(res):
  """Achieved TFLOP/s of each measured time in ``res`` from its ``flops_forward`` / ``flops_train``."""
  for kind in ("forward", "train"):
    if res.get(f"flops_{kind}"):
      for who in ("jax", "torch_nchw", "torch_channels_last"):
        res[f"{who}_{kind}"]["tflops"] = res[f"flops_{kind}"] / res[f"{who}_{kind}"]["median_s"] / 1e12


def forward_flops(width_multiplier, batch, height, width, precision="fp32", num_classes=21):
  """Forward FLOPs of fcnjax's FCN-8s at one shape, as the GPU runs it (CPU ops off)."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from fcnjax import models
  from fcnjax.train import step as step_lib
  model = models.fcn8s(num_classes, width_multiplier=width_multiplier,
                       dtype=jnp.bfloat16 if precision == "bf16" else None, ops="lax",
                       rngs=nnx.Rngs(0))
  model.eval()
  graphdef, params, rest = step_lib.split_model(model)
  fwd = lambda p, r, x: nnx.merge(graphdef, p, r, copy=True)(x)  # noqa: E731
  return _flops(fwd, params, rest, jax.ShapeDtypeStruct((batch, height, width, 3), jnp.float32))


def recount_flops(path):
  """Fill in the FLOP counts (and TFLOP/s) of an earlier run's JSON; print its table again."""
  with open(path) as f:
    data = json.load(f)
  for r in data["results"]:
    r["flops_forward"] = forward_flops(r["width_multiplier"], r["batch"], r["height"], r["width"],
                                       r.get("precision", "fp32"))
    r["flops_train"] = 3 * r["flops_forward"]
    add_tflops(r)
  data["meta"]["flops_recounted"] = (f"{datetime.datetime.now().isoformat(timespec='seconds')} "
                                     f"on {_cpu_model()}")
  data["markdown"] = markdown(data["results"], data["meta"].get("bf16_peak_tflops"))
  with open(path, "w") as f:
    json.dump(data, f, indent=1)
  print(data["markdown"])


def markdown(results, peak_tflops=None):
  """Times in seconds (3 decimals; ms on GPU); with FLOPs counted, achieved TFLOP/s and % of peak."""
  gpu = any(r.get("device") == "gpu" for r in results)
  unit, scale, digits = ("ms", 1e3, 1) if gpu else ("s", 1.0, 3)
  head = (f"| shape | step | fcnjax ({unit}) | torch NCHW ({unit}) | torch channels_last ({unit}) | "
          "fcnjax / torch NCHW | fcnjax / torch CL |")
  sep = "|---|---|---:|---:|---:|---:|---:|"
  if gpu:
    head += " GFLOP/step | TFLOP/s fcnjax / NCHW / CL |"
    sep += "---:|---|"
    if peak_tflops:
      head += " % of bf16 peak fcnjax / NCHW / CL |"
      sep += "---|"
  lines = [head, sep]
  for r in results:
    for kind, label in (("forward", "forward"), ("train", "train step")):
      who = [r[f"jax_{kind}"], r[f"torch_nchw_{kind}"], r[f"torch_channels_last_{kind}"]]
      line = (f"| {r['shape']} | {label} | " + " | ".join(f"{w['median_s'] * scale:.{digits}f}" for w in who)
              + f" | {r[f'ratio_{kind}_nchw']:.2f}× | {r[f'ratio_{kind}_channels_last']:.2f}× |")
      if gpu:
        fl = r.get(f"flops_{kind}")
        line += (f" {fl / 1e9:,.0f} | " + " / ".join(f"{w['tflops']:.0f}" for w in who) + " |"
                 if fl else " - | - |")
        if peak_tflops:
          line += (" " + " / ".join(f"{100 * w['tflops'] / peak_tflops:.1f}" for w in who) + " |"
                   if fl else " - |")
      lines.append(line)
  return "\n".join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--quick", action="store_true", help="tiny model and size, 1 rep (smoke test)")
  p.add_argument("--model", choices=("fcn8s", "fcn_resnet50"), default="fcn8s",
                 help="fcn8s (VGG16, exact) or torchvision's fcn_resnet50 (dilated, no aux head; "
                      "the PyTorch side is benchmarks/torch_resnet.py with torchvision's keys)")
  p.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                 help="cpu (default; fp32, the shapes above) or gpu (bf16, VOC bucket shapes)")
  p.add_argument("--precision", choices=("fp32", "bf16"), default=None,
                 help="compute precision (default fp32 on cpu, bf16 on gpu)")
  p.add_argument("--reps", type=int, default=None,
                 help="timed repetitions (default 3 on cpu, 10 on gpu; quick 1)")
  p.add_argument("--shapes", default=None,
                 help=f"comma-separated subset of {sorted(SHAPES)} (cpu) or {sorted(GPU_SHAPES)} "
                 "(gpu); default all")
  p.add_argument("--xla-flags", default=None,
                 help="appended to XLA_FLAGS before JAX starts ('' for none); default "
                 f"{DEFAULT_XLA_FLAGS} on cpu, none on gpu")
  p.add_argument("--threads", type=int, default=None,
                 help="threads for both (default: all cores). 1 = the process pinned to one "
                 "core (plus --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1 "
                 "and torch.set_num_threads(1)): a single-core comparison")
  p.add_argument("--score-init", choices=("zero", "random"), default="zero",
                 help="score layers zero-initialised (the reference, default) or random (then the "
                 "forward outputs of both frameworks are non-trivially compared)")
  p.add_argument("--peak-tflops", type=float, default=None,
                 help="the device's dense bf16 peak in TFLOP/s (default: looked up by GPU name)")
  p.add_argument("--recount-flops", metavar="JSON", default=None,
                 help="only fill in the FLOP counts of an earlier run's JSON and print its table")
  p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/"
                 "vs_torch-<date>.json; --quick: not written unless given); rewritten after "
                 "every shape, so a cut-off run keeps what it measured")
  args = p.parse_args(argv)
  if args.recount_flops:
    try:
      recount_flops(args.recount_flops)
    except (OSError, ValueError, KeyError, TypeError) as e:
      p.error(f"--recount-flops {args.recount_flops}: not a readable vs_torch JSON "
              f"({type(e).__name__}: {e})")
    return []
  gpu = args.device == "gpu"
  precision = args.precision or ("bf16" if gpu else "fp32")
  xla_flags = args.xla_flags if args.xla_flags is not None else ("" if gpu else DEFAULT_XLA_FLAGS)

  if "jax" in sys.modules and xla_flags:
    import jax  # noqa: F401  (already imported: flags can only apply before the backend starts)
    from jax._src import xla_bridge
    if xla_bridge.backends_are_initialized():
      print("warning: JAX already started; --xla-flags not applied", file=sys.stderr)
  if args.threads == 1:
    # XLA:CPU still runs its convolutions on every core with these flags alone (measured: the
    # same times as without them, half the speed under `taskset -c 0`), so the process is also
    # pinned to one core: a true single-core comparison for both frameworks.
    xla_flags += " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
  elif args.threads is not None and args.threads != os.cpu_count():
    p.error("--threads: only 1 or the number of cores is supported")
  if xla_flags.strip():
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + xla_flags).strip()
  if gpu:  # leave GPU memory to PyTorch, which runs in this process after JAX
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")

  import jax
  import torch
  cores = os.cpu_count()
  torch.set_num_threads(args.threads or cores)
  if gpu and (jax.default_backend() != "gpu" or not torch.cuda.is_available()):
    p.error(f"--device gpu: JAX backend is {jax.default_backend()!r}, "
            f"torch.cuda.is_available() is {torch.cuda.is_available()}")

  table_shapes = GPU_SHAPES if gpu else (RESNET_SHAPES if args.model == "fcn_resnet50" else SHAPES)
  shapes = QUICK_SHAPES if args.quick else table_shapes
  if args.shapes and not args.quick:
    unknown = sorted(set(args.shapes.split(",")) - set(table_shapes))
    if unknown:
      p.error(f"--shapes: unknown {unknown}; choose from {sorted(table_shapes)}")
    shapes = {k: table_shapes[k] for k in args.shapes.split(",")}
  reps = args.reps or (1 if args.quick else 10 if gpu else 3)
  warmup = 3 if gpu and not args.quick else 1
  device_kind = jax.devices()[0].device_kind
  peak = args.peak_tflops or (bf16_peak_tflops(device_kind) if gpu and precision == "bf16" else None)
  import flax

  from fcnjax import models
  load = os.getloadavg()
  meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "cpu": _cpu_model(),
          "device": args.device, "device_kind": device_kind, "precision": precision,
          "bf16_peak_tflops": peak, "fcnjax_cpu_ops": models.resolve_ops("auto") == "cpu",
          "cores": cores, "cores_used": len(os.sched_getaffinity(0)),
          "torch_threads": torch.get_num_threads(),
          "jax_backend": jax.default_backend(), "jax": jax.__version__, "flax": flax.__version__,
          "torch": torch.__version__, "python": platform.python_version(),
          "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""), "reps": reps, "warmup": warmup,
          "quick": args.quick, "score_init": args.score_init, "loadavg_before": load,
          "model": args.model,
          "command": " ".join(["python", "-m", "benchmarks.vs_torch", *(argv or sys.argv[1:])])}
  out = args.out
  if out is None and not args.quick:
    suffix = ("-fcn_resnet50" if args.model == "fcn_resnet50" else "") + ("-gpu" if gpu else "")
    out = os.path.join("benchmarks", "results",
                       f"vs_torch-{datetime.date.today().isoformat()}{suffix}.json")
  results = []
  for name, (wm, b, h, w) in shapes.items():
    print(f"[vs_torch] {name}: width ×{wm:g}, batch {b}, {w}×{h}, {precision} ...",
          file=sys.stderr, flush=True)
    results.append(bench_shape(name, wm, b, h, w, reps, score_init=args.score_init,
                               device=args.device, precision=precision, warmup=warmup,
                               model=args.model))
    meta["loadavg_after"] = os.getloadavg()
    table = markdown(results, peak)
    if out:
      os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
      with open(out, "w") as f:
        json.dump({"meta": meta, "results": results, "markdown": table}, f, indent=1)
  where = (f"GPU: {device_kind}, bf16 peak {peak} TFLOP/s" if gpu else f"CPU: {meta['cpu']}")
  print(f"\n{where} ({cores} CPU cores), {precision}, jax {meta['jax']}, torch {meta['torch']}, "
        f"torch threads {meta['torch_threads']}, XLA_FLAGS={meta['XLA_FLAGS']!r}, "
        f"fcnjax cpu_ops {meta['fcnjax_cpu_ops']}, load {load[0]:.2f} -> "
        f"{meta['loadavg_after'][0]:.2f}, median of {reps} after {warmup} warm-up\n")
  print(table)
  if out:
    print(f"\nwrote {out}", file=sys.stderr)
  return results


if __name__ == "__main__":
  main()
