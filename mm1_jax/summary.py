"""Parameter counts, FLOPs per token and memory of a config; nothing allocated.

    python -m mm1_jax.summary --config=configs/mm1_3b.py [--seq_len=4096]

The counts and FLOPs come from mm1_jax.models.accounting (jax.eval_shape of
the model's init), so even the 30B config is summarised in seconds on a laptop.

Compiled memory analysis (`--memory_analysis`): the real train step of the
config (mm1_jax.training.trainer.build: model, loss, AdamW, remat, grad
accumulation) is lowered and compiled for a mesh of virtual CPU devices on
abstract inputs, and XLA's per-device buffer assignment is printed:

    python -m mm1_jax.summary --config=configs/mm1_3b.py --memory_analysis \
        --mesh=fsdp=256 --batch_size=512 --seq_len=4096 --device_memory_gib=16 \
        --config.model.llm.remat_policy=full --config.model.encoder.remat_policy=full

With --finetuning=full,lora,qlora the step is compiled once per fine-tuning
mode (full; LoRA with the config's settings or rank 64 / alpha 128; QLoRA,
the same on an NF4 base) and a table compares their trainable parameters,
per-device params, NF4 base, optimizer state and peak (WORKSPACE.md, "What
fine-tuning costs").

The mesh needs that many devices: the program re-runs itself in a child
process with XLA_FLAGS=--xla_force_host_platform_device_count=N and
JAX_PLATFORMS=cpu (set them yourself to skip the re-run). Nothing is
allocated, but compiling is real work: minutes for a 3B model on 2 cores.
The figures are those of XLA's CPU compiler (its fusion and scheduling);
a TPU or GPU compile of the same step differs, so keep a margin.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import subprocess
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
from absl import app, flags
from ml_collections import config_flags

from mm1_jax import cli
from mm1_jax.data import config as data_config
from mm1_jax.data.config import InputConfig
from mm1_jax.typed_config import ConfigError, dataclass_from_dict
from mm1_jax.models import accounting
from mm1_jax.models.config import MM1Config


def _human(count: float) -> str:
  """12345678 -> '  12.35 M' (counts in B, M or K)."""
  for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
    if count >= scale:
      return f"{count / scale:8.2f} {unit}"
  return f"{count:8.0f}  "


def format_images(model: MM1Config, data: InputConfig) -> str:
  """Image slots and tokens per image (data.image_split) and what they cost."""
  slots = data_config.slots_per_image(data)
  tokens = data_config.tokens_per_image(data, model.num_image_tokens)
  scheme = data_config.SplitScheme.from_config(data)
  size = model.encoder.image_size
  if scheme is None:
    how = f"not split ({size}px)"
  else:
    grids = ", ".join(f"{rows}x{cols}" for rows, cols in scheme.grids)
    largest = max(scheme.grids, key=lambda grid: grid[0] * grid[1])
    how = (f"{scheme.kind} split, grid{'s' if len(scheme.grids) > 1 else ''} {grids} of "
           f"{size}px crops + overview (up to {largest[0] * size}x{largest[1] * size}px)")
  counts = accounting.count_params(model)
  encoder_flops = slots * accounting.encoder_flops_per_image(model, counts)
  return (f"images     {how}: up to {slots} image slot(s) = {tokens} sequence tokens per "
          f"image ({model.num_image_tokens} per slot); {model.max_images // slots} image(s) "
          f"per sequence at model.max_images={model.max_images}; encoder forward "
          f"{encoder_flops / 1e9:.1f} GFLOP per image")


def format_summary(config: MM1Config, seq_len: int, num_devices: int,
                   data: InputConfig | None = None) -> str:
  """Counts, FLOPs and memory of `config`; with `data`, its images' slots and tokens."""
  counts = accounting.count_params(config)
  giga = _human
  lines = [
      f"encoder    {giga(counts.encoder)}  (ViT {config.encoder.width}w x "
      f"{config.encoder.num_layers_built} layers, {config.encoder.image_size}px / "
      f"{config.encoder.patch_size} -> {config.encoder.num_patches} patches)",
      f"connector  {giga(counts.connector)}  ({config.connector.kind}, "
      f"{config.num_image_tokens} image tokens)",
      f"llm        {giga(counts.llm)}  (embedding {giga(counts.llm_embedding).strip()}, "
      f"non-embedding {giga(counts.non_embedding_llm).strip()})",
  ]
  if config.llm.moe.enabled:
    moe = config.llm.moe
    lines.append(f"  experts  {giga(counts.llm_experts)}  ({moe.num_experts} experts, top-"
                 f"{moe.num_experts_per_token}, every {moe.moe_every} layer(s); "
                 f"{giga(counts.llm_active_experts).strip()} active per token)")
  token_flops = accounting.llm_flops_per_token(config, counts, seq_len)
  image_flops = accounting.encoder_flops_per_image(config, counts)
  lines += [
      f"total      {giga(counts.total)}",
      f"active/token (LLM) {giga(counts.llm_active)}",
      f"FLOPs/token  LLM forward {token_flops / 1e9:.2f} GFLOP "
      f"at seq {seq_len} (x3 for a training step)",
      f"FLOPs/image  encoder forward {image_flops / 1e9:.1f} GFLOP",
  ]
  if data is not None:
    lines.append(format_images(config, data))
  memory = accounting.memory_bytes(config, counts)
  total = sum(memory.values())
  lines.append("memory     " + ", ".join(f"{k} {v / 2**30:.1f} GiB" for k, v in memory.items())
               + f"; training state {total / 2**30:.1f} GiB = {total / num_devices / 2**30:.2f} "
               f"GiB/device fully sharded over {num_devices} (activations not included)")
  return "\n".join(lines)


