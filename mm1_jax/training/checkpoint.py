"""Checkpointing of the train state, the data position and parameters.

Layout of a workdir:

    {workdir}/checkpoints/{step}/default/...                    train state (Orbax PyTree)
    {workdir}/checkpoints/{step}/data/process_{i}-of-{n}/...    data position of process i
    {workdir}/checkpoints/{step}/base/metadata                  LoRA runs: the frozen base (JSON)

Both are items of one Orbax step: written into the step's temporary
directory and committed together by its rename (or commit file on gs://),
and deleted together when `keep` prunes the step.

A LoRA run (model.lora.rank > 0) saves only what trains: its state's
params hold the trainable leaves (the adapters, and e.g. the connector),
and the step's `base` item records where the frozen base comes from (the
run's init_from paths) and its `fingerprint` (see `fingerprint`); the
trainer rebuilds the base from init_from on restore and checks it
(mm1_jax/training/trainer.py, load_run_params).

Usage in a training loop:

    checkpointer = Checkpointer(workdir, save_every=1000, keep=3)
    state = checkpointer.restore(abstract_state, data_source) or init_state()
    with PreemptionGuard() as guard:
      for step in range(int(state["step"]), num_steps):
        state = train_step(state, next(data_source))
        if checkpointer.save(step + 1, state, data_source, force=guard.requested):
          ...
        if guard.requested:
          break
    checkpointer.save(final_step, state, data_source, force=True)
    checkpointer.close()

The state saved at step N must be the state after N batches, and the data
source's position the one after those N batches, so that a restart resumes
both at the same point.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from mm1_jax import paths as paths_lib
from mm1_jax import private_apis

CHECKPOINTS_DIR = "checkpoints"
# The step items. The state keeps the name Orbax gives a single item, so
# steps written before the data item existed, and load_params, read alike.
STATE_ITEM = ocp.checkpoint_manager.DEFAULT_ITEM_NAME
DATA_ITEM = "data"
BASE_ITEM = "base"  # LoRA runs: JSON describing the frozen base (not saved in the state).
_JSON_ITEM_FILE = "metadata"  # The file Orbax's JsonCheckpointHandler writes in its item.
PARAMS_KEY = "params"
# Files Orbax writes into every PyTree checkpoint directory.
_PYTREE_METADATA_FILE = "_METADATA"


class CheckpointMismatchError(ValueError):
  """A checkpoint's arrays do not match the expected tree (paths or shapes).

  Attributes:
    missing: paths expected but absent from the checkpoint.
    unexpected: paths in the checkpoint that are not expected.
    mismatched: (path, checkpoint shape, expected shape) of differing shapes.
  """

  def __init__(self, message: str, missing: list[str], unexpected: list[str],
               mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]]):
    super().__init__(message)
    self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched


class BaseMismatchError(ValueError):
  """A LoRA run's init_from gives another frozen base than its checkpoint's."""


class CheckpointSaveError(OSError):
  """A checkpoint could not be written; the message names the path and cause."""


class _StateHandler(ocp.PyTreeCheckpointHandler):
  """Orbax's PyTree handler, keeping the errors of its background writes.

  Orbax's finalize thread logs a failed asynchronous write and moves on; the
  training loop must stop on it (Checkpointer.check_saved), naming the cause.
  """

  def __init__(self, **kwargs):
    super().__init__(**kwargs)
    self.errors: list[BaseException] = []

  async def async_save(self, *args, **kwargs):
    futures = await super().async_save(*args, **kwargs)
    return [_RecordingFuture(f, self.errors) for f in futures or []]


@ocp.args.register_with_handler(_StateHandler, for_save=True)
@dataclasses.dataclass
class _StateSave(ocp.args.PyTreeSave):
  """PyTreeSave for _StateHandler (Orbax maps argument classes to handlers)."""


@ocp.args.register_with_handler(_StateHandler, for_restore=True)
@dataclasses.dataclass
class _StateRestore(ocp.args.PyTreeRestore):
  """PyTreeRestore for _StateHandler."""


class _RecordingFuture:
  """A future whose error, if any, is also appended to `errors`."""

  def __init__(self, future, errors: list[BaseException]):
    self._future, self._errors = future, errors

  def result(self, timeout=None):
    try:
      return self._future.result(timeout=timeout)
    except Exception as error:  # pylint: disable=broad-except  (recorded, re-raised)
      self._errors.append(error)
      raise

  def __getattr__(self, name):
    return getattr(self._future, name)


class DataSource(Protocol):
  """What the Checkpointer needs of an input pipeline (e.g. MultimodalInput).

  `directory` may be a gs:// URI: write through etils.epath or TensorFlow.
  """

  def save(self, directory: str) -> None:
    """Writes the stream position under `directory` (created if needed)."""
    ...

  def restore(self, directory: str) -> None:
    """Continues from the position `save` wrote there."""
    ...


# ---------------------------------------------------------------------------
# The data item: every process's data position, inside the Orbax step.


def data_entry_name(process_index: int, process_count: int) -> str:
  """One process's entry in a step's data item, e.g. 'process_0-of-2'.

  The process count is in the name so that a run restored on another number
  of processes finds no entry instead of another shard's position.
  """
  return f"process_{process_index}-of-{process_count}"


class DataPositionHandler(ocp.CheckpointHandler):
  """Orbax handler of the data item: each process saves its own entry.

  A synchronous handler on purpose. Orbax's CompositeCheckpointHandler runs a
  synchronous item's save in CheckpointManager.save itself, on every process,
  once the item's temporary directory exists (under async checkpointing it
  waits for the directory-creation signal), and before save returns: the
  position written is the one at the step, not a later one the training
  loop has moved on to. Orbax then commits it with the state, atomically.
  """

  def save(self, directory: epath.Path, args: DataPositionSave) -> None:
    entry = directory / data_entry_name(jax.process_index(), jax.process_count())
    args.source.save(os.fspath(entry))

  def restore(self, directory: epath.Path, args: DataPositionRestore) -> DataSource:
    entry = directory / data_entry_name(jax.process_index(), jax.process_count())
    if not entry.exists():
      raise FileNotFoundError(_missing_data_position_message(directory.parent, entry))
    args.source.restore(os.fspath(entry))
    return args.source


@ocp.args.register_with_handler(DataPositionHandler, for_save=True)
@dataclasses.dataclass
class DataPositionSave(ocp.args.CheckpointArgs):
  """Saves `source`'s position as this process's entry of the data item."""
  source: DataSource


@ocp.args.register_with_handler(DataPositionHandler, for_restore=True)
@dataclasses.dataclass
class DataPositionRestore(ocp.args.CheckpointArgs):
  """Restores `source` from this process's entry of the data item."""
  source: DataSource


