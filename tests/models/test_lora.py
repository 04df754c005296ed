"""LoRA adapters: against Hugging Face peft on a small random Llama, merging,
the MoE experts' adapters, init, dropout, config errors, sharding."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers

from configs import tiny
from mm1_jax import config_lib, sharding
from mm1_jax.conversion.hf_llm import convert_decoder, decoder_config_from_hf
from mm1_jax.conversion.params_builder import ConversionError
from mm1_jax.conversion.peft_lora import (convert_peft_adapters, lora_config_from_peft,
                                          split_peft_state_dict)
from mm1_jax.models import lora as lora_lib
from mm1_jax.models.config import DecoderConfig, LoraConfig, MM1Config, MoeConfig
from mm1_jax.models.decoder import Decoder
from mm1_jax.typed_config import ConfigError

VOCAB, WIDTH, HEADS, KV_HEADS, MLP, LAYERS = 97, 64, 8, 2, 96, 3


def max_relative_error(ours, reference) -> float:
  ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
  return float(np.max(np.abs(ours - reference)) / np.max(np.abs(reference)))


def peft_llama(target_modules, rslora: bool):
  """A random Llama with random peft adapters (B too: init_lora_weights=False
  leaves torch's Kaiming init in B, so the adapters change the output)."""
  torch.manual_seed(0)
  config = transformers.LlamaConfig(
      vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=MLP, num_hidden_layers=LAYERS,
      num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, rope_theta=5000.0,
      rms_norm_eps=1e-5, attn_implementation="eager")
  base = transformers.LlamaForCausalLM(config).eval()
  lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=target_modules, lora_dropout=0.0,
                         use_rslora=rslora, init_lora_weights=False)
  return peft.get_peft_model(base, lora).eval()


def tokens(batch=2, length=11, seed=0):
  return np.random.default_rng(seed).integers(0, VOCAB, (batch, length))


def ours_from_peft(model):
  """(decoder config, our LoraConfig, params with the imported adapters)."""
  config = decoder_config_from_hf(model.get_base_model().config)
  lora = lora_config_from_peft(model.peft_config["default"])
  base, adapters = split_peft_state_dict(model.state_dict())
  params = lora_lib.with_adapters(convert_decoder(base, config),
                                  convert_peft_adapters(adapters, config, lora))
  return config, lora, params


@pytest.mark.parametrize("target_modules, rslora", [
    ("all-linear", False), ("all-linear", True), (["q_proj", "v_proj", "lm_head"], False)])
def test_imported_peft_adapters_give_peft_logits_and_merge(target_modules, rslora):
  model = peft_llama(target_modules, rslora)
  config, lora, params = ours_from_peft(model)
  assert (lora.rank, lora.alpha, lora.rslora) == (4, 8.0, rslora)
  assert lora.scale == pytest.approx(8 / 2 if rslora else 8 / 4)
  if target_modules == "all-linear":
    # peft expands "all-linear" to the module names: every linear but lm_head.
    assert lora.targets == tuple(sorted(f"llm/blocks/*/{m}" for m in (
        "attn/query", "attn/key", "attn/value", "attn/out", "mlp/gate", "mlp/up", "mlp/down")))
    assert len(lora_lib.adapted_module_paths(params)) == 7  # q k v o gate up down.
  else:
    assert lora_lib.adapted_module_paths(params) == [
        "blocks/layer_0/attn/query", "blocks/layer_0/attn/value", "lm_head"]
  ids = tokens()
  with torch.no_grad():
    reference = model(torch.tensor(ids)).logits.numpy()
    with model.disable_adapter():
      base_logits = model(torch.tensor(ids)).logits.numpy()
  ours = np.asarray(Decoder(config, lora=lora).apply({"params": params}, jnp.asarray(ids))[0])
  assert max_relative_error(reference, base_logits) > 1e-2  # The adapters matter.
  assert max_relative_error(ours, reference) <= 1e-5
  # Merged into the kernels: a plain decoder gives the same logits.
  merged = lora_lib.merge_lora(params, lora)
  assert not lora_lib.lora_params(merged)
  plain = np.asarray(Decoder(config).apply({"params": merged}, jnp.asarray(ids))[0])
  assert max_relative_error(plain, ours) <= 1e-5
  # ... as do peft's own merged weights.
  hf_merged = convert_decoder(model.merge_and_unload().state_dict(), config)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               merged, hf_merged)