def format_bytes(num_bytes: float) -> str:
  """1.5 * 2**30 -> '1.50 GiB'; below a GiB in MiB."""
  if abs(num_bytes) >= 2**30:
    return f"{num_bytes / 2**30:.2f} GiB"
  return f"{num_bytes / 2**20:.1f} MiB"


def parse_mesh(text: str) -> dict[str, int]:
  """"fsdp=256" or "data=2,fsdp=128" -> {axis: size}; axes not named are 1.

  Raises ConfigError for a malformed item, an unknown axis or a size that is
  neither >= 1 nor -1.
  """
  from mm1_jax.experiment import MeshConfig, validate_mesh

  sizes = {}
  for item in filter(None, (part.strip() for part in text.split(","))):
    axis, sep, value = (part.strip() for part in item.partition("="))
    if not sep or not re.fullmatch(r"-?\d+", value):
      raise ConfigError(f"--mesh: expected axis=size items like 'data=2,fsdp=128', got "
                        f"{item!r}.")
    sizes[axis] = int(value)
  # The config's own checks: unknown axes (with the closest names) and sizes.
  validate_mesh(dataclass_from_dict(MeshConfig, sizes, "mesh"))
  return sizes


@dataclasses.dataclass(frozen=True)
class CompiledMemory:
  """Per-device bytes of a compiled program (XLA's buffer assignment)."""
  argument: int
  output: int
  alias: int  # Outputs that reuse (donated) argument buffers.
  temp: int  # Peak of everything live only inside the program (activations, ...).
  generated_code: int

  @classmethod
  def from_compiled(cls, compiled) -> "CompiledMemory":
    stats = compiled.memory_analysis()
    if isinstance(stats, (list, tuple)):  # Some backends give one per device / program.
      stats = stats[0]
    return cls(argument=int(stats.argument_size_in_bytes),
               output=int(stats.output_size_in_bytes), alias=int(stats.alias_size_in_bytes),
               temp=int(stats.temp_size_in_bytes),
               generated_code=int(stats.generated_code_size_in_bytes))

  @property
  def total(self) -> int:
    """What one device needs at the peak: arguments, outputs not aliased to a
    donated argument, temporaries and the code."""
    return self.argument + self.output - self.alias + self.temp + self.generated_code

  def format(self) -> str:
    gib = format_bytes
    return (f"arguments {gib(self.argument)}, outputs {gib(self.output)} (aliased to donated "
            f"arguments {gib(self.alias)}), temp {gib(self.temp)}, generated code "
            f"{gib(self.generated_code)}; total {gib(self.total)}")


@dataclasses.dataclass(frozen=True)
class TrainStepMemory:
  """Compiled memory of a config's train step on a mesh (per device)."""
  mesh: dict[str, int]
  batch_size: int
  seq_len: int
  params_bytes: int  # This device's shards of the parameters.
  optimizer_bytes: int  # ... of the optimizer state.
  compiled: CompiledMemory
  lower_seconds: float
  compile_seconds: float
  model: MM1Config
  grad_accum_steps: int
  abstract_params: Any = None  # The step's params (ShapeDtypeStructs with shardings).