def _missing_data_position_message(step_dir: epath.Path, entry: epath.Path) -> str:
  """Why `entry` is missing: no data item at all, or other processes' entries."""
  data_dir = step_dir / DATA_ITEM
  # Orbax adds files of its own (commit_success.txt): list the entries only.
  found = (sorted(path.name for path in data_dir.iterdir() if path.name.startswith("process_"))
           if data_dir.exists() else [])
  if not found:
    reason = "the step was saved without a data source"
  else:
    reason = (f"it holds {', '.join(found)}: the checkpoint was written by a different "
              "number of processes")
  return (f"No data position of process {jax.process_index()} of {jax.process_count()} "
          f"in {step_dir}: expected {entry}; {reason}.")


# ---------------------------------------------------------------------------
# Comparing stored metadata with an abstract tree.


def _key_name(key: Any) -> str:
  """One path element as a string: dict key, sequence index or attribute."""
  for attribute in ("key", "idx", "name"):
    if hasattr(key, attribute):
      return str(getattr(key, attribute))
  return str(key)


def path_string(path: Iterable[Any]) -> str:
  """'params/llm/layers/kernel' from a jax key path.

  Orbax stores namedtuples and dataclasses as dicts and tuples as lists, so
  attribute names and indices are written like dict keys: both sides of a
  comparison then spell a leaf the same way.
  """
  return "/".join(_key_name(key) for key in path)


