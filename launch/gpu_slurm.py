"""Train on several GPU nodes of a SLURM cluster: writes an sbatch script, submits it.

    .venv/bin/python -m launch.gpu_slurm --nodes=4 --gpus_per_node=8 \\
        [--partition=... --time=24:00:00 --env=NCCL_SOCKET_IFNAME=...] \\
        -- --config=configs/mm1_3b.py --workdir=/shared/runs/mm1_3b [--config.x=y ...]

The job cds into this repository (clusters share it between nodes), exports
the XLA flags and NCCL settings below, prepares the bundled data once, and
starts the trainer with `srun`: one process per node driving all its GPUs
(--process_per=node, the default, as MaxText does) or one per GPU
(--process_per=gpu). jax.distributed reads the coordinator (first node of
the step), the process count and each process's id from SLURM's environment
(SLURM_STEP_NODELIST, SLURM_NTASKS, SLURM_PROCID; mm1_jax/train.py). Each
process logs to <process_log_dir>/<job>-<jobid>-process-<id>.log; if one
fails, srun kills the others (--kill-on-bad-exit).

SLURM sends SIGTERM --term_grace_s before the time limit (and on
preemption): the trainer saves a checkpoint and exits, and the same job
submitted again resumes from it. --dry_run prints the script and the sbatch
command instead of writing and submitting.
"""

from __future__ import annotations

import os
import re
import shlex
from typing import Sequence

from absl import app, flags

from launch import common
from mm1_jax import cli

_NODES = flags.DEFINE_integer("nodes", 1, "Nodes.", lower_bound=1)
_GPUS_PER_NODE = flags.DEFINE_integer("gpus_per_node", 8, "GPUs per node.", lower_bound=1)
_PROCESS_PER = flags.DEFINE_enum("process_per", "node", ["node", "gpu"],
                                 "One process per node (all its GPUs) or per GPU.")
_JOB_NAME = flags.DEFINE_string("job_name", "mm1", "SLURM job name.")
_PARTITION = flags.DEFINE_string("partition", None, "SLURM partition.")
_ACCOUNT = flags.DEFINE_string("account", None, "SLURM account.")
_TIME = flags.DEFINE_string("time", None, "Time limit, e.g. 24:00:00.")
_SBATCH = flags.DEFINE_multi_string("sbatch", [], "More #SBATCH options, e.g. --sbatch=qos=high "
                                    "--sbatch=constraint=h100 (repeatable).")
_REPO_DIR = flags.DEFINE_string("repo_dir", common.REPO, "This repository, as the nodes see it.")
_XLA_FLAGS = flags.DEFINE_multi_string("xla_flag", [], "More XLA flags (repeatable).")
_DEFAULT_XLA_FLAGS = flags.DEFINE_bool("default_xla_flags", True, "Use GPU_XLA_FLAGS.")
_TERM_GRACE_S = flags.DEFINE_integer("term_grace_s", 300, "SIGTERM this long before the time "
                                     "limit, to save a checkpoint.", lower_bound=0)

# XLA flags for LLM training on GPUs, after MaxText's A3 (H100) recipes
# (MaxText/configs/a3/*) and NVIDIA's JAX-Toolbox GPU performance notes.
# Every one is known to this jaxlib (tests/launch check: XLA aborts on an
# unknown flag).
GPU_XLA_FLAGS = (
    # Overlap collectives with compute.
    "--xla_gpu_enable_latency_hiding_scheduler=true",
    "--xla_gpu_enable_highest_priority_async_stream=true",
    # Fewer, larger collectives: the gradient all-reduce, FSDP's all-gathers and reduce-scatters.
    "--xla_gpu_all_reduce_combine_threshold_bytes=1073741824",
    "--xla_gpu_all_gather_combine_threshold_bytes=134217728",
    "--xla_gpu_reduce_scatter_combine_threshold_bytes=134217728",
    "--xla_gpu_enable_all_gather_combine_by_dim=false",
    "--xla_gpu_enable_reduce_scatter_combine_by_dim=false",
    # Start the next layer's collectives during this layer's compute (scanned layers).
    "--xla_gpu_enable_pipelined_all_gather=true",
    "--xla_gpu_enable_pipelined_reduce_scatter=true",
    "--xla_gpu_enable_pipelined_all_reduce=true",
    "--xla_gpu_enable_while_loop_double_buffering=true",
    # cuBLAS rather than Triton for matmuls (MaxText's choice on H100).
    "--xla_gpu_enable_triton_gemm=false",
)

# Environment for every process. The NCCL protocol settings are JAX-Toolbox's;
# fabric-specific ones (NCCL_SOCKET_IFNAME, NCCL_IB_HCA, GPUDirect plugins)
# belong to your cluster: add them with --env.
GPU_ENV = {
    "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.9",  # JAX's default leaves 25% unused.
    "NCCL_DEBUG": "WARN",  # NCCL's own errors reach the logs.
    "NCCL_PROTO": "SIMPLE,LL,LL128",
    "NCCL_LL_BUFFSIZE": "-2",
    "NCCL_LL128_BUFFSIZE": "-2",
    "TF_CPP_MIN_LOG_LEVEL": "2",  # TF only reads data here.
}


