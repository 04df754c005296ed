"""Hugging Face decoder checkpoints (Llama / Mistral / Qwen2 / Mixtral) -> mm1_jax.

`convert_decoder(state_dict, config)` maps a PyTorch-layout state dict
(name -> array, e.g. from safetensors or model.state_dict()) onto the params
tree of mm1_jax.models.decoder.Decoder, tensor by tensor. Mixtral experts are
accepted both as the per-expert tensors of the published checkpoints
(block_sparse_moe.experts.J.w1/w2/w3) and as the fused 3-D tensors of
transformers >= 5 (mlp.experts.gate_up_proj / down_proj).
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping

import jax
import numpy as np

from mm1_jax.conversion.params_builder import ConversionError, ParamsBuilder, check_unexpected
from mm1_jax.models.config import DecoderConfig, MoeConfig

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_EXPERT = re.compile(r"^block_sparse_moe\.experts\.(\d+)\.(w1|w2|w3)\.weight$")


def decoder_config_from_hf(hf_config: Any, **overrides) -> DecoderConfig:
  """DecoderConfig from a transformers Llama/Mistral/Qwen2/Mixtral config."""
  num_experts = getattr(hf_config, "num_local_experts", 0) or 0
  moe = MoeConfig(num_experts=num_experts,
                  num_experts_per_token=getattr(hf_config, "num_experts_per_tok", 2),
                  moe_every=1) if num_experts else MoeConfig()
  rope_theta = getattr(hf_config, "rope_theta", None)
  if rope_theta is None:  # transformers >= 5 keeps it in rope_parameters.
    rope_theta = (getattr(hf_config, "rope_parameters", None) or {}).get("rope_theta", 10_000.0)
  values = dict(
      vocab_size=hf_config.vocab_size, width=hf_config.hidden_size,
      depth=hf_config.num_hidden_layers, num_heads=hf_config.num_attention_heads,
      num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads,
      head_dim=getattr(hf_config, "head_dim", None), mlp_dim=hf_config.intermediate_size,
      rope_theta=float(rope_theta), norm_eps=hf_config.rms_norm_eps,
      tie_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
      qkv_bias=getattr(hf_config, "model_type", "") == "qwen2", moe=moe)
  values.update(overrides)
  return DecoderConfig(**values)


def _linear(weight: np.ndarray) -> np.ndarray:
  """torch Linear weight [out, in] -> kernel [in, out]."""
  return np.asarray(weight).T


def _layer_rules(c: DecoderConfig) -> dict[str, tuple[tuple[str, ...], Callable[[np.ndarray], np.ndarray]]]:
  """Per-layer HF suffix -> (path inside the layer, transform)."""
  heads, kv_heads, head_dim, width = c.num_heads, c.num_kv_heads, c.resolved_head_dim, c.width
  return {
      "input_layernorm.weight": (("attn_norm", "scale"), np.asarray),
      "post_attention_layernorm.weight": (("mlp_norm", "scale"), np.asarray),
      "self_attn.q_proj.weight": (("attn", "query", "kernel"),
                                  lambda w: _linear(w).reshape(width, heads, head_dim)),
      "self_attn.k_proj.weight": (("attn", "key", "kernel"),
                                  lambda w: _linear(w).reshape(width, kv_heads, head_dim)),
      "self_attn.v_proj.weight": (("attn", "value", "kernel"),
                                  lambda w: _linear(w).reshape(width, kv_heads, head_dim)),
      "self_attn.q_proj.bias": (("attn", "query", "bias"), lambda b: np.reshape(b, (heads, head_dim))),
      "self_attn.k_proj.bias": (("attn", "key", "bias"), lambda b: np.reshape(b, (kv_heads, head_dim))),
      "self_attn.v_proj.bias": (("attn", "value", "bias"), lambda b: np.reshape(b, (kv_heads, head_dim))),
      "self_attn.o_proj.weight": (("attn", "out", "kernel"),
                                  lambda w: _linear(w).reshape(heads, head_dim, width)),
      "mlp.gate_proj.weight": (("mlp", "gate", "kernel"), _linear),
      "mlp.up_proj.weight": (("mlp", "up", "kernel"), _linear),
      "mlp.down_proj.weight": (("mlp", "down", "kernel"), _linear),
      # Mixtral router, under either module name.
      "block_sparse_moe.gate.weight": (("moe", "router", "kernel"), _linear),
      "mlp.gate.weight": (("moe", "router", "kernel"), _linear),
      # transformers >= 5 fused experts: gate_up [E, 2F, D], down [E, D, F].
      "mlp.experts.down_proj": (("moe", "down"), lambda w: np.swapaxes(w, 1, 2)),
  }


def convert_decoder(state_dict: Mapping[str, Any], config: DecoderConfig,
                    expected_params: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """Returns Decoder params (nested dict of numpy arrays) for `config`.

  state_dict: HF tensor name -> array (numpy or torch on CPU).
  expected_params: abstract params of the Decoder (computed if omitted).
  Raises ConversionError naming any tensor that does not fit.
  """
  if expected_params is None:
    expected_params = abstract_decoder_params(config)
  builder = ParamsBuilder(expected_params)
  rules = _layer_rules(config)
  per_block = config.layers_per_block
  pending_experts: dict[tuple[int, str], dict[int, np.ndarray]] = {}
  unexpected = []
  for name, tensor in state_dict.items():
    value = _to_numpy(tensor)
    if name == "model.embed_tokens.weight":
      builder.set(("embedder", "embedding"), value, name)
      continue
    if name == "model.norm.weight":
      builder.set(("final_norm", "scale"), value, name)
      continue
    if name == "lm_head.weight":
      if not config.tie_embeddings:
        builder.set(("lm_head", "kernel"), _linear(value), name)
      continue  # Tied models may still list the shared tensor.
    if name.endswith("rotary_emb.inv_freq"):
      continue  # A buffer recomputed from rope_theta.
    match = _LAYER.match(name)
    if not match:
      unexpected.append(name)
      continue
    layer, suffix = int(match.group(1)), match.group(2)
    block, within = divmod(layer, per_block)
    prefix = ("blocks", f"layer_{within}")
    if suffix == "mlp.experts.gate_up_proj":
      gate, up = np.split(value, 2, axis=1)
      builder.set_layer(prefix + ("moe", "gate"), block, np.swapaxes(gate, 1, 2), name)
      builder.set_layer(prefix + ("moe", "up"), block, np.swapaxes(up, 1, 2), name)
      continue
    expert = _EXPERT.match(suffix)
    if expert:
      # Published Mixtral files hold one tensor per expert; stack them per layer.
      index, kind = int(expert.group(1)), expert.group(2)
      if index >= config.moe.num_experts:
        raise ConversionError(f"{name}: expert {index} does not exist in a config with "
                              f"{config.moe.num_experts} experts.")
      pending_experts.setdefault((layer, kind), {})[index] = _linear(value)
      if len(pending_experts[(layer, kind)]) == config.moe.num_experts:
        experts = pending_experts.pop((layer, kind))
        stacked = np.stack([experts[j] for j in range(config.moe.num_experts)])
        target = {"w1": "gate", "w3": "up", "w2": "down"}[kind]
        builder.set_layer(prefix + ("moe", target), block, stacked, name)
      continue
    if suffix not in rules:
      unexpected.append(name)
      continue
    path, transform = rules[suffix]
    builder.set_layer(prefix + path, block, transform(value), name)
  if pending_experts:
    (layer, kind), got = next(iter(pending_experts.items()))
    raise ConversionError(f"layer {layer} has {len(got)} of {config.moe.num_experts} experts' {kind} "
                          "tensors; the checkpoint's expert count does not match the config.")
  check_unexpected(unexpected)
  return builder.finish()


def abstract_decoder_params(config: DecoderConfig) -> Mapping[str, Any]:
  """Shapes and dtypes of Decoder params (float32), nothing allocated."""
  import flax.linen as nn
  import jax.numpy as jnp

  from mm1_jax.models.decoder import Decoder

  tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  variables = jax.eval_shape(Decoder(config).init, jax.random.key(0), tokens)
  return nn.unbox(variables)["params"]


def _to_numpy(tensor: Any) -> np.ndarray:
  if hasattr(tensor, "detach"):  # torch
    tensor = tensor.detach().float().cpu().numpy()
  return np.asarray(tensor, dtype=np.float32)