def _per_device_bytes(tree) -> int:
  """Bytes of one device's shards (the largest shard of each leaf)."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
    total += math.prod(shape) * jnp.dtype(leaf.dtype).itemsize
  return total


# The analysed program is never run, so on CPU the LLVM optimisation of the
# generated code is skipped: it takes half the compile time and comes after
# buffer assignment, which it does not change.
CPU_ANALYSIS_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


def train_step_memory(experiment, mesh: dict[str, int], batch_size: int | None = None,
                      seq_len: int | None = None,
                      compiler_options: dict[str, Any] | None = None) -> TrainStepMemory:
  """Lowers and compiles the experiment's train step on abstract inputs.

  experiment: an mm1_jax.experiment.Experiment; mesh: axis sizes whose
  product is jax.device_count() (-1 allowed for one axis); batch_size,
  seq_len: the global batch (default: the experiment's data section);
  compiler_options: XLA options for the compile (default on CPU:
  CPU_ANALYSIS_COMPILER_OPTIONS). Nothing is allocated on the devices.
  """
  from mm1_jax import experiment as experiment_lib
  from mm1_jax.training import trainer  # Here: only --memory_analysis needs the trainer.

  axes = {field.name for field in dataclasses.fields(experiment_lib.MeshConfig)}
  mesh_config = experiment_lib.MeshConfig(**{axis: int(mesh.get(axis, 1)) for axis in axes})
  data = dataclasses.replace(experiment.data, batch_size=batch_size or experiment.data.batch_size,
                             seq_len=seq_len or experiment.data.seq_len)
  experiment = experiment.replace(mesh=mesh_config, data=data)
  experiment_lib.validate(experiment)  # The batch against this mesh, among others.
  train_step, model = trainer.build(experiment)
  start = time.perf_counter()
  lowered = train_step.lower()
  lowered_at = time.perf_counter()
  if compiler_options is None and jax.default_backend() == "cpu":
    compiler_options = CPU_ANALYSIS_COMPILER_OPTIONS
  compiled = lowered.compile(compiler_options or None)
  done = time.perf_counter()
  state = train_step.abstract_state
  return TrainStepMemory(
      mesh={k: int(v) for k, v in train_step.mesh.shape.items()},
      batch_size=train_step.batch_size, seq_len=train_step.seq_len,
      params_bytes=_per_device_bytes(state["params"]),
      optimizer_bytes=_per_device_bytes(state["opt_state"]),
      compiled=CompiledMemory.from_compiled(compiled),
      lower_seconds=lowered_at - start, compile_seconds=done - lowered_at, model=model,
      grad_accum_steps=train_step.grad_accum_steps, abstract_params=state["params"])


def format_train_step_memory(report: TrainStepMemory, device_memory_gib: float) -> str:
  num_devices = math.prod(report.mesh.values())
  mesh = ",".join(f"{k}={v}" for k, v in report.mesh.items() if v > 1) or "1 device"
  model = report.model
  gib = format_bytes
  total = report.compiled.total
  limit = device_memory_gib * 2**30
  lines = [
      f"compiled train step: mesh {mesh} ({num_devices} {jax.devices()[0].platform} devices), "
      f"global batch {report.batch_size} x {report.seq_len} tokens "
      f"({report.batch_size // max(num_devices // report.mesh.get('tensor', 1), 1)} rows/device"
      f"{f', {report.grad_accum_steps} micro-batches' if report.grad_accum_steps > 1 else ''}), "
      f"dtype {model.dtype}, remat llm={model.llm.remat_policy} "
      f"encoder={model.encoder.remat_policy}",
      f"  lower {report.lower_seconds:.1f} s, compile {report.compile_seconds:.1f} s",
      f"  per device, from the shardings: params {gib(report.params_bytes)}, "
      f"optimizer state {gib(report.optimizer_bytes)}",
      f"  per device, compiled.memory_analysis(): {report.compiled.format()}",
      f"  fits {device_memory_gib:g} GiB/device: {'yes' if total <= limit else 'NO'} "
      f"({100 * total / limit:.0f}% used)",
  ]
  return "\n".join(lines)


# --finetuning: the ways to fine-tune one config, compared on one compiled step each.
FINETUNING_MODES = ("full", "lora", "qlora")
DEFAULT_LORA_RANK = 64  # The scaling-LLaVA paper's LoRA / QLoRA rank, alpha = 2 * rank.


def finetuning_variant(experiment, mode: str):
  """The experiment fine-tuned `mode`-wise: full (no adapters), lora (the
  config's LoRA settings, or rank 64 / alpha 128 on its default targets when
  it has none), qlora (the same with an NF4 base). Other settings unchanged."""
  lora = experiment.model.lora
  if mode == "full":
    lora = dataclasses.replace(lora, rank=0, quantize="none")
  elif mode in ("lora", "qlora"):
    if not lora.enabled:
      lora = dataclasses.replace(lora, rank=DEFAULT_LORA_RANK, alpha=2.0 * DEFAULT_LORA_RANK)
    lora = dataclasses.replace(lora, quantize="nf4" if mode == "qlora" else "none")
  else:
    raise ValueError(f"unknown fine-tuning mode {mode!r}; use one of {FINETUNING_MODES}.")
  return experiment.replace(model=experiment.model.replace(lora=lora))


@dataclasses.dataclass(frozen=True)
class FinetuningMemory:
  """One fine-tuning mode's compiled train step and what its params hold."""
  mode: str
  report: TrainStepMemory
  trainable_params: int
  nf4_bytes: int  # Per device: the NF4 arrays of the quantised base (QLoRA), else 0.
  nf4_params: int  # Parameters those arrays hold (whole model).
  nf4_total_bytes: int  # Whole model: the NF4 arrays' bytes.


def finetuning_memory(experiment, mode: str, mesh: dict[str, int], batch_size: int | None,
                      seq_len: int | None) -> FinetuningMemory:
  """train_step_memory of finetuning_variant(experiment, mode), with its
  trainable parameter count and (QLoRA) the bytes of its NF4 base."""
  from mm1_jax.models import qlora
  from mm1_jax.training import trainer

  variant = finetuning_variant(experiment, mode)
  report = train_step_memory(variant, mesh, batch_size, seq_len)
  params = report.abstract_params
  trainable = trainer.count_trainable(variant, params)
  nf4_leaves = [(path, leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
                if qlora.is_nf4([str(getattr(k, "key", k)) for k in path])]
  nf4_params = sum(2 * math.prod(leaf.shape) for path, leaf in nf4_leaves
                   if str(path[-1].key).endswith("_nf4_codes"))
  return FinetuningMemory(
      mode=mode, report=report, trainable_params=trainable,
      nf4_bytes=_per_device_bytes([leaf for _, leaf in nf4_leaves]), nf4_params=nf4_params,
      nf4_total_bytes=sum(math.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize
                          for _, leaf in nf4_leaves))


def format_finetuning(rows: list[FinetuningMemory], device_memory_gib: float) -> str:
  """A table of the modes: trainable params, per-device params / optimizer /
  compiled peak, fits; and the NF4 base's bytes against bfloat16."""
  gib = format_bytes
  limit = device_memory_gib * 2**30
  first = rows[0].report
  lines = [f"fine-tuning compared: global batch {first.batch_size} x {first.seq_len}, dtype "
           f"{first.model.dtype}, remat llm={first.model.llm.remat_policy}, per device "
           f"({device_memory_gib:g} GiB):",
           f"  {'mode':6} {'trainable':>10} {'params':>10} {'NF4 base':>10} {'optimizer':>10} "
           f"{'temp':>10} {'total':>10}  fits"]
  for row in rows:
    compiled = row.report.compiled
    lines.append(
        f"  {row.mode:6} {_human(row.trainable_params):>10} {gib(row.report.params_bytes):>10} "
        f"{gib(row.nf4_bytes) if row.nf4_bytes else '-':>10} "
        f"{gib(row.report.optimizer_bytes):>10} {gib(compiled.temp):>10} "
        f"{gib(compiled.total):>10}  {'yes' if compiled.total <= limit else 'NO'}")
  for row in rows:
    if row.nf4_params:
      ratio = row.nf4_total_bytes / (2 * row.nf4_params)
      lines.append(f"  {row.mode}: the NF4 base holds {_human(row.nf4_params)} parameters in "
                   f"{gib(row.nf4_total_bytes)} (codes, 8-bit absmax, scales, offsets): "
                   f"{ratio:.4f}x their bfloat16 bytes ({gib(2 * row.nf4_params)}).")
  return "\n".join(lines)


_CHILD_ENV = "MM1_SUMMARY_DEVICES"


def _rerun_with_devices(num_devices: int) -> int:
  """Runs this program again with `num_devices` virtual CPU devices."""
  env = dict(os.environ)
  xla_flags = [f for f in env.get("XLA_FLAGS", "").split()
               if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(xla_flags + [
      f"--xla_force_host_platform_device_count={num_devices}"])
  env["JAX_PLATFORMS"] = "cpu"
  env[_CHILD_ENV] = str(num_devices)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
  return subprocess.call([sys.executable, "-m", "mm1_jax.summary", *sys.argv[1:]], env=env)


def main(argv):
  del argv
  from mm1_jax.experiment import Experiment

  FLAGS = flags.FLAGS
  if not FLAGS.memory_analysis:
    experiment = Experiment.from_config(FLAGS.config)  # Batch vs this machine's mesh.
    print(format_summary(experiment.model, FLAGS.seq_len, FLAGS.num_devices, experiment.data))
    return
  unknown = [mode for mode in FLAGS.finetuning if mode not in FINETUNING_MODES]
  if unknown:
    raise app.UsageError(f"--finetuning: unknown mode(s) {unknown}; use any of "
                         f"{','.join(FINETUNING_MODES)}.")
  mesh = parse_mesh(FLAGS.mesh) if FLAGS.mesh else dict(FLAGS.config.mesh)
  num_devices = math.prod(mesh.values())
  if num_devices < 0:  # One axis is -1: it takes what --num_devices leaves.
    mesh[next(k for k, v in mesh.items() if v == -1)] = FLAGS.num_devices // -num_devices
    num_devices = math.prod(mesh.values())
  already = f"--xla_force_host_platform_device_count={num_devices}" in os.environ.get(
      "XLA_FLAGS", "").split() and os.environ.get("JAX_PLATFORMS") == "cpu"
  if not already and os.environ.get(_CHILD_ENV) != str(num_devices):
    sys.exit(_rerun_with_devices(num_devices))
  if jax.device_count() != num_devices:
    raise app.UsageError(f"the mesh {mesh} needs {num_devices} devices, JAX has "
                         f"{jax.device_count()}; set XLA_FLAGS="
                         f"--xla_force_host_platform_device_count={num_devices} "
                         "JAX_PLATFORMS=cpu before JAX starts.")
  experiment = Experiment.from_config(FLAGS.config, num_devices=num_devices,
                                      check_init_from=False)
  print(format_summary(experiment.model, FLAGS.seq_len, num_devices, experiment.data),
        flush=True)
  if not FLAGS.finetuning:
    report = train_step_memory(experiment, mesh, FLAGS.batch_size, FLAGS.seq_len)
    print(format_train_step_memory(report, FLAGS.device_memory_gib), flush=True)
    return
  rows = []
  for mode in FLAGS.finetuning:
    row = finetuning_memory(experiment, mode, mesh, FLAGS.batch_size, FLAGS.seq_len)
    print(f"{mode}: " + format_train_step_memory(row.report, FLAGS.device_memory_gib),
          flush=True)
    rows.append(row)
  print(format_finetuning(rows, FLAGS.device_memory_gib), flush=True)


if __name__ == "__main__":
  # Flags are defined only when run as a program: the formatting and memory
  # analysis above are also imported by the benchmarks, which define their own.
  config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
  flags.DEFINE_integer("seq_len", 4096, "Sequence length for attention FLOPs "
                       "(and of the batch of --memory_analysis).", lower_bound=1)
  flags.DEFINE_integer("num_devices", 256, "Devices the training state is spread over (fsdp) "
                       "for the per-device memory estimate.", lower_bound=1)
  flags.DEFINE_bool("memory_analysis", False, "Compile the train step for --mesh on virtual "
                    "CPU devices and print XLA's per-device memory (see the module doc).")
  flags.DEFINE_string("mesh", "", "Mesh for --memory_analysis, e.g. 'fsdp=256' or "
                      "'data=2,fsdp=128'; default: the config's mesh over --num_devices.")
  flags.DEFINE_integer("batch_size", None, "Global batch for --memory_analysis; default: "
                       "the config's data.batch_size.", lower_bound=1)
  flags.DEFINE_float("device_memory_gib", 16.0, "Memory of one device, for the fits/does "
                     "not fit verdict of --memory_analysis.", lower_bound=0.0)
  flags.DEFINE_list("finetuning", [], "With --memory_analysis: compile the step once per "
                    "mode and compare them: full, lora (the config's LoRA, or rank 64 and "
                    "alpha 128), qlora (the same on an NF4 base), e.g. full,lora,qlora.")
  cli.run(main, required=["config"])
