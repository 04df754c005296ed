"""Train an MM1 model.

    python -m mm1_jax.train --config=configs/tiny.py --workdir=/tmp/tiny \
        [--config.train.num_steps=2000 --config.optimizer.learning_rate=3e-4 ...]

Multi-host: on TPU pods and SLURM clusters jax.distributed is initialised
from the environment; elsewhere pass --coordinator_address, --num_processes
and --process_id (or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
JAX_PROCESS_ID), e.g. for several processes on one machine.
"""

from __future__ import annotations

import importlib
import os

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, TensorBoard logs, resolved config.")
_IMPORT = flags.DEFINE_list("import", [], "Modules to import first, e.g. ones that register "
                            "SeqIO tasks and mixtures of your own.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")

_CLUSTER_ENV = ("TPU_WORKER_HOSTNAMES", "CLOUD_TPU_TASK_ID", "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE")


def maybe_initialize_distributed() -> None:
  """jax.distributed.initialize when this is one process of several."""
  import jax

  coordinator = _COORDINATOR.value or os.environ.get("JAX_COORDINATOR_ADDRESS")
  num_processes = _NUM_PROCESSES.value or int(os.environ.get("JAX_NUM_PROCESSES", 0)) or None
  process_id = _PROCESS_ID.value
  if process_id is None and "JAX_PROCESS_ID" in os.environ:
    process_id = int(os.environ["JAX_PROCESS_ID"])
  if coordinator:
    if num_processes is None or process_id is None:
      raise app.UsageError("--coordinator_address needs --num_processes and --process_id.")
    if num_processes > 1 and jax.config.jax_platforms in (None, "", "cpu"):
      # CPU devices of several processes talk through gloo.
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes, process_id)
  elif any(name in os.environ for name in _CLUSTER_ENV):
    jax.distributed.initialize()  # Cluster auto-detection (TPU pod, SLURM, MPI).


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    # Progress lines are printed; library INFO chatter (tf.data, SeqIO, Orbax)
    # is left for --verbosity=0.
    logging.set_verbosity(logging.WARNING)
  import tensorflow as tf
  tf.config.set_visible_devices([], "GPU")  # TF only reads data; keep it off accelerators.
  maybe_initialize_distributed()
  for module in _IMPORT.value:
    importlib.import_module(module)
  from mm1_jax.training import trainer
  trainer.train(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
