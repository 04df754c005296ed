"""Helpers for experiment config files (configs/*.py).

A config file is a short get_config(arg) that starts from `base_config()`
and changes what its experiment is about. The model section mirrors the
dataclasses in mm1_jax/models/config.py field by field, so every model
hyper-parameter can be overridden from the command line
(--config.model.llm.depth=8) and is validated before anything is built.
"""

from __future__ import annotations

import dataclasses
import typing

import ml_collections

from mm1_jax.data.config import InputConfig
from mm1_jax.models.config import ConfigError, MM1Config
from mm1_jax.training.optimizer import OptimizerConfig

_PLACEHOLDER_TYPES = {"int": int, "float": float, "str": str, "bool": bool}


def _dataclass_to_config(instance) -> ml_collections.ConfigDict:
  """A ConfigDict with the dataclass's fields; None fields become typed
  placeholders so that flags can still set them."""
  hints = typing.get_type_hints(type(instance))
  config = ml_collections.ConfigDict()
  for field in dataclasses.fields(instance):
    value = getattr(instance, field.name)
    if dataclasses.is_dataclass(value):
      config[field.name] = _dataclass_to_config(value)
    elif value is None:
      base = [t for t in typing.get_args(hints[field.name]) if t is not type(None)][0]
      config[field.name] = ml_collections.config_dict.placeholder(base)
    else:
      config[field.name] = value
  return config


def model_config(**top_level) -> ml_collections.ConfigDict:
  """The default MM1 model (ViT-H/14 378px, 144-token C-Abstractor, 3B LLM)."""
  config = _dataclass_to_config(MM1Config())
  config.update(top_level)
  return config


def base_config() -> ml_collections.ConfigDict:
  """Defaults shared by every experiment."""
  config = ml_collections.ConfigDict()
  config.model = model_config()
  # The input pipeline (mm1_jax/data/config.py): mixture, batch, length, packing.
  config.data = _dataclass_to_config(InputConfig())
  # Mesh axis sizes; -1 takes the remaining devices. dcn_data > 1 spans the
  # data axis over that many slices (TPU multi-slice, or GPU nodes), the other
  # sizes then being per slice (mm1_jax/sharding.py, make_mesh).
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, expert=1, dcn_data=1))
  # AdamW, schedule, clipping, freezing (mm1_jax/training/optimizer.py).
  config.optimizer = _dataclass_to_config(OptimizerConfig())
  config.train = ml_collections.ConfigDict(dict(
      num_steps=1000,
      log_every=10,
      checkpoint_every=100,
      keep_checkpoints=3,
      async_checkpoint=True,
      seed=0,
      z_loss_weight=0.0,  # Logit z-loss (PaLM); the MoE router z-loss is in model.llm.moe.
      # Per-device peak TFLOP/s for MFU; unset: the device table, or a measured CPU matmul.
      peak_tflops=ml_collections.config_dict.placeholder(float),
  ))
  # Few-shot evaluation (mm1_jax/evaluation/evaluator.py): during training every
  # `every_steps` steps (0: never), and the defaults of `python -m mm1_jax.evaluate`.
  # max_queries: the first N queries of each eval split (0: all).
  config.eval = ml_collections.ConfigDict(dict(
      every_steps=0,
      tasks=("easy_vqa_vqa", "easy_vqa_caption"),
      shots=(0, 4, 8),
      max_queries=100,
      batch_size=16,
      seed=0,
  ))
  # Parameters-only initialisation: comma-separated checkpoints, each holding the
  # whole params tree or some components (converted 'encoder' / 'llm' weights).
  config.init_from = ml_collections.config_dict.placeholder(str)
  return config


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses a config argument like "moe,experts=16" (big_vision style).

  Bare words set booleans to True; key=value pairs are cast to the type of
  the default. Unknown keys raise, naming the accepted ones.
  """
  result = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    if key not in defaults:
      raise ConfigError(f"config argument {key!r} is not one of {sorted(defaults)}.")
    default = defaults[key]
    if not value:
      result[key] = True
    elif isinstance(default, bool):
      result[key] = value.lower() in ("1", "true", "yes")
    else:
      result[key] = type(default)(value)
  return result


def mm1_config(config: ml_collections.ConfigDict) -> MM1Config:
  """The validated, typed model config of an experiment config."""
  return MM1Config.from_dict(config.model)