def test_peft_adapters_that_do_not_fit_are_refused():
  model = peft_llama("all-linear", False)
  config, lora, _ = ours_from_peft(model)
  _, adapters = split_peft_state_dict(model.state_dict())
  with pytest.raises(ConversionError, match=r"layers.0.self_attn.q_proj.lora_A.weight: shape "
                                             r"\(64, 4\).*expects \(64, 8\)"):
    convert_peft_adapters(adapters, config, dataclasses.replace(lora, rank=8))
  missing = {k: v for k, v in adapters.items() if "layers.1.mlp.up_proj" not in k}
  with pytest.raises(ConversionError, match="layer_0/mlp/up/lora_a"):
    convert_peft_adapters(missing, config, lora)
  with pytest.raises(ConversionError, match="use_dora"):
    lora_config_from_peft(peft.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))


def small_decoder(moe: bool = False, dispatch: str = "dropless") -> DecoderConfig:
  return DecoderConfig(
      vocab_size=VOCAB, width=32, depth=4, num_heads=4, num_kv_heads=2, mlp_dim=48,
      moe=MoeConfig(num_experts=4, num_experts_per_token=2, moe_every=2, dispatch=dispatch,
                    capacity_factor=4.0) if moe else MoeConfig())


def random_params(config, lora, seed=0, stddev=0.1):
  """Random params of Decoder(config, lora=lora), adapters included (B
  nonzero), built on the host: compiling the real init takes ~15 s here."""
  tokens_spec = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  abstract = nn.unbox(jax.eval_shape(Decoder(config, lora=lora).init, jax.random.key(0),
                                     tokens_spec))["params"]
  rng = np.random.default_rng(seed)

  def one(path, leaf):
    if getattr(path[-1], "key", None) == "scale":
      return jnp.ones(leaf.shape, leaf.dtype)
    return jnp.asarray(stddev * rng.standard_normal(leaf.shape), leaf.dtype)
  return jax.tree_util.tree_map_with_path(one, abstract)


@functools.cache
def _jitted_logits(config, lora, with_rng):
  model = Decoder(config, lora=lora)
  if with_rng:
    return jax.jit(lambda p, x, r: model.apply({"params": p}, x, rngs={"dropout": r})[0])
  return jax.jit(lambda p, x: model.apply({"params": p}, x)[0])


def logits(config, lora, params, ids, rng=None):
  """Decoder(config, lora=lora) logits, jitted once per model (eager scans are slow)."""
  args = (params, ids) if rng is None else (params, ids, rng)
  return np.asarray(_jitted_logits(config, lora, rng is not None)(*args))


@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
def test_moe_expert_adapters_merge_exactly(dispatch):
  """Per-expert adapters (and the router's) in both dispatch paths: the
  adapted model equals the one with the merged expert kernels."""
  config = small_decoder(moe=True, dispatch=dispatch)
  lora = LoraConfig(rank=3, alpha=6.0, targets=("llm/blocks/*",))
  ids = jnp.asarray(tokens(2, 9))
  params = random_params(config, lora)
  moe = params["blocks"]["layer_1"]["moe"]
  assert moe["up_lora_a"].shape == (2, 4, 32, 3) and moe["down_lora_b"].shape == (2, 4, 3, 32)
  assert "lora_a" in moe["router"]
  adapted = logits(config, lora, params, ids)
  merged = lora_lib.merge_lora(params, lora)
  plain = logits(config, None, merged, ids)
  base = logits(config, None, lora_lib.without_lora(params), ids)
  assert max_relative_error(adapted, base) > 1e-2
  assert max_relative_error(adapted, plain) <= 1e-5


def test_fresh_adapters_start_at_the_base_model():
  """A Kaiming-uniform (bound 1 / sqrt(fan_in), torch nn.Linear's default), B
  zero: the adapted model's output is the base model's."""
  config = small_decoder(moe=True)
  lora = LoraConfig(rank=4, targets=("llm/blocks/*", "llm/lm_head"))
  ids = jnp.asarray(tokens(2, 7))
  params = nn.unbox(jax.jit(Decoder(config, lora=lora).init)(jax.random.key(0), ids))["params"]
  query_a = np.asarray(params["blocks"]["layer_0"]["attn"]["query"]["lora_a"])  # [L, D, r]
  out_a = np.asarray(params["blocks"]["layer_0"]["attn"]["out"]["lora_a"])  # [L, H, hd, r]
  expert_a = np.asarray(params["blocks"]["layer_1"]["moe"]["down_lora_a"])  # [L, E, F, r]
  for a, fan_in in ((query_a, 32), (out_a, 32), (expert_a, 48)):
    bound = 1 / np.sqrt(fan_in)
    assert np.abs(a).max() <= bound and np.abs(a).max() > 0.8 * bound
    assert a.std() == pytest.approx(bound / np.sqrt(3), rel=0.2)
  assert not np.array_equal(query_a[0], query_a[1])  # Each scanned block draws its own.
  for path, leaf in jax.tree_util.tree_flatten_with_path(lora_lib.lora_params(params))[0]:
    if str(path[-1].key).endswith("lora_b"):
      assert not np.any(np.asarray(leaf)), path
  adapted = logits(config, lora, params, ids)
  base = logits(config, None, lora_lib.without_lora(params), ids)
  np.testing.assert_array_equal(adapted, base)


