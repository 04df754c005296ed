"""Checkpointing: round trip into the same and another mesh, data positions
committed and pruned with their step, async saves, partial (killed) saves
ignored, config mismatch refused without touching the workdir, params-only
loading, SIGTERM guard."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from mm1_jax import sharding
from mm1_jax.training import checkpoint as ckpt

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class FakeSource:
  """A data source whose position is one integer, saved as json."""

  def __init__(self, position=0):
    self.position = position
    self.restored_from = None
    self.saved_to = None

  def save(self, directory):
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "position.json"), "w") as f:
      json.dump({"position": self.position}, f)
    self.saved_to = directory

  def restore(self, directory):
    with open(os.path.join(directory, "position.json")) as f:
      self.position = json.load(f)["position"]
    self.restored_from = directory


PARAM_SPECS = {
    "encoder": {"kernel": P("fsdp", None), "bias": P()},
    "llm": {"embed": P(None, "fsdp"), "layers": {"w": P(None, "fsdp", "data")}},
}
PARAM_SHAPES = {
    "encoder": {"kernel": (8, 4), "bias": (4,)},
    "llm": {"embed": (6, 8), "layers": {"w": (2, 4, 8)}},
}


def make_params(mesh, offset=0.0):
  """Distinct values per leaf, sharded by PARAM_SPECS."""
  def one(shape, spec):
    values = np.arange(np.prod(shape), dtype=np.float32).reshape(shape) + offset
    return jax.device_put(values, NamedSharding(mesh, spec))
  return jax.tree.map(one, PARAM_SHAPES, PARAM_SPECS, is_leaf=lambda x: isinstance(x, tuple))


def make_state(mesh, step=0, offset=0.0):
  """A train state like the trainer's: step, sharded params, Adam state, typed key."""
  params = make_params(mesh, offset)
  opt_state = jax.jit(optax.adamw(1e-3).init)(params)
  # Non-zero moments, so the optimizer state round trip is checked too.
  opt_state = jax.tree.map(lambda x: x + 1 if x.ndim else x, opt_state)
  replicated = NamedSharding(mesh, P())
  return {"step": jax.device_put(jnp.int32(step), replicated), "params": params,
          "opt_state": opt_state,
          "rng": jax.device_put(jax.random.key(step), replicated)}


def abstract_of(state, mesh=None):
  """ShapeDtypeStructs of `state`; with `mesh`, the same specs on that mesh."""
  def one(x):
    spec = x.sharding.spec if isinstance(x.sharding, NamedSharding) else P()
    target = NamedSharding(mesh, spec) if mesh is not None else x.sharding
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=target)
  return jax.tree.map(one, state)


def as_numpy(tree):
  """Host values, typed keys as their key data."""
  def one(x):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    return np.asarray(x)
  return jax.tree.map(one, tree)


def assert_trees_equal(actual, expected):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  jax.tree.map(np.testing.assert_array_equal, as_numpy(actual), as_numpy(expected))


def snapshot(directory):
  """Every path under `directory` with its mtime and size."""
  result = {}
  for root, dirs, files in os.walk(directory):
    for name in dirs + files:
      path = os.path.join(root, name)
      stat = os.stat(path)
      result[os.path.relpath(path, directory)] = (stat.st_mtime_ns, stat.st_size)
  return result


@pytest.fixture(scope="module")
def mesh():
  return sharding.make_mesh(dict(fsdp=4, data=2))


def test_round_trip_restores_values_shardings_and_data_position(tmp_path, mesh):
  state = make_state(mesh, step=4, offset=0.5)
  with ckpt.Checkpointer(str(tmp_path), save_every=2, keep=3) as checkpointer:
    assert checkpointer.restore(abstract_of(state)) is None  # Nothing saved yet.
    assert checkpointer.save(4, state, FakeSource(position=40))

  source = FakeSource()
  with ckpt.Checkpointer(str(tmp_path), save_every=2, keep=3) as checkpointer:
    assert checkpointer.latest_step() == 4
    restored = checkpointer.restore(abstract_of(state), source)
  assert_trees_equal(restored, state)
  assert source.position == 40
  assert source.restored_from == os.path.join(tmp_path, "checkpoints", "4", "data",
                                             "process_0-of-1")
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(abstract_of(state))):
    assert got.sharding == want.sharding
  assert jax.dtypes.issubdtype(restored["rng"].dtype, jax.dtypes.prng_key)
  assert isinstance(restored["opt_state"][0], optax.ScaleByAdamState)

  # Another mesh (data=8): Orbax reshards on read.
  other_mesh = sharding.make_mesh(dict(data=8))
  with ckpt.Checkpointer(str(tmp_path), save_every=2, keep=3) as checkpointer:
    resharded = checkpointer.restore(abstract_of(state, other_mesh))
  assert_trees_equal(resharded, state)
  kernel = resharded["params"]["llm"]["layers"]["w"]
  assert kernel.sharding == NamedSharding(other_mesh, P(None, "fsdp", "data"))
  assert kernel.addressable_shards[0].data.shape == (2, 4, 1)  # Split 8 ways on 'data'.


