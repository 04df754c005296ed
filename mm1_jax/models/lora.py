"""LoRA adapters: where they sit in the params tree, which linears take them,
and merging them into the base weights.

The adapters are ordinary parameters beside the weight they adapt (see
layers.DenseGeneral and moe.MoeFeedForward), stacked over the scanned
blocks like it:

    {module}/lora_a [L?, *in_dims, r], {module}/lora_b [L?, r, *out_dims]
        beside {module}/kernel, e.g. llm/blocks/layer_0/attn/query/lora_a
        [L, D, r] and .../lora_b [L, r, heads, head_dim];
    {moe}/{name}_lora_a [L, E, in, r], {moe}/{name}_lora_b [L, E, r, out]
        beside the expert kernel {moe}/{name} (name: gate, up or down).

The module path of a linear, which LoraConfig.targets match, is the path of
its kernel without the leaf ("kernel") or, for experts, the kernel's path
("llm/blocks/layer_1/moe/up"). Hugging Face peft names the same adapters
base_model.model.{HF module}.lora_A/lora_B.weight ([r, in] and [out, r],
torch layout); mm1_jax/conversion/peft_lora.py maps between the two.

A layer with adapters computes y = x W + scale * dropout(x) A B (scale =
LoraConfig.scale); merge_lora folds them in: W' = W + scale * A B.
"""

from __future__ import annotations

import fnmatch
import functools
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mm1_jax.models import qlora
from mm1_jax.models.config import (ConnectorConfig, DecoderConfig, LoraConfig, MM1Config,
                                   VitConfig)
from mm1_jax.typed_config import ConfigError

ADAPTER_LEAVES = ("lora_a", "lora_b")
_SEPARATOR = "/"


def is_adapter(names: Sequence[str]) -> bool:
  """Whether the leaf at this path of key names is a LoRA adapter."""
  leaf = str(names[-1]) if len(names) else ""
  return leaf in ADAPTER_LEAVES or leaf.endswith(("_lora_a", "_lora_b"))


def base_weight_name(adapter_leaf: str) -> str:
  """The leaf an adapter adapts: lora_a -> kernel, up_lora_a -> up."""
  if adapter_leaf in ADAPTER_LEAVES:
    return "kernel"
  for suffix in ADAPTER_LEAVES:
    if adapter_leaf.endswith("_" + suffix):
      return adapter_leaf[:-len(suffix) - 1]
  raise ValueError(f"{adapter_leaf!r} is not a LoRA adapter leaf.")


def _names(path) -> list[str]:
  return [str(getattr(key, "key", getattr(key, "name", key))) for key in path]


def stop_base_gradients(params: Any) -> Any:
  """stop_gradient on every leaf but the adapters (a frozen base)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: x if is_adapter(_names(path)) else jax.lax.stop_gradient(x), params)


def _filter(tree: Mapping[str, Any], keep_adapters: bool) -> dict[str, Any]:
  """Nested dict of the adapter leaves (or of all others); empty dicts dropped."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      sub = _filter(value, keep_adapters)
      if sub:
        out[key] = sub
    elif is_adapter([key]) == keep_adapters:
      out[key] = value
  return out


def lora_params(params: Mapping[str, Any]) -> dict[str, Any]:
  """Only the adapters, at their paths (e.g. {'llm': {'blocks': ...}})."""
  return _filter(params, keep_adapters=True)


def without_lora(params: Mapping[str, Any]) -> dict[str, Any]:
  """The base parameters: everything but the adapters."""
  return _filter(params, keep_adapters=False)


def with_adapters(base: Mapping[str, Any], adapters: Mapping[str, Any]) -> dict[str, Any]:
  """The base params with the adapters (as lora_params gives them) put back."""
  out = dict(base)
  for key, value in adapters.items():
    out[key] = with_adapters(base.get(key, {}), value) if isinstance(value, Mapping) else value
  return out


