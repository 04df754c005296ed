"""cuDNN fused attention against our einsum attention, on an NVIDIA GPU.

    python benchmarks/attention_check.py [--steps=10]

For two shapes -- the decoder's (grouped-query heads, packed causal mask)
and the ViT's (no mask, 257 tokens) -- compares, in bfloat16, the outputs
and the gradients of a scalar loss w.r.t. query, key and value of
layers.fused_attention (implementation="cudnn") with those of
layers.dot_product_attention (the "xla" path), both against a float32 run
of the latter, and times one forward + backward pass of each. Prints one
line per shape and implementation: the largest error relative to the
largest float32 value, and milliseconds per call. Needs a GPU: the CPU test
suite checks the same call with JAX's reference implementation instead.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from mm1_jax.models import layers

STEPS = flags.DEFINE_integer("steps", 10, "Timed calls per implementation.")

# name, batch, length, heads, kv_heads, head_dim, packed segments (None: no mask).
SHAPES = (
    ("decoder 1B (8 x 4096, 16/8 heads x 128)", 8, 4096, 16, 8, 128, 3),
    ("vit dinov2-s (64 x 257, 6 heads x 64)", 64, 257, 6, 6, 64, None),
)


def make_inputs(batch, length, heads, kv_heads, head_dim, segments):
  keys = jax.random.split(jax.random.key(0), 3)
  query = jax.random.normal(keys[0], (batch, length, heads, head_dim), jnp.float32)
  key = jax.random.normal(keys[1], (batch, length, kv_heads, head_dim), jnp.float32)
  value = jax.random.normal(keys[2], (batch, length, kv_heads, head_dim), jnp.float32)
  mask = None
  if segments:
    # Rows of `segments` documents of uneven length, then a little padding.
    bounds = np.sort(np.random.default_rng(0).integers(1, length - 8, (batch, segments - 1)))
    positions = np.arange(length)[None, :]
    segment_ids = 1 + (positions[:, :, None] >= bounds[:, None, :]).sum(-1)
    segment_ids[:, length - 8:] = 0
    mask = layers.segment_causal_mask(jnp.asarray(segment_ids))
  return query, key, value, mask


def loss_and_grads(attention, query, key, value):
  def loss(q, k, v):
    out = attention(q, k, v)
    return jnp.sum(out.astype(jnp.float32) * jnp.cos(jnp.arange(out.shape[-1])))
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def relative_error(got, expected):
  got, expected = np.asarray(got, np.float32), np.asarray(expected, np.float32)
  return float(np.max(np.abs(got - expected)) / np.max(np.abs(expected)))


def main(argv):
  del argv
  print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}")
  for name, batch, length, heads, kv_heads, head_dim, segments in SHAPES:
    query, key, value, mask = make_inputs(batch, length, heads, kv_heads, head_dim, segments)
    causal = segments is not None
    implementations = {
        "xla": lambda q, k, v: layers.dot_product_attention(q, k, v, mask),
        "cudnn": lambda q, k, v: layers.fused_attention(q, k, v, mask, is_causal=causal),
    }
    reference_out = jax.jit(implementations["xla"])(query, key, value)
    _, reference_grads = loss_and_grads(implementations["xla"], query, key, value)(
        query, key, value)
    bf16 = [x.astype(jnp.bfloat16) for x in (query, key, value)]
    for implementation, attention in implementations.items():
      out = jax.jit(attention)(*bf16)
      step = loss_and_grads(attention, *bf16)
      _, grads = step(*bf16)
      jax.block_until_ready(grads)
      start = time.perf_counter()
      for _ in range(STEPS.value):
        _, grads = step(*bf16)
      jax.block_until_ready(grads)
      milliseconds = 1000 * (time.perf_counter() - start) / STEPS.value
      grad_errors = ", ".join(f"d{n} {relative_error(g, r):.2e}"
                              for n, g, r in zip("qkv", grads, reference_grads))
      print(f"{name:42s} {implementation:6s} out {relative_error(out, reference_out):.2e}, "
            f"{grad_errors}; fwd+bwd {milliseconds:.2f} ms")


if __name__ == "__main__":
  app.run(main)
