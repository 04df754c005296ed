"""The next step of a multi-host run's checkpoint, recomputed in one process.

    XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu \
    python tests/launch/resume_on_one_process.py --config=configs/tiny.py [--config.x=...] \
        --workdir=W --num_data_processes=2 --output=result.json [--wait_s=600]

Restores the latest train state in W (written by a run of
--num_data_processes processes) into this process's mesh, rebuilds the
global batch that run trained on next (every writer's input pipeline
restored from its own entry, checkpoints/{step}/data/process_{i}-of-{n},
the rows concatenated in process order, as make_global_batch assembles
them across hosts), runs TrainStep.step once and writes
{"restored_step", "loss", ...} to --output.

The step is compiled and the pipelines built before W is read, and W may
appear later (it is waited for, up to --wait_s): a caller can start this
while the multi-host run is still training and create W, atomically, once
it is done. Reads W, writes nothing there. Used by tests/launch/test_launch_local.py.
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "The run's experiment config.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of the multi-host run.")
_NUM_DATA_PROCESSES = flags.DEFINE_integer("num_data_processes", None,
                                           "Processes of the run that wrote the workdir.")
_OUTPUT = flags.DEFINE_string("output", None, "Where to write the result (JSON).")
_WAIT_S = flags.DEFINE_float("wait_s", 0.0, "How long to wait for --workdir to appear.")


def main(argv):
  del argv
  import jax
  import numpy as np

  from mm1_jax.data import pipeline
  from mm1_jax.training import checkpoint as checkpoint_lib
  from mm1_jax.training import trainer
  from mm1_jax.training.train_step import make_global_batch

  from mm1_jax.experiment import Experiment

  workdir, writers = _WORKDIR.value, _NUM_DATA_PROCESSES.value
  config = Experiment.from_config(_CONFIG.value)
  assert jax.process_count() == 1
  train_step, model = trainer.build(config)
  step_fn = train_step.lower().compile()  # TrainStep.step, compiled ahead of time.
  sources = [pipeline.MultimodalInput(config.data, model, process_index=index,
                                      process_count=writers)
             for index in range(writers)]

  deadline = time.time() + _WAIT_S.value
  while not os.path.isdir(workdir):
    if time.time() > deadline:
      raise FileNotFoundError(f"{workdir} did not appear within {_WAIT_S.value} s.")
    time.sleep(0.2)

  checkpointer = checkpoint_lib.Checkpointer(workdir, save_every=config.train.checkpoint_every,
                                             keep=config.train.keep_checkpoints, async_save=False)
  try:
    state = checkpointer.restore(train_step.abstract_state)  # Data positions: below.
    if state is None:
      raise FileNotFoundError(f"No checkpoint in {workdir}.")
    step = int(state["step"])
    rows = []
    for index, source in enumerate(sources):
      source.restore(os.fspath(checkpointer.data_position_path(step, index, writers)))
      rows.append(next(source))
  finally:
    checkpointer.close()
  batch = {key: np.concatenate([part[key] for part in rows]) for key in rows[0]}
  _, metrics = step_fn(state, make_global_batch(batch, train_step.mesh))
  result = {"restored_step": step, "loss": float(metrics["loss"]),
            "num_tokens": float(metrics["num_tokens"]), "device_count": jax.device_count(),
            "mesh": dict(train_step.mesh.shape),
            # Each writer read its own shard: their rows must differ.
            "shards_differ": not np.array_equal(rows[0]["decoder_input_tokens"],
                                                rows[-1]["decoder_input_tokens"])}
  with open(_OUTPUT.value, "w") as f:
    json.dump(result, f)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir", "num_data_processes", "output"])
  app.run(main)
