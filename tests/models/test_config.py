"""Config errors are caught before anything is built, naming the field."""

import pytest

from configs import bench_1b, mm1_3b, mm1_3b_moe, mm1_7b, mm1_7b_moe, mm1_30b, mm1_smol, tiny
from mm1_jax import config_lib
from mm1_jax.models.config import MM1Config
from mm1_jax.typed_config import ConfigError


def model_dict(**changes):
  """The tiny model config as a dict, with dotted-path changes applied."""
  config = tiny.get_config()
  for path, value in changes.items():
    node = config.model
    *parents, leaf = path.split(".")
    for key in parents:
      node = node[key]
    node[leaf] = value
  return config.model


@pytest.mark.parametrize("changes, message", [
    ({"llm.width": 100}, r"llm.width: width 100 is not divisible by num_heads 8"),
    ({"llm.num_kv_heads": 3}, r"llm.num_kv_heads: num_kv_heads 3 does not divide num_heads 8"),
    ({"connector.num_image_tokens": 15},
     r"connector.num_image_tokens: .*must be a perfect square .* got 15"),
    ({"encoder.patch_size": 7}, r"encoder.patch_size: patch_size 7 does not divide image_size 64"),
    ({"encoder.width": 66}, r"encoder.width: width 66 is not divisible by num_heads 4"),
    ({"connector.kind": "qformer"}, r"connector.kind: unknown connector 'qformer'"),
    ({"llm.moe.num_experts_per_token": 9}, r"llm.moe.num_experts_per_token: top-k 9"),
    ({"llm.depth": 5}, r"llm.moe.moe_every: depth 5 is not a multiple of moe_every 2"),
    ({"encoder.feature_layer": -3}, r"encoder.feature_layer: feature_layer -3 is outside"),
    ({"image_placeholder_id": 5000}, r"model.image_placeholder_id: 5000 is not a token id"),
    ({"dtype": "float8"}, r"model.dtype: unknown dtype 'float8'"),
    ({"llm.remat_policy": "some"}, r"llm.remat_policy: unknown remat policy 'some'"),
    ({"encoder.attention_implementation": "flash"},
     r"encoder.attention_implementation: unknown attention implementation 'flash'"),
    ({"llm.attention_causal_blocks": 0}, r"llm.attention_causal_blocks: must be >= 1 .* got 0"),
    ({"encoder.scan_unroll": 0}, r"encoder.scan_unroll: must be >= 1 .* got 0"),
])
def test_bad_values_name_the_field(changes, message):
  with pytest.raises(ConfigError, match=message):
    MM1Config.from_dict(model_dict(**changes))


def test_unknown_field_lists_the_accepted_ones():
  values = model_dict().to_dict()
  values["llm"]["num_layers"] = 4
  with pytest.raises(ConfigError, match=r"model.llm.num_layers.*accepts: .*depth"):
    MM1Config.from_dict(values)


def test_mlp_connector_must_keep_every_patch():
  with pytest.raises(ConfigError, match=r"num_image_tokens must equal the encoder's 64 patches"):
    MM1Config.from_dict(model_dict(**{"connector.kind": "mlp"}))
  MM1Config.from_dict(model_dict(**{"connector.kind": "mlp", "connector.num_image_tokens": 64}))


@pytest.mark.parametrize("module", [tiny, mm1_3b, mm1_7b, mm1_30b, mm1_3b_moe, mm1_7b_moe])
def test_every_shipped_config_is_valid(module):
  config = config_lib.mm1_config(module.get_config(None))
  assert config.connector.kind == "c_abstractor"


@pytest.mark.parametrize("config, implementation", [
    (bench_1b.get_config("gpu"), "cudnn"), (mm1_smol.get_config("stage=3"), "cudnn"),
    (bench_1b.get_config(None), "xla"), (mm1_smol.get_config("stage=3,cpu"), "xla")])
def test_gpu_presets_use_fused_attention_and_the_rest_do_not(config, implementation):
  model = config_lib.mm1_config(config)
  assert model.llm.attention_implementation == implementation
  assert model.encoder.attention_implementation == implementation


def test_defaults_are_mm1s_encoder_and_connector():
  config = config_lib.mm1_config(mm1_3b.get_config())
  assert (config.encoder.image_size, config.encoder.patch_size, config.encoder.width) == (378, 14, 1280)
  assert config.encoder.num_patches == 729 and config.num_image_tokens == 144
  moe = config_lib.mm1_config(mm1_3b_moe.get_config()).llm.moe
  assert (moe.num_experts, moe.moe_every, moe.num_experts_per_token) == (64, 2, 2)
  assert (moe.balance_loss_weight, moe.router_z_loss_weight) == (0.01, 0.001)
  moe = config_lib.mm1_config(mm1_7b_moe.get_config()).llm.moe
  assert (moe.num_experts, moe.moe_every) == (32, 4)


def test_config_argument_parsing():
  assert config_lib.mm1_config(tiny.get_config("dense")).llm.moe.num_experts == 0
  assert config_lib.mm1_config(tiny.get_config("dispatch=capacity")).llm.moe.dispatch == "capacity"
  with pytest.raises(ConfigError, match=r"config argument 'experts' is not one of"):
    tiny.get_config("experts=4")


def test_none_fields_can_be_overridden_like_flags():
  config = tiny.get_config()
  config.model.llm.head_dim = 32  # A typed placeholder accepts an int.
  assert config_lib.mm1_config(config).llm.resolved_head_dim == 32
