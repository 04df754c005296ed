"""Hugging Face LLaVA checkpoints (LlavaForConditionalGeneration) -> MM1Model.

    parts, params = convert_llava_directory("path/to/llava-1.5-7b-hf")
    config = parts.mm1_config(dtype="float32")  # MM1Config with the three parts.
    logits, _ = MM1Model(config).apply({"params": params}, tokens, images, image_mask)

LLaVA is a vision tower (CLIP or SigLIP) whose patch features at
vision_feature_layer go through a two-layer projector (linear_1, GELU,
linear_2) into the LLM (Llama / Mistral / Qwen2 / Mixtral) at the positions of
its image tokens. That is MM1Model with a VisionTransformer (feature_layer
from vision_feature_layer), the "mlp" connector (MlpConnector: fc1, exact
GELU, fc2) and a Decoder, image_placeholder_id = image_token_index; one
image is a run of num_patches image tokens, as LLaVA's processor expands it.
The towers go through hf_vision and hf_llm (via safetensors_dir's helpers);
only the projector's names are mapped here. Tensors are read one at a time.

Tensor names, both accepted: the model's state_dict() in transformers 5
(model.vision_tower.*, model.multi_modal_projector.*, model.language_model.*
with layers / embed_tokens / norm, lm_head.weight) and what save_pretrained
writes (transformers 5.24 too) and hub checkpoints hold (vision_tower.*, with
or without vision_model., multi_modal_projector.*, language_model.model.*,
language_model.lm_head.weight).

Refused with a one-line ConversionError, because the result would differ
from the checkpoint's model: a list vision_feature_layer (features of
several layers concatenated), a feature layer that is the patch embeddings
(0), a vision_feature_select_strategy that keeps CLIP's class token ("full")
or drops one of SigLIP's patches ("default"), projector_hidden_act other
than "gelu", multimodal_projector_bias=False, other vision towers, an
untied config without an lm_head tensor, a tied one whose lm_head differs
from the embedding. Image normalisation comes from preprocessor_config.json
(or processor_config.json) when the directory holds one, else the tower's
usual constants.
"""

from __future__ import annotations

import dataclasses
import os
import re
from types import SimpleNamespace
from typing import Any, Iterator, Mapping

import numpy as np

from mm1_jax.conversion import safetensors_dir
from mm1_jax.conversion.params_builder import ConversionError, ParamsBuilder, check_unexpected
from mm1_jax.models.config import (ConnectorConfig, DecoderConfig, MM1Config, VitConfig,
                                   validate)

MODEL_TYPE = "llava"
# LlavaConfig's defaults, for a config.json read without transformers.
DEFAULT_FEATURE_LAYER = -2
DEFAULT_IMAGE_TOKEN_ID = 32000
PREPROCESSOR_FILE = "preprocessor_config.json"
PROCESSOR_FILE = "processor_config.json"  # Nests the image processor's under "image_processor".
# The strategy that hands the projector exactly the patch tokens: CLIP's
# first token is its class token ("default" drops it), SigLIP has none.
_PATCHES_ONLY_STRATEGY = {"clip": "default", "siglip": "full"}

# Stored name prefix -> (part, canonical prefix: the names hf_vision / hf_llm
# read). transformers 5's state_dict, then save_pretrained / hub checkpoints.
_PREFIXES = (
    ("model.vision_tower.", "encoder", ""),
    ("vision_tower.", "encoder", ""),
    ("model.multi_modal_projector.", "connector", ""),
    ("multi_modal_projector.", "connector", ""),
    ("model.language_model.", "llm", "model."),
    ("language_model.model.", "llm", "model."),
    ("lm_head.", "llm", "lm_head."),
    ("language_model.lm_head.", "llm", "lm_head."),
)
_PROJECTOR = re.compile(r"^linear_([12])\.(weight|bias)$")


