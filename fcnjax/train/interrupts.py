"""SIGINT (Ctrl-C) and SIGTERM (what a cluster scheduler sends) as a request to stop cleanly.

Inside ``with StopRequests(notice=print) as stop:`` the two signals no longer raise
``KeyboardInterrupt`` / kill the process: the first one sets ``stop.signal`` and prints one line;
the training loop checks ``stop.requested`` after each step, saves, and raises
:class:`Interrupted`. A second signal while the save runs prints that the save is still in
progress (the process is not killed half-way through writing). Handlers are restored on exit.
Only the main thread can install handlers; elsewhere this is a no-op.
"""

from __future__ import annotations

import signal
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(RuntimeError):
  """The run stopped on a signal after saving; ``exit_code`` is 128 + the signal number."""

  def __init__(self, message: str, signum: int):
    super().__init__(message)
    self.signum = signum
    self.exit_code = 128 + int(signum)


class StopRequests:
  def __init__(self, *, notice=print):
    self.notice = notice
    self.signal = None
    self._old = {}

  @property
  def requested(self) -> bool:
    return self.signal is not None

  @property
  def name(self) -> str:
    return signal.Signals(self.signal).name if self.signal is not None else ""

  def _handle(self, signum, frame):
    if self.signal is None:
      self.signal = signum
      self.notice(f"{signal.Signals(signum).name}: finishing the current step, then saving "
                  "and stopping")
    else:
      self.notice(f"{signal.Signals(signum).name}: still stopping (saving the checkpoint); "
                  "please wait")

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for s in SIGNALS:
        self._old[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc):
    for s, old in self._old.items():
      signal.signal(s, old)
    self._old = {}
    return False
