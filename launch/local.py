"""A multi-host job in miniature: N trainer processes on this machine.

    python -m launch.local --processes=2 --devices_per_process=2 \\
        -- --config=configs/tiny.py --workdir=workdirs/two_hosts [--config.x=y ...]

Each process gets its own virtual CPU devices and talks to the others
through gloo collectives, via jax.distributed with this machine as the
coordinator: the same trainer, flags, data sharding, checkpoints and resume
as on a TPU pod or a GPU cluster. Each process logs to
<process_log_dir>/process_<i>.log. The launcher waits; if one process fails it kills
the others (which would block in collectives otherwise) and exits non-zero.
SIGTERM or Ctrl-C is passed on to the processes, which save a checkpoint and
exit, as on preemption.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from typing import Sequence

from absl import app, flags

from launch import common
from mm1_jax import cli

_PROCESSES = flags.DEFINE_integer("processes", 2, "Processes (the hosts of the job).",
                                   lower_bound=1)
_DEVICES_PER_PROCESS = flags.DEFINE_integer("devices_per_process", 2,
                                            "Virtual CPU devices per process.", lower_bound=1)
_COORDINATOR_PORT = flags.DEFINE_integer("coordinator_port", 0, "0 picks a free port.",
                                         lower_bound=0, upper_bound=65535)

_POLL_S = 0.2


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def process_env(base: dict[str, str], devices_per_process: int) -> dict[str, str]:
  """The environment of one trainer process: CPU devices only, so many."""
  env = dict(base)
  # Our device count replaces any in XLA_FLAGS; other XLA flags stay.
  xla_flags = [f for f in env.get("XLA_FLAGS", "").split()
               if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(
      [*xla_flags, f"--xla_force_host_platform_device_count={devices_per_process}"])
  env["JAX_PLATFORMS"] = "cpu"
  # No persistent compilation cache: processes of one job can compute
  # different cache keys, and one process loading from the cache while its
  # peer compiles exceeds gloo's 30 s initialisation timeout.
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  return env


def process_argv(python: str, trainer_args: Sequence[str], port: int, num_processes: int,
                 process_id: int) -> list[str]:
  return common.train_argv(python, [f"--coordinator_address=127.0.0.1:{port}",
                                    f"--num_processes={num_processes}",
                                    f"--process_id={process_id}", *trainer_args])


def shown_command(argv: Sequence[str], env: dict[str, str]) -> list[str]:
  """argv as a runnable `env` command with what process_env changes."""
  changed = [f"{k}={env[k]}" for k in ("XLA_FLAGS", "JAX_PLATFORMS")]
  return ["env", "-u", "JAX_COMPILATION_CACHE_DIR", *changed, *argv]


def tail(path: str, chars: int = 2000) -> str:
  with open(path, "rb") as f:
    f.seek(max(0, os.path.getsize(path) - chars))
    return f.read().decode(errors="replace")


def describe_exit(code: int) -> str:
  """'exit 3', or 'killed by SIGKILL' for a process a signal ended (code -9)."""
  if code < 0:
    try:
      return f"killed by {signal.Signals(-code).name}"
    except ValueError:
      return f"killed by signal {-code}"
  return f"exit {code}"


def wait_all(processes: list[subprocess.Popen], logs: list[str]) -> int:
  """Waits for every process; on the first failure kills the others.
  Returns 0, or the exit code of the first process that failed."""
  while True:
    codes = [p.poll() for p in processes]
    failed = [i for i, code in enumerate(codes) if code not in (None, 0)]
    if failed:
      first = failed[0]
      for process in processes:
        if process.poll() is None:
          process.kill()  # Its peers would wait for it in collectives forever.
      for process in processes:
        process.wait()
      print(f"process {first} failed ({describe_exit(codes[first])}); stopped the others. The end of "
            f"{logs[first]}:\n{tail(logs[first])}", file=sys.stderr, flush=True)
      return codes[first] if codes[first] > 0 else 1
    if all(code == 0 for code in codes):
      return 0
    time.sleep(_POLL_S)


def forward_signals(processes: list[subprocess.Popen]) -> None:
  """SIGTERM / SIGINT here -> SIGTERM to every process (each then saves a checkpoint)."""
  def handler(signum, frame):
    del frame
    print(f"signal {signum}: asking the processes to save and stop", file=sys.stderr, flush=True)
    for process in processes:
      if process.poll() is None:
        process.send_signal(signal.SIGTERM)
  signal.signal(signal.SIGTERM, handler)
  signal.signal(signal.SIGINT, handler)


def main(argv):
  trainer_args = list(argv[1:])
  workdir = common.check_trainer_args(trainer_args, shared_workdir=False)
  log_dir = common.LOG_DIR.value or (None if "://" in workdir else os.path.join(workdir, "logs"))
  if log_dir is None:  # The logs are written here, by this launcher, not through gfile.
    raise app.UsageError("a gs:// workdir needs --process_log_dir, a local directory for the "
                         "process logs.")
  runner = common.Runner(common.DRY_RUN.value)
  if common.PREPARE_DATA.value:
    runner.run([common.PYTHON.value, "-m", common.PREPARE_DATA_MODULE])
  port = _COORDINATOR_PORT.value or free_port()
  env = process_env(dict(os.environ), _DEVICES_PER_PROCESS.value)
  commands = [process_argv(common.PYTHON.value, trainer_args, port, _PROCESSES.value, i)
              for i in range(_PROCESSES.value)]
  logs = [os.path.join(log_dir, f"process_{i}.log") for i in range(_PROCESSES.value)]
  if common.DRY_RUN.value:
    for command, log in zip(commands, logs):
      runner.show(shown_command(command, env))
      runner.note(f"its output: {log}")
    return
  os.makedirs(log_dir, exist_ok=True)
  processes = []
  for i, (command, log) in enumerate(zip(commands, logs)):
    # Appended: a resumed run keeps its history. Own process group: Ctrl-C
    # reaches only the launcher, which turns it into SIGTERM (a checkpoint)
    # rather than a KeyboardInterrupt in each process.
    with open(log, "ab") as log_file:
      processes.append(subprocess.Popen(command, env=env, stdout=log_file,
                                        stderr=subprocess.STDOUT, process_group=0))
    print(f"process {i}: pid {processes[-1].pid}, log {log}", flush=True)
  forward_signals(processes)
  code = wait_all(processes, logs)
  if code == 0:
    print(f"all {len(processes)} processes finished; logs in {log_dir}", flush=True)
  sys.exit(code)


if __name__ == "__main__":
  cli.run(main)