def test_dropout_only_with_a_dropout_rng():
  config = small_decoder()
  lora = LoraConfig(rank=4, dropout=0.5)
  ids = jnp.asarray(tokens(2, 7))
  params = random_params(config, lora)
  deterministic = logits(config, lora, params, ids)
  no_dropout = logits(config, dataclasses.replace(lora, dropout=0.0), params, ids)
  np.testing.assert_array_equal(deterministic, no_dropout)
  first = logits(config, lora, params, ids, jax.random.key(1))
  again = logits(config, lora, params, ids, jax.random.key(1))
  other = logits(config, lora, params, ids, jax.random.key(2))
  np.testing.assert_array_equal(first, again)
  assert max_relative_error(first, deterministic) > 1e-3
  assert max_relative_error(first, other) > 1e-3


def tiny_model(**lora) -> dict:
  config = tiny.get_config()
  config.model.lora.update({"rank": 4, **lora})
  return config.model.to_dict()


@pytest.mark.parametrize("lora, field, message", [
    (dict(targets=("llm/blocks/*/attention/*",)), "model.lora.targets",
     r"'llm/blocks/\*/attention/\*' matches no linear layer, of 16: llm/blocks/layer_0/attn/key"),
    (dict(targets=("encoder/*/attention/*",)), "model.lora.targets",
     r"'encoder/\*/attention/\*' matches no linear layer, of 7: encoder/blocks/attn/key"),
    (dict(targets=()), "model.lora.targets", "empty"),
    (dict(rank=-1), "model.lora.rank", "must be an integer >= 0"),
    (dict(alpha=0.0), "model.lora.alpha", "must be > 0"),
    (dict(dropout=1.0), "model.lora.dropout", r"must be in \[0, 1\)"),
])
def test_bad_lora_settings_are_one_line_config_errors(lora, field, message):
  with pytest.raises(ConfigError, match=field.replace(".", r"\.") + ": " + message) as error:
    config = MM1Config.from_dict(tiny_model(**lora))
    lora_lib.check_targets(config)  # Experiment validation calls it.
  assert "\n" not in str(error.value)


def test_targets_select_modules_by_path():
  config = config_lib.mm1_config(tiny.get_config())
  paths = lora_lib.linear_module_paths(config.encoder, config.connector, config.llm)
  assert "llm/lm_head" in paths and "llm/blocks/layer_1/moe/up" in paths
  assert "llm/blocks/layer_1/moe/router" in paths
  # The encoder's and the connector's linears can be targeted too.
  assert {"encoder/patch_embed", "encoder/blocks/attn/query", "encoder/blocks/mlp/fc1",
          "connector/readout_0", "connector/s1/b1/conv1", "connector/s1/b1/se/fc1"} <= set(paths)
  default = LoraConfig(rank=2)
  assert [p for p in paths if default.targets_module(p)] == [
      p for p in paths if p.startswith("llm/blocks/")]
  attention = LoraConfig(rank=2, targets=("llm/*/attn/query", "llm/*/moe/up"))
  assert [p for p in paths if attention.targets_module(p)] == [
      "llm/blocks/layer_0/attn/query", "llm/blocks/layer_1/attn/query",
      "llm/blocks/layer_1/moe/up"]
  assert not LoraConfig(rank=0).targets_module("llm/blocks/layer_0/attn/query")


