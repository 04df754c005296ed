"""The typed experiment: every section of a config file, parsed and validated once.

    experiment = Experiment.from_config(config, workdir=workdir)

Config files (configs/*.py) stay big_vision-style ml_collections ConfigDicts
with command-line overrides (--config.train.num_steps=2000). An entry point
(train, evaluate, generate, summary, benchmarks) turns that dict into one
frozen `Experiment` exactly once, before data, parameters or compiles, and
passes it down; no module reads raw ConfigDict fields. Every field is
checked here, alone and against the others (batch vs mesh, seq_len vs image
tokens, schedule vs num_steps, paths that must exist), so a bad value fails
in a second with a message that names the field, the value and the fix.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Callable, Mapping

from mm1_jax import paths
from mm1_jax.data import config as data_config
from mm1_jax.data.config import InputConfig
from mm1_jax.data.config import validate as validate_input
from mm1_jax.models.config import MM1Config
from mm1_jax.models.config import validate as validate_model
from mm1_jax.training.optimizer import OptimizerConfig
from mm1_jax.training.optimizer import validate as validate_optimizer
from mm1_jax.typed_config import (ConfigError, dataclass_from_dict, require_at_least,
                                  to_plain_dict, unknown_field_message)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Length, logging and checkpointing of a run."""
  num_steps: int = 1000
  log_every: int = 10
  checkpoint_every: int = 100
  keep_checkpoints: int = 3
  async_checkpoint: bool = True
  seed: int = 0
  z_loss_weight: float = 0.0  # Logit z-loss (PaLM); the MoE router z-loss is in model.llm.moe.
  # Per-device peak TFLOP/s for MFU; None: the device table, or a measured CPU matmul.
  peak_tflops: float | None = None
  # Resume from this committed step instead of the latest (later ones are deleted).
  restore_step: int | None = None


