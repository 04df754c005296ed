"""Train on a Cloud TPU pod slice, or on several slices (multi-slice).

    python -m launch.tpu_pod run --tpu=NAME --zone=ZONE --accelerator_type=v4-32 [--spot] \\
        -- --config=configs/mm1_3b.py --workdir=/shared/runs/mm1_3b [--config.x=y ...]
    python -m launch.tpu_pod logs --tpu=NAME --zone=ZONE [--worker=all]
    python -m launch.tpu_pod status | stop | delete --tpu=NAME --zone=ZONE
    python -m launch.tpu_pod tensorboard --tpu=NAME --zone=ZONE --tensorboard_logdir=/shared/runs

`run` creates the slice (`gcloud compute tpus tpu-vm create`), or reuses it
if it is READY (a PREEMPTED one is deleted and created again), copies the
code to every worker (this working tree, or --code_ref=<git ref>), installs
the requirements into a virtual environment there, and starts the same
training command on every worker, detached, each logging to its own
~/mm1_jax_logs/train.log. jax.distributed finds the workers by itself
(mm1_jax/train.py). Everything after `--` reaches the trainer unchanged.

--num_slices=N > 1 asks for N slices through a queued resource
(`gcloud compute tpus queued-resources create --node-count=N`), named
NAME-0 ... NAME-(N-1); give the trainer --config.mesh.dcn_data=N so that the
data axis spans the slices (mm1_jax/sharding.py).

`stop` sends SIGTERM, on which the trainer saves a checkpoint and exits;
`run` again with the same --workdir resumes from it. --dry_run prints every
command instead of running it (and assumes the slice does not exist yet).
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import subprocess
import tarfile
import tempfile
import time
from typing import Sequence

from absl import app, flags

from launch import common
from mm1_jax import cli

SUBCOMMANDS = ("run", "logs", "status", "stop", "delete", "tensorboard")

_TPU = flags.DEFINE_string("tpu", None, "Name of the TPU VM (or, with --num_slices > 1, of the "
                           "queued resource; its slices are NAME-0, NAME-1, ...).")
_ZONE = flags.DEFINE_string("zone", None, "Zone, e.g. us-central2-b (v4), us-east5-a (v5p).")
_PROJECT = flags.DEFINE_string("project", None, "GCP project; default: gcloud's.")
_ACCELERATOR_TYPE = flags.DEFINE_string("accelerator_type", None,
                                        "Slice type, e.g. v4-32, v5p-128, v5litepod-16, v6e-16.")
_RUNTIME_VERSION = flags.DEFINE_string("runtime_version", None,
                                       "TPU software version; default: Google's choice for JAX "
                                       "on the accelerator's generation (RUNTIME_VERSIONS).")
_SPOT = flags.DEFINE_bool("spot", False, "Spot capacity: cheaper, can be preempted.")
_NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "Slices; > 1 uses a queued resource.",
                                   lower_bound=1)
_CODE_REF = flags.DEFINE_string("code_ref", None, "Git ref (commit, branch, tag) to copy; "
                                "default: this working tree as it is, uncommitted edits included.")
_INSTALL = flags.DEFINE_bool("install", True, "Install the requirements on the workers.")
_PYTHON_VERSION = flags.DEFINE_string("python_version", "3.11", "Python of the workers' venv.")
_WORKER = flags.DEFINE_string("worker", "0", "logs: worker index within a slice, or 'all'.")
_NODE = flags.DEFINE_string("node", "0", "logs (multi-slice): slice index, or 'all'.")
_LINES = flags.DEFINE_integer("lines", 100, "logs: lines to show before following.",
                              lower_bound=0)
_FOLLOW = flags.DEFINE_bool("follow", True, "logs: keep following the log.")
_TENSORBOARD_LOGDIR = flags.DEFINE_string("tensorboard_logdir", None, "tensorboard: the "
                                          "directory to watch as the workers see it, e.g. the "
                                          "run's --workdir.")
_TENSORBOARD_PORT = flags.DEFINE_integer("tensorboard_port", 6006,
                                         "tensorboard: port on worker 0, forwarded here.",
                                         lower_bound=1, upper_bound=65535)
_POLL_S = flags.DEFINE_integer("poll_s", 60, "Seconds between checks of a queued resource.",
                               lower_bound=1)

# Google's TPU software versions for JAX, by accelerator generation
# (cloud.google.com/tpu/docs/runtimes).
RUNTIME_VERSIONS = {
    "v6e": "v2-alpha-tpuv6e",
    "v5p": "v2-alpha-tpuv5",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v4": "tpu-ubuntu2204-base",
}

# On every worker, relative to the home directory (where ssh commands start).
CODE_DIR = "mm1_jax"
VENV_DIR = "mm1_jax_venv"
LOG_DIR = "mm1_jax_logs"
ARCHIVE = "mm1_jax.tar.gz"
LOG_FILE = f"{LOG_DIR}/train.log"
PID_FILE = f"{LOG_DIR}/train.pid"
UV = '"$HOME/.local/bin/uv"'

# States of a slice (tpu-vm) or a queued resource in which it has to be
# created again; a preempted spot slice ends up in one of them.
_GONE_STATES = {"PREEMPTED", "TERMINATED", "SUSPENDED", "FAILED"}
_WAITING_STATES = {"ACCEPTED", "WAITING_FOR_RESOURCES", "PROVISIONING", "CREATING"}


def default_runtime_version(accelerator_type: str) -> str:
  generation = accelerator_type.rsplit("-", 1)[0]
  if generation not in RUNTIME_VERSIONS:
    raise app.UsageError(f"no default --runtime_version for {accelerator_type!r}; pass one "
                         f"(known generations: {sorted(RUNTIME_VERSIONS)}).")
  return RUNTIME_VERSIONS[generation]


@dataclasses.dataclass(frozen=True)
class Pod:
  """A TPU VM slice, or (num_slices > 1) a queued resource of several."""
  name: str
  zone: str
  project: str | None = None
  num_slices: int = 1

  @property
  def multislice(self) -> bool:
    return self.num_slices > 1

  def gcloud(self, verb: str, *args: str) -> list[str]:
    group = "queued-resources" if self.multislice else "tpu-vm"
    location = [f"--zone={self.zone}"] + ([f"--project={self.project}"] if self.project else [])
    return ["gcloud", "compute", "tpus", group, verb, *args, *location]

  def every_worker(self) -> list[str]:
    return ["--worker=all"] + (["--node=all"] if self.multislice else [])

  # The commands, one function each.

  def describe(self) -> list[str]:
    fields = "state.state" if self.multislice else "state,acceleratorType"
    return self.gcloud("describe", self.name, f"--format=value({fields})")

  def create(self, accelerator_type: str, runtime_version: str, spot: bool) -> list[str]:
    args = [self.name, f"--accelerator-type={accelerator_type}"]
    if self.multislice:
      args += [f"--runtime-version={runtime_version}", f"--node-count={self.num_slices}",
               f"--node-prefix={self.name}"]
    else:
      args += [f"--version={runtime_version}"]
    return self.gcloud("create", *args, *(["--spot"] if spot else []))

  def delete(self) -> list[str]:
    # --force: a queued resource is deleted with its slices; --quiet: no prompt.
    return self.gcloud("delete", self.name, *(["--force"] if self.multislice else []), "--quiet")

  def copy_to_workers(self, local_path: str, remote_path: str) -> list[str]:
    return self.gcloud("scp", local_path, f"{self.name}:{remote_path}", *self.every_worker())

  def ssh(self, script: str, worker: str = "all", node: str = "all",
          ssh_args: Sequence[str] = ()) -> list[str]:
    where = [f"--worker={worker}"] + ([f"--node={node}"] if self.multislice else [])
    # Arguments for ssh itself go last, after `--`.
    tail = ["--", *ssh_args] if ssh_args else []
    return self.gcloud("ssh", self.name, *where, f"--command={script}") + tail


def shell_script(lines: Sequence[str]) -> str:
  """One line of shell (dry-run output stays one command per line); stops
  at the first failing line."""
  return "; ".join(["set -e", *lines])


_SAVED_PID = f'"$(cat {PID_FILE})"'  # Shell: the pid `run` saved.
_PID = '"$pid"'


def alive(pid: str) -> str:
  """Shell condition: process `pid` runs (a zombie, exited but not yet
  reaped, does not count; kill -0 would count it)."""
  return f'ps -o stat= -p {pid} 2>/dev/null | grep -qv "^ *Z"'


def refuse_if_running() -> str:
  """Shell: fail on a worker where the trainer is still running."""
  return (f'if [ -f {PID_FILE} ] && {alive(_SAVED_PID)}; then '
          f'echo "$(hostname): training is still running (pid $(cat {PID_FILE})); '
          f'stop it first" >&2; exit 1; fi')


def setup_script(install: bool, python_version: str, prepare_data: bool) -> str:
  """Shell run on every worker: unpack the code afresh; install the
  requirements; build the bundled data sets (each worker has its own disk)."""
  lines = [refuse_if_running(),
           f"rm -rf {CODE_DIR}", f"mkdir -p {CODE_DIR} {LOG_DIR}",
           f"tar -xzf {ARCHIVE} -C {CODE_DIR}", f"rm -f {ARCHIVE}"]
  if install:
    # TPU VM images have an older Python than JAX needs: uv fetches one. The
    # venv lives outside CODE_DIR, so it survives the next copy of the code.
    python = f"--python={VENV_DIR}/bin/python"
    lines += [f"if [ ! -x {UV} ]; then python3 -m pip install --user --quiet uv; fi",
              f"{UV} venv --quiet --allow-existing --python={shlex.quote(python_version)} "
              f"{VENV_DIR}",
              f"{UV} pip install --quiet {python} -r {CODE_DIR}/requirements.txt 'jax[tpu]'",
              f"{UV} pip install --quiet {python} --no-deps -r {CODE_DIR}/requirements-nodeps.txt"]
  if prepare_data:
    lines.append(f"(cd {CODE_DIR} && ../{VENV_DIR}/bin/python -m {common.PREPARE_DATA_MODULE})")
  return shell_script(lines)


def start_script(trainer_args: Sequence[str], env: dict[str, str]) -> str:
  """Shell run on every worker: start the trainer detached, logging to LOG_FILE.

  setsid + nohup: the run outlives the ssh session. The log is appended to,
  so it keeps the history of resumed runs.
  """
  train = common.train_argv(f"../{VENV_DIR}/bin/python", trainer_args)
  return shell_script([
      refuse_if_running(), f"mkdir -p {LOG_DIR}", f"cd {CODE_DIR}", *common.export_lines(env),
      # `&` already ends the command: no `;` may follow it.
      f"setsid nohup {shlex.join(train)} >> ../{LOG_FILE} 2>&1 < /dev/null & "
      f"echo $! > ../{PID_FILE}",
      f'echo "$(hostname): started the trainer, pid $!, log ~/{LOG_FILE}"'])


def stop_script(wait_s: int = 600) -> str:
  """Shell: SIGTERM the trainer (it saves a checkpoint, then exits) and wait."""
  return shell_script([
      f'if [ ! -f {PID_FILE} ] || ! {alive(_SAVED_PID)}; then '
      f'echo "$(hostname): no training running"; exit 0; fi',
      f'pid="$(cat {PID_FILE})"', 'kill -TERM "$pid"',
      f'for i in $(seq {wait_s}); do {alive(_PID)} || break; sleep 1; done',
      f'if {alive(_PID)}; then echo "$(hostname): pid $pid still running" >&2; exit 1; fi',
      'echo "$(hostname): stopped"'])


def logs_script(lines: int, follow: bool) -> str:
  """Shell: the end of the worker's log, each line prefixed with its host."""
  tail = f"tail -n {lines}{' -F' if follow else ''} {LOG_FILE}"
  return shell_script([f'{tail} | sed -u "s/^/[$(hostname)] /"'])


