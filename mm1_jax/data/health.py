"""Data health: per-task counts of records read, used and skipped (with why).

A bad record is skipped, not fatal, but a mistake in the data can otherwise
remove a whole task from training while the console looks healthy. The input
pipeline (mm1_jax/data/pipeline.py) reports every record it reads, good or
bad, to a DataHealth, which

  - counts them per task: read, used, skipped per reason;
  - raises DataHealthError, naming the task, the reason and one offending
    record, when a task skips more than `max_skip_fraction` of its last
    `window` records, when it yields no usable example in its first
    `max_records_without_example` records (instead of spinning forever), or
    when its very first record lacks a feature (a wrong feature key);
  - formats the counts for TensorBoard (`scalars`), the console line
    (`console_summary`) and the end-of-run summary (`end_of_run_report`);
  - saves and restores them (`state_dict`) with the data position.
"""

from __future__ import annotations

import collections
import re
from typing import Any, Mapping

# Why a record is skipped. Errors of the image decoder and of user tasks start
# with one of these (or another short lower-case phrase) and a colon.
UNDECODABLE_IMAGE = "undecodable image"
MISSING_FEATURE = "missing feature"
EMPTY_TEXT = "empty text"
DOES_NOT_FIT = "does not fit the sequence"
NO_IMAGE_FITS = "no image fits"
IMAGE_COUNT_MISMATCH = "image count mismatch"
# Conversations (mm1_jax/data/conversations.py): one the chat template cannot
# render (unknown role, no assistant turn), and one whose first answer does
# not fit data.seq_len (longer ones are cut after an answer and counted as
# truncated, not skipped).
BAD_CONVERSATION = "bad conversation"
FIRST_ANSWER_DOES_NOT_FIT = "first answer does not fit"
REASONS = (UNDECODABLE_IMAGE, MISSING_FEATURE, EMPTY_TEXT, DOES_NOT_FIT, NO_IMAGE_FITS,
           IMAGE_COUNT_MISMATCH, BAD_CONVERSATION, FIRST_ANSWER_DOES_NOT_FIT)

# Records whose task is unknown: a tf.data error raised upstream of the point
# where records are tagged with their task.
UNKNOWN_TASK = "(unknown task)"

# Optional features a task may emit (see mm1_jax/data/user_tasks.py): why the
# record is bad ("" when it is fine) and where it comes from ("file:record").
PROBLEM_KEY, SOURCE_KEY = "problem", "source"

DEFAULT_WINDOW = 1000
DEFAULT_MAX_RECORDS_WITHOUT_EXAMPLE = 100


class DataHealthError(ValueError):
  """The data of a task is too broken to train on; the message says why."""


def reason_of(message: str, default: str = UNDECODABLE_IMAGE) -> str:
  """The short reason a "<reason>: details" error message starts with.

  TensorFlow wraps op errors ("{{function_node ...}} assertion failed: [...]"),
  so the known reasons are looked for anywhere, then the first "<words>: ".
  """
  for reason in REASONS:
    if reason in message:
      return reason
  message = re.sub(r"\{\{[^}]*\}\}", " ", message)
  for match in re.finditer(r"([a-z][a-z ]{2,40}[a-z]): ", message):
    phrase = match.group(1).strip()
    if phrase not in ("assertion failed", "node", "function node"):
      return phrase
  return default


def reason_key(reason: str) -> str:
  """"does not fit the sequence" -> "does_not_fit_the_sequence" (a scalar name)."""
  return re.sub(r"\W+", "_", reason).strip("_")


class _TaskCounts:
  """One task's counts; `window` holds 1 per skipped, 0 per used record."""

  def __init__(self, window: int):
    self.read = self.used = 0
    self.truncated = 0  # Used, but cut to fit (conversations: after an answer).
    self.skipped: dict[str, int] = collections.Counter()
    self.recent: collections.deque[int] = collections.deque(maxlen=window)
    self.example: dict[str, str] = {}  # reason -> the first offending record.

  @property
  def num_skipped(self) -> int:
    return sum(self.skipped.values())


