"""Train an MM1 model.

    python -m mm1_jax.train --config=configs/tiny.py --workdir=/tmp/tiny \
        [--config.train.num_steps=2000 --config.optimizer.learning_rate=3e-4 ...]

Multi-host: on TPU VMs (pod slices, multi-slice) and in SLURM job steps of
several tasks jax.distributed is initialised from the environment; elsewhere
pass --coordinator_address, --num_processes and --process_id (or
JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID), e.g. for several
processes on one machine. launch/ starts such jobs.
"""

from __future__ import annotations

import importlib
import os
import re

from absl import app, flags
from ml_collections import config_flags

from mm1_jax import cli, private_apis

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, TensorBoard logs, resolved config.")
_IMPORT = flags.DEFINE_list("import", [], "Modules to import first, e.g. ones that register "
                            "SeqIO tasks and mixtures of your own.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job.",
                                       lower_bound=1)
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.", lower_bound=0)
_LOCAL_DEVICE_IDS = flags.DEFINE_list(
    "local_device_ids", None, "Local devices this process drives, e.g. 0,1,2,3,4,5,6,7 for "
    "one process per GPU node under SLURM (where JAX would otherwise give each task only "
    "the GPU of its SLURM_LOCALID); default: JAX's choice.")
flags.register_validator(
    "coordinator_address", lambda value: value is None or re.fullmatch(r"[^\s:]+:\d+", value),
    "must be host:port, e.g. 10.0.0.2:1234.")
flags.register_validator(
    "local_device_ids", lambda ids: ids is None or all(i.isdigit() for i in ids),
    "must be device indices >= 0, e.g. 0,1,2,3.")
flags.register_multi_flags_validator(
    ["process_id", "num_processes"],
    lambda f: f["process_id"] is None or f["num_processes"] is None
    or f["process_id"] < f["num_processes"],
    "--process_id must be below --num_processes.")

# Set by GKE's TPU runtimes; plain TPU VMs are recognised by their chips.
_TPU_CLUSTER_ENV = ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "CLOUD_TPU_TASK_ID",
                    "MEGASCALE_COORDINATOR_ADDRESS")


def cluster_detected() -> bool:
  """Whether jax.distributed.initialize() can find this job's processes itself."""
  if any(name in os.environ for name in _TPU_CLUSTER_ENV) or private_apis.num_tpu_chips() > 0:
    return True  # GCE/GKE TPU: worker list and index from metadata or env.
  # SLURM: only inside a job step (srun) of several tasks. A bare sbatch or
  # salloc shell has SLURM_JOB_ID but no step, and a single task needs no
  # coordination (JAX would also restrict it to one GPU).
  if "SLURM_STEP_NODELIST" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    return True
  return int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1


def maybe_initialize_distributed() -> None:
  """jax.distributed.initialize when this is one process of several."""
  import jax

  coordinator = _COORDINATOR.value or os.environ.get("JAX_COORDINATOR_ADDRESS")
  num_processes = _NUM_PROCESSES.value or int(os.environ.get("JAX_NUM_PROCESSES", 0)) or None
  process_id = _PROCESS_ID.value
  if process_id is None and "JAX_PROCESS_ID" in os.environ:
    process_id = int(os.environ["JAX_PROCESS_ID"])
  local_device_ids = ([int(i) for i in _LOCAL_DEVICE_IDS.value]
                      if _LOCAL_DEVICE_IDS.value else None)
  if coordinator:
    if num_processes is None or process_id is None:
      raise app.UsageError("--coordinator_address needs --num_processes and --process_id.")
    if num_processes > 1 and jax.config.jax_platforms in (None, "", "cpu"):
      # CPU devices of several processes talk through gloo.
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes, process_id,
                               local_device_ids=local_device_ids)
  elif cluster_detected():
    # Cluster auto-detection (TPU VM, SLURM, Open MPI).
    jax.distributed.initialize(local_device_ids=local_device_ids)


def main(argv):
  cli.start(argv)
  maybe_initialize_distributed()
  for module in _IMPORT.value:
    importlib.import_module(module)
  from mm1_jax.experiment import Experiment
  from mm1_jax.training import trainer
  # Parsed and validated once, before data, parameters or compiles.
  experiment = Experiment.from_config(_CONFIG.value, workdir=_WORKDIR.value)
  trainer.train(experiment, _WORKDIR.value)


def _training_errors() -> tuple[type[BaseException], ...]:
  """The trainer's own stops, and file-system errors (a read-only or full
  workdir, CheckpointSaveError among them), reported as one line like config
  errors; --verbose adds the traceback."""
  from mm1_jax.data.health import DataHealthError
  from mm1_jax.training.trainer import NonFiniteLossError
  return (NonFiniteLossError, DataHealthError, OSError)


if __name__ == "__main__":
  cli.run(main, required=["config", "workdir"], extra_errors=_training_errors())
