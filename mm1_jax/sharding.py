"""Logical-axis sharding: the one table that maps model axes to mesh axes.

Layers only ever name logical axes ("embed", "mlp", "activation_batch", ...).
This file is the single place that decides which mesh axis (data, fsdp,
tensor, expert) each of them is split over, MaxText-style.

Usage:
    mesh = make_mesh({"data": -1, "fsdp": 1, "tensor": 1, "expert": 1})
    with use_mesh(mesh):
      shardings = params_shardings(jax.eval_shape(model.init, ...), mesh)
      params = jax.jit(model.init, out_shardings=shardings)(...)
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from mm1_jax.models.config import ConfigError

MESH_AXES = ("data", "fsdp", "tensor", "expert")

# Logical axis -> mesh axis (or axes, or None = replicated). The batch of
# activations is split over every axis that does not split it otherwise, so
# fsdp and expert parallelism are also data parallelism for activations.
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    # Parameters.
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("vocab", "tensor"),
    ("expert", "expert"),
    ("layers", None),
    ("norm", None),
    ("conv_spatial", None),
    ("conv_in", None),
    ("image_tokens", None),
    ("patches", None),
    # Activations.
    ("activation_batch", ("data", "fsdp", "expert")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_mlp", "tensor"),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_head_dim", None),
    ("activation_vocab", "tensor"),
    ("activation_expert", "expert"),
    ("activation_capacity", None),
)


def resolve_mesh_shape(sizes: Mapping[str, int], num_devices: int) -> dict[str, int]:
  """Fills in one -1 with the remaining devices; checks the product.

  sizes: mesh axis -> size; axes not given are 1.
  """
  unknown = sorted(set(sizes) - set(MESH_AXES))
  if unknown:
    raise ConfigError(f"mesh: unknown axis {unknown}; the mesh axes are {MESH_AXES}.")
  shape = {axis: int(sizes.get(axis, 1)) for axis in MESH_AXES}
  free = [axis for axis, size in shape.items() if size == -1]
  if len(free) > 1:
    raise ConfigError(f"mesh: only one axis may be -1, got {free} in {shape}.")
  bad = [axis for axis, size in shape.items() if size == 0 or size < -1]
  if bad:
    raise ConfigError(f"mesh: sizes must be positive or -1, got {shape}.")
  fixed = math.prod(size for size in shape.values() if size != -1)
  if free:
    if num_devices % fixed:
      raise ConfigError(
          f"mesh: the fixed axis sizes {shape} multiply to {fixed}, which does not "
          f"divide the {num_devices} devices; change the sizes so -1 can take the rest.")
    shape[free[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise ConfigError(
        f"mesh: sizes {shape} multiply to {fixed} but there are {num_devices} devices; "
        "make the product equal the device count, or set one axis to -1.")
  return shape


def make_mesh(sizes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A Mesh over (data, fsdp, tensor, expert) with classic (Auto) sharding.

  Auto axes give pjit semantics: shardings are hints the compiler propagates.
  """
  devices = list(devices if devices is not None else jax.devices())
  shape = resolve_mesh_shape(sizes, len(devices))
  dims = tuple(shape[axis] for axis in MESH_AXES)
  try:
    from jax.experimental import mesh_utils
    device_array = mesh_utils.create_device_mesh(dims, devices=devices)
  except (AssertionError, ValueError, NotImplementedError):
    device_array = np.asarray(devices).reshape(dims)
  return Mesh(device_array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES):
  """Makes `mesh` and the logical rules current for model code.

  Works both around jitted calls and inside a function being traced by jit
  (where only the abstract mesh can be set).
  """
  try:
    mesh_context = jax.set_mesh(mesh)
  except ValueError:  # Inside jit.
    mesh_context = jax.sharding.use_abstract_mesh(mesh.abstract_mesh)
  with mesh_context, nn.logical_axis_rules(rules):
    yield


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES) -> PartitionSpec:
  """Maps logical names of one array to a PartitionSpec.

  A mesh axis is used at most once per array, and a dimension that the mesh
  axes would not split evenly stays replicated on those axes instead of
  failing (e.g. 2 kv heads on a tensor axis of 4).
  """
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for name, dim in zip(names, shape):
    if name is None:
      spec.append(None)
      continue
    if name not in table:
      raise ConfigError(f"sharding: logical axis {name!r} has no rule; add it to "
                        "LOGICAL_AXIS_RULES in mm1_jax/sharding.py.")
    target = table[name]
    axes = (target,) if isinstance(target, str) else tuple(target or ())
    chosen = []
    for axis in axes:
      size = mesh.shape[axis]
      if axis in used or size == 1:
        continue
      if dim % (math.prod(mesh.shape[a] for a in chosen) * size) == 0:
        chosen.append(axis)
    used.update(chosen)
    spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
  return PartitionSpec(*spec)


def params_shardings(abstract_variables: Any, mesh: Mesh,
                     rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES) -> Any:
  """NamedShardings for a (boxed, abstract) variables tree from its annotations.

  abstract_variables: the output of jax.eval_shape(model.init, ...), whose
    leaves are nn.LogicallyPartitioned boxes. Unannotated leaves replicate.
  Returns a tree with the same structure as nn.unbox(abstract_variables).
  """
  def one(leaf):
    if isinstance(leaf, nn.LogicallyPartitioned):
      spec = logical_to_spec(leaf.names, leaf.value.shape, mesh, rules)
    else:
      spec = PartitionSpec()
    return NamedSharding(mesh, spec)

  return jax.tree.map(one, abstract_variables,
                      is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def logical_sharding(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                     rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES) -> NamedSharding:
  """The NamedSharding of one array (e.g. a batch) from its logical axis names."""
  return NamedSharding(mesh, logical_to_spec(names, shape, mesh, rules))


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Sharding constraint on an activation, by logical names.

  A no-op outside `use_mesh` (single-device use needs no mesh). Uses the same
  table and divisibility fallback as the parameters.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  rules = nn.get_logical_axis_rules() or LOGICAL_AXIS_RULES
  return jax.lax.with_sharding_constraint(x, logical_to_spec(names, x.shape, mesh, rules))