def _stored_shape(leaf: Any) -> tuple[int, ...]:
  """The shape an abstract leaf has on disk (typed PRNG keys as key data)."""
  dtype = getattr(leaf, "dtype", None)
  if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    # Orbax writes typed keys as their uint32 key data (trailing dims added).
    return tuple(jax.eval_shape(jax.random.key_data,
                                jax.ShapeDtypeStruct(leaf.shape, dtype)).shape)
  shape = getattr(leaf, "shape", None)
  return tuple(shape) if shape is not None else tuple(np.shape(leaf))


def _abstract_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """Path -> on-disk shape for every leaf of an abstract (or concrete) tree."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {path_string(path): _stored_shape(leaf) for path, leaf in leaves}


def _metadata_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """Path -> shape for every leaf of an Orbax metadata tree."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {path_string(path): tuple(getattr(leaf, "shape", None) or ())
          for path, leaf in leaves}


def _differences(stored: Mapping[str, tuple[int, ...]],
                 expected: Mapping[str, tuple[int, ...]]):
  """(missing, unexpected, mismatched) between checkpoint and expectation."""
  missing = sorted(set(expected) - set(stored))
  unexpected = sorted(set(stored) - set(expected))
  mismatched = [(path, stored[path], expected[path])
                for path in sorted(set(stored) & set(expected))
                if tuple(stored[path]) != tuple(expected[path])]
  return missing, unexpected, mismatched


def _describe(missing, unexpected, mismatched, expected_name: str) -> str:
  """Lines naming every differing, missing and unexpected path."""
  lines = []
  if mismatched:
    lines.append(f"  shape differs (checkpoint vs {expected_name}):")
    lines += [f"    {path}: checkpoint {stored} vs {expected_name} {wanted}"
              for path, stored, wanted in mismatched]
  if missing:
    lines.append(f"  missing from the checkpoint (in {expected_name} only):")
    lines += [f"    {path}" for path in missing]
  if unexpected:
    lines.append(f"  unexpected in the checkpoint (not in {expected_name}):")
    lines += [f"    {path}" for path in unexpected]
  return "\n".join(lines)


def _check_matches(stored_tree: Any, abstract: Any, header: str, footer: str,
                   expected_name: str) -> None:
  """Raises CheckpointMismatchError if paths or shapes differ."""
  missing, unexpected, mismatched = _differences(_metadata_shapes(stored_tree),
                                                 _abstract_shapes(abstract))
  if missing or unexpected or mismatched:
    message = "\n".join([header, _describe(missing, unexpected, mismatched, expected_name),
                         footer])
    raise CheckpointMismatchError(message, missing, unexpected, mismatched)


def _read_tree_metadata(item_dir: epath.Path) -> Any:
  """The stored tree of ArrayMetadata of one PyTree checkpoint directory."""
  handler = ocp.PyTreeCheckpointHandler()
  try:
    return handler.metadata(item_dir).tree
  finally:
    handler.close()


def _type_handlers() -> ocp.type_handlers.TypeHandlerRegistry:
  """Orbax's array handler, with replica-parallel saving only off CPU.

  Replica-parallel saving slices every replicated array per replica with a
  jax op, compiling one small program per distinct shape: on a CPU mesh that
  is minutes for the first save of a few hundred parameters, for nothing (the
  replicas share one host's memory). GPUs and TPUs keep Orbax's default.
  """
  replica_parallel = None if jax.default_backend() != "cpu" else False
  return ocp.type_handlers.create_type_handler_registry(
      (jax.Array, ocp.type_handlers.ArrayHandler(
          use_replica_parallel=replica_parallel,
          array_metadata_store=private_apis.array_metadata_store())),
      (np.ndarray, ocp.type_handlers.NumpyHandler()),
      (int, ocp.type_handlers.ScalarHandler()),
      (float, ocp.type_handlers.ScalarHandler()),
      (np.number, ocp.type_handlers.ScalarHandler()),
  )


# ---------------------------------------------------------------------------
# Train-state checkpoints.


