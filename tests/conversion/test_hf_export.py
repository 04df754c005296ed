"""Export to transformers, checked by round trips at small random configs: HF -> mm1_jax ->
HF gives identical tensors; mm1_jax -> HF gives the same logits in transformers; bfloat16
and sharded files load; LLMs transformers cannot hold are refused before anything is written."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from mm1_jax import testing
from mm1_jax.conversion import hf_export, safetensors_writer
from mm1_jax.conversion.hf_llm import (abstract_decoder_params, convert_decoder,
                                       decoder_config_from_hf)
from mm1_jax.conversion.params_builder import ConversionError
from mm1_jax.models.config import DecoderConfig, MoeConfig
from mm1_jax.models.decoder import Decoder

VOCAB, WIDTH, HEADS, KV_HEADS, MLP = 97, 64, 8, 2, 96
HF_CLASSES = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
              "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
              "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM)}


def random_hf(model_type, tie=False):
  torch.manual_seed(0)
  config_class, model_class = HF_CLASSES[model_type]
  extra = {"num_local_experts": 4, "num_experts_per_tok": 2} if model_type == "mixtral" else {}
  config = config_class(vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=MLP,
                        num_hidden_layers=2, num_attention_heads=HEADS,
                        num_key_value_heads=KV_HEADS, rope_theta=5000.0, rms_norm_eps=1e-5,
                        tie_word_embeddings=tie, attn_implementation="eager", **extra)
  model = model_class(config).eval()
  with torch.no_grad():  # Every tensor random (some inits are zeros or ones, or left empty).
    for param in model.parameters():
      param.normal_(0.0, 0.05)
  return model


def hf_logits(model, ids):
  with torch.no_grad():
    return model(torch.tensor(ids)).logits.numpy()


def tokens(batch=2, length=11):
  return np.random.default_rng(0).integers(0, VOCAB, (batch, length))


def reload(directory):
  model = transformers.AutoModelForCausalLM.from_pretrained(directory,
                                                            attn_implementation="eager")
  return model.eval()


@pytest.mark.parametrize("model_type,tie", [("llama", False), ("llama", True), ("qwen2", False),
                                            ("mixtral", False)])
def test_hf_to_mm1_to_hf_gives_identical_tensors(model_type, tie, tmp_path):
  original = random_hf(model_type, tie)
  config = decoder_config_from_hf(original.config)
  params = convert_decoder(original.state_dict(), config)
  values = hf_export.export_llm(params, config, str(tmp_path))
  assert values["model_type"] == model_type
  exported = reload(str(tmp_path))
  assert type(exported) is type(original)
  before, after = original.state_dict(), exported.state_dict()
  assert sorted(after) == sorted(before)
  for name, tensor in before.items():
    assert torch.equal(after[name], tensor), name
  ids = tokens()
  np.testing.assert_array_equal(hf_logits(exported, ids), hf_logits(original, ids))


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "mixtral"])
def test_mm1_logits_equal_the_exported_models(model_type, tmp_path):
  moe = MoeConfig(num_experts=4, num_experts_per_token=2, moe_every=1) if (
      model_type == "mixtral") else MoeConfig()
  config = DecoderConfig(vocab_size=VOCAB, width=WIDTH, depth=2, num_heads=HEADS,
                         num_kv_heads=KV_HEADS, mlp_dim=MLP, rope_theta=5000.0,
                         qkv_bias=model_type == "qwen2", moe=moe)
  params = testing.random_tree(abstract_decoder_params(config), seed=3, stddev=0.1)
  ids = tokens()
  ours, _ = Decoder(config).apply({"params": params}, jnp.asarray(ids))
  hf_export.export_llm(jax.device_get(params), config, str(tmp_path))
  theirs = hf_logits(reload(str(tmp_path)), ids)
  ours = np.asarray(ours, np.float64)
  assert np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)) <= 1e-5


def test_bfloat16_shards_with_an_index(tmp_path):
  original = random_hf("llama")
  config = decoder_config_from_hf(original.config)
  params = convert_decoder(original.state_dict(), config)
  # ~57 kB per layer in bfloat16: 50 kB shards give several files.
  hf_export.export_llm(params, config, str(tmp_path), dtype="bfloat16",
                       max_shard_bytes=50_000, bos_token_id=1, eos_token_id=2)
  with open(tmp_path / safetensors_writer.INDEX_FILE) as f:
    index = json.load(f)
  files = sorted(set(index["weight_map"].values()))
  assert len(files) >= 3 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
  assert not (tmp_path / safetensors_writer.SINGLE_FILE).exists()
  assert sorted(os.listdir(tmp_path)) == sorted(
      files + ["config.json", "generation_config.json", safetensors_writer.INDEX_FILE])
  for file in files:  # Each shard within the limit unless one tensor alone exceeds it.
    assert os.path.getsize(tmp_path / file) < 50_000 + 4096
  exported = reload(str(tmp_path))
  assert exported.config.dtype == torch.bfloat16
  assert exported.generation_config.eos_token_id == 2
  after = exported.state_dict()
  assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in after.values())
  for name, tensor in original.state_dict().items():
    assert after[name].dtype == torch.bfloat16
    assert torch.equal(after[name], tensor.to(torch.bfloat16)), name


def test_llms_transformers_cannot_hold_are_refused(tmp_path):
  interleaved = DecoderConfig(vocab_size=VOCAB, width=WIDTH, depth=2, num_heads=HEADS,
                              num_kv_heads=KV_HEADS, mlp_dim=MLP,
                              moe=MoeConfig(num_experts=4, moe_every=2))
  with pytest.raises(ConversionError, match=r"moe_every=2: dense and MoE layers interleaved"):
    hf_export.export_llm({}, interleaved, str(tmp_path / "out"))
  assert not (tmp_path / "out").exists()
  with pytest.raises(ValueError, match="dtype 'float16'"):
    safetensors_writer.write_sharded(str(tmp_path / "w"), lambda: iter(()), dtype="float16")


def tiny_run(workdir, *arguments, lora=None, connector=None, seq_len=64):
  """A workdir with config.json and a step-7 checkpoint of random params of the tiny
  model (configs/tiny.py:ARGUMENTS; lora / connector: model.lora / model.connector
  fields, alpha 2 x rank by default), built on the host."""
  from configs import tiny
  from mm1_jax.experiment import Experiment
  from mm1_jax.training import trainer
  config = tiny.get_config(",".join(arguments))
  config.data.seq_len = seq_len
  if lora:
    config.model.lora.update({"alpha": 2.0 * lora["rank"], **lora})
  config.model.connector.update(connector or {})
  experiment = Experiment.from_config(config)
  testing.write_random_checkpoint(experiment, str(workdir), step=7)
  trainer.write_config(experiment, str(workdir))
  return experiment


def test_the_cli_exports_a_runs_llm(tmp_path):
  import subprocess
  import sys

  from process_env import one_device_env

  from mm1_jax.data import tokenizer
  experiment = tiny_run(tmp_path / "run", "dense")
  output = tmp_path / "hf"
  result = subprocess.run(
      [sys.executable, "-m", "mm1_jax.convert", "--to=hf", f"--workdir={tmp_path / 'run'}",
       "--step=7", f"--output={output}"],
      cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
      env=one_device_env(), capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert (f"as a transformers LlamaForCausalLM (float32) to {output} (not the whole model: "
          "model.connector.kind='c_abstractor'") in result.stdout
  assert "tokenizer (the bundled SentencePiece model) is not exported" in result.stdout
  model = reload(str(output))
  assert model.config.max_position_embeddings == 64
  assert model.generation_config.eos_token_id == tokenizer.get_vocabulary().eos_id
  llm = testing.random_params(experiment.model)["llm"]  # What write_random_checkpoint saved.
  ids = np.random.default_rng(0).integers(0, experiment.model.llm.vocab_size, (2, 9))
  ours, _ = Decoder(experiment.model.llm).apply({"params": llm}, jnp.asarray(ids))
  theirs = hf_logits(model, ids)
  assert np.max(np.abs(np.asarray(ours, np.float64) - theirs)) / np.max(np.abs(theirs)) <= 1e-5

  # The C-Abstractor has no transformers class: the vision tower goes as a CLIPVisionModel
  # (its patch features equal our encoder's), the connector in our layout with a README.
  from mm1_jax.models.vit import VisionTransformer
  params = testing.random_params(experiment.model)
  assert f"Also the vision tower (transformers.AutoModel): {output / 'vision_tower'}" in (
      result.stdout)
  tower = transformers.AutoModel.from_pretrained(output / "vision_tower").eval()
  assert type(tower).__name__ == "CLIPVisionModel"
  pixels = np.random.default_rng(2).standard_normal((2, 64, 64, 3)).astype(np.float32)
  features = VisionTransformer(experiment.model.encoder).apply({"params": params["encoder"]},
                                                               pixels)
  with torch.no_grad():
    hidden = tower(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2))).last_hidden_state
  np.testing.assert_allclose(hidden[:, 1:].numpy(), np.asarray(features), rtol=1e-5, atol=1e-5)
  from flax import traverse_util
  from safetensors.numpy import load_file
  stored = load_file(output / "connector" / hf_export.CONNECTOR_FILE)
  expected = traverse_util.flatten_dict(params["connector"], sep="/")
  assert sorted(stored) == sorted(expected)
  for name, value in expected.items():
    np.testing.assert_array_equal(stored[name], value)
  assert "transformers has no class for the 'c_abstractor'" in (
      output / "connector" / hf_export.README_FILE).read_text()


def test_export_refusals_name_the_fix(tmp_path):
  from mm1_jax import convert
  tiny_run(tmp_path / "moe")  # The default tiny LLM: MoE every 2nd layer.
  with pytest.raises(ConversionError, match="moe_every=2"):
    convert.export_run_to_hf(str(tmp_path / "moe"), str(tmp_path / "out"))
  assert not (tmp_path / "out").exists()
  with pytest.raises(FileNotFoundError, match=r"--step=3: .* no checkpoint of that step "
                     r"\(saved steps: \[7\]\)"):
    convert.step_source(str(tmp_path / "moe"), 3)
  tiny_run(tmp_path / "vision_lora", "dense",
           lora={"rank": 4, "targets": ("llm/blocks/*", "encoder/blocks/*")})
  with pytest.raises(ValueError, match=r"adapters outside the LLM \(encoder/blocks/"):
    convert.export_run_to_hf(str(tmp_path / "vision_lora"), str(tmp_path / "out"),
                             lora_as="peft")
  assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("lora_as", ["merged", "peft"])
def test_a_lora_run_exports_merged_or_as_peft_adapters(lora_as, tmp_path):
  import peft

  from mm1_jax import convert
  experiment = tiny_run(tmp_path / "run_lora", "dense", lora={"rank": 4})
  lora = experiment.model.lora
  description = convert.export_run_to_hf(str(tmp_path / "run_lora"), str(tmp_path / "hf"),
                                         lora_as=lora_as)
  model = reload(str(tmp_path / "hf"))
  if lora_as == "peft":
    assert description["written"]["adapter"] == str(tmp_path / "hf" / "adapter")
    model = peft.PeftModel.from_pretrained(model, str(tmp_path / "hf" / "adapter")).eval()
  llm = testing.random_params(experiment.model)["llm"]  # Adapters with B != 0 included.
  ids = np.random.default_rng(1).integers(0, experiment.model.llm.vocab_size, (2, 9))
  ours, _ = Decoder(experiment.model.llm, lora=lora).apply({"params": llm}, jnp.asarray(ids))
  theirs = hf_logits(model, ids)
  assert np.max(np.abs(np.asarray(ours, np.float64) - theirs)) / np.max(np.abs(theirs)) <= 1e-5


def random_llava(vision, feature_layer):
  """A tiny LlavaForConditionalGeneration (CLIP or SigLIP tower), every tensor random."""
  torch.manual_seed(0)
  shape = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
               num_attention_heads=2, intermediate_size=64)
  vision_config = (transformers.CLIPVisionConfig(**shape, hidden_act="quick_gelu")
                   if vision == "clip" else transformers.SiglipVisionConfig(**shape))
  config = transformers.LlavaConfig(
      vision_config=vision_config, image_token_index=100, vision_feature_layer=feature_layer,
      text_config=transformers.LlamaConfig(hidden_size=32, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2,
                                           intermediate_size=64, vocab_size=128),
      vision_feature_select_strategy="default" if vision == "clip" else "full")
  model = transformers.LlavaForConditionalGeneration(config)
  with torch.no_grad():
    for param in model.parameters():
      param.normal_(0.0, 0.05)
  return model.eval()


def llava_logits(model, seed=0):
  """Two rows, each one run of 16 image tokens amid text; random pixels."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, 100, (2, 28))
  ids[0, 5:21] = ids[1, 2:18] = 100
  pixels = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
  with torch.no_grad():
    return model(input_ids=torch.from_numpy(ids), pixel_values=torch.from_numpy(pixels)).logits


