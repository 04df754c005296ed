"""Layers: query-chunked and fused attention are the same attention."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mm1_jax.models import layers


def random_qkv(length=37, kv_heads=2, groups=3, head_dim=8, batch=2, seed=0):
  keys = jax.random.split(jax.random.key(seed), 3)
  query = jax.random.normal(keys[0], (batch, length, kv_heads * groups, head_dim))
  key = jax.random.normal(keys[1], (batch, length, kv_heads, head_dim))
  value = jax.random.normal(keys[2], (batch, length, kv_heads, head_dim))
  return query, key, value


@pytest.mark.parametrize("chunk", [8, 16, 37])  # 37 = T: one block; 8 leaves a partial block.
@pytest.mark.parametrize("masked", [True, False])
def test_query_chunks_give_the_same_outputs_and_gradients(chunk, masked):
  query, key, value = random_qkv()
  segment_ids = jnp.asarray(np.repeat([[1] * 20 + [2] * 15 + [0] * 2], 2, axis=0))
  mask = layers.segment_causal_mask(segment_ids) if masked else None

  def loss(q, k, v, chunk_size):
    out = layers.dot_product_attention(q, k, v, mask, query_chunk_size=chunk_size)
    return jnp.sum(jnp.sin(out)), out

  (_, expected), expected_grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(
      query, key, value, 0)
  (_, got), got_grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True),
                                static_argnums=3)(query, key, value, chunk)
  assert got.shape == expected.shape
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
  for g, e in zip(got_grads, expected_grads):
    np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)


def _largest_array(hlo_text: str) -> int:
  """Elements of the largest f32 array anywhere in a compiled program's HLO
  (fused computations included, whose buffers memory_analysis may not count:
  XLA's CPU backend fuses a whole attention backward into one YNNPACK call)."""
  sizes = [int(np.prod([int(d) for d in dims.split(",")]))
           for dims in re.findall(r"f32\[([0-9,]+)\]", hlo_text)]
  return max(sizes)


def test_chunked_attention_keeps_one_score_block_in_memory():
  """No array of the unchunked [heads, T, S] scores exists in the compiled
  gradient of the chunked version at a long length, only blocks of them."""
  query, key, value = random_qkv(length=1024, kv_heads=1, groups=4, head_dim=16, batch=1)

  def largest(chunk):
    # key and value are arguments: closed over, XLA may constant-fold the scores.
    grad = jax.grad(lambda q, k, v: jnp.sum(layers.dot_product_attention(q, k, v, None, chunk)
                                            ** 2))
    return _largest_array(jax.jit(grad).lower(query, key, value).compile().as_text())

  scores = 4 * 1024 * 1024  # One float32 [heads, T, S] score tensor.
  assert largest(0) >= scores
  assert largest(128) <= scores // 8


@pytest.mark.parametrize("masked", [True, False])
def test_our_attention_matches_jax_reference(masked):
  """fused_attention's call of jax.nn.dot_product_attention (layout, GQA
  grouping, mask broadcast, is_causal, padding 37 -> 64 tokens) agrees with
  our einsum attention, outputs and gradients; on a GPU the same call with
  implementation="cudnn" is the fused kernel (benchmarks/attention_check.py
  checks that one on the device)."""
  query, key, value = random_qkv()
  segment_ids = jnp.asarray(np.repeat([[1] * 20 + [2] * 15 + [0] * 2], 2, axis=0))
  mask = layers.segment_causal_mask(segment_ids) if masked else None

  def loss(attention, q, k, v):
    out = attention(q, k, v)
    return jnp.sum(jnp.sin(out)), out

  ours = lambda q, k, v: layers.dot_product_attention(q, k, v, mask)
  reference = lambda q, k, v: layers.fused_attention(q, k, v, mask, is_causal=masked,
                                                     implementation="xla")
  grad = jax.value_and_grad(loss, argnums=(1, 2, 3), has_aux=True)
  (_, expected), expected_grads = grad(ours, query, key, value)
  (_, got), got_grads = grad(reference, query, key, value)
  assert got.shape == expected.shape
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
  for g, e in zip(got_grads, expected_grads):
    assert np.all(np.isfinite(g))
    np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)


def test_cudnn_attention_off_gpu_says_how_to_fix():
  query, key, value = random_qkv()
  if jax.default_backend() == "gpu":
    pytest.skip("this checks the message on a machine without an NVIDIA GPU")
  with pytest.raises(ValueError, match=r"needs an NVIDIA GPU.*attention_implementation='xla'"):
    layers.fused_attention(query, key, value, None, is_causal=False)


@pytest.mark.parametrize("num_blocks", [2, 5, 37])  # 5 leaves a short last block; 37 = T.
def test_causal_blocks_give_the_same_outputs_and_gradients(num_blocks):
  """Skipping the keys after each query block changes nothing: packed
  segments (a segment-causal mask with padding) and grouped-query heads."""
  query, key, value = random_qkv()
  segment_ids = jnp.asarray(np.repeat([[1] * 20 + [2] * 15 + [0] * 2], 2, axis=0))
  mask = layers.segment_causal_mask(segment_ids)

  def loss(q, k, v, blocks):
    out = layers.dot_product_attention(q, k, v, mask, causal_blocks=blocks)
    return jnp.sum(jnp.sin(out)), out

  grad = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)
  (_, expected), expected_grads = grad(query, key, value, 1)
  (_, got), got_grads = jax.jit(grad, static_argnums=3)(query, key, value, num_blocks)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
  for g, e in zip(got_grads, expected_grads):
    np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)


def test_causal_blocks_refuse_a_cache_shaped_mask():
  query, key, value = random_qkv(length=4)
  longer = jnp.concatenate([key, key], axis=1)
  with pytest.raises(ValueError, match="causal_blocks needs as many keys as queries"):
    layers.dot_product_attention(query, longer, longer, None, causal_blocks=2)
