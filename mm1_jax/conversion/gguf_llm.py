"""GGUF (llama.cpp) Llama checkpoints -> mm1_jax Decoder params.

`decoder_config_from_gguf` reads the model shape from the file's metadata;
`convert_gguf_decoder` dequantizes the tensors one at a time (Q4_1, Q8_0,
F16, ... -> float32) and drops each into a ParamsBuilder, so only the
destination params are ever whole in memory.

llama.cpp's convert script permutes the rows of the Q and K projections so
that its "normal" rope can rotate adjacent pairs (x[2i], x[2i+1]); our rope
(layers.apply_rope) rotates the halves (x[i], x[i + head_dim/2]) as HF Llama
does, so the permutation is undone here (see `unpermute_rope_rows`).
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

import numpy as np

from mm1_jax.conversion.hf_llm import abstract_decoder_params
from mm1_jax.conversion.params_builder import ConversionError, ParamsBuilder, check_unexpected
from mm1_jax.models.config import DecoderConfig

SUPPORTED_ARCHITECTURES = ("llama",)
_LAYER = re.compile(r"^blk\.(\d+)\.(.+)$")
_GLOBAL_TENSORS = ("token_embd.weight", "output_norm.weight", "output.weight")


def open_gguf(reader_or_path: Any):
  """A gguf.GGUFReader for a path, or the reader itself (opening costs seconds)."""
  import gguf

  if isinstance(reader_or_path, gguf.GGUFReader):
    return reader_or_path
  path = os.fspath(reader_or_path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no GGUF file at {path!r}; pass the path of a .gguf file.")
  return gguf.GGUFReader(path)


def gguf_field(reader, key: str, default: Any = None) -> Any:
  """The value of metadata `key` (arrays as lists), or `default` if absent."""
  field = reader.fields.get(key)
  return default if field is None else field.contents()


def _architecture(reader) -> str:
  arch = gguf_field(reader, "general.architecture")
  if arch not in SUPPORTED_ARCHITECTURES:
    raise ConversionError(f"general.architecture is {arch!r}; only {SUPPORTED_ARCHITECTURES} "
                          "GGUF files can be converted to the mm1_jax Decoder.")
  return arch


def gguf_vocab_size(reader) -> int | None:
  """Vocabulary size: the tokenizer's token count, else {arch}.vocab_size (or None)."""
  tokens = reader.fields.get("tokenizer.ggml.tokens")
  if tokens is not None:
    return len(tokens.data)  # One entry per token; no need to decode the strings.
  vocab_size = gguf_field(reader, f"{_architecture(reader)}.vocab_size")
  return None if vocab_size is None else int(vocab_size)


def _float32(value: Any) -> float:
  """GGUF floats are float32: 1e-5 is stored as 9.99999974e-06. Its shortest
  float32 spelling gives back the value the model was configured with."""
  return float(str(np.float32(value)))


# DecoderConfig field -> (metadata key after "{arch}.", type, default; None = required).
_METADATA = {
    "width": ("embedding_length", int, None),
    "depth": ("block_count", int, None),
    "num_heads": ("attention.head_count", int, None),
    "mlp_dim": ("feed_forward_length", int, None),
    "norm_eps": ("attention.layer_norm_rms_epsilon", _float32, None),
    "rope_theta": ("rope.freq_base", _float32, 10_000.0),
    "head_dim": ("attention.key_length", int, None),  # Absent: width // num_heads.
}
_OPTIONAL = ("rope_theta", "head_dim")


def _check_rope(reader, arch: str, head_dim: int) -> None:
  """Refuses rope variants apply_rope does not implement (partial or scaled)."""
  rotated = gguf_field(reader, f"{arch}.rope.dimension_count")
  if rotated is not None and int(rotated) != head_dim:
    raise ConversionError(f"{arch}.rope.dimension_count is {rotated} but head_dim is {head_dim}; "
                          "partial rotary embeddings are not supported.")
  scaling = gguf_field(reader, f"{arch}.rope.scaling.type")
  if scaling not in (None, "none"):
    raise ConversionError(f"{arch}.rope.scaling.type is {scaling!r}; scaled rope is not "
                          "supported (apply_rope has no scaling).")


