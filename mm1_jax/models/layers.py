"""Building blocks shared by the encoder, connectors and decoder.

Every parameter is created with logical axis names (see mm1_jax/sharding.py
for the table that maps them to mesh axes); layers never name mesh axes.
Norms and softmax run in float32 whatever the compute dtype.

Every linear is a DenseGeneral, which also carries the LoRA adapters when
its module path is among the targets of a LoraScope (mm1_jax/models/lora.py).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mm1_jax.models import qlora
from mm1_jax.models.dense_product import dense_product
from mm1_jax.models.config import LoraConfig
from mm1_jax.sharding import constrain

Dtype = jnp.dtype | str

# Fan-in scaled truncated normal (for flax's own Conv, which sees true shapes).
DEFAULT_KERNEL_INIT = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")

# Logical axes of the residual stream [B, T, D] of every tower (the decoder,
# the ViT, the connector output, the MoE output); rules in mm1_jax/sharding.py.
RESIDUAL_AXES = ("activation_batch", "activation_length", "activation_embed")

def as_dtype(name: Dtype) -> jnp.dtype:
  return jnp.dtype(name)


# Logical axis of the adapters' rank dim (replicated: the rank is small).
LORA_RANK_AXIS = "lora_rank"


@dataclasses.dataclass(frozen=True)
class LoraScope:
  """The LoRA settings of one tower, as its layers see them.

  part: the tower's name in the MM1 params tree ("llm"); root: the tower
  module's scope path (() when it is the module applied, ("llm",) inside
  MM1Model). A linear's module path is the part followed by its path below
  the tower, "llm/blocks/layer_0/attn/query", whether the tower runs alone
  or inside MM1Model; config.targets are matched against it.
  """
  config: LoraConfig
  part: str
  root: tuple[str, ...] = ()

  def module_path(self, scope_path: Sequence[str]) -> str:
    return "/".join((self.part,) + tuple(scope_path)[len(self.root):])

  def targets(self, scope_path: Sequence[str]) -> bool:
    return self.config.targets_module(self.module_path(scope_path))

  def quantizes(self, scope_path: Sequence[str]) -> bool:
    return self.config.quantizes_module(self.module_path(scope_path))


def lora_a_init(in_axis: int | Sequence[int], batch_axis: Sequence[int] = ()) -> Callable:
  """Init of A [*batch, *in_dims, rank]: torch nn.Linear's default (what peft
  gives lora_A), Kaiming-uniform with a = sqrt(5): U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform", in_axis=in_axis,
                                          out_axis=-1, batch_axis=tuple(batch_axis))


def lora_dropout(module: nn.Module, x: jax.Array, rate: float) -> jax.Array:
  """Inverted dropout of an adapter's input, only when `module` has a 'dropout'
  rng (the train step passes one); evaluation and decoding pass none."""
  if rate == 0.0 or not module.has_rng("dropout"):
    return x
  keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


