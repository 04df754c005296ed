"""The train loop's overhead over the compiled step, in one run.

    python benchmarks/train_loop.py --config=configs/tiny.py --steps=30 \
        [--config.data.batch_size=8 ...]
    python benchmarks/train_loop.py --config=configs/bench_100m.py --steps=10

Two measurements of the same experiment, one after the other:

  isolated  the compiled train step alone, run back to back on batches read
            from the real input pipeline and put on the devices beforehand
            (what the device can do; dispatch is asynchronous, one block at
            the end);
  loop      mm1_jax.training.trainer.train itself (real input pipeline,
            prefetch thread, metrics window, logging) for 2 x --steps steps
            in a temporary workdir, its step time taken over the second
            --steps (the first includes the compile); no checkpoint or
            evaluation falls inside that window.

It prints both times per step and the loop's overhead (loop / isolated - 1).
Target (issue 14): <= 5% at configs/tiny.py and configs/bench_100m.py.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from mm1_jax import cli  # noqa: E402
from mm1_jax.experiment import Experiment  # noqa: E402
from mm1_jax.training import trainer  # noqa: E402
from mm1_jax.training.train_step import make_global_batch  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Experiment config.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps of each measurement.", lower_bound=2)


def isolated_step_time(experiment: Experiment, steps: int) -> float:
  """Seconds per step of the compiled step on pre-transferred real batches."""
  from mm1_jax.data import pipeline

  train_step, model = trainer.build(experiment)
  source = pipeline.MultimodalInput(experiment.data, model)
  batches = [make_global_batch(next(source), train_step.mesh) for _ in range(steps + 1)]
  state = train_step.init(jax.random.key(0))
  state, metrics = train_step.step(state, batches[0])  # Compile.
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for batch in batches[1:]:
    state, metrics = train_step.step(state, batch)
  jax.block_until_ready((state, metrics))
  return (time.perf_counter() - start) / steps


def loop_step_time(experiment: Experiment, steps: int) -> float:
  """Seconds per step of trainer.train over its second window of `steps`."""
  with tempfile.TemporaryDirectory() as workdir:
    scalars = trainer.train(experiment, workdir)
  return scalars["step_time"]


def main(argv):
  cli.start(argv)
  steps = _STEPS.value
  config = _CONFIG.value
  with config.unlocked():
    # Two log windows; no checkpoint inside them (the final one comes after).
    config.train.update(num_steps=2 * steps, log_every=steps, checkpoint_every=2 * steps,
                        peak_tflops=config.train.peak_tflops or 1.0)
    config.optimizer.warmup_steps = min(config.optimizer.warmup_steps, steps)
    config.eval.every_steps = 0
  experiment = Experiment.from_config(config)
  isolated = isolated_step_time(experiment, steps)
  loop = loop_step_time(experiment, steps)
  data = experiment.data
  print(f"config {_CONFIG.value.get('name', '') or sys.argv[1:2]}: batch {data.batch_size} x "
        f"{data.seq_len} tokens, mixture {data.mixture}, {jax.device_count()} x "
        f"{jax.devices()[0].device_kind}, {os.cpu_count()} CPU cores")
  print(f"isolated step: {isolated:.4f} s/step ({steps} steps, batches on the device)")
  print(f"train loop:    {loop:.4f} s/step (steps {steps + 1}-{2 * steps} of trainer.train)")
  print(f"loop overhead: {100 * (loop / isolated - 1):+.1f}%")


if __name__ == "__main__":
  cli.run(main)
