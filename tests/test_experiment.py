"""The typed Experiment: every field validated before anything is built."""

import dataclasses
import importlib
import re
import typing

import pytest

from configs import tiny
from mm1_jax import experiment as experiment_lib
from mm1_jax.experiment import Experiment
from mm1_jax.typed_config import ConfigError

# One invalid value for every numeric field of the Experiment (the test below
# checks that none is missing): each must fail with a ConfigError naming it.
INVALID = {
    "model.image_placeholder_id": -1, "model.max_images": 0,
    "model.encoder.image_size": 0, "model.encoder.patch_size": 0, "model.encoder.width": 0,
    "model.encoder.depth": 0, "model.encoder.num_heads": 0, "model.encoder.mlp_dim": 0,
    "model.encoder.layer_scale_init": 0.0, "model.encoder.norm_eps": 0.0,
    "model.encoder.pos_grid_size": 0, "model.encoder.feature_layer": 99,
    "model.encoder.attention_query_chunk": -1, "model.encoder.scan_unroll": 0,
    "model.encoder.image_mean": (0.5, 0.5), "model.encoder.image_std": (0.2, 0.0, 0.2),
    "model.connector.num_image_tokens": 0, "model.connector.hidden_dim": 0,
    "model.connector.depth": -1, "model.connector.mlp_depth": 0,
    "model.connector.num_heads": 0, "model.connector.se_ratio": 0.0,
    "model.llm.vocab_size": 0, "model.llm.width": 0, "model.llm.depth": 0,
    "model.llm.num_heads": 0, "model.llm.num_kv_heads": 0, "model.llm.head_dim": 0,
    "model.llm.mlp_dim": 0, "model.llm.rope_theta": 0.0, "model.llm.norm_eps": -1e-5,
    "model.llm.attention_query_chunk": -1, "model.llm.attention_causal_blocks": 0,
    "model.llm.scan_unroll": 0,
    "model.llm.moe.num_experts": -1, "model.llm.moe.num_experts_per_token": 0,
    "model.llm.moe.moe_every": 0, "model.llm.moe.capacity_factor": 0.0,
    "model.llm.moe.expert_mlp_dim": 0, "model.llm.moe.balance_loss_weight": -0.01,
    "model.llm.moe.router_z_loss_weight": -0.001,
    "model.lora.rank": -1, "model.lora.alpha": 0.0, "model.lora.dropout": 1.0,
    "model.lora.block_size": 48,
    "data.batch_size": 0, "data.seq_len": 0, "data.seed": -1, "data.num_epochs": 0,
    "data.max_skip_fraction": 1.5, "data.image_background": (255, 300, 0),
    "optimizer.learning_rate": 0.0, "optimizer.warmup_steps": -1, "optimizer.decay_steps": 0,
    "optimizer.end_lr_fraction": 1.5, "optimizer.b1": 1.0, "optimizer.b2": -0.1,
    "optimizer.eps": 0.0, "optimizer.weight_decay": -0.1, "optimizer.grad_clip_norm": -1.0,
    "optimizer.grad_accum_steps": 0, "optimizer.connector_learning_rate": 0.0,
    "train.num_steps": 0, "train.log_every": 0, "train.checkpoint_every": 0,
    "train.keep_checkpoints": 0, "train.seed": -1, "train.z_loss_weight": -1.0,
    "train.peak_tflops": 0.0, "train.restore_step": -1,
    "eval.every_steps": -1, "eval.max_queries": -1, "eval.batch_size": 0, "eval.seed": -1,
    "eval.shots": (0, -4),
    "mesh.data": 0, "mesh.fsdp": -2, "mesh.tensor": 0, "mesh.expert": 0, "mesh.dcn_data": 0,
}


def numeric_fields(cls, prefix):
  """Dotted paths of the int / float fields (optional or tuples of them
  included) of a dataclass, recursively."""
  hints = typing.get_type_hints(cls)
  for field in dataclasses.fields(cls):
    hint, path = hints[field.name], f"{prefix}.{field.name}"
    if dataclasses.is_dataclass(hint):
      yield from numeric_fields(hint, path)
    elif {int, float} & ({hint} | set(typing.get_args(hint))):
      yield path


def build(config, **kwargs):
  """Parses without reading the SeqIO registry (every mixture has images)."""
  kwargs.setdefault("num_devices", 1)
  kwargs.setdefault("mixture_has_images", lambda mixture, vocabulary: True)
  return Experiment.from_config(config, **kwargs)


def overridden(path, value):
  config = tiny.get_config()
  *parents, name = path.split(".")
  section = config
  for parent in parents:
    section = section[parent]
  section[name] = value
  return config


def test_the_table_covers_every_numeric_field():
  sections = {f.name: typing.get_type_hints(Experiment)[f.name]
              for f in dataclasses.fields(Experiment) if dataclasses.is_dataclass(
                  typing.get_type_hints(Experiment)[f.name])}
  fields = {path for name, cls in sections.items() for path in numeric_fields(cls, name)}
  assert fields == set(INVALID), (sorted(fields - set(INVALID)), sorted(set(INVALID) - fields))


@pytest.mark.parametrize("path", sorted(INVALID))
def test_every_numeric_field_has_an_invalid_value_named_in_the_error(path):
  with pytest.raises(ConfigError, match="^" + re.escape(path) + ": ") as error:
    build(overridden(path, INVALID[path]))
  assert str(INVALID[path]) in str(error.value)  # The bad value, too.