def select(tree: Mapping[str, Any], keep: Mapping[str, Any]) -> dict[str, Any]:
  """Nested dict of the leaves of `tree` where the bool tree `keep` (same
  structure) is True; empty dicts dropped. with_adapters(select(t, m),
  select(t, not m)) puts a tree back together."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      sub = select(value, keep[key])
      if sub:
        out[key] = sub
    elif keep[key]:
      out[key] = value
  return out


def adapted_module_paths(params: Mapping[str, Any]) -> list[str]:
  """Module paths ("llm/blocks/layer_0/attn/query") of the linears that carry adapters."""
  modules = []
  for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
    names = _names(path)
    if names[-1] == "lora_a":
      modules.append(_SEPARATOR.join(names[:-1]))
    elif names[-1].endswith("_lora_a"):
      modules.append(_SEPARATOR.join(names[:-1] + [base_weight_name(names[-1])]))
  return modules


def merged_kernel(kernel: Any, lora_a: Any, lora_b: Any, scale: float) -> jax.Array:
  """kernel + scale * A B, computed in float32, in the kernel's dtype.

  kernel [*batch, *in_dims, *out_dims]; lora_a [*batch, *in_dims, r];
  lora_b [*batch, r, *out_dims]; batch: the stacked-layer (and expert) dims.
  """
  kernel, lora_a, lora_b = (jnp.asarray(x) for x in (kernel, lora_a, lora_b))
  num_batch = lora_a.ndim + lora_b.ndim - 2 - kernel.ndim
  batch, rank = kernel.shape[:num_batch], lora_a.shape[-1]
  in_dims = lora_a.shape[num_batch:-1]
  out_dims = lora_b.shape[num_batch + 1:]
  if (num_batch < 0 or lora_a.shape[:num_batch] != batch or lora_b.shape[:num_batch] != batch
      or lora_b.shape[num_batch] != rank or kernel.shape != batch + in_dims + out_dims):
    raise ValueError(f"LoRA adapters A {lora_a.shape} and B {lora_b.shape} do not fit the "
                     f"kernel {kernel.shape}.")
  a = lora_a.astype(jnp.float32).reshape(batch + (_prod(in_dims), rank))
  b = lora_b.astype(jnp.float32).reshape(batch + (rank, _prod(out_dims)))
  delta = jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST).reshape(kernel.shape)
  return (kernel.astype(jnp.float32) + scale * delta).astype(kernel.dtype)


def _prod(dims: Sequence[int]) -> int:
  return int(np.prod(dims, dtype=np.int64))


def merge_lora(params: Mapping[str, Any], config: LoraConfig) -> dict[str, Any]:
  """The params with every adapter pair folded into its base weight
  (W + scale * A B, in float32) and the adapters removed: a plain params tree
  of the model without LoRA. An NF4 base (QLoRA) is dequantised first, so
  the merged kernel is float32, as peft's merge_and_unload of a 4-bit model
  before it requantises. Raises ValueError if an adapter lacks its pair
  or base weight, or its rank is not config.rank."""

  def walk(tree: Mapping[str, Any], where: str) -> dict[str, Any]:
    out = {key: walk(value, f"{where}{key}/") if isinstance(value, Mapping) else value
           for key, value in tree.items() if not is_adapter([key])}
    for key, value in tree.items():
      if isinstance(value, Mapping) or not key.endswith("lora_a"):
        continue
      base, partner = base_weight_name(key), key[:-1] + "b"
      if base not in tree and qlora.nf4_leaf(base, "codes") in tree:  # QLoRA: an NF4 base.
        out = {k: v for k, v in out.items() if not (qlora.is_nf4([k])
                                                    and qlora.weight_name(k) == base)}
        tree = {**tree, base: _nf4_kernel(tree, base, value, tree.get(partner), config)}
      if base not in tree or partner not in tree:
        raise ValueError(f"{where}{key}: the adapter has no {partner if base in tree else base} "
                         "beside it; the params are not a LoRA model's.")
      if value.shape[-1] != config.rank:
        raise ValueError(f"{where}{key}: adapters of rank {value.shape[-1]}, but the LoRA "
                         f"config has rank {config.rank}; merge with the run's own config.")
      out[base] = merged_kernel(tree[base], value, tree[partner], config.scale)
    return out

  return walk(params, "")


def _nf4_kernel(tree: Mapping[str, Any], weight: str, lora_a: Any, lora_b: Any | None,
                config: LoraConfig) -> jax.Array:
  """The float32 kernel [*batch, *in_dims, *out_dims] of the NF4 weight
  `weight` in `tree`, its dims read from its adapters' shapes."""
  flat = qlora.dequantize_weights({k: v for k, v in tree.items() if qlora.is_nf4([k])
                                   and qlora.weight_name(k) == weight}, config.block_size)[weight]
  if lora_b is None:
    return flat
  num_batch = flat.ndim - 2
  return flat.reshape(tuple(lora_a.shape[:-1]) + tuple(lora_b.shape[num_batch + 1:]))