class Checkpointer:
  """Saves and restores the train state and the data position of a workdir.

  One Orbax CheckpointManager in `{workdir}/checkpoints` with two items per
  step: the train state (STATE_ITEM: a pytree of sharded jax.Arrays, typed
  PRNG keys included), saved asynchronously by default (`save` returns once
  the arrays are copied off the devices, the writing continues in the
  background), and the data position (DATA_ITEM, DataPositionHandler),
  written before `save` returns. Orbax writes both into the step's temporary
  directory and commits them together, so a process killed during a save
  leaves a partial directory that `latest_step` and `restore` ignore, and a
  committed step always has its data position; `keep` prunes both together.

  Multi-host: every process must call save / restore / wait / close (Orbax
  synchronises them); each writes and reads only its own data position.
  """

  def __init__(self, workdir: str, save_every: int, keep: int, async_save: bool = True):
    if save_every < 1:
      raise ValueError(f"save_every must be >= 1, got {save_every}.")
    if keep < 1:
      raise ValueError(f"keep must be >= 1, got {keep}.")
    self.workdir = paths_lib.as_path(workdir)  # Absolute: tensorstore refuses relative paths.
    self.directory = self.workdir / CHECKPOINTS_DIR
    self.save_every = save_every
    self.keep = keep
    # The same name format for the manager and for latest_step's disk listing.
    self._name_format = ocp.path.step.standard_name_format()
    options = ocp.CheckpointManagerOptions(
        enable_async_checkpointing=async_save,
        preservation_policy=ocp.checkpoint_managers.LatestN(keep),
        step_name_format=self._name_format,
        # Leave partial saves of a killed run alone: constructing a
        # Checkpointer must not modify a workdir (e.g. one of another config).
        cleanup_tmp_directories=False,
        create=True)
    self._state_handler = _StateHandler(type_handler_registry=_type_handlers())
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={STATE_ITEM: self._state_handler, DATA_ITEM: DataPositionHandler(),
                       BASE_ITEM: ocp.JsonCheckpointHandler()})
    self._pending: int | None = None  # The step of a save not yet checked (check_saved).

  # Saving.

  def should_save(self, step: int, force: bool = False) -> bool:
    """Whether `save(step, ..., force)` would write a checkpoint."""
    if step in self._manager.all_steps():
      return False  # E.g. the final forced save right after a periodic one.
    return force or step % self.save_every == 0

  def save(self, step: int, state: Any, data_source: DataSource | None = None,
           force: bool = False, base: Mapping[str, Any] | None = None) -> bool:
    """Saves `state` (and the data position) if step % save_every == 0 or force.

    base: a LoRA run's description of its frozen base (JSON-able: init_from,
    fingerprint), saved as the step's BASE_ITEM; `state` then holds only the
    trainable params.

    Returns whether a checkpoint was started. With async_save the arrays are
    written in the background; call `wait()` (or `close()`) before exiting.
    """
    if not self.should_save(step, force):
      return False
    self.check_saved()  # The previous save's failure first.
    items = {STATE_ITEM: _StateSave(state)}
    if data_source is not None:
      items[DATA_ITEM] = DataPositionSave(data_source)
    if base is not None:
      items[BASE_ITEM] = ocp.args.JsonSave(dict(base))
    try:
      saved = self._manager.save(step, args=ocp.args.Composite(**items), force=True)
    except OSError as error:  # The synchronous part: directories, the data position.
      raise CheckpointSaveError(
          f"saving the checkpoint of step {step} to {self.directory} failed: {error!r}. The "
          f"previous checkpoint (step {self.latest_step()}) is intact; fix the cause (disk "
          "space, permissions) and restart.") from error
    if saved:
      self._pending = step
      logging.info("Checkpoint of step %d started in %s", step, self.directory)
    return saved

  # Querying and restoring.

  def latest_step(self) -> int | None:
    """The newest committed checkpoint step on disk, or None.

    Read from the directory (not the manager's cache), so a save still in
    flight and partial directories of killed runs are not counted.
    """
    steps = [metadata.step for metadata in self._name_format.find_all(self.directory)]
    return max(steps, default=None)

  def all_steps(self) -> list[int]:
    """All committed checkpoint steps on disk, ascending."""
    return sorted(metadata.step for metadata in self._name_format.find_all(self.directory))

  def restore(self, abstract_state: Any, data_source: DataSource | None = None,
              step: int | None = None) -> Any:
    """Restores the latest committed step into abstract_state's shardings.

    abstract_state: pytree of jax.ShapeDtypeStruct with `.sharding` (any mesh:
      Orbax reshards on read). Returns None when there is no checkpoint.
    step: a committed step to restore instead of the latest (FileNotFoundError
      naming the committed ones if it is not one).
    Raises CheckpointMismatchError, before reading or writing anything else,
    when the stored paths or shapes differ from abstract_state.
    """
    self._manager.wait_until_finished()  # A save of our own still in flight.
    if step is None:
      step = self.latest_step()
      if step is None:
        return None
    elif step not in self.all_steps():
      raise FileNotFoundError(f"no committed checkpoint of step {step} in {self.directory}; "
                              f"it has steps {self.all_steps()}.")
    self.check_compatible(step, abstract_state)
    items = {STATE_ITEM: _StateRestore(
        item=abstract_state,
        restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state))}
    if data_source is not None:
      entry = self.data_position_path(step)
      if not entry.exists():  # Before reading any array.
        raise FileNotFoundError(_missing_data_position_message(entry.parent.parent, entry))
      items[DATA_ITEM] = DataPositionRestore(data_source)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    logging.info("Restored step %d from %s", step, self.directory)
    return restored[STATE_ITEM]

  def step_directory(self, step: int) -> epath.Path:
    """The directory of committed `step`."""
    return self._name_format.find_step(self.directory, step).path

  def read_base(self, step: int) -> dict[str, Any] | None:
    """The base description a LoRA run saved with `step` (None: a full state)."""
    return read_base(self.step_directory(step))

  def check_compatible(self, step: int, abstract_state: Any) -> None:
    """Raises CheckpointMismatchError if `step` does not fit abstract_state."""
    item_dir = self._name_format.find_step(self.directory, step).path / STATE_ITEM
    _check_matches(
        _read_tree_metadata(item_dir), abstract_state,
        header=(f"The checkpoint of step {step} in {self.directory} does not match "
                "the train state of this config:"),
        footer=(f"The workdir {self.workdir} holds a checkpoint from another config: "
                "use a fresh --workdir, or the config it was trained with. "
                "Nothing in the workdir was modified."),
        expected_name="config")

  def data_position_path(self, step: int, process_index: int | None = None,
                         process_count: int | None = None) -> epath.Path:
    """A process's data position entry of committed `step` (default: this one's)."""
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    step_dir = self._name_format.find_step(self.directory, step).path
    return step_dir / DATA_ITEM / data_entry_name(process_index, process_count)

  def delete(self, step: int) -> None:
    """Deletes committed checkpoint `step` (both items)."""
    self._manager.wait_until_finished()
    self._manager.delete(step)

  def check_saved(self) -> None:
    """Raises CheckpointSaveError once the last asynchronous save has ended
    without committing its step (disk full, permissions, ...). Cheap while the
    save runs: the training loop calls it every step."""
    if self._pending is None or self._manager.is_saving_in_progress():
      return
    step, self._pending = self._pending, None
    if self._state_handler.errors or step not in self.all_steps():
      cause = (repr(self._state_handler.errors[-1]) if self._state_handler.errors
               else "it was not committed (see Orbax's error in the log)")
      self._state_handler.errors.clear()
      raise CheckpointSaveError(
          f"saving the checkpoint of step {step} to {self.directory} failed: {cause}. The "
          f"previous checkpoint (step {self.latest_step()}) is intact; fix the cause (disk "
          "space, permissions) and restart.")

  # Lifecycle.

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are committed (CheckpointSaveError
    if one failed)."""
    try:
      self._manager.wait_until_finished()
    except Exception as error:  # pylint: disable=broad-except  (Orbax re-raises the write's)
      self._state_handler.errors.append(error)
    self.check_saved()

  def close(self) -> None:
    """Waits for pending saves and releases Orbax's resources."""
    self.wait()
    self._manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