def decoder_config_from_gguf(reader_or_path: Any, **overrides) -> DecoderConfig:
  """DecoderConfig from the metadata of a llama-architecture GGUF file.

  Embeddings are tied when the file has no separate output.weight tensor.
  `overrides` replace any DecoderConfig field (e.g. vocab_size, remat_policy)
  and stand in for metadata the file lacks.
  """
  reader = open_gguf(reader_or_path)
  arch = _architecture(reader)
  values = {}
  for field, (key, cast, default) in _METADATA.items():
    if field in overrides:
      continue
    value = gguf_field(reader, f"{arch}.{key}", default)
    if value is None and field not in _OPTIONAL:
      raise ConversionError(f"the GGUF metadata has no {arch}.{key!r}, which the Decoder config "
                            f"needs; pass {field}=... as an override.")
    values[field] = None if value is None else cast(value)
  num_heads = overrides.get("num_heads", values.get("num_heads"))
  values["num_kv_heads"] = int(gguf_field(reader, f"{arch}.attention.head_count_kv", num_heads))
  values["vocab_size"] = gguf_vocab_size(reader)
  values["tie_embeddings"] = not any(t.name == "output.weight" for t in reader.tensors)
  values.update(overrides)
  if values["vocab_size"] is None:
    raise ConversionError("the GGUF has neither tokenizer.ggml.tokens nor "
                          f"{arch}.vocab_size; pass vocab_size=... as an override.")
  config = DecoderConfig(**values)
  _check_rope(reader, arch, config.resolved_head_dim)
  return config


def unpermute_rope_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
  """Undoes llama.cpp's Q/K row permutation: [heads * head_dim, D] -> same shape.

  llama.cpp stores row h*head_dim + 2i + j of HF row h*head_dim + j*head_dim/2 + i
  (reshape(heads, 2, head_dim/2, D).swapaxes(1, 2)); this is the inverse.
  """
  rows = weight.shape[0]
  return (weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:])
          .swapaxes(1, 2).reshape(weight.shape))


def _dequantize(tensor) -> np.ndarray:
  """One GGUF tensor as float32 in numpy (row-major, torch) order: [out, in]."""
  import gguf

  return np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), np.float32)


def _projection(heads: int, head_dim: int, width: int, rope: bool):
  """attn_q/k/v weight [heads * head_dim, D] -> kernel [D, heads, head_dim]."""
  def transform(weight: np.ndarray, name: str) -> np.ndarray:
    if weight.shape != (heads * head_dim, width):
      raise ConversionError(f"{name}: shape {weight.shape} does not fit the config, which expects "
                            f"({heads} heads * {head_dim}, {width}); check num_heads / "
                            "num_kv_heads / head_dim / width.")
    if rope:
      weight = unpermute_rope_rows(weight, heads)
    return weight.T.reshape(width, heads, head_dim)
  return transform


def _out_projection(heads: int, head_dim: int, width: int):
  """attn_output weight [D, heads * head_dim] -> kernel [heads, head_dim, D]."""
  def transform(weight: np.ndarray, name: str) -> np.ndarray:
    if weight.shape != (width, heads * head_dim):
      raise ConversionError(f"{name}: shape {weight.shape} does not fit the config, which expects "
                            f"({width}, {heads} heads * {head_dim}).")
    return weight.T.reshape(heads, head_dim, width)
  return transform


def _layer_rules(c: DecoderConfig):
  """Per-layer GGUF suffix -> (path inside the layer, transform(weight [out, in], name))."""
  heads, kv_heads, head_dim, width = c.num_heads, c.num_kv_heads, c.resolved_head_dim, c.width
  same = lambda w, name: w
  linear = lambda w, name: w.T  # [out, in] -> kernel [in, out]
  return {
      "attn_norm.weight": (("attn_norm", "scale"), same),
      "ffn_norm.weight": (("mlp_norm", "scale"), same),
      "attn_q.weight": (("attn", "query", "kernel"), _projection(heads, head_dim, width, True)),
      "attn_k.weight": (("attn", "key", "kernel"), _projection(kv_heads, head_dim, width, True)),
      "attn_v.weight": (("attn", "value", "kernel"), _projection(kv_heads, head_dim, width, False)),
      "attn_output.weight": (("attn", "out", "kernel"), _out_projection(heads, head_dim, width)),
      "ffn_gate.weight": (("mlp", "gate", "kernel"), linear),
      "ffn_up.weight": (("mlp", "up", "kernel"), linear),
      "ffn_down.weight": (("mlp", "down", "kernel"), linear),
  }