def _no_whitespace(name: str, value: str) -> str:
  # #SBATCH lines are not shell: a value cannot be quoted there.
  if re.search(r"\s", value):
    raise app.UsageError(f"{name}={value!r}: no spaces allowed (it goes into an #SBATCH line).")
  return value


def sbatch_directives(nodes: int, tasks_per_node: int, gpus_per_node: int, job_name: str,
                      log_dir: str, term_grace_s: int, partition: str | None,
                      account: str | None, time_limit: str | None,
                      extra: Sequence[str]) -> list[str]:
  options = [f"--job-name={job_name}", f"--nodes={nodes}", f"--ntasks-per-node={tasks_per_node}",
             f"--gpus-per-node={gpus_per_node}", "--exclusive",
             f"--output={log_dir}/%x-%j.out", f"--signal=TERM@{term_grace_s}"]
  options += [f"--partition={partition}"] if partition else []
  options += [f"--account={account}"] if account else []
  options += [f"--time={time_limit}"] if time_limit else []
  options += [f"--{item}" for item in extra]
  return [f"#SBATCH {_no_whitespace('sbatch option', option)}" for option in options]


def sbatch_script(trainer_args: Sequence[str], *, nodes: int, gpus_per_node: int,
                  process_per: str, job_name: str, log_dir: str, python: str, repo_dir: str,
                  xla_flags: Sequence[str], env: dict[str, str], term_grace_s: int = 300,
                  prepare_data: bool = True, partition: str | None = None,
                  account: str | None = None, time_limit: str | None = None,
                  extra_sbatch: Sequence[str] = ()) -> str:
  """The job script. Shell lines quote every value (shlex)."""
  _no_whitespace("--process_log_dir", log_dir)
  _no_whitespace("--job_name", job_name)
  per_gpu = process_per == "gpu"
  tasks_per_node = gpus_per_node if per_gpu else 1
  # One process per GPU: JAX gives each its SLURM_LOCALID's GPU, so every
  # task must see all the node's GPUs (no --gpus-per-task binding). One per
  # node: say explicitly that the process drives every local GPU.
  device_args = [] if per_gpu else [
      "--local_device_ids=" + ",".join(str(i) for i in range(gpus_per_node))]
  train = common.train_argv(python, [*device_args, *trainer_args])
  lines = ["#!/bin/bash",
           *sbatch_directives(nodes, tasks_per_node, gpus_per_node, job_name, log_dir,
                              term_grace_s, partition, account, time_limit, extra_sbatch),
           "# Written by launch/gpu_slurm.py.",
           "set -euo pipefail",
           f"cd {shlex.quote(repo_dir)}",
           *common.export_lines({"XLA_FLAGS": " ".join(xla_flags), **env})]
  if prepare_data:
    # Once here, then once per node: race-free whether ~/.cache is shared
    # between the nodes or not.
    prepare = [python, "-m", common.PREPARE_DATA_MODULE]
    lines += [shlex.join(prepare), shlex.join(["srun", "--ntasks-per-node=1", *prepare])]
  lines.append(shlex.join(["srun", "--kill-on-bad-exit=1",
                           f"--output={log_dir}/%x-%j-process-%t.log", *train]))
  return "\n".join(lines) + "\n"


def main(argv):
  if len(argv) < 2:
    raise app.UsageError("pass the trainer's flags after `--`, e.g. -- --config=... --workdir=...")
  trainer_args = list(argv[1:])
  workdir = common.check_trainer_args(trainer_args, shared_workdir=True)
  log_dir = common.LOG_DIR.value or (None if "://" in workdir else os.path.join(workdir, "logs"))
  if log_dir is None:
    raise app.UsageError("a gs:// workdir needs --process_log_dir on a filesystem the nodes "
                         "share.")
  xla_flags = [*(GPU_XLA_FLAGS if _DEFAULT_XLA_FLAGS.value else ()), *_XLA_FLAGS.value]
  script = sbatch_script(
      trainer_args, nodes=_NODES.value, gpus_per_node=_GPUS_PER_NODE.value,
      process_per=_PROCESS_PER.value, job_name=_JOB_NAME.value, log_dir=log_dir,
      python=common.PYTHON.value, repo_dir=_REPO_DIR.value, xla_flags=xla_flags,
      env={**GPU_ENV, **common.env_assignments(common.ENV.value)},
      term_grace_s=_TERM_GRACE_S.value, prepare_data=common.PREPARE_DATA.value,
      partition=_PARTITION.value, account=_ACCOUNT.value, time_limit=_TIME.value,
      extra_sbatch=_SBATCH.value)
  script_path = os.path.join(log_dir, f"{_JOB_NAME.value}.sbatch")
  runner = common.Runner(common.DRY_RUN.value)
  if common.DRY_RUN.value:
    runner.note(f"would write {script_path}:")
    print(script, end="", flush=True)
  else:
    os.makedirs(log_dir, exist_ok=True)
    with open(script_path, "w") as f:
      f.write(script)
    runner.note(f"wrote {script_path}")
  runner.run(["sbatch", script_path])


if __name__ == "__main__":
  cli.run(main)