@pytest.mark.parametrize("vision,feature_layer", [("clip", -1), ("clip", -2), ("siglip", -1)])
def test_llava_to_mm1_to_llava(vision, feature_layer, tmp_path):
  """Every tensor LLaVA's features use comes back identical, and the logits with them;
  the blocks after the feature layer and the unused final norms are not imported, so
  the export's tower ends at the feature layer with identity final norms."""
  from mm1_jax.conversion.hf_directory import convert_hf_directory
  original = random_llava(vision, feature_layer)
  original.save_pretrained(tmp_path / "hf")
  _, parts, params = convert_hf_directory(str(tmp_path / "hf"))
  config = parts.mm1_config(dtype="float32", max_images=1)
  values = hf_export.export_llava(params, config, str(tmp_path / "out"))
  assert values["vision_config"]["num_hidden_layers"] == 2 + feature_layer + 1
  exported = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
  after = exported.state_dict()
  unused = ("post_layernorm", "vision_tower.head", f"layers.{2 + feature_layer + 1}.")
  compared = [name for name in original.state_dict()
              if not ("vision_tower" in name and any(u in name for u in unused))]
  assert len(compared) > 40 and set(compared) <= set(after)
  for name in compared:
    assert torch.equal(after[name], original.state_dict()[name]), name
  torch.testing.assert_close(llava_logits(exported), llava_logits(original), rtol=0, atol=0)
  processor = json.loads((tmp_path / "out" / "preprocessor_config.json").read_text())
  assert processor["size"] == {"height": 32, "width": 32}
  assert processor["image_mean"] == list(config.encoder.image_mean)


