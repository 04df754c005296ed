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


def tiny_run(workdir, *arguments, lora_rank=0):
  """A workdir with config.json and a step-7 checkpoint of random params of the tiny
  model (configs/tiny.py:ARGUMENTS; LoRA adapters of lora_rank, alpha 2 x rank, on
  the LLM's layers), built on the host."""
  from configs import tiny
  from mm1_jax.experiment import Experiment
  from mm1_jax.training import trainer
  config = tiny.get_config(",".join(arguments))
  config.data.seq_len = 64
  if lora_rank:
    config.model.lora.update(rank=lora_rank, alpha=2.0 * lora_rank)
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
  assert f"as a transformers LlamaForCausalLM (float32) to {output}" in result.stdout
  assert "tokenizer (the bundled SentencePiece model) is not exported" in result.stdout
  model = reload(str(output))
  assert model.config.max_position_embeddings == 64
  assert model.generation_config.eos_token_id == tokenizer.get_vocabulary().eos_id
  llm = testing.random_params(experiment.model)["llm"]  # What write_random_checkpoint saved.
  ids = np.random.default_rng(0).integers(0, experiment.model.llm.vocab_size, (2, 9))
  ours, _ = Decoder(experiment.model.llm).apply({"params": llm}, jnp.asarray(ids))
  theirs = hf_logits(model, ids)
  assert np.max(np.abs(np.asarray(ours, np.float64) - theirs)) / np.max(np.abs(theirs)) <= 1e-5


def test_export_refusals_name_the_fix(tmp_path):
  from mm1_jax import convert
  tiny_run(tmp_path / "moe")  # The default tiny LLM: MoE every 2nd layer.
  with pytest.raises(ConversionError, match="moe_every=2"):
    convert.export_run_to_hf(str(tmp_path / "moe"), str(tmp_path / "out"))
  assert not (tmp_path / "out").exists()
  with pytest.raises(FileNotFoundError, match=r"--step=3: .* no checkpoint of that step "
                     r"\(saved steps: \[7\]\)"):
    convert.step_source(str(tmp_path / "moe"), 3)


@pytest.mark.parametrize("lora_as", ["merged", "peft"])
def test_a_lora_run_exports_merged_or_as_peft_adapters(lora_as, tmp_path):
  import peft

  from mm1_jax import convert
  experiment = tiny_run(tmp_path / "run_lora", "dense", lora_rank=4)
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
