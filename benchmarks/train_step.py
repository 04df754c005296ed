"""Speed, MFU and memory of the full training step (model + loss + AdamW) of a config.

    python benchmarks/train_step.py --config=configs/bench_100m.py \
        [--config.data.batch_size=4 --config.data.seq_len=512 --steps=5 --warmup=1]
    python benchmarks/train_step.py --config=configs/bench_100m.py --compare_depths=4,32
    python benchmarks/train_step.py --config=configs/mm1_smol.py:stage=4,cpu \
        --compare_finetuning=full,lora,qlora --steps=10

Builds the TrainStep with mm1_jax.training.trainer.build (the config's mesh,
optimizer, grad accumulation, remat), feeds it a synthetic batch that honours
the train batch contract, and prints one block with:

  compile     lower + compile of the step (seconds)
  step        mean seconds per step over --steps steps after --warmup steps
  tokens/s    text tokens (segment id > 0) per second
  TFLOP/s     model FLOPs of a step (accounting.flops_per_step: 3x the forward,
              remat recomputation not counted) per second per device
  MFU         against the peak of this device: on GPU/TPU the vendor table
              (metrics.device_peak_tflops), on CPU a float32 matmul measured
              in this same run (metrics.measure_matmul_peak, best of before and
              after the timed steps); --config.train.peak_tflops overrides it
  memory      device memory_stats()['peak_bytes_in_use'] where the backend
              has it, and always the compiled step's memory_analysis()

--compare_depths=4,32 instead builds the config once per LLM depth
(config.model.llm.depth) and prints the compile times and their ratio; the
layer stack is scanned, so compile time should barely grow with depth. A
throw-away compile of the first depth runs first so that one-time start-up
costs do not land on it.

--compare_finetuning=full,lora,qlora builds the config once per fine-tuning
mode (summary.finetuning_variant: full; LoRA with the config's settings or
rank 64 / alpha 128; QLoRA, the same on an NF4 base), compiles each, then
times them side by side: --steps rounds, each running one step of every
mode in turn, so that the machine's load falls on all of them alike. It
prints per mode the trainable parameters, the median and fastest step, the
ratio to the first mode, and the compiled step's memory per device.

Random weights and synthetic batches: this measures the step, not data.
"""

from __future__ import annotations

import copy
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from mm1_jax import summary, testing  # noqa: E402
from mm1_jax.data.batch import count_tokens  # noqa: E402
from mm1_jax.models import accounting  # noqa: E402
from mm1_jax.experiment import Experiment  # noqa: E402
from mm1_jax.models.config import MM1Config  # noqa: E402
from mm1_jax.training import metrics as metrics_lib  # noqa: E402
from mm1_jax.training import trainer  # noqa: E402
from mm1_jax.training.train_step import make_global_batch  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Experiment config.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps.")
_WARMUP = flags.DEFINE_integer("warmup", 1, "Untimed steps after compiling.")
_COMPARE = flags.DEFINE_list("compare_depths", [], "LLM depths whose compile times to compare "
                             "(e.g. 4,32); no steps are run.")
_FINETUNING = flags.DEFINE_list("compare_finetuning", [], "Fine-tuning modes to time side "
                                "by side (full, lora, qlora).")
_PEAK_SIZE = flags.DEFINE_integer("peak_matmul_size", 1024, "Side of the square float32 "
                                  "matmul that measures the CPU peak.")


def train_batch(model: MM1Config, batch_size: int, seq_len: int, seed: int = 0
                ) -> dict[str, np.ndarray]:
  """A synthetic batch in the train step's contract (see WORKSPACE.md, Data).

  testing.random_multimodal_batch gives tokens with placeholder runs and the
  images; targets are the next tokens, trained on except where the target is
  a placeholder and at the last position; one segment per row.
  """
  raw = testing.random_multimodal_batch(model, batch_size, seq_len, seed=seed)
  tokens = raw["tokens"]
  targets = np.zeros_like(tokens)
  targets[:, :-1] = tokens[:, 1:]
  weights = (targets != model.image_placeholder_id).astype(np.int32)
  weights[:, -1] = 0
  return {
      "decoder_input_tokens": tokens,
      "decoder_target_tokens": targets,
      "decoder_loss_weights": weights,
      "decoder_segment_ids": np.ones_like(tokens),
      "decoder_positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32),
                                           tokens.shape).copy(),
      "images": raw["images"],
      "image_mask": raw["image_mask"],
  }


