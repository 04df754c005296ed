"""The training CLI (`python -m mm1_jax.train`) as a real process: kill -9 and
resume, SIGTERM (preemption)."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from mm1_jax.training import checkpoint as checkpoint_lib
from mm1_jax.training import trainer
from process_env import one_device_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def losses(workdir):
  """step -> loss; a resumed run's lines for a step replace the killed run's."""
  with open(os.path.join(workdir, trainer.LOSS_LOG)) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f)}


def wait_for_step(workdir, step, timeout=300):
  """Polls the loss log until `step` is logged (or the timeout passes)."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    if (workdir / trainer.LOSS_LOG).exists() and max(losses(workdir), default=0) >= step:
      return
    time.sleep(0.02)


def train_command(workdir, num_steps, config="configs/tiny.py"):
  return [sys.executable, "-m", "mm1_jax.train", f"--config={config}",
          f"--workdir={workdir}", f"--config.train.num_steps={num_steps}",
          "--config.train.log_every=1", "--config.train.checkpoint_every=3",
          "--config.optimizer.warmup_steps=2", "--config.data.seq_len=64",
          "--config.data.batch_size=2", "--config.train.peak_tflops=1.0"]


QLORA = dict(rank=4, alpha=8.0, quantize="nf4", dropout=0.1)
# The dense tiny model: QLoRA's MoE experts are covered in-process
# (tests/training/test_lora_training.py); here the process is what matters.
QLORA_CONFIG = "configs/tiny.py:dense"


def qlora_flags(base_dir):
  """QLoRA on the tiny LLM (rank 4, NF4 base, LoRA dropout) from `base_dir`."""
  return [f"--config.model.lora.{key}={value}" for key, value in QLORA.items()] + [
      f"--config.init_from={base_dir}"]


def qlora_experiment(num_steps, base_dir):
  """The Experiment train_command + qlora_flags describe (for in-process checks)."""
  from configs import tiny
  from mm1_jax.experiment import Experiment
  config = tiny.get_config("dense")
  config.model.lora.update(QLORA)
  config.train.update(num_steps=num_steps, log_every=1, checkpoint_every=3, peak_tflops=1.0)
  config.optimizer.update(warmup_steps=2)
  # The batch does not shape a checkpoint; 8 rows split over the 8 virtual
  # devices this process has (conftest.py), where the CLI run has one.
  config.data.update(seq_len=64, batch_size=8)
  config.init_from = str(base_dir)
  return Experiment.from_config(config)


def write_float_llm(directory, seed):
  """A float checkpoint of the tiny LLM: {'llm': params}, returned too."""
  from configs import tiny
  from mm1_jax import config_lib, testing
  from mm1_jax.models import lora as lora_lib
  model = config_lib.mm1_config(tiny.get_config("dense"))
  base = lora_lib.without_lora(testing.random_params(model, seed=seed))
  checkpoint_lib.save_params(str(directory), {"llm": base["llm"]})
  return base["llm"]