def test_the_tiny_config_parses_into_typed_sections():
  experiment = build(tiny.get_config())
  assert experiment.train.num_steps == 300 and experiment.mesh.sizes()["data"] == -1
  assert experiment.model.llm.moe.num_experts == 8
  assert experiment.optimizer.learning_rate == 1e-3 and experiment.eval.shots == (0, 4, 8)
  assert '"num_steps": 300' in experiment.config_json


@pytest.mark.parametrize("name, arg, num_devices", [
    ("tiny", None, 1), ("tiny", "dense", 8), ("bench_100m", None, 1), ("bench_1b", "gpu", 8),
    ("mm1_3b", None, 256), ("mm1_7b", None, 256), ("mm1_30b", None, 256),
    ("mm1_3b_moe", None, 256), ("mm1_7b_moe", None, 256), ("mm1_smol", "stage=1,cpu", 1),
    ("mm1_smol", "stage=3", 8), ("mm1_smol", "stage=4,cpu", 1), ("mm1_smol", "stage=4", 8),
    ("tiny", "sft", 1), ("mm1_3b", "sft_highres", 256)])
def test_the_bundled_configs_are_valid(name, arg, num_devices, tmp_path, monkeypatch):
  module = importlib.import_module(f"configs.{name}")
  monkeypatch.chdir(tmp_path)  # mm1_smol starts from checkpoints / workdirs made first.
  for path in (module.get_config(arg).init_from or "").split(","):
    if path:
      (tmp_path / path).mkdir(parents=True)
  build(module.get_config(arg), num_devices=num_devices)


@pytest.mark.parametrize("path, value, message", [
    ("data.batch_size", 6,
     r"data.batch_size: data.batch_size=6 does not split over the 4 batch-parallel devices"),
    ("optimizer.grad_accum_steps", 3, r"optimizer.grad_accum_steps: 3 does not divide "
                                      r"data.batch_size=8"),
    ("data.seq_len", 17, r"data.seq_len: 17 cannot hold one image \(16 tokens\)"),
    ("optimizer.warmup_steps", 301, r"optimizer.warmup_steps: 301 is longer than the run"),
    ("optimizer.decay_steps", 400, r"optimizer.decay_steps: 400 is beyond train.num_steps=300"),
    ("init_from", "/nonexistent/ckpt", r"init_from: /nonexistent/ckpt does not exist"),
    ("data.image_policy", "squash", r"data.image_policy: unknown policy 'squash'"),
    ("model.dtype", "float8", r"model.dtype: unknown dtype 'float8'"),
])
def test_values_that_cannot_work_together_are_named(path, value, message):
  config = overridden(path, value)
  with pytest.raises(ConfigError, match=message):
    build(config, num_devices=4)


def test_init_from_is_only_checked_for_training():
  """evaluate / generate / chat restore the run itself, not its init_from."""
  config = overridden("init_from", "/nonexistent/ckpt")
  assert build(config, check_init_from=False).init_from == ("/nonexistent/ckpt",)


def test_grad_accumulation_micro_batches_must_split_over_the_mesh():
  config = overridden("optimizer.grad_accum_steps", 4)  # 8 / 4 = 2 rows, 4 devices.
  with pytest.raises(ConfigError, match=r"data.batch_size=8 / grad_accum_steps=4 = 2 does not "
                                        r"split over the 4 batch-parallel devices.*multiple of 16"):
    build(config, num_devices=4)
  assert build(config, num_devices=2).optimizer.grad_accum_steps == 4


def test_text_only_mixtures_need_no_room_for_an_image():
  config = overridden("data.seq_len", 8)
  assert build(config, mixture_has_images=lambda m, v: False).data.seq_len == 8


def test_unknown_fields_name_the_closest_existing_ones():
  config = tiny.get_config().to_dict()
  config["train"]["num_step"] = 3
  with pytest.raises(ConfigError, match=r"unknown field train.num_step. Did you mean "
                                        r"train.num_steps( or .*)?\?"):
    build(config)
  config = tiny.get_config().to_dict()
  config["optimiser"] = {}
  with pytest.raises(ConfigError, match=r"unknown field config.optimiser. Did you mean "
                                        r"config.optimizer\?"):
    build(config)


def test_wrong_types_are_named():
  config = tiny.get_config().to_dict()
  config["train"]["num_steps"] = "300"
  with pytest.raises(ConfigError, match=r"train.num_steps: expected int, got '300'"):
    build(config)
  config = tiny.get_config().to_dict()
  config["train"]["num_steps"] = True
  with pytest.raises(ConfigError, match=r"train.num_steps: expected int, got True"):
    build(config)


def test_workdir_must_be_a_directory(tmp_path):
  afile = tmp_path / "file"
  afile.write_text("")
  with pytest.raises(ConfigError, match=r"--workdir: .*file exists and is not a directory"):
    build(tiny.get_config(), workdir=str(afile))
  with pytest.raises(ConfigError, match=r"cannot be created: .*file is not a writable"):
    build(tiny.get_config(), workdir=str(afile / "run"))
  assert build(tiny.get_config(), workdir=str(tmp_path / "new" / "run"))
  assert not (tmp_path / "new").exists()  # Checked, not created.
  assert build(tiny.get_config(), workdir="gs://bucket/run")  # Buckets: not checked here.


def test_the_sections_mirror_the_config_file_defaults():
  """config_lib.base_config builds its sections from the same dataclasses."""
  from mm1_jax import config_lib
  base = config_lib.base_config()
  for name, defaults in experiment_lib.experiment_defaults().items():
    assert set(base[name].keys()) == {f.name for f in dataclasses.fields(defaults)}, name