def test_adapters_carry_logical_axes_that_the_rules_table_shards():
  """Adapters take their kernel's in / out axes and 'lora_rank' (replicated);
  on an 8-device mesh they split like their kernels."""
  from mm1_jax.models.multimodal import MM1Model
  from mm1_jax.models import accounting
  config = config_lib.mm1_config(tiny.get_config()).replace(
      lora=LoraConfig(rank=4, targets=("llm/blocks/*",)))
  model = MM1Model(config)
  enc = config.encoder
  boxed = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16), jnp.int32),
                         jnp.zeros((1, 1, enc.image_size, enc.image_size, 3), jnp.uint8),
                         jnp.zeros((1, 1), bool))["params"]
  llm = boxed["llm"]["blocks"]
  assert llm["layer_0"]["attn"]["query"]["lora_a"].names == ("layers", "embed", "lora_rank")
  assert llm["layer_0"]["attn"]["query"]["lora_b"].names == (
      "layers", "lora_rank", "heads", "head_dim")
  assert llm["layer_1"]["moe"]["gate_lora_a"].names == ("layers", "expert", "embed", "lora_rank")
  assert llm["layer_1"]["moe"]["down_lora_b"].names == ("layers", "expert", "lora_rank", "embed")
  assert jax.tree.leaves(accounting.abstract_params(config)["encoder"])  # Untouched towers.
  mesh = sharding.make_mesh({"fsdp": 2, "tensor": 2, "expert": 2})
  specs = sharding.params_shardings(boxed, mesh)["llm"]["blocks"]
  P = jax.sharding.PartitionSpec
  assert specs["layer_0"]["attn"]["query"]["lora_a"].spec == P(None, "fsdp", None)
  assert specs["layer_0"]["attn"]["query"]["lora_b"].spec == P(None, None, "tensor", None)
  assert specs["layer_0"]["mlp"]["down"]["lora_a"].spec == P(None, "tensor", None)
  assert specs["layer_1"]["moe"]["up_lora_b"].spec == P(None, "expert", None, "tensor")


def hf_causal_lm(kind: str):
  """A small random Hugging Face Llama or Qwen2 (q/k/v biases) in float32."""
  torch.manual_seed(1)
  common = dict(vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=MLP,
                num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                rope_theta=5000.0, rms_norm_eps=1e-5, attn_implementation="eager",
                tie_word_embeddings=False)
  if kind == "qwen2":
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common)).eval()
  if kind == "mixtral":
    return transformers.MixtralForCausalLM(transformers.MixtralConfig(
        **common, num_local_experts=4, num_experts_per_tok=2)).eval()
  return transformers.LlamaForCausalLM(transformers.LlamaConfig(**common)).eval()


@pytest.mark.parametrize("kind, targets, rslora", [
    ("llama", ("llm/blocks/*",), False),
    ("llama", ("llm/*/attn/query", "llm/*/attn/key", "llm/lm_head"), True),
    ("qwen2", ("llm/blocks/*",), False),
    ("mixtral", ("llm/*/attn/*",), False)])