def test_keep_prunes_old_steps_with_their_data_positions(tmp_path, mesh):
  state = make_state(mesh)
  source = FakeSource()
  with ckpt.Checkpointer(str(tmp_path), save_every=2, keep=2) as checkpointer:
    saved = []
    for step in range(1, 9):
      source.position = step
      if checkpointer.save(step, state, source):
        saved.append(step)
      if step == 6:  # Steps 2 and 4 are pruned by now, positions included.
        checkpointer.wait()
        assert sorted(os.listdir(tmp_path / "checkpoints")) == ["4", "6"]
    assert saved == [2, 4, 6, 8]
    source.position = 9
    assert checkpointer.save(9, state, source, force=True)  # E.g. on SIGTERM.
    assert not checkpointer.save(9, state, source, force=True)  # Already saved.
    checkpointer.wait()
    assert checkpointer.all_steps() == [8, 9]
  # Nothing outside Orbax's step directories: pruning a step removes it all.
  assert os.listdir(tmp_path) == ["checkpoints"]
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["8", "9"]
  for step in (8, 9):
    step_dir = tmp_path / "checkpoints" / str(step)
    assert {"default", "data"} <= set(os.listdir(step_dir))
    assert [name for name in os.listdir(step_dir / "data")
            if name.startswith("process_")] == ["process_0-of-1"]
    with open(step_dir / "data" / "process_0-of-1" / "position.json") as f:
      assert json.load(f) == {"position": step}


def test_async_save_writes_the_data_position_before_returning(tmp_path, mesh):
  state = make_state(mesh, step=2)
  checkpointer = ckpt.Checkpointer(str(tmp_path), save_every=1, keep=2, async_save=True)
  source = FakeSource(position=7)
  assert checkpointer.save(2, state, source)
  # Written into the step's temporary directory, committed with the state.
  assert ".orbax-checkpoint-tmp" in source.saved_to
  source.position = 8  # Training moves on while the arrays are written.
  checkpointer.wait()
  assert checkpointer.latest_step() == 2
  restored = FakeSource()
  checkpointer.restore(abstract_of(state), restored)
  assert restored.position == 7
  checkpointer.close()


def test_restore_without_a_data_position_of_this_process_is_refused(tmp_path, mesh):
  state = make_state(mesh, step=2)
  with ckpt.Checkpointer(str(tmp_path), save_every=1, keep=2) as checkpointer:
    checkpointer.save(2, state)  # Params-only use: no data source.
    with pytest.raises(FileNotFoundError, match="saved without a data source"):
      checkpointer.restore(abstract_of(state), FakeSource())
    assert int(checkpointer.restore(abstract_of(state))["step"]) == 2
    checkpointer.save(3, state, FakeSource(position=3))
  # As if written by two processes: another process count finds no entry.
  data_dir = tmp_path / "checkpoints" / "3" / "data"
  os.rename(data_dir / "process_0-of-1", data_dir / "process_0-of-2")
  source = FakeSource(position=-1)
  with ckpt.Checkpointer(str(tmp_path), save_every=1, keep=2) as checkpointer:
    with pytest.raises(FileNotFoundError, match="process_0-of-2: the checkpoint was written "
                       "by a different number of processes"):
      checkpointer.restore(abstract_of(state), source)
  assert source.position == -1 and source.restored_from is None