# ---------------------------------------------------------------------------
# LoRA runs: the frozen base, described instead of saved.


def read_base(step_dir: Any) -> dict[str, Any] | None:
  """The BASE_ITEM of a Checkpointer step directory, or None when the step
  holds the whole params (not a LoRA run's trainable-only state)."""
  file = paths_lib.as_path(step_dir) / BASE_ITEM / _JSON_ITEM_FILE
  return json.loads(file.read_text()) if file.exists() else None


_GOLDEN, _MIX1, _MIX2 = 0x9E3779B9, 0x85EBCA6B, 0xC2B2AE35


def _leaf_hashes(leaf: jax.Array) -> jax.Array:
  """Two order-independent uint32 hashes of a leaf's bits, position-aware:
  sum_i bits_i * (2 i + 1) and sum_i murmur3_mix(bits_i ^ i * golden), mod
  2^32. Integer sums do not depend on the reduction order, so any sharding
  gives the same value; any single changed element changes the first (odd
  multipliers are invertible mod 2^32)."""
  import jax.numpy as jnp
  if leaf.dtype == jnp.bool_:
    leaf = leaf.astype(jnp.uint8)
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}.get(leaf.dtype.itemsize)
  if unsigned is None:  # 64-bit leaves: the two 32-bit halves.
    bits = jax.lax.bitcast_convert_type(leaf, jnp.uint32)
  else:
    bits = jax.lax.bitcast_convert_type(leaf, unsigned).astype(jnp.uint32)
  index = jnp.zeros(bits.shape, jnp.uint32)
  stride = 1
  for dim in reversed(range(bits.ndim)):  # Row-major flat index, without a reshape.
    index = index + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, dim) * jnp.uint32(stride)
    stride = (stride * bits.shape[dim]) % 2**32
  linear = jnp.sum(bits * (index * jnp.uint32(2) + jnp.uint32(1)), dtype=jnp.uint32)
  z = bits ^ (index * jnp.uint32(_GOLDEN))
  z = (z ^ (z >> 16)) * jnp.uint32(_MIX1)
  z = (z ^ (z >> 13)) * jnp.uint32(_MIX2)
  z = z ^ (z >> 16)
  return jnp.stack([linear, jnp.sum(z, dtype=jnp.uint32)])


