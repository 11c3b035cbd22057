"""XLA compilation: the persistent cache every CLI turns on, and what compiling cost.

:func:`enable_persistent_cache` points JAX's persistent compilation cache at a folder (default
:data:`DEFAULT_CACHE_DIR`) and makes it keep **every** program (JAX's defaults skip programs
that compile in under 1 s, which on a small model is most of them: a warm run would still
compile), plus XLA's own caches (``jax_persistent_cache_enable_xla_caches``: on a GPU the
convolution autotuning results, which are most of a cold compile there). ``JAX_COMPILATION_CACHE_DIR``
in the environment wins over the folder given.

:class:`CompileStats` counts, from JAX's own monitoring events, the XLA compiles since it was
created or last :meth:`~CompileStats.mark`-ed, split into **cold** (compiled by XLA) and **warm**
(loaded from the persistent cache), with seconds for each and for tracing + lowering to
StableHLO (Python-side work that no cache saves). ``backend_compile_duration`` covers a cache
read too: a compile preceded by a cache hit on its thread is warm, its whole duration warm seconds.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import threading

DEFAULT_CACHE_DIR = "~/.cache/fcnjax/xla"
ENV_VAR = "JAX_COMPILATION_CACHE_DIR"
XLA_CACHES = "all"
"""``jax_persistent_cache_enable_xla_caches``: every XLA-side cache JAX knows how to put in the
persistent cache folder (jax 0.10's default is only the GPU per-fusion autotune cache)."""

_COMPILE = "/jax/core/compile/backend_compile_duration"
_TRACE = "/jax/core/compile/jaxpr_trace_duration"
_LOWER = "/jax/core/compile/jaxpr_to_mlir_module_duration"
_HIT = "/jax/compilation_cache/cache_hits"


def enable_persistent_cache(path: str | None = DEFAULT_CACHE_DIR) -> str | None:
  """Turn the persistent compilation cache on at ``path`` (``~`` expanded; ``""``/``None``: off,
  unless ``$JAX_COMPILATION_CACHE_DIR`` is set). Returns the folder in use, or None.

  Must run before the first compile to cover it (later compiles are covered either way)."""
  import jax
  folder = os.environ.get(ENV_VAR) or (os.path.expanduser(path) if path else None)
  if not folder:
    return None
  jax.config.update("jax_compilation_cache_dir", folder)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
  jax.config.update("jax_persistent_cache_enable_xla_caches", XLA_CACHES)
  return folder


def cache_dir() -> str | None:
  """The persistent cache folder JAX uses now (None: off)."""
  import jax
  return jax.config.jax_compilation_cache_dir or None


@dataclasses.dataclass(frozen=True)
class CompileCounts:
  """XLA compiles over an interval: ``cold`` programs compiled by XLA in ``cold_s`` seconds,
  ``warm`` programs loaded from the persistent cache in ``warm_s`` seconds, and ``trace_s``
  seconds of tracing + lowering (all programs). Seconds are summed over programs (compiles on
  several threads overlap, so the sum may exceed the wall time)."""

  cold: int = 0
  cold_s: float = 0.0
  warm: int = 0
  warm_s: float = 0.0
  trace_s: float = 0.0
  by_name: dict = dataclasses.field(default_factory=dict)
  """Program name as JAX logs it (``"jit(train_step)"``) -> compiles of it (cold + warm)."""

  @property
  def programs(self) -> int:
    return self.cold + self.warm

  @property
  def total_s(self) -> float:
    """Compile seconds a cache could not have saved plus those it did not: cold + warm + trace."""
    return self.cold_s + self.warm_s + self.trace_s

  def describe(self) -> str:
    """One phrase, e.g. ``12 programs: 9 compiled (cold) in 20.1 s, 3 from the cache (warm)
    in 0.4 s, tracing 2.2 s``."""
    if not self.programs:
      return "0 programs compiled"
    parts = []
    if self.cold or not self.warm:
      parts.append(f"{self.cold} compiled (cold) in {self.cold_s:.1f} s")
    if self.warm:
      parts.append(f"{self.warm} from the cache (warm) in {self.warm_s:.1f} s")
    parts.append(f"tracing {self.trace_s:.1f} s")
    return f"{self.programs} program{'s' if self.programs != 1 else ''}: " + ", ".join(parts)

  def as_dict(self) -> dict:
    return {"programs": self.programs, "cold": self.cold, "cold_s": self.cold_s,
            "warm": self.warm, "warm_s": self.warm_s, "trace_s": self.trace_s,
            "by_name": dict(self.by_name)}

  def __sub__(self, other: "CompileCounts") -> "CompileCounts":
    names = collections.Counter(self.by_name)
    names.subtract(other.by_name)
    return CompileCounts(self.cold - other.cold, self.cold_s - other.cold_s,
                         self.warm - other.warm, self.warm_s - other.warm_s,
                         self.trace_s - other.trace_s, {k: v for k, v in names.items() if v})


class _Totals:
  """Process-wide running totals, fed by one set of ``jax.monitoring`` listeners (they cannot
  be removed, so they are registered once). A program's cache hit is reported on the thread
  that compiles it, before that compile's ``backend_compile_duration``: a per-thread flag tells
  the two kinds of compile apart."""

  def __init__(self):
    self.lock = threading.Lock()
    self.local = threading.local()
    self.cold = self.warm = 0
    self.cold_s = self.warm_s = self.trace_s = 0.0
    self.by_name = collections.Counter()  # "jit(train_step)" -> compiles (cold or warm)
    self.registered = False

  def register(self):
    import jax
    with self.lock:
      if self.registered:
        return
      jax.monitoring.register_event_duration_secs_listener(self._duration)
      jax.monitoring.register_event_listener(self._event)
      self.registered = True

  def _duration(self, event, seconds, fun_name=None, **_):
    if event == _COMPILE:
      hit, self.local.hit = getattr(self.local, "hit", False), False
      with self.lock:
        self.by_name[str(fun_name)] += 1
        if hit:
          self.warm += 1
          self.warm_s += float(seconds)
        else:
          self.cold += 1
          self.cold_s += float(seconds)
    elif event in (_TRACE, _LOWER):
      with self.lock:
        self.trace_s += float(seconds)

  def _event(self, event, **_):
    if event == _HIT:
      self.local.hit = True

  def counts(self) -> CompileCounts:
    with self.lock:
      return CompileCounts(cold=self.cold, cold_s=self.cold_s, warm=self.warm,
                           warm_s=self.warm_s, trace_s=self.trace_s,
                           by_name=dict(self.by_name))


_TOTALS = _Totals()


class CompileStats:
  """Compiles since creation (or the last :meth:`mark`), from JAX's monitoring events.

  >>> stats = CompileStats()
  >>> ...  # run things
  >>> stats.counts().describe()
  """

  def __init__(self):
    _TOTALS.register()
    self._start = _TOTALS.counts()

  def mark(self) -> None:
    self._start = _TOTALS.counts()

  def counts(self) -> CompileCounts:
    return _TOTALS.counts() - self._start
