"""The decoder against transformers' Llama and Mixtral at small random configs."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from mm1_jax.conversion.hf_llm import convert_decoder, decoder_config_from_hf
from mm1_jax.conversion.params_builder import ConversionError
from mm1_jax.models.decoder import Decoder

VOCAB, WIDTH, HEADS, KV_HEADS, MLP, LAYERS = 97, 64, 8, 2, 96, 3


def max_relative_error(ours, reference) -> float:
  ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
  return float(np.max(np.abs(ours - reference)) / np.max(np.abs(reference)))


def hf_llama(tie: bool = False):
  torch.manual_seed(0)
  config = transformers.LlamaConfig(
      vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=MLP, num_hidden_layers=LAYERS,
      num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, rope_theta=5000.0,
      rms_norm_eps=1e-5, tie_word_embeddings=tie, attn_implementation="eager")
  return transformers.LlamaForCausalLM(config).eval()


def hf_mixtral():
  torch.manual_seed(0)
  config = transformers.MixtralConfig(
      vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=MLP, num_hidden_layers=2,
      num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, num_local_experts=4,
      num_experts_per_tok=2, rope_theta=1e4, attn_implementation="eager")
  model = transformers.MixtralForCausalLM(config).eval()
  # transformers leaves the fused expert tensors uninitialised; give them values.
  with torch.no_grad():
    for name, param in model.named_parameters():
      if "experts" in name:
        param.normal_(0.0, 0.05)
  return model


def tokens(batch=2, length=11, seed=0):
  return np.random.default_rng(seed).integers(0, VOCAB, (batch, length))


def run_ours(config, state_dict, token_ids, **kwargs):
  params = convert_decoder(state_dict, config)
  logits, aux = Decoder(config).apply({"params": params}, jnp.asarray(token_ids), **kwargs)
  return np.asarray(logits), aux


@pytest.mark.parametrize("tie", [False, True])
def test_llama_logits_match_transformers(tie):
  model = hf_llama(tie)
  config = decoder_config_from_hf(model.config)
  assert (config.num_kv_heads, config.tie_embeddings, config.rope_theta) == (KV_HEADS, tie, 5000.0)
  ids = tokens()
  with torch.no_grad():
    reference = model(torch.tensor(ids)).logits.numpy()
  ours, _ = run_ours(config, model.state_dict(), ids)
  assert max_relative_error(ours, reference) <= 1e-4


def test_llama_packed_segments_equal_separate_sequences():
  """Two documents packed in one row with restarted positions give the same
  logits as each run alone (segment-restricted causal attention + RoPE)."""
  model = hf_llama()
  config = decoder_config_from_hf(model.config)
  first, second = tokens(1, 6, seed=1), tokens(1, 5, seed=2)
  packed = np.concatenate([first, second], axis=1)
  segment_ids = np.array([[1] * 6 + [2] * 5])
  positions = np.array([list(range(6)) + list(range(5))])
  ours, _ = run_ours(config, model.state_dict(), packed, positions=jnp.asarray(positions),
                     segment_ids=jnp.asarray(segment_ids))
  with torch.no_grad():
    ref_first = model(torch.tensor(first)).logits.numpy()
    ref_second = model(torch.tensor(second)).logits.numpy()
  assert max_relative_error(ours[:, :6], ref_first) <= 1e-4
  assert max_relative_error(ours[:, 6:], ref_second) <= 1e-4


@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
def test_mixtral_logits_match_transformers(dispatch):
  model = hf_mixtral()
  config = decoder_config_from_hf(model.config)
  # Capacity high enough that no assignment drops: then both paths are exact.
  config = dataclasses.replace(config, moe=dataclasses.replace(
      config.moe, dispatch=dispatch, capacity_factor=float(config.moe.num_experts)))
  ids = tokens()
  with torch.no_grad():
    reference = model(torch.tensor(ids)).logits.numpy()
  ours, aux = run_ours(config, model.state_dict(), ids)
  assert max_relative_error(ours, reference) <= 1e-4
  assert float(aux["dropped_fraction"]) == 0.0
  assert float(aux["balance_loss"]) > 0 and float(aux["router_z_loss"]) > 0


def test_mixtral_per_expert_checkpoint_layout():
  """Published Mixtral files store experts one by one (w1/w2/w3); the fused and
  the per-expert layouts convert to the same params."""
  model = hf_mixtral()
  config = decoder_config_from_hf(model.config)
  fused = model.state_dict()
  split = {}
  for name, value in fused.items():
    if name.endswith("mlp.experts.gate_up_proj"):
      prefix = name.replace("mlp.experts.gate_up_proj", "block_sparse_moe.experts")
      gate, up = value.chunk(2, dim=1)
      for j in range(value.shape[0]):
        split[f"{prefix}.{j}.w1.weight"] = gate[j]
        split[f"{prefix}.{j}.w3.weight"] = up[j]
    elif name.endswith("mlp.experts.down_proj"):
      prefix = name.replace("mlp.experts.down_proj", "block_sparse_moe.experts")
      for j in range(value.shape[0]):
        split[f"{prefix}.{j}.w2.weight"] = value[j]
    else:
      split[name.replace("mlp.gate.weight", "block_sparse_moe.gate.weight")] = value
  a, b = convert_decoder(fused, config), convert_decoder(split, config)
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_conversion_refuses_checkpoints_that_do_not_fit():
  model = hf_llama()
  config = decoder_config_from_hf(model.config)
  state = dict(model.state_dict())
  with pytest.raises(ConversionError, match=r"model.layers.0.mlp.gate_proj.weight: shape \(64, 96\)"):
    convert_decoder(state, dataclasses.replace(config, mlp_dim=MLP + 8))
  with pytest.raises(ConversionError, match="unexpected tensor.*model.extra.weight"):
    convert_decoder({**state, "model.extra.weight": np.zeros(3)}, config)
  del state["model.layers.2.self_attn.k_proj.weight"]
  with pytest.raises(ConversionError, match="blocks/layer_0/attn/key/kernel"):
    convert_decoder(state, config)
  with pytest.raises(ConversionError, match="layer 2 does not exist"):
    convert_decoder(dict(model.state_dict()), dataclasses.replace(config, depth=LAYERS - 1))