# eval.prompt_format values (mm1_jax/evaluation/evaluator.py).
PROMPT_FORMATS = ("fewshot", "chat")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """Few-shot evaluation (mm1_jax/evaluation/evaluator.py): during training
  every `every_steps` steps (0: never), and the defaults of
  `python -m mm1_jax.evaluate`. max_queries: the first N queries of each eval
  split (0: all)."""
  every_steps: int = 0
  tasks: tuple[str, ...] = ("easy_vqa_vqa", "easy_vqa_caption")
  shots: tuple[int, ...] = (0, 4, 8)
  max_queries: int = 100
  batch_size: int = 16
  seed: int = 0
  # The split queries come from; None: each task's "test", else "validation".
  split: str | None = None
  # "fewshot": MM1's k-shot prompts; "chat": 0-shot instructions in the run's
  # chat template (data.chat_template), for instruction-tuned models (shots=(0,)).
  prompt_format: str = "fewshot"
  # Text tasks whose held-out "validation" split is scored by perplexity
  # (mm1_jax/evaluation/perplexity.py), e.g. ("shakespeare_text",).
  perplexity_tasks: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Mesh axis sizes; -1 takes the remaining devices. dcn_data > 1 spans the
  data axis over that many slices (TPU multi-slice, or GPU nodes), the other
  sizes then being per slice (mm1_jax/sharding.py, make_mesh)."""
  data: int = -1
  fsdp: int = 1
  tensor: int = 1
  expert: int = 1
  dcn_data: int = 1

  def sizes(self) -> dict[str, int]:
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Experiment:
  """One experiment, typed. `config_json` is the resolved config as run
  (written to {workdir}/config.json)."""
  model: MM1Config
  data: InputConfig
  optimizer: OptimizerConfig
  train: TrainConfig
  eval: EvalConfig
  mesh: MeshConfig
  # Parameters-only initialisation: checkpoints, each holding the whole params
  # tree or some components (converted 'encoder' / 'llm' weights).
  init_from: tuple[str, ...] = ()
  config_json: str = "{}"

  @classmethod
  def from_config(cls, config: Any, *, workdir: str | None = None,
                  num_devices: int | None = None,
                  mixture_has_images: Callable[[str, str], bool] | None = None,
                  check_init_from: bool = True) -> "Experiment":
    """Parses and validates an experiment config (ConfigDict or dict).

    workdir: checked to be (or to be creatable as) a directory, when given.
    check_init_from: whether the init_from paths must exist (training);
      evaluate / generate / chat restore the run's own checkpoint instead.
    num_devices: the devices the mesh spans (default jax.device_count()).
    mixture_has_images: (mixture, vocabulary) -> whether its tasks carry
      images (default: asks the SeqIO registry; tests pass a stub).
    Raises ConfigError naming the first field that cannot work.
    """
    values = to_plain_dict(config)
    sections = {field.name for field in dataclasses.fields(cls)} - {"config_json"}
    for name in sorted(set(values) - sections):
      raise ConfigError(unknown_field_message("config", name, sections))
    init_from = values.get("init_from") or ""
    if not isinstance(init_from, str):
      raise ConfigError(f"init_from: expected comma-separated checkpoint paths, got "
                        f"{init_from!r}.")
    experiment = cls(
        model=dataclass_from_dict(MM1Config, values.get("model", {}), "model"),
        data=dataclass_from_dict(InputConfig, values.get("data", {}), "data"),
        optimizer=dataclass_from_dict(OptimizerConfig, values.get("optimizer", {}), "optimizer"),
        train=dataclass_from_dict(TrainConfig, values.get("train", {}), "train"),
        eval=dataclass_from_dict(EvalConfig, values.get("eval", {}), "eval"),
        mesh=dataclass_from_dict(MeshConfig, values.get("mesh", {}), "mesh"),
        init_from=tuple(p.strip() for p in init_from.split(",") if p.strip()),
        config_json=(config.to_json_best_effort(indent=2, sort_keys=True)
                     if hasattr(config, "to_json_best_effort") else "{}"))
    validate(experiment, workdir=workdir, num_devices=num_devices,
             mixture_has_images=mixture_has_images, check_init_from=check_init_from)
    return experiment

  def replace(self, **changes) -> "Experiment":
    return dataclasses.replace(self, **changes)

  @property
  def trained_model(self) -> MM1Config:
    """The model with the towers the optimizer freezes marked frozen, so that
    no gradient is computed for them either; with LoRA also the towers that
    hold adapters (their base is frozen, the adapters keep their gradients)."""
    from mm1_jax.models import lora  # pylint: disable=import-outside-toplevel
    frozen = set(self.optimizer.freeze) | lora.adapted_parts(self.model)
    return self.model.replace(freeze_encoder=self.model.freeze_encoder or "encoder" in frozen,
                              freeze_llm=self.model.freeze_llm or "llm" in frozen)


# ---------------------------------------------------------------------------
# Validation of the sections the other modules do not own.


def validate_train(c: TrainConfig) -> None:
  require_at_least(c, "train", num_steps=1, log_every=1, checkpoint_every=1,
                   keep_checkpoints=1, seed=0, z_loss_weight=0.0, restore_step=0)
  if c.peak_tflops is not None and not c.peak_tflops > 0:
    raise ConfigError(f"train.peak_tflops: must be > 0 TFLOP/s (or unset: measured), got "
                      f"{c.peak_tflops}.")


def validate_eval(c: EvalConfig) -> None:
  require_at_least(c, "eval", every_steps=0, max_queries=0, batch_size=1, seed=0)
  bad_shots = [k for k in c.shots if not isinstance(k, int) or k < 0]
  if bad_shots or not c.shots:
    raise ConfigError(f"eval.shots: need one or more shot counts >= 0, got {c.shots!r}.")
  if c.split is not None and not c.split.strip():
    raise ConfigError("eval.split: empty; name a split, e.g. 'validation', or unset it "
                      "(each task's test split, else its validation split).")
  if c.prompt_format not in PROMPT_FORMATS:
    raise ConfigError(f"eval.prompt_format: unknown format {c.prompt_format!r}; use one of "
                      f"{PROMPT_FORMATS} (k-shot prompts, or 0-shot chat-template "
                      "instructions).")
  # Evaluation during training uses eval.shots as they are; `python -m
  # mm1_jax.evaluate` checks the shots it is given (--shots) itself.
  if c.every_steps and c.prompt_format == "chat" and any(k != 0 for k in c.shots):
    raise ConfigError(f"eval.prompt_format: 'chat' prompts are 0-shot (an instruction, no "
                      f"demonstrations) but eval.shots is {c.shots!r}; set eval.shots=(0,), "
                      "or use prompt_format='fewshot' for k-shot prompts.")
  if c.every_steps and not c.tasks and not c.perplexity_tasks:
    raise ConfigError(f"eval.tasks: empty, but eval.every_steps={c.every_steps} asks for "
                      "evaluation; name the tasks (or perplexity_tasks) or set every_steps=0.")


def validate_mesh(c: MeshConfig) -> None:
  for axis, size in c.sizes().items():
    if axis.startswith("dcn_"):
      if size < 1:
        raise ConfigError(f"mesh.{axis}: the number of slices must be >= 1, got {size}.")
    elif size == 0 or size < -1:
      raise ConfigError(f"mesh.{axis}: must be >= 1, or -1 for the remaining devices, "
                        f"got {size}.")


def _bundled_mixture_has_images(mixture: str, vocabulary: str) -> bool:
  """Whether any task of a registered SeqIO task or mixture carries images."""
  try:
    from mm1_jax.data import tasks  # SeqIO and TensorFlow: only for a real run.
  except ImportError:
    # A machine without TensorFlow (e.g. for step benchmarks) reads no data;
    # a run that does imports the pipeline, which needs it anyway.
    return False
  try:
    return tasks.has_images(tasks.with_vocabulary(mixture, vocabulary))
  except ValueError as error:  # Unknown name: the message lists the registered ones.
    raise ConfigError(f"data.mixture: {error}") from None


def _check_batch_fits_mesh(e: Experiment, num_devices: int) -> None:
  """The global batch splits evenly over the batch-parallel mesh axes (never
  replicated silently), and so does each gradient-accumulation micro-batch."""
  from mm1_jax import sharding
  per_slice, dcn = sharding.split_dcn_sizes(e.mesh.sizes())
  num_slices = math.prod(dcn.values())
  if num_devices % num_slices:
    raise ConfigError(f"mesh.dcn_data: {num_devices} devices do not split into "
                      f"{num_slices} slices.")
  shape = sharding.resolve_mesh_shape(per_slice, num_devices // num_slices)
  batch_parallel = sharding.batch_parallel_size(
      {axis: shape[axis] * dcn[axis] for axis in shape})
  accum = e.optimizer.grad_accum_steps
  if e.data.batch_size % accum:
    raise ConfigError(f"optimizer.grad_accum_steps: {accum} does not divide "
                      f"data.batch_size={e.data.batch_size}; use a divisor of the batch.")
  micro_batch = e.data.batch_size // accum
  if micro_batch % batch_parallel:
    what = f"data.batch_size={e.data.batch_size}" + (
        f" / grad_accum_steps={accum} = {micro_batch}" if accum > 1 else "")
    raise ConfigError(
        f"data.batch_size: {what} does not split over the {batch_parallel} batch-parallel "
        f"devices of the mesh {shape} (data x fsdp x expert); use a multiple of "
        f"{batch_parallel * accum}, or change the mesh.")


def _check_image_split_fits(e: Experiment) -> None:
  """One image's sub-images (data.image_split) fit in model.max_images."""
  slots = data_config.slots_per_image(e.data)
  if slots > e.model.max_images:
    raise ConfigError(
        f"model.max_images: {e.model.max_images}, but data.image_split={e.data.image_split!r} "
        f"with image_grids={e.data.image_grids!r} puts up to {slots} sub-images (crops + "
        f"overview) in each image's place; set model.max_images >= {slots} (x the images per "
        "example), or use a smaller grid.")


