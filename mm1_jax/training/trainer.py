"""The training loop: restore or create the state, step, log, checkpoint.

    train(config, workdir)

On start the latest complete checkpoint in workdir/checkpoints is restored
(step, params, optimizer state, RNG and the data position), so a killed or
preempted run continues exactly where its last checkpoint left it.
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any

import jax
import numpy as np
from absl import logging

from mm1_jax import config_lib, sharding, summary
from mm1_jax.data.config import InputConfig
from mm1_jax.models.multimodal import check_image_placeholders
from mm1_jax.training import checkpoint as checkpoint_lib
from mm1_jax.training import metrics as metrics_lib
from mm1_jax.training.optimizer import OptimizerConfig, make_optimizer
from mm1_jax.training.train_step import TrainStep, count_tokens, make_global_batch

LOSS_LOG = "train_losses.jsonl"  # One {"step", "loss"} line per step (process 0).


def say(message: str) -> None:
  """A line for the person watching: printed by process 0, logged by all."""
  logging.info("%s", message)
  if jax.process_index() == 0:
    print(message, flush=True)


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN or inf; training stopped before saving anything."""


def write_config(config, workdir: str) -> None:
  """The resolved config, as run, next to the checkpoints."""
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))


def build(config) -> tuple[TrainStep, Any]:
  """The TrainStep (model, optimizer, mesh) of an experiment config."""
  optimizer_config = OptimizerConfig.from_dict(config.optimizer)
  model = config_lib.mm1_config(config)
  # A tower the optimizer freezes gets no gradient computed either.
  model = model.replace(freeze_encoder=model.freeze_encoder or "encoder" in optimizer_config.freeze,
                        freeze_llm=model.freeze_llm or "llm" in optimizer_config.freeze)
  data = InputConfig.from_dict(config.data)
  mesh = sharding.make_mesh(dict(config.mesh))
  params = summary.abstract_params(model)
  counts = summary.count_params(model, params)
  optimizer, schedule = make_optimizer(optimizer_config, params, config.train.num_steps,
                                       counts.non_embedding_llm)
  step = TrainStep(model, optimizer, schedule, mesh, data.batch_size, data.seq_len,
                   z_loss_weight=config.train.z_loss_weight,
                   grad_accum_steps=optimizer_config.grad_accum_steps)
  return step, model


def restore_params(config, workdir: str):
  """The latest checkpoint's parameters, placed on the run's mesh (for
  evaluation and generation: no optimizer state, nothing written).

  Returns (params, model_config, mesh, step). Raises FileNotFoundError when
  the workdir has no checkpoint, and checkpoint.CheckpointMismatchError (the
  message training gives) when it holds another config's.
  """
  train_step, model_config = build(config)
  # Checked first: the Checkpointer would create a missing directory.
  if not os.path.isdir(os.path.join(workdir, checkpoint_lib.CHECKPOINTS_DIR)):
    raise FileNotFoundError(f"no checkpoints in {workdir}: expected "
                            f"{os.path.join(workdir, checkpoint_lib.CHECKPOINTS_DIR)}; train "
                            "first (python -m mm1_jax.train) or pass the run's --workdir.")
  # Read only: it never saves, and no `keep` limit may drop a checkpoint.
  checkpointer = checkpoint_lib.Checkpointer(workdir, save_every=1, keep=sys.maxsize)
  try:
    step = checkpointer.latest_step()
    if step is None:
      raise FileNotFoundError(f"no complete checkpoint in {checkpointer.directory}.")
    checkpointer.check_compatible(step, train_step.abstract_state)
    # Parameters only: the optimizer state would double the memory for nothing.
    params = checkpoint_lib.load_params(os.fspath(checkpointer.directory / str(step)),
                                        train_step.abstract_state["params"])
  finally:
    checkpointer.close()
  logging.info("Restored the parameters of step %d from %s", step, checkpointer.directory)
  return params, model_config, train_step.mesh, step


def _initial_state(train_step: TrainStep, config, checkpointer, data_source):
  state = checkpointer.restore(train_step.abstract_state, data_source)
  if state is not None:
    say(f"Restored step {int(state['step'])} from {checkpointer.directory}")
    return state
  state = train_step.init(jax.random.key(config.train.seed))
  if config.init_from:
    paths = [path.strip() for path in config.init_from.split(",") if path.strip()]
    params, sources = checkpoint_lib.load_component_params(
        paths, train_step.abstract_state["params"], state["params"])
    state = {**state, "params": params}
    for component in state["params"]:
      say(f"Initialised {component} from {sources.get(component, 'scratch (seed)')}")
  return state


