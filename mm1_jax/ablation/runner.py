"""Runs a suite's variant x seed grid through the normal train and evaluate commands.

    DIR/pretrain/                         the suite's Pretrain run, if it has one
                                          (trained first; every variant's init_from)
    DIR/runs/<variant slug>/seed_<n>/     an ordinary workdir (checkpoints, TensorBoard,
                                          train_losses.jsonl, train_summary.json,
                                          config.json)
        train.log, evaluate.log           each command's output
        eval_<n>.json                     python -m mm1_jax.evaluate's reports (one
                                          per group of tasks with the same shots)
        result.json                       what the suite keeps: status, metrics, losses

A run's metrics: train/final_loss, every evaluation score, and what it cost
(cost/trainable_params_M, cost/step_time_s, cost/peak_memory_GiB, from the
trainer's train_summary.json).

Runs go one after another, each a subprocess on all local devices. A run
with a result.json whose status is "done" is skipped; any other run starts
its commands again, and `python -m mm1_jax.train` resumes from the run's
latest checkpoint, so killing the harness loses at most the steps since the
last checkpoint. A run that fails (a command exits non-zero) gets status
"failed" with the reason (the command's last error line) and the suite goes
on; running the suite again retries it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from typing import Any, Callable, Sequence

from mm1_jax.ablation.suite import Suite, Variant
from mm1_jax.evaluation.metrics import REPORT_COUNT_FIELDS

RESULT = "result.json"
PRETRAIN_DIR = "pretrain"
# Written by the trainer (mm1_jax/training/trainer.py; not imported: it imports JAX).
LOSS_LOG = "train_losses.jsonl"
TRAIN_SUMMARY = "train_summary.json"
# The fraction of the last steps whose mean loss is the run's final loss.
FINAL_LOSS_FRACTION = 0.1


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run: a variant at a seed, or (pretrain=True) the suite's
  Pretrain. init_from: the pretrain run's workdir, for the variants of a
  suite that has one."""
  variant: Variant
  seed: int
  directory: str
  pretrain: bool = False
  init_from: str = ""

  @property
  def name(self) -> str:
    return self.variant.label if self.pretrain else f"{self.variant.label} (seed {self.seed})"


def pretrain_run(suite: Suite, workdir: str) -> Run | None:
  """The suite's Pretrain run (seed 0, in DIR/pretrain), or None."""
  if suite.pretrain is None:
    return None
  return Run(suite.pretrain.variant, 0, os.path.join(workdir, PRETRAIN_DIR), pretrain=True)


def runs_of(suite: Suite, workdir: str) -> list[Run]:
  """Every variant x seed, variants first (a suite's first seed finishes early)."""
  pretrain = pretrain_run(suite, workdir)
  init_from = os.path.abspath(pretrain.directory) if pretrain else ""
  return [Run(variant, seed, os.path.join(workdir, "runs", variant.slug, f"seed_{seed}"),
              init_from=init_from)
          for seed in suite.seeds for variant in suite.variants]


def override_flag(key: str, value: Any) -> str:
  """--config.KEY=VALUE as ml_collections parses it (tuples as Python literals)."""
  if isinstance(value, (tuple, list)):
    value = repr(tuple(value))
  return f"--config.{key}={value}"


def config_flags(suite: Suite, run: Run) -> list[str]:
  """A variant: the suite's base and overrides, then the variant's (its
  init_from the pretrain run's workdir, if the suite has one); the pretrain
  run: its own base and overrides."""
  if run.pretrain:
    base, overrides = suite.pretrain.base, dict(suite.pretrain.overrides)
    num_steps = suite.pretrain.num_steps
  else:
    base, overrides, num_steps = suite.base, {**suite.overrides}, suite.num_steps
    if run.init_from:
      overrides["init_from"] = run.init_from
  overrides.update(run.variant.overrides)
  overrides.update({"train.num_steps": num_steps, "train.seed": run.seed, "data.seed": run.seed})
  return [f"--config={base}"] + [override_flag(k, v) for k, v in overrides.items()]


def train_command(suite: Suite, run: Run) -> list[str]:
  return [sys.executable, "-m", "mm1_jax.train", *config_flags(suite, run),
          f"--workdir={run.directory}"]