def test_models_that_are_not_a_llava_are_named():
  from configs import tiny
  from mm1_jax import config_lib
  from mm1_jax.conversion import hf_llava
  model = config_lib.mm1_config(tiny.get_config("dense"))
  assert "model.connector.kind='c_abstractor'" in hf_llava.llava_export_problem(model)
  import dataclasses
  mlp = model.replace(connector=dataclasses.replace(model.connector, kind="mlp",
                                                    num_image_tokens=64))
  assert hf_llava.llava_export_problem(mlp) is None  # tiny's ViT is CLIP-shaped.
  assert "num_image_tokens=16 is not one per patch (64)" in hf_llava.llava_export_problem(
      mlp.replace(connector=dataclasses.replace(mlp.connector, num_image_tokens=16)))
  with pytest.raises(ConversionError, match="not a LLaVA: model.connector.kind='c_abstractor'"):
    hf_export.export_llava({}, model, "/nonexistent/never_written")


def test_an_mm1_model_with_the_mlp_connector_gives_its_logits_as_a_llava(tmp_path):
  """The tiny model (CLIP-shaped ViT, 8 x 8 patches) with the MLP connector, random
  params: transformers' LLaVA on the normalised pixels gives our logits."""
  import dataclasses

  from configs import tiny
  from mm1_jax import config_lib
  from mm1_jax.models.multimodal import MM1Model
  model = config_lib.mm1_config(tiny.get_config("dense"))
  model = model.replace(max_images=1, connector=dataclasses.replace(
      model.connector, kind="mlp", num_image_tokens=model.encoder.num_patches))
  params = testing.random_params(model, seed=4, stddev=0.1)
  hf_export.export_llava(params, model, str(tmp_path))
  exported = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
  rng = np.random.default_rng(0)
  ids = rng.integers(4, 200, (2, 80))
  ids[0, 3:67] = ids[1, 10:74] = model.image_placeholder_id
  images = rng.integers(0, 256, (2, 1, 64, 64, 3), dtype=np.uint8)
  ours, _ = MM1Model(model).apply({"params": params}, ids, images, np.ones((2, 1), bool))
  mean, std = (np.asarray(v, np.float32) for v in (model.encoder.image_mean,
                                                   model.encoder.image_std))
  pixels = ((images[:, 0] / 255.0 - mean) / std).astype(np.float32).transpose(0, 3, 1, 2)
  with torch.no_grad():
    theirs = exported(input_ids=torch.from_numpy(ids),
                      pixel_values=torch.from_numpy(pixels)).logits.numpy()
  assert np.max(np.abs(np.asarray(ours, np.float64) - theirs)) / np.max(np.abs(theirs)) <= 1e-5


def test_a_run_with_the_mlp_connector_exports_whole_as_a_llava(tmp_path):
  from mm1_jax import convert
  tiny_run(tmp_path / "run", "dense", connector={"kind": "mlp", "num_image_tokens": 64},
           seq_len=128)
  description = convert.export_run_to_hf(str(tmp_path / "run"), str(tmp_path / "hf"))
  assert description["written"] == {"llava": str(tmp_path / "hf")}
  assert description["not_llava"] is None
  model = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path / "hf")
  assert type(model).__name__ == "LlavaForConditionalGeneration"
  assert model.config.image_token_index == 3
  assert model.config.text_config.max_position_embeddings == 128
  only_llm = convert.export_run_to_hf(str(tmp_path / "run"), str(tmp_path / "llm"), export="llm")
  assert only_llm["written"] == {"llm": str(tmp_path / "llm")}
  assert only_llm["not_llava"] == "--export=llm"