def tensorboard_script(logdir: str, port: int) -> str:
  return shell_script([f"{VENV_DIR}/bin/tensorboard --logdir={shlex.quote(logdir)} "
                       f"--port={port}"])


def archive_path(pod: Pod) -> str:
  return os.path.join(tempfile.gettempdir(), f"mm1_jax-{pod.name}.tar.gz")


def pack_code(runner: common.Runner, code_ref: str | None, path: str) -> None:
  """The code to copy, as a .tar.gz at path: a git ref, or the working tree
  (tracked and untracked files that git does not ignore: no .venv, no workdirs)."""
  if code_ref:
    runner.run(["git", "-C", common.REPO, "archive", "--format=tar.gz", f"--output={path}",
                code_ref])
    return
  list_files = ["git", "-C", common.REPO, "ls-files", "-z", "--cached", "--others",
                "--exclude-standard"]
  runner.note(f"pack the working tree ({shlex.join(list_files)}) into {path}")
  if runner.dry_run:
    return
  names = subprocess.run(list_files, check=True, capture_output=True).stdout.decode().split("\0")
  with tarfile.open(path, "w:gz") as archive:
    for name in sorted(filter(None, names)):
      if os.path.exists(os.path.join(common.REPO, name)):  # Deleted but tracked: skip.
        archive.add(os.path.join(common.REPO, name), arcname=name)


