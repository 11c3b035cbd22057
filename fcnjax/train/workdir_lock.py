"""One run per work directory: ``WORKDIR/.lock`` holds the owner's pid, host and start time.

:class:`WorkdirLock` is taken by the training CLIs (process 0) before anything is written to the
workdir and released when the run ends, however it ends. A second run on the same workdir is
refused with :class:`WorkdirLocked` naming the owner. A lock left by a process that died (kill -9,
a crash of the machine) is *stale*: on the same host a pid that no longer exists is detected and
the lock taken over with a notice; a lock from another host cannot be checked from here, so the
message says how to remove it once that run is known to be gone.

The lock file is created atomically (written to a temporary file, then hard-linked into place),
so a reader never sees a half-written lock.
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import time

LOCK_NAME = ".lock"


class WorkdirLocked(RuntimeError):
  """Another live run holds the workdir's lock."""


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by another user
    return True
  return True


class WorkdirLock:
  """``with WorkdirLock(workdir, notice=print): ...`` (or :meth:`acquire` / :meth:`release`)."""

  def __init__(self, workdir, *, notice=print):
    self.path = pathlib.Path(workdir) / LOCK_NAME
    self.notice = notice
    self.held = False
    self.me = {"pid": os.getpid(), "host": socket.gethostname(),
               "started": time.strftime("%Y-%m-%d %H:%M:%S")}

  def owner(self) -> dict | None:
    """The lock's contents, or None without a lock (``{}`` if it cannot be parsed)."""
    try:
      return json.loads(self.path.read_text())
    except FileNotFoundError:
      return None
    except (OSError, ValueError):
      return {}

  def acquire(self) -> None:
    self.created_dir = not self.path.parent.exists()
    self.path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(3):
      if self._create():
        self.held = True
        return
      owner = self.owner()
      if owner is None:  # released meanwhile
        continue
      pid, host = owner.get("pid"), owner.get("host")
      if isinstance(pid, int) and host == self.me["host"] and not _alive(pid):
        self.notice(f"notice: {self.path}: taking over a stale lock of process {pid} on {host} "
                    f"(started {owner.get('started', '?')}; that process no longer exists)")
        self._remove()
        continue
      if not owner:
        raise WorkdirLocked(
            f"{self.path.parent}: locked by {self.path}, which cannot be read; if no run is using "
            f"this workdir, delete {self.path}")
      where = "this host" if host == self.me["host"] else f"host {host}"
      raise WorkdirLocked(
          f"{self.path.parent} is in use by process {pid} on {where} (started "
          f"{owner.get('started', '?')}): one run per workdir. Wait for it, choose another "
          f"--workdir, or, if that run is gone, delete {self.path}")
    raise WorkdirLocked(f"{self.path}: could not take the lock (it keeps changing)")

  def _create(self) -> bool:
    tmp = self.path.with_name(f"{LOCK_NAME}.{self.me['pid']}.tmp")
    tmp.write_text(json.dumps(self.me))
    try:
      os.link(tmp, self.path)
      return True
    except FileExistsError:
      return False
    finally:
      tmp.unlink(missing_ok=True)

  def _remove(self) -> None:
    self.path.unlink(missing_ok=True)

  def release(self) -> None:
    """Remove the lock (and the workdir, if the lock created it and the run wrote nothing)."""
    if self.held and self.owner() == self.me:
      self._remove()
      if getattr(self, "created_dir", False):
        try:
          self.path.parent.rmdir()  # only succeeds when empty
        except OSError:
          pass
    self.held = False

  def __enter__(self):
    self.acquire()
    return self

  def __exit__(self, *exc):
    self.release()
    return False
