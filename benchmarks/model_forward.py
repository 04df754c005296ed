"""Forward and forward+backward speed of a model config on the local devices.

    python benchmarks/model_forward.py --config=configs/tiny.py \
        [--batch_size=8 --seq_len=256 --steps=10 --mesh=data=-1]

Prints compile time, step time, text tokens/s and achieved TFLOP/s (FLOPs
from mm1_jax.models.accounting's model count, 3x forward for a backward pass).
Random weights and synthetic batches: this measures the model, not data.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from mm1_jax import config_lib, sharding, testing  # noqa: E402
from mm1_jax.models import accounting  # noqa: E402
from mm1_jax.models.multimodal import MM1Model  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Experiment config.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Global batch size.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 256, "Tokens per sequence.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps (after one warm-up).")


def _time(fn, *args, steps: int) -> tuple[float, float]:
  """(compile + first run seconds, mean seconds per later run)."""
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  first = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(steps):
    out = fn(*args)
  jax.block_until_ready(out)
  return first, (time.perf_counter() - start) / steps


def main(argv):
  del argv
  experiment = _CONFIG.value
  config = config_lib.mm1_config(experiment)
  mesh = sharding.make_mesh(dict(experiment.mesh))
  model = MM1Model(config)
  batch = testing.random_multimodal_batch(config, _BATCH.value, _SEQ_LEN.value, seed=0)
  args = (batch["tokens"], batch["images"], batch["image_mask"])
  with sharding.use_mesh(mesh):
    abstract = jax.eval_shape(model.init, jax.random.key(0), *args)
    shardings = sharding.params_shardings(abstract, mesh)
    params = jax.jit(lambda: nn.unbox(model.init(jax.random.key(0), *args)),
                     out_shardings=shardings)()
    batch_axes = lambda a: ("activation_batch",) + (None,) * (a.ndim - 1)
    args = tuple(jax.device_put(a, sharding.logical_sharding(batch_axes(a), a.shape, mesh))
                 for a in args)

    forward = jax.jit(lambda p, *a: model.apply(p, *a)[0])

    def loss(p, *a):
      logits, aux = model.apply(p, *a)
      return jnp.mean(jax.nn.logsumexp(logits, -1)) + aux["moe_loss"]

    train_like = jax.jit(jax.value_and_grad(loss))
    fwd_first, fwd_step = _time(forward, params, *args, steps=_STEPS.value)
    bwd_first, bwd_step = _time(train_like, params, *args, steps=_STEPS.value)

  counts = accounting.count_params(config)
  tokens = _BATCH.value * _SEQ_LEN.value
  images = int(batch["image_mask"].sum())
  flops = (tokens * accounting.llm_flops_per_token(config, counts, _SEQ_LEN.value)
           + _BATCH.value * config.max_images * accounting.encoder_flops_per_image(config, counts))
  print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind}; mesh {dict(mesh.shape)}")
  print(f"batch {_BATCH.value} x {_SEQ_LEN.value} tokens, {images} real images "
        f"({_BATCH.value * config.max_images} slots encoded)")
  print(f"forward:          compile+first {fwd_first:7.2f} s, step {fwd_step * 1e3:8.2f} ms, "
        f"{tokens / fwd_step:10.0f} tokens/s, {flops / fwd_step / 1e12:.4f} TFLOP/s")
  print(f"forward+backward: compile+first {bwd_first:7.2f} s, step {bwd_step * 1e3:8.2f} ms, "
        f"{tokens / bwd_step:10.0f} tokens/s, {3 * flops / bwd_step / 1e12:.4f} TFLOP/s")


if __name__ == "__main__":
  app.run(main)