def evaluate_commands(suite: Suite, run: Run) -> list[tuple[str, list[str]]]:
  """(report path, command) per group of few-shot tasks with the same shot
  counts (mm1_jax.evaluate runs every task at every shot it is given); the
  perplexity tasks go with the first group."""
  groups: dict[tuple[int, ...], list[str]] = {}
  for task, shots in suite.fewshot:
    groups.setdefault(tuple(sorted(shots)), []).append(task)
  commands = []
  for index, (shots, tasks) in enumerate(list(groups.items()) or [((), [])]):
    report = os.path.join(run.directory, f"eval_{index}.json")
    command = [sys.executable, "-m", "mm1_jax.evaluate", *config_flags(suite, run),
               f"--workdir={run.directory}", f"--tasks={','.join(tasks)}",
               f"--max_queries={suite.max_queries}", f"--output={report}"]
    if shots:
      command.append(f"--shots={','.join(str(k) for k in shots)}")
    if suite.prompt_format != "fewshot":
      command.append(f"--prompt_format={suite.prompt_format}")
    if index == 0 and suite.perplexity_tasks:
      command.append(f"--perplexity_tasks={','.join(suite.perplexity_tasks)}")
    commands.append((report, command))
  return commands


def read_losses(directory: str) -> list[tuple[int, float]]:
  """(step, loss) of every logged step, the last write of a step winning
  (a resumed run rewrites the steps after its checkpoint)."""
  path = os.path.join(directory, LOSS_LOG)
  if not os.path.exists(path):
    return []
  losses = {}
  with open(path) as f:
    for line in f:
      try:
        entry = json.loads(line)
      except json.JSONDecodeError:  # A line being written.
        continue
      losses[int(entry["step"])] = float(entry["loss"])
  return sorted(losses.items())


def eval_metrics(report: dict) -> dict[str, float]:
  """{"<task>/<setting>/<metric>": value} of a mm1_jax.evaluate report."""
  metrics = {}
  for task, settings in report["results"].items():
    for setting, result in settings.items():
      for name, value in result.items():
        if name not in REPORT_COUNT_FIELDS and isinstance(value, (int, float)):
          metrics[f"{task}/{setting}/{name}"] = float(value)
  return metrics


def cost_metrics(directory: str) -> dict[str, float]:
  """cost/* metrics of a run's train_summary.json ({} before its first one)."""
  path = os.path.join(directory, TRAIN_SUMMARY)
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    summary = json.load(f)
  metrics = {"cost/trainable_params_M": summary["trainable_parameters"] / 1e6,
             "cost/peak_memory_GiB": summary["peak_memory_bytes"] / 2**30}
  if summary.get("step_time_median_s") is not None:
    metrics["cost/step_time_s"] = summary["step_time_median_s"]
  return metrics


def failure_reason(log_path: str) -> str:
  """The last 'Error: ...' line of a command's output, else its last line."""
  try:
    with open(log_path, errors="replace") as f:
      lines = [line.strip() for line in f if line.strip()]
  except OSError:
    return "no output"
  errors = [line for line in lines if line.startswith("Error:")]
  return (errors or lines or ["no output"])[-1][:500]


class Progress:
  """One line for the whole suite: runs done / total, the current run's
  step, the suite's ETA. On a terminal it is rewritten in place; in a log,
  printed every `every` seconds and at each change of run."""

  def __init__(self, total_runs: int, num_steps: int, out=None, every: float = 30.0):
    self.total_runs, self.num_steps = total_runs, num_steps
    self.out = out or sys.stdout
    self.every = every
    self.done = 0
    self.run_seconds: list[float] = []  # Wall time of the runs done in this invocation.
    self._last_print = 0.0
    self._tty = hasattr(self.out, "isatty") and self.out.isatty()

  def eta(self, step: int, run_elapsed: float) -> float | None:
    """Seconds left: measured runs' mean time x runs left, or this run's pace."""
    remaining = self.total_runs - self.done
    if self.run_seconds:
      per_run = sum(self.run_seconds) / len(self.run_seconds)
      return max(per_run - run_elapsed, 0.0) + per_run * (remaining - 1)
    if step > 0:
      per_run = run_elapsed / step * self.num_steps
      return max(per_run - run_elapsed, 0.0) + per_run * (remaining - 1)
    return None

  def show(self, run: Run, stage: str, step: int, run_elapsed: float, force: bool = False,
           num_steps: int | None = None):
    """num_steps: the run's, if not the suite's (the pretrain run)."""
    now = time.monotonic()
    if not force and not self._tty and now - self._last_print < self.every:
      return
    self._last_print = now
    eta = self.eta(step, run_elapsed)
    eta_text = "?" if eta is None else time.strftime("%Hh%Mm%Ss", time.gmtime(eta))
    line = (f"suite: {self.done}/{self.total_runs} runs done | {run.name}: {stage} step "
            f"{step}/{num_steps or self.num_steps} | ETA {eta_text}")
    if self._tty:
      print("\r" + line.ljust(110), end="", file=self.out, flush=True)
    else:
      print(line, file=self.out, flush=True)

  def finished(self, run: Run, seconds: float | None, status: str) -> None:
    self.done += 1
    if seconds is not None:
      self.run_seconds.append(seconds)
    end = "\n" if self._tty else ""
    print(f"{end}suite: {self.done}/{self.total_runs} runs done | {run.name}: {status}",
          file=self.out, flush=True)


