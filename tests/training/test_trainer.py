"""The training loop end to end on the bundled data."""

import json
import os

import jax
import numpy as np
import pytest

from configs import tiny
from mm1_jax.experiment import Experiment
from mm1_jax.training import checkpoint as checkpoint_lib
from mm1_jax.training import trainer


def tiny_config(num_steps=3, checkpoint_every=1, kind="moe", **mesh):
  config = tiny.get_config(kind)
  config.data.update(batch_size=8, seq_len=64)
  # peak_tflops (for MFU only) skips the startup matmul measurement.
  config.train.update(num_steps=num_steps, log_every=1, checkpoint_every=checkpoint_every,
                      keep_checkpoints=2, peak_tflops=1.0)
  config.optimizer.update(warmup_steps=1)
  if mesh:
    config.mesh.update({"data": 1, **mesh})
  return config


def losses(workdir):
  """step -> loss; a resumed run's lines for a step replace the killed run's."""
  with open(os.path.join(workdir, trainer.LOSS_LOG)) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f)}


def test_losses_do_not_depend_on_the_mesh(tmp_path):
  """Whole-parameter sharding against heads / experts split (with data
  parallelism): the same losses. (Pure data parallelism against one device
  is checked per forward pass in tests/test_sharding.py, more cheaply.)"""
  runs = {}
  for name, mesh in {"fsdp8": dict(fsdp=8),
                     "data2_tensor2_expert2": dict(data=2, tensor=2, expert=2)}.items():
    trainer.train(Experiment.from_config(tiny_config(num_steps=2, checkpoint_every=100, **mesh)),
                  str(tmp_path / name))
    runs[name] = losses(tmp_path / name)
  reference = runs.pop("fsdp8")
  assert len(reference) == 2 and reference[1] != reference[2]
  for name, run in runs.items():
    np.testing.assert_allclose([run[s] for s in (1, 2)], [reference[s] for s in (1, 2)],
                               rtol=1e-5, atol=1e-5, err_msg=name)


def test_nan_loss_stops_names_a_good_checkpoint_and_a_restart_trains_on(tmp_path):
  """Divergence with a checkpoint every step: the checkpoint whose next loss is
  not finite is deleted, the one named is good, and a restart with a sane
  learning rate trains on from it. (The dense model: the quickest to compile.)"""
  config = tiny_config(num_steps=20, kind="dense")
  config.optimizer.update(learning_rate=1e6, grad_clip_norm=0.0)
  with pytest.raises(trainer.NonFiniteLossError, match=r"(loss|gradient norm) is (nan|inf) at step "
                                                        r"(\d+); stopping without saving") as error:
    trainer.train(Experiment.from_config(config), str(tmp_path))
  message = error.value.args[0]
  bad_step = int(message.split("at step ")[1].split(";")[0])
  good = int(message.split("the last good checkpoint is step ")[1].split(" ")[0])
  assert f"The checkpoint of step {bad_step - 1} held the diverged parameters" in message
  checkpointer = checkpoint_lib.Checkpointer(str(tmp_path), save_every=1, keep=3)
  assert checkpointer.latest_step() == good == bad_step - 2
  train_step, _ = trainer.build(Experiment.from_config(config))
  state = checkpointer.restore(train_step.abstract_state)
  checkpointer.close()
  assert int(state["step"]) == good
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state["params"]))

  sane = tiny_config(num_steps=good + 2, kind="dense")
  sane.optimizer.grad_clip_norm = 0.0  # Only the learning rate changes (same optimizer state).
  metrics = trainer.train(Experiment.from_config(sane), str(tmp_path))
  assert np.isfinite(metrics["loss"])
  assert sorted(losses(tmp_path)) == list(range(1, good + 3))  # Each step once.
  # What the run cost: 2 steps logged every step, the first window (compiling) not timed.
  summary = json.loads((tmp_path / trainer.TRAIN_SUMMARY).read_text())
  assert summary["step"] == good + 2 and summary["timed_windows"] == 1
  assert summary["step_time_median_s"] == pytest.approx(metrics["step_time"])
  assert summary["trainable_parameters"] == sum(x.size for x in jax.tree.leaves(state["params"]))
  assert summary["peak_memory_bytes"] > 100 * 2**20

  # Back to a chosen step: the later checkpoints go, the loss log is cut there.
  sane.train.update(num_steps=good + 1, restore_step=good)
  trainer.train(Experiment.from_config(sane), str(tmp_path))
  assert checkpoint_lib.Checkpointer(str(tmp_path), 1, 3).all_steps()[-1] == good + 1
  assert sorted(losses(tmp_path)) == list(range(1, good + 2))
  # Started again when finished, it trains nothing and keeps the summary of the steps trained.
  sane.train.restore_step = None
  summary = (tmp_path / trainer.TRAIN_SUMMARY).read_text()
  trainer.train(Experiment.from_config(sane), str(tmp_path))
  assert (tmp_path / trainer.TRAIN_SUMMARY).read_text() == summary
  assert json.loads(summary)["step"] == good + 1

  # A config of another shape in the same workdir: refused, nothing written.
  listing = sorted((p, p.stat().st_mtime) for p in tmp_path.rglob("*"))
  other = tiny_config(num_steps=good + 1, kind="dense")
  other.optimizer.grad_clip_norm = 0.0
  other.model.llm.mlp_dim = 384
  with pytest.raises(checkpoint_lib.CheckpointMismatchError,
                     match=r"params/llm/blocks/layer_0/mlp/gate/kernel: checkpoint \(4, 128, 256\) "
                           r"vs config \(4, 128, 384\)"):
    trainer.train(Experiment.from_config(other), str(tmp_path))
  assert sorted((p, p.stat().st_mtime) for p in tmp_path.rglob("*")) == listing


def test_gradient_accumulation_equals_the_full_batch_step():
  """Two micro-batches of 4 give the step of one batch of 8 (dense model: the
  MoE balance loss is not additive over micro-batches)."""
  from mm1_jax import config_lib, sharding
  from mm1_jax.data import pipeline
  import optax
  from mm1_jax.training.train_step import TrainStep, make_global_batch

  config = tiny.get_config("dense")
  config.data.update(batch_size=8, seq_len=64)
  config.optimizer.update(warmup_steps=1)
  config.train.update(num_steps=3)
  mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])  # One device: fast.
  model = config_lib.mm1_config(config)
  # Plain SGD with lr 1: the parameter change is exactly the gradient (Adam's
  # first step is ~lr * sign(g), which rounding flips for near-zero gradients).
  optimizer, schedule = optax.sgd(1.0), optax.constant_schedule(1.0)
  source = pipeline.MultimodalInput(Experiment.from_config(config).data, model, process_index=0,
                                    process_count=1)
  batch = next(source)
  results = []
  for accumulation in (1, 2):
    built = TrainStep(model, optimizer, schedule, mesh, 8, 64, grad_accum_steps=accumulation)
    state = built.init(jax.random.key(0))
    state, metrics = built.step(state, make_global_batch(batch, mesh))
    results.append((jax.device_get(state["params"]), jax.device_get(metrics)))
  (params_1, metrics_1), (params_2, metrics_2) = results
  np.testing.assert_allclose(metrics_2["loss"], metrics_1["loss"], rtol=1e-5)
  np.testing.assert_allclose(metrics_2["grad_norm"], metrics_1["grad_norm"], rtol=1e-4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               params_2, params_1)