def test_latest_step_ignores_partial_checkpoints(tmp_path, mesh):
  state = make_state(mesh, step=2)
  with ckpt.Checkpointer(str(tmp_path), save_every=1, keep=5) as checkpointer:
    checkpointer.save(2, state, FakeSource(position=2))
  # A save of step 3 that never committed: Orbax's uncommitted temporary
  # directory (here a full copy, so only its name marks it), data item included.
  partial = tmp_path / "checkpoints" / "3.orbax-checkpoint-tmp-1234"
  shutil.copytree(tmp_path / "checkpoints" / "2", partial)
  os.remove(partial / "commit_success.txt")
  FakeSource(position=3).save(str(partial / "data" / "process_0-of-1"))
  source = FakeSource()
  with ckpt.Checkpointer(str(tmp_path), save_every=1, keep=5) as checkpointer:
    assert checkpointer.latest_step() == 2
    restored = checkpointer.restore(abstract_of(state), source)
    assert int(restored["step"]) == 2 and source.position == 2
    # Saving step 3 again writes a fresh step, not the stale data position.
    assert checkpointer.save(3, state, FakeSource(position=33))
  with open(tmp_path / "checkpoints" / "3" / "data" / "process_0-of-1" / "position.json") as f:
    assert json.load(f) == {"position": 33}


KILLED_SAVE_SCRIPT = textwrap.dedent("""
    import json, os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax.numpy as jnp
    from orbax.checkpoint._src.path import atomicity
    from mm1_jax.training import checkpoint as ckpt

    class Source:
      def __init__(self, position, die=False):
        self.position, self.die = position, die

      def save(self, directory):
        os.makedirs(directory)
        with open(os.path.join(directory, "position.json"), "w") as f:
          f.write(json.dumps({"position": self.position}))
        if self.die:  # The process dies while writing the data position.
          os._exit(17)

    workdir, moment = sys.argv[1:]
    checkpointer = ckpt.Checkpointer(workdir, save_every=1, keep=5)
    checkpointer.save(1, {"w": jnp.ones((4, 4))}, Source(1))
    checkpointer.wait()

    async def die(self):  # The process dies when the save would commit.
      os._exit(17)

    if moment == "commit":
      atomicity.AtomicRenameTemporaryPath.finalize = die
    checkpointer.save(2, {"w": jnp.full((4, 4), 2.0)}, Source(2, die=moment == "data"))
    checkpointer.wait()
    os._exit(0)
""")