def test_exported_adapters_load_in_peft_with_our_logits_and_import_back(
    tmp_path, kind, targets, rslora):
  from mm1_jax.conversion.peft_lora import (export_peft_adapters, read_peft_adapter_dir,
                                            write_peft_adapter_dir)
  hf = hf_causal_lm(kind)
  config = decoder_config_from_hf(hf.config)
  lora = LoraConfig(rank=4, alpha=8.0, rslora=rslora, targets=targets)
  adapters = lora_lib.lora_params(jax.device_get(random_params(config, lora, seed=2)))
  params = lora_lib.with_adapters(convert_decoder(hf.state_dict(), config), adapters)
  ids = tokens()
  ours = np.asarray(Decoder(config, lora=lora).apply({"params": params}, jnp.asarray(ids))[0])

  output = str(tmp_path / "adapter")
  tensors = export_peft_adapters(params, config, lora)
  assert tensors["base_model.model.model.layers.2.self_attn.q_proj.lora_A.weight"].shape == (
      4, WIDTH)
  assert tensors["base_model.model.model.layers.2.self_attn.k_proj.lora_B.weight"].shape == (
      KV_HEADS * WIDTH // HEADS, 4)
  write_peft_adapter_dir(output, tensors, lora)
  with torch.no_grad():
    base_logits = hf(torch.tensor(ids)).logits.numpy()
    model = peft.PeftModel.from_pretrained(hf, output).eval()
    reference = model(torch.tensor(ids)).logits.numpy()
  assert max_relative_error(reference, base_logits) > 1e-2  # The adapters matter.
  assert max_relative_error(ours, reference) <= 1e-5
  # peft saw every tensor (none left at its own initialisation).
  loaded = {name: value for name, value in peft.get_peft_model_state_dict(
      model, save_embedding_layers=False).items() if ".lora_" in name}
  assert sorted(loaded) == sorted(tensors)
  for name, value in loaded.items():
    np.testing.assert_array_equal(value.numpy(), tensors[name])

  # Import back: the same LoRA settings and identical arrays.
  imported_lora, imported = read_peft_adapter_dir(output, config)
  assert (imported_lora.rank, imported_lora.alpha, imported_lora.rslora) == (4, 8.0, rslora)
  assert lora_lib.adapted_module_paths(imported) == lora_lib.adapted_module_paths(adapters)
  jax.tree.map(np.testing.assert_array_equal, imported, jax.device_get(adapters))


def test_export_refuses_moe_router_and_expert_adapters():
  from mm1_jax.conversion.peft_lora import export_peft_adapters
  config = small_decoder(moe=True)
  lora = LoraConfig(rank=2, targets=("llm/blocks/*",))
  with pytest.raises(ConversionError, match="MoE router and expert adapters have no peft module"):
    export_peft_adapters(random_params(config, lora), config, lora)


def test_experiment_validation_checks_the_targets():
  from mm1_jax.experiment import Experiment
  config = tiny.get_config()
  config.model.lora.update(rank=4, targets=("llm/nothing/*",))
  with pytest.raises(ConfigError, match=r"model\.lora\.targets: 'llm/nothing/\*' matches no"):
    Experiment.from_config(config, num_devices=1, mixture_has_images=lambda m, v: True)


def test_encoder_and_connector_adapters_train_while_their_bases_freeze():
  """Targets in all three towers: every adapter gets a gradient, the frozen
  bases of the encoder and LLM none (stop_gradient), the connector's base is
  frozen by the optimizer's labels; merging folds all of them."""
  from mm1_jax import testing
  from mm1_jax.experiment import Experiment
  from mm1_jax.models.multimodal import MM1Model
  from mm1_jax.training import loss as loss_lib
  from mm1_jax.training import optimizer as opt
  config = tiny.get_config("dense")
  config.model.lora.update(rank=2, targets=("encoder/blocks/*", "connector/*", "llm/*/mlp/*"))
  experiment = Experiment.from_config(config, num_devices=1, mixture_has_images=lambda *_: True)
  model = experiment.trained_model
  assert model.freeze_encoder and model.freeze_llm  # Towers with adapters: base frozen.
  assert lora_lib.adapted_parts(experiment.model) == {"encoder", "connector", "llm"}
  params = testing.random_params(model)
  paths = lora_lib.adapted_module_paths(params)
  assert "encoder/blocks/attn/query" in paths and "connector/readout_0" in paths
  assert "encoder/patch_embed" not in paths and "llm/blocks/layer_0/attn/query" not in paths
  labels = opt.partition_labels(params)
  assert labels["connector"]["readout_0"]["kernel"] == opt.FROZEN
  assert labels["connector"]["readout_0"]["lora_a"] == opt.TRAIN

  seed = 0
  while True:  # An image in every row, so that the encoder gets gradients.
    rows = testing.random_multimodal_batch(model, 2, 48, seed=seed, max_images_per_row=1)
    if rows["image_mask"].any(axis=1).all():
      break
    seed += 1
  tokens = rows["tokens"]
  batch = {"decoder_target_tokens": np.roll(tokens, -1, axis=1),
           "decoder_loss_weights": np.ones_like(tokens)}
  network = MM1Model(model)

  def loss(params):
    logits, aux = network.apply({"params": params}, tokens, rows["images"], rows["image_mask"])
    return loss_lib.total_loss(logits, batch, aux)[0]
  grads = jax.jit(jax.grad(loss))(params)
  for part in ("encoder", "llm"):
    assert not any(np.any(x) for x in jax.tree.leaves(lora_lib.without_lora(grads[part]))), part
  for part in ("encoder", "connector", "llm"):
    adapter_grads = jax.tree_util.tree_flatten_with_path(lora_lib.lora_params(grads[part]))[0]
    zero = [jax.tree_util.keystr(k) for k, x in adapter_grads if not np.any(x)]
    assert adapter_grads and not zero, (part, zero)

  merged = lora_lib.merge_lora(params, model.lora)
  plain = model.replace(lora=LoraConfig())
  args = (tokens, rows["images"], rows["image_mask"])
  adapted = jax.jit(network.apply)({"params": params}, *args)[0]
  folded = jax.jit(MM1Model(plain).apply)({"params": merged}, *args)[0]
  assert max_relative_error(folded, adapted) <= 1e-5
