"""Hugging Face checkpoint directories (save_pretrained output) -> mm1_jax,
against the transformers models' own outputs at tiny random configs."""

import collections
import copy
import json
import os
import shutil
import sys
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

from mm1_jax.conversion.hf_directory import convert_hf_directory
from mm1_jax.conversion.hf_vision import convert_hf_vision, vit_config_from_hf
from mm1_jax.conversion.params_builder import ConversionError
from mm1_jax.conversion.safetensors_dir import (INDEX_FILE, LazyStateDict,
                                                read_hf_config)
from mm1_jax.models.decoder import Decoder
from mm1_jax.models.vit import VisionTransformer

TOL = 1e-4
VOCAB = 97
LLM = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
           num_attention_heads=8, num_key_value_heads=2)
VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              image_size=32, patch_size=8)


def perturbed(model):
  """`model` in eval mode with every tensor randomised: HF starts biases at 0
  and norms at 1 (a transposed one would go unnoticed), and leaves Mixtral's
  fused expert tensors uninitialised."""
  torch.manual_seed(0)
  with torch.no_grad():
    for name, param in model.named_parameters():
      if "experts" in name:
        param.normal_(0.0, 0.05)
      else:
        param.add_(0.05 * torch.randn_like(param))
  return model.eval()


def build(kind: str):
  torch.manual_seed(0)
  if kind == "llama":
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLM, rope_theta=5000.0))
  if kind == "qwen2":
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**LLM))
  if kind == "mixtral":
    return transformers.MixtralForCausalLM(transformers.MixtralConfig(
        **LLM, num_local_experts=4, num_experts_per_tok=2))
  if kind == "clip":  # The full two-tower model; only its vision tower converts.
    return transformers.CLIPModel(transformers.CLIPConfig(
        text_config=dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                         num_hidden_layers=1, num_attention_heads=4, bos_token_id=0,
                         eos_token_id=1, pad_token_id=1),
        vision_config=VISION, projection_dim=16))
  if kind == "siglip":
    return transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**VISION))
  if kind == "dinov2":
    config = {k: v for k, v in VISION.items() if k != "intermediate_size"}
    return transformers.Dinov2Model(transformers.Dinov2Config(**config, mlp_ratio=2))
  raise ValueError(kind)


# Sharded saves exercise model.safetensors.index.json.
SHARDED = {"llama", "clip"}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """kind -> (the HF model, the directory it was saved to); built on first use."""
  cache = {}

  def get(kind: str):
    if kind not in cache:
      model = perturbed(build(kind))
      directory = str(tmp_path_factory.mktemp(kind))
      model.save_pretrained(directory, **({"max_shard_size": "40KB"} if kind in SHARDED else {}))
      cache[kind] = model, directory
    return cache[kind]
  return get


def rel_err(ours, reference) -> float:
  ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
  assert ours.shape == reference.shape, (ours.shape, reference.shape)
  return float(np.max(np.abs(ours - reference)) / np.max(np.abs(reference)))


def test_sharded_save_is_read_through_the_index(saved):
  model, directory = saved("llama")
  shards = [f for f in os.listdir(directory) if f.endswith(".safetensors")]
  assert os.path.exists(os.path.join(directory, INDEX_FILE)) and len(shards) > 1
  with LazyStateDict(directory) as state:
    assert set(state) == set(model.state_dict())
    name = "model.layers.1.mlp.up_proj.weight"
    assert state.shape(name) == (96, 64)
    np.testing.assert_array_equal(state[name], model.state_dict()[name].numpy())


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mixtral"])
def test_llm_directory_logits_match_transformers(saved, kind):
  model, directory = saved(kind)
  component, config, params = convert_hf_directory(directory)
  assert component == "llm" and config.qkv_bias == (kind == "qwen2")
  assert config.moe.num_experts == (4 if kind == "mixtral" else 0)
  ids = np.random.default_rng(0).integers(0, VOCAB, (2, 11))
  with torch.no_grad():
    reference = model(torch.tensor(ids)).logits.numpy()
  logits, _ = Decoder(config).apply({"params": params}, jnp.asarray(ids))
  error = rel_err(logits, reference)
  print(f"{kind}: max relative logit error {error:.2e}")
  assert error <= TOL


