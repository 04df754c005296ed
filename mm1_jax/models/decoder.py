"""Llama-style decoder-only LLM, dense or mixture-of-experts.

RMSNorm, RoPE, grouped-query attention, SwiGLU. Attention is causal within a
packed segment (segment ids) and uses explicit positions, so packed
sequences behave like separate ones. The layer stack is one nn.scan over
blocks of `layers_per_block` layers (1 for dense; moe_every for MoE, the last
layer of each block carrying the MoE FFN), so compile time does not grow
with depth.

Decoding (`extend`) passes a fixed-size KV cache (init_cache) through the
same scan: block i reads and returns slice i of the stacked cache. Training
passes None there, which adds nothing to its program.

LoRA: with an enabled `lora` config, every linear whose module path
("llm/blocks/layer_0/attn/query", "llm/lm_head", ...) it targets carries
adapters (layers.DenseGeneral, moe.MoeFeedForward), stacked over the scanned
blocks like the other parameters.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mm1_jax.models import layers
from mm1_jax.models.config import DecoderConfig, LoraConfig, MoeConfig
from mm1_jax.models.moe import MOE_METRICS, MoeFeedForward
from mm1_jax.sharding import constrain

# Of the stacked cache arrays [num_blocks, B, S, KV, head_dim] (see init_cache).
CACHE_AXES = ("layers",) + layers.CACHE_AXES


class DecoderLayer(nn.Module):
  """Pre-norm attention + FFN. x: [B, T, D] -> ([B, T, D], aux scalars, cache).

  cache: this layer's KVCache when decoding (then mask is [B, 1, T, S] over
  the cache slots), else None; the updated cache (or None) is returned.
  """
  config: DecoderConfig
  use_moe: bool = False
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32
  lora: layers.LoraScope | None = None

  @nn.compact
  def __call__(self, x, positions, mask, token_mask, cache=None):
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, lora=self.lora)
    h = layers.RMSNorm(c.norm_eps, self.param_dtype, name="attn_norm")(x)
    h = layers.Attention(num_heads=c.num_heads, num_kv_heads=c.num_kv_heads,
                         head_dim=c.resolved_head_dim, qkv_bias=c.qkv_bias,
                         rope_theta=c.rope_theta, query_chunk_size=c.attention_query_chunk,
                         causal=True, causal_blocks=c.attention_causal_blocks,
                         implementation=c.attention_implementation,
                         name="attn", **kw)(h, mask, positions, cache)
    if cache is not None:
      h, cache = h
    x = constrain(x + h, layers.RESIDUAL_AXES)
    h = layers.RMSNorm(c.norm_eps, self.param_dtype, name="mlp_norm")(x)
    if self.use_moe:
      h, aux = MoeFeedForward(c, name="moe", **kw)(h, token_mask)
    else:
      h = layers.GatedMlp(c.mlp_dim, name="mlp", **kw)(h)
      aux = {key: jnp.zeros((), jnp.float32) for key in MOE_METRICS}
    return constrain(x + h, layers.RESIDUAL_AXES), aux, cache


class DecoderBlock(nn.Module):
  """`layers_per_block` consecutive layers: the unit that nn.scan repeats.

  Returns (x, (aux, cache)) with aux the MoE statistics of this block's MoE
  layer (zeros for a dense model) and cache {"layer_i": KVCache} updated
  (None when not decoding). x is the scan's carry, (aux, cache) its
  per-block output.
  """
  config: DecoderConfig
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32
  lora: layers.LoraScope | None = None

  @nn.compact
  def __call__(self, x, positions, mask, token_mask, cache=None):
    c = self.config
    num_layers = c.layers_per_block
    aux = None
    new_cache = None if cache is None else {}
    for i in range(num_layers):
      use_moe = c.moe.enabled and i == num_layers - 1
      name = f"layer_{i}"
      x, layer_aux, layer_cache = DecoderLayer(c, use_moe, self.dtype, self.param_dtype,
                                               self.lora, name=name)(
          x, positions, mask, token_mask, None if cache is None else cache[name])
      if cache is not None:
        new_cache[name] = layer_cache
      aux = layer_aux if use_moe or aux is None else aux
    return x, (aux, new_cache)


def init_cache(config: DecoderConfig, batch_size: int, max_length: int,
               dtype: layers.Dtype = jnp.float32) -> dict[str, layers.KVCache]:
  """An empty (zero) KV cache of `max_length` slots for every layer.

  Returns {"layer_i": KVCache} for i < layers_per_block, each key/value
  [num_blocks, B, S, KV, head_dim]: stacked over the scanned blocks like the
  parameters. Logical axes: CACHE_AXES.
  """
  shape = (config.num_blocks, batch_size, max_length, config.num_kv_heads,
           config.resolved_head_dim)
  zeros = lambda: constrain(jnp.zeros(shape, layers.as_dtype(dtype)), CACHE_AXES)
  return {f"layer_{i}": layers.KVCache(zeros(), zeros())
          for i in range(config.layers_per_block)}


def cache_attention_mask(positions: jax.Array, num_slots: int) -> jax.Array:
  """Which cache slots the new tokens see: bool [B, 1, T, S].

  positions: int [B, T]. Slot s holds position s of the row (see
  layers.KVCache), so causal attention over the row's past is s <= position.
  """
  return jnp.arange(num_slots)[None, None, None, :] <= positions[:, None, :, None]


class Decoder(nn.Module):
  """The LLM. Embeds tokens, or takes embeddings spliced by the caller.

  Returns logits [B, T, vocab] (float32) and the MoE aux statistics
  (scalars, averaged over the MoE layers; zeros for a dense model).
  `extend` and `logits` are the KV-cached decoding path.

  lora: adapters on the linears it targets (None or rank 0: none). Module
  paths start with "llm", the decoder's part of MM1Model, also when the
  decoder runs alone.
  """
  config: DecoderConfig
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32
  lora: LoraConfig | None = None

  def setup(self):
    c = self.config
    lora = (layers.LoraScope(self.lora, "llm", tuple(self.path))
            if self.lora is not None and self.lora.enabled else None)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.embedder = nn.Embed(
        c.vocab_size, c.width, dtype=layers.as_dtype(self.dtype),
        param_dtype=layers.as_dtype(self.param_dtype),
        embedding_init=nn.with_logical_partitioning(
            nn.initializers.normal(stddev=c.width**-0.5), ("vocab", "embed")))
    block = layers.maybe_remat(DecoderBlock, c.remat_policy)
    # The cache (None when training) is scanned over like the parameters:
    # block i reads and writes slice i of the stacked cache.
    # Each block draws its own (LoRA) dropout masks.
    scanned = nn.scan(block, variable_axes={"params": 0},
                      split_rngs={"params": True, "dropout": True},
                      in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0),
                      length=c.num_blocks, unroll=min(c.scan_unroll, c.num_blocks),
                      metadata_params={nn.PARTITION_NAME: "layers"})
    self.blocks = scanned(c, lora=lora, **kw)
    self.final_norm = layers.RMSNorm(c.norm_eps, self.param_dtype)
    if not c.tie_embeddings:
      self.lm_head = layers.dense(c.vocab_size, ("embed", "vocab"), lora=lora, **kw)

  def embed(self, tokens: jax.Array) -> jax.Array:
    """tokens: int [B, T] -> [B, T, D]."""
    return self.embedder(tokens)

  def logits(self, x: jax.Array) -> jax.Array:
    """Final norm and vocabulary projection: x [..., D] -> float32 [..., vocab]."""
    x = self.final_norm(x)
    logits = self.embedder.attend(x) if self.config.tie_embeddings else self.lm_head(x)
    return logits.astype(jnp.float32)

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
    x = constrain(embeddings.astype(layers.as_dtype(self.dtype)), layers.RESIDUAL_AXES)
    mask = layers.segment_causal_mask(segment_ids)
    token_mask = segment_ids != 0
    x, (block_aux, _) = self.blocks(x, positions, mask, token_mask, None)
    logits = constrain(self.logits(x),
                       ("activation_batch", "activation_length", "activation_vocab"))
    aux = {key: jnp.mean(value) for key, value in block_aux.items()}
    return logits, aux

  def extend(self, embeddings: jax.Array, positions: jax.Array, token_mask: jax.Array,
             cache: dict[str, layers.KVCache]) -> tuple[jax.Array, dict[str, layers.KVCache]]:
    """Runs T new tokens of each row through the stack against the KV cache.

    embeddings: [B, T, D]; positions: int [B, T], consecutive per row (the
    new tokens go to cache slots positions[:, 0] ... + T - 1 and see the
    slots up to their own position); token_mask: bool [B, T], False for
    padding (kept out of MoE routing); cache: from init_cache, S slots.
    Returns the final hidden states [B, T, D] (before the final norm; see
    `logits`) and the updated cache.
    """
    x = constrain(embeddings.astype(layers.as_dtype(self.dtype)), layers.RESIDUAL_AXES)
    mask = cache_attention_mask(positions, cache["layer_0"].key.shape[2])
    x, (_, cache) = self.blocks(x, positions, mask, token_mask, cache)
    return x, cache


def moe_aux_loss(aux: dict[str, jax.Array], moe: MoeConfig) -> jax.Array:
  """The weighted MoE loss added to cross-entropy (0 for a dense model)."""
  if not moe.enabled:
    return jnp.zeros((), jnp.float32)
  return moe.balance_loss_weight * aux["balance_loss"] + moe.router_z_loss_weight * aux["router_z_loss"]

