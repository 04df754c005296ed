"""Hugging Face peft LoRA adapters of a Llama-family LLM <-> mm1_jax adapters.

peft (src/peft/tuners/lora/) wraps each targeted nn.Linear; its state dict
names the adapters {module}.lora_A[.{adapter}].weight [r, in] and
{module}.lora_B[.{adapter}].weight [out, r] (torch layout), under
base_model.model., and moves the base weight to {module}.base_layer.weight.
Ours sit beside the kernel they adapt (mm1_jax/models/lora.py):
lora_a [*in_dims, r], lora_b [r, *out_dims], with the attention projections'
head dims split out as in the kernels, stacked over the scanned blocks.

    base, adapters = split_peft_state_dict(peft_model.state_dict())
    lora = lora_config_from_peft(peft_model.peft_config["default"])
    params = convert_decoder(base, config)                      # hf_llm
    params = lora_lib.with_adapters(params, convert_peft_adapters(adapters, config, lora))
    Decoder(config, lora=lora).apply({"params": params}, tokens)

Export is the inverse (`python -m mm1_jax.convert --lora_export`):

    tensors = export_peft_adapters(params, config, lora)   # decoder params with adapters
    write_peft_adapter_dir(output, tensors, lora, base_model_name_or_path)
    peft.PeftModel.from_pretrained(hf_model, output)       # the same logits

The layer stack is unscanned (layer i = block i // layers_per_block,
position i % layers_per_block), the head dims are flattened, and the
matrices are transposed to torch's [r, in] / [out, r]. hf_llm maps Q and K
without a permutation (both use the rotate-half RoPE layout), so their
adapters need none either. Llama, Mistral and Qwen2 share the module names
(Qwen2's q/k/v biases belong to the base, not to the adapters).

Mixtral (MoE): its attention adapters map as Llama's, both ways; the
router's and the experts' do not (HF Mixtral's experts are parameters, not
nn.Linear, so peft has no module for them): refused with a ConversionError.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping

import numpy as np

from mm1_jax.conversion.hf_llm import _to_numpy
from mm1_jax.conversion.params_builder import ConversionError, ParamsBuilder, check_unexpected
from mm1_jax.models.config import LORA_DEFAULT_TARGETS, DecoderConfig, LoraConfig

# HF Llama module (as in peft's target_modules) -> our module path below a layer.
HF_MODULES = {
    "q_proj": "attn/query", "k_proj": "attn/key", "v_proj": "attn/value", "o_proj": "attn/out",
    "gate_proj": "mlp/gate", "up_proj": "mlp/up", "down_proj": "mlp/down",
}
_OUR_MODULES = {ours: hf for hf, ours in HF_MODULES.items()}
_PEFT_PREFIX = "base_model.model."
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
_ADAPTER = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B)(\.[^.]+)?\.weight$")
_LAYER_MODULE = re.compile(r"^model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)$")


def split_peft_state_dict(state_dict: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
  """A peft model's state dict -> (base weights under plain HF names, adapter
  tensors under {HF module}.lora_A / lora_B.weight). Accepts the names of a
  PeftModel's state_dict() and of get_peft_model_state_dict / adapter files."""
  base, adapters = {}, {}
  for name, tensor in state_dict.items():
    name = name[len(_PEFT_PREFIX):] if name.startswith(_PEFT_PREFIX) else name
    match = _ADAPTER.match(name)
    if match:
      adapters[f"{match['module']}.{match['kind']}.weight"] = tensor
    else:
      base[name.replace(".base_layer.", ".")] = tensor
  return base, adapters


def lora_config_from_peft(peft_config: Any) -> LoraConfig:
  """Our LoraConfig for a peft LoraConfig (r, lora_alpha, use_rslora,
  lora_dropout, target_modules). Raises ConversionError for what has no
  equivalent here (per-module ranks, DoRA, adapter biases, regex targets)."""
  c = peft_config
  unsupported = [field for field, off in (("rank_pattern", {}), ("alpha_pattern", {}),
                                          ("use_dora", False), ("bias", "none"),
                                          ("layers_to_transform", None))
                 if getattr(c, field, off) not in (off, None)]
  if unsupported:
    raise ConversionError(f"peft LoraConfig fields {unsupported} have no equivalent in "
                          "mm1_jax's LoRA (one rank and alpha for every module, no DoRA, no "
                          "adapter biases, every layer).")
  modules = c.target_modules
  if isinstance(modules, str):
    if modules != "all-linear":
      raise ConversionError(f"peft target_modules={modules!r}: a regex; list module names "
                            f"({sorted(HF_MODULES) + ['lm_head']}) or use 'all-linear'.")
    targets = LORA_DEFAULT_TARGETS
  else:
    unknown = sorted(set(modules) - set(HF_MODULES) - {"lm_head"})
    if unknown:
      raise ConversionError(f"peft target_modules {unknown} are not Llama linears "
                            f"({sorted(HF_MODULES) + ['lm_head']}).")
    targets = tuple(sorted(("llm/lm_head" if m == "lm_head" else f"llm/blocks/*/{HF_MODULES[m]}")
                           for m in modules))
  return LoraConfig(rank=int(c.r), alpha=float(c.lora_alpha), rslora=bool(c.use_rslora),
                    dropout=float(c.lora_dropout), targets=targets)