def compile_step(config):
  """(TrainStep, model config, compiled step, lower seconds, compile seconds)."""
  train_step, model = trainer.build(Experiment.from_config(config))
  start = time.perf_counter()
  lowered = train_step.lower()
  lowered_at = time.perf_counter()
  compiled = lowered.compile()
  done = time.perf_counter()
  return train_step, model, compiled, lowered_at - start, done - lowered_at


def _gib(num_bytes: float) -> str:
  return f"{num_bytes / 2**30:.2f} GiB"


def _describe(config, model: MM1Config, train_step) -> list[str]:
  counts = accounting.count_params(model)
  return [
      f"devices: {jax.device_count()} x {jax.devices()[0].device_kind} "
      f"({jax.default_backend()}); mesh {dict(train_step.mesh.shape)}",
      f"model: {counts.total / 1e6:.1f}M params (LLM {counts.llm / 1e6:.1f}M: "
      f"{model.llm.depth} x {model.llm.width}; encoder {counts.encoder / 1e6:.1f}M), "
      f"dtype {model.dtype}, remat llm={model.llm.remat_policy} "
      f"encoder={model.encoder.remat_policy}, grad accumulation {train_step.grad_accum_steps}",
      f"batch: {train_step.batch_size} x {train_step.seq_len} tokens, "
      f"{model.max_images} image slot(s)/row at {model.encoder.image_size}px",
  ]


def compare_depths(config, depths: list[int]) -> None:
  def with_depth(depth):
    variant = copy.deepcopy(config)
    variant.model.llm.depth = depth
    return variant

  compile_step(with_depth(depths[0]))  # Warm-up: one-time costs of the first compile.
  rows = []
  for depth in depths:
    train_step, model, _, lower_s, compile_s = compile_step(with_depth(depth))
    rows.append((depth, accounting.count_params(model).total, lower_s, compile_s))
  lines = _describe(config, model, train_step)[:1]
  lines[0] += f"; batch {train_step.batch_size} x {train_step.seq_len}"
  for depth, params, lower_s, compile_s in rows:
    lines.append(f"depth {depth:3d} ({params / 1e6:7.1f}M params): lower {lower_s:6.2f} s, "
                 f"compile {compile_s:6.2f} s, total {lower_s + compile_s:6.2f} s")
  base, last = rows[0], rows[-1]
  ratio = (last[2] + last[3]) / (base[2] + base[3])
  lines.append(f"compile ratio depth {last[0]} / depth {base[0]}: {ratio:.2f}x "
               f"(lower+compile; compile only {last[3] / base[3]:.2f}x)")
  print("\n".join(lines), flush=True)


