"""Multi-host training: 2 local processes x 2 CPU devices (jax.distributed, gloo).

The 2-process job trains and checkpoints (every process writes its own data
position); its checkpoint restores into a 1-process 4-device run, which,
fed the global batch the 2 processes would have read next, gives the loss
the 2-process job itself computed at that step.
"""

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import numpy as np

from mm1_jax.training import checkpoint as checkpoint_lib
from mm1_jax.training import trainer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RESUME_SCRIPT = os.path.join(REPO, "tests", "training", "multihost_resume.py")
NUM_PROCESSES = 2
DEVICES_PER_PROCESS = 2
TIMEOUT_S = 600  # Per launch; the machine may be shared, so generous.


def config_flags(num_steps):
  # Global batch 4 = 2 rows per process; mesh data=-1 spans all 4 devices.
  # A fixed decay_steps keeps the schedule (compiled into the step) the same
  # for num_steps 4 and 5, so the continuing job reuses the first job's
  # compiled step from the cache; peak_tflops skips the startup matmul benchmark.
  return ["--config=configs/tiny.py", f"--config.train.num_steps={num_steps}",
          "--config.train.checkpoint_every=2", "--config.train.log_every=1",
          "--config.train.peak_tflops=1.0", "--config.optimizer.warmup_steps=1",
          "--config.optimizer.decay_steps=5", "--config.data.seq_len=64",
          "--config.data.batch_size=4"]


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def cpu_env(num_devices, compilation_cache):
  env = dict(os.environ)
  env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={num_devices}",
             JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
             # The continuing job reuses the first one's compiled train step.
             JAX_COMPILATION_CACHE_DIR=os.fspath(compilation_cache))
  return env


def losses(workdir):
  with open(os.path.join(workdir, trainer.LOSS_LOG)) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f)}


@contextlib.contextmanager
def launched(stack_dir):
  """Starts processes; on leaving, kills (by pid) any still running."""
  processes = []

  def start(name, command, env):
    log = open(os.path.join(stack_dir, f"{name}.log"), "wb")
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log,
                               stderr=subprocess.STDOUT)
    log.close()  # The child holds its own descriptor.
    process.name, process.log = name, os.path.join(stack_dir, f"{name}.log")
    processes.append(process)
    return process

  try:
    yield start
  finally:
    for process in processes:
      if process.poll() is None:
        process.kill()
      process.wait()


def tail(process, chars=3000):
  with open(process.log, "rb") as f:
    return f"--- {process.name} (rc {process.returncode}) ---\n" + \
        f.read().decode(errors="replace")[-chars:]


def wait_all(processes, timeout=TIMEOUT_S):
  """Waits for all; returns early (the caller's `launched` kills the rest)
  as soon as one fails, since its peers would then block in collectives."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    codes = [p.poll() for p in processes]
    if any(code not in (None, 0) for code in codes) or all(code == 0 for code in codes):
      break
    time.sleep(0.2)
  for process in processes:
    assert process.poll() == 0, (
        f"{process.name} did not exit 0 (timeout {timeout}s)\n" +
        "\n".join(tail(p) for p in processes))


def start_job(start, name, workdir, num_steps, compilation_cache):
  port = free_port()
  return [start(f"{name}_process_{i}",
                [sys.executable, "-m", "mm1_jax.train", f"--workdir={workdir}",
                 f"--coordinator_address=127.0.0.1:{port}",
                 f"--num_processes={NUM_PROCESSES}", f"--process_id={i}",
                 *config_flags(num_steps)],
                cpu_env(DEVICES_PER_PROCESS, compilation_cache))
          for i in range(NUM_PROCESSES)]


def test_two_processes_train_checkpoint_and_restore_on_one(tmp_path):
  workdir, continued = tmp_path / "run", tmp_path / "continued"
  logs, cache = tmp_path / "logs", tmp_path / "jax_cache"
  logs.mkdir()
  with launched(str(logs)) as start:
    # 1. Two processes x two devices train 4 steps, checkpointing steps 2 and 4.
    job = start_job(start, "train4", workdir, num_steps=4, compilation_cache=cache)
    wait_all(job)
    first = losses(workdir)
    assert sorted(first) == [1, 2, 3, 4]
    assert all(np.isfinite(list(first.values())))
    checkpointer = checkpoint_lib.Checkpointer(str(workdir), save_every=2, keep=3)
    assert checkpointer.all_steps() == [2, 4]
    checkpointer.close()
    for step in (2, 4):
      assert sorted(os.listdir(workdir / "data_state" / str(step))) == [
          f"process_{i}" for i in range(NUM_PROCESSES)]
      for i in range(NUM_PROCESSES):
        assert (workdir / "data_state" / str(step) / f"process_{i}" / "counters.json").exists()

    # 2. The same two processes continue a copy to step 5 (the reference loss),
    # while 3. one process with four devices restores the original's step 4
    # and computes step 5 on the batch the two processes read.
    shutil.copytree(workdir, continued)
    job = start_job(start, "train5", continued, num_steps=5, compilation_cache=cache)
    result_path = tmp_path / "resume.json"
    single = start("resume_1x4", [sys.executable, RESUME_SCRIPT, f"--workdir={workdir}",
                                  f"--num_data_processes={NUM_PROCESSES}",
                                  f"--output={result_path}", *config_flags(num_steps=5)],
                   cpu_env(NUM_PROCESSES * DEVICES_PER_PROCESS, cache))
    wait_all(job + [single])

  second = losses(continued)
  assert sorted(second) == [1, 2, 3, 4, 5]
  assert [second[s] for s in range(1, 5)] == [first[s] for s in range(1, 5)]
  with open(result_path) as f:
    result = json.load(f)
  assert result["restored_step"] == 4
  assert result["device_count"] == 4 and result["mesh"]["data"] == 4
  assert result["shards_differ"]
  np.testing.assert_allclose(result["loss"], second[5], rtol=1e-5)
  assert result["loss"] != second[4]  # Really the next step, not a repeat.
