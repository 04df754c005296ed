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

from mm1_jax.typed_config import ConfigError

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
    # The rank dim of LoRA adapters (A [..., in, r], B [r, out...]): small, so
    # replicated; the adapters' other dims follow their kernel's.
    ("lora_rank", None),
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
    # KV cache of decoding [B, S, KV, head_dim] (stacked over "layers"): split
    # like the attention activations that fill it.
    ("cache_batch", ("data", "fsdp", "expert")),
    ("cache_sequence", None),
    ("cache_kv_heads", "tensor"),
    ("cache_head_dim", None),
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


# `dcn_<axis>` sizes in a mesh spec: how many slices (TPU pod slices joined
# by the data-center network, or GPU nodes) that axis spans. The plain sizes
# are then per slice, so the mesh axis is dcn_<axis> x <axis> long.
DCN_PREFIX = "dcn_"


def split_dcn_sizes(sizes: Mapping[str, int]) -> tuple[dict[str, int], dict[str, int]]:
  """Splits a mesh spec into per-slice sizes and slice counts (dcn), per axis."""
  per_slice = {k: v for k, v in sizes.items() if not k.startswith(DCN_PREFIX)}
  dcn = {k[len(DCN_PREFIX):]: int(v) for k, v in sizes.items() if k.startswith(DCN_PREFIX)}
  unknown = sorted(set(dcn) - set(MESH_AXES))
  if unknown:
    raise ConfigError(f"mesh: unknown axis {[DCN_PREFIX + a for a in unknown]}; the "
                      f"data-center-network sizes are {[DCN_PREFIX + a for a in MESH_AXES]}.")
  bad = {DCN_PREFIX + a: v for a, v in dcn.items() if v < 1}
  if bad:
    raise ConfigError(f"mesh: slice counts must be positive (no -1), got {bad}.")
  return per_slice, {axis: dcn.get(axis, 1) for axis in MESH_AXES}


def _devices_by_slice(devices: Sequence[Any], num_slices: int) -> list[list[Any]]:
  """The devices of each slice, slice by slice.

  Without a slice_index (GPUs, CPUs) the devices, in process order, are cut
  into equal runs: one per node when processes are numbered node by node, as
  SLURM and launch/ number them.
  """
  ordered = sorted(devices, key=lambda d: (d.process_index, d.id))
  per_slice = len(ordered) // num_slices
  return [ordered[i * per_slice:(i + 1) * per_slice] for i in range(num_slices)]


def hybrid_device_array(per_slice_dims: Sequence[int], dcn_dims: Sequence[int],
                        devices: Sequence[Any]) -> np.ndarray:
  """Devices laid out for a mesh spanning slices: axis i is dcn_dims[i] blocks
  (slices) of per_slice_dims[i] devices, so only the dcn part of an axis
  crosses the slower network between slices.

  TPU devices know their slice (slice_index): mesh_utils.create_hybrid_device_mesh
  places them. Other devices are grouped by `_devices_by_slice`.
  """
  from jax.experimental import mesh_utils
  num_slices = math.prod(dcn_dims)
  slice_indices = {getattr(d, "slice_index", None) for d in devices}
  if devices[0].platform == "tpu" or (None not in slice_indices and
                                      len(slice_indices) == num_slices):
    try:
      return mesh_utils.create_hybrid_device_mesh(per_slice_dims, dcn_dims, devices)
    except ValueError as e:  # E.g. fewer slices than the dcn sizes ask for.
      raise ConfigError(f"mesh: {e} (dcn sizes {tuple(dcn_dims)}).") from e
  blocks = np.empty(tuple(dcn_dims), dtype=object)
  for index, slice_devices in zip(np.ndindex(*dcn_dims), _devices_by_slice(devices, num_slices)):
    try:
      blocks[index] = mesh_utils.create_device_mesh(per_slice_dims, devices=slice_devices)
    except (AssertionError, ValueError, NotImplementedError):
      blocks[index] = np.asarray(slice_devices).reshape(per_slice_dims)
  return np.block(blocks.tolist())


def make_mesh(sizes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A Mesh over (data, fsdp, tensor, expert) with classic (Auto) sharding.

  Auto axes give pjit semantics: shardings are hints the compiler propagates.
  With `dcn_<axis>` sizes above 1 (multi-slice), the other sizes are per
  slice (-1 takes the rest of a slice) and the devices are laid out by
  `hybrid_device_array`.
  """
  devices = list(devices if devices is not None else jax.devices())
  per_slice_sizes, dcn = split_dcn_sizes(sizes)
  num_slices = math.prod(dcn.values())
  if len(devices) % num_slices:
    raise ConfigError(f"mesh: {len(devices)} devices do not split into the {num_slices} "
                      f"slices that the dcn sizes {dcn} ask for.")
  shape = resolve_mesh_shape(per_slice_sizes, len(devices) // num_slices)
  dims = tuple(shape[axis] for axis in MESH_AXES)
  if num_slices > 1:
    device_array = hybrid_device_array(dims, tuple(dcn[axis] for axis in MESH_AXES), devices)
    return Mesh(device_array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
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


def batch_parallel_size(mesh_shape: Mapping[str, int],
                        rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES) -> int:
  """How many ways the rules split a batch over a mesh of `mesh_shape` (the
  product of the mesh axes 'activation_batch' maps to)."""
  axes = dict(rules)["activation_batch"]
  axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
  return math.prod(int(mesh_shape.get(axis, 1)) for axis in axes)
