"""Hugging Face checkpoint directories (config.json + safetensors): reading them,
and converting one component (an LLM, an image encoder) to mm1_jax params.

Whole directories convert through hf_directory.convert_hf_directory, which
dispatches on model_type to this module (LLMs, vision towers) or hf_llava
(LLaVA, whose reading builds on this module).

A directory is what save_pretrained writes: config.json next to either
model.safetensors or the shards model-0000i-of-0000n.safetensors listed in
model.safetensors.index.json. The component is chosen by config.json's
model_type (LLM_MODEL_TYPES, VISION_MODEL_TYPES). Tensors are read one at a
time (LazyStateDict) and written into preallocated params arrays, so the
conversion holds the result plus about one source tensor, not the checkpoint.

A full CLIPModel / SiglipModel checkpoint holds a text tower too; only the
tensors under "vision_model." are read. transformers is
optional here: with it, config.json is read through AutoConfig (which fills
the fields the file leaves at their defaults); without it, the file's own
fields must suffice.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from types import SimpleNamespace
from typing import Any, Iterator, Mapping

# Importing ml_dtypes registers bfloat16 with numpy, which lets safetensors'
# numpy framework return bf16 tensors (as ml_dtypes.bfloat16 arrays).
import ml_dtypes  # noqa: F401
import numpy as np

from mm1_jax.conversion.params_builder import ConversionError
from mm1_jax.models.config import DecoderConfig, VitConfig

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

LLM_MODEL_TYPES = ("llama", "mistral", "qwen2", "mixtral")
# config.json model_type -> (hf_vision model type, prefix of the vision tower's
# tensors in that checkpoint or "" for all of them).
VISION_MODEL_TYPES = {
    "clip": ("clip", "vision_model."),
    "clip_vision_model": ("clip", ""),
    "siglip": ("siglip", "vision_model."),
    "siglip_vision_model": ("siglip", ""),
    "dinov2": ("dinov2", ""),
}
# Whole multimodal models (component "mm1"): vision tower + projector + LLM.
MULTIMODAL_MODEL_TYPES = ("llava",)
SUPPORTED_MODEL_TYPES = LLM_MODEL_TYPES + tuple(VISION_MODEL_TYPES) + MULTIMODAL_MODEL_TYPES
# What each component is, for messages.
COMPONENT_KINDS = {"llm": "an LLM", "encoder": "an image encoder",
                    "mm1": "a whole multimodal model (encoder, connector and LLM)"}
_VOCAB_TABLES = ("model.embed_tokens.weight", "lm_head.weight")

log = logging.getLogger(__name__)


def _read_json(path: str) -> dict[str, Any]:
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as error:
    raise ConversionError(f"{path} is not valid JSON ({error}); re-save the checkpoint.") from error


def _check_directory(directory: str) -> None:
  if not os.path.isdir(directory):
    raise ConversionError(f"{directory}: not a directory; give the folder save_pretrained wrote "
                          f"(holding {CONFIG_FILE} and {SINGLE_FILE} or {INDEX_FILE}).")


def _weight_files(directory: str) -> dict[str, str]:
  """Tensor name -> the safetensors file (path) that holds it."""
  _check_directory(directory)
  index = os.path.join(directory, INDEX_FILE)
  if os.path.isfile(index):
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
      raise ConversionError(f"{index} has no 'weight_map' (tensor name -> shard file); "
                            "re-save the checkpoint.")
    absent = sorted({f for f in weight_map.values()
                     if not os.path.isfile(os.path.join(directory, f))})
    if absent:
      raise ConversionError(f"{index} lists shard(s) missing from {directory}: "
                            f"{', '.join(absent)}; download or copy them too.")
    return {name: os.path.join(directory, f) for name, f in weight_map.items()}
  single = os.path.join(directory, SINGLE_FILE)
  if os.path.isfile(single):
    from safetensors import safe_open
    with safe_open(single, framework="numpy") as f:
      return {name: single for name in f.keys()}
  present = ", ".join(sorted(os.listdir(directory))[:12]) or "nothing"
  raise ConversionError(
      f"{directory} has neither {SINGLE_FILE} nor {INDEX_FILE} (it holds: {present}). "
      "Only safetensors checkpoints are read; re-save PyTorch .bin weights with "
      "model.save_pretrained(directory) (transformers writes safetensors by default).")


class LazyStateDict(Mapping[str, np.ndarray]):
  """The tensors of a safetensors checkpoint directory, read on access.

  keys() lists names without reading data; state[name] reads that one tensor
  as a numpy array in its stored dtype (bf16 as ml_dtypes.bfloat16) and keeps
  no reference to it. prefix: only tensors whose names start with it, with
  the prefix removed (e.g. "vision_model." for a CLIPModel's vision tower).
  Use as a context manager, or call close(), to release the files early.
  """

  def __init__(self, directory: str | os.PathLike, prefix: str = ""):
    self.directory = os.fspath(directory)
    self.prefix = prefix
    files = _weight_files(self.directory)
    self._files = {name[len(prefix):]: path for name, path in files.items()
                   if name.startswith(prefix)}
    if not self._files:
      heads = sorted({name.split(".")[0] + "." for name in files})
      raise ConversionError(f"{self.directory}: no tensor name starts with {prefix!r}; the "
                            f"names start with {', '.join(heads[:12])}.")
    self._handles: dict[str, Any] = {}  # file path -> open safe_open

  def _handle(self, path: str):
    if path not in self._handles:
      from safetensors import safe_open
      self._handles[path] = safe_open(path, framework="numpy")
    return self._handles[path]

  def __getitem__(self, name: str) -> np.ndarray:
    path = self._files[name]
    return self._handle(path).get_tensor(self.prefix + name)

  def shape(self, name: str) -> tuple[int, ...]:
    """The stored shape of tensor `name`, without reading its data."""
    path = self._files[name]
    return tuple(self._handle(path).get_slice(self.prefix + name).get_shape())

  def __iter__(self) -> Iterator[str]:
    return iter(self._files)

  def __len__(self) -> int:
    return len(self._files)

  def __contains__(self, name: object) -> bool:
    return name in self._files

  def close(self) -> None:
    self._handles.clear()  # safe_open unmaps its file when released.

  def __enter__(self) -> "LazyStateDict":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  def __repr__(self) -> str:
    return f"LazyStateDict({self.directory!r}, prefix={self.prefix!r}, {len(self)} tensors)"


def _raw_config(directory: str) -> dict[str, Any]:
  _check_directory(directory)
  path = os.path.join(directory, CONFIG_FILE)
  if not os.path.isfile(path):
    raise ConversionError(f"{directory} has no {CONFIG_FILE}; a Hugging Face checkpoint "
                          "directory holds the model's config.json next to its safetensors "
                          "(save_pretrained writes both; copy it from the model's repository).")
  return _read_json(path)


def read_hf_config(directory: str | os.PathLike) -> Any:
  """config.json of `directory` as a transformers config object (AutoConfig,
  offline), or, without transformers installed, as a SimpleNamespace of the
  file's top-level fields (nested configs stay dicts)."""
  directory = os.fspath(directory)
  raw = _raw_config(directory)
  try:
    import transformers
  except ImportError:
    return SimpleNamespace(**raw)
  return transformers.AutoConfig.from_pretrained(directory)


def model_type_of(directory: str | os.PathLike) -> str:
  """config.json's model_type; ConversionError if this module cannot convert it."""
  directory = os.fspath(directory)
  model_type = _raw_config(directory).get("model_type")
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise ConversionError(
        f"{os.path.join(directory, CONFIG_FILE)}: model_type {model_type!r} is not supported; "
        f"supported: LLMs {', '.join(LLM_MODEL_TYPES)}; image encoders "
        f"{', '.join(VISION_MODEL_TYPES)}; multimodal models (encoder + connector + LLM) "
        f"{', '.join(MULTIMODAL_MODEL_TYPES)}.")
  return model_type


@contextlib.contextmanager
def config_fields(directory: str):
  """Turns the AttributeError of a field config.json lacks (read without
  transformers, whose AutoConfig would fill in its default) into a
  ConversionError saying so."""
  try:
    yield
  except AttributeError as error:
    raise ConversionError(f"{directory}/{CONFIG_FILE}: {error}; add the field, or install "
                          "transformers, whose AutoConfig fills in defaults.") from error


def _check_overrides(cls: type, overrides: Mapping[str, Any], model_type: str) -> None:
  fields = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ConversionError(f"{model_type} converts to a {cls.__name__}, which has no field(s) "
                          f"{', '.join(unknown)}; valid: {', '.join(sorted(fields))}.")


def _rope_type(hf_config: Any) -> str:
  """"default", or the rope scaling scheme (llama3, yarn, linear, ...)."""
  for field in ("rope_parameters", "rope_scaling"):  # transformers 5 / config.json of 4.x.
    values = getattr(hf_config, field, None)
    if isinstance(values, Mapping):
      kind = values.get("rope_type", values.get("type"))
      if kind not in (None, "default"):
        return kind
  return "default"


def check_llm_supported(hf_config: Any, model_type: str) -> None:
  """Refuses settings Decoder does not implement, which would convert silently wrong."""
  problems = []
  if getattr(hf_config, "hidden_act", "silu") != "silu":
    problems.append(f"hidden_act={hf_config.hidden_act!r} (Decoder's MLP is SwiGLU: silu)")
  if _rope_type(hf_config) != "default":
    problems.append(f"rope scaling {_rope_type(hf_config)!r} (Decoder has plain RoPE)")
  for flag in ("attention_bias", "mlp_bias"):
    if getattr(hf_config, flag, False):
      problems.append(f"{flag}=True")
  if problems:
    raise ConversionError(f"{model_type} config with {'; '.join(problems)} is not supported by "
                          "mm1_jax's Decoder.")
  window = getattr(hf_config, "sliding_window", None)
  uses_window = getattr(hf_config, "use_sliding_window", model_type != "qwen2")
  if window and uses_window:
    # Exact for sequences up to the window; beyond it Decoder attends to the whole prefix.
    log.warning("%s: sliding_window=%s is ignored (full causal attention); outputs match "
                "the checkpoint for sequences of up to %s tokens.", model_type, window, window)


def _with_dtype(tree: Mapping[str, Any], dtype: Any) -> dict[str, Any]:
  """Abstract params with every leaf's dtype set to `dtype`."""
  import jax
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, np.dtype(dtype)), dict(tree))


