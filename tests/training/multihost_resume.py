"""The next step of a multi-host run, recomputed in a single process.

    XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu \
    python tests/training/multihost_resume.py --config=configs/tiny.py [--config.x=...] \
        --workdir=W --num_data_processes=2 --output=result.json

Restores the latest train state of W (written by a run of
--num_data_processes processes) into this process's mesh, rebuilds the
global batch that run would have trained on next (every writer's input
pipeline restored from its own data_state/{step}/process_{i}, rows
concatenated in process order, as make_global_batch does across hosts),
runs one TrainStep.step and writes {"restored_step", "loss", ...} to --output.
Used by tests/training/test_multihost.py; reads W, writes nothing there.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "The run's experiment config.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of the multi-host run.")
_NUM_DATA_PROCESSES = flags.DEFINE_integer("num_data_processes", None,
                                           "Processes of the run that wrote the workdir.")
_OUTPUT = flags.DEFINE_string("output", None, "Where to write the result (JSON).")


def main(argv):
  del argv
  import jax
  import numpy as np

  from mm1_jax.data import pipeline
  from mm1_jax.training import checkpoint as checkpoint_lib
  from mm1_jax.training import trainer
  from mm1_jax.training.train_step import make_global_batch

  config, workdir, writers = _CONFIG.value, _WORKDIR.value, _NUM_DATA_PROCESSES.value
  assert jax.process_count() == 1
  train_step, model = trainer.build(config)
  checkpointer = checkpoint_lib.Checkpointer(workdir, save_every=config.train.checkpoint_every,
                                             keep=config.train.keep_checkpoints, async_save=False)
  try:
    state = checkpointer.restore(train_step.abstract_state)  # No data source: read below.
  finally:
    checkpointer.close()
  if state is None:
    raise FileNotFoundError(f"No checkpoint in {workdir}.")
  step = int(state["step"])
  rows = []
  for index in range(writers):
    source = pipeline.make_input(config.data, model, process_index=index, process_count=writers)
    source.restore(os.path.join(workdir, checkpoint_lib.DATA_STATE_DIR, str(step),
                                f"process_{index}"))
    rows.append(next(source))
  batch = {key: np.concatenate([part[key] for part in rows]) for key in rows[0]}
  _, metrics = train_step.step(state, make_global_batch(batch, train_step.mesh))
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
