"""mm1_jax -> Hugging Face transformers directories.

    export_llm(params["llm"], model_config.llm, "exported/llm", dtype="bfloat16")

writes what `LlamaForCausalLM.from_pretrained` (or Qwen2ForCausalLM,
MixtralForCausalLM: hf_llm.hf_model_type) reads: config.json,
generation_config.json and the weights as safetensors, sharded with an index
when they exceed max_shard_bytes (safetensors_writer). The tensor names and
layouts are the importer's own table read backwards (hf_llm.export_decoder),
so a checkpoint imported from Hugging Face exports to identical tensors.

`export_llava(params, model_config, output)` writes a whole MM1Model whose
encoder is CLIP- or SigLIP-shaped and whose connector is the MLP as a
LlavaForConditionalGeneration directory (config.json, generation_config.json,
preprocessor_config.json, weights; hf_llava.llava_export_problem says why
another model is not one).

A model that is not a LLaVA (the C-Abstractor or pooling connectors) has no
transformers class as a whole; `export_vision_tower` writes its encoder, when
CLIP- or SigLIP-shaped, as a CLIPVisionModel / SiglipVisionModel directory,
and `export_connector` its connector as connector.safetensors in our own
layout with a README saying so.

`export_tokenizer(vocabulary, output)` adds the run's tokenizer where
transformers reproduces it exactly: a GGUF byte-level BPE vocabulary
(data.vocabulary=smollm2) is already a `tokenizers` tokenizer, saved as
tokenizer.json with our appended special tokens (<image>, <|user|>, ...).
The bundled SentencePiece vocabulary is not exported: transformers'
LlamaTokenizer splits user-defined symbols and leading spaces differently
from seqio's SentencePiece encoding, so the same text would give other ids.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

from mm1_jax.conversion import hf_llava, hf_llm, hf_vision, safetensors_writer
from mm1_jax.models.config import ConnectorConfig, DecoderConfig, MM1Config, VitConfig

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
PREPROCESSOR_FILE = hf_llava.PREPROCESSOR_FILE
CONNECTOR_FILE = "connector.safetensors"
CONNECTOR_CONFIG_FILE = "connector_config.json"
README_FILE = "README.md"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"


def _write_json(path: str, value: Mapping[str, Any]) -> None:
  with open(path, "w") as f:
    json.dump(value, f, indent=2)
    f.write("\n")


def export_llm(params: Mapping[str, Any], config: DecoderConfig, output: str, *,
               dtype: str = "float32",
               max_shard_bytes: int = safetensors_writer.DEFAULT_MAX_SHARD_BYTES,
               max_position_embeddings: int = 4096, bos_token_id: int | None = None,
               eos_token_id: int | None = None) -> dict[str, Any]:
  """Writes the LLM `params` (a Decoder(config)'s tree, host numpy arrays) as a
  transformers causal-LM directory `output`. Returns its config.json values.

  dtype: "float32" | "bfloat16", of the stored weights. bos / eos token ids:
  the run's vocabulary's, for generation_config.json (generate stops at eos).
  Raises ConversionError (before writing anything) for an LLM no transformers
  class holds.
  """
  values = hf_llm.hf_config_dict(config, dtype=dtype,
                                 max_position_embeddings=max_position_embeddings,
                                 bos_token_id=bos_token_id, eos_token_id=eos_token_id)
  _write(output, values, lambda: hf_llm.export_decoder(params, config), dtype, max_shard_bytes,
         generation={"bos_token_id": bos_token_id, "eos_token_id": eos_token_id})
  return values


def export_llava(params: Mapping[str, Any], config: MM1Config, output: str, *,
                 dtype: str = "float32",
                 max_shard_bytes: int = safetensors_writer.DEFAULT_MAX_SHARD_BYTES,
                 max_position_embeddings: int = 4096, eos_token_id: int | None = None
                 ) -> dict[str, Any]:
  """Writes MM1Model(config)'s `params` (host numpy arrays) as a transformers
  LlavaForConditionalGeneration directory `output`; returns its config.json
  values. Raises ConversionError (before writing anything) when the model is
  not a LLaVA (hf_llava.llava_export_problem)."""
  values = hf_llava.hf_llava_config_dict(config, dtype=dtype,
                                         max_position_embeddings=max_position_embeddings,
                                         eos_token_id=eos_token_id)
  _write(output, values, lambda: hf_llava.export_llava(params, config), dtype, max_shard_bytes,
         generation={"eos_token_id": eos_token_id})
  _write_json(os.path.join(output, PREPROCESSOR_FILE), hf_llava.hf_image_processor_dict(config))
  return values


def export_vision_tower(params: Mapping[str, Any], config: VitConfig, output: str, *,
                        dtype: str = "float32") -> dict[str, Any] | None:
  """Writes a CLIP- or SigLIP-shaped encoder (hf_vision.hf_vision_type) as a
  transformers CLIPVisionModel / SiglipVisionModel directory holding the
  blocks up to the feature layer, so its last_hidden_state is our encoder's
  features (CLIP: after the class token's position). Returns its config.json
  values, or None (nothing written) for another encoder."""
  vision_type = hf_vision.hf_vision_type(config)
  if vision_type is None:
    return None
  values = {"architectures": [f"{'CLIP' if vision_type == 'clip' else 'Siglip'}VisionModel"],
            **hf_vision.hf_vision_config_dict(config, vision_type), "dtype": dtype}
  _write(output, values, lambda: hf_vision.export_hf_vision(params, config, vision_type),
         dtype, safetensors_writer.DEFAULT_MAX_SHARD_BYTES)
  return values


def export_connector(params: Mapping[str, Any], config: ConnectorConfig, vision_width: int,
                     llm_width: int, output: str) -> list[str]:
  """Writes the connector's params as output/connector.safetensors, in
  mm1_jax's own layout (names "/"-joined paths of the params tree, kernels
  [in, out]), its ConnectorConfig as connector_config.json and a README.
  Returns the tensor names."""
  import dataclasses

  from flax import traverse_util
  flat = {"/".join(path): leaf for path, leaf in
          traverse_util.flatten_dict(dict(params)).items()}
  os.makedirs(output, exist_ok=True)
  safetensors_writer.write_sharded(output, lambda: iter(sorted(flat.items())),
                                   max_shard_bytes=None, single_file=CONNECTOR_FILE)
  _write_json(os.path.join(output, CONNECTOR_CONFIG_FILE),
              {**dataclasses.asdict(config), "vision_width": vision_width,
               "llm_width": llm_width})
  with open(os.path.join(output, README_FILE), "w") as f:
    f.write(f"# mm1_jax connector: {config.kind}\n\n"
            f"transformers has no class for the {config.kind!r} vision-language connector, so "
            "it is stored here in mm1_jax's own layout: connector.safetensors holds the "
            "parameters of mm1_jax.models.connectors (names are \"/\"-joined paths of its "
            "params tree; linear kernels are [in, out], not torch's [out, in]), "
            "connector_config.json its ConnectorConfig. It maps the vision tower's patch "
            f"features [batch, patches, {vision_width}] to {config.num_image_tokens} image "
            f"tokens of width {llm_width} for the LLM.\n\n"
            "Load it back with mm1_jax: flax.traverse_util.unflatten_dict of the tensors "
            "(split each name at \"/\") is the params of "
            "mm1_jax.models.connectors.build_connector(ConnectorConfig(**config), llm_width).\n")
  return sorted(flat)


def _write(output: str, values: Mapping[str, Any], tensors: safetensors_writer.TensorSource,
           dtype: str, max_shard_bytes: int,
           generation: Mapping[str, int | None] | None = None) -> None:
  """The weights and config.json of a model directory, and for a generative
  model generation_config.json (`generation`'s ids that are set)."""
  os.makedirs(output, exist_ok=True)
  safetensors_writer.write_sharded(output, tensors, dtype=dtype, max_shard_bytes=max_shard_bytes)
  _write_json(os.path.join(output, CONFIG_FILE), values)
  if generation is not None:
    _write_json(os.path.join(output, GENERATION_CONFIG_FILE),
                {key: value for key, value in generation.items() if value is not None})


def export_tokenizer(vocabulary: Any, output: str, model_max_length: int) -> str | None:
  """Writes tokenizer.json + tokenizer_config.json of a GGUF byte-level BPE
  vocabulary (data.gguf_vocabulary.GgufBpeVocabulary) into `output`, for
  transformers.AutoTokenizer; returns None (writing nothing) for another
  kind of vocabulary, which transformers would encode differently (module
  docstring). Encodes like the vocabulary: no BOS, no EOS added."""
  from mm1_jax.data.gguf_vocabulary import GgufBpeVocabulary
  if not isinstance(vocabulary, GgufBpeVocabulary):
    return None
  os.makedirs(output, exist_ok=True)
  vocabulary.tokenizer.save(os.path.join(output, TOKENIZER_FILE))
  eos = vocabulary.id_to_token(vocabulary.eos_id)
  _write_json(os.path.join(output, TOKENIZER_CONFIG_FILE), {
      "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "pad_token": eos,
      "bos_token": None, "unk_token": None, "add_bos_token": False, "add_eos_token": False,
      "clean_up_tokenization_spaces": False, "model_max_length": model_max_length})
  return output
