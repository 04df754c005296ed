"""QLoRA: NF4 base weights inside the targeted linears, checked against
peft + bitsandbytes Linear4bit on a small random Hugging Face Llama."""

import importlib.util

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from mm1_jax import config_lib, sharding
from mm1_jax.models import lora as lora_lib
from mm1_jax.models import nf4, qlora
from mm1_jax.models.config import LoraConfig
from mm1_jax.models.decoder import Decoder
from mm1_jax.typed_config import ConfigError

# Fan-ins (64, 128) hold whole NF4 blocks of 64, as every real LLM's do.
VOCAB, WIDTH, HEADS, KV_HEADS, MLP, LAYERS = 97, 64, 8, 2, 128, 2
ALL_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

needs_bnb = pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is None or importlib.util.find_spec("peft") is None,
    reason="bitsandbytes, peft and torch (requirements-dev.txt) are the QLoRA reference")


def max_relative_error(ours, reference) -> float:
  ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
  return float(np.max(np.abs(ours - reference)) / np.max(np.abs(reference)))


def tokens(batch=2, length=11, seed=0):
  return np.random.default_rng(seed).integers(0, VOCAB, (batch, length))


def our_module_path(hf_name: str) -> tuple[str, ...]:
  """('attn', 'query') of model.layers.0.self_attn.q_proj."""
  names = {"q_proj": ("attn", "query"), "k_proj": ("attn", "key"), "v_proj": ("attn", "value"),
           "o_proj": ("attn", "out"), "gate_proj": ("mlp", "gate"), "up_proj": ("mlp", "up"),
           "down_proj": ("mlp", "down")}
  return names[hf_name.rsplit(".", 1)[-1]]


@pytest.fixture(scope="module")
def peft_qlora():
  """A random Llama whose decoder linears are bitsandbytes Linear4bit (NF4,
  double quant, float32 compute: quantised by bitsandbytes itself), under a
  peft LoRA with random A and B; and the same model's float weights."""
  import bitsandbytes as bnb
  import peft
  import torch
  import transformers

  torch.manual_seed(0)
  config = transformers.LlamaConfig(
      vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=MLP, num_hidden_layers=LAYERS,
      num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, rope_theta=5000.0,
      rms_norm_eps=1e-5, attn_implementation="eager", tie_word_embeddings=False)
  model = transformers.LlamaForCausalLM(config).eval()
  float_state = {name: value.detach().numpy().copy() for name, value in model.state_dict().items()}
  for layer in model.model.layers:
    for parent in (layer.self_attn, layer.mlp):
      for name, linear in list(parent.named_children()):
        if not isinstance(linear, torch.nn.Linear):
          continue
        quantized = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=False,
                                      compute_dtype=torch.float32, compress_statistics=True,
                                      quant_type="nf4")
        quantized.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False,
                                             quant_type="nf4", compress_statistics=True,
                                             blocksize=64)
        # bitsandbytes' generic dequantise-then-matmul path (its AVX512-bf16
        # one repacks the weights and needs out_features % 32 == 0).
        quantized.support_avx512bf16_for_cpu = False
        setattr(parent, name, quantized.to("cpu"))  # .to quantises (bitsandbytes' CPU kernel).
  lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(ALL_LINEARS), lora_dropout=0.0,
                         init_lora_weights=False)
  return peft.get_peft_model(model, lora).eval(), float_state


