"""Every program a run will need, compiled ahead of time on a thread pool.

At the start of a run the train step of every train bucket and the eval step of every val
bucket are known (bucket shapes x batch sizes), so they are compiled before the first step
needs them - ``jitted.lower(*abstract_args).compile()`` on a :class:`ThreadPoolExecutor` - while
the loader starts and, for those a step does not need yet, while training runs. The compile
fills the jitted function's own cache, so the loop keeps calling ``train_step(state, batch)``
and reuses the program; before a call it :meth:`Precompiler.wait`-s for that program (a call
that started while the program was still compiling would compile it a second time).

XLA releases the GIL while it compiles, so compiles on different threads overlap with each
other and with the loader; tracing and lowering (Python) do not.
"""

from __future__ import annotations

import concurrent.futures
import os
import sys
import threading
import time
from typing import Callable, Hashable

from fcnjax.compilation import CompileStats

DEFAULT_MAX_THREADS = 4
"""Default pool size cap: more threads than this mostly contend for the same cores."""


def default_threads(backend: str = "gpu") -> int:
  """Background compile threads when none are configured. On an accelerator (compiles are host
  work, steps device work): ``min(DEFAULT_MAX_THREADS, CPU count)``. On the CPU backend the
  compiles share the cores with the steps: ``CPU count // 4``, so 0 (compile each program at
  its first use) below 4 cores. Measured on the 2-core CPU, default voc_fcn8s run for 40 steps
  with cold caches: 75.8 s wall compiling at first use, 89.5 s with one background thread
  (the concurrent compiles took 71.8 s of XLA time instead of 48.4 s)."""
  cpus = os.cpu_count() or 1
  if backend == "cpu":
    return cpus // 4
  return max(1, min(DEFAULT_MAX_THREADS, cpus))


class Precompiler:
  """Compiles ``jobs`` ({key: callable that lowers + compiles one program}) on ``threads``
  threads, in the order given; :meth:`wait` blocks until one key's program is ready.

  ``print_fn`` gets one line when the jobs start and one when the last is done (with cold and
  warm compile seconds from :class:`~fcnjax.compilation.CompileStats`); on a terminal
  (``progress=None``: stderr is a tty) a single line on stderr counts them in place meanwhile.
  A job that raises re-raises its exception from :meth:`wait` for its key (and is reported in
  the last line), as the jit call itself would have.
  """

  def __init__(self, jobs: dict[Hashable, Callable[[], object]], *, threads: int | None = None,
               print_fn=print, label: str = "", progress: bool | None = None):
    self.keys = list(jobs)
    self.threads = max(1, int(threads or default_threads()))
    self.print = print_fn
    self.label = label
    self.progress = sys.stderr.isatty() if progress is None else progress
    self.stats = CompileStats()
    self.start = time.perf_counter()
    self.seconds = None  # wall seconds from start to the last job done
    self._lock = threading.Lock()
    self._done = 0
    self._failed = 0
    self._pool = concurrent.futures.ThreadPoolExecutor(self.threads,
                                                       thread_name_prefix="fcnjax-compile")
    self.futures = {}
    self.jobs = dict(jobs)
    self.waited_s = 0.0  # seconds callers of wait() were blocked (compiling, or waiting for one)
    self._waited = set()
    if self.keys:
      self.print(f"compile: {len(self.keys)} programs{self.label} on {self.threads} "
                 f"thread{'s' if self.threads != 1 else ''}, in the background", flush=True)
    for key, job in jobs.items():
      fut = self._pool.submit(job)
      fut.add_done_callback(self._finished)
      self.futures[key] = fut
    if not self.keys:
      self.seconds = 0.0

  def _finished(self, fut) -> None:
    if fut.cancelled():  # taken out of the queue by wait() (compiled there) or by close()
      return
    with self._lock:
      self._done += 1
      if fut.exception() is not None:
        self._failed += 1
      done, total = self._done, len(self.keys)
    if self.progress and done < total:
      print(f"\rcompile: {done}/{total} programs ({time.perf_counter() - self.start:.0f} s)",
            end="", file=sys.stderr, flush=True)
    if done == total:
      self.seconds = time.perf_counter() - self.start
      if self.progress:
        print("\r\033[K", end="", file=sys.stderr, flush=True)
      self.print(self.summary(), flush=True)

  def summary(self) -> str:
    """``compile: N programs ready in W s wall (<CompileCounts.describe()>)``."""
    failed = f", {self._failed} failed" if self._failed else ""
    wall = self.seconds if self.seconds is not None else time.perf_counter() - self.start
    return (f"compile: {len(self.keys)} programs{self.label} ready in {wall:.1f} s wall"
            f"{failed} ({self.stats.counts().describe()})")

  def wait(self, key, stop=None, *, poll_s: float = 0.2) -> None:
    """Block until ``key``'s program is compiled (no-op for a key never submitted or already
    waited for). A job still queued behind others is taken out of the queue and compiled right
    here, so the caller never waits for programs it does not need yet. With ``stop`` (an
    object with ``.requested``), return early once a stop is requested, so that Ctrl-C is not
    held up by a compile. The seconds spent here add up in :attr:`waited_s`."""
    fut = self.futures.get(key)
    if fut is None or key in self._waited:
      return
    t0 = time.perf_counter()
    try:
      if fut.cancel():  # not started yet: compile it on this thread, now
        self.futures[key] = fut = concurrent.futures.Future()
        fut.add_done_callback(self._finished)
        fut.set_running_or_notify_cancel()
        try:
          fut.set_result(self.jobs[key]())
        except BaseException as e:  # noqa: BLE001 - re-raised below, as the jit call would
          fut.set_exception(e)
      while True:
        try:
          fut.result(timeout=poll_s)
          self._waited.add(key)
          return
        except concurrent.futures.TimeoutError:
          if stop is not None and stop.requested:
            return
    finally:
      self.waited_s += time.perf_counter() - t0

  @property
  def all_done(self) -> bool:
    return all(f.done() for f in self.futures.values())

  def close(self) -> None:
    """Cancel what has not started; running compiles finish on their threads."""
    self._pool.shutdown(wait=False, cancel_futures=True)