def vision_reference(kind: str, model, x: np.ndarray) -> np.ndarray:
  """last_hidden_state's patch tokens [B, N, D] for images x [B, H, W, 3]."""
  tower = model.vision_model if kind == "clip" else model
  with torch.no_grad():
    out = tower(pixel_values=torch.from_numpy(x.transpose(0, 3, 1, 2))).last_hidden_state
  return out[:, 1:].numpy() if kind in ("clip", "dinov2") else out.numpy()  # No class token.


@pytest.mark.parametrize("kind", ["clip", "siglip", "dinov2"])
def test_vision_directory_matches_transformers(saved, kind):
  model, directory = saved(kind)
  component, config, params = convert_hf_directory(directory)
  assert component == "encoder" and config.width == 64 and config.depth == 2
  x = np.random.default_rng(1).normal(size=(2, 32, 32, 3)).astype(np.float32)
  ours = jax.jit(VisionTransformer(config).apply)({"params": params}, x)
  error = rel_err(ours, vision_reference(kind, model, x))
  print(f"{kind}: max relative patch-feature error {error:.2e}")
  assert error <= TOL


def test_clip_text_tower_is_not_read(saved):
  _, directory = saved("clip")
  state = LazyStateDict(directory, prefix="vision_model.")
  assert "embeddings.patch_embedding.weight" in state
  assert not any(k.startswith(("text_model.", "visual_projection", "logit_scale")) for k in state)
  assert read_hf_config(directory).vision_config.hidden_size == 64


class CountingReads(Mapping):
  """A state dict that counts how often each tensor is read."""

  def __init__(self, state):
    self.state, self.reads = state, collections.Counter()

  def __getitem__(self, name):
    self.reads[name] += 1
    return self.state[name]

  def __iter__(self):
    return iter(self.state)

  def __len__(self):
    return len(self.state)


def test_vision_converter_reads_each_tensor_once(saved):
  """Tensor by tensor: listing names reads nothing, each tensor is read once."""
  _, directory = saved("dinov2")
  state = CountingReads(LazyStateDict(directory))
  config = vit_config_from_hf(read_hf_config(directory), "dinov2")
  convert_hf_vision(state, config, "dinov2", check=False)
  assert set(state.reads) == set(state) - {"embeddings.mask_token"}  # mask_token: unused.
  assert set(state.reads.values()) == {1}


def test_bfloat16_directory(saved, tmp_path):
  """bf16 safetensors read as ml_dtypes.bfloat16 (numpy has no bf16) and
  convert to bf16 params that hold the stored values exactly."""
  model, _ = saved("siglip")
  copy.deepcopy(model).to(torch.bfloat16).save_pretrained(tmp_path)
  name = "encoder.layers.0.mlp.fc1.weight"
  value = LazyStateDict(tmp_path)[name]
  assert value.dtype == ml_dtypes.bfloat16
  stored = model.state_dict()[name].to(torch.bfloat16).float().numpy()
  np.testing.assert_array_equal(value.astype(np.float32), stored)
  _, _, params = convert_hf_directory(tmp_path, dtype=jnp.bfloat16)
  kernel = params["blocks"]["mlp"]["fc1"]["kernel"]
  assert kernel.dtype == jnp.bfloat16
  np.testing.assert_array_equal(kernel[0].astype(np.float32), stored.T)


def test_vocab_size_override_pads_with_mean_rows(saved):
  _, directory = saved("llama")
  _, base_config, base = convert_hf_directory(directory)
  _, config, padded = convert_hf_directory(directory, "llm", vocab_size=VOCAB + 3)
  assert (base_config.vocab_size, config.vocab_size) == (VOCAB, VOCAB + 3)
  table, original = padded["embedder"]["embedding"], base["embedder"]["embedding"]
  np.testing.assert_array_equal(table[:VOCAB], original)
  mean = original.mean(0, keepdims=True, dtype=np.float64)
  np.testing.assert_allclose(table[VOCAB:], np.repeat(mean, 3, 0), rtol=0, atol=1e-7)
  assert padded["lm_head"]["kernel"].shape == (64, VOCAB + 3)


