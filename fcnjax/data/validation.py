"""Error policy shared by the readers: what went wrong with which file, and what to do about it.

Problems found *up front* (when a source is built: missing files, unreadable headers, image / mask
size mismatches, duplicate ids, and with ``validate="full"`` every decode problem) are all
collected before anything is decided:

* ``on_error="raise"`` (default) then raises ONE :class:`DataError` whose message lists every
  problem (the :meth:`ErrorReport.summary`: a counts line covering all of them, then one line per
  problem, at most 20, then ``... and N more``); ``.problem`` is the first, ``.problems`` all.
* ``on_error="skip"`` leaves those examples out (for a duplicated id: every occurrence after the
  first), records every problem in the source's :class:`ErrorReport` and logs its summary once.

Problems only seen when an example is decoded during an epoch never stop a run under ``"skip"``:
the example comes back fully ignored (label 255, mask False) and the problem is recorded (in the
process that decoded it) and logged once per bad file. ``SegmentationSource.problem_of(i)`` names
such a problem again from any process.
"""

from __future__ import annotations

import collections
import dataclasses
import logging

log = logging.getLogger("fcnjax.data")

ON_ERROR = ("raise", "skip")
KINDS = ("missing", "unreadable", "size_mismatch", "bad_labels", "duplicate", "empty_split",
         "bad_mask", "unknown")
"""Problem kinds (``Problem.kind``)."""

IN_REPORT = "fcnjax_in_report"
"""Attribute set (``extra={IN_REPORT: True}``) on log records that only repeat what a source's
:class:`ErrorReport` (or its EXIF note) holds: a tool that prints the report itself, such as
``python -m fcnjax.data.check``, filters them out so that each problem is shown once."""


class DataError(ValueError):
  """A dataset file is missing, unreadable, or inconsistent.

  ``.problem``: the first :class:`Problem` (or None); ``.problems``: every problem this error
  stands for (the up-front check of a source raises one error for all of them).
  """

  def __init__(self, message, problem=None, problems=None):
    super().__init__(message)
    self.problems = list(problems) if problems is not None else (
        [problem] if problem is not None else [])
    self.problem = problem if problem is not None else (
        self.problems[0] if self.problems else None)


@dataclasses.dataclass
class Problem:
  example_id: str
  path: str
  kind: str  # one of KINDS
  detail: str

  def __str__(self):
    return f"{self.kind}: {self.path}: {self.detail}"


@dataclasses.dataclass
class ErrorReport:
  """Problems found in one dataset (construction-time, plus any this process saw on decode).

  ``num_checked``: the examples (rows of the id list) checked; ``num_duplicates_dropped``: rows
  left out because their id appeared earlier in the list (``on_error="skip"``).
  """

  name: str = "dataset"
  problems: list = dataclasses.field(default_factory=list)
  num_checked: int = 0
  num_duplicates_dropped: int = 0

  def add(self, problem: Problem):
    self.problems.append(problem)

  @property
  def num_skipped(self) -> int:
    """Examples left out or given fully ignored: every distinct id with a problem (a duplicated
    id's first occurrence is kept and not counted), plus the dropped duplicate rows."""
    return (len({p.example_id for p in self.problems if p.kind != "duplicate"})
            + self.num_duplicates_dropped)

  def counts(self) -> dict:
    return dict(collections.Counter(p.kind for p in self.problems))

  def summary(self, max_lines: int = 20, *, skipped: bool = True) -> str:
    """``"<name>: N examples checked, K skipped (kind=n, ...)"`` (``skipped=False``: ``"K
    problems"``, for an error that stops before anything is skipped), then one line per problem
    (at most ``max_lines``, then ``"  ... and M more"``; the counts cover all of them)."""
    if not self.problems:
      return f"{self.name}: {self.num_checked} examples checked, no problems"
    counts = ", ".join(f"{k}={v}" for k, v in sorted(self.counts().items()))
    what = (f"{self.num_skipped} skipped" if skipped
            else f"{len(self.problems)} problem{'s' if len(self.problems) != 1 else ''}")
    lines = [f"{self.name}: {self.num_checked} examples checked, {what} ({counts})"]
    lines += [f"  {p}" for p in self.problems[:max_lines]]
    if len(self.problems) > max_lines:
      lines.append(f"  ... and {len(self.problems) - max_lines} more")
    return "\n".join(lines)

  def error(self, max_lines: int = 20) -> DataError:
    """One :class:`DataError` for every problem of this report (message: the summary and what
    the library caller can do; ``.summary``: the summary alone, for callers with other advice)."""
    summary = self.summary(max_lines, skipped=False)
    err = DataError(summary + "\n(on_error='skip' would leave these examples out and use the rest)",
                    problems=self.problems)
    err.summary = summary
    return err


def check_policy(on_error: str):
  if on_error not in ON_ERROR:
    raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