def pad_vocab_rows(table: np.ndarray, vocab_size: int, name: str) -> np.ndarray:
  """[V, D] -> [vocab_size, D], new rows the mean of the existing ones.

  The mean row keeps appended tokens (e.g. new special tokens) neutral
  until trained, instead of random directions with large logits.
  """
  rows = table.shape[0]
  if vocab_size < rows:
    raise ConversionError(f"{name}: the file has {rows} vocabulary rows but vocab_size is "
                          f"{vocab_size}; vocab_size can only add tokens (use >= {rows}).")
  if vocab_size == rows:
    return table
  mean = table.mean(axis=0, keepdims=True, dtype=np.float64).astype(table.dtype)
  return np.concatenate([table, np.repeat(mean, vocab_size - rows, axis=0)])


def _target_config(reader, config: DecoderConfig | None, vocab_size: int | None) -> DecoderConfig:
  """The config to convert for: `config` (checked), else the file's own."""
  if config is None:
    overrides = {} if vocab_size is None else {"vocab_size": vocab_size}
    return decoder_config_from_gguf(reader, **overrides)
  if vocab_size is not None and vocab_size != config.vocab_size:
    raise ValueError(f"vocab_size={vocab_size} differs from config.vocab_size="
                     f"{config.vocab_size}; pass one of them (or make them equal).")
  if config.moe.enabled:
    raise ConversionError("the config has MoE layers, which llama GGUF conversion does not "
                          "support; use a dense config (moe.num_experts=0).")
  _check_rope(reader, _architecture(reader), config.resolved_head_dim)
  return config


def _put(builder: ParamsBuilder, rules, config: DecoderConfig, name: str,
         layer_match: re.Match | None, value: np.ndarray) -> None:
  """Puts dequantized tensor `name` (weights [out, in]) where the Decoder keeps it."""
  if name == "token_embd.weight":
    builder.set(("embedder", "embedding"), pad_vocab_rows(value, config.vocab_size, name), name)
  elif name == "output_norm.weight":
    builder.set(("final_norm", "scale"), value, name)
  elif name == "output.weight":
    builder.set(("lm_head", "kernel"), pad_vocab_rows(value, config.vocab_size, name).T, name)
  else:
    layer, suffix = int(layer_match.group(1)), layer_match.group(2)
    block, within = divmod(layer, config.layers_per_block)
    path_in_layer, transform = rules[suffix]
    builder.set_layer(("blocks", f"layer_{within}") + path_in_layer, block,
                      transform(value, name), name)


def convert_gguf_decoder(path: Any, config: DecoderConfig | None = None,
                         vocab_size: int | None = None,
                         expected_params: Mapping[str, Any] | None = None
                         ) -> tuple[DecoderConfig, dict[str, Any]]:
  """Returns (config, Decoder params as nested dict of float32 numpy arrays).

  path: a .gguf file (or an open gguf.GGUFReader). config: defaults to
  decoder_config_from_gguf. vocab_size: larger than the file's vocabulary
  pads the embedding (and an untied output) with mean rows; smaller raises.
  Raises ConversionError naming any tensor that does not fit the config.
  """
  reader = open_gguf(path)
  _architecture(reader)
  config = _target_config(reader, config, vocab_size)
  if expected_params is None:
    expected_params = abstract_decoder_params(config)
  builder = ParamsBuilder(expected_params)
  rules = _layer_rules(config)
  unexpected = []
  for tensor in reader.tensors:
    name = tensor.name
    if name == "output.weight" and config.tie_embeddings:
      raise ConversionError("output.weight: the file has a separate output projection but the "
                            "config ties embeddings; use tie_embeddings=False.")
    match = _LAYER.match(name)
    if name not in _GLOBAL_TENSORS and (not match or match.group(2) not in rules):
      unexpected.append(name)  # Sorted out before dequantizing: unknown tensors cost nothing.
      continue
    value = _dequantize(tensor)
    _put(builder, rules, config, name, match, value)
    del value  # One dequantized tensor alive at a time.
  check_unexpected(unexpected)
  return config, builder.finish()