def check_targets(model: MM1Config, path: str = "model.lora") -> None:
  """Raises ConfigError when a target pattern matches no linear that takes
  adapters, or (QLoRA) a quantised linear's fan-in holds no whole NF4 blocks."""
  config = model.lora
  if not config.enabled:
    return
  available = linear_module_paths(model.encoder, model.connector, model.llm)
  for pattern in config.targets:
    if not any(fnmatch.fnmatchcase(module, pattern) for module in available):
      part = [m for m in available if m.split(_SEPARATOR)[0] == pattern.split(_SEPARATOR)[0]]
      candidates = part or list(available)  # Those of the part the pattern names, first.
      shown = ", ".join(candidates[:8]) + (" ..." if len(candidates) > 8 else "")
      raise ConfigError(
          f"{path}.targets: {pattern!r} matches no linear layer, of {len(candidates)}: {shown}; "
          "e.g. 'llm/blocks/*' for the LLM's layers (not lm_head), 'encoder/blocks/*', "
          "'connector/*'.")
  if config.quantized:  # Every quantised linear's fan-in must hold whole NF4 blocks.
    try:
      _abstract_tower_params(model.encoder, model.connector, model.llm, config)
    except ValueError as error:
      raise ConfigError(f"{path}.quantize='nf4': {error}") from None


def adapted_parts(model: MM1Config) -> frozenset[str]:
  """The parts ("encoder", "connector", "llm") with a linear the LoRA targets:
  their base is frozen (only the adapters train there)."""
  if not model.lora.enabled:
    return frozenset()
  paths = linear_module_paths(model.encoder, model.connector, model.llm)
  return frozenset(p.split(_SEPARATOR)[0] for p in paths if model.lora.targets_module(p))


def _abstract_tower_params(encoder: VitConfig, connector: ConnectorConfig, llm: DecoderConfig,
                           lora: LoraConfig) -> dict[str, Any]:
  """{part: abstract params} of each tower built alone with `lora` (nothing allocated)."""
  import flax.linen as nn  # pylint: disable=import-outside-toplevel

  from mm1_jax.models.connectors import build_connector  # pylint: disable=import-outside-toplevel
  from mm1_jax.models.decoder import Decoder  # pylint: disable=import-outside-toplevel
  from mm1_jax.models.vit import VisionTransformer  # pylint: disable=import-outside-toplevel

  key = jax.random.key(0)
  images = jax.ShapeDtypeStruct((1, encoder.image_size, encoder.image_size, 3), jnp.float32)
  features = jax.ShapeDtypeStruct((1, encoder.num_patches, encoder.width), jnp.float32)
  tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  towers = {"encoder": (VisionTransformer(encoder, lora=lora), images),
            "connector": (build_connector(connector, llm.width, lora=lora), features),
            "llm": (Decoder(llm, lora=lora), tokens)}
  return {part: nn.unbox(jax.eval_shape(module.init, key, example))["params"]
          for part, (module, example) in towers.items()}


@functools.lru_cache(maxsize=16)
def linear_module_paths(encoder: VitConfig, connector: ConnectorConfig,
                        llm: DecoderConfig) -> tuple[str, ...]:
  """Module paths of every linear that can take adapters, by part:
  "encoder/patch_embed", "encoder/blocks/attn/query", ...,
  "connector/s1/b1/conv1", ..., "connector/readout_0",
  "llm/blocks/layer_0/attn/query", ..., "llm/lm_head". From the model's own
  structure (abstract inits, nothing allocated)."""
  every = LoraConfig(rank=1, targets=("*",))
  towers = _abstract_tower_params(encoder, connector, llm, every)
  return tuple(f"{part}/{path}" for part, params in towers.items()
               for path in adapted_module_paths(params))
