"""Mixture-of-experts feed-forward layer (MM1-MoE / Mixtral style).

A float32 router picks the top-k of E SwiGLU experts for every token, exactly
as Hugging Face's MixtralSparseMoeBlock does: softmax over all experts, top-k,
the k weights renormalised to sum to 1. Two dispatch implementations give the
same result when nothing is dropped:

- "capacity": GShard-style one-hot dispatch/combine einsums with a fixed
  per-expert capacity per batch row. Static shapes, shards well over an
  "expert" mesh axis, but drops assignments beyond the capacity.
- "dropless": sort the token-expert assignments by expert and run grouped
  matmuls (jax.lax.ragged_dot). Nothing is dropped.

The layer also returns the auxiliary losses (unweighted; the coefficients
live in MoeConfig and are applied by the caller), computed over real tokens
only:
- balance_loss = E * sum_i f_i * P_i (Switch / GShard), f_i the fraction of
  the k * n top-k assignments that went to expert i, P_i the mean router
  probability of expert i;
- router_z_loss = mean over tokens of logsumexp(logits)^2 (ST-MoE).

LoRA: an expert projection whose module path (".../moe/gate", "up", "down")
a LoraScope targets gets per-expert adapters {name}_lora_a [E, in, r] and
{name}_lora_b [E, r, out]; each expert's matmul then adds
scale * (dropout(x) A_e) B_e, in both dispatch implementations.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from mm1_jax.models import qlora
from mm1_jax.models.config import DecoderConfig
from mm1_jax.models.layers import (LORA_RANK_AXIS, RESIDUAL_AXES, Dtype, LoraScope, as_dtype,
                                   dense, lora_a_init, lora_dropout)
from mm1_jax.sharding import constrain

# The statistics in the aux of MoeFeedForward (and of the decoder, summed over
# its MoE layers); the train step reports them as metrics.
MOE_METRICS = ("balance_loss", "router_z_loss", "dropped_fraction")

# Per-expert fan-in init: the leading expert dim is a batch dim, not fan-in
# (the default init would count E * D as the fan-in of an [E, D, F] kernel).
EXPERT_KERNEL_INIT = nn.initializers.variance_scaling(
    1.0, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1, batch_axis=(0,))

# Expert activations laid out [E, B, C, ...]: the expert dim comes first so
# that it claims the "expert" mesh axis (a mesh axis is used once per array,
# in name order) and the batch takes the remaining data axes; the change of
# layout between the token-sharded input and these is GShard's all-to-all.
_EXPERT_ACT = ("activation_expert", "activation_batch", "activation_capacity")


class ExpertLinear(NamedTuple):
  """One projection of all E experts: kernel [E, in, out], and its adapters
  lora_a [E, in, r], lora_b [E, r, out] (None when not targeted).

  dropout: the adapters' input dropout (identity outside training).
  """
  kernel: jax.Array | qlora.Nf4Kernel  # NF4 (QLoRA): dequantised inside each product.
  lora_a: jax.Array | None = None
  lora_b: jax.Array | None = None
  scale: float = 1.0
  dropout: Callable[[jax.Array], jax.Array] = lambda x: x

  def __call__(self, x: jax.Array, matmul: Callable[[jax.Array, jax.Array], jax.Array]
               ) -> jax.Array:
    """x @ kernel per expert, plus the low-rank update. matmul(lhs, rhs) is
    the dispatch's per-expert product of lhs [..., in] and rhs [E, in, out]."""
    if isinstance(self.kernel, qlora.Nf4Kernel):
      y = self.kernel.matmul(matmul, x)
    else:
      y = matmul(x, self.kernel)
    if self.lora_a is None:
      return y
    update = matmul(matmul(self.dropout(x), self.lora_a), self.lora_b)
    return y + update * jnp.asarray(self.scale, y.dtype)


def capacity(config: DecoderConfig, group_size: int) -> int:
  """Slots per expert per group: ceil(k * T * capacity_factor / E), in [1, T].

  More than T slots can never fill (a token picks an expert at most once).
  """
  moe = config.moe
  slots = math.ceil(moe.num_experts_per_token * group_size * moe.capacity_factor
                    / moe.num_experts)
  return max(1, min(slots, group_size))