def write_config(directory, **fields) -> None:
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(fields, f)


def test_unknown_model_type(tmp_path):
  write_config(tmp_path, model_type="gpt2")
  with pytest.raises(ConversionError, match=r"model_type 'gpt2' is not supported.*llama.*dinov2"):
    convert_hf_directory(tmp_path)


def test_directory_without_config(saved, tmp_path):
  _, directory = saved("qwen2")
  shutil.copy(os.path.join(directory, "model.safetensors"), tmp_path)
  with pytest.raises(ConversionError, match="has no config.json"):
    convert_hf_directory(tmp_path)
  with pytest.raises(ConversionError, match="not a directory"):
    convert_hf_directory(tmp_path / "absent")


def test_missing_shard_and_weights(saved, tmp_path):
  _, directory = saved("llama")
  copy = shutil.copytree(directory, tmp_path / "llama")
  os.remove(copy / sorted(f for f in os.listdir(copy) if f.endswith(".safetensors"))[0])
  with pytest.raises(ConversionError, match=r"lists shard\(s\) missing.*model-00001-of"):
    convert_hf_directory(copy)
  write_config(tmp_path / "bin", **read_json(os.path.join(directory, "config.json")))
  (tmp_path / "bin" / "pytorch_model.bin").write_bytes(b"")
  with pytest.raises(ConversionError, match="neither model.safetensors.*pytorch_model.bin"):
    convert_hf_directory(tmp_path / "bin")


def read_json(path):
  with open(path) as f:
    return json.load(f)


def with_tensor_replaced(directory, target, name, transform) -> None:
  """Copies a single-file checkpoint to `target` with tensor `name` transformed."""
  shutil.copytree(directory, target)
  tensors = safetensors.numpy.load_file(os.path.join(directory, "model.safetensors"))
  tensors[name] = np.ascontiguousarray(transform(tensors[name]))
  safetensors.numpy.save_file(tensors, os.path.join(target, "model.safetensors"),
                              metadata={"format": "pt"})


def test_wrong_tensor_shape_is_named(saved, tmp_path):
  _, directory = saved("qwen2")
  name = "model.layers.1.mlp.up_proj.weight"
  with_tensor_replaced(directory, tmp_path / "qwen2", name, lambda w: w[:-1])
  with pytest.raises(ConversionError, match=rf"{name}: shape \(64, 95\)"):
    convert_hf_directory(tmp_path / "qwen2")

  _, directory = saved("dinov2")  # Legacy names, as save_pretrained writes them.
  name = "encoder.layer.1.attention.attention.key.weight"
  with_tensor_replaced(directory, tmp_path / "dinov2", name, lambda w: w[:, :-2])
  with pytest.raises(ConversionError, match=rf"{name}: shape \(64, 62\)"):
    convert_hf_directory(tmp_path / "dinov2")


def test_component_and_overrides_are_checked(saved):
  _, directory = saved("dinov2")
  with pytest.raises(ConversionError, match="component='llm'.*image encoder"):
    convert_hf_directory(directory, "llm")
  with pytest.raises(ConversionError, match="VitConfig, which has no field.*vocab_size"):
    convert_hf_directory(directory, vocab_size=100)


def test_rope_scaling_is_refused(saved, tmp_path):
  """Llama 3.1-style rope scaling changes every position's rotation; Decoder
  has plain RoPE, so converting would be silently wrong."""
  _, directory = saved("llama")
  config = read_json(os.path.join(directory, "config.json"))
  config["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0,
                               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 1024}
  write_config(tmp_path, **config)
  with pytest.raises(ConversionError, match="rope scaling 'llama3'"):
    convert_hf_directory(tmp_path)


def test_config_without_transformers(saved, monkeypatch):
  """Without transformers, config.json's own fields give the same configs."""
  expected = {kind: convert_hf_directory(saved(kind)[1])[1] for kind in ("qwen2", "clip")}
  monkeypatch.setitem(sys.modules, "transformers", None)  # Makes `import transformers` fail.
  for kind, config in expected.items():
    assert convert_hf_directory(saved(kind)[1])[1] == config