class DataHealth:
  """Per-task record counts and the checks on them.

  Example:
    health = DataHealth(max_skip_fraction=0.05)
    health.used("caps")
    health.skipped("caps", "undecodable image", "file a.tfrecord:3", "bad PNG")
    health.scalars()  # {"data/caps/read": 2.0, "data/caps/used": 1.0, ...}
  """

  def __init__(self, max_skip_fraction: float = 0.05, window: int = DEFAULT_WINDOW,
               max_records_without_example: int = DEFAULT_MAX_RECORDS_WITHOUT_EXAMPLE):
    if not 0.0 <= max_skip_fraction <= 1.0:
      raise ValueError(f"max_skip_fraction must be in [0, 1], got {max_skip_fraction}.")
    self.max_skip_fraction, self.window = max_skip_fraction, window
    self.max_records_without_example = max_records_without_example
    self._tasks: dict[str, _TaskCounts] = {}

  def _task(self, task: str) -> _TaskCounts:
    if task not in self._tasks:
      self._tasks[task] = _TaskCounts(self.window)
    return self._tasks[task]

  # --- recording ---------------------------------------------------------------

  def used(self, task: str, truncated: bool = False) -> None:
    """Counts a record of `task` that went into training (`truncated`: cut to fit)."""
    counts = self._task(task)
    counts.read += 1
    counts.used += 1
    counts.truncated += int(truncated)
    counts.recent.append(0)

  def skipped(self, task: str, reason: str, source: str = "", detail: str = "") -> None:
    """Counts a skipped record; raises DataHealthError when `task` is unhealthy.

    source: where the record comes from ("file:record"), "" when unknown.
    detail: the error message or what is wrong, for the error.
    """
    counts = self._task(task)
    where = f"record {counts.read} of task {task!r}" + (f" ({source})" if source else "")
    counts.read += 1
    counts.skipped[reason] += 1
    counts.recent.append(1)
    counts.example.setdefault(reason, where + (f": {detail}" if detail else ""))
    if reason == MISSING_FEATURE and counts.read == 1:
      # The first record lacks a feature: almost surely a wrong feature key.
      raise DataHealthError(f"data: task {task!r}: its first record has a missing feature, "
                            f"check the task's feature keys; {counts.example[reason]}")
    self._check(task, counts)

  def _check(self, task: str, counts: _TaskCounts) -> None:
    if not counts.used and counts.read >= self.max_records_without_example:
      raise DataHealthError(
          f"data: task {task!r} gave no usable example in its first {counts.read} records "
          f"({self._breakdown(counts)}); e.g. {self._example(counts)}. Fix or remove the "
          "task's bad records.")
    bad = sum(counts.recent)
    if (len(counts.recent) == self.window and self.max_skip_fraction < 1.0
        and bad > self.max_skip_fraction * self.window):
      raise DataHealthError(
          f"data: task {task!r} skipped {bad} of its last {self.window} records "
          f"({bad / self.window:.1%} > data.max_skip_fraction={self.max_skip_fraction}; "
          f"{self._breakdown(counts)}); e.g. {self._example(counts)}. Fix or remove the bad "
          "records, or raise data.max_skip_fraction.")

  @staticmethod
  def _top_reason(counts: _TaskCounts) -> str:
    return max(counts.skipped, key=lambda r: (counts.skipped[r], r))

  def _breakdown(self, counts: _TaskCounts) -> str:
    return ", ".join(f"{n} {r}" for r, n in counts.skipped.most_common() if n)

  def _example(self, counts: _TaskCounts) -> str:
    return counts.example[self._top_reason(counts)]

  # --- reading -----------------------------------------------------------------

  @property
  def num_read(self) -> int:
    return sum(c.read for c in self._tasks.values())

  @property
  def num_used(self) -> int:
    return sum(c.used for c in self._tasks.values())

  @property
  def num_skipped(self) -> int:
    return sum(c.num_skipped for c in self._tasks.values())

  def counts(self) -> dict[str, dict[str, Any]]:
    """{task: {"read": n, "used": n, "truncated": n, "skipped": {reason: n}}} (plain values)."""
    return {task: {"read": c.read, "used": c.used, "truncated": c.truncated,
                   "skipped": dict(c.skipped)}
            for task, c in sorted(self._tasks.items())}

  def scalars(self) -> dict[str, float]:
    """TensorBoard scalars: data/<task>/{read,used,skipped,skipped_<reason>}, and
    data/<task>/truncated for a task with truncated examples."""
    out = {}
    for task, c in sorted(self._tasks.items()):
      prefix = f"data/{reason_key(task) if task == UNKNOWN_TASK else task}"
      out[f"{prefix}/read"], out[f"{prefix}/used"] = float(c.read), float(c.used)
      out[f"{prefix}/skipped"] = float(c.num_skipped)
      if c.truncated:
        out[f"{prefix}/truncated"] = float(c.truncated)
      for reason, n in sorted(c.skipped.items()):
        out[f"{prefix}/skipped_{reason_key(reason)}"] = float(n)
    return out

  def console_summary(self) -> str:
    """E.g. "skipped 3.1% (my_task: 48% undecodable image)"; "" when none is."""
    if not self.num_skipped:
      return ""
    worst = sorted(((c.num_skipped / c.read, task) for task, c in self._tasks.items()
                    if c.num_skipped), reverse=True)
    parts = []
    for _, task in worst[:3]:
      c = self._tasks[task]
      reason = self._top_reason(c)
      parts.append(f"{task}: {c.skipped[reason] / c.read:.0%} {reason}")
    more = f", +{len(worst) - 3} tasks" if len(worst) > 3 else ""
    return f"skipped {self.num_skipped / self.num_read:.1%} ({'; '.join(parts)}{more})"

  def end_of_run_report(self) -> str:
    """A table: one row per task (read, used, skipped, why); "" before any record."""
    if not self._tasks:
      return ""
    rows = [("task", "read", "used", "skipped", "why skipped")]
    for task, c in sorted(self._tasks.items()):
      why = ", ".join(f"{n} {r}" for r, n in c.skipped.most_common())
      used = f"{c.used} ({c.truncated} cut)" if c.truncated else str(c.used)
      rows.append((task, str(c.read), used,
                   f"{c.num_skipped} ({c.num_skipped / c.read:.1%})", why or "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join([row[0].ljust(widths[0])] + [row[i].rjust(widths[i]) for i in (1, 2, 3)]
                       + [row[4]]) for row in rows]
    return "data health:\n" + "\n".join("  " + line for line in lines)

  # --- saving ------------------------------------------------------------------

  def state_dict(self) -> dict[str, Any]:
    """JSON-able counts, windows included (so a resumed run checks the same)."""
    return {task: {"read": c.read, "used": c.used, "truncated": c.truncated,
                   "skipped": dict(c.skipped),
                   "recent": "".join(map(str, c.recent)), "example": dict(c.example)}
            for task, c in self._tasks.items()}

  def load_state_dict(self, state: Mapping[str, Any]) -> None:
    self._tasks = {}
    for task, saved in state.items():
      c = self._task(task)
      c.read, c.used = int(saved["read"]), int(saved["used"])
      c.truncated = int(saved.get("truncated", 0))
      c.skipped.update({r: int(n) for r, n in saved["skipped"].items()})
      c.recent.extend(int(bit) for bit in saved["recent"])
      c.example.update(saved["example"])