def fingerprint(tree: Any) -> str:
  """A 64-bit hex fingerprint of a params tree: its paths, shapes, dtypes
  and every bit of its values.

  Cost: one jitted pass over the arrays where they are (sharded arrays stay
  sharded; two uint32 per leaf come back to the host, then one sha256 over
  paths, shapes and those): memory-bandwidth bound, milliseconds per GB on
  an accelerator, about a second per GB on a CPU, and one compilation.
  """
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  hashes = jax.device_get(jax.jit(lambda xs: [_leaf_hashes(x) for x in xs])(
      [leaf for _, leaf in leaves]))
  digest = hashlib.sha256()
  for (path, leaf), (linear, mixed) in zip(leaves, hashes):
    digest.update(f"{path_string(path)}|{tuple(leaf.shape)}|{np.dtype(leaf.dtype).name}|"
                  f"{int(linear)}|{int(mixed)};".encode())
  return digest.hexdigest()[:16]


# ---------------------------------------------------------------------------
# Parameters only (converters, fine-tuning from a pretrained run).


def save_params(path: str, params: Any) -> None:
  """Writes a params-only checkpoint to `path` (which must not exist yet)."""
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(paths_lib.as_path(path), params)
    checkpointer.wait_until_finished()


def _params_location(path: epath.Path) -> tuple[epath.Path, bool]:
  """(PyTree directory, whether params are under 'params' of a train state).

  path: a step directory, a save_params directory, or a run's workdir (its
  newest committed step).
  """
  if (path / CHECKPOINTS_DIR).is_dir():
    steps = [m.step for m in ocp.path.step.standard_name_format().find_all(path / CHECKPOINTS_DIR)]
    if not steps:
      raise FileNotFoundError(f"the workdir {path} has no complete checkpoint yet.")
    path = path / CHECKPOINTS_DIR / str(max(steps))
  if (path / STATE_ITEM / _PYTREE_METADATA_FILE).exists():
    return path / STATE_ITEM, True  # A Checkpointer step directory.
  if (path / _PYTREE_METADATA_FILE).exists():
    return path, False  # Written by save_params.
  raise FileNotFoundError(
      f"{path} is neither a Checkpointer step directory "
      f"({{workdir}}/{CHECKPOINTS_DIR}/{{step}}) nor a params checkpoint written by "
      "save_params.")


