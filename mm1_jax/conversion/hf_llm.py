"""Hugging Face decoder checkpoints (Llama / Mistral / Qwen2 / Mixtral) <-> mm1_jax.

`convert_decoder(state_dict, config)` maps a PyTorch-layout state dict
(name -> array, e.g. from safetensors or model.state_dict()) onto the params
tree of mm1_jax.models.decoder.Decoder, tensor by tensor. Mixtral experts are
accepted both as the per-expert tensors of the published checkpoints
(block_sparse_moe.experts.J.w1/w2/w3) and as the fused 3-D tensors of
transformers >= 5 (mlp.experts.gate_up_proj / down_proj).

`export_decoder(params, config)` is the inverse, through the same table of
names (_layer_rules): HF tensors one at a time, experts in the published
per-expert layout (which transformers, vLLM and llama.cpp's converter read);
`hf_config_dict(config)` the matching config.json.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Iterator, Mapping

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
  """torch Linear weight [out, in] -> kernel [in, out] (and back: a transpose)."""
  return np.asarray(weight).T


Transform = Callable[[np.ndarray], np.ndarray]
# Import-only names: transformers >= 5's (exports use the published ones).
_IMPORT_ONLY = None


def _layer_rules(c: DecoderConfig) -> dict[str, tuple[tuple[str, ...], Transform,
                                                      Transform | None]]:
  """Per-layer HF suffix -> (path inside the layer, HF -> ours, ours -> HF).

  ours -> HF gives a view where it can (transposes, reshapes): nothing is
  copied until the tensor is written. None: a name only read (an alias)."""
  heads, kv_heads, head_dim, width = c.num_heads, c.num_kv_heads, c.resolved_head_dim, c.width
  identity = np.asarray
  flat = lambda x: np.asarray(x).reshape(-1)
  qkv_to_hf = lambda k: np.asarray(k).reshape(width, -1).T  # [D, n, h] -> [n * h, D]
  return {
      "input_layernorm.weight": (("attn_norm", "scale"), identity, identity),
      "post_attention_layernorm.weight": (("mlp_norm", "scale"), identity, identity),
      "self_attn.q_proj.weight": (("attn", "query", "kernel"),
                                  lambda w: _linear(w).reshape(width, heads, head_dim), qkv_to_hf),
      "self_attn.k_proj.weight": (("attn", "key", "kernel"),
                                  lambda w: _linear(w).reshape(width, kv_heads, head_dim),
                                  qkv_to_hf),
      "self_attn.v_proj.weight": (("attn", "value", "kernel"),
                                  lambda w: _linear(w).reshape(width, kv_heads, head_dim),
                                  qkv_to_hf),
      "self_attn.q_proj.bias": (("attn", "query", "bias"),
                                lambda b: np.reshape(b, (heads, head_dim)), flat),
      "self_attn.k_proj.bias": (("attn", "key", "bias"),
                                lambda b: np.reshape(b, (kv_heads, head_dim)), flat),
      "self_attn.v_proj.bias": (("attn", "value", "bias"),
                                lambda b: np.reshape(b, (kv_heads, head_dim)), flat),
      "self_attn.o_proj.weight": (("attn", "out", "kernel"),
                                  lambda w: _linear(w).reshape(heads, head_dim, width),
                                  lambda k: np.asarray(k).reshape(-1, width).T),
      "mlp.gate_proj.weight": (("mlp", "gate", "kernel"), _linear, _linear),
      "mlp.up_proj.weight": (("mlp", "up", "kernel"), _linear, _linear),
      "mlp.down_proj.weight": (("mlp", "down", "kernel"), _linear, _linear),
      # Mixtral router, under either module name.
      "block_sparse_moe.gate.weight": (("moe", "router", "kernel"), _linear, _linear),
      "mlp.gate.weight": (("moe", "router", "kernel"), _linear, _IMPORT_ONLY),
      # transformers >= 5 fused experts: gate_up [E, 2F, D], down [E, D, F].
      "mlp.experts.down_proj": (("moe", "down"), lambda w: np.swapaxes(w, 1, 2), _IMPORT_ONLY),
  }


# Published Mixtral experts, per expert: w1 = gate, w3 = up, w2 = down (torch [out, in]).
_EXPERT_KINDS = {"w1": "gate", "w3": "up", "w2": "down"}


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
        target = _EXPERT_KINDS[kind]
        builder.set_layer(prefix + ("moe", target), block, stacked, name)
      continue
    if suffix not in rules:
      unexpected.append(name)
      continue
    path, transform, _ = rules[suffix]
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


# ---------------------------------------------------------------------------
# Export: mm1_jax -> Hugging Face.


def hf_model_type(config: DecoderConfig) -> str:
  """"llama", "qwen2" (q/k/v biases) or "mixtral" (every layer MoE); ConversionError
  naming what no transformers class of these holds."""
  if config.moe.enabled:
    if config.moe.moe_every != 1:
      raise ConversionError(
          f"model.llm.moe.moe_every={config.moe.moe_every}: dense and MoE layers interleaved "
          "have no transformers Mixtral equivalent (every Mixtral layer is MoE); export an LLM "
          "with moe_every=1, or a dense one.")
    if config.qkv_bias:
      raise ConversionError("model.llm.qkv_bias with MoE layers: Mixtral has no q/k/v biases.")
    return "mixtral"
  return "qwen2" if config.qkv_bias else "llama"


_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                  "mixtral": "MixtralForCausalLM"}


def hf_config_dict(config: DecoderConfig, *, dtype: str = "float32",
                   max_position_embeddings: int = 4096, bos_token_id: int | None = None,
                   eos_token_id: int | None = None) -> dict[str, Any]:
  """config.json of the transformers model that holds `config`'s LLM (hf_model_type).

  dtype: "float32" | "bfloat16", the stored tensors'. max_position_embeddings:
  what transformers records (RoPE has no learned positions; our runs' seq_len).
  """
  model_type = hf_model_type(config)
  values = {
      "architectures": [_ARCHITECTURES[model_type]], "model_type": model_type,
      "vocab_size": config.vocab_size, "hidden_size": config.width,
      "intermediate_size": config.expert_mlp_dim if config.moe.enabled else config.mlp_dim,
      "num_hidden_layers": config.depth, "num_attention_heads": config.num_heads,
      "num_key_value_heads": config.num_kv_heads, "head_dim": config.resolved_head_dim,
      "hidden_act": "silu", "rms_norm_eps": config.norm_eps, "rope_theta": config.rope_theta,
      "max_position_embeddings": max_position_embeddings,
      "tie_word_embeddings": config.tie_embeddings, "dtype": dtype,
      "attention_dropout": 0.0, "use_cache": True,
      "bos_token_id": bos_token_id, "eos_token_id": eos_token_id,
  }
  if model_type == "llama":
    values.update(attention_bias=False, mlp_bias=False)
  if model_type == "qwen2":
    values.update(use_sliding_window=False, sliding_window=None)
  if model_type == "mixtral":
    values.update(num_local_experts=config.moe.num_experts,
                  num_experts_per_tok=config.moe.num_experts_per_token,
                  router_aux_loss_coef=config.moe.balance_loss_weight,
                  output_router_logits=False, sliding_window=None)
  return values


def export_decoder(params: Mapping[str, Any], config: DecoderConfig
                   ) -> Iterator[tuple[str, np.ndarray]]:
  """(HF name, tensor) of every tensor of a Decoder(config)'s params (host
  numpy arrays), in HF's order: embedding, layers, final norm, lm_head (not
  when tied). Tensors are views of `params` where a transpose or reshape
  suffices: iterating twice (to plan files, then to write them) copies
  nothing. ConversionError (hf_model_type) for an LLM transformers cannot hold.
  """
  hf_model_type(config)
  rules = [(suffix, path, to_hf) for suffix, (path, _, to_hf) in _layer_rules(config).items()
           if to_hf is not _IMPORT_ONLY]
  blocks = params["blocks"]
  per_block = config.layers_per_block
  yield "model.embed_tokens.weight", np.asarray(params["embedder"]["embedding"])
  for layer in range(config.depth):
    block, within = divmod(layer, per_block)
    node = blocks[f"layer_{within}"]
    prefix = f"model.layers.{layer}."
    for suffix, path, to_hf in rules:
      leaf = node
      for key in path:
        leaf = leaf.get(key) if isinstance(leaf, Mapping) else None
        if leaf is None:
          break
      if leaf is not None:  # A layer without q/k/v biases, router or dense MLP skips them.
        yield prefix + suffix, to_hf(np.asarray(leaf)[block])
    if "moe" in node:
      for j in range(config.moe.num_experts):
        for kind, ours in _EXPERT_KINDS.items():
          yield (f"{prefix}block_sparse_moe.experts.{j}.{kind}.weight",
                 _linear(np.asarray(node["moe"][ours])[block, j]))
  yield "model.norm.weight", np.asarray(params["final_norm"]["scale"])
  if not config.tie_embeddings:
    yield "lm_head.weight", _linear(params["lm_head"]["kernel"])
