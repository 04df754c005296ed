"""launch/local.py: N processes on this machine as a multi-host job.

With a stand-in Python: every process gets the trainer's arguments intact
and its own process id; one failing process stops the others. For real: 2
processes x 2 CPU devices train the tiny config over a mesh spanning the two
"slices" (dcn_data=2) and checkpoint (every process its own data position);
a second launch resumes, and the same checkpoint restored into one process
with 4 devices gives the loss of the resumed job's next step.
"""

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

import numpy as np

from launch import common
from mm1_jax.training import checkpoint as checkpoint_lib
from mm1_jax.training import trainer
from process_env import FAST_COMPILE_FLAGS, one_device_env

REPO = common.REPO
RECORD_ARGV = os.path.join(REPO, "tests", "launch", "record_argv.py")
RESUME_ON_ONE_PROCESS = os.path.join(REPO, "tests", "launch", "resume_on_one_process.py")
TRICKY_OVERRIDE = "--config.data.mixture=a b;$(x)"
TIMEOUT_S = 600  # Generous: the machine may be shared.


def launch(*args, env=None, timeout=TIMEOUT_S):
  return subprocess.run([sys.executable, "-m", "launch.local", *args], cwd=REPO,
                        env=env or dict(os.environ), capture_output=True, text=True,
                        timeout=timeout)


def test_dry_run_commands():
  env_without_xla_flags = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  result = launch("--dry_run", "--processes=2", "--devices_per_process=4",
                  "--coordinator_port=4321", "--python=python3", "--",
                  "--config=configs/tiny.py", "--workdir=/tmp/w", TRICKY_OVERRIDE,
                  env=env_without_xla_flags)
  assert result.returncode == 0, result.stderr
  commands = [shlex.split(line) for line in result.stdout.splitlines()
              if not line.startswith("#")]

  def process(i):
    return ["env", "-u", "JAX_COMPILATION_CACHE_DIR",
            "XLA_FLAGS=--xla_force_host_platform_device_count=4", "JAX_PLATFORMS=cpu",
            "python3", "-m", "mm1_jax.train", "--coordinator_address=127.0.0.1:4321",
            "--num_processes=2", f"--process_id={i}", "--config=configs/tiny.py",
            "--workdir=/tmp/w", TRICKY_OVERRIDE]
  assert commands == [["python3", "-m", "mm1_jax.data.sources"], process(0), process(1)]


def test_every_process_gets_its_id_and_the_arguments_intact(tmp_path):
  record = tmp_path / "argv"
  env = dict(os.environ, RECORD_ARGV_FILE=str(record), JAX_COMPILATION_CACHE_DIR="/cache",
             XLA_FLAGS="--xla_cpu_use_thunk_runtime=true --xla_force_host_platform_device_count=8")
  args = ["--config=configs/tiny.py", f"--workdir={tmp_path / 'run'}", TRICKY_OVERRIDE]
  result = launch("--processes=3", "--devices_per_process=2", f"--python={RECORD_ARGV}",
                  "--noprepare_data", "--", *args, env=env)
  assert result.returncode == 0, result.stderr
  calls = [json.loads((tmp_path / f"argv.{i}").read_text()) for i in range(3)]
  coordinators = {c["argv"][2] for c in calls}
  assert len(coordinators) == 1
  assert coordinators.pop().startswith("--coordinator_address=127.0.0.1:")
  for i, call in enumerate(calls):
    assert call["argv"][:2] == ["-m", "mm1_jax.train"]
    assert call["argv"][3:] == ["--num_processes=3", f"--process_id={i}", *args]
    assert call["env"]["XLA_FLAGS"] == ("--xla_cpu_use_thunk_runtime=true "
                                        "--xla_force_host_platform_device_count=2")
    assert call["env"]["JAX_PLATFORMS"] == "cpu"
    assert call["env"]["JAX_COMPILATION_CACHE_DIR"] is None
    assert (tmp_path / "run" / "logs" / f"process_{i}.log").exists()


def test_one_failing_process_stops_the_others(tmp_path):
  env = dict(os.environ, RECORD_ARGV_FILE=str(tmp_path / "argv"))
  start = time.time()
  # Process 1 exits 3 at once; processes 0 and 2 would sleep for 120 s.
  result = launch("--processes=3", f"--python={RECORD_ARGV}", "--noprepare_data", "--",
                  "--config=configs/tiny.py", f"--workdir={tmp_path / 'run'}",
                  "--fail_process=1", env=env, timeout=100)
  assert result.returncode == 3
  assert time.time() - start < 60
  assert "process 1 failed (exit 3)" in result.stderr


