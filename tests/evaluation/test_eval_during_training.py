"""Few-shot evaluation during training: config.eval.every_steps."""

import glob
import json
import os
import subprocess
import sys

import tensorflow as tf
from process_env import one_device_env

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tensorboard_scalars(workdir):
  """{(tag, step): value} of every event file in workdir."""
  found = {}
  for path in glob.glob(os.path.join(workdir, "events.out.tfevents.*")):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        found[(value.tag, event.step)] = float(tf.make_ndarray(value.tensor))
  return found


def test_training_evaluates_every_n_steps(tmp_path):
  """A tiny run (dense: the quickest to compile; one CPU device) evaluating
  0-shot captions on 4 queries every 2 steps."""
  command = [
      sys.executable, "-m", "mm1_jax.train", "--config=configs/tiny.py:dense",
      f"--workdir={tmp_path}", "--config.train.num_steps=4", "--config.train.log_every=2",
      "--config.train.checkpoint_every=100", "--config.train.peak_tflops=1.0",
      "--config.optimizer.warmup_steps=1", "--config.data.seq_len=64",
      "--config.data.batch_size=2", "--config.eval.every_steps=2",
      "--config.eval.tasks=('easy_vqa_caption',)", "--config.eval.shots=(0,)",
      "--config.eval.max_queries=4", "--config.eval.batch_size=4"]
  result = subprocess.run(command, cwd=REPO, env=one_device_env(),
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.count("eval easy_vqa_caption 0shot: cider") == 2, result.stdout
  for step in (2, 4):
    with open(tmp_path / "eval" / f"step_{step}.json") as f:
      report = json.load(f)
    assert report["step"] == step
    assert report["results"]["easy_vqa_caption"]["0shot"]["num_queries"] == 4
  assert sorted(os.listdir(tmp_path / "eval")) == ["step_2.json", "step_4.json"]
  scalars = tensorboard_scalars(str(tmp_path))
  evaluated = sorted(step for tag, step in scalars if tag == "eval/easy_vqa_caption/0shot/cider")
  assert evaluated == [2, 4]