class DenseGeneral(nn.Module):
  """Linear map over the trailing `len(axis)` dims to `features` dims.

  The kernel [*in_dims, *features] is created at its full shape, so its
  logical axis names (one per kernel dim) hold from the first moment; flax's
  DenseGeneral initialises a flattened kernel, which breaks that under a mesh.

  With a `lora` scope that targets this module's path, the layer also holds
  adapters lora_a [*in_dims, r] and lora_b [r, *features] (logical axes: the
  kernel's in axes + "lora_rank", "lora_rank" + its out axes) and computes
  y = x W (+ bias) + scale * (dropout(x) A) B, as peft does. When the scope
  also quantises this path (QLoRA), W is held as NF4 arrays instead of
  "kernel" and dequantised in the compute dtype here (mm1_jax/models/qlora.py).
  """
  features: tuple[int, ...]
  kernel_axes: tuple[str | None, ...]
  axis: tuple[int, ...] = (-1,)
  use_bias: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Callable | None = None  # Default: fan-in scaled truncated normal.
  lora: LoraScope | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    axis = tuple(sorted(a % x.ndim for a in self.axis))
    in_dims = tuple(x.shape[a] for a in axis)
    num_in, num_out = len(in_dims), len(self.features)
    init = self.kernel_init or nn.initializers.variance_scaling(
        1.0, "fan_in", "truncated_normal", in_axis=tuple(range(num_in)),
        out_axis=tuple(range(num_in, num_in + num_out)))
    param_dtype, dtype = as_dtype(self.param_dtype), as_dtype(self.dtype)
    if axis != tuple(range(x.ndim - num_in, x.ndim)):
      raise ValueError(f"DenseGeneral contracts trailing dims; got axis={self.axis} for an "
                       f"input of rank {x.ndim}.")
    product = lambda x, kernel: dense_product(x, kernel, num_in)  # noqa: E731
    if self.lora is not None and self.lora.quantizes(self.path):  # QLoRA: an NF4 base.
      nf4_kernel = qlora.nf4_kernel(self, "kernel", (), in_dims, self.features, self.kernel_axes,
                                    self.lora.config, dtype, self.lora.module_path(self.path))
      y = nf4_kernel.matmul(product, x.astype(dtype))
    else:
      kernel = self.param("kernel", nn.with_logical_partitioning(init, self.kernel_axes),
                          in_dims + self.features, param_dtype)
      y = product(x.astype(dtype), kernel.astype(dtype))
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(
          nn.initializers.zeros, self.kernel_axes[num_in:]), self.features, param_dtype)
      y = y + bias.astype(dtype)
    if self.lora is not None and self.lora.targets(self.path):
      c = self.lora.config
      lora_a = self.param("lora_a", nn.with_logical_partitioning(
          lora_a_init(tuple(range(num_in))), self.kernel_axes[:num_in] + (LORA_RANK_AXIS,)),
                          in_dims + (c.rank,), param_dtype)
      lora_b = self.param("lora_b", nn.with_logical_partitioning(
          nn.initializers.zeros, (LORA_RANK_AXIS,) + self.kernel_axes[num_in:]),
                          (c.rank,) + self.features, param_dtype)
      h = product(lora_dropout(self, x, c.dropout).astype(dtype), lora_a.astype(dtype))  # [..., r]
      h = dense_product(h, lora_b.astype(dtype), 1)
      y = y + h * jnp.asarray(c.scale, dtype)
    return y


def dense(features: int | Sequence[int], axes: Sequence[str | None], *, name: str | None = None,
          dtype: Dtype, param_dtype: Dtype, use_bias: bool = False,
          axis: int | Sequence[int] = -1, kernel_init: Callable | None = None,
          lora: LoraScope | None = None) -> DenseGeneral:
  """A DenseGeneral whose kernel carries logical axes `axes` (in dims + out dims).

  The bias, if any, takes the logical names of the output dims. `lora`: the
  tower's LoRA scope (adapters when it targets this layer's path), or None.
  """
  features = (features,) if isinstance(features, int) else tuple(features)
  axis = (axis,) if isinstance(axis, int) else tuple(axis)
  return DenseGeneral(features=features, kernel_axes=tuple(axes), axis=axis, use_bias=use_bias,
                      dtype=dtype, param_dtype=param_dtype, kernel_init=kernel_init, lora=lora,
                      name=name)


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


def _attention_weights(logits: jax.Array, mask: jax.Array | None, dtype) -> jax.Array:
  """Softmax over the keys of float32 logits [B, KV, groups, T, S], masked
  positions excluded; mask broadcastable to [B, 1, T, S]. Returns `dtype`."""
  if mask is not None:
    logits = jnp.where(mask[:, :, None], logits, jnp.finfo(jnp.float32).min)
  return jax.nn.softmax(logits, axis=-1).astype(dtype)