def test_sigterm_is_passed_on_to_every_process(tmp_path):
  record = tmp_path / "argv"
  env = dict(os.environ, RECORD_ARGV_FILE=str(record), RECORD_ARGV_SLEEP_S="120")
  launcher = subprocess.Popen(
      [sys.executable, "-m", "launch.local", "--processes=2", f"--python={RECORD_ARGV}",
       "--noprepare_data", "--", "--config=configs/tiny.py", f"--workdir={tmp_path / 'run'}"],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 60
  while not all((tmp_path / f"argv.{i}").exists() for i in range(2)):
    assert time.time() < deadline and launcher.poll() is None
    time.sleep(0.1)
  launcher.send_signal(signal.SIGTERM)
  assert launcher.wait(timeout=60) == 0  # Every process saved (here: noted) and exited 0.
  for i in range(2):
    assert json.loads((tmp_path / f"argv.{i}").read_text().splitlines()[-1]) == {"sigterm": True}


def losses(workdir):
  with open(os.path.join(workdir, trainer.LOSS_LOG)) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f)}


def config_flags(num_steps):
  # Global batch 4 over 2 processes x 2 devices; the mesh's data axis spans
  # the two processes as two slices. peak_tflops skips the matmul benchmark.
  # The dense variant compiles faster than the MoE default.
  return ["--config=configs/tiny.py:dense", f"--config.train.num_steps={num_steps}",
          "--config.train.checkpoint_every=2", "--config.train.log_every=1",
          "--config.train.peak_tflops=1.0", "--config.optimizer.warmup_steps=1",
          "--config.data.seq_len=64", "--config.data.batch_size=4", "--config.mesh.dcn_data=2"]


def tiny_job(workdir, num_steps, *launcher_flags):
  return ["--processes=2", "--devices_per_process=2", *launcher_flags, "--",
          f"--workdir={workdir}", *config_flags(num_steps)]


def test_two_processes_train_checkpoint_and_resume(tmp_path):
  workdir, at_step_3 = tmp_path / "run", tmp_path / "run_at_step_3"
  env = one_device_env()  # The launcher gives each process its 2 devices.
  first = launch(*tiny_job(workdir, 3), env=env)
  assert first.returncode == 0, first.stdout + first.stderr
  log_0 = (workdir / "logs" / "process_0.log").read_text()
  assert "2 process(es), 4 devices, mesh {'data': 4" in log_0
  assert sorted(losses(workdir)) == [1, 2, 3]
  checkpointer = checkpoint_lib.Checkpointer(str(workdir), save_every=2, keep=3)
  assert checkpointer.all_steps() == [2, 3]
  for step in (2, 3):  # Every process wrote its own data position, inside the step.
    for i in range(2):
      assert (checkpointer.data_position_path(step, process_index=i, process_count=2) /
              "counters.json").exists()
  checkpointer.close()

  # While the job resumes, one process with 4 devices restores the same
  # step-3 checkpoint and computes step 4 from it (tests/launch/resume_on_one_process.py).
  shutil.copytree(workdir, at_step_3)
  result_path = tmp_path / "resume_1x4.json"
  single_env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=(
      f"--xla_force_host_platform_device_count=4 {FAST_COMPILE_FLAGS}"))
  single_env.pop("JAX_COMPILATION_CACHE_DIR", None)
  single = subprocess.Popen(
      [sys.executable, RESUME_ON_ONE_PROCESS, f"--workdir={at_step_3}",
       "--num_data_processes=2", f"--output={result_path}", *config_flags(num_steps=5)],
      cwd=REPO, env=single_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  try:
    second = launch(*tiny_job(workdir, 5, "--noprepare_data"), env=env)  # Prepared above.
    single_output = single.communicate(timeout=TIMEOUT_S)[0].decode(errors="replace")
  finally:
    single.kill()
  assert second.returncode == 0, second.stdout + second.stderr
  log_0 = (workdir / "logs" / "process_0.log").read_text()
  assert "Restored step 3" in log_0
  run = losses(workdir)
  assert sorted(run) == [1, 2, 3, 4, 5]
  assert all(v == v and v < 20 for v in run.values())  # Finite and sane.

  assert single.returncode == 0, single_output[-3000:]
  result = json.loads(result_path.read_text())
  assert result["restored_step"] == 3
  assert result["device_count"] == 4 and result["mesh"]["data"] == 4
  assert result["shards_differ"]  # Each process had read its own shard of the data.
  np.testing.assert_allclose(result["loss"], run[4], rtol=1e-5)
  assert result["loss"] != run[3]  # Really the next step, not a repeat.


def test_a_process_ended_by_a_signal_is_named_so():
  from launch import local
  assert local.describe_exit(-9) == "killed by SIGKILL"
  assert local.describe_exit(-15) == "killed by SIGTERM"
  assert local.describe_exit(3) == "exit 3"