def _layer_rules(c: DecoderConfig) -> dict[str, tuple]:
  """HF module (below a layer) -> (our module path, A transform, B transform).

  A [r, in] -> [*in_dims, r]; B [out, r] -> [r, *out_dims].
  """
  heads, kv_heads, head_dim = c.num_heads, c.num_kv_heads, c.resolved_head_dim
  plain_a = lambda a: np.asarray(a).T
  plain_b = lambda b: np.asarray(b).T
  split_b = lambda n: (lambda b: np.asarray(b).T.reshape(-1, n, head_dim))
  return {
      "q_proj": (("attn", "query"), plain_a, split_b(heads)),
      "k_proj": (("attn", "key"), plain_a, split_b(kv_heads)),
      "v_proj": (("attn", "value"), plain_a, split_b(kv_heads)),
      "o_proj": (("attn", "out"), lambda a: np.asarray(a).T.reshape(heads, head_dim, -1), plain_b),
      "gate_proj": (("mlp", "gate"), plain_a, plain_b),
      "up_proj": (("mlp", "up"), plain_a, plain_b),
      "down_proj": (("mlp", "down"), plain_a, plain_b),
  }


def convert_peft_adapters(adapters: Mapping[str, Any], config: DecoderConfig,
                          lora: LoraConfig) -> dict[str, Any]:
  """peft adapter tensors ({HF module}.lora_A/lora_B.weight, as
  split_peft_state_dict gives them) -> the adapters of Decoder(config,
  lora=lora), in the decoder's params layout (combine with the base params by
  lora.with_adapters). Raises ConversionError naming any tensor that does not
  fit, and listing our adapters the source lacks."""
  from mm1_jax.models import lora as lora_lib

  expected = lora_lib.lora_params(abstract_lora_decoder_params(config, lora))
  builder = ParamsBuilder(expected)
  rules = _layer_rules(config)
  per_block = config.layers_per_block
  unexpected = []
  for name, tensor in adapters.items():
    match = _ADAPTER.match(name)
    if not match:
      unexpected.append(name)
      continue
    module, kind = match["module"], match["kind"]
    leaf = "lora_a" if kind == "lora_A" else "lora_b"
    value = _to_numpy(tensor)
    if module == "lm_head":
      builder.set(("lm_head", leaf), value.T, name)
      continue
    layer_match = _LAYER_MODULE.match(module)
    if not layer_match or layer_match.group(3) not in rules:
      unexpected.append(name)
      continue
    layer, hf_module = int(layer_match.group(1)), layer_match.group(3)
    path, to_a, to_b = rules[hf_module]
    block, within = divmod(layer, per_block)
    builder.set_layer(("blocks", f"layer_{within}") + path + (leaf,), block,
                      (to_a if leaf == "lora_a" else to_b)(value), name)
  check_unexpected(unexpected)
  return builder.finish()