def evaluate(config, workdir: str, step: int, params, model, mesh, writer) -> None:
  """Few-shot evaluation of the current params (config.eval); every process
  decodes, process 0 writes {workdir}/eval/step_{step}.json and the scalars."""
  from mm1_jax.evaluation import evaluator  # Only runs that evaluate need it.
  data = InputConfig.from_dict(config.data)
  results = evaluator.evaluate(
      params, model, config.eval.tasks, config.eval.shots,
      max_queries=config.eval.max_queries or None, batch_size=config.eval.batch_size,
      seed=config.eval.seed, mesh=mesh, image_policy=data.image_policy,
      image_start_end=data.image_start_end, vocabulary_path=data.vocabulary or "", log=say)
  writer.write_scalars(step, evaluator.scalars(results))
  if jax.process_index() == 0:
    os.makedirs(os.path.join(workdir, "eval"), exist_ok=True)
    with open(os.path.join(workdir, "eval", f"step_{step}.json"), "w") as f:
      json.dump({"step": step, "results": results}, f, indent=2)


def train(config, workdir: str) -> dict[str, Any]:
  """Trains `config` in `workdir`; returns the last step's metrics."""
  # The input pipeline (TensorFlow, SeqIO) is imported only by runs that read
  # data: build() and restore_params() also serve benchmarks and evaluation.
  from mm1_jax.data import pipeline
  train_step, model = build(config)
  num_steps = config.train.num_steps
  data_source = pipeline.make_input(config.data, model)
  checkpointer = checkpoint_lib.Checkpointer(
      workdir, save_every=config.train.checkpoint_every, keep=config.train.keep_checkpoints,
      async_save=config.train.async_checkpoint)
  state = _initial_state(train_step, config, checkpointer, data_source)
  # Only now: a workdir of another config must fail restore before anything is written.
  write_config(config, workdir)
  peak, peak_source = metrics_lib.device_peak_tflops(config.train.peak_tflops)
  say(f"{jax.process_count()} process(es), {jax.device_count()} devices, mesh "
      f"{dict(train_step.mesh.shape)}; MFU against {peak:.3f} TFLOP/s per device ({peak_source})")
  data_config = InputConfig.from_dict(config.data)
  reporter = metrics_lib.Reporter(
      workdir, num_steps,
      metrics_lib.flops_per_step(model, data_config.batch_size, data_config.seq_len,
                                 frozen_connector="connector" in config.optimizer.freeze), peak,
      write=jax.process_index() == 0)
  loss_log = os.path.join(workdir, LOSS_LOG)
  last_metrics: dict[str, Any] = {}
  tokens_since_report = 0
  with checkpoint_lib.PreemptionGuard() as guard:
    for step in range(int(state["step"]), num_steps):
      local_batch = next(data_source)
      check_image_placeholders(local_batch["decoder_input_tokens"], local_batch["image_mask"],
                               model.num_image_tokens, model.image_placeholder_id)
      state, metrics = train_step.step(state, make_global_batch(local_batch, train_step.mesh))
      done = step + 1
      loss = float(metrics["loss"])
      if not math.isfinite(loss):
        checkpointer.wait()
        raise NonFiniteLossError(
            f"loss is {loss} at step {done}; stopping without saving. The last good "
            f"checkpoint (step {checkpointer.latest_step()}) in {checkpointer.directory} is "
            "intact: lower the learning rate or check the data, then restart.")
      if jax.process_index() == 0:
        with open(loss_log, "a") as f:
          f.write(json.dumps({"step": done, "loss": loss}) + "\n")
      tokens_since_report += count_tokens(local_batch) * jax.process_count()
      if done % config.train.log_every == 0 or done == num_steps:
        last_metrics = jax.device_get(metrics)
        line = reporter.report(done, last_metrics, tokens_since_report / config.train.log_every,
                               {"skipped_examples": data_source.num_skipped})
        tokens_since_report = 0
        say(line)
      if "eval" in config and config.eval.every_steps and done % config.eval.every_steps == 0:
        evaluate(config, workdir, done, state["params"], model, train_step.mesh, reporter.writer)
      preempted = guard.requested
      checkpointer.save(done, state, data_source, force=preempted or done == num_steps)
      if preempted:
        say(f"SIGTERM received: saved step {done}, exiting.")
        break
  checkpointer.wait()
  checkpointer.close()
  reporter.flush()
  return {k: float(np.asarray(v)) for k, v in last_metrics.items()}