def ensure_slice(runner: common.Runner, pod: Pod, accelerator_type: str | None,
                 runtime_version: str | None, spot: bool, poll_s: int) -> None:
  """Creates the slice(s) unless they exist and are usable; waits until ready."""
  code, answer = runner.query(pod.describe())
  exists = code == 0 and bool(answer)
  state, _, existing_type = answer.partition("\t")
  if exists and state in _GONE_STATES:
    runner.note(f"{pod.name} is {state}: deleting it to create it again")
    runner.run(pod.delete())
    exists = False
  if exists:
    if accelerator_type and existing_type and existing_type != accelerator_type:
      raise app.UsageError(f"{pod.name} exists as {existing_type}, not {accelerator_type}; "
                           "`delete` it first or use another --tpu name.")
    usable = {"ACTIVE", *_WAITING_STATES} if pod.multislice else {"READY"}
    if state not in usable:
      raise app.UsageError(f"{pod.name} is {state}; wait for it, or `delete` it.")
  else:
    if not accelerator_type:
      raise app.UsageError(f"{pod.name} does not exist: pass --accelerator_type to create it.")
    # tpu-vm create returns once the slice is READY; a queued resource waits in line.
    runner.run(pod.create(accelerator_type,
                          runtime_version or default_runtime_version(accelerator_type), spot))
  if pod.multislice:
    wait_until_active(runner, pod, poll_s)