def _check_split_tokens_fit(e: Experiment) -> None:
  """The <image_row_end> and <crop r,c> ids (after the tokenizer's last) have
  embedding rows: checked here, before anything trains, as the pipeline would
  at its start."""
  scheme = data_config.SplitScheme.from_config(e.data)
  if scheme is None or not (scheme.row_end or scheme.crop_indicators):
    return
  try:
    from mm1_jax.data import tokenizer  # SeqIO: a machine without it reads no data.
  except ImportError:
    return
  vocabulary = tokenizer.get_vocabulary(e.data.vocabulary or None)
  data_config.split_token_ids(scheme, vocabulary.vocab_size, e.model.llm.vocab_size)


def _check_workdir(workdir: str) -> None:
  """A local workdir must be a directory or creatable as one."""
  if paths.is_remote(workdir):
    return  # Buckets have no directories to check.
  path = os.path.abspath(workdir)
  if os.path.exists(path):
    if not os.path.isdir(path):
      raise ConfigError(f"--workdir: {workdir} exists and is not a directory; pass a "
                        "directory (it is created if missing).")
    if not os.access(path, os.W_OK):
      raise ConfigError(f"--workdir: {workdir} is not writable.")
    return
  parent = os.path.dirname(path)
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
    raise ConfigError(f"--workdir: {workdir} cannot be created: {parent} is not a writable "
                      "directory.")