def load_params(path: str, abstract_params: Any) -> Any:
  """Loads only the parameters of a checkpoint into abstract_params' shardings.

  path: a Checkpointer step directory (its train state's 'params' are read,
    nothing else), a workdir (its newest step), or a directory written by
    `save_params`.
  abstract_params: pytree of jax.ShapeDtypeStruct with `.sharding`; dtypes may
    differ from the stored ones (values are cast).
  Raises CheckpointMismatchError listing every missing, unexpected and
  mis-shaped parameter.
  """
  path = paths_lib.as_path(path)
  item_dir, in_train_state, stored = _stored_params(path)
  _check_params(path, stored, abstract_params)
  return _restore_params(item_dir, in_train_state, abstract_params)


def _stored_params(path: epath.Path) -> tuple[epath.Path, bool, Any]:
  """(PyTree directory, whether in a train state, stored params metadata tree)."""
  item_dir, in_train_state = _params_location(path)
  stored = _read_tree_metadata(item_dir)
  if in_train_state:
    if PARAMS_KEY not in stored:
      raise FileNotFoundError(f"The train state at {path} has no {PARAMS_KEY!r} entry.")
    stored = stored[PARAMS_KEY]
  return item_dir, in_train_state, stored


def _check_params(path: epath.Path, stored: Any, abstract_params: Any) -> None:
  _check_matches(stored, abstract_params,
                 header=f"The parameters at {path} do not match the expected ones:",
                 footer="Check that the checkpoint was written for this model config.",
                 expected_name="expected")


def _restore_params(item_dir: epath.Path, in_train_state: bool, abstract_params: Any,
                    partial: bool = False) -> Any:
  # Partial restore reads the 'params' subtree only, not the optimizer state
  # (and, with `partial`, only the leaves abstract_params names).
  item = {PARAMS_KEY: abstract_params} if in_train_state else abstract_params
  with ocp.PyTreeCheckpointer() as checkpointer:
    restored = checkpointer.restore(item_dir, args=ocp.args.PyTreeRestore(
        item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
        partial_restore=in_train_state or partial))
  return restored[PARAMS_KEY] if in_train_state else restored


def stored_param_shapes(path: str) -> dict[str, tuple[int, ...]]:
  """{'llm/blocks/...': shape} of every parameter a checkpoint holds (load_params' paths)."""
  return _metadata_shapes(_stored_params(paths_lib.as_path(path))[2])


def read_param(path: str, leaf_path: Sequence[str]) -> np.ndarray:
  """One parameter of a checkpoint (a step directory, a workdir or a
  save_params directory), read into host memory as stored: nothing else is
  read (QLoRA quantises an init_from checkpoint's kernels one at a time)."""
  item_dir, in_train_state, stored = _stored_params(paths_lib.as_path(path))
  node = stored
  for key in leaf_path:
    if not isinstance(node, Mapping) or key not in node:
      raise CheckpointMismatchError(f"{path} holds no parameter {'/'.join(leaf_path)}.",
                                    missing=["/".join(leaf_path)], unexpected=[], mismatched=[])
    node = node[key]
  item = np.zeros((), np.float32)  # Placeholder: restore_type asks for a host array.
  args = ocp.RestoreArgs(restore_type=np.ndarray)
  for key in reversed(tuple(leaf_path)):
    item, args = {key: item}, {key: args}
  if in_train_state:
    item, args = {PARAMS_KEY: item}, {PARAMS_KEY: args}
  with ocp.PyTreeCheckpointer() as checkpointer:
    restored = checkpointer.restore(item_dir, args=ocp.args.PyTreeRestore(
        item=item, restore_args=args, partial_restore=True))
  for key in ((PARAMS_KEY,) if in_train_state else ()) + tuple(leaf_path):
    restored = restored[key]
  return np.asarray(restored)


