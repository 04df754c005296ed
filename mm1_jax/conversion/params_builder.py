"""Fills an mm1_jax params tree from foreign tensors, one tensor at a time.

The expected tree (shapes and dtypes) comes from jax.eval_shape of the
model's init, so a checkpoint that does not fit the config is refused with
the name of the offending tensor instead of failing later inside jit.
Scanned layer stacks are filled slice by slice; only the destination arrays
are ever whole in memory.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np


class ConversionError(ValueError):
  """A source checkpoint that does not fit the model config."""


def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      flat.update(_flatten(value, prefix + (key,)))
    else:
      flat[prefix + (key,)] = value
  return flat


def _unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for path, value in flat.items():
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return tree


class ParamsBuilder:
  """Collects tensors into a params tree shaped like `expected`.

  expected: nested dict whose leaves have .shape and .dtype (e.g. the
    unboxed output of jax.eval_shape(model.init, ...)["params"]).
  """

  def __init__(self, expected: Mapping[str, Any]):
    self._expected = _flatten(expected)
    self._arrays: dict[tuple[str, ...], np.ndarray] = {}
    self._filled: dict[tuple[str, ...], np.ndarray] = {}  # per-leaf mask of filled layer slices

  def _leaf(self, path: Sequence[str], source: str):
    path = tuple(path)
    if path not in self._expected:
      raise ConversionError(f"{source}: maps to {'/'.join(path)}, which this model config does "
                            "not have; check that the checkpoint matches the config.")
    return path, self._expected[path]

  def _array(self, path, spec):
    if path not in self._arrays:
      self._arrays[path] = np.zeros(spec.shape, dtype=np.dtype(spec.dtype))
      stack = spec.shape[0] if len(spec.shape) else 1
      self._filled[path] = np.zeros(stack, dtype=bool)
    return self._arrays[path]

  def set(self, path: Sequence[str], value: np.ndarray, source: str) -> None:
    """Sets a whole leaf."""
    path, spec = self._leaf(path, source)
    value = np.asarray(value)
    if value.shape != tuple(spec.shape):
      raise ConversionError(f"{source}: shape {value.shape} (as {'/'.join(path)}) does not fit "
                            f"the config, which expects {tuple(spec.shape)}.")
    self._array(path, spec)[...] = value
    self._filled[path][:] = True

  def set_layer(self, path: Sequence[str], index: int, value: np.ndarray, source: str) -> None:
    """Sets slice `index` of a scanned (stacked) leaf."""
    path, spec = self._leaf(path, source)
    value = np.asarray(value)
    if not 0 <= index < spec.shape[0]:
      raise ConversionError(f"{source}: layer {index} does not exist in a model with "
                            f"{spec.shape[0]} stacked layers at {'/'.join(path)}.")
    if value.shape != tuple(spec.shape[1:]):
      raise ConversionError(f"{source}: shape {value.shape} (as {'/'.join(path)}[{index}]) does "
                            f"not fit the config, which expects {tuple(spec.shape[1:])}.")
    self._array(path, spec)[index] = value
    self._filled[path][index] = True

  def finish(self) -> dict[str, Any]:
    """Returns the params tree; raises if any leaf (or layer slice) is missing."""
    missing = ["/".join(path) for path in self._expected
               if path not in self._filled or not self._filled[path].all()]
    if missing:
      raise ConversionError(f"the checkpoint has no tensor for {len(missing)} parameter(s): "
                            f"{', '.join(missing[:12])}{' ...' if len(missing) > 12 else ''}")
    return _unflatten(self._arrays)


def check_unexpected(unexpected: Sequence[str]) -> None:
  """Raises listing source tensors no rule consumed."""
  if unexpected:
    raise ConversionError(f"{len(unexpected)} unexpected tensor(s) in the checkpoint: "
                          f"{', '.join(sorted(unexpected)[:12])}{' ...' if len(unexpected) > 12 else ''}")
