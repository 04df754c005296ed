"""The MM1 model: ViT -> connector -> image tokens spliced into the LLM.

Text tokens carry, for each image, a run of `num_image_tokens` placeholder
ids. The model encodes the image slots, maps them through the connector, and
writes the k-th image's embeddings into the k-th placeholder run of its row
(order of appearance), then runs the decoder over the mixed sequence.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from mm1_jax.data.batch import check_image_placeholders
from mm1_jax.models import layers
from mm1_jax.models import lora as lora_lib
from mm1_jax.models.config import MM1Config
from mm1_jax.models.connectors import build_connector
from mm1_jax.models.decoder import Decoder, moe_aux_loss
from mm1_jax.models.vit import VisionTransformer, normalize_images
from mm1_jax.sharding import constrain


def splice_image_embeddings(text_embeddings: jax.Array, tokens: jax.Array,
                            image_embeddings: jax.Array, placeholder_id: int) -> jax.Array:
  """Writes image embeddings over the placeholder positions, in order.

  text_embeddings: [B, T, D]; tokens: int [B, T];
  image_embeddings: [B, max_images, M, D]. The j-th placeholder of a row
  takes token j % M of image j // M. Returns [B, T, D].
  """
  batch, num_images, num_image_tokens, width = image_embeddings.shape
  is_placeholder = tokens == placeholder_id
  rank = jnp.cumsum(is_placeholder, axis=1) - 1
  rank = jnp.clip(rank, 0, num_images * num_image_tokens - 1)
  flat = image_embeddings.reshape(batch, num_images * num_image_tokens, width)
  gathered = jnp.take_along_axis(flat, rank[..., None], axis=1)
  return jnp.where(is_placeholder[..., None], gathered.astype(text_embeddings.dtype),
                   text_embeddings)


def _frozen(module_cls, methods=("__call__",)):
  """The module class with stop_gradient on its base parameters (a frozen
  tower): no weight gradient is computed for them. LoRA adapters in it
  (lora.is_adapter) keep their gradients."""
  return nn.map_variables(module_cls, "params", trans_in_fn=lora_lib.stop_base_gradients,
                          init=True, methods=list(methods))


class MM1Model(nn.Module):
  """Multimodal decoder.

  __call__ inputs:
    tokens: int [B, T] with placeholder runs for the images;
    images: uint8 [B, max_images, H, W, 3], normalised on device;
    image_mask: bool [B, max_images], True for real image slots (a prefix);
    positions, segment_ids: int [B, T] (optional; for packed sequences).
  Returns (logits float32 [B, T, vocab], aux) where aux holds the MoE
  statistics and 'moe_loss', their weighted sum to add to the loss.

  With config.lora enabled the targeted linears (of the LLM by default; the
  encoder's and the connector's when targeted) carry adapters; LoRA dropout
  is active when the caller passes a 'dropout' rng (the train step does).

  Decoding with a KV cache (mm1_jax/evaluation/decoding.py drives these):
  `prefill` runs right-padded prompts into a cache from decoder.init_cache,
  `decode_step` appends one token per row.
  """
  config: MM1Config

  def setup(self):
    c = self.config
    kw = dict(dtype=c.dtype, param_dtype=c.param_dtype)
    # A frozen tower computes no weight gradients but its adapters' (the
    # trainer freezes every tower that holds adapters: Experiment.trained_model).
    encoder_cls = _frozen(VisionTransformer) if c.freeze_encoder else VisionTransformer
    self.encoder = encoder_cls(c.encoder, lora=c.lora, **kw)
    self.connector = build_connector(c.connector, c.llm.width, lora=c.lora, **kw)
    llm_cls = (_frozen(Decoder, ("__call__", "embed", "extend", "logits"))
               if c.freeze_llm else Decoder)
    self.llm = llm_cls(c.llm, lora=c.lora, **kw)

  def encode_images(self, images: jax.Array, image_mask: jax.Array) -> jax.Array:
    """images: uint8 [B, N, H, W, 3] -> image embeddings [B, N, M, D_llm].

    Every slot is encoded (static shapes); padding slots are zeroed.
    """
    batch, num_images = images.shape[:2]
    flat = normalize_images(images.reshape((batch * num_images,) + images.shape[2:]),
                            self.config.encoder).astype(layers.as_dtype(self.config.dtype))
    features = self.connector(self.encoder(flat))
    features = features.reshape((batch, num_images) + features.shape[1:])
    features = features * image_mask[:, :, None, None].astype(features.dtype)
    return constrain(features, ("activation_batch", None, "activation_length", "activation_embed"))

  def __call__(self, tokens: jax.Array, images: jax.Array, image_mask: jax.Array,
               positions: jax.Array | None = None, segment_ids: jax.Array | None = None
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    c = self.config
    if not isinstance(tokens, jax.core.Tracer) and not isinstance(image_mask, jax.core.Tracer):
      # Eager calls are checked here; jitted steps check the host batch first.
      check_image_placeholders(tokens, image_mask, c.num_image_tokens, c.image_placeholder_id)
    image_embeddings = self.encode_images(images, image_mask)
    embeddings = splice_image_embeddings(self.llm.embed(tokens), tokens, image_embeddings,
                                         c.image_placeholder_id)
    logits, aux = self.llm(tokens, positions, segment_ids, embeddings=embeddings)
    return logits, {**aux, "moe_loss": moe_aux_loss(aux, c.llm.moe)}

  def prefill(self, tokens: jax.Array, images: jax.Array, image_mask: jax.Array,
              lengths: jax.Array, cache: dict[str, Any]) -> tuple[jax.Array, dict[str, Any]]:
    """Runs a batch of prompts into an empty KV cache.

    tokens: int [B, T], each prompt right-padded (row b's prompt is
    tokens[b, :lengths[b]], placeholder runs included; padding after it);
    images, image_mask: as for __call__; lengths: int [B], 1 <= lengths <= T;
    cache: decoder.init_cache(..., max_length=S >= T).
    Returns the logits of each row's last prompt token, float32 [B, vocab]
    (they predict the first new token), and the cache with slots 0..T-1
    written. Slots from lengths[b] on hold padding that decode_step
    overwrites before any token can see it.
    """
    c = self.config
    image_embeddings = self.encode_images(images, image_mask)
    embeddings = splice_image_embeddings(self.llm.embed(tokens), tokens, image_embeddings,
                                         c.image_placeholder_id)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    token_mask = positions < lengths[:, None]
    hidden, cache = self.llm.extend(embeddings, positions, token_mask, cache)
    last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)[:, 0]
    return self.llm.logits(last), cache

  def decode_step(self, tokens: jax.Array, positions: jax.Array, cache: dict[str, Any]
                  ) -> tuple[jax.Array, dict[str, Any]]:
    """Appends one text token per row to the cache.

    tokens: int [B], the tokens just chosen; positions: int [B], their
    positions (row b's prompt length + tokens generated before this one);
    cache: as returned by prefill / decode_step. Returns the logits that
    predict the next token, float32 [B, vocab], and the updated cache.
    """
    embeddings = self.llm.embed(tokens[:, None])
    hidden, cache = self.llm.extend(embeddings, positions[:, None],
                                    jnp.ones(tokens.shape + (1,), bool), cache)
    return self.llm.logits(hidden[:, 0]), cache