@dataclasses.dataclass(frozen=True)
class MM1Parts:
  """The MM1Config fields a whole converted model fixes (convert.py writes
  them as --config.model.* overrides); the rest (dtype, max_images, freezing,
  LoRA) are the run's own."""
  encoder: VitConfig
  connector: ConnectorConfig
  llm: DecoderConfig
  image_placeholder_id: int

  def mm1_config(self, **fields) -> MM1Config:
    """A validated MM1Config with these parts and `fields` (dtype, max_images, ...)."""
    config = MM1Config(**{f.name: getattr(self, f.name) for f in dataclasses.fields(self)},
                       **fields)
    validate(config)
    return config


def _namespace(values: Any) -> Any:
  """A config object, or a config.json dict (read without transformers) as one."""
  return SimpleNamespace(**values) if isinstance(values, Mapping) else values


def _vision_type(vision: Any) -> str:
  model_type = getattr(vision, "model_type", None)
  vision_type = safetensors_dir.VISION_MODEL_TYPES.get(model_type, (None,))[0]
  if vision_type not in _PATCHES_ONLY_STRATEGY:
    raise ConversionError(f"llava: vision_config model_type {model_type!r} is not supported; "
                          "the vision tower must be CLIP or SigLIP (clip_vision_model, "
                          "siglip_vision_model).")
  return vision_type


def feature_layer_from_hf(vision_feature_layer: Any, depth: int) -> int:
  """VitConfig.feature_layer for LLaVA's vision_feature_layer, an index into
  the tower's hidden_states (depth + 1 of them: the embeddings, then each
  block's output): k < 0 is the same block counted from the end, k > 0 is
  block k - 1."""
  if isinstance(vision_feature_layer, (list, tuple)):
    raise ConversionError(f"llava: vision_feature_layer={list(vision_feature_layer)} concatenates "
                          "several layers' features, which mm1_jax's encoder (one feature layer) "
                          "does not; only an int (one layer) converts.")
  k = int(vision_feature_layer)
  if -depth <= k <= -1 or 1 <= k <= depth:
    return k if k < 0 else k - 1
  what = ("the patch embeddings, before any block" if k in (0, -depth - 1) else
          "no layer")
  raise ConversionError(f"llava: vision_feature_layer={k} selects {what} of a {depth}-block "
                        f"vision tower; mm1_jax's encoder takes a block's output (1..{depth} "
                        f"or -{depth}..-1).")


def _check_strategy(strategy: Any, vision_type: str, num_patches: int) -> None:
  wanted = _PATCHES_ONLY_STRATEGY[vision_type]
  if strategy == wanted:
    return
  if vision_type == "clip" and strategy == "full":
    raise ConversionError("llava: vision_feature_select_strategy='full' feeds CLIP's class token "
                          "to the projector as an image token, but mm1_jax's encoder drops it; "
                          "only 'default' converts exactly (a checkpoint trained with 'full' "
                          "has no exact equivalent).")
  if vision_type == "siglip" and strategy == "default":
    raise ConversionError(f"llava: vision_feature_select_strategy='default' drops the first of "
                          f"SigLIP's {num_patches} patch tokens (SigLIP has no class token), but "
                          "mm1_jax's MLP connector keeps every patch; only 'full' converts "
                          "exactly (as SigLIP-based LLaVA checkpoints set it).")
  raise ConversionError(f"llava: unknown vision_feature_select_strategy {strategy!r}; "
                        f"{wanted!r} converts for a {vision_type} tower.")


