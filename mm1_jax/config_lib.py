"""Helpers for experiment config files (configs/*.py).

A config file is a short get_config(arg) that starts from `base_config()`
and changes what its experiment is about. Every section mirrors a
dataclass of mm1_jax.experiment.Experiment field by field, so every
hyper-parameter can be overridden from the command line
(--config.model.llm.depth=8) and is validated before anything is built.
"""

from __future__ import annotations

import dataclasses
import typing

import ml_collections

from mm1_jax.experiment import experiment_defaults
from mm1_jax.models.config import MM1Config
from mm1_jax.typed_config import ConfigError

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
  """Defaults shared by every experiment: one section per field of
  mm1_jax.experiment.Experiment (model, data, optimizer, train, eval, mesh),
  with the defaults of its dataclass, and init_from."""
  config = ml_collections.ConfigDict()
  for name, defaults in experiment_defaults().items():
    config[name] = _dataclass_to_config(defaults)
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