@pytest.mark.parametrize("moment", ["data", "commit"])
def test_process_killed_mid_save_commits_neither_state_nor_data_position(tmp_path, moment):
  """Killed while writing the data position, or with both items written but
  not committed: step 2 exists for no reader, state and position alike."""
  env = dict(os.environ, PYTHONPATH=REPO_ROOT)
  result = subprocess.run([sys.executable, "-c", KILLED_SAVE_SCRIPT, str(tmp_path), moment],
                          env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode == 17, result.stderr[-2000:]
  names = os.listdir(tmp_path / "checkpoints")
  assert "1" in names and "2" not in names
  partial = [name for name in names if name.startswith("2.orbax-checkpoint-tmp")]
  assert len(partial) == 1, names
  # The position of step 2 was written, into the uncommitted directory only.
  written = [os.path.join(root, "position.json")
             for root, _, files in os.walk(tmp_path / "checkpoints" / partial[0])
             if "position.json" in files]
  assert len(written) == 1 and os.path.basename(os.path.dirname(written[0])) == "process_0-of-1"
  assert os.listdir(tmp_path) == ["checkpoints"]
  checkpointer = ckpt.Checkpointer(str(tmp_path), save_every=1, keep=5)
  assert checkpointer.latest_step() == 1
  abstract = {"w": jax.ShapeDtypeStruct((4, 4), jnp.float32,
                                        sharding=jax.sharding.SingleDeviceSharding(
                                            jax.devices()[0]))}
  source = FakeSource()
  np.testing.assert_array_equal(checkpointer.restore(abstract, source)["w"], np.ones((4, 4)))
  assert source.position == 1
  checkpointer.close()


def test_mismatch_names_every_path_and_leaves_workdir_untouched(tmp_path, mesh):
  state = make_state(mesh, step=2)
  with ckpt.Checkpointer(str(tmp_path), save_every=1, keep=2) as checkpointer:
    checkpointer.save(2, state, FakeSource(position=2))
  before = snapshot(tmp_path)

  other = abstract_of(state)
  params = other["params"]
  params["encoder"]["kernel"] = jax.ShapeDtypeStruct(
      (8, 8), jnp.float32, sharding=params["encoder"]["kernel"].sharding)
  params["llm"]["lm_head"] = params["llm"].pop("embed")  # Missing + unexpected.
  other["opt_state"] = jax.eval_shape(optax.adamw(1e-3).init, params)
  source = FakeSource(position=-1)
  checkpointer = ckpt.Checkpointer(str(tmp_path), save_every=1, keep=2)
  with pytest.raises(ckpt.CheckpointMismatchError) as info:
    checkpointer.restore(other, source)
  message = str(info.value)
  assert "params/encoder/kernel: checkpoint (8, 4) vs config (8, 8)" in message
  assert "params/llm/lm_head" in message and "params/llm/embed" in message
  # The Adam moments follow the params, and are named too.
  assert "opt_state/0/mu/encoder/kernel" in message
  assert "--workdir" in message and str(tmp_path) in message
  assert info.value.missing == ["opt_state/0/mu/llm/lm_head", "opt_state/0/nu/llm/lm_head",
                                "params/llm/lm_head"]
  assert "params/llm/embed" in info.value.unexpected
  assert isinstance(info.value, ValueError)
  assert source.position == -1 and source.restored_from is None
  checkpointer.close()
  assert snapshot(tmp_path) == before


def test_load_params_from_train_state_and_from_save_params(tmp_path, mesh):
  state = make_state(mesh, step=3, offset=1.0)
  with ckpt.Checkpointer(str(tmp_path / "run"), save_every=1, keep=1) as checkpointer:
    checkpointer.save(3, state)
  abstract = abstract_of(state)["params"]
  loaded = ckpt.load_params(str(tmp_path / "run" / "checkpoints" / "3"), abstract)
  assert_trees_equal(loaded, state["params"])
  for got, want in zip(jax.tree.leaves(loaded), jax.tree.leaves(abstract)):
    assert got.sharding == want.sharding

  # Params-only (converters), loaded into another mesh and dtype.
  ckpt.save_params(str(tmp_path / "converted"), state["params"])
  other_mesh = sharding.make_mesh(dict(data=8))
  abstract_bf16 = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16, sharding=x.sharding),
      abstract_of(state["params"], other_mesh))
  loaded = ckpt.load_params(str(tmp_path / "converted"), abstract_bf16)
  assert loaded["encoder"]["kernel"].dtype == jnp.bfloat16
  assert loaded["encoder"]["kernel"].sharding == abstract_bf16["encoder"]["kernel"].sharding
  np.testing.assert_array_equal(np.asarray(loaded["llm"]["embed"], np.float32),
                                np.asarray(state["params"]["llm"]["embed"]))


def test_load_params_errors_list_missing_unexpected_and_misshaped(tmp_path, mesh):
  params = make_params(mesh)
  ckpt.save_params(str(tmp_path / "converted"), params)
  abstract = abstract_of(params)
  abstract["encoder"]["kernel"] = jax.ShapeDtypeStruct((4, 8), jnp.float32)
  abstract["llm"]["layers"]["w"] = jax.ShapeDtypeStruct((3, 4, 8), jnp.float32)
  abstract["llm"]["norm"] = jax.ShapeDtypeStruct((8,), jnp.float32)
  abstract["connector"] = {"proj": jax.ShapeDtypeStruct((2, 2), jnp.float32)}
  del abstract["encoder"]["bias"]
  with pytest.raises(ckpt.CheckpointMismatchError) as info:
    ckpt.load_params(str(tmp_path / "converted"), abstract)
  error = info.value
  assert error.missing == ["connector/proj", "llm/norm"]
  assert error.unexpected == ["encoder/bias"]
  assert error.mismatched == [("encoder/kernel", (8, 4), (4, 8)),
                              ("llm/layers/w", (2, 4, 8), (3, 4, 8))]
  for text in ["connector/proj", "llm/norm", "encoder/bias",
               "encoder/kernel: checkpoint (8, 4) vs expected (4, 8)",
               "llm/layers/w: checkpoint (2, 4, 8) vs expected (3, 4, 8)"]:
    assert text in str(error)
  with pytest.raises(FileNotFoundError, match="save_params"):
    ckpt.load_params(str(tmp_path), abstract)


