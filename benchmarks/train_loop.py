"""The train loop's overhead over the compiled step, in one run.

    python benchmarks/train_loop.py --config=configs/tiny.py --steps=30 \
        [--config.data.batch_size=8 ...]
    python benchmarks/train_loop.py --config=configs/bench_100m.py --steps=10

Two measurements of the same experiment, interleaved:

  isolated  the compiled train step alone, run back to back on --steps
            batches read from the real input pipeline and put on the devices
            beforehand (what the device can do; dispatch is asynchronous, one
            block at the end of a pass); passes before and after the loop,
            the first one a warm-up;
  loop      mm1_jax.training.trainer.train itself (real input pipeline,
            prefetch thread, metrics window, logging) in a temporary workdir,
            for (--repeats + 1) log windows of --steps steps, each window's
            step time read from its TensorBoard scalars, the first (compile)
            left out; no checkpoint or evaluation falls inside them.

It prints both times per step and the loop's overhead (median loop / median
isolated - 1).
Target (issue 14): <= 5% at configs/tiny.py and configs/bench_100m.py.
"""

from __future__ import annotations

import glob
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from mm1_jax import cli  # noqa: E402
from mm1_jax.experiment import Experiment  # noqa: E402
from mm1_jax.training import trainer  # noqa: E402
from mm1_jax.training.train_step import make_global_batch  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Experiment config.")
_STEPS = flags.DEFINE_integer("steps", 20, "Steps of a timed pass / log window.", lower_bound=2)
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed passes of each kind.", lower_bound=1)


def isolated_step_times(train_step, batches, passes: int) -> list[float]:
  """Seconds per step of the compiled step over `batches` (on the devices), one
  figure per pass; the state carries over between passes."""
  state = train_step.init(jax.random.key(0))
  state, metrics = train_step.step(state, batches[0])  # Compile.
  jax.block_until_ready(metrics)
  times = []
  for _ in range(passes):
    start = time.perf_counter()
    for batch in batches:
      state, metrics = train_step.step(state, batch)
    jax.block_until_ready((state, metrics))
    times.append((time.perf_counter() - start) / len(batches))
  return times


def loop_step_times(experiment: Experiment) -> list[float]:
  """Seconds per step of trainer.train, one figure per log window after the
  first (which includes the compile), read from its TensorBoard scalars."""
  import tensorflow as tf

  with tempfile.TemporaryDirectory() as workdir:
    trainer.train(experiment, workdir)
    times = {}
    for path in glob.glob(os.path.join(workdir, "events.out.tfevents.*")):
      for event in tf.compat.v1.train.summary_iterator(path):
        for value in event.summary.value:
          if value.tag == "step_time":
            times[event.step] = float(tf.make_ndarray(value.tensor))
  return [times[step] for step in sorted(times)]


def main(argv):
  cli.start(argv)
  from mm1_jax.data import pipeline

  steps, repeats = _STEPS.value, _REPEATS.value
  config = _CONFIG.value
  num_steps = (repeats + 1) * steps
  with config.unlocked():
    # A log window of `steps` to compile in, then `repeats` timed ones; no
    # checkpoint inside them (the final one comes after the last report).
    config.train.update(num_steps=num_steps, log_every=steps, checkpoint_every=num_steps,
                        peak_tflops=config.train.peak_tflops or 1.0)
    config.optimizer.warmup_steps = min(config.optimizer.warmup_steps, steps)
    config.eval.every_steps = 0
  experiment = Experiment.from_config(config)
  train_step, model = trainer.build(experiment)
  source = pipeline.MultimodalInput(experiment.data, model)
  batches = [make_global_batch(next(source), train_step.mesh) for _ in range(steps)]
  del source  # Its tf.data threads would compete with the loop's own pipeline.
  # Isolated passes before and after the loop (the first one warms up), so
  # that a drift of the machine shows instead of favouring either side.
  isolated = isolated_step_times(train_step, batches, 1 + (repeats + 1) // 2)[1:]
  loop = loop_step_times(experiment)
  isolated += isolated_step_times(train_step, batches, 1 + repeats // 2)[1:]
  isolated_s, loop_s = float(np.median(isolated)), float(np.median(loop))
  data = experiment.data
  print(f"{config_flags.get_config_filename(flags.FLAGS['config'])}: batch {data.batch_size} x "
        f"{data.seq_len} tokens, mixture {data.mixture}, {jax.device_count()} x "
        f"{jax.devices()[0].device_kind}, {os.cpu_count()} CPU cores")
  print(f"isolated step: {isolated_s:.4f} s/step, median of {len(isolated)} passes of {steps} "
        f"steps ({', '.join(f'{t:.4f}' for t in isolated)})")
  print(f"train loop:    {loop_s:.4f} s/step, median of {len(loop)} log windows of {steps} "
        f"steps ({', '.join(f'{t:.4f}' for t in loop)})")
  print(f"loop overhead: {100 * (loop_s / isolated_s - 1):+.1f}% (medians)")


if __name__ == "__main__":
  cli.run(main)
