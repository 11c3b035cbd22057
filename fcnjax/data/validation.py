"""Error policy shared by the readers: what went wrong with which file, and what to do about it.

``on_error="raise"`` (default) raises :class:`DataError` naming the file and the problem.
``on_error="skip"`` leaves the example out (problems seen at construction) or, for problems only
seen when decoding during an epoch, returns a fully-ignored example (label 255, mask False) so the
epoch never crashes; every problem is recorded in an :class:`ErrorReport` and a one-line summary is
logged once (construction) or once per bad file (decode time).
"""

from __future__ import annotations

import collections
import dataclasses
import logging

log = logging.getLogger("fcnjax.data")

ON_ERROR = ("raise", "skip")


class DataError(ValueError):
  """A dataset file is missing, unreadable, or inconsistent; ``.problem`` says which and how."""

  def __init__(self, message, problem=None):
    super().__init__(message)
    self.problem = problem


@dataclasses.dataclass
class Problem:
  example_id: str
  path: str
  kind: str  # missing | unreadable | size_mismatch | bad_labels | empty_split | bad_mask
  detail: str

  def __str__(self):
    return f"{self.kind}: {self.path}: {self.detail}"


@dataclasses.dataclass
class ErrorReport:
  """Problems found in one dataset (construction-time, plus any this process saw on decode)."""

  name: str = "dataset"
  problems: list = dataclasses.field(default_factory=list)
  num_checked: int = 0

  def add(self, problem: Problem):
    self.problems.append(problem)

  @property
  def num_skipped(self) -> int:
    return len({p.example_id for p in self.problems})

  def counts(self) -> dict:
    return dict(collections.Counter(p.kind for p in self.problems))

  def summary(self, max_lines: int = 20) -> str:
    if not self.problems:
      return f"{self.name}: {self.num_checked} examples checked, no problems"
    lines = [f"{self.name}: {self.num_checked} examples checked, {self.num_skipped} skipped "
             f"({', '.join(f'{k}={v}' for k, v in sorted(self.counts().items()))})"]
    lines += [f"  {p}" for p in self.problems[:max_lines]]
    if len(self.problems) > max_lines:
      lines.append(f"  ... and {len(self.problems) - max_lines} more")
    return "\n".join(lines)


def check_policy(on_error: str):
  if on_error not in ON_ERROR:
    raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