class _PaddedVocab(Mapping[str, Any]):
  """A state dict whose embedding / lm_head are padded to vocab_size rows."""

  def __init__(self, state: Mapping[str, Any], vocab_size: int):
    self.state, self.vocab_size = state, vocab_size

  def __getitem__(self, name: str) -> Any:
    value = self.state[name]
    if name in _VOCAB_TABLES:
      from mm1_jax.conversion.gguf_llm import pad_vocab_rows
      value = pad_vocab_rows(np.asarray(value), self.vocab_size, name)
    return value

  def __iter__(self) -> Iterator[str]:
    return iter(self.state)

  def __len__(self) -> int:
    return len(self.state)

  def __contains__(self, name: object) -> bool:
    return name in self.state  # Mapping's default would read the tensor.


def decoder_params(state: Mapping[str, Any], config: DecoderConfig, dtype: Any,
                   pad_vocab: bool = False) -> dict[str, Any]:
  """Decoder params from a state dict with HF Llama-family names, read tensor
  by tensor into preallocated arrays of `dtype`. pad_vocab: the embedding
  (and an untied lm_head) has fewer rows than config.vocab_size; the new rows
  start at the mean row."""
  from mm1_jax.conversion.hf_llm import abstract_decoder_params, convert_decoder
  source = _PaddedVocab(state, config.vocab_size) if pad_vocab else state
  return convert_decoder(source, config, _with_dtype(abstract_decoder_params(config), dtype))


def convert_llm(directory: str, hf_config: Any, model_type: str, dtype: Any,
                 overrides: dict[str, Any]) -> tuple[DecoderConfig, dict[str, Any]]:
  from mm1_jax.conversion.hf_llm import decoder_config_from_hf
  _check_overrides(DecoderConfig, overrides, model_type)
  check_llm_supported(hf_config, model_type)
  with config_fields(directory):
    config = decoder_config_from_hf(hf_config, **overrides)
  with LazyStateDict(directory) as state:
    params = decoder_params(state, config, dtype, pad_vocab="vocab_size" in overrides)
  return config, params


def convert_encoder(directory: str, hf_config: Any, model_type: str, dtype: Any,
                     overrides: dict[str, Any]) -> tuple[VitConfig, dict[str, Any]]:
  from mm1_jax.conversion.hf_vision import convert_hf_vision, vit_config_from_hf
  vision_type, prefix = VISION_MODEL_TYPES[model_type]
  _check_overrides(VitConfig, overrides, model_type)
  with config_fields(directory):
    config = vit_config_from_hf(hf_config, vision_type, **overrides)
  with LazyStateDict(directory, prefix=prefix) as state:
    params = convert_hf_vision(state, config, vision_type, dtype=dtype)
  return config, params