def _split_overrides(overrides: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
  """(VitConfig overrides, DecoderConfig overrides); a field both have
  (remat_policy, attention_*) goes to both."""
  if "feature_layer" in overrides:
    raise ConversionError("llava: feature_layer cannot be overridden: the projector was trained "
                          "on the features of the checkpoint's vision_feature_layer.")
  vit = {f.name for f in dataclasses.fields(VitConfig)}
  llm = {f.name for f in dataclasses.fields(DecoderConfig)}
  unknown = sorted(set(overrides) - vit - llm)
  if unknown:
    raise ConversionError(f"llava: no field(s) {', '.join(unknown)} in its encoder (VitConfig) "
                          "or LLM (DecoderConfig).")
  return ({k: v for k, v in overrides.items() if k in vit},
          {k: v for k, v in overrides.items() if k in llm})


def llava_configs_from_hf(hf_config: Any, **overrides
                          ) -> tuple[VitConfig, ConnectorConfig, DecoderConfig, int]:
  """(encoder, connector, llm, image_token_id) of a LlavaConfig (or its
  config.json as a namespace / dict). overrides: fields of VitConfig or
  DecoderConfig (e.g. image_size, vocab_size, remat_policy); feature_layer
  is the checkpoint's. Raises ConversionError for what MM1Model cannot
  reproduce exactly."""
  from mm1_jax.conversion.hf_llm import decoder_config_from_hf
  from mm1_jax.conversion.hf_vision import vit_config_from_hf
  hf_config = _namespace(hf_config)
  encoder_overrides, llm_overrides = _split_overrides(overrides)
  vision = _namespace(getattr(hf_config, "vision_config", None) or {})
  text = _namespace(getattr(hf_config, "text_config", None) or {})
  vision_type = _vision_type(vision)
  text_type = getattr(text, "model_type", "llama")
  if text_type not in safetensors_dir.LLM_MODEL_TYPES:
    raise ConversionError(f"llava: text_config model_type {text_type!r} is not supported; "
                          f"supported: {', '.join(safetensors_dir.LLM_MODEL_TYPES)}.")
  act = getattr(hf_config, "projector_hidden_act", "gelu")
  if act != "gelu":
    raise ConversionError(f"llava: projector_hidden_act={act!r} is not supported; mm1_jax's MLP "
                          "connector uses exact GELU ('gelu').")
  if not getattr(hf_config, "multimodal_projector_bias", True):
    raise ConversionError("llava: multimodal_projector_bias=False is not supported; mm1_jax's "
                          "MLP connector's linears have biases.")
  feature_layer = feature_layer_from_hf(
      getattr(hf_config, "vision_feature_layer", DEFAULT_FEATURE_LAYER), vision.num_hidden_layers)
  # hidden_states[k] of the tower is a block's output before any final norm
  # (SigLIP's post_layernorm only makes last_hidden_state).
  encoder = vit_config_from_hf(vision, vision_type, feature_layer=feature_layer,
                               final_norm=False, **encoder_overrides)
  _check_strategy(getattr(hf_config, "vision_feature_select_strategy", "default"), vision_type,
                  encoder.num_patches)
  safetensors_dir.check_llm_supported(text, f"llava text_config ({text_type})")
  # LlavaConfig ties when either level says so (it forwards text_config's flag).
  tied = bool(getattr(hf_config, "tie_word_embeddings", False) or
              getattr(text, "tie_word_embeddings", False))
  llm = decoder_config_from_hf(text, **{"tie_embeddings": tied, **llm_overrides})
  image_token_id = getattr(hf_config, "image_token_id", None)
  if image_token_id is None:
    image_token_id = getattr(hf_config, "image_token_index", DEFAULT_IMAGE_TOKEN_ID)
  if not 0 <= image_token_id < llm.vocab_size:
    raise ConversionError(f"llava: image_token_index {image_token_id} is not a token of the "
                          f"LLM's vocabulary of {llm.vocab_size}.")
  connector = ConnectorConfig(kind="mlp", num_image_tokens=encoder.num_patches)
  return encoder, connector, llm, int(image_token_id)


class _Part(Mapping[str, Any]):
  """One part's tensors under canonical names, read on access."""

  def __init__(self, state: Mapping[str, Any], names: dict[str, str]):
    self.state, self.names = state, names  # names: canonical -> stored.

  def __getitem__(self, name: str) -> Any:
    return self.state[self.names[name]]

  def __iter__(self) -> Iterator[str]:
    return iter(self.names)

  def __len__(self) -> int:
    return len(self.names)

  def __contains__(self, name: object) -> bool:
    return name in self.names  # Mapping's default would read the tensor.


def split_parts(state: Mapping[str, Any], directory: str = "llava") -> dict[str, _Part]:
  """{"encoder", "connector", "llm"} -> that part's tensors of a LLaVA state
  dict, named as hf_vision / hf_llm / the projector mapping read them.
  Reads names only. Raises ConversionError for a name of no part, two names
  of one tensor, or a part with no tensors."""
  parts: dict[str, dict[str, str]] = {"encoder": {}, "connector": {}, "llm": {}}
  unknown = []
  for stored in state:
    for prefix, part, canonical_prefix in _PREFIXES:
      if stored.startswith(prefix):
        canonical = canonical_prefix + stored[len(prefix):]
        if canonical in parts[part]:
          raise ConversionError(f"{directory}: {parts[part][canonical]!r} and {stored!r} name the "
                                "same tensor; keep one.")
        parts[part][canonical] = stored
        break
    else:
      unknown.append(stored)
  if unknown:
    raise ConversionError(f"{directory}: {len(unknown)} tensor(s) of no LLaVA part (vision_tower, "
                          "multi_modal_projector, language_model): "
                          f"{', '.join(sorted(unknown)[:8])}")
  empty = [part for part, names in parts.items() if not names]
  if empty:
    raise ConversionError(f"{directory}: no tensors for the {', '.join(empty)}; names start with "
                          f"{', '.join(sorted({p for p, _, _ in _PREFIXES}))}.")
  return {part: _Part(state, names) for part, names in parts.items()}


def abstract_connector_params(connector: ConnectorConfig, vision_width: int,
                              llm_width: int) -> Mapping[str, Any]:
  """Shapes of the connector's params (float32), nothing allocated."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  from mm1_jax.models.connectors import build_connector

  features = jax.ShapeDtypeStruct((1, connector.num_image_tokens, vision_width), jnp.float32)
  variables = jax.eval_shape(build_connector(connector, llm_width).init, jax.random.key(0),
                             features)
  return nn.unbox(variables)["params"]


def convert_projector(state: Mapping[str, Any], connector: ConnectorConfig, vision_width: int,
                      llm_width: int, dtype: Any = np.float32) -> dict[str, Any]:
  """multi_modal_projector's linear_1 / linear_2 (torch [out, in]) -> MlpConnector
  params {"mlp": {"fc1": {kernel [Dv, D], bias}, "fc2": ...}}."""
  expected = safetensors_dir._with_dtype(  # pylint: disable=protected-access
      abstract_connector_params(connector, vision_width, llm_width), dtype)
  builder = ParamsBuilder(expected)
  unexpected = []
  for name in state:
    match = _PROJECTOR.match(name)
    if not match:
      unexpected.append(f"multi_modal_projector.{name}")
      continue
    value = np.asarray(state[name])
    kind = "kernel" if match.group(2) == "weight" else "bias"
    builder.set(("mlp", f"fc{match.group(1)}", kind), value.T if kind == "kernel" else value,
                f"multi_modal_projector.{name}")
  check_unexpected(unexpected)
  return builder.finish()


def _check_output_layer(llm_state: _Part, llm: DecoderConfig, directory: str) -> None:
  """The lm_head the checkpoint holds agrees with tie_word_embeddings."""
  head, embedding = "lm_head.weight", "model.embed_tokens.weight"
  if head not in llm_state:
    if not llm.tie_embeddings:
      raise ConversionError(f"{directory}: config.json says tie_word_embeddings=false (top level "
                            "and text_config) but the checkpoint has no lm_head.weight; set it "
                            "true if the output layer is the embedding, or add the tensor.")
    return
  if llm.tie_embeddings and embedding in llm_state and not np.array_equal(
      llm_state[head], llm_state[embedding]):
    raise ConversionError(f"{directory}: config.json says tie_word_embeddings=true but the "
                          f"checkpoint's {llm_state.names[head]} differs from the embedding "
                          "(transformers would ignore it); set tie_word_embeddings=false at the "
                          "top level and in text_config if the output layer is its own.")


def _image_normalisation(directory: str) -> dict[str, tuple[float, ...]]:
  """image_mean / image_std of the directory's image processor config, if any."""
  for name in (PREPROCESSOR_FILE, PROCESSOR_FILE):
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
      continue
    values = safetensors_dir._read_json(path)  # pylint: disable=protected-access
    values = values.get("image_processor", values) if name == PROCESSOR_FILE else values
    found = {}
    for field in ("image_mean", "image_std"):
      value = values.get(field)
      if value is not None:
        value = value if isinstance(value, (list, tuple)) else [value] * 3
        found[field] = tuple(float(v) for v in value)
    return found
  return {}


def convert_llava_directory(directory: str | os.PathLike, dtype: Any = np.float32, **overrides
                            ) -> tuple[MM1Parts, dict[str, Any]]:
  """Converts a LLaVA checkpoint directory (save_pretrained of
  LlavaForConditionalGeneration). Returns (MM1Parts, params {"encoder",
  "connector", "llm"}), numpy arrays of `dtype`.

  overrides: fields of VitConfig or DecoderConfig, as llava_configs_from_hf
  (vocab_size larger than the checkpoint's pads the embedding, image_size
  resizes the position grid and the image-token count with it).
  """
  from mm1_jax.conversion.hf_vision import convert_hf_vision
  directory = os.fspath(directory)
  hf_config = safetensors_dir.read_hf_config(directory)
  overrides = {**_image_normalisation(directory), **overrides}
  with safetensors_dir.config_fields(directory):
    encoder, connector, llm, image_token_id = llava_configs_from_hf(hf_config, **overrides)
  vision_type = _vision_type(_namespace(_namespace(hf_config).vision_config))
  with safetensors_dir.LazyStateDict(directory) as state:
    parts = split_parts(state, directory)
    _check_output_layer(parts["llm"], llm, directory)
    params = {
        "encoder": convert_hf_vision(parts["encoder"], encoder, vision_type, dtype=dtype),
        "connector": convert_projector(parts["connector"], connector, encoder.width, llm.width,
                                       dtype),
        "llm": safetensors_dir.decoder_params(parts["llm"], llm, dtype,
                                              pad_vocab="vocab_size" in overrides),
    }
  return MM1Parts(encoder, connector, llm, image_token_id), params


# ---------------------------------------------------------------------------
# Export: MM1Model -> LlavaForConditionalGeneration.

# Where each part's tensors go in save_pretrained's layout (transformers 5.24 and the hub's).
_EXPORT_PREFIXES = {"encoder": "vision_tower.", "connector": "multi_modal_projector.",
                    "model.": "language_model.model.", "lm_head.": "language_model.lm_head."}


def llava_export_problem(config: MM1Config) -> str | None:
  """Why MM1Model(config) is not a LlavaForConditionalGeneration, or None if it is:
  a CLIP- or SigLIP-shaped encoder (hf_vision.hf_vision_type) whose position
  embeddings are for its own grid, its features not through a final norm,
  the "mlp" connector with one token per patch, and an LLM transformers
  holds (hf_llm.hf_model_type)."""
  from mm1_jax.conversion import hf_llm, hf_vision
  encoder, connector = config.encoder, config.connector
  if connector.kind != "mlp":
    return (f"model.connector.kind={connector.kind!r}: LLaVA's projector is the 'mlp' connector; "
            "transformers has no class for this one")
  if connector.num_image_tokens != encoder.num_patches:
    return (f"model.connector.num_image_tokens={connector.num_image_tokens} is not one per patch "
            f"({encoder.num_patches}), as LLaVA's projector gives")
  vision_type = hf_vision.hf_vision_type(encoder)
  if vision_type is None:
    return ("the encoder is neither CLIP- nor SigLIP-shaped (class token + pre-norm, no patch "
            "bias; or patch bias, no class token, no pre-norm; no layer scale)")
  if encoder.trained_grid_size != encoder.grid_size:
    return (f"model.encoder.pos_grid_size={encoder.pos_grid_size}: the position embeddings are "
            f"resized to the {encoder.grid_size}x{encoder.grid_size} grid at run time, which "
            "LLaVA's vision tower does not do")
  if encoder.uses_final_norm:
    return ("model.encoder.final_norm applies to the features; LLaVA takes a block's output "
            "(hidden_states) before any final norm")
  try:
    hf_llm.hf_model_type(config.llm)
  except ConversionError as error:
    return str(error).rstrip(".")
  return None


def hf_llava_config_dict(config: MM1Config, *, dtype: str = "float32",
                         max_position_embeddings: int = 4096,
                         eos_token_id: int | None = None) -> dict[str, Any]:
  """config.json of the LlavaForConditionalGeneration holding MM1Model(config);
  ConversionError naming what it cannot hold (llava_export_problem)."""
  from mm1_jax.conversion import hf_llm, hf_vision
  problem = llava_export_problem(config)
  if problem:
    raise ConversionError(f"not a LLaVA: {problem}.")
  vision_type = hf_vision.hf_vision_type(config.encoder)
  text = hf_llm.hf_config_dict(config.llm, dtype=dtype,
                               max_position_embeddings=max_position_embeddings,
                               eos_token_id=eos_token_id)
  return {
      "architectures": ["LlavaForConditionalGeneration"], "model_type": MODEL_TYPE,
      "vision_config": hf_vision.hf_vision_config_dict(config.encoder, vision_type),
      "text_config": text, "image_token_index": config.image_placeholder_id,
      "image_seq_length": config.encoder.num_patches,
      # The built blocks only: the feature layer is the tower's last.
      "vision_feature_layer": -1,
      "vision_feature_select_strategy": _PATCHES_ONLY_STRATEGY[vision_type],
      "projector_hidden_act": "gelu", "multimodal_projector_bias": True,
      "tie_word_embeddings": config.llm.tie_embeddings, "dtype": dtype,
  }


def export_llava(params: Mapping[str, Any], config: MM1Config
                 ) -> Iterator[tuple[str, np.ndarray]]:
  """(name as save_pretrained writes it, tensor) of every tensor of
  MM1Model(config)'s params (host numpy arrays): the vision tower through
  hf_vision.export_hf_vision, the projector (fc1 / fc2 -> linear_1 / linear_2),
  the LLM through hf_llm.export_decoder."""
  from mm1_jax.conversion import hf_llm, hf_vision
  vision_type = hf_vision.hf_vision_type(config.encoder)
  for name, tensor in hf_vision.export_hf_vision(params["encoder"], config.encoder, vision_type):
    yield _EXPORT_PREFIXES["encoder"] + name, tensor
  mlp = params["connector"]["mlp"]
  for index in (1, 2):
    layer = mlp[f"fc{index}"]
    yield f"multi_modal_projector.linear_{index}.weight", np.asarray(layer["kernel"]).T
    yield f"multi_modal_projector.linear_{index}.bias", np.asarray(layer["bias"])
  for name, tensor in hf_llm.export_decoder(params["llm"], config.llm):
    prefix = "model." if name.startswith("model.") else "lm_head."
    yield _EXPORT_PREFIXES[prefix] + name[len(prefix):], tensor


def hf_image_processor_dict(config: MM1Config) -> dict[str, Any]:
  """preprocessor_config.json: resize to the encoder's square size (no crop;
  bilinear, as mm1_jax.data.images' 'stretch' policy, whose TensorFlow
  antialiasing differs from PIL's in the last bits), scale to [0, 1],
  normalise with the encoder's mean and std."""
  size = config.encoder.image_size
  return {"image_processor_type": "CLIPImageProcessor", "do_resize": True,
          "size": {"height": size, "width": size}, "resample": 2, "do_center_crop": False,
          "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
          "image_mean": list(config.encoder.image_mean),
          "image_std": list(config.encoder.image_std), "do_convert_rgb": True}