def wait_until_active(runner: common.Runner, pod: Pod, poll_s: int) -> None:
  """A queued resource waits in line for capacity: poll until ACTIVE."""
  while True:
    _, state = runner.query(pod.describe(), dry_run_answer="ACTIVE")
    if state == "ACTIVE":
      return
    if state in _GONE_STATES:
      raise SystemExit(f"{pod.name} became {state} while waiting; `delete` it and `run` again.")
    runner.note(f"{pod.name} is {state or 'not found'}; checking again in {poll_s} s")
    time.sleep(poll_s)


def run(runner: common.Runner, pod: Pod, trainer_args: Sequence[str]) -> None:
  """Create or reuse the slice(s), copy the code, install, start training."""
  common.check_trainer_args(trainer_args, shared_workdir=True)
  env = common.env_assignments(common.ENV.value)
  ensure_slice(runner, pod, _ACCELERATOR_TYPE.value, _RUNTIME_VERSION.value, _SPOT.value,
               _POLL_S.value)
  local_archive = archive_path(pod)
  pack_code(runner, _CODE_REF.value, local_archive)
  runner.run(pod.copy_to_workers(local_archive, ARCHIVE))
  runner.run(pod.ssh(setup_script(_INSTALL.value, _PYTHON_VERSION.value,
                                  common.PREPARE_DATA.value)))
  runner.run(pod.ssh(start_script(trainer_args, env)))
  slices = f" --num_slices={pod.num_slices}" if pod.multislice else ""
  runner.note(f"started; follow process 0 with: python -m launch.tpu_pod logs "
              f"--tpu={pod.name} --zone={pod.zone}{slices}")


def main(argv):
  subcommand, trainer_args = common.split_argv(argv, SUBCOMMANDS)
  if subcommand != "run" and trainer_args:
    raise app.UsageError(f"`{subcommand}` takes no trainer arguments, got {trainer_args}.")
  pod = Pod(_TPU.value, _ZONE.value, _PROJECT.value, _NUM_SLICES.value)
  runner = common.Runner(common.DRY_RUN.value)
  if subcommand == "run":
    run(runner, pod, trainer_args)
  elif subcommand == "logs":
    runner.run(pod.ssh(logs_script(_LINES.value, _FOLLOW.value), _WORKER.value, _NODE.value),
               check=False)
  elif subcommand == "status":
    runner.run(pod.gcloud("describe", pod.name))
  elif subcommand == "stop":
    runner.run(pod.ssh(stop_script()))
  elif subcommand == "delete":
    runner.run(pod.delete())
  elif subcommand == "tensorboard":
    if not _TENSORBOARD_LOGDIR.value:
      raise app.UsageError("tensorboard needs --tensorboard_logdir (as the workers see it).")
    port = _TENSORBOARD_PORT.value
    runner.note(f"open http://localhost:{port} (forwarded from worker 0)")
    runner.run(pod.ssh(tensorboard_script(_TENSORBOARD_LOGDIR.value, port), "0", "0",
                       ssh_args=["-L", f"{port}:localhost:{port}"]), check=False)


if __name__ == "__main__":
  flags.mark_flags_as_required(["tpu", "zone"])
  cli.run(main)
