"""Llama-style decoder-only LLM, dense or mixture-of-experts.

RMSNorm, RoPE, grouped-query attention, SwiGLU. Attention is causal within a
packed segment (segment ids) and uses explicit positions, so packed
sequences behave like separate ones. The layer stack is one nn.scan over
blocks of `layers_per_block` layers (1 for dense; moe_every for MoE, the last
layer of each block carrying the MoE FFN), so compile time does not grow
with depth.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mm1_jax.models import layers
from mm1_jax.models.config import DecoderConfig, MoeConfig
from mm1_jax.models.moe import MoeFeedForward
from mm1_jax.sharding import constrain

AUX_KEYS = ("balance_loss", "router_z_loss", "dropped_fraction")
RESIDUAL_AXES = ("activation_batch", "activation_length", "activation_embed")


class DecoderLayer(nn.Module):
  """Pre-norm attention + FFN. x: [B, T, D] -> ([B, T, D], aux scalars)."""
  config: DecoderConfig
  use_moe: bool = False
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, positions, mask, token_mask):
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = layers.RMSNorm(c.norm_eps, self.param_dtype, name="attn_norm")(x)
    h = layers.Attention(num_heads=c.num_heads, num_kv_heads=c.num_kv_heads,
                         head_dim=c.resolved_head_dim, qkv_bias=c.qkv_bias,
                         rope_theta=c.rope_theta, name="attn", **kw)(h, mask, positions)
    x = constrain(x + h, RESIDUAL_AXES)
    h = layers.RMSNorm(c.norm_eps, self.param_dtype, name="mlp_norm")(x)
    if self.use_moe:
      h, aux = MoeFeedForward(c, name="moe", **kw)(h, token_mask)
    else:
      h = layers.GatedMlp(c.mlp_dim, name="mlp", **kw)(h)
      aux = {key: jnp.zeros((), jnp.float32) for key in AUX_KEYS}
    return constrain(x + h, RESIDUAL_AXES), aux


class DecoderBlock(nn.Module):
  """`layers_per_block` consecutive layers: the unit that nn.scan repeats.

  Returns (x, aux) with aux the MoE statistics of this block's MoE layer
  (zeros for a dense model).
  """
  config: DecoderConfig
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, positions, mask, token_mask):
    c = self.config
    num_layers = c.layers_per_block
    aux = None
    for i in range(num_layers):
      use_moe = c.moe.enabled and i == num_layers - 1
      x, layer_aux = DecoderLayer(c, use_moe, self.dtype, self.param_dtype,
                                  name=f"layer_{i}")(x, positions, mask, token_mask)
      aux = layer_aux if use_moe or aux is None else aux
    return x, aux


class Decoder(nn.Module):
  """The LLM. Embeds tokens, or takes embeddings spliced by the caller.

  Returns logits [B, T, vocab] (float32) and the MoE aux statistics
  (scalars, averaged over the MoE layers; zeros for a dense model).
  """
  config: DecoderConfig
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  def setup(self):
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.embedder = nn.Embed(
        c.vocab_size, c.width, dtype=layers.as_dtype(self.dtype),
        param_dtype=layers.as_dtype(self.param_dtype),
        embedding_init=nn.with_logical_partitioning(
            nn.initializers.normal(stddev=c.width**-0.5), ("vocab", "embed")))
    block = layers.maybe_remat(DecoderBlock, c.remat_policy)
    scanned = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                      in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
                      length=c.num_blocks, metadata_params={nn.PARTITION_NAME: "layers"})
    self.blocks = scanned(c, **kw)
    self.final_norm = layers.RMSNorm(c.norm_eps, self.param_dtype)
    if not c.tie_embeddings:
      self.lm_head = layers.dense(c.vocab_size, ("embed", "vocab"), **kw)

  def embed(self, tokens: jax.Array) -> jax.Array:
    """tokens: int [B, T] -> [B, T, D]."""
    return self.embedder(tokens)

  def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None, embeddings: jax.Array | None = None
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """tokens, positions, segment_ids: int [B, T] (segment 0 = padding).

    positions default to 0..T-1 and segment_ids to one segment. `embeddings`
    [B, T, D], when given, replaces the token embeddings (the multimodal
    model passes text embeddings with image embeddings spliced in).
    """
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    if segment_ids is None:
      segment_ids = jnp.ones_like(tokens)
    if embeddings is None:
      embeddings = self.embed(tokens)
    x = constrain(embeddings.astype(layers.as_dtype(self.dtype)), RESIDUAL_AXES)
    mask = layers.segment_causal_mask(segment_ids)
    token_mask = segment_ids != 0
    x, block_aux = self.blocks(x, positions, mask, token_mask)
    x = self.final_norm(x)
    logits = self.embedder.attend(x) if self.config.tie_embeddings else self.lm_head(x)
    logits = constrain(logits.astype(jnp.float32),
                       ("activation_batch", "activation_length", "activation_vocab"))
    aux = {key: jnp.mean(value) for key, value in block_aux.items()}
    return logits, aux


def moe_aux_loss(aux: dict[str, jax.Array], moe: MoeConfig) -> jax.Array:
  """The weighted MoE loss added to cross-entropy (0 for a dense model)."""
  if not moe.enabled:
    return jnp.zeros((), jnp.float32)
  return moe.balance_loss_weight * aux["balance_loss"] + moe.router_z_loss_weight * aux["router_z_loss"]