def _run_command(command: Sequence[str], log_path: str, poll: Callable[[], None]) -> int:
  """Runs `command` with its output appended to log_path, calling poll every 2 s."""
  with open(log_path, "a") as log:
    log.write(f"\n$ {' '.join(command)}\n")
    log.flush()
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
      while process.poll() is None:
        poll()
        time.sleep(2.0)
    except BaseException:
      process.terminate()  # The harness was interrupted: stop the run with it.
      process.wait()
      raise
  return process.returncode


def read_result(run: Run) -> dict | None:
  path = os.path.join(run.directory, RESULT)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def execute(suite: Suite, run: Run, progress: Progress) -> dict:
  """Trains and evaluates one run (resuming what is there); returns its result.
  The pretrain run is trained only."""
  os.makedirs(run.directory, exist_ok=True)
  start = time.monotonic()
  result = {"variant": run.variant.label, "seed": run.seed, "directory": run.directory}
  evaluations = [] if run.pretrain else evaluate_commands(suite, run)
  stages = [("train", train_command(suite, run))] + [("evaluate", c) for _, c in evaluations]
  num_steps = suite.pretrain.num_steps if run.pretrain else suite.num_steps
  for stage, command in stages:
    log_path = os.path.join(run.directory, f"{stage}.log")

    def poll(stage=stage):
      losses = read_losses(run.directory)
      step = losses[-1][0] if losses else 0
      progress.show(run, stage, step, time.monotonic() - start, num_steps=num_steps)

    progress.show(run, stage, (read_losses(run.directory) or [(0, 0)])[-1][0],
                  time.monotonic() - start, force=True, num_steps=num_steps)
    code = _run_command(command, log_path, poll)
    if code:
      result.update(status="failed", stage=stage, exit_code=code,
                    reason=f"{stage}: {failure_reason(log_path)}")
      break
  else:
    losses = read_losses(run.directory)
    tail = losses[-max(1, int(len(losses) * FINAL_LOSS_FRACTION)):]
    metrics = {"train/final_loss": sum(loss for _, loss in tail) / len(tail)} if tail else {}
    metrics.update(cost_metrics(run.directory))
    step = losses[-1][0] if losses else None
    for report_path, _ in evaluations:
      with open(report_path) as f:
        report = json.load(f)
      metrics.update(eval_metrics(report))
      step = report.get("step")
    result.update(status="done", metrics=metrics, losses=losses, step=step)
  result["seconds"] = round(time.monotonic() - start, 1)
  with open(os.path.join(run.directory, RESULT), "w") as f:
    json.dump(result, f, indent=1)
  return result


def _status_text(result: dict) -> str:
  return result["status"] + (f" ({result['reason']})" if result["status"] == "failed" else "")


def run_suite(suite: Suite, workdir: str, out=None,
              on_result: Callable[[list[dict]], None] | None = None) -> list[dict]:
  """Every run's result, running those not done yet (module docstring).

  on_result: called with the results so far (runs not reached yet as
  status "pending") after each run, e.g. to rewrite the tables.
  """
  runs = runs_of(suite, workdir)
  pretrain = pretrain_run(suite, workdir)
  progress = Progress(len(runs) + (pretrain is not None), suite.num_steps, out)
  if pretrain is not None:
    previous = read_result(pretrain)
    if previous and previous.get("status") == "done":
      progress.finished(pretrain, None, "done before (skipped)")
    else:
      previous = execute(suite, pretrain, progress)
      # Not in the ETA's mean time per run: it is not one of the grid's runs.
      progress.finished(pretrain, None, _status_text(previous))
    if previous["status"] != "done":
      reason = f"{pretrain.variant.label} failed: {previous['reason']}"
      results = [{"variant": r.variant.label, "seed": r.seed, "directory": r.directory,
                  "status": "failed", "reason": reason} for r in runs]
      if on_result:
        on_result(results)
      return results
  results = []
  for run in runs:
    previous = read_result(run)
    if previous and previous.get("status") == "done":
      progress.finished(run, None, "done before (skipped)")
      results.append(previous)
      continue
    result = execute(suite, run, progress)
    progress.finished(run, result["seconds"] if result["status"] == "done" else None,
                      _status_text(result))
    results.append(result)
    if on_result:
      pending = [{"variant": r.variant.label, "seed": r.seed, "directory": r.directory,
                  "status": "pending", "reason": "not run yet"} for r in runs[len(results):]]
      on_result(results + pending)
  return results