def compare_finetuning(config, modes: list[str]) -> None:
  experiment = Experiment.from_config(config, check_init_from=False)
  runs = []
  for mode in modes:
    variant = summary.finetuning_variant(experiment, mode)
    train_step, model = trainer.build(variant)
    start = time.perf_counter()
    compiled = train_step.lower().compile()
    compile_s = time.perf_counter() - start
    local = train_batch(model, train_step.batch_size // jax.process_count(), train_step.seq_len)
    batch = make_global_batch(local, train_step.mesh)
    state = train_step.init(jax.random.key(0))
    for _ in range(_WARMUP.value):
      state, _ = compiled(state, batch)
    jax.block_until_ready(state)
    trainable = trainer.count_trainable(variant, train_step.abstract_state["params"])
    runs.append({"mode": mode, "compiled": compiled, "state": state, "batch": batch,
                 "compile_s": compile_s, "trainable": trainable, "times": [],
                 "memory": summary.CompiledMemory.from_compiled(compiled), "model": model,
                 "train_step": train_step})
  for _ in range(_STEPS.value):  # Side by side: one step of each mode per round.
    for run in runs:
      start = time.perf_counter()
      run["state"], metrics = run["compiled"](run["state"], run["batch"])
      jax.block_until_ready(metrics)
      run["times"].append(time.perf_counter() - start)
  first = runs[0]
  lines = _describe(config, first["model"], first["train_step"])
  lines.append(f"{_STEPS.value} rounds of one step per mode, after {_WARMUP.value} warm-up "
               "step(s) each:")
  reference = float(np.median(first["times"]))
  for run in runs:
    median = float(np.median(run["times"]))
    lines.append(
        f"  {run['mode']:6} trainable {run['trainable'] / 1e6:8.2f}M  step median "
        f"{median:.3f} s (fastest {min(run['times']):.3f}), {median / reference:.2f}x "
        f"{first['mode']}; compile {run['compile_s']:.1f} s; compiled memory per device "
        f"{_gib(run['memory'].total)} (arguments {_gib(run['memory'].argument)}, temp "
        f"{_gib(run['memory'].temp)})")
  print("\n".join(lines), flush=True)


def _peak(config) -> tuple[float, str]:
  peak, source = metrics_lib.device_peak_tflops(config.train.peak_tflops)
  if source.startswith("measured"):
    peak = metrics_lib.measure_matmul_peak(_PEAK_SIZE.value, repeats=10)
    source = f"float32 {_PEAK_SIZE.value}^3 matmul measured on {jax.devices()[0].device_kind}"
  return peak, source


def benchmark(config) -> None:
  peak_before, peak_source = _peak(config)
  train_step, model, compiled, lower_s, compile_s = compile_step(config)
  local = train_batch(model, train_step.batch_size // jax.process_count(), train_step.seq_len)
  batch = make_global_batch(local, train_step.mesh)
  tokens = count_tokens(local) * jax.process_count()
  state = train_step.init(jax.random.key(0))
  for _ in range(_WARMUP.value):
    state, _ = compiled(state, batch)
  jax.block_until_ready(state)
  times = []
  for _ in range(_STEPS.value):
    start = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  loss = float(metrics["loss"])
  peak_after, _ = _peak(config)
  # On CPU the "peak" is measured: take the better of the two (the conservative MFU).
  peak = max(peak_before, peak_after) if "measured" in peak_source else peak_before

  step_time = float(np.mean(times))
  flops = accounting.flops_per_step(model, train_step.batch_size, train_step.seq_len)
  tflops = flops / step_time / 1e12 / jax.device_count()
  lines = _describe(config, model, train_step)
  lines += [
      f"compile: lower {lower_s:.2f} s + compile {compile_s:.2f} s = {lower_s + compile_s:.2f} s",
      f"step: mean {step_time:.3f} s over {len(times)} steps (min {min(times):.3f}, max "
      f"{max(times):.3f}) after {_WARMUP.value} warm-up; loss {loss:.3f}",
      f"throughput: {tokens / step_time:,.0f} tokens/s ({tokens} tokens/step)",
      f"FLOPs: {flops / 1e12:.3f} TFLOP/step -> {tflops:.4f} TFLOP/s per device",
      f"peak: {peak:.4f} TFLOP/s per device ({peak_source}"
      + (f"; before {peak_before:.4f}, after {peak_after:.4f}" if "measured" in peak_source
         else "") + ")",
      f"MFU: {100 * tflops / peak:.1f}% (fastest step: "
      f"{100 * tflops * step_time / min(times) / peak:.1f}%)",
  ]
  device_stats = [d.memory_stats() for d in jax.local_devices()]
  peaks = [s["peak_bytes_in_use"] for s in device_stats if s and "peak_bytes_in_use" in s]
  if peaks:
    lines.append(f"memory: peak_bytes_in_use {_gib(max(peaks))} (max over local devices)")
  else:
    lines.append("memory: device memory_stats() not available on this backend")
  analysis = summary.CompiledMemory.from_compiled(compiled)
  lines.append("memory (compiled step, per device): " + analysis.format())
  print("\n".join(lines), flush=True)


def main(argv):
  del argv
  config = _CONFIG.value
  if _COMPARE.value:
    compare_depths(config, [int(d) for d in _COMPARE.value])
  elif _FINETUNING.value:
    compare_finetuning(config, _FINETUNING.value)
  else:
    benchmark(config)


if __name__ == "__main__":
  app.run(main)
