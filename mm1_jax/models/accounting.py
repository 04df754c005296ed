"""Parameter counts, FLOPs and training-state memory of a config; nothing allocated.

Shapes come from jax.eval_shape of the model's init, so even the 30B config
is counted in seconds on a laptop. Used by the summary CLI (mm1_jax.summary),
the trainer (learning-rate law, MFU) and the benchmarks.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mm1_jax.models import qlora
from mm1_jax.models.config import MM1Config
from mm1_jax.models.multimodal import MM1Model

ADAM_STATE_COPIES = 2  # First and second moments, float32.


@dataclasses.dataclass(frozen=True)
class ParamCounts:
  encoder: int
  connector: int
  llm_embedding: int  # Token embedding and (untied) output head.
  llm_dense: int  # Non-embedding LLM parameters outside the experts.
  llm_experts: int  # All experts of all MoE layers.
  llm_active_experts: int  # The top-k experts a token actually uses.

  @property
  def llm(self) -> int:
    return self.llm_embedding + self.llm_dense + self.llm_experts

  @property
  def total(self) -> int:
    return self.encoder + self.connector + self.llm

  @property
  def llm_active(self) -> int:
    """LLM parameters touched per token (embedding counted once, as a lookup+head)."""
    return self.llm_embedding + self.llm_dense + self.llm_active_experts

  @property
  def non_embedding_llm(self) -> int:
    """The N of MM1's learning-rate law."""
    return self.llm_dense + self.llm_experts


def abstract_params(config: MM1Config) -> Any:
  """Unboxed ShapeDtypeStructs of the model's params."""
  enc = config.encoder
  tokens = jax.ShapeDtypeStruct((1, config.num_image_tokens), jnp.int32)
  images = jax.ShapeDtypeStruct((1, 1, enc.image_size, enc.image_size, 3), jnp.uint8)
  image_mask = jax.ShapeDtypeStruct((1, 1), jnp.bool_)
  variables = jax.eval_shape(MM1Model(config).init, jax.random.key(0), tokens, images, image_mask)
  return nn.unbox(variables)["params"]


def _names(path) -> list[str]:
  return [str(getattr(key, "key", key)) for key in path]


def _num_values(names: list[str], leaf) -> int:
  """Parameters a leaf holds: an NF4 weight's (QLoRA) are its codes, two per
  byte; its absmax and scales are not parameters."""
  if qlora.is_nf4(names):
    return 2 * math.prod(leaf.shape) if names[-1].endswith("_nf4_codes") else 0
  return math.prod(leaf.shape)


def _size(tree) -> int:
  return int(sum(_num_values(_names(path), leaf)
                 for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]))


def count_params(config: MM1Config, params: Any | None = None) -> ParamCounts:
  """Counts of `params` (default: abstract_params(config)) by part of the model."""
  params = abstract_params(config) if params is None else params
  llm = params["llm"]
  embedding = _size(llm["embedder"]) + _size(llm.get("lm_head", {}))
  experts = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(llm["blocks"])[0]:
    names = _names(path)
    weight = qlora.weight_name(names[-1]) if qlora.is_nf4(names) else names[-1]
    if "moe" in names and weight in ("gate", "up", "down"):
      experts += _num_values(names, leaf)
  moe = config.llm.moe
  active = experts * moe.num_experts_per_token // moe.num_experts if moe.enabled else 0
  return ParamCounts(
      encoder=_size(params["encoder"]), connector=_size(params["connector"]),
      llm_embedding=embedding, llm_dense=_size(llm) - embedding - experts,
      llm_experts=experts, llm_active_experts=active)


def llm_flops_per_token(config: MM1Config, counts: ParamCounts, seq_len: int) -> float:
  """Forward FLOPs per text token: 2 per active weight (the embedding lookup
  is free, the output head is not) plus causal attention scores and values."""
  llm = config.llm
  weights = counts.llm_dense + counts.llm_active_experts + llm.vocab_size * llm.width
  attention = 2 * 2 * llm.depth * llm.num_heads * llm.resolved_head_dim * seq_len / 2
  return 2.0 * weights + attention


def encoder_flops_per_image(config: MM1Config, counts: ParamCounts) -> float:
  """Forward FLOPs per image through the ViT (patch matmuls + attention)."""
  enc = config.encoder
  tokens = enc.num_patches + int(enc.class_token)
  attention = 2 * 2 * enc.num_layers_built * enc.width * tokens * tokens
  return 2.0 * counts.encoder * tokens + attention


def flops_per_step(model: MM1Config, batch_size: int, seq_len: int,
                   frozen_connector: bool = False) -> float:
  """Training FLOPs of one step, for every text position and every image slot
  (all slots are encoded).

  Each tower costs its forward, the same again for activation gradients
  when anything at or before it (encoder -> connector -> LLM) trains, and
  the same again for weight gradients when it trains itself: 3x the forward
  when everything trains, 2x for a frozen LLM under a trained connector
  (LLaVA stage 1), 1x for a frozen encoder (model.freeze_*).
  """
  counts = count_params(model)
  llm = batch_size * seq_len * llm_flops_per_token(model, counts, seq_len)
  encoder = batch_size * model.max_images * encoder_flops_per_image(model, counts)
  encoder_trains, llm_trains = not model.freeze_encoder, not model.freeze_llm
  gradient_reaches_llm = encoder_trains or not frozen_connector or llm_trains
  return (encoder * (1 + 2 * encoder_trains)
          + llm * (1 + gradient_reaches_llm + llm_trains))


def memory_bytes(config: MM1Config, counts: ParamCounts) -> dict[str, int]:
  """Training-state memory: params, gradients and Adam moments (whole model)."""
  param_bytes = jnp.dtype(config.param_dtype).itemsize * counts.total
  return {"params": param_bytes, "gradients": param_bytes,
          "optimizer": ADAM_STATE_COPIES * 4 * counts.total}
