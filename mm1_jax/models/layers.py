"""Building blocks shared by the encoder, connectors and decoder.

Every parameter is created with logical axis names (see mm1_jax/sharding.py
for the table that maps them to mesh axes); layers never name mesh axes.
Norms and softmax run in float32 whatever the compute dtype.
"""

from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mm1_jax.sharding import constrain

Dtype = jnp.dtype | str

# Fan-in scaled truncated normal (for flax's own Conv, which sees true shapes).
DEFAULT_KERNEL_INIT = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")

def as_dtype(name: Dtype) -> jnp.dtype:
  return jnp.dtype(name)


class DenseGeneral(nn.Module):
  """Linear map over the trailing `len(axis)` dims to `features` dims.

  The kernel [*in_dims, *features] is created at its full shape, so its
  logical axis names (one per kernel dim) hold from the first moment; flax's
  DenseGeneral initialises a flattened kernel, which breaks that under a mesh.
  """
  features: tuple[int, ...]
  kernel_axes: tuple[str | None, ...]
  axis: tuple[int, ...] = (-1,)
  use_bias: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Callable | None = None  # Default: fan-in scaled truncated normal.

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    axis = tuple(sorted(a % x.ndim for a in self.axis))
    in_dims = tuple(x.shape[a] for a in axis)
    num_in, num_out = len(in_dims), len(self.features)
    init = self.kernel_init or nn.initializers.variance_scaling(
        1.0, "fan_in", "truncated_normal", in_axis=tuple(range(num_in)),
        out_axis=tuple(range(num_in, num_in + num_out)))
    kernel = self.param("kernel", nn.with_logical_partitioning(init, self.kernel_axes),
                        in_dims + self.features, as_dtype(self.param_dtype))
    dtype = as_dtype(self.dtype)
    y = jax.lax.dot_general(x.astype(dtype), kernel.astype(dtype),
                            ((axis, tuple(range(num_in))), ((), ())))
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(
          nn.initializers.zeros, self.kernel_axes[num_in:]), self.features,
                        as_dtype(self.param_dtype))
      y = y + bias.astype(dtype)
    return y


def dense(features: int | Sequence[int], axes: Sequence[str | None], *, name: str | None = None,
          dtype: Dtype, param_dtype: Dtype, use_bias: bool = False,
          axis: int | Sequence[int] = -1, kernel_init: Callable | None = None) -> DenseGeneral:
  """A DenseGeneral whose kernel carries logical axes `axes` (in dims + out dims).

  The bias, if any, takes the logical names of the output dims.
  """
  features = (features,) if isinstance(features, int) else tuple(features)
  axis = (axis,) if isinstance(axis, int) else tuple(axis)
  return DenseGeneral(features=features, kernel_axes=tuple(axes), axis=axis, use_bias=use_bias,
                      dtype=dtype, param_dtype=param_dtype, kernel_init=kernel_init, name=name)


def layer_norm(*, name: str, eps: float, param_dtype: Dtype, use_bias: bool = True) -> nn.LayerNorm:
  """LayerNorm computed in float32 (its output is cast back by the caller)."""
  return nn.LayerNorm(
      epsilon=eps, use_bias=use_bias, name=name, dtype=jnp.float32,
      param_dtype=as_dtype(param_dtype),
      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)))


class RMSNorm(nn.Module):
  """x / rms(x) * scale, in float32. x: [..., D]."""
  eps: float = 1e-5
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                       (x.shape[-1],), as_dtype(self.param_dtype))
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (normed * scale.astype(jnp.float32)).astype(x.dtype)


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
  """Activation by the names used in configs (see config.ACTIVATIONS)."""
  return {
      "gelu": lambda x: nn.gelu(x, approximate=False),
      "gelu_tanh": lambda x: nn.gelu(x, approximate=True),
      "quick_gelu": lambda x: x * nn.sigmoid(1.702 * x),  # OpenAI CLIP.
      "silu": nn.silu,
      "relu": nn.relu,
  }[name]


def remat_policy(name: str):
  """Checkpoint policies by config name; None means no rematerialisation."""
  return {
      "none": None,
      "full": jax.checkpoint_policies.nothing_saveable,
      "dots": jax.checkpoint_policies.checkpoint_dots,
      "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
  }[name]


