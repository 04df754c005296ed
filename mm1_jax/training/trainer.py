"""The training loop: restore or create the state, step, log, checkpoint.

    train(Experiment.from_config(config, workdir=workdir), workdir)

On start the latest complete checkpoint in workdir/checkpoints is restored
(step, params, optimizer state, RNG and the data position), so a killed or
preempted run continues exactly where its last checkpoint left it.

The loop never waits on the host: a background thread prepares and
transfers the next global batches while the device runs the current step
(training/prefetch.py), and the metrics are read back only on log and
checkpoint steps, where the losses of every step since the last read are
checked for NaN / inf before anything is saved.
"""

from __future__ import annotations

import json
import math
import signal
from typing import Any

import jax
import numpy as np
from absl import logging

from mm1_jax import paths, sharding
from mm1_jax.data.batch import check_image_placeholders, count_tokens
from mm1_jax.data.config import SplitScheme
from mm1_jax.experiment import Experiment
from mm1_jax.models import accounting
from mm1_jax.models import lora as lora_lib
from mm1_jax.models import qlora
from mm1_jax.models.config import LoraConfig
from mm1_jax.training import checkpoint as checkpoint_lib
from mm1_jax.training import metrics as metrics_lib
from mm1_jax.training.optimizer import make_optimizer
from mm1_jax.training import prefetch
from mm1_jax.training.prefetch import BatchPrefetcher
from mm1_jax.training.train_step import TrainStep, make_global_batch
from mm1_jax.typed_config import ConfigError

LOSS_LOG = "train_losses.jsonl"  # One {"step", "loss"} line per step (process 0).
CONFIG_FILE = "config.json"  # The resolved config, as run.
EVAL_DIR = "eval"  # Evaluation reports during training: eval/step_{N}.json.
# What a run cost, rewritten at the end of each invocation (write_train_summary).
TRAIN_SUMMARY = "train_summary.json"
PREFETCH_DEPTH = 2  # Global batches prepared ahead of the running step.


