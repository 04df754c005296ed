"""Typed configuration helpers shared by every config section.

Config files and command-line overrides produce nested ml_collections
ConfigDicts; each section is turned into a frozen dataclass by
`dataclass_from_dict`, which rejects unknown keys with the closest existing
names, so a misspelt override fails with a message instead of being ignored.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import types
import typing
from typing import Any, Mapping


class ConfigError(ValueError):
  """A configuration value that cannot work; the message names the field."""


def to_plain_dict(values: Any) -> Any:
  """A ConfigDict (or dict) as nested plain dicts."""
  if hasattr(values, "to_dict"):
    values = values.to_dict()
  if isinstance(values, Mapping):
    return {k: to_plain_dict(v) for k, v in values.items()}
  return values


def closest_names(name: str, choices: typing.Iterable[str]) -> list[str]:
  """The accepted names a misspelt `name` most likely meant (best first)."""
  return difflib.get_close_matches(name, list(choices), n=3, cutoff=0.5)


def unknown_field_message(path: str, unknown: str, accepted: typing.Iterable[str]) -> str:
  """'Unknown field train.num_step; did you mean train.num_steps? ...'."""
  accepted = sorted(accepted)
  close = closest_names(unknown, accepted)
  hint = f" Did you mean {' or '.join(f'{path}.{c}' for c in close)}?" if close else ""
  return (f"unknown field {path}.{unknown}.{hint} {path} accepts: {', '.join(accepted)}.")


@functools.cache
def _nested_types(cls) -> dict[str, type]:
  """Fields of dataclass `cls` whose type is itself a dataclass."""
  hints = typing.get_type_hints(cls)
  return {name: hint for name, hint in hints.items() if dataclasses.is_dataclass(hint)}


def dataclass_from_dict(cls, values: Mapping[str, Any], path: str):
  """Builds dataclass `cls` from a (nested) dict.

  Nested dataclass fields are built recursively; lists become tuples.
  Unknown keys raise ConfigError naming them as `path.key` with the closest
  accepted names.
  """
  fields = {f.name for f in dataclasses.fields(cls)}
  for name in sorted(set(values) - fields):
    raise ConfigError(unknown_field_message(path, name, fields))
  nested = _nested_types(cls)
  hints = typing.get_type_hints(cls)
  kwargs = {}
  for name, value in values.items():
    if name in nested:
      if not isinstance(value, Mapping):
        raise ConfigError(f"{path}.{name}: expected a section of fields, got {value!r}.")
      kwargs[name] = dataclass_from_dict(nested[name], value, f"{path}.{name}")
    else:
      kwargs[name] = _checked_value(hints[name], value, f"{path}.{name}")
  return cls(**kwargs)


def _type_name(hint: Any) -> str:
  return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _checked_value(hint: Any, value: Any, field: str) -> Any:
  """`value` as a field of type `hint` takes it (lists and comma-separated
  strings become tuples, ints become floats); ConfigError if it cannot."""
  origin, args = typing.get_origin(hint), typing.get_args(hint)
  if origin in (typing.Union, types.UnionType):
    if value is None and type(None) in args:
      return None
    options = [a for a in args if a is not type(None)]
    for option in options:
      try:
        return _checked_value(option, value, field)
      except ConfigError:
        continue
    raise ConfigError(f"{field}: expected {_type_name(hint)}, got {value!r}.")
  if origin is tuple:
    if isinstance(value, str):  # "encoder,connector" from a flag.
      value = [item.strip() for item in value.split(",") if item.strip()]
    if not isinstance(value, (list, tuple)):
      raise ConfigError(f"{field}: expected a tuple, got {value!r}.")
    item_type = args[0] if args else Any
    return tuple(value if item_type is Any else
                 (_checked_value(item_type, item, field) for item in value))
  if hint is bool:
    ok = isinstance(value, bool)
  elif hint is int:
    ok = isinstance(value, int) and not isinstance(value, bool)
  elif hint is float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    value = float(value) if ok else value
  elif hint is str:
    ok = isinstance(value, str)
  else:
    ok = True
  if not ok:
    raise ConfigError(f"{field}: expected {_type_name(hint)}, got {value!r}.")
  return value


def require_at_least(config: Any, path: str, **minimums: float) -> None:
  """ConfigError naming the first field of `config` below its minimum."""
  for name, minimum in minimums.items():
    value = getattr(config, name)
    if value is not None and value < minimum:
      raise ConfigError(f"{path}.{name}: must be >= {minimum}, got {value}.")
