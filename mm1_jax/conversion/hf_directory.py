"""Hugging Face checkpoint directories -> mm1_jax params, whatever the model.

    component, config, params = convert_hf_directory("path/to/Qwen2-0.5B")
    # component "llm": config is a DecoderConfig, params Decoder params;
    # component "encoder": a VitConfig and VisionTransformer params;
    # component "mm1" (a LLaVA): an hf_llava.MM1Parts and the params
    # {"encoder", "connector", "llm"} of MM1Model.

config.json's model_type chooses the importer: safetensors_dir for LLMs
and vision towers, hf_llava for LLaVA (LlavaForConditionalGeneration),
which converts whole, its three parts at once.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from mm1_jax.conversion import hf_llava, safetensors_dir
from mm1_jax.conversion.params_builder import ConversionError


def convert_hf_directory(directory: str | os.PathLike, component: str | None = None, *,
                         dtype: Any = np.float32, **config_overrides
                         ) -> tuple[str, Any, dict[str, Any]]:
  """Converts a Hugging Face checkpoint directory; returns (component, config, params).

  component: "llm", "encoder" or "mm1"; None infers it from config.json's
    model_type (given, it must agree).
  dtype: of the returned numpy arrays (e.g. np.float32, jnp.bfloat16).
  config_overrides: fields of the component's config (DecoderConfig or
    VitConfig) to change, e.g. remat_policy="full"; for an LLM, vocab_size
    larger than the checkpoint's pads the embedding (and an untied lm_head)
    with mean rows; for an encoder, image_size resizes the position grid and
    feature_layer picks the output block. A LLaVA ("mm1") takes the fields of
    either (hf_llava.convert_llava_directory).
  Raises ConversionError naming what does not fit (model_type, files,
  tensors whose shapes differ from the config).
  """
  directory = os.fspath(directory)
  model_type = safetensors_dir.model_type_of(directory)
  inferred = ("llm" if model_type in safetensors_dir.LLM_MODEL_TYPES else
              "mm1" if model_type in safetensors_dir.MULTIMODAL_MODEL_TYPES else "encoder")
  if component is not None and component != inferred:
    kind = safetensors_dir.COMPONENT_KINDS[inferred]
    raise ConversionError(f"{directory}: component={component!r}, but its model_type "
                          f"{model_type!r} is {kind} (component {inferred!r}); leave "
                          "component unset.")
  if inferred == "mm1":
    config, params = hf_llava.convert_llava_directory(directory, dtype=dtype,
                                                       **config_overrides)
    return inferred, config, params
  hf_config = safetensors_dir.read_hf_config(directory)
  convert_component = (safetensors_dir.convert_llm if inferred == "llm"
                       else safetensors_dir.convert_encoder)
  config, params = convert_component(directory, hf_config, model_type, dtype, config_overrides)
  return inferred, config, params