def maybe_remat(module_cls, policy_name: str, **kwargs):
  """Wraps a layer class in nn.remat unless the policy is "none"."""
  if policy_name == "none":
    return module_cls
  return nn.remat(module_cls, policy=remat_policy(policy_name), prevent_cse=False, **kwargs)


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary position embedding, half-split convention (as in HF Llama).

  x: [B, T, heads, head_dim]; positions: int [B, T].
  """
  head_dim = x.shape[-1]
  inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, head_dim/2]
  cos = jnp.cos(angles)[:, :, None, :]
  sin = jnp.sin(angles)[:, :, None, :]
  x32 = x.astype(jnp.float32)
  first, second = x32[..., : head_dim // 2], x32[..., head_dim // 2:]
  rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
  return rotated.astype(x.dtype)


def segment_causal_mask(segment_ids: jax.Array) -> jax.Array:
  """Causal attention restricted to tokens of the same packed segment.

  segment_ids: int [B, T] (0 = padding). Returns bool [B, 1, T, T].
  Padding attends to padding, so no softmax row is empty.
  """
  length = segment_ids.shape[-1]
  causal = np.tril(np.ones((length, length), dtype=bool))
  same_segment = segment_ids[:, :, None] == segment_ids[:, None, :]
  return (same_segment & causal)[:, None]


def dot_product_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                          mask: jax.Array | None) -> jax.Array:
  """Grouped-query attention; softmax in float32.

  query: [B, T, H, D]; key, value: [B, S, KV, D] with H % KV == 0;
  mask: bool broadcastable to [B, 1, T, S] (True = attend) or None.
  Returns [B, T, H, D].
  """
  batch, length, num_heads, head_dim = query.shape
  num_kv_heads = key.shape[2]
  groups = num_heads // num_kv_heads
  query = query.reshape(batch, length, num_kv_heads, groups, head_dim)
  logits = jnp.einsum("btkgd,bskd->bkgts", query, key,
                      preferred_element_type=jnp.float32) / np.sqrt(head_dim).astype(np.float32)
  if mask is not None:
    logits = jnp.where(mask[:, :, None], logits, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=-1).astype(value.dtype)
  out = jnp.einsum("bkgts,bskd->btkgd", weights, value)
  return out.reshape(batch, length, num_heads, head_dim)


class Attention(nn.Module):
  """Multi-head (optionally grouped-query, optionally rotary) self-attention.

  x: [B, T, width] -> [B, T, width].
  """
  num_heads: int
  num_kv_heads: int
  head_dim: int
  qkv_bias: bool = False
  out_bias: bool = False
  rope_theta: float | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None,
               positions: jax.Array | None = None) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    width = x.shape[-1]
    query = dense((self.num_heads, self.head_dim), ("embed", "heads", "head_dim"),
                  name="query", use_bias=self.qkv_bias, **kw)(x)
    key = dense((self.num_kv_heads, self.head_dim), ("embed", "kv_heads", "head_dim"),
                name="key", use_bias=self.qkv_bias, **kw)(x)
    value = dense((self.num_kv_heads, self.head_dim), ("embed", "kv_heads", "head_dim"),
                  name="value", use_bias=self.qkv_bias, **kw)(x)
    query = constrain(query, ("activation_batch", "activation_length", "activation_heads",
                              "activation_head_dim"))
    key = constrain(key, ("activation_batch", "activation_length", "activation_kv_heads",
                          "activation_head_dim"))
    if self.rope_theta is not None:
      query = apply_rope(query, positions, self.rope_theta)
      key = apply_rope(key, positions, self.rope_theta)
    out = dot_product_attention(query, key, value, mask)
    return dense(width, ("heads", "head_dim", "embed"), name="out", axis=(-2, -1),
                 use_bias=self.out_bias, **kw)(out)


class GatedMlp(nn.Module):
  """SwiGLU feed-forward: down(silu(gate(x)) * up(x)). x: [B, T, D]."""
  mlp_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    gate = dense(self.mlp_dim, ("embed", "mlp"), name="gate", **kw)(x)
    up = dense(self.mlp_dim, ("embed", "mlp"), name="up", **kw)(x)
    hidden = constrain(nn.silu(gate) * up, ("activation_batch", "activation_length",
                                            "activation_mlp"))
    return dense(x.shape[-1], ("mlp", "embed"), name="down", **kw)(hidden)


class Mlp(nn.Module):
  """Two-layer MLP with biases: fc2(act(fc1(x))). x: [..., D]."""
  mlp_dim: int
  activation: str = "gelu"
  out_dim: int | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=True)
    hidden = activation(self.activation)(dense(self.mlp_dim, ("embed", "mlp"), name="fc1", **kw)(x))
    return dense(self.out_dim or x.shape[-1], ("mlp", "embed"), name="fc2", **kw)(hidden)
