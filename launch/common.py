"""What the launchers share: the trainer's command line and running commands.

Every command is an argv list, never a string joined from pieces: a config
override such as --config.data.mixture='a b;$(x)' stays one argument. Where a
shell must read a command (a remote ssh --command, an sbatch script), the
pieces are quoted with shlex.join / shlex.quote. With dry_run the commands are
printed (shlex.join, so they can be pasted into a shell) instead of run.

This module imports no JAX: launchers run on laptops that only have gcloud.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from typing import Sequence

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_MODULE = "mm1_jax.train"
PREPARE_DATA_MODULE = "mm1_jax.data.sources"  # Builds the bundled TFDS data once.

# Flags every launcher has, defined once here (absl refuses a flag name
# defined twice in one process).
DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print every command instead of running it.")
ENV = flags.DEFINE_multi_string("env", [], "KEY=VALUE set for the trainer processes "
                                "(repeatable), e.g. NCCL_SOCKET_IFNAME=eth0, LIBTPU_INIT_ARGS=...")
PYTHON = flags.DEFINE_string("python", sys.executable, "local, gpu_slurm: the Python that runs "
                             "the trainer (on the nodes: with the requirements installed).")
# (Not --log_dir: absl.logging owns that name.)
LOG_DIR = flags.DEFINE_string("process_log_dir", None, "local, gpu_slurm: per-process logs; "
                              "default <workdir>/logs (needed for a gs:// workdir).")
PREPARE_DATA = flags.DEFINE_bool("prepare_data", True, "Build the bundled data sets once before "
                                 "training, so that processes never race to build them.")


def split_argv(argv: Sequence[str], subcommands: Sequence[str]) -> tuple[str, list[str]]:
  """(subcommand, trainer arguments) from what absl left in argv.

  absl leaves the positional subcommand and everything after `--` (the
  trainer's own flags, passed through untouched).
  """
  rest = list(argv[1:])
  if not rest or rest[0] not in subcommands:
    raise app.UsageError(f"expected a subcommand, one of {list(subcommands)}; got {rest[:1]}.")
  return rest[0], rest[1:]


def flag_value(args: Sequence[str], name: str) -> str | None:
  """The value of --name=VALUE (or --name VALUE) in an argument list, last one wins."""
  value = None
  for i, arg in enumerate(args):
    if arg.startswith(f"--{name}="):
      value = arg.split("=", 1)[1]
    elif arg == f"--{name}" and i + 1 < len(args):
      value = args[i + 1]
  return value


def check_trainer_args(trainer_args: Sequence[str], shared_workdir: bool) -> str:
  """Checks the trainer gets --config and --workdir; returns the workdir.

  shared_workdir: the processes run on different machines, so the workdir
  must be a path every one of them sees alike: absolute (a shared
  filesystem) or a URL (gs://...), never relative to a worker's home.
  """
  if flag_value(trainer_args, "config") is None:
    raise app.UsageError("pass the trainer's flags after `--`, e.g. -- --config=configs/tiny.py "
                         "--workdir=/shared/runs/tiny")
  workdir = flag_value(trainer_args, "workdir")
  if workdir is None:
    raise app.UsageError("the trainer needs --workdir=... (after `--`).")
  if shared_workdir and not (workdir.startswith("/") or "://" in workdir):
    raise app.UsageError(f"--workdir={workdir} is relative; every host must see the same "
                         "directory: give an absolute path on a shared filesystem (or gs://...).")
  return workdir


def train_argv(python: str, trainer_args: Sequence[str]) -> list[str]:
  """The trainer's command line: python -m mm1_jax.train <trainer args>."""
  return [python, "-m", TRAIN_MODULE, *trainer_args]


def env_assignments(env_flags: Sequence[str]) -> dict[str, str]:
  """KEY=VALUE strings (from a --env flag) as a dict; the value may hold '='."""
  result = {}
  for item in env_flags:
    key, sep, value = item.partition("=")
    if not sep or not key.isidentifier():
      raise app.UsageError(f"--env takes KEY=VALUE items, got {item!r}.")
    result[key] = value
  return result


def export_lines(env: dict[str, str]) -> list[str]:
  """Shell lines exporting env, each value quoted."""
  return [f"export {key}={shlex.quote(value)}" for key, value in env.items()]


class Runner:
  """Runs argv lists, or only prints them (dry run)."""

  def __init__(self, dry_run: bool, out=None):
    self.dry_run = dry_run
    self.out = out or sys.stdout

  def show(self, argv: Sequence[str]) -> None:
    print(shlex.join(argv), file=self.out, flush=True)

  def note(self, text: str) -> None:
    """A comment line: what a step does that is not a command (dry run too)."""
    print(f"# {text}", file=self.out, flush=True)

  def run(self, argv: Sequence[str], check: bool = True) -> int:
    """Runs argv (prints it first); returns the exit code (0 in a dry run)."""
    self.show(argv)
    if self.dry_run:
      return 0
    result = subprocess.run(list(argv), check=False)
    if check and result.returncode:
      raise SystemExit(f"command failed (exit {result.returncode}): {shlex.join(argv)}")
    return result.returncode

  def query(self, argv: Sequence[str], dry_run_answer: str = "") -> tuple[int, str]:
    """Runs a read-only argv and returns (exit code, stdout). A dry run prints
    it and answers `dry_run_answer` as if it had run."""
    self.show(argv)
    if self.dry_run:
      return 0 if dry_run_answer else 1, dry_run_answer
    result = subprocess.run(list(argv), check=False, capture_output=True, text=True)
    return result.returncode, result.stdout.strip()