def bnb_nf4_leaves(linear) -> dict[str, np.ndarray]:
  """Our NF4 leaves from a bitsandbytes Linear4bit's weight and quant state."""
  state = linear.weight.quant_state
  out_features, in_features = state.shape
  return {"codes": linear.weight.data.numpy().reshape(out_features, in_features // 2),
          "absmax": state.absmax.numpy().reshape(out_features, in_features // state.blocksize),
          "absmax_scale": state.state2.absmax.numpy(),
          "offset": np.asarray(state.offset.numpy(), np.float32).reshape(())}


@needs_bnb
def test_peft_bitsandbytes_qlora_gives_our_logits(peft_qlora):
  """bitsandbytes quantises the Llama's linears; our quantisation of the same
  float weights is bit-identical (with its CPU kernel's absmax rounding), and
  our decoder holding those NF4 arrays, with peft's adapters imported, gives
  peft's logits within float32 round-off."""
  import torch

  from mm1_jax.conversion.hf_llm import convert_decoder, decoder_config_from_hf
  from mm1_jax.conversion.peft_lora import (convert_peft_adapters, lora_config_from_peft,
                                            split_peft_state_dict)
  model, float_state = peft_qlora
  config = decoder_config_from_hf(model.get_base_model().config)
  lora = lora_config_from_peft(model.peft_config["default"])
  lora = LoraConfig(rank=lora.rank, alpha=lora.alpha, targets=lora.targets, quantize="nf4")
  _, adapters = split_peft_state_dict(model.state_dict())
  float_params = convert_decoder(float_state, config)

  # Our NF4 params: the float ones with each targeted kernel replaced by
  # bitsandbytes' arrays, after checking ours are the same bits.
  abstract = nn.unbox(jax.eval_shape(Decoder(config, lora=lora).init, jax.random.key(0),
                                     jnp.zeros((1, 1), jnp.int32)))["params"]
  params = jax.tree.map(np.asarray, float_params)  # New dicts: float_params stays whole.
  for layer_index, layer in enumerate(model.get_base_model().model.layers):
    for hf_name in ALL_LINEARS:
      parent = layer.self_attn if hf_name[0] in "qkvo" else layer.mlp
      linear = getattr(parent, hf_name).base_layer
      theirs = bnb_nf4_leaves(linear)
      kernel = float_state[f"model.layers.{layer_index}.{'self_attn' if parent is layer.self_attn else 'mlp'}.{hf_name}.weight"].T
      ours = nf4.quantize_nf4(kernel, absmax_rounding="cpu_lut")
      for field in qlora.NF4_FIELDS:
        np.testing.assert_array_equal(np.asarray(getattr(ours, field)).reshape(-1),
                                      theirs[field].reshape(-1), err_msg=f"{hf_name} {field}")
      module = params["blocks"]["layer_0"]
      for key in our_module_path(hf_name):
        module = module[key]
      for field, value in theirs.items():
        name = qlora.nf4_leaf("kernel", field)
        module.setdefault(name, [None] * LAYERS)[layer_index] = value
  for path, _ in qlora.quantized_weights(abstract):
    module = params
    for key in path[:-1]:
      module = module[key]
    del module["kernel"]
    for field in qlora.NF4_FIELDS:
      name = qlora.nf4_leaf("kernel", field)
      module[name] = np.stack(module[name])
  params = lora_lib.with_adapters(params, convert_peft_adapters(adapters, config, lora))
  jax.tree.map(lambda a, b: np.testing.assert_equal((a.shape, a.dtype), (b.shape, b.dtype)),
               params, abstract)

  ids = tokens()
  with torch.no_grad():
    reference = model(torch.tensor(ids)).logits.numpy()
    with model.disable_adapter():
      base_logits = model(torch.tensor(ids)).logits.numpy()
  ours = np.asarray(Decoder(config, lora=lora).apply({"params": params}, jnp.asarray(ids))[0])
  assert max_relative_error(reference, base_logits) > 1e-2  # The adapters matter.
  assert max_relative_error(ours, reference) <= 1e-5
  # And the 4-bit base is not the float one: what matched was the NF4 model.
  float_logits = np.asarray(Decoder(config).apply({"params": float_params}, jnp.asarray(ids))[0])
  assert max_relative_error(float_logits, base_logits) > 1e-3


def small_decoder(moe: bool = False):
  from mm1_jax.models.config import DecoderConfig, MoeConfig
  return DecoderConfig(
      vocab_size=VOCAB, width=WIDTH, depth=4, num_heads=4, num_kv_heads=2, mlp_dim=MLP,
      moe=MoeConfig(num_experts=4, num_experts_per_token=2, moe_every=2, dispatch="dropless")
      if moe else MoeConfig())


def random_qlora_params(config, lora, seed=0, stddev=0.1):
  """(QLoRA params with random adapters, B nonzero, and every targeted kernel
  quantised from a random float kernel; the float kernels' params)."""
  plain = LoraConfig(rank=lora.rank, alpha=lora.alpha, targets=lora.targets)
  ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  abstract_float = nn.unbox(jax.eval_shape(Decoder(config, lora=plain).init, jax.random.key(0),
                                           ids))["params"]
  abstract = nn.unbox(jax.eval_shape(Decoder(config, lora=lora).init, jax.random.key(0),
                                     ids))["params"]
  rng = np.random.default_rng(seed)
  float_params = jax.tree_util.tree_map_with_path(
      lambda path, leaf: np.ones(leaf.shape, leaf.dtype) if path[-1].key == "scale"
      else (stddev * rng.standard_normal(leaf.shape)).astype(leaf.dtype), abstract_float)

  def read_kernel(path):
    leaf = float_params
    for key in path[1:]:  # Paths start with the part ("llm"); a Decoder's params do not.
      leaf = leaf[key]
    return leaf

  params = qlora.quantize_into({"llm": jax.tree.map(lambda x: x, float_params)},
                               {"llm": abstract}, lora, read_kernel, lambda array, _: array)
  return params["llm"], float_params


def test_nf4_base_gives_the_dequantised_float_models_logits_and_merges():
  """Every targeted linear (attention, MLP, router and experts) holds an NF4
  base; the decoder equals the plain decoder holding the dequantised kernels
  plus the adapters, and merge_lora folds both into float kernels."""
  from mm1_jax.models.decoder import Decoder as PlainDecoder
  config = small_decoder(moe=True)
  lora = LoraConfig(rank=3, alpha=6.0, targets=("llm/blocks/*", "llm/lm_head"), quantize="nf4")
  params, float_params = random_qlora_params(config, lora)
  blocks = params["blocks"]
  query = blocks["layer_0"]["attn"]["query"]
  assert "kernel" not in query and query["kernel_nf4_codes"].dtype == np.uint8
  assert query["kernel_nf4_codes"].shape == (2, WIDTH, WIDTH // 2)  # [L, out, in / 2]
  moe = blocks["layer_1"]["moe"]
  assert moe["down_nf4_codes"].shape == (2, 4, WIDTH, MLP // 2)  # [L, E, out, in / 2]
  assert "router" in moe and "kernel_nf4_codes" in moe["router"]
  assert "kernel" in params["lm_head"]  # Targeted, but lm_head stays in full precision.

  ids = jnp.asarray(tokens(2, 9))
  ours = np.asarray(jax.jit(Decoder(config, lora=lora).apply)({"params": params}, ids)[0])
  merged = lora_lib.merge_lora(params, lora)
  assert not lora_lib.lora_params(merged) and not qlora.quantized_weights(merged)
  plain = np.asarray(jax.jit(PlainDecoder(config).apply)({"params": merged}, ids)[0])
  assert max_relative_error(ours, plain) <= 1e-5
  # The merged kernels are the dequantised ones plus the update: the NF4
  # error against the float kernels is what 4 bits allow (bitsandbytes: ~0.1 of absmax).
  kernel = np.asarray(float_params["blocks"]["layer_0"]["mlp"]["up"]["kernel"])
  dequantised = np.asarray(qlora.dequantize_weights(blocks["layer_0"]["mlp"]["up"], 64)["kernel"])
  error = np.abs(dequantised.reshape(kernel.shape) - kernel).max() / np.abs(kernel).max()
  assert 1e-3 < error < 0.15


def test_nf4_arrays_carry_logical_axes_that_the_rules_table_shards():
  from mm1_jax.models.multimodal import MM1Model
  config = config_lib.mm1_config(tiny.get_config()).replace(
      lora=LoraConfig(rank=4, targets=("llm/blocks/*",), quantize="nf4"))
  enc = config.encoder
  boxed = jax.eval_shape(MM1Model(config).init, jax.random.key(0), jnp.zeros((1, 16), jnp.int32),
                         jnp.zeros((1, 1, enc.image_size, enc.image_size, 3), jnp.uint8),
                         jnp.zeros((1, 1), bool))["params"]
  blocks = boxed["llm"]["blocks"]
  query = blocks["layer_0"]["attn"]["query"]
  assert query["kernel_nf4_codes"].names == ("layers", "heads", "embed")  # [L, out, in / 2]
  assert query["kernel_nf4_absmax"].names == ("layers", "heads", None)
  assert query["kernel_nf4_absmax_scale"].names == ("layers", None)
  assert query["kernel_nf4_offset"].names == ("layers",)
  assert blocks["layer_1"]["moe"]["up_nf4_codes"].names == ("layers", "expert", "mlp", "embed")
  mesh = sharding.make_mesh({"fsdp": 2, "tensor": 2, "expert": 2})
  specs = sharding.params_shardings(boxed, mesh)["llm"]["blocks"]
  P = jax.sharding.PartitionSpec
  assert specs["layer_0"]["attn"]["query"]["kernel_nf4_codes"].spec == P(None, "tensor", "fsdp")
  assert specs["layer_0"]["mlp"]["down"]["kernel_nf4_codes"].spec == P(None, "fsdp", "tensor")
  assert specs["layer_1"]["moe"]["up_nf4_codes"].spec == P(None, "expert", "tensor", "fsdp")
  assert specs["layer_0"]["attn"]["query"]["kernel_nf4_offset"].spec == P(None)


@pytest.mark.parametrize("lora, message", [
    (dict(rank=4, quantize="int4"), r"model\.lora\.quantize: unknown 'int4'"),
    (dict(rank=0, quantize="nf4"), r"model\.lora\.quantize: 'nf4' quantises .* rank is 0"),
    (dict(rank=4, quantize="nf4", block_size=48), r"model\.lora\.block_size: 48 is not"),
    (dict(rank=4, quantize="nf4", block_size=256),
     r"model\.lora\.quantize='nf4': llm/blocks/layer_0/attn/query: fan-in 128 is not a "
     r"multiple of the NF4 block size 256"),
])
def test_bad_qlora_settings_are_one_line_config_errors(lora, message):
  from mm1_jax.experiment import Experiment
  config = tiny.get_config()
  config.model.lora.update(lora)
  with pytest.raises(ConfigError, match=message) as error:
    Experiment.from_config(config, num_devices=1, mixture_has_images=lambda m, v: True)
  assert "\n" not in str(error.value)