def test_load_params_from_train_state_reports_param_paths(tmp_path, mesh):
  state = make_state(mesh)
  with ckpt.Checkpointer(str(tmp_path), save_every=1, keep=1) as checkpointer:
    checkpointer.save(1, state)
  abstract = abstract_of(state)["params"]
  abstract["llm"]["embed"] = jax.ShapeDtypeStruct((6, 9), jnp.float32)
  with pytest.raises(ckpt.CheckpointMismatchError, match=r"llm/embed: checkpoint \(6, 8\)"):
    ckpt.load_params(str(tmp_path / "checkpoints" / "1"), abstract)


def test_preemption_guard_sets_flag_and_restores_previous_handler():
  calls = []
  previous = signal.signal(signal.SIGTERM, lambda signum, frame: calls.append(signum))
  try:
    outer = signal.getsignal(signal.SIGTERM)
    with ckpt.PreemptionGuard() as guard:
      assert not guard.requested
      os.kill(os.getpid(), signal.SIGTERM)
      assert guard.requested
      assert calls == []  # The old handler did not run (the process lives on).
    assert signal.getsignal(signal.SIGTERM) is outer
    os.kill(os.getpid(), signal.SIGTERM)
    assert calls == [signal.SIGTERM]
  finally:
    signal.signal(signal.SIGTERM, previous)


def test_relative_workdir_is_made_absolute(tmp_path, monkeypatch):
  """Orbax rejects relative paths; `make train` passes workdirs/tiny."""
  import jax.numpy as jnp
  from mm1_jax.training.checkpoint import Checkpointer
  monkeypatch.chdir(tmp_path)
  checkpointer = Checkpointer("relative/workdir", save_every=1, keep=1)
  state = {"step": jnp.ones((), jnp.int32), "params": {"w": jnp.arange(4.0)}}
  assert checkpointer.save(1, state)
  checkpointer.wait()
  assert checkpointer.latest_step() == 1
  assert (tmp_path / "relative/workdir/checkpoints/1").exists()
  checkpointer.close()


def test_load_component_params_overlays_converted_components(tmp_path, mesh):
  """Per-component checkpoints (as mm1_jax.convert writes) initialise their
  components; the rest keeps its fresh values; mistakes are named."""
  trained = make_state(mesh, step=3, offset=1.0)["params"]
  fresh = make_params(mesh)
  ckpt.save_params(str(tmp_path / "encoder"), {"encoder": trained["encoder"]})
  with ckpt.Checkpointer(str(tmp_path / "run"), save_every=1, keep=1) as checkpointer:
    checkpointer.save(3, make_state(mesh, step=3, offset=2.0))
  abstract = abstract_of(fresh)
  params, sources = ckpt.load_component_params([str(tmp_path / "encoder")], abstract, fresh)
  assert sources == {"encoder": str(tmp_path / "encoder")}
  assert_trees_equal(params["encoder"], trained["encoder"])
  assert_trees_equal(params["llm"], fresh["llm"])
  assert params["encoder"]["kernel"].sharding == abstract["encoder"]["kernel"].sharding

  # A whole train state is accepted too; a component given twice is refused.
  with pytest.raises(ckpt.CheckpointMismatchError, match=r"\['encoder'\] are in both"):
    ckpt.load_component_params([str(tmp_path / "encoder"), str(tmp_path / "run/checkpoints/3")],
                               abstract, fresh)
  for path in ("run/checkpoints/3", "run"):  # A workdir means its newest step.
    params, sources = ckpt.load_component_params([str(tmp_path / path)], abstract, fresh)
    assert set(sources) == set(fresh)
    assert_trees_equal(params, make_state(mesh, step=3, offset=2.0)["params"])

  # A component the model lacks, and a mis-shaped one, are named.
  ckpt.save_params(str(tmp_path / "vision"), {"vision": trained["encoder"]})
  with pytest.raises(ckpt.CheckpointMismatchError, match=r"component\(s\) \['vision'\]"):
    ckpt.load_component_params([str(tmp_path / "vision")], abstract, fresh)
  narrow = dict(abstract, encoder=dict(abstract["encoder"],
                                       kernel=jax.ShapeDtypeStruct((8, 2), jnp.float32)))
  with pytest.raises(ckpt.CheckpointMismatchError, match=r"encoder/kernel: checkpoint \(8, 4\)"):
    ckpt.load_component_params([str(tmp_path / "encoder")], narrow, fresh)