def _attention_block(query: jax.Array, key: jax.Array, value: jax.Array,
                     mask: jax.Array | None) -> jax.Array:
  """dot_product_attention of all the given queries at once (same shapes).

  The heads are moved in front of the positions before the two products,
  a query group's positions merged: [B, KV, groups * T, D] . [B, KV, S, D].
  Each product is then one plain batched matrix product per kv head.
  Left to the compiler, XLA's CPU backend instead transposes the [T, S]
  scores and probabilities, the largest arrays here, around every product
  (issue 18, RESULTS.md).
  """
  batch, length, num_heads, head_dim = query.shape
  num_keys, num_kv_heads = key.shape[1], key.shape[2]
  groups = num_heads // num_kv_heads
  if length == 1:  # A decode step: moving the whole cache's heads would cost more.
    return _decode_attention_block(query, key, value, mask)
  query = query.reshape(batch, length, num_kv_heads, groups, head_dim).transpose(0, 2, 3, 1, 4)
  query = query.reshape(batch, num_kv_heads, groups * length, head_dim)
  key, value = (x.transpose(0, 2, 1, 3) for x in (key, value))  # [B, KV, S, D]
  logits = jnp.einsum("bkqd,bksd->bkqs", query, key,
                      preferred_element_type=jnp.float32) / np.sqrt(head_dim).astype(np.float32)
  weights = _attention_weights(logits.reshape(batch, num_kv_heads, groups, length, num_keys),
                               mask, value.dtype)
  weights = weights.reshape(batch, num_kv_heads, groups * length, num_keys)
  out = jnp.einsum("bkqs,bksd->bkqd", weights, value)
  out = out.reshape(batch, num_kv_heads, groups, length, head_dim)
  return out.transpose(0, 3, 1, 2, 4).reshape(batch, length, num_heads, head_dim)


