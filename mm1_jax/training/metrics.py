"""Training metrics: device peak and MFU, TensorBoard scalars and the console line.

The FLOPs of a step come from mm1_jax.models.accounting.flops_per_step.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from mm1_jax.models.moe import MOE_METRICS

# Dense bf16 matmul peak per device, TFLOP/s (vendor figures, no sparsity).
PEAK_TFLOPS = {
    "TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5p": 459.0, "TPU v5": 459.0,
    "TPU v6 lite": 918.0, "TPU v6e": 918.0,
    "NVIDIA H100": 989.0, "NVIDIA H200": 989.0, "NVIDIA A100": 312.0, "NVIDIA L4": 121.0,
}


def measure_matmul_peak(size: int = 1024, repeats: int = 5) -> float:
  """Best achieved float32 matmul TFLOP/s of this device (the CPU's 'peak')."""
  a = jnp.ones((size, size), jnp.float32)
  matmul = jax.jit(lambda x: x @ x)
  matmul(a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * size**3 / best / 1e12


def device_peak_tflops(override: float | None = None) -> tuple[float, str]:
  """(peak TFLOP/s per device, where it came from)."""
  if override:
    return override, "flag"
  kind = jax.devices()[0].device_kind
  for name, peak in PEAK_TFLOPS.items():
    if kind.startswith(name):
      return peak, kind
  return measure_matmul_peak(), f"measured float32 matmul on {kind}"


def peak_memory() -> tuple[int, str]:
  """(peak bytes, what was measured) of this process's run so far: the first
  local device's peak_bytes_in_use where the backend reports it (GPU, TPU),
  else the process's peak resident host memory (the CPU backend keeps its
  arrays in host memory and reports no device statistics)."""
  stats = jax.local_devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return int(stats["peak_bytes_in_use"]), "device peak_bytes_in_use"
  import resource  # pylint: disable=import-outside-toplevel
  # ru_maxrss is in KiB on Linux.
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "host peak resident memory"


def format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  hours, rest = divmod(seconds, 3600)
  return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class Reporter:
  """Turns a log window's metrics into TensorBoard scalars and a console line.

  The metrics passed to `report` are the means over the steps since the last
  report (the trainer's log window): the loss of a single step of a mixed
  stream swings too much to read. Step time, throughput and MFU are the wall
  time between two reports over their steps. `last_scalars` keeps what the
  last report wrote, `step_times` every measured window's step time.
  """

  def __init__(self, workdir: str, num_steps: int, flops_per_step: float, peak_tflops: float,
               write: bool = True):
    from clu import metric_writers  # Imported here: only the trainer needs it.
    self.writer = metric_writers.create_default_writer(workdir, just_logging=not write)
    self.num_steps, self.flops_per_step, self.peak = num_steps, flops_per_step, peak_tflops
    self.num_devices = jax.device_count()
    self._last_time, self._last_step = None, None
    self.last_scalars: dict[str, float] = {}
    self.step_times: list[float] = []

  def report(self, step: int, metrics: dict[str, float], tokens: int, extra: dict[str, float]
             ) -> str:
    """Writes scalars for `step` (averaged since the last report) and returns the line."""
    now = time.perf_counter()
    if self._last_time is None:
      step_time = float("nan")
    else:
      step_time = (now - self._last_time) / max(step - self._last_step, 1)
    self._last_time, self._last_step = now, step
    scalars = {k: float(np.asarray(v)) for k, v in metrics.items()}
    scalars.update(extra)
    if np.isfinite(step_time):
      self.step_times.append(step_time)
      tflops = self.flops_per_step / step_time / 1e12 / self.num_devices
      scalars.update(step_time=step_time, tokens_per_second=tokens / step_time,
                     tflops_per_device=tflops, mfu=tflops / self.peak)
    self.writer.write_scalars(step, scalars)
    self.last_scalars = scalars
    eta = (self.num_steps - step) * step_time if np.isfinite(step_time) else float("nan")
    line = (f"step {step}/{self.num_steps} ({100 * step / self.num_steps:.0f}%) "
            f"loss {scalars['loss']:.4f} acc {scalars['accuracy']:.3f} "
            f"gnorm {scalars['grad_norm']:.3f} lr {scalars['learning_rate']:.2e}")
    if any(scalars.get(key) for key in MOE_METRICS):  # Dense models report zeros.
      line += " moe " + " ".join(f"{key} {scalars[key]:.3f}" for key in MOE_METRICS
                                 if key in scalars)
    if np.isfinite(step_time):
      line += (f" | {step_time:.2f} s/step {scalars['tokens_per_second']:.0f} tok/s "
               f"{scalars['tflops_per_device']:.3f} TFLOP/s/dev MFU {100 * scalars['mfu']:.1f}%"
               f" | ETA {format_duration(eta)}")
    return line

  def flush(self):
    self.writer.flush()