def check_qlora_run(workdir, base_dir, base, tmp_path):
  """A QLoRA run's checkpoints hold only what trains and the base's
  description; restoring (evaluate / generate / chat, and resume) rebuilds
  the NF4 base from init_from (the merge of it: tests/models/test_qlora.py), and another
  base is refused naming both fingerprints."""
  import jax
  from mm1_jax.models import lora as lora_lib
  from mm1_jax.models import qlora

  last = max(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  step_dir = workdir / "checkpoints" / str(last)
  saved = checkpoint_lib.read_base(str(step_dir))
  assert saved["init_from"] == [str(base_dir)] and len(saved["fingerprint"]) == 16
  stored = checkpoint_lib._read_tree_metadata(step_dir / checkpoint_lib.STATE_ITEM)["params"]
  stored_leaves = [checkpoint_lib.path_string(p) for p, _ in
                   jax.tree_util.tree_flatten_with_path(stored)[0]]
  llm_leaves = [path for path in stored_leaves if path.startswith("llm/")]
  # The LLM's base is not saved: only its adapters (the towers without
  # adapters train whole in this config, and are saved whole).
  assert llm_leaves and all(lora_lib.is_adapter(path.split("/")) for path in llm_leaves)

  experiment = qlora_experiment(20, base_dir)
  params, _, _, step = trainer.restore_params(experiment, str(workdir))
  assert step == last
  query = jax.device_get(params["llm"]["blocks"]["layer_0"]["attn"]["query"])
  expected = qlora.quantize_kernel(base["blocks"]["layer_0"]["attn"]["query"]["kernel"],
                                   query["kernel_nf4_codes"].shape, experiment.model.lora)
  for field, value in expected.items():
    np.testing.assert_array_equal(query[qlora.nf4_leaf("kernel", field)], value)
  assert any(np.any(np.asarray(x)) for x in jax.tree.leaves(lora_lib.lora_params(params)))

  other_dir = tmp_path / "other_llm"
  write_float_llm(other_dir, seed=4)
  with pytest.raises(checkpoint_lib.BaseMismatchError,
                     match=rf"fingerprint {saved['fingerprint']} .*{other_dir}.* gives the "
                           r"base [0-9a-f]{16}: pass the unchanged init_from"):
    trainer.restore_params(qlora_experiment(20, other_dir), str(workdir))


def kill_after_step(workdir, step, command):
  """Starts `command`, SIGKILLs it once `step` is logged; its losses then."""
  process = subprocess.Popen(command, cwd=REPO, env=one_device_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  wait_for_step(workdir, step)
  process.send_signal(signal.SIGKILL)
  process.wait()
  return losses(workdir)


def test_kill_minus_nine_and_resume_gives_identical_losses(tmp_path):
  """The acceptance of issue 4: 20 steps straight == 10 steps, kill -9 of the
  real process, resume to 20 (checkpoints every 3 steps: resumes from 9)."""
  straight, killed = tmp_path / "straight", tmp_path / "killed"
  steps = 20
  straight_run = subprocess.Popen(train_command(straight, steps), cwd=REPO,
                                  env=one_device_env(), stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE)
  # Kill once step 10 is done: past the step-9 checkpoint.
  assert max(kill_after_step(killed, 10, train_command(killed, steps))) < steps
  subprocess.run(train_command(killed, steps), cwd=REPO,
                 env=one_device_env(), check=True, capture_output=True)

  errors = straight_run.communicate()[1].decode()
  assert straight_run.returncode == 0, errors[-2000:]
  # Quiet on a CPU machine: no TensorFlow start-up INFO, CUDA probe ERROR,
  # SentencePiece INFO or tf.data cache warning at the end.
  noise = re.compile(r"I0000 |cuInit|normalizer\.cc|precompiled_charsmap|cache_dataset_ops")
  assert not [line for line in errors.splitlines() if noise.search(line)], errors[-2000:]
  expected, got = losses(straight), losses(killed)
  assert sorted(got) == list(range(1, steps + 1))
  np.testing.assert_array_equal([got[s] for s in sorted(got)], [expected[s] for s in sorted(got)])
  with open(killed / trainer.LOSS_LOG) as f:
    logged = [json.loads(line)["step"] for line in f]
  # The resumed run replaced the lines of the steps after its checkpoint.
  assert logged == list(range(1, steps + 1))


def test_qlora_kill_minus_nine_and_resume_recomputes_the_same_steps(tmp_path):
  """QLoRA (issue 17): killed after step 10 and resumed from its last
  checkpoint (adapters and connector; the NF4 base rebuilt from init_from;
  LoRA dropout's masks from the restored RNG), the resumed run's steps from
  that checkpoint to the kill equal the killed run's, to the bit. (The test
  above compares every step with a straight run, on the full model.)"""
  killed, base_dir = tmp_path / "killed", tmp_path / "base_llm"
  base = write_float_llm(base_dir, seed=3)
  command = train_command(killed, 14, QLORA_CONFIG) + qlora_flags(base_dir)
  before = kill_after_step(killed, 10, command)
  assert 10 <= max(before) < 14
  checkpointer = checkpoint_lib.Checkpointer(str(killed), save_every=3, keep=3)
  restored_step = checkpointer.latest_step()  # 9, or 12 for a late kill.
  checkpointer.close()
  subprocess.run(command, cwd=REPO, env=one_device_env(), check=True, capture_output=True)
  after = losses(killed)
  assert sorted(after) == list(range(1, 15))
  recomputed = [step for step in before if step > restored_step]
  assert recomputed, (before, restored_step)
  np.testing.assert_array_equal([after[s] for s in recomputed], [before[s] for s in recomputed])
  check_qlora_run(killed, base_dir, base, tmp_path)


def test_sigterm_saves_and_exits(tmp_path):
  command = train_command(tmp_path, 1000)
  process = subprocess.Popen(command, cwd=REPO, env=one_device_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
  try:
    wait_for_step(tmp_path, 2)
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=120)[0].decode()
  finally:
    process.kill()
  assert process.returncode == 0
  saved = int(output.split("SIGTERM received: saved step ")[1].split(",")[0])
  assert saved >= 2
  assert checkpoint_lib.Checkpointer(str(tmp_path), save_every=3, keep=3).latest_step() == saved


STUCK_PIPELINE = """
import sys, time
from mm1_jax.data import pipeline
from mm1_jax.training import prefetch
from mm1_jax import train

prefetch.STOP_GRACE_SECONDS = 3.0
original = pipeline.MultimodalInput.__next__

def next_then_stuck(self):
  self.calls = getattr(self, "calls", 0) + 1
  if self.calls > 4:  # The stream hangs before batch 5 (a dead file system, say).
    time.sleep(10**6)
  return original(self)

pipeline.MultimodalInput.__next__ = next_then_stuck
sys.argv = ["train"] + sys.argv[1:]
train.cli.run(train.main, required=["config", "workdir"])
"""


def test_sigterm_while_the_input_pipeline_is_stuck_exits_in_bounded_time(tmp_path):
  """Steps 1-4 train, the stream hangs reading batch 5: SIGTERM still ends the
  job within the grace period, without saving a mid-read data position."""
  workdir = tmp_path / "run"
  command = [sys.executable, "-c", STUCK_PIPELINE] + train_command(workdir, 1000)[3:]
  process = subprocess.Popen(command, cwd=REPO, env=one_device_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  try:
    wait_for_step(workdir, 4)
    time.sleep(1.0)  # The producer is now inside the hanging read.
    signalled = time.time()
    process.send_signal(signal.SIGTERM)
    output, errors = (text.decode() for text in process.communicate(timeout=60))
  finally:
    process.kill()
  assert time.time() - signalled < 30, "did not exit within the bound"
  assert process.returncode == 0, errors[-2000:]
  assert "SIGTERM received while the input pipeline was stuck in a read" in output
  assert "step 4 was not saved; the last checkpoint is step 3" in output
  assert checkpoint_lib.Checkpointer(str(workdir), save_every=3, keep=3).latest_step() == 3