def test_a_failed_background_save_is_reported_with_its_path_and_cause(tmp_path, mesh,
                                                                       monkeypatch):
  """Disk full in Orbax's background write: the next check names the step, the
  directory and the cause; the previous checkpoint stays complete."""
  state = make_state(mesh, step=1, offset=0.5)
  with ckpt.Checkpointer(str(tmp_path), save_every=1, keep=3) as checkpointer:
    assert checkpointer.save(1, state, FakeSource(position=10))
    checkpointer.wait()

    class FullDisk:
      def result(self, timeout=None):
        raise OSError(28, "No space left on device")

    original = ckpt.ocp.PyTreeCheckpointHandler.async_save

    async def failing_async_save(self, *args, **kwargs):
      await original(self, *args, **kwargs)
      return [FullDisk()]

    monkeypatch.setattr(ckpt.ocp.PyTreeCheckpointHandler, "async_save", failing_async_save)
    assert checkpointer.save(2, make_state(mesh, step=2, offset=1.5), FakeSource(position=20))
    with pytest.raises(ckpt.CheckpointSaveError,
                       match=r"saving the checkpoint of step 2 to .*checkpoints failed: "
                             r".*No space left on device.*previous checkpoint \(step 1\) is intact"):
      checkpointer.wait()
    monkeypatch.undo()
    assert checkpointer.all_steps() == [1]
    restored = checkpointer.restore(abstract_of(state), FakeSource())
  assert_trees_equal(restored, state)


def test_restore_of_a_chosen_step_and_delete(tmp_path, mesh):
  with ckpt.Checkpointer(str(tmp_path), save_every=1, keep=5) as checkpointer:
    for step in (1, 2, 3):
      checkpointer.save(step, make_state(mesh, step=step, offset=step), FakeSource(step))
    checkpointer.wait()
    source = FakeSource()
    restored = checkpointer.restore(abstract_of(make_state(mesh, step=2, offset=2)), source,
                                    step=2)
    assert_trees_equal(restored, make_state(mesh, step=2, offset=2))
    assert source.position == 2
    with pytest.raises(FileNotFoundError, match=r"no committed checkpoint of step 7 .* steps "
                                                r"\[1, 2, 3\]"):
      checkpointer.restore(abstract_of(restored), step=7)
    checkpointer.delete(3)
    assert checkpointer.all_steps() == [1, 2] and checkpointer.latest_step() == 2


def test_preemption_guard_takes_sigint_and_a_second_one_interrupts():
  with ckpt.PreemptionGuard((signal.SIGTERM, signal.SIGINT)) as guard:
    os.kill(os.getpid(), signal.SIGINT)
    assert guard.requested and guard.signal_name == "SIGINT"
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)


def test_fingerprint_sees_every_bit_and_not_the_sharding():
  rng = np.random.default_rng(0)
  tree = {"llm": {"kernel": rng.standard_normal((8, 6, 4)).astype(np.float32),
                  "scale": np.ones((6,), jnp.bfloat16)},
          "encoder": {"embedding": rng.standard_normal((16, 4)).astype(np.float32)}}
  reference = ckpt.fingerprint(tree)
  assert len(reference) == 16 and reference == ckpt.fingerprint(jax.tree.map(np.copy, tree))
  # Sharded over 8 devices (another reduction order): the same value.
  mesh = sharding.make_mesh({"data": 8})
  sharded = dict(tree, llm=dict(tree["llm"], kernel=jax.device_put(
      tree["llm"]["kernel"], NamedSharding(mesh, P("data")))))
  assert ckpt.fingerprint(sharded) == reference
  # One bit of one element, two swapped elements, a bf16 leaf, a renamed leaf.
  flipped = np.copy(tree["llm"]["kernel"])
  flipped.view(np.uint32)[3, 2, 1] ^= 1
  swapped = np.copy(tree["encoder"]["embedding"])
  swapped[[0, 1]] = swapped[[1, 0]]
  scale = np.copy(tree["llm"]["scale"])
  scale[5] = 2
  others = [dict(tree, llm=dict(tree["llm"], kernel=flipped)),
            dict(tree, encoder={"embedding": swapped}),
            dict(tree, llm=dict(tree["llm"], scale=scale)),
            dict(tree, encoder={"table": tree["encoder"]["embedding"]})]
  prints = {ckpt.fingerprint(other) for other in others}
  assert len(prints) == len(others) and reference not in prints