def _without(tree: Mapping[str, Any], skip: Callable[[str], bool], prefix: str = "") -> dict:
  """The nested dict without the leaves whose "/"-joined path `skip` accepts."""
  out = {}
  for key, value in tree.items():
    where = f"{prefix}{key}"
    if isinstance(value, Mapping):
      out[key] = _without(value, skip, where + "/")
    elif not skip(where):
      out[key] = value
  return out


def load_component_params(paths: Iterable[str], abstract_params: Mapping[str, Any],
                          init_params: Mapping[str, Any], skip: Callable[[str], bool] | None = None
                          ) -> tuple[dict[str, Any], dict[str, str]]:
  """Overlays the parameters of one or more checkpoints on init_params.

  Each path holds either the whole params tree or some of its top-level
  components: `python -m mm1_jax.convert` writes {'encoder': ...} or
  {'llm': ...}, so a DINOv2 checkpoint and a SmolLM2 checkpoint together
  initialise an MM1 model whose connector keeps its fresh initialisation.
  Inside a component, paths and shapes must match exactly.

  paths: Checkpointer step directories or save_params directories.
  abstract_params: {component: pytree of ShapeDtypeStruct with .sharding}.
  init_params: the freshly initialised params (same structure).
  skip: stored leaves ("llm/blocks/layer_0/attn/query/kernel") it accepts are
    neither checked nor read (QLoRA reads those kernels itself, one by one).
  Returns (params, {component: path it came from}). Raises
  CheckpointMismatchError for a component the model does not have, one that
  two paths provide, or any mis-shaped, missing or unexpected parameter.
  """
  params, sources = dict(init_params), {}
  for path in paths:
    path = paths_lib.as_path(path)
    item_dir, in_train_state, stored = _stored_params(path)
    unknown = sorted(set(stored) - set(abstract_params))
    if unknown:
      raise CheckpointMismatchError(
          f"{path} holds component(s) {unknown} that this model does not have (it has "
          f"{sorted(abstract_params)}); check that the checkpoint was converted for this model.",
          missing=[], unexpected=unknown, mismatched=[])
    twice = sorted(set(stored) & set(sources))
    if twice:
      raise CheckpointMismatchError(
          f"component(s) {twice} are in both {sources[twice[0]]} and {path}; list each "
          "component's checkpoint once in config.init_from.", missing=[], unexpected=twice,
          mismatched=[])
    components = {name: abstract_params[name] for name in stored}
    if skip is not None:
      stored = _without(stored, skip)
    _check_params(path, stored, components)
    params.update(_restore_params(item_dir, in_train_state, components,
                                  partial=skip is not None))
    sources.update({name: os.fspath(path) for name in stored})
  return params, sources


# ---------------------------------------------------------------------------
# Preemption.


class PreemptionGuard:
  """Context manager turning SIGTERM (and SIGINT, when given) into a flag the
  training loop polls. A second SIGINT raises KeyboardInterrupt at once: the
  person at the keyboard means it.

  The handler only sets `requested` (doing real work inside a signal handler
  would interrupt JAX or Orbax at an arbitrary point); the loop saves with
  force=True and exits when it sees the flag. The previous handlers are put
  back on exit. Must be entered in the main thread (a Python signal rule).

  Multi-host (TPU pods): hosts receive the signal at different steps, so the
  local flag alone would make them save different steps. There, combine it
  with a collective decision, e.g. Orbax's CheckpointManager.reached_preemption
  (jax.experimental.multihost_utils.reached_preemption_sync_point); only the
  local flag is implemented here.
  """

  def __init__(self, signals: Iterable[int] = (signal.SIGTERM,)):
    self.signals = tuple(signals)
    self.requested = False
    self.signal_name = ""
    self._previous: dict[int, Any] = {}

  def _handle(self, signum: int, frame: Any) -> None:
    del frame
    if self.requested and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.requested = True
    self.signal_name = signal.Signals(signum).name
    logging.warning("Received signal %d: will checkpoint and stop after this step.", signum)

  def __enter__(self) -> "PreemptionGuard":
    for signum in self.signals:
      self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc_info) -> None:
    for signum, previous in self._previous.items():
      # None means a handler not installed from Python: fall back to default.
      signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
    self._previous.clear()