class MoeFeedForward(nn.Module):
  """Top-k routed SwiGLU experts. x: [B, T, D] -> ([B, T, D], aux).

  token_mask: bool [B, T], False for padding, which takes no expert capacity,
  is left out of the losses and gets output 0. None = all tokens are real.
  aux: float32 scalars 'balance_loss', 'router_z_loss', 'dropped_fraction'
  (the fraction of real tokens' top-k assignments dropped for lack of
  capacity; always 0 for dropless dispatch).
  """
  config: DecoderConfig
  dtype: Dtype = "float32"
  param_dtype: Dtype = "float32"
  lora: LoraScope | None = None  # Adapters on the targeted router / expert projections.

  @nn.compact
  def __call__(self, x: jax.Array, token_mask: jax.Array | None = None
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    moe = self.config.moe
    num_experts, top_k = moe.num_experts, moe.num_experts_per_token
    width, mlp_dim = self.config.width, self.config.expert_mlp_dim
    dtype, param_dtype = as_dtype(self.dtype), as_dtype(self.param_dtype)
    batch, length, _ = x.shape
    if token_mask is None:
      token_mask = jnp.ones((batch, length), dtype=bool)

    # Router in float32 whatever the compute dtype: near-ties between experts
    # flip under bf16 rounding, and the z-loss needs accurate logits.
    logits = dense(num_experts, ("embed", "expert"), name="router",
                   dtype=jnp.float32, param_dtype=param_dtype,
                   lora=self.lora)(x.astype(jnp.float32))
    probs = jax.nn.softmax(logits, axis=-1)  # [B, T, E]
    top_weights, top_experts = jax.lax.top_k(probs, top_k)  # [B, T, k]
    top_weights = top_weights / jnp.sum(top_weights, axis=-1, keepdims=True)

    def expert_linear(name, in_dim, out_dim, axes) -> ExpertLinear:
      if self.lora is not None and self.lora.quantizes(self.path + (name,)):  # QLoRA.
        kernel = qlora.nf4_kernel(self, name, (num_experts,), (in_dim,), (out_dim,), axes,
                                  self.lora.config, dtype,
                                  self.lora.module_path(self.path + (name,)))
      else:
        kernel = self.param(name, nn.with_logical_partitioning(EXPERT_KERNEL_INIT, axes),
                            (num_experts, in_dim, out_dim), param_dtype).astype(dtype)
      if self.lora is None or not self.lora.targets(self.path + (name,)):
        return ExpertLinear(kernel)
      c = self.lora.config
      lora_a = self.param(f"{name}_lora_a", nn.with_logical_partitioning(
          lora_a_init(-2, batch_axis=(0,)), axes[:2] + (LORA_RANK_AXIS,)),
                          (num_experts, in_dim, c.rank), param_dtype)
      lora_b = self.param(f"{name}_lora_b", nn.with_logical_partitioning(
          nn.initializers.zeros, (axes[0], LORA_RANK_AXIS, axes[2])),
                          (num_experts, c.rank, out_dim), param_dtype)
      return ExpertLinear(kernel, lora_a.astype(dtype), lora_b.astype(dtype), c.scale,
                          lambda h: lora_dropout(self, h, c.dropout))

    gate = expert_linear("gate", width, mlp_dim, ("expert", "embed", "mlp"))
    up = expert_linear("up", width, mlp_dim, ("expert", "embed", "mlp"))
    down = expert_linear("down", mlp_dim, width, ("expert", "mlp", "embed"))

    aux = _router_losses(logits, probs, top_experts, token_mask)
    x = x.astype(dtype)
    if moe.dispatch == "capacity":
      y, dropped_fraction = _capacity_dispatch(
          x, top_experts, top_weights, token_mask, gate, up, down,
          capacity(self.config, length))
    elif moe.dispatch == "dropless":
      y = _dropless_dispatch(x, top_experts, top_weights, token_mask, gate, up, down)
      dropped_fraction = jnp.zeros((), jnp.float32)
    else:
      raise ValueError(f"unknown moe.dispatch {moe.dispatch!r}")
    aux["dropped_fraction"] = dropped_fraction
    return y.astype(dtype), aux


def _router_losses(logits: jax.Array, probs: jax.Array, top_experts: jax.Array,
                   token_mask: jax.Array) -> dict[str, jax.Array]:
  """Balance and z losses over real tokens. logits, probs: [B, T, E] float32;
  top_experts: int [B, T, k]; token_mask: bool [B, T]."""
  num_experts, top_k = logits.shape[-1], top_experts.shape[-1]
  mask = token_mask.astype(jnp.float32)[..., None]  # [B, T, 1]
  num_real = jnp.maximum(jnp.sum(mask), 1.0)  # An all-padding batch gives 0, not NaN.
  # f_i: share of the k * n assignments (no gradient: top-k is discrete).
  counts = jnp.sum(jax.nn.one_hot(top_experts, num_experts, dtype=jnp.float32), axis=-2)
  f = jnp.sum(counts * mask, axis=(0, 1)) / (num_real * top_k)
  p = jnp.sum(probs * mask, axis=(0, 1)) / num_real
  balance = num_experts * jnp.sum(f * p)
  z = jax.nn.logsumexp(logits, axis=-1)[..., None]
  z_loss = jnp.sum(z * z * mask) / num_real
  return {"balance_loss": balance, "router_z_loss": z_loss}


def _per_expert_matmul(lhs: jax.Array, rhs: jax.Array) -> jax.Array:
  """lhs [E, B, C, in] @ rhs [E, in, out] -> [E, B, C, out]."""
  return jnp.einsum("ebci,eio->ebco", lhs, rhs)


def _expert_ffn(x: jax.Array, gate: ExpertLinear, up: ExpertLinear, down: ExpertLinear
                ) -> jax.Array:
  """SwiGLU per expert, batched by einsum. x: [E, B, C, D] -> [E, B, C, D]."""
  hidden = nn.silu(gate(x, _per_expert_matmul)) * up(x, _per_expert_matmul)
  hidden = constrain(hidden, _EXPERT_ACT + ("activation_mlp",))
  out = down(hidden, _per_expert_matmul)
  return constrain(out, _EXPERT_ACT + ("activation_embed",))


def _capacity_dispatch(x, top_experts, top_weights, token_mask, gate, up, down,
                       num_slots: int) -> tuple[jax.Array, jax.Array]:
  """GShard dispatch with `num_slots` (C) slots per expert per batch row.

  x: [B, T, D]; top_experts: int [B, T, k]; top_weights: float32 [B, T, k];
  token_mask: bool [B, T]; gate, up: ExpertLinear of kernels [E, D, F];
  down: of kernels [E, F, D].
  Returns y [B, T, D] and the dropped fraction (float32 scalar).
  """
  batch, length, top_k = top_experts.shape
  num_experts = gate.kernel.shape[0]
  # [B, k, T, E]: choice-major, so the cumsum below hands out slots to every
  # token's 1st choice before any 2nd choice (GShard's priority); padding
  # rows are all zero, so they take no slot.
  choice = jnp.swapaxes(jax.nn.one_hot(top_experts, num_experts, dtype=jnp.int32), 1, 2)
  choice = choice * token_mask.astype(jnp.int32)[:, None, :, None]
  flat = choice.reshape(batch, top_k * length, num_experts)
  position = (jnp.cumsum(flat, axis=1) - 1).reshape(choice.shape)  # Slot within expert.
  position = jnp.sum(position * choice, axis=-1)  # [B, k, T]: slot of the chosen expert.
  kept = choice * (position < num_slots)[..., None].astype(jnp.int32)  # [B, k, T, E]

  total = jnp.sum(choice).astype(jnp.float32)
  dropped_fraction = (total - jnp.sum(kept).astype(jnp.float32)) / jnp.maximum(total, 1.0)

  slot = jax.nn.one_hot(position, num_slots, dtype=jnp.float32)  # [B, k, T, C]
  kept = kept.astype(jnp.float32)
  # A token uses each expert at most once, so summing over choices never
  # puts two assignments of one token in one (expert, slot).
  dispatch = jnp.einsum("bkte,bktc->btec", kept, slot)  # [B, T, E, C] 0/1
  combine = jnp.einsum("bkte,bktc,btk->btec", kept, slot, top_weights)

  expert_in = jnp.einsum("btec,btd->ebcd", dispatch.astype(x.dtype), x)
  expert_in = constrain(expert_in, _EXPERT_ACT + ("activation_embed",))
  expert_out = _expert_ffn(expert_in, gate, up, down)
  # Combine in float32: the k weighted expert outputs are summed here.
  y = jnp.einsum("btec,ebcd->btd", combine, expert_out, preferred_element_type=jnp.float32)
  y = constrain(y, RESIDUAL_AXES)
  return y, dropped_fraction


def _dropless_dispatch(x, top_experts, top_weights, token_mask, gate, up, down) -> jax.Array:
  """Sort-by-expert dispatch with grouped matmuls; nothing is dropped.

  Shapes as in _capacity_dispatch. All B * T * k assignments are computed
  (static shapes); padding tokens get weight 0, hence output 0.
  """
  batch, length, top_k = top_experts.shape
  num_experts = gate.kernel.shape[0]
  num_tokens = batch * length
  tokens = x.reshape(num_tokens, x.shape[-1])
  experts = top_experts.reshape(num_tokens * top_k)
  weights = (top_weights * token_mask[..., None]).reshape(num_tokens, top_k)

  # Contiguous rows per expert, in expert order, as ragged_dot expects.
  order = jnp.argsort(experts, stable=True)
  sorted_tokens = tokens[order // top_k]  # [N * k, D]
  group_sizes = jnp.bincount(experts, length=num_experts).astype(jnp.int32)

  def grouped(lhs, rhs):
    return jax.lax.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=lhs.dtype)

  hidden = nn.silu(gate(sorted_tokens, grouped)) * up(sorted_tokens, grouped)
  sorted_out = down(hidden, grouped)  # [N * k, D]
  # Undo the sort with a gather (the inverse permutation), then a weighted sum
  # over the k choices; float32 for that sum.
  inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
  out = sorted_out[inverse].reshape(num_tokens, top_k, -1).astype(jnp.float32)
  y = jnp.einsum("nkd,nk->nd", out, weights)
  return y.reshape(batch, length, -1)
