"""Hugging Face LLaVA directories (LlavaForConditionalGeneration.save_pretrained)
-> MM1Model, against transformers' logits at tiny random configs."""

import json
import os
import shutil

import flax.linen as nn
import jax
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from absl import flags
from ml_collections import config_flags

from mm1_jax import config_lib, convert
from mm1_jax.conversion.hf_llava import feature_layer_from_hf
from mm1_jax.conversion.params_builder import ConversionError
from mm1_jax.conversion.hf_directory import convert_hf_directory
from mm1_jax.models.config import ConnectorConfig
from mm1_jax.models.multimodal import MM1Model
from mm1_jax.training import trainer

IMAGE_TOKEN, VOCAB, NUM_PATCHES = 100, 128, 16
VISION = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
              num_attention_heads=2, intermediate_size=64)
TEXT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=64, vocab_size=VOCAB)
# A preprocessor_config.json the CLIP directory holds: its normalisation is used.
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
HEAD = "language_model.lm_head.weight"  # As save_pretrained names it.


def build(vision: str, feature_layer: int):
  """A LlavaForConditionalGeneration with every tensor randomised (HF starts
  biases at 0 and norms at 1, which would hide a transposed one)."""
  torch.manual_seed(0)
  if vision == "clip":
    vision_config = transformers.CLIPVisionConfig(**VISION, hidden_act="quick_gelu")
  else:
    vision_config = transformers.SiglipVisionConfig(**VISION)
  config = transformers.LlavaConfig(
      vision_config=vision_config, text_config=transformers.LlamaConfig(**TEXT),
      image_token_index=IMAGE_TOKEN, vision_feature_layer=feature_layer,
      vision_feature_select_strategy="default" if vision == "clip" else "full")
  model = transformers.LlavaForConditionalGeneration(config)
  with torch.no_grad():
    for param in model.parameters():
      param.add_(0.05 * torch.randn_like(param))
  return model.eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """(vision, feature_layer) -> (the HF model, its save_pretrained directory)."""
  cache = {}

  def get(vision: str = "clip", feature_layer: int = -1):
    if (vision, feature_layer) not in cache:
      model = build(vision, feature_layer)
      directory = tmp_path_factory.mktemp(f"llava_{vision}{feature_layer}")
      model.save_pretrained(directory)
      if vision == "clip":
        (directory / "preprocessor_config.json").write_text(
            json.dumps({"image_mean": MEAN, "image_std": STD}))
      cache[vision, feature_layer] = model, str(directory)
    return cache[vision, feature_layer]
  return get


def inputs(rng):
  """tokens [2, 28], each row one run of NUM_PATCHES image tokens amid text, and
  uint8 images [2, 1, 32, 32, 3]."""
  tokens = rng.integers(0, IMAGE_TOKEN, (2, 28))
  tokens[0, 5:5 + NUM_PATCHES] = IMAGE_TOKEN
  tokens[1, 2:2 + NUM_PATCHES] = IMAGE_TOKEN
  images = rng.integers(0, 256, (2, 1, 32, 32, 3), dtype=np.uint8)
  return tokens, images


@pytest.mark.parametrize("vision,feature_layer", [("clip", -1), ("clip", -2), ("siglip", -1)])
def test_logits_match_transformers(saved, vision, feature_layer):
  model, directory = saved(vision, feature_layer)
  component, parts, params = convert_hf_directory(directory)
  assert component == "mm1" and set(params) == {"encoder", "connector", "llm"}
  assert parts.connector == ConnectorConfig(kind="mlp", num_image_tokens=NUM_PATCHES)
  assert parts.image_placeholder_id == IMAGE_TOKEN and parts.encoder.feature_layer == feature_layer
  assert parts.encoder.num_layers_built == 2 + feature_layer + 1  # Later blocks not built.
  if vision == "clip":
    assert (parts.encoder.image_mean, parts.encoder.image_std) == (MEAN, STD)
  config = parts.mm1_config(dtype="float32", max_images=1)
  tokens, images = inputs(np.random.default_rng(0))
  ours, _ = jax.jit(MM1Model(config).apply)({"params": params}, tokens, images,
                                            np.ones((2, 1), bool))
  mean, std = (np.asarray(v, np.float32) for v in (config.encoder.image_mean,
                                                   config.encoder.image_std))
  pixels = (images[:, 0].astype(np.float32) / 255.0 - mean) / std  # As normalize_images.
  with torch.no_grad():
    reference = model(input_ids=torch.from_numpy(tokens),
                      pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2))).logits.numpy()
  difference = float(np.max(np.abs(np.asarray(ours) - reference)))
  print(f"llava {vision} vision_feature_layer={feature_layer}: max |logit difference| "
        f"{difference:.2e} (logits up to {np.max(np.abs(reference)):.2f})")
  np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-5)


def parsed_model_config(overrides):
  """The MM1Config the train CLI would build from base_config() and `overrides`."""
  argv = ["train"] + overrides
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_dict("config", config_lib.base_config(), flag_values=flag_values,
                                  sys_argv=argv)
  flag_values(argv)
  return config_lib.mm1_config(flag_values.config)