def say(message: str) -> None:
  """A line for the person watching: printed by process 0, logged by all."""
  logging.info("%s", message)
  if jax.process_index() == 0:
    print(message, flush=True)


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN or inf; training stopped before saving anything."""


def write_config(experiment: Experiment, workdir: str) -> None:
  """The resolved config, as run, next to the checkpoints."""
  if jax.process_index() == 0:
    path = paths.as_path(workdir) / CONFIG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(experiment.config_json)


def build(experiment: Experiment, mesh=None) -> tuple[TrainStep, Any]:
  """The TrainStep (model, optimizer, mesh) of an experiment, and its model
  config (frozen towers marked, so they get no gradient computed; with LoRA
  the LLM's base is frozen, its adapters train). mesh: default, the
  experiment's (e.g. one CPU device for a host-side merge)."""
  model = experiment.trained_model
  if mesh is None:
    mesh = sharding.make_mesh(experiment.mesh.sizes())
  params = accounting.abstract_params(model)
  counts = accounting.count_params(model, params)
  optimizer, schedule = make_optimizer(experiment.optimizer, params, experiment.train.num_steps,
                                       counts.non_embedding_llm)
  step = TrainStep(model, optimizer, schedule, mesh, experiment.data.batch_size,
                   experiment.data.seq_len, z_loss_weight=experiment.train.z_loss_weight,
                   grad_accum_steps=experiment.optimizer.grad_accum_steps)
  return step, model


def restore_params(experiment: Experiment, workdir: str):
  """The latest checkpoint's parameters, placed on the run's mesh (for
  evaluation and generation: no optimizer state, nothing written). A LoRA
  run's checkpoint holds only what trained: its base is rebuilt from
  init_from and checked against the saved fingerprint (load_run_params).

  Returns (params, model_config, mesh, step). Raises FileNotFoundError when
  the workdir has no checkpoint, checkpoint.CheckpointMismatchError (the
  message training gives) when it holds another config's, and
  checkpoint.BaseMismatchError when init_from gives another base.
  """
  train_step, model_config = build(experiment)
  # Checked first: the Checkpointer would create a missing directory.
  checkpoints = paths.as_path(workdir) / checkpoint_lib.CHECKPOINTS_DIR
  if not checkpoints.is_dir():
    raise FileNotFoundError(f"no checkpoints in {workdir}: expected {checkpoints}; train "
                            "first (python -m mm1_jax.train) or pass the run's --workdir.")
  # Read only: it never saves, and no `keep` limit may drop a checkpoint.
  checkpointer = checkpoint_lib.Checkpointer(workdir, save_every=1, keep=2**31)
  try:
    step = checkpointer.latest_step()
    if step is None:
      raise FileNotFoundError(f"no complete checkpoint in {checkpointer.directory}.")
    trainable_only = checkpointer.read_base(step) is not None
    checkpointer.check_compatible(step, saved_abstract_state(experiment, train_step,
                                                             trainable_only))
    # Parameters only: the optimizer state would double the memory for nothing.
    params = load_run_params(experiment, train_step, str(checkpointer.step_directory(step)))
  finally:
    checkpointer.close()
  logging.info("Restored the parameters of step %d from %s", step, checkpointer.directory)
  return params, model_config, train_step.mesh, step


# ---------------------------------------------------------------------------
# LoRA runs: checkpoints hold what trains; the base is described, not saved.


def trainable_mask(experiment: Experiment, params) -> Any:
  """Bool tree like params: the leaves the optimizer trains (LoRA: the
  adapters and the parts not frozen, e.g. the connector)."""
  from mm1_jax.training import optimizer as optimizer_lib
  labels = optimizer_lib.partition_labels(params, experiment.optimizer.freeze)
  return jax.tree.map(lambda label: label == optimizer_lib.TRAIN, labels)


def count_trainable(experiment: Experiment, params) -> int:
  """Parameters the optimizer trains (trainable_mask), of a concrete or abstract tree."""
  mask = trainable_mask(experiment, params)
  return sum(int(np.prod(leaf.shape)) for leaf, keep in
             zip(jax.tree.leaves(params), jax.tree.leaves(mask)) if keep)


def saved_abstract_state(experiment: Experiment, train_step: TrainStep, trainable_only: bool):
  """The abstract train state as checkpoints hold it: whole, or (a LoRA run's)
  with only the trainable params."""
  state = train_step.abstract_state
  if not trainable_only:
    return state
  return {**state, "params": lora_lib.select(state["params"],
                                             trainable_mask(experiment, state["params"]))}


def to_save(state, mask):
  """The state a checkpoint holds: a LoRA run's (mask given) without its frozen params."""
  if mask is None:
    return state
  return {**state, "params": lora_lib.select(state["params"], mask)}


def fresh_state(train_step: TrainStep, experiment: Experiment):
  """(train state at step 0: init from train.seed, then init_from; {component: source})."""
  state = train_step.init(jax.random.key(experiment.train.seed))
  sources = {}
  if experiment.init_from:
    params, sources = load_init_from(experiment.init_from, train_step.abstract_state["params"],
                                     state["params"], experiment.model.lora)
    state = {**state, "params": params}
  return state, sources


def describe_base(experiment: Experiment, params) -> dict[str, Any]:
  """What a LoRA run's checkpoints record of its frozen base: where it comes
  from (init_from, and train.seed for parts no init_from path holds) and the
  fingerprint of every frozen leaf (checkpoint.fingerprint)."""
  frozen = jax.tree.map(lambda train: not train, trainable_mask(experiment, params))
  return {"init_from": list(experiment.init_from), "seed": experiment.train.seed,
          "fingerprint": checkpoint_lib.fingerprint(lora_lib.select(params, frozen))}


def rebuild_base(experiment: Experiment, train_step: TrainStep, saved: dict[str, Any],
                 where: str):
  """A LoRA run's step-0 state (frozen base from init_from and the seed),
  checked against the base description `saved` with its checkpoint (at
  `where`). init_from: the experiment's, or the saved paths when it has none.
  Returns (state, its base description). Raises checkpoint.BaseMismatchError."""
  if not experiment.init_from and saved.get("init_from"):
    experiment = experiment.replace(init_from=tuple(saved["init_from"]))
  state, _ = fresh_state(train_step, experiment)
  base = describe_base(experiment, state["params"])
  if base["fingerprint"] != saved["fingerprint"]:
    raise checkpoint_lib.BaseMismatchError(
        f"The LoRA checkpoint {where} was trained on the frozen base with fingerprint "
        f"{saved['fingerprint']} (init_from={saved.get('init_from')}, seed "
        f"{saved.get('seed')}), but init_from={list(experiment.init_from)} (seed "
        f"{experiment.train.seed}) gives the base {base['fingerprint']}: pass the "
        "unchanged init_from checkpoints the run was trained from (--config.init_from=...), "
        "or use a fresh --workdir.")
  return state, base


def load_run_params(experiment: Experiment, train_step: TrainStep, step_dir: str):
  """The params of a training run's step directory, into train_step's
  shardings: read whole, or (a LoRA run's checkpoint) the trainable leaves
  read over the base rebuilt by rebuild_base. The one function evaluate,
  generate, chat and convert --lora_merge / --lora_export restore a run's
  params with."""
  abstract = train_step.abstract_state["params"]
  saved = checkpoint_lib.read_base(step_dir)
  if saved is None:
    return checkpoint_lib.load_params(step_dir, abstract)
  state, _ = rebuild_base(experiment, train_step, saved, step_dir)
  trained = checkpoint_lib.load_params(
      step_dir, lora_lib.select(abstract, trainable_mask(experiment, abstract)))
  return lora_lib.with_adapters(state["params"], trained)


def _initial_state(train_step: TrainStep, experiment: Experiment, checkpointer, data_source):
  """(state, base): restored or fresh; base: a LoRA run's description of
  its frozen base (saved with every checkpoint), else None."""
  chosen = experiment.train.restore_step
  if chosen is not None and chosen not in checkpointer.all_steps():
    raise ConfigError(f"train.restore_step: no checkpoint of step {chosen} in "
                      f"{checkpointer.directory}; it has steps {checkpointer.all_steps()}.")
  step = chosen if chosen is not None else checkpointer.latest_step()
  saved = checkpointer.read_base(step) if step is not None else None
  base = None
  if saved is not None:  # Trainable leaves only: the base comes from init_from again.
    abstract = saved_abstract_state(experiment, train_step, trainable_only=True)
    checkpointer.check_compatible(step, abstract)  # Before loading the base.
    fresh, base = rebuild_base(experiment, train_step, saved,
                               str(checkpointer.step_directory(step)))
    restored = checkpointer.restore(abstract, data_source, step=step)
    state = {**restored, "params": lora_lib.with_adapters(fresh["params"], restored["params"])}
  else:
    state = checkpointer.restore(train_step.abstract_state, data_source, step=chosen)
  if state is not None:
    say(f"Restored step {int(state['step'])} from {checkpointer.directory}")
    later = [step for step in checkpointer.all_steps() if step > int(state["step"])]
    for step in later:  # The run continues from the chosen step: they would shadow it.
      checkpointer.delete(step)
    if later:
      say(f"Deleted the later checkpoints {later} (train.restore_step={chosen}).")
  else:
    state, sources = fresh_state(train_step, experiment)
    if experiment.init_from:
      for component in state["params"]:
        say(f"Initialised {component} from {sources.get(component, 'scratch (seed)')}")
  if experiment.model.lora.enabled and base is None:
    base = describe_base(experiment, state["params"])
  return state, base


def load_init_from(paths, abstract_params, init_params, lora: LoraConfig | None = None,
                   skip=None):
  """checkpoint.load_component_params, LoRA-aware: the checkpoints hold base
  weights (converted, or merged by `python -m mm1_jax.convert --lora_merge`),
  which are loaded while the adapters keep their fresh initialisation (A
  random, B zero: the model starts equal to the base). A checkpoint that holds
  adapters too (a LoRA run's whole params) restores them as well; one of a LoRA
  run that holds only what trained is refused, naming --lora_merge.

  QLoRA (abstract_params with NF4 weights, `lora` their settings): float
  kernels in the checkpoints are read one at a time, quantised to NF4 on the
  host and placed with their shardings (quantized_init_from); checkpoints
  that already hold NF4 weights load as they are. skip: as in
  checkpoint.load_component_params."""
  for path in paths:  # A LoRA run's checkpoint lacks its base: name the way out.
    item_dir, in_train_state = checkpoint_lib._params_location(  # pylint: disable=protected-access
        checkpoint_lib.paths_lib.as_path(path))
    saved = checkpoint_lib.read_base(item_dir.parent) if in_train_state else None
    if saved is not None:
      raise checkpoint_lib.CheckpointMismatchError(
          f"init_from: {path} is a LoRA run's checkpoint, which holds only what trained (its "
          f"base comes from {saved.get('init_from')}); merge it first (python -m "
          f"mm1_jax.convert --lora_merge --source={path} --output=DIR) and pass DIR, or resume "
          "that run in its own workdir.", missing=[], unexpected=[], mismatched=[])
  quantized = {"/".join(path) for path, _ in qlora.quantized_weights(abstract_params)}
  if quantized and not any(qlora.is_nf4(stored.split("/")) for path in paths
                           for stored in checkpoint_lib.stored_param_shapes(path)):
    if lora is None or not lora.quantized:
      raise ValueError("load_init_from: the params hold NF4 weights; pass the model's LoRA "
                       "config (model.lora, quantize='nf4') to quantise them.")
    return quantized_init_from(paths, abstract_params, init_params, lora, quantized)
  adapters = lora_lib.lora_params(init_params)
  if not adapters:
    return checkpoint_lib.load_component_params(paths, abstract_params, init_params, skip)
  try:
    params, sources = checkpoint_lib.load_component_params(
        paths, lora_lib.without_lora(abstract_params), lora_lib.without_lora(init_params), skip)
  except checkpoint_lib.CheckpointMismatchError as error:
    holds_adapters = error.unexpected and all(lora_lib.is_adapter(path.split("/"))
                                              for path in error.unexpected)
    if error.missing or error.mismatched or not holds_adapters:
      raise
    return checkpoint_lib.load_component_params(paths, abstract_params, init_params, skip)
  return lora_lib.with_adapters(params, adapters), sources


def quantized_init_from(paths, abstract_params, init_params, lora: LoraConfig,
                        quantized: set[str]):
  """load_init_from for a QLoRA model from float checkpoints: everything but
  the quantised kernels loads as usual; each of those (`quantized`: their
  paths, "llm/blocks/layer_0/attn/query/kernel") is then read alone into
  host memory, quantised to NF4 (bit-identical to bitsandbytes) and placed
  with the shardings of its NF4 arrays, so that host memory peaks at one
  float kernel and the devices never hold the float base."""
  params, sources = load_init_from(paths, qlora.without_nf4(abstract_params),
                                   qlora.without_nf4(init_params), skip=quantized.__contains__)
  missing = sorted({path.split("/")[0] for path in quantized} - set(sources))
  if missing:
    raise ConfigError(
        f"model.lora.quantize='nf4' quantises the base weights of {missing} from init_from, but "
        f"no init_from checkpoint holds them (init_from={list(paths)}); add the converted "
        "checkpoint of that part (python -m mm1_jax.convert), e.g. checkpoints/smollm2_135m.")

  def read_kernel(path):
    return checkpoint_lib.read_param(sources[path[0]], path)

  def place(array, abstract_leaf):
    return jax.make_array_from_callback(array.shape, abstract_leaf.sharding,
                                        lambda index: array[index])

  return qlora.quantize_into(params, abstract_params, lora, read_kernel, place), sources


def evaluate(experiment: Experiment, workdir: str, step: int, params, model, mesh,
             writer) -> None:
  """Few-shot evaluation of the current params (experiment.eval); every process
  decodes, process 0 writes {workdir}/eval/step_{step}.json and the scalars."""
  from mm1_jax.evaluation import evaluator  # Only runs that evaluate need it.
  settings, data = experiment.eval, experiment.data
  results = evaluator.evaluate(
      params, model, settings.tasks, settings.shots,
      max_queries=settings.max_queries or None, batch_size=settings.batch_size,
      seed=settings.seed, mesh=mesh, eval_split=settings.split, image_policy=data.image_policy,
      image_start_end=data.image_start_end, vocabulary_path=data.vocabulary,
      prompt_format=settings.prompt_format, chat_template=data.chat_template, log=say,
      image_split=SplitScheme.from_config(data), perplexity_tasks=settings.perplexity_tasks,
      seq_len=data.seq_len)
  writer.write_scalars(step, evaluator.scalars(results))
  if jax.process_index() == 0:
    paths.write_json(paths.as_path(workdir) / EVAL_DIR / f"step_{step}.json",
                     {"step": step, "results": results}, indent=2)


def _truncate_loss_log(loss_log, last_step: int) -> None:
  """Drops the loss lines of steps after `last_step` (a resumed run writes them
  again), so that the log holds each step once."""
  if jax.process_index() != 0 or not loss_log.exists():
    return
  lines = [line for line in loss_log.read_text().splitlines()
           if line.strip() and json.loads(line)["step"] <= last_step]
  loss_log.write_text("".join(line + "\n" for line in lines))


class _MetricsWindow:
  """The device-side metrics of the steps since the last report.

  Nothing is read back per step: `check` fetches the losses not yet checked
  (on log and checkpoint steps) and `report_means` all metrics of the window.
  """

  def __init__(self):
    self.steps: list[int] = []
    self.metrics: list[dict[str, jax.Array]] = []
    self.num_tokens = 0
    self._checked = 0  # Steps at the front of the window already checked and logged.

  def add(self, step: int, metrics: dict[str, jax.Array], num_tokens: int) -> None:
    self.steps.append(step)
    self.metrics.append(metrics)
    self.num_tokens += num_tokens

  def check(self, checkpointer, loss_log) -> None:
    """Reads back the unchecked steps' losses; raises NonFiniteLossError at the
    first non-finite one, else appends them to the loss log."""
    new_steps = self.steps[self._checked:]
    if not new_steps:
      return
    values = jax.device_get([(m["loss"], m["grad_norm"]) for m in self.metrics[self._checked:]])
    for step, (loss, grad_norm) in zip(new_steps, values):
      for name, value in (("loss", float(loss)), ("gradient norm", float(grad_norm))):
        if not math.isfinite(value):
          raise NonFiniteLossError(_diverged(checkpointer, name, value, step, new_steps[0]))
    if jax.process_index() == 0:
      paths.append_lines(loss_log, [json.dumps({"step": step, "loss": float(loss)})
                                    for step, (loss, _) in zip(new_steps, values)])
    self._checked = len(self.steps)

  def report_means(self) -> tuple[dict[str, float], float]:
    """(mean of every metric over the window, tokens per step); empties it."""
    values = jax.device_get(self.metrics)
    means = {key: float(np.mean([np.asarray(v[key]) for v in values])) for key in values[0]}
    tokens_per_step = self.num_tokens / len(self.steps)
    self.__init__()
    return means, tokens_per_step


def _diverged(checkpointer, name: str, value: float, step: int, window_start: int) -> str:
  """The message of a non-finite loss at `step`. A checkpoint is good only once
  a loss computed from its parameters is finite: the one of step - 1 produced
  this loss, so it is deleted, and the message names the newest good one."""
  checkpointer.wait()
  removed = ""
  if step - 1 in checkpointer.all_steps():
    checkpointer.delete(step - 1)
    removed = (f" The checkpoint of step {step - 1} held the diverged parameters (its next "
               "loss is not finite) and was deleted.")
  good = checkpointer.latest_step()
  resume = (f"the last good checkpoint is step {good} in {checkpointer.directory}; lower the "
            "learning rate or check the data, then restart (it resumes there)"
            if good is not None else "no good checkpoint is left; lower the learning rate "
            "or check the data, then restart")
  return (f"{name} is {value} at step {step}; stopping without saving (the first non-finite "
          f"step since step {window_start - 1}).{removed} Now {resume}.")


def write_train_summary(workdir: str, step: int, trainable_parameters: int,
                        step_times: list[float]) -> dict[str, Any]:
  """Writes workdir/train_summary.json: what this invocation of the run cost.

  step: the last step trained; trainable_parameters: count_trainable;
  step_time_median_s: the median over the log windows timed in this
  invocation (the first window, which compiles, is never timed); peak memory
  from metrics.peak_memory (device, or host memory on CPU).
  """
  peak_bytes, measure = metrics_lib.peak_memory()
  summary = {"step": step, "trainable_parameters": trainable_parameters,
             "step_time_median_s": float(np.median(step_times)) if step_times else None,
             "timed_windows": len(step_times), "peak_memory_bytes": peak_bytes,
             "memory_measure": measure}
  paths.write_json(paths.as_path(workdir) / TRAIN_SUMMARY, summary)
  return summary


def train(experiment: Experiment, workdir: str) -> dict[str, Any]:
  """Trains `experiment` in `workdir`; returns the scalars of the last report
  (metrics averaged over its log window, step_time, tokens_per_second, mfu)."""
  # The input pipeline (TensorFlow, SeqIO) is imported only by runs that read
  # data: build() and restore_params() also serve benchmarks and evaluation.
  from mm1_jax.data import pipeline
  train_step, model = build(experiment)
  settings = experiment.train
  num_steps = settings.num_steps
  data_source = pipeline.MultimodalInput(experiment.data, model)
  # One more than asked: the newest checkpoint is confirmed good only by the
  # next finite loss, and until then the one before must survive.
  checkpointer = checkpoint_lib.Checkpointer(
      workdir, save_every=settings.checkpoint_every, keep=settings.keep_checkpoints + 1,
      async_save=settings.async_checkpoint)
  state, base = _initial_state(train_step, experiment, checkpointer, data_source)
  # A LoRA run saves the trainable leaves only, and the description of its base.
  mask = trainable_mask(experiment, state["params"]) if base is not None else None
  # Only now: a workdir of another config must fail restore before anything is written.
  write_config(experiment, workdir)
  peak, peak_source = metrics_lib.device_peak_tflops(settings.peak_tflops)
  say(f"{jax.process_count()} process(es), {jax.device_count()} devices, mesh "
      f"{dict(train_step.mesh.shape)}; MFU against {peak:.3f} TFLOP/s per device ({peak_source})")
  reporter = metrics_lib.Reporter(
      workdir, num_steps,
      accounting.flops_per_step(model, experiment.data.batch_size, experiment.data.seq_len,
                                frozen_connector="connector" in experiment.optimizer.freeze),
      peak, write=jax.process_index() == 0)
  loss_log = paths.as_path(workdir) / LOSS_LOG
  _truncate_loss_log(loss_log, int(state["step"]))

  def prepare(local_batch):
    """On the prefetch thread: host-side checks, then the transfer."""
    check_image_placeholders(local_batch["decoder_input_tokens"], local_batch["image_mask"],
                             model.num_image_tokens, model.image_placeholder_id)
    return (make_global_batch(local_batch, train_step.mesh),
            count_tokens(local_batch) * jax.process_count())

  def is_checkpoint_step(step: int) -> bool:
    return step % settings.checkpoint_every == 0 or step == num_steps

  first_step = int(state["step"])
  done = last_saved = first_step
  window = _MetricsWindow()
  with checkpoint_lib.PreemptionGuard((signal.SIGTERM, signal.SIGINT)) as guard, BatchPrefetcher(
      data_source, prepare, first_step, num_steps, pauses_after=is_checkpoint_step,
      depth=PREFETCH_DEPTH, interrupted=lambda: guard.requested,
      stop_grace_s=prefetch.STOP_GRACE_SECONDS) as batches:
    for batch in batches:
      state, metrics = train_step.step(state, batch.arrays)
      done = batch.step
      checkpointer.check_saved()  # A failed background save stops the run now.
      window.add(done, metrics, batch.num_tokens)
      log_step = done % settings.log_every == 0 or done == num_steps
      if log_step or is_checkpoint_step(done):
        window.check(checkpointer, loss_log)  # Never save a non-finite state.
      if log_step:
        means, tokens_per_step = window.report_means()
        line = reporter.report(done, means, tokens_per_step,
                               {"skipped_examples": data_source.num_skipped,
                                **data_source.health.scalars()})
        skipped = data_source.health.console_summary()  # Empty when nothing was skipped.
        say(f"{line} | {skipped}" if skipped else line)
      if experiment.eval.every_steps and done % experiment.eval.every_steps == 0:
        evaluate(experiment, workdir, done, state["params"], model, train_step.mesh,
                 reporter.writer)
      if is_checkpoint_step(done):
        if checkpointer.save(done, to_save(state, mask), data_source,
                             force=done == num_steps, base=base):
          last_saved = done
        batches.resume()
      if guard.requested and not batches.stopping:
        # Train what was prefetched (the data position then matches), then save.
        batches.stop()
    if done > last_saved and batches.consistent:  # Preempted, or the data ran out.
      window.check(checkpointer, loss_log)
      checkpointer.save(done, to_save(state, mask), data_source, force=True,
                        base=base)
  if guard.requested and not batches.consistent:
    window.check(checkpointer, loss_log)
    say(f"{guard.signal_name} received while the input pipeline was stuck in a read for "
        f"{prefetch.STOP_GRACE_SECONDS:.0f} s: its position is mid-read, so step {done} was "
        f"not saved; the last checkpoint is step {checkpointer.latest_step()}. Exiting.")
  elif guard.requested:
    say(f"{guard.signal_name} received: saved step {done}, exiting.")
  elif batches.exhausted:
    say(f"The input ({experiment.data.mixture}, num_epochs={experiment.data.num_epochs}) "
        f"ran out after step {done} of {num_steps}; saved step {done}.")
  checkpointer.wait()
  checkpointer.close()
  if batches.consistent:  # Not stuck in a read (closing would wait for it).
    data_source.close()
  reporter.flush()
  if jax.process_index() == 0 and done > first_step:  # A finished run's restart keeps it.
    write_train_summary(workdir, done, count_trainable(experiment, state["params"]),
                        reporter.step_times)
  say(data_source.health.end_of_run_report())
  say(f"Done at step {done}. Checkpoints: {checkpointer.directory}; metrics: "
      f"{paths.as_path(workdir)} (TensorBoard events, {LOSS_LOG}); config: "
      f"{paths.as_path(workdir) / CONFIG_FILE}")
  return reporter.last_scalars