def _decode_attention_block(query: jax.Array, key: jax.Array, value: jax.Array,
                            mask: jax.Array | None) -> jax.Array:
  """_attention_block for one query per row, over the cache in its own layout."""
  batch, length, num_heads, head_dim = query.shape
  num_kv_heads = key.shape[2]
  query = query.reshape(batch, length, num_kv_heads, num_heads // num_kv_heads, head_dim)
  logits = jnp.einsum("btkgd,bskd->bkgts", query, key,
                      preferred_element_type=jnp.float32) / np.sqrt(head_dim).astype(np.float32)
  weights = _attention_weights(logits, mask, value.dtype)
  out = jnp.einsum("bkgts,bskd->btkgd", weights, value)
  return out.reshape(batch, length, num_heads, head_dim)


def _causal_blocks(query: jax.Array, key: jax.Array, value: jax.Array, mask: jax.Array | None,
                   num_blocks: int) -> jax.Array:
  """Causal attention cut into num_blocks query blocks, block i attending
  only to the keys up to its last query: the keys after it are masked for
  every query of the block, so their scores need not exist. About
  (num_blocks + 1) / (2 num_blocks) of the full [T, S] work; each query row
  still sees all the keys it may in one softmax, so the result is the same.
  """
  length = query.shape[1]
  block = -(-length // num_blocks)
  if mask is not None:
    mask = jnp.broadcast_to(mask, mask.shape[:2] + (length, length))
  outputs = []
  for start in range(0, length, block):
    stop = min(start + block, length)
    block_mask = None if mask is None else mask[:, :, start:stop, :stop]
    outputs.append(_attention_block(query[:, start:stop], key[:, :stop], value[:, :stop],
                                    block_mask))
  return jnp.concatenate(outputs, axis=1)


def _split_queries(x: jax.Array, axis: int, chunk: int, pad_value) -> jax.Array:
  """x with `axis` padded to a multiple of chunk and cut into blocks, the
  block index moved first: [..., T, ...] -> [T / chunk, ..., chunk, ...]."""
  length = x.shape[axis]
  num_chunks = -(-length // chunk)
  padding = [(0, 0)] * x.ndim
  padding[axis] = (0, num_chunks * chunk - length)
  x = jnp.pad(x, padding, constant_values=pad_value)
  x = x.reshape(x.shape[:axis] + (num_chunks, chunk) + x.shape[axis + 1:])
  return jnp.moveaxis(x, axis, 0)


def dot_product_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                          mask: jax.Array | None, query_chunk_size: int = 0,
                          causal_blocks: int = 1) -> jax.Array:
  """Grouped-query attention; softmax in float32.

  query: [B, T, H, D]; key, value: [B, S, KV, D] with H % KV == 0;
  mask: bool broadcastable to [B, 1, T, S] (True = attend) or None.
  Returns [B, T, H, D].

  causal_blocks > 1 says the mask is causal with S == T (a decoder's
  training pass): the queries are cut into that many blocks and each skips
  the keys after its last query (_causal_blocks), about half the work.
  A query_chunk_size below T takes precedence (its blocks see every key).

  query_chunk_size > 0 (and < T) computes the queries block by block, each
  block rematerialised in the backward pass: the [T, S] score matrices, the
  largest activations at long sequence lengths, then exist one
  [query_chunk_size, S] block at a time. Every query row still sees all S
  keys in one softmax, so the result is the same as all at once.
  """
  length = query.shape[1]
  if not query_chunk_size or query_chunk_size >= length:
    if causal_blocks > 1 and length > 1:
      if key.shape[1] != length:
        raise ValueError(f"causal_blocks needs as many keys as queries, got {key.shape[1]} "
                         f"keys for {length} queries.")
      return _causal_blocks(query, key, value, mask, min(causal_blocks, length))
    return _attention_block(query, key, value, mask)
  query_blocks = _split_queries(query, 1, query_chunk_size, 0)  # [n, B, c, H, D]
  if mask is None:
    out = jax.lax.map(jax.checkpoint(lambda q: _attention_block(q, key, value, None)),
                      query_blocks)
  else:
    mask = jnp.broadcast_to(mask, mask.shape[:2] + (length, key.shape[1]))
    # Padded query rows attend everywhere (no empty softmax); they are dropped.
    mask_blocks = _split_queries(mask, 2, query_chunk_size, True)  # [n, B, 1, c, S]
    out = jax.lax.map(jax.checkpoint(lambda qm: _attention_block(qm[0], key, value, qm[1])),
                      (query_blocks, mask_blocks))
  out = jnp.moveaxis(out, 0, 1)  # [B, n, c, H, D]
  return out.reshape((out.shape[0], -1) + out.shape[3:])[:, :length]


FUSED_LENGTH_MULTIPLE = 64  # Query / key lengths fused_attention pads to.


def fused_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                    mask: jax.Array | None, is_causal: bool,
                    implementation: str = "cudnn") -> jax.Array:
  """The same attention as dot_product_attention, by jax.nn.dot_product_attention.

  Shapes as in dot_product_attention. is_causal says the mask (if any) is
  already lower-triangular, so the kernel may skip the upper half. Lengths
  are padded to a multiple of FUSED_LENGTH_MULTIPLE (cuDNN's flash kernel
  refuses e.g. a ViT's 257 tokens); padded keys are masked out and padded
  queries dropped. With implementation="xla" this is JAX's reference, which
  the tests use to check the call on any machine.
  """
  if implementation == "cudnn":
    if jax.default_backend() != "gpu":
      raise ValueError(f"attention_implementation='cudnn' needs an NVIDIA GPU, but JAX's backend "
                       f"is {jax.default_backend()!r}; set attention_implementation='xla'.")
    if query.dtype not in (jnp.bfloat16, jnp.float16):
      raise ValueError(f"attention_implementation='cudnn' needs bfloat16 or float16 activations, "
                       f"got {query.dtype}; set config.model.dtype='bfloat16' or use 'xla'.")
  batch, length, num_keys = query.shape[0], query.shape[1], key.shape[1]
  pad_queries = -length % FUSED_LENGTH_MULTIPLE
  pad_keys = -num_keys % FUSED_LENGTH_MULTIPLE
  query = jnp.pad(query, ((0, 0), (0, pad_queries), (0, 0), (0, 0)))
  key, value = (jnp.pad(x, ((0, 0), (0, pad_keys), (0, 0), (0, 0))) for x in (key, value))
  query_lengths = key_lengths = None
  if mask is not None:
    mask = jnp.broadcast_to(mask, (batch, 1, length, num_keys))
    # Padded queries see every real key (no empty softmax row); no query sees a padded key.
    mask = jnp.pad(mask, ((0, 0), (0, 0), (0, pad_queries), (0, 0)), constant_values=True)
    mask = jnp.pad(mask, ((0, 0), (0, 0), (0, 0), (0, pad_keys)), constant_values=False)
  elif pad_queries or pad_keys:
    query_lengths = jnp.full((batch,), length, jnp.int32)
    key_lengths = jnp.full((batch,), num_keys, jnp.int32)
  out = jax.nn.dot_product_attention(query, key, value, mask=mask, is_causal=is_causal,
                                     query_seq_lengths=query_lengths,
                                     key_value_seq_lengths=key_lengths,
                                     implementation=implementation)
  return out[:, :length]


# Logical axes of one layer's KV cache [B, S, KV, D] (rules in mm1_jax/sharding.py).
CACHE_AXES = ("cache_batch", "cache_sequence", "cache_kv_heads", "cache_head_dim")


class KVCache(NamedTuple):
  """Rotated keys and values of one attention layer, one cache slot per position.

  key, value: [B, S, KV, D]. Slot s of row b holds the token at position s
  of that row (positions start at 0 per row), so a row's valid slots are
  exactly those below its next position.
  """
  key: jax.Array
  value: jax.Array


def write_kv_cache(cache: KVCache, key: jax.Array, value: jax.Array,
                   start: jax.Array) -> KVCache:
  """Writes T new keys/values into slots [start_b, start_b + T) of each row.

  cache: [B, S, KV, D]; key, value: [B, T, KV, D]; start: int [B] with
  start_b + T <= S. Built from elementwise selects (and, for T > 1, a
  gather along T) rather than a scatter, so it shards like the cache.
  """
  num_slots, length = cache.key.shape[1], key.shape[1]
  offset = jnp.arange(num_slots)[None, :] - start[:, None]  # [B, S]: index into the T new tokens.
  hit = ((offset >= 0) & (offset < length))[:, :, None, None]

  def one(old: jax.Array, new: jax.Array) -> jax.Array:
    if length == 1:  # A decode step: broadcast the one new token over the slots.
      spread = jnp.broadcast_to(new, old.shape)
    else:
      index = jnp.clip(offset, 0, length - 1)[:, :, None, None]
      spread = jnp.take_along_axis(new, index, axis=1, mode="clip")
    return constrain(jnp.where(hit, spread.astype(old.dtype), old), CACHE_AXES)

  return KVCache(one(cache.key, key), one(cache.value, value))


class Attention(nn.Module):
  """Multi-head (optionally grouped-query, optionally rotary) self-attention.

  x: [B, T, width] -> [B, T, width]. With a `cache` (decoding), the new
  keys/values are written at the slots of their positions (positions must
  then be consecutive per row: positions[:, 0] is where the T tokens go),
  attention runs over all S cache slots under `mask` [B, 1, T, S], and the
  call returns (output, updated cache).

  causal: the mask given when training is causal (the decoder's); lets the
  fused kernel skip the upper triangle. implementation: "xla"
  (dot_product_attention) or "cudnn" (fused_attention); decoding with a cache always uses "xla".
  """
  num_heads: int
  num_kv_heads: int
  head_dim: int
  qkv_bias: bool = False
  out_bias: bool = False
  rope_theta: float | None = None
  query_chunk_size: int = 0  # See dot_product_attention.
  causal: bool = False
  # With causal: query blocks of the training pass (see dot_product_attention).
  causal_blocks: int = 1
  implementation: str = "xla"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  lora: LoraScope | None = None  # Adapters on the targeted projections.

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None,
               positions: jax.Array | None = None, cache: KVCache | None = None
               ) -> jax.Array | tuple[jax.Array, KVCache]:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, lora=self.lora)
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
    if cache is not None:
      cache = write_kv_cache(cache, key, value, positions[:, 0])
      key, value = cache.key, cache.value
    if self.implementation == "cudnn" and cache is None:
      out = fused_attention(query, key, value, mask, self.causal)
    else:
      # Decoding (a cache) attends over cache slots, not a square causal mask.
      causal_blocks = self.causal_blocks if self.causal and cache is None else 1
      out = dot_product_attention(query, key, value, mask, self.query_chunk_size, causal_blocks)
    out = dense(width, ("heads", "head_dim", "embed"), name="out", axis=(-2, -1),
                use_bias=self.out_bias, **kw)(out)
    return out if cache is None else (out, cache)


class GatedMlp(nn.Module):
  """SwiGLU feed-forward: down(silu(gate(x)) * up(x)). x: [B, T, D]."""
  mlp_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  lora: LoraScope | None = None  # Adapters on the targeted projections.

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, lora=self.lora)
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
  lora: LoraScope | None = None  # Adapters on the targeted projections.

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=True, lora=self.lora)
    hidden = activation(self.activation)(dense(self.mlp_dim, ("embed", "mlp"), name="fc1", **kw)(x))
    return dense(self.out_dim or x.shape[-1], ("mlp", "embed"), name="fc2", **kw)(hidden)