def validate(e: Experiment, *, workdir: str | None = None, num_devices: int | None = None,
             mixture_has_images: Callable[[str, str], bool] | None = None,
             check_init_from: bool = True) -> None:
  """Every section alone, then the checks across sections."""
  validate_model(e.model)
  if e.model.lora.enabled:
    from mm1_jax.models import lora  # Builds the model abstractly: only for LoRA runs.
    lora.check_targets(e.model)
  validate_input(e.data)
  validate_optimizer(e.optimizer)
  validate_train(e.train)
  validate_eval(e.eval)
  validate_mesh(e.mesh)
  o, t = e.optimizer, e.train
  if o.warmup_steps > t.num_steps:
    raise ConfigError(f"optimizer.warmup_steps: {o.warmup_steps} is longer than the run "
                      f"(train.num_steps={t.num_steps}); the learning rate would never reach "
                      "its peak. Shorten the warmup or train longer.")
  if o.decay_steps is not None and o.decay_steps > t.num_steps:
    raise ConfigError(f"optimizer.decay_steps: {o.decay_steps} is beyond train.num_steps="
                      f"{t.num_steps}; the cosine would be cut off. Use <= num_steps, or "
                      "unset it (= num_steps).")
  _check_image_split_fits(e)
  _check_split_tokens_fit(e)
  has_images = mixture_has_images or _bundled_mixture_has_images
  if has_images(e.data.mixture, e.data.vocabulary):
    image_tokens = data_config.tokens_per_image(e.data, e.model.num_image_tokens)
    if e.data.seq_len < image_tokens + 2:
      raise ConfigError(
          f"data.seq_len: {e.data.seq_len} cannot hold one image ({image_tokens} tokens) and "
          f"any text; the mixture {e.data.mixture!r} has images. Use seq_len >= "
          f"{image_tokens + 2} (much more for real text).")
  if num_devices is None:
    import jax
    num_devices = jax.device_count()
  _check_batch_fits_mesh(e, num_devices)
  for path in e.init_from if check_init_from else ():
    if not paths.as_path(path).exists():
      raise ConfigError(f"init_from: {path} does not exist; pass checkpoints written by "
                        "python -m mm1_jax.convert or a training run's workdir.")
  if workdir is not None:
    _check_workdir(workdir)


def experiment_defaults() -> Mapping[str, Any]:
  """The default sections as dataclass instances (config_lib builds the
  ConfigDict of a config file from them)."""
  return {"model": MM1Config(), "data": InputConfig(), "optimizer": OptimizerConfig(),
          "train": TrainConfig(), "eval": EvalConfig(), "mesh": MeshConfig()}