def abstract_lora_decoder_params(config: DecoderConfig, lora: LoraConfig) -> Mapping[str, Any]:
  """Shapes and dtypes of Decoder(config, lora=lora) params (float32), nothing allocated."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  from mm1_jax.models.decoder import Decoder

  tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  variables = jax.eval_shape(Decoder(config, lora=lora).init, jax.random.key(0), tokens)
  return nn.unbox(variables)["params"]


def export_peft_adapters(params: Mapping[str, Any], config: DecoderConfig,
                         lora: LoraConfig) -> dict[str, np.ndarray]:
  """The adapters of Decoder(config, lora=lora) params (the LLM's params tree,
  adapters included) -> peft's adapter tensors, named as in
  adapter_model.safetensors (base_model.model.model.layers.{i}.self_attn.
  q_proj.lora_A.weight: [r, in]; ...lora_B.weight: [out, r]), float32.
  The inverse of split_peft_state_dict + convert_peft_adapters. Raises
  ConversionError for adapters peft has no module for (MoE router, experts)."""
  from mm1_jax.models import lora as lora_lib

  adapters = lora_lib.lora_params(params)
  per_block = config.layers_per_block
  tensors = {}
  for module in lora_lib.adapted_module_paths(adapters):
    names = module.split("/")
    if "moe" in names:
      raise ConversionError(
          f"{module}: MoE router and expert adapters have no peft module (HF Mixtral's "
          "experts are parameters, not nn.Linear); target the attention only "
          "(model.lora.targets=('llm/*/attn/*',)) to export a Mixtral's adapters, or merge.")
    node = adapters
    for name in names:
      node = node[name]
    a, b = np.asarray(node["lora_a"], np.float32), np.asarray(node["lora_b"], np.float32)
    rank = a.shape[-1]
    if rank != lora.rank:
      raise ConversionError(f"{module}: adapters of rank {rank}, but the LoRA config has rank "
                            f"{lora.rank}; export with the run's own config.")
    to_a = lambda x: np.ascontiguousarray(x.reshape(-1, rank).T)   # [*in, r] -> [r, in]
    to_b = lambda x: np.ascontiguousarray(x.reshape(rank, -1).T)   # [r, *out] -> [out, r]
    if names == ["lm_head"]:
      tensors[f"{_PEFT_PREFIX}lm_head.lora_A.weight"] = to_a(a)
      tensors[f"{_PEFT_PREFIX}lm_head.lora_B.weight"] = to_b(b)
      continue
    within = "/".join(names[2:])
    if names[0] != "blocks" or within not in _OUR_MODULES:
      raise ConversionError(f"{module}: an adapted module with no Hugging Face Llama linear "
                            f"(peft exports {sorted(_OUR_MODULES)} of a layer, and lm_head).")
    position = int(names[1][len("layer_"):])
    hf_module = _OUR_MODULES[within]
    group = "self_attn" if within.startswith("attn/") else "mlp"
    for block in range(a.shape[0]):
      layer = block * per_block + position
      prefix = f"{_PEFT_PREFIX}model.layers.{layer}.{group}.{hf_module}"
      tensors[f"{prefix}.lora_A.weight"] = to_a(a[block])
      tensors[f"{prefix}.lora_B.weight"] = to_b(b[block])
  return dict(sorted(tensors.items()))


def peft_adapter_config(lora: LoraConfig, tensors: Mapping[str, Any],
                        base_model_name_or_path: str | None = None) -> dict[str, Any]:
  """The adapter_config.json of exported tensors: peft's LoraConfig fields
  (r, lora_alpha, use_rslora, lora_dropout, target_modules: the HF modules
  that have adapters)."""
  modules = sorted({name.split(".")[-3] for name in tensors})
  return {
      "peft_type": "LORA", "task_type": "CAUSAL_LM",
      "base_model_name_or_path": base_model_name_or_path, "r": lora.rank,
      "lora_alpha": lora.alpha, "use_rslora": lora.rslora, "lora_dropout": lora.dropout,
      "target_modules": modules, "bias": "none", "fan_in_fan_out": False,
      "inference_mode": True, "init_lora_weights": True, "modules_to_save": None,
      "use_dora": False, "rank_pattern": {}, "alpha_pattern": {},
  }


def write_peft_adapter_dir(output: str, tensors: Mapping[str, np.ndarray], lora: LoraConfig,
                           base_model_name_or_path: str | None = None) -> None:
  """Writes a peft adapter directory: adapter_config.json and
  adapter_model.safetensors (peft.PeftModel.from_pretrained(model, output))."""
  from safetensors.numpy import save_file

  os.makedirs(output, exist_ok=False)
  save_file(dict(tensors), os.path.join(output, ADAPTER_WEIGHTS_FILE),
            metadata={"format": "pt"})
  with open(os.path.join(output, ADAPTER_CONFIG_FILE), "w") as f:
    json.dump(peft_adapter_config(lora, tensors, base_model_name_or_path), f, indent=2)


def read_peft_adapter_dir(directory: str, config: DecoderConfig) -> tuple[LoraConfig, dict[str, Any]]:
  """A peft adapter directory -> (our LoraConfig, the decoder's adapters in
  our params layout), by lora_config_from_peft and convert_peft_adapters."""
  import types

  from safetensors.numpy import load_file

  with open(os.path.join(directory, ADAPTER_CONFIG_FILE)) as f:
    values = json.load(f)
  values.setdefault("use_rslora", False)
  values.setdefault("lora_dropout", 0.0)
  lora = lora_config_from_peft(types.SimpleNamespace(**values))
  _, adapters = split_peft_state_dict(load_file(os.path.join(directory, ADAPTER_WEIGHTS_FILE)))
  return lora, convert_peft_adapters(adapters, config, lora)
