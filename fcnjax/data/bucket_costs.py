"""What a size bucket costs on a given machine: the numbers behind ``max_buckets="auto"``.

:func:`fcnjax.data.buckets.plan_buckets` with ``max_buckets="auto"`` picks the K minimising
``compile_s_per_bucket * K + s_per_pixel * padded pixels per epoch * epochs``. Both numbers depend
on the machine (an H100 compiles the full-width FCN-8s train step in 21-44 s and runs it ~170x
faster per pixel than 2 CPU cores run a 1/8-width one) and on the model, so they live in a
:class:`CostProfile`:

* :data:`DEFAULT_PROFILES` / :func:`default_profile`: documented per-backend defaults, measured
  once on the machines named in their docstrings;
* ``python -m benchmarks.buckets --calibrate`` measures one for the run's model, precision,
  devices and batching on the machine it runs on and writes it as JSON;
* :func:`load_profile` / :func:`save_profile` read and write that JSON; every problem with a file
  is one :class:`CostProfileError` line naming the file;
* :meth:`CostProfile.plan_kwargs` gives the keyword arguments of ``plan_buckets(sizes, "auto",
  **kwargs)``, :meth:`CostProfile.describe` one line for a log, :meth:`CostProfile.mismatches`
  how the run that uses a profile differs from the one it was measured for.

JSON schema (version 1; one object, keys in any order; ``source`` is never stored, a loaded
profile's ``source`` is its path):

================================ ======== ========================================================
key                              required value
================================ ======== ========================================================
``version``                      yes      int, 1
``backend``                      yes      non-empty str: ``jax.default_backend()`` where measured
``compile_s_per_bucket``         yes      float > 0: seconds to compile one train-step program
                                          (one bucket shape) with an empty persistent cache
``warm_compile_s_per_bucket``    yes      float > 0: the same program loaded from the cache
``s_per_pixel``                  yes      float > 0: train-step seconds per padded input pixel
                                          (B*H*W after the model's own alignment): the slope of
                                          step time vs batch pixels
``model``                        yes      non-empty str, e.g. ``"fcn8s"``
``width_multiplier``             yes      float > 0
``aligned``                      yes      bool
``precision``                    yes      non-empty str (``"fp32"``, ``"bf16"``)
``num_devices``                  yes      int >= 1 (data-parallel devices of the measured step)
``device_kind``                  no       str (``jax.devices()[0].device_kind``), default ""
``measured``                     no       str, ISO date of the measurement, default ""
``timing``                       no       str, how the seconds were taken, default ""
``fit``                          no       object: the step-time fit (``a_s``, ``b_s_per_px``,
                                          ``r2``, ...), default {}
``samples``                      no       list of objects, one per measured shape, default []
``machine``                      no       object (CPU, versions, ...), default {}
``run``                          no       object: the calibration run (command, sizes, batching,
                                          wall seconds), default {}
================================ ======== ========================================================
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib

VERSION = 1
"""Schema version this module writes and reads."""

_REQUIRED = {  # field -> kind (see _check)
    "version": "version", "backend": "str", "compile_s_per_bucket": "positive",
    "warm_compile_s_per_bucket": "positive", "s_per_pixel": "positive", "model": "str",
    "width_multiplier": "positive", "aligned": "bool", "precision": "str",
    "num_devices": "count"}
_OPTIONAL = {"device_kind": "any_str", "measured": "any_str", "timing": "any_str",
             "fit": "object", "samples": "objects", "machine": "object", "run": "object"}
_IGNORED = ("source",)  # written by hand or by an older tool: the file's path wins


class CostProfileError(ValueError):
  """A cost profile that cannot be read or written; the message is one line naming the file."""


@dataclasses.dataclass(frozen=True)
class CostProfile:
  """Measured costs of one train-step program on one machine, for ``plan_buckets(..., "auto")``.

  Units: seconds (s) and input pixels (px). ``compile_s_per_bucket``: cold compile of one
  train-step program (nothing in the persistent compilation cache): trace + lower + XLA compile.
  ``warm_compile_s_per_bucket``: the same program loaded from the persistent cache (trace + lower
  + cache read). ``s_per_pixel``: train-step seconds per padded input pixel, B*H*W after the
  model's alignment (the slope of step time vs batch pixels). The rest records what it was
  measured for: ``backend`` ("cpu" / "gpu" / "tpu"), ``device_kind``, ``model``,
  ``width_multiplier``, ``aligned``, ``precision``, ``num_devices``; and the evidence:
  ``source`` (the file it was loaded from, or ``"default:<backend>"``), ``measured`` (ISO date or
  ""), ``timing`` (how), ``fit`` (the step-time fit), ``samples`` (per-shape measurements),
  ``machine``, ``run`` (the calibration's command, sizes, batching, wall seconds). ``version``:
  the schema version (:data:`VERSION`).
  """

  compile_s_per_bucket: float
  warm_compile_s_per_bucket: float
  s_per_pixel: float
  backend: str
  model: str
  width_multiplier: float
  aligned: bool
  precision: str
  num_devices: int = 1
  device_kind: str = ""
  source: str = ""
  measured: str = ""
  timing: str = ""
  fit: dict = dataclasses.field(default_factory=dict)
  samples: tuple = ()
  machine: dict = dataclasses.field(default_factory=dict)
  run: dict = dataclasses.field(default_factory=dict)
  version: int = VERSION

  def __post_init__(self):
    _validate(self.to_json(), self.source or "<cost profile>")

  def plan_kwargs(self, epochs: float, *, warm: bool = False) -> dict:
    """Keyword arguments for ``plan_buckets(sizes, "auto", **kwargs)`` over ``epochs`` epochs
    (> 0; fractional for a run given in steps). ``warm=True`` charges the warm compile (a run
    whose bucket programs are already in its persistent compilation cache, e.g. a restart)."""
    epochs = float(epochs)
    if not (math.isfinite(epochs) and epochs > 0):
      raise ValueError(f"epochs must be a positive number, got {epochs}")
    return {"compile_s_per_bucket": (self.warm_compile_s_per_bucket if warm
                                     else self.compile_s_per_bucket),
            "s_per_pixel": self.s_per_pixel, "epochs": epochs}

  def describe(self) -> str:
    """One line: where it comes from, what it was measured for, and the three costs."""
    where = self.backend + (f" {self.device_kind}" if self.device_kind
                            and self.device_kind != self.backend else "")
    devices = f", {self.num_devices} devices" if self.num_devices != 1 else ""
    return (f"cost profile {self.source or '(unsaved)'} ({where}, {self.model} "
            f"x{_fmt_width(self.width_multiplier)} {'aligned ' if self.aligned else ''}"
            f"{self.precision}{devices}, measured {self.measured or 'on an unrecorded date'}): "
            f"compile {self.compile_s_per_bucket:.1f} s/bucket cold, "
            f"{self.warm_compile_s_per_bucket:.1f} s warm, {self.s_per_pixel:.2g} s/px")

  def mismatches(self, *, backend=None, model=None, width_multiplier=None, aligned=None,
                 precision=None, num_devices=None) -> list:
    """Human-readable differences between what the profile was measured for and a run with
    these settings (an argument left ``None`` is not compared); [] when they all agree. Each
    entry reads like ``"backend: measured on gpu, this run is on cpu"``."""
    out = []

    def differ(name, mine, theirs, fmt=str):
      out.append(f"{name}: measured with {fmt(mine)}, this run uses {fmt(theirs)}")

    if backend is not None and str(backend) != self.backend:
      out.append(f"backend: measured on {self.backend}, this run is on {backend}")
    if model is not None and str(model) != self.model:
      differ("model", self.model, model)
    if width_multiplier is not None and not math.isclose(float(width_multiplier),
                                                         self.width_multiplier, rel_tol=1e-6):
      differ("width multiplier", self.width_multiplier, float(width_multiplier),
             lambda w: "x" + _fmt_width(w))
    if aligned is not None and bool(aligned) != self.aligned:
      differ("geometry", self.aligned, bool(aligned), lambda a: "aligned" if a else "exact")
    if precision is not None and str(precision) != self.precision:
      differ("precision", self.precision, precision)
    if num_devices is not None and int(num_devices) != self.num_devices:
      differ("devices", self.num_devices, int(num_devices))
    return out

  def to_json(self) -> dict:
    """The profile as a JSON-ready dict (schema in the module docstring; no ``source``)."""
    d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "source"}
    d["samples"] = [dict(s) if isinstance(s, dict) else s for s in self.samples]
    return d


def _fmt_width(w: float) -> str:
  """0.125 -> "1/8", 1.0 -> "1", 0.3 -> "0.3"."""
  w = float(w)
  if w < 1 and abs(1 / w - round(1 / w)) < 1e-9:
    return f"1/{round(1 / w)}"
  return f"{w:g}"


def _kind_error(value, kind: str) -> str | None:
  """Why ``value`` is not of ``kind`` (None: it is)."""
  is_num = isinstance(value, (int, float)) and not isinstance(value, bool)
  got = f"{value!r} ({type(value).__name__})"
  if kind == "version":
    if not (isinstance(value, int) and not isinstance(value, bool)):
      return f"must be an integer, got {got}"
  elif kind == "positive":
    if not is_num:
      return f"must be a number, got {got}"
    if not math.isfinite(value) or value <= 0:
      return f"must be a positive finite number, got {value!r}"
  elif kind == "count":
    if not (isinstance(value, int) and not isinstance(value, bool)) or value < 1:
      return f"must be an integer >= 1, got {got}"
  elif kind == "bool":
    if not isinstance(value, bool):
      return f"must be true or false, got {got}"
  elif kind == "str":
    if not isinstance(value, str) or not value.strip():
      return f"must be a non-empty string, got {got}"
  elif kind == "any_str":
    if not isinstance(value, str):
      return f"must be a string, got {got}"
  elif kind == "object":
    if not isinstance(value, dict):
      return f"must be an object, got {got}"
  elif kind == "objects":
    if not isinstance(value, (list, tuple)) or not all(isinstance(s, dict) for s in value):
      return f"must be a list of objects, got {type(value).__name__}"
  return None


def _validate(d, where: str) -> None:
  """Raise :class:`CostProfileError` (one line starting with ``where``) unless ``d`` is a valid
  version-1 profile object."""
  if not isinstance(d, dict):
    raise CostProfileError(f"{where}: expected a JSON object, got {type(d).__name__}")
  if "version" not in d:
    raise CostProfileError(f"{where}: missing field 'version'")
  problem = _kind_error(d["version"], "version")
  if problem:
    raise CostProfileError(f"{where}: field 'version' {problem}")
  if d["version"] != VERSION:
    raise CostProfileError(f"{where}: unknown version {d['version']} (this fcnjax reads version "
                           f"{VERSION})")
  missing = [k for k in _REQUIRED if k not in d]
  if missing:
    raise CostProfileError(f"{where}: missing field{'s' if len(missing) > 1 else ''} "
                           + ", ".join(repr(k) for k in missing))
  unknown = sorted(k for k in d if k not in _REQUIRED and k not in _OPTIONAL
                   and k not in _IGNORED)
  if unknown:
    raise CostProfileError(f"{where}: unknown field{'s' if len(unknown) > 1 else ''} "
                           + ", ".join(repr(k) for k in unknown))
  for k, kind in {**_REQUIRED, **_OPTIONAL}.items():
    if k in d:
      problem = _kind_error(d[k], kind)
      if problem:
        raise CostProfileError(f"{where}: field {k!r} {problem}")


def _from_json(d: dict, source: str) -> CostProfile:
  """A :class:`CostProfile` from a validated dict."""
  kw = {k: d[k] for k in (*_REQUIRED, *_OPTIONAL) if k in d}
  kw["samples"] = tuple(kw.get("samples", ()))
  for k in ("compile_s_per_bucket", "warm_compile_s_per_bucket", "s_per_pixel",
            "width_multiplier"):
    kw[k] = float(kw[k])
  return CostProfile(source=source, **kw)


def load_profile(path) -> CostProfile:
  """Read a profile written by :func:`save_profile` (or by hand; schema in the module docstring).
  Raises :class:`CostProfileError`, one line naming ``path``, for a missing or unreadable file,
  text that is not JSON, JSON that is not an object, a missing or unknown field, a wrong type, a
  non-positive or non-finite cost, or an unknown version."""
  where = str(path)
  try:
    text = pathlib.Path(path).read_text(encoding="utf-8")
  except FileNotFoundError:
    raise CostProfileError(f"{where}: no such cost profile file") from None
  except IsADirectoryError:
    raise CostProfileError(f"{where}: is a directory, not a cost profile file") from None
  except (OSError, UnicodeDecodeError) as e:
    raise CostProfileError(f"{where}: cannot read: {e}") from None
  try:
    d = json.loads(text)
  except json.JSONDecodeError as e:
    raise CostProfileError(f"{where}: not JSON ({e.msg} at line {e.lineno} column {e.colno})"
                           ) from None
  _validate(d, where)
  return _from_json(d, where)


def save_profile(profile: CostProfile, path) -> pathlib.Path:
  """Write ``profile`` as small, human-readable JSON (one key per line, one sample per line) at
  ``path`` (parent folders created; written to a temporary file renamed into place). Returns the
  path. Raises :class:`CostProfileError` naming ``path`` when it cannot be written."""
  path = pathlib.Path(path)
  d = profile.to_json()
  _validate(d, str(path))
  lines = []
  for k, v in d.items():
    if k == "samples" and v:
      body = ",\n".join("    " + json.dumps(s, allow_nan=False) for s in v)
      lines.append(f'  "samples": [\n{body}\n  ]')
    else:
      lines.append(f"  {json.dumps(k)}: {json.dumps(v, allow_nan=False)}")
  text = "{\n" + ",\n".join(lines) + "\n}\n"
  tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
  except OSError as e:
    if tmp.parent.is_dir():
      tmp.unlink(missing_ok=True)
    raise CostProfileError(f"{path}: cannot write the cost profile: {e.strerror or e}") from None
  return path


# ---------------------------------------------------------------------------------------------
# Defaults
# ---------------------------------------------------------------------------------------------
CPU_PROFILE = CostProfile(
    compile_s_per_bucket=3.98, warm_compile_s_per_bucket=1.0, s_per_pixel=1.64e-6,
    backend="cpu", device_kind="cpu", model="fcn8s", width_multiplier=0.125, aligned=True,
    precision="fp32", num_devices=1, source="default:cpu", measured="2026-11-22",
    timing="benchmarks/buckets.py headline run",
    machine={"cpu": "Intel(R) Xeon(R) Processor", "cpu_count": 2, "jax": "0.10.2"})
"""The CPU default: an aligned FCN-8s x1/8, fp32, batch 8, one device, on the 2-core
``Intel(R) Xeon(R) Processor`` of benchmarks/RESULTS.md (the model the default experiment trains
on a CPU)."""

GPU_PROFILE = CostProfile(
    compile_s_per_bucket=37.54, warm_compile_s_per_bucket=3.5, s_per_pixel=9.40e-9,
    backend="gpu", device_kind="NVIDIA H100 80GB HBM3", model="fcn8s", width_multiplier=1.0,
    aligned=False, precision="bf16", num_devices=1, source="default:gpu", measured="2026-11-22",
    timing=("benchmarks/buckets.py GPU H100 run: first call of a fresh jit minus its median step; "
            "warm = a repeat compile (in-process XLA autotuning cache), an upper bound of a "
            "persistent-cache load"),
    fit={"a_s": 0.00972, "b_s_per_px": 9.40e-9, "r2": 0.992, "points": 8,
         "method": "least squares over the bucket strategies' measured shapes"},
    machine={"device": "NVIDIA H100 80GB HBM3", "cpu_count": 16, "jax": "0.11.2",
             "results": "benchmarks/results/buckets-voc-gpu-h100.json"})
"""The GPU default (also used for TPU): the reference FCN-8s (full width, exact pad-100
geometry), bf16 compute, batch 8, one NVIDIA H100 80GB HBM3; the "GPU: the full-size headline on
an H100" section of benchmarks/RESULTS.md (``benchmarks/results/buckets-voc-gpu-h100.json``,
2026-11-22, jax 0.11.2). Cold compile: 37.54 s, the median first compile of a bucket shape (first
compiles there range 21-44 s). Warm: 3.5 s, what a repeat compile of an already-autotuned shape
cost in that run (3.4-3.6 s; no persistent-cache load was measured there, and a load skips the
XLA compile too, so this is an upper bound). Per pixel: 9.40e-9 s/px, the slope of the bucket
strategies' step-time fit (8 shapes, R^2 0.992; over all 15 shapes 1.19e-8, R^2 0.984); a
batch-8 step at 375x500 is 24 ms."""

DEFAULT_PROFILES = {"cpu": CPU_PROFILE, "gpu": GPU_PROFILE}
"""Backend -> default :class:`CostProfile`. A TPU gets the GPU's (an accelerator whose compiles
dwarf its steps; no TPU has been measured)."""


def default_profile(backend: str | None = None) -> CostProfile:
  """The documented default for ``backend`` ("cpu", "gpu", or "tpu", which gets the GPU's);
  ``None``: ``jax.default_backend()``. Raises ValueError for any other backend."""
  if backend is None:
    import jax
    backend = jax.default_backend()
  key = {"cpu": "cpu", "gpu": "gpu", "cuda": "gpu", "rocm": "gpu", "tpu": "gpu"}.get(
      str(backend).lower())
  if key is None:
    raise ValueError(f"no default cost profile for backend {backend!r} (known: cpu, gpu, tpu); "
                     "measure one with python -m benchmarks.buckets --calibrate")
  return DEFAULT_PROFILES[key]