def test_convert_writes_the_model_and_the_overrides_that_load_it(saved, tmp_path):
  _, directory = saved("clip", -2)
  component, parts, params = convert.convert(directory)
  output = str(tmp_path / "llava")
  convert.write(output, component, parts, params, directory)
  with open(os.path.join(output, convert.COMPONENT_FILE)) as f:
    description = json.load(f)
  overrides = description["config_overrides"]
  for expected in ("--config.model.image_placeholder_id=100", "--config.model.connector.kind=mlp",
                   "--config.model.connector.num_image_tokens=16",
                   "--config.model.encoder.feature_layer=-2", "--config.model.llm.width=32"):
    assert expected in overrides
  model = parsed_model_config(overrides)
  assert (model.encoder, model.connector, model.llm, model.image_placeholder_id) == (
      parts.encoder, parts.connector, parts.llm, parts.image_placeholder_id)

  # --config.init_from=output fills all three parts of that model.
  tokens, images = inputs(np.random.default_rng(0))
  abstract = nn.unbox(jax.eval_shape(MM1Model(model).init, jax.random.key(0), tokens[:1],
                                     images[:1], np.ones((1, 1), bool)))["params"]
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          abstract)
  loaded, sources = trainer.load_init_from([output], abstract, abstract)
  assert sources == {part: output for part in ("encoder", "connector", "llm")}
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(loaded), params)


def llava_config(directory):
  with open(os.path.join(directory, "config.json")) as f:
    return json.load(f)


def edited(saved, tmp_path, vision="clip", **fields):
  """A copy of the saved directory's config.json (no weights: these are
  refused before any tensor is read) with `fields` changed."""
  values = llava_config(saved(vision, -1)[1])
  values.update(fields)
  target = tmp_path / "_".join(fields)
  target.mkdir()
  (target / "config.json").write_text(json.dumps(values))
  return target


@pytest.mark.parametrize("vision,fields,message", [
    ("clip", {"vision_feature_select_strategy": "full"},
     r"vision_feature_select_strategy='full' feeds CLIP's class token.*only 'default'"),
    ("siglip", {"vision_feature_select_strategy": "default"},
     r"'default' drops the first of SigLIP's 16 patch tokens.*only 'full'"),
    ("clip", {"vision_feature_layer": [-2, -1]},
     r"vision_feature_layer=\[-2, -1\] concatenates several layers"),
    ("clip", {"vision_feature_layer": 0}, r"vision_feature_layer=0 selects the patch embeddings"),
    ("clip", {"projector_hidden_act": "gelu_pytorch_tanh"},
     r"projector_hidden_act='gelu_pytorch_tanh' is not supported.*exact GELU"),
    ("clip", {"multimodal_projector_bias": False}, r"multimodal_projector_bias=False"),
])
def test_what_would_convert_wrong_is_refused_in_one_line(saved, tmp_path, vision, fields, message):
  with pytest.raises(ConversionError, match=message) as error:
    convert_hf_directory(edited(saved, tmp_path, vision, **fields))
  assert "\n" not in str(error.value)


def test_feature_layer_indexes_hidden_states():
  # hidden_states: [embeddings, block 0, ..., block depth-1].
  assert [feature_layer_from_hf(k, 4) for k in (-1, -2, -4, 1, 4)] == [-1, -2, -4, 0, 3]
  for k in (5, -5):
    with pytest.raises(ConversionError):
      feature_layer_from_hf(k, 4)


def test_output_layer_must_agree_with_tie_word_embeddings(saved, tmp_path):
  _, directory = saved("clip", -1)
  tensors = safetensors.numpy.load_file(os.path.join(directory, "model.safetensors"))
  untied = shutil.copytree(directory, tmp_path / "untied")
  safetensors.numpy.save_file({k: v for k, v in tensors.items() if k != HEAD},
                              os.path.join(untied, "model.safetensors"), metadata={"format": "pt"})
  with pytest.raises(ConversionError, match="tie_word_embeddings=false.*no lm_head.weight"):
    convert_hf_directory(untied)
  # Tied, yet the stored lm_head is not the embedding: transformers would drop it.
  tied = shutil.copytree(directory, tmp_path / "tied")
  (tied / "config.json").write_text(json.dumps({**llava_config(directory),
                                                "tie_word_embeddings": True}))
  with pytest.raises(ConversionError, match=f"=true but the checkpoint's {HEAD} differs"):
    convert_hf_directory(tied)


def test_llm_flags_apply_to_the_llm_and_feature_layer_is_refused(saved):
  _, directory = saved("clip", -1)
  _, parts, params = convert.convert(directory, vocab_size=VOCAB + 4)
  assert parts.llm.vocab_size == VOCAB + 4
  assert params["llm"]["embedder"]["embedding"].shape == (VOCAB + 4, 32)
  with pytest.raises(ConversionError, match="feature_layer cannot be overridden"):
    convert.convert(directory, feature_layer=-2)
