"""LoRA training: what trains, what keeps optimizer state, step 0 equals the
base model, init_from a base checkpoint, and merging a run's checkpoint."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from mm1_jax import convert, sharding, testing
from mm1_jax.experiment import Experiment
from mm1_jax.models import lora as lora_lib
from mm1_jax.models.config import LoraConfig
from mm1_jax.models.multimodal import MM1Model
from mm1_jax.training import checkpoint as checkpoint_lib
from mm1_jax.training import loss as loss_lib
from mm1_jax.training import optimizer as opt
from mm1_jax.training import trainer
from mm1_jax.training.train_step import TrainStep, make_global_batch

BATCH, LENGTH = 2, 48
LR, CONNECTOR_LR = 1e-3, 1e-4


def lora_config(kind="dense", **lora):
  config = tiny.get_config(kind)
  config.model.lora.update({"rank": 4, "alpha": 8.0, **lora})
  config.optimizer.update(freeze=("encoder",), learning_rate=LR, warmup_steps=0,
                          weight_decay=0.0, grad_clip_norm=0.0,
                          connector_learning_rate=CONNECTOR_LR)
  config.data.update(batch_size=8, seq_len=LENGTH)
  config.train.update(num_steps=10)
  return config


def experiment_of(config) -> Experiment:
  return Experiment.from_config(config, mixture_has_images=lambda *_: True)


def batch_for(model, seed=0) -> dict[str, np.ndarray]:
  """A batch honouring the contract (placeholder runs for the real images),
  with an image in every row (so that the connector gets gradients)."""
  while True:
    rows = testing.random_multimodal_batch(model, BATCH, LENGTH, seed=seed, max_images_per_row=1)
    if rows["image_mask"].any(axis=1).all():
      break
    seed += 1
  tokens = rows["tokens"]
  targets = np.roll(tokens, -1, axis=1)
  return {"decoder_input_tokens": tokens, "decoder_target_tokens": targets,
          "decoder_loss_weights": (targets != model.image_placeholder_id).astype(np.int32),
          "decoder_segment_ids": np.ones_like(tokens),
          "decoder_positions": np.broadcast_to(np.arange(LENGTH, dtype=np.int32),
                                               tokens.shape).copy(),
          "images": rows["images"], "image_mask": rows["image_mask"]}


def fresh_lora_params(model):
  """Random base params and adapters, B zero as at initialisation."""
  params = testing.random_params(model)
  return jax.tree_util.tree_map_with_path(
      lambda path, x: np.zeros_like(x) if str(path[-1].key).endswith("lora_b") else x, params)


def abstract_params(model):
  """The model's params as ShapeDtypeStructs on one device (what load_params takes)."""
  one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one_device),
                      jax.eval_shape(lambda: testing.random_params(model)))


def size(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_build_freezes_the_llm_base_and_keeps_state_for_adapters_and_connector():
  experiment = experiment_of(lora_config("moe"))
  train_step, model = trainer.build(experiment)
  assert model.freeze_llm and model.freeze_encoder and model.lora.enabled
  params = train_step.abstract_state["params"]
  labels = opt.partition_labels(params, ("encoder",))
  trained = [path for path, label in jax.tree_util.tree_flatten_with_path(labels)[0]
             if label == opt.TRAIN]
  assert all(lora_lib.is_adapter([str(k.key) for k in path]) or path[0].key == "connector"
             for path in trained)
  adapters = lora_lib.lora_params(params)
  assert "moe" in adapters["llm"]["blocks"]["layer_1"]  # Expert adapters train too.
  moments = [x for x in jax.tree.leaves(train_step.abstract_state["opt_state"]) if x.shape]
  assert size(moments) == 2 * (size(adapters) + size(params["connector"]))


@pytest.fixture(scope="module")
def trained():
  """Three LoRA steps of a tiny dense MM1 on one device, from fresh adapters,
  with LoRA dropout and two micro-batches (a dropout key for each)."""
  experiment = experiment_of(lora_config(dropout=0.1))
  model = experiment.trained_model.replace(freeze_llm=True)
  params = fresh_lora_params(model)
  optimizer, schedule = opt.make_optimizer(experiment.optimizer, params, num_steps=10)
  mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
  train_step = TrainStep(model, optimizer, schedule, mesh, BATCH, LENGTH, grad_accum_steps=2)
  state = {"step": jnp.zeros((), jnp.int32), "params": params,
           "opt_state": optimizer.init(params), "rng": jax.random.key(0)}
  state = jax.device_put(state, train_step.state_shardings)
  batch = batch_for(model)
  history = []
  for _ in range(3):
    state, metrics = train_step.step(state, make_global_batch(batch, mesh))
    history.append(jax.device_get(metrics))
  return model, params, batch, jax.device_get(state), history


def test_step_zero_loss_is_the_base_models(trained):
  model, params, batch, _, history = trained
  base = MM1Model(model.replace(lora=LoraConfig()))

  @jax.jit
  def base_loss(params, batch):
    logits, aux = base.apply({"params": params}, batch["decoder_input_tokens"], batch["images"],
                             batch["image_mask"], batch["decoder_positions"],
                             batch["decoder_segment_ids"])
    return loss_lib.total_loss(logits, batch, aux)[0]

  # B starts at zero, so neither the adapters nor their dropout change step 0.
  expected = float(base_loss(lora_lib.without_lora(params), batch))
  assert history[0]["loss"] == pytest.approx(expected, rel=1e-6)
  assert history[2]["loss"] < history[0]["loss"]


def test_only_adapters_and_connector_change_at_their_learning_rates(trained):
  _, params, _, state, _ = trained
  new = state["params"]
  for part in ("encoder", "llm"):
    jax.tree.map(np.testing.assert_array_equal, lora_lib.without_lora(new[part]),
                 lora_lib.without_lora(params[part]))
  delta = lambda a, b: max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
                           for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  # An Adam step moves a parameter by about its lr (the first by exactly lr * sign(g)).
  adapters = delta(lora_lib.lora_params(new), lora_lib.lora_params(params))
  connector = delta(new["connector"], params["connector"])
  assert 0.9 * LR < adapters <= 4 * LR
  assert 0.9 * CONNECTOR_LR < connector <= 4 * CONNECTOR_LR
  b = new["llm"]["blocks"]["layer_0"]["attn"]["query"]["lora_b"]
  assert np.any(b)  # B leaves zero: the adapters now change the output.
  # No optimizer state for the frozen base: two moments per trained leaf.
  moments = [x for x in jax.tree.leaves(state["opt_state"]) if np.ndim(x)]
  assert size(moments) == 2 * (size(lora_lib.lora_params(params)) + size(params["connector"]))


def test_frozen_base_gets_no_gradient(trained):
  model, params, batch, _, _ = trained
  network = MM1Model(model)

  @jax.jit
  def grads(params, batch):
    def loss(params):
      logits, aux = network.apply({"params": params}, batch["decoder_input_tokens"],
                                  batch["images"], batch["image_mask"])
      return loss_lib.total_loss(logits, batch, aux)[0]
    return jax.grad(loss)(params)

  # Random B, so that A gets a gradient too.
  params = testing.random_params(model)
  g = grads(params, batch)
  for part in ("encoder", "llm"):
    assert not any(np.any(x) for x in jax.tree.leaves(lora_lib.without_lora(g[part]))), part
  adapter_grads = jax.tree.leaves(lora_lib.lora_params(g))
  assert adapter_grads and all(np.any(x) for x in adapter_grads)
  assert any(np.any(x) for x in jax.tree.leaves(g["connector"]))


def test_init_from_a_base_checkpoint_keeps_fresh_adapters(tmp_path):
  experiment = experiment_of(lora_config())
  train_step, model = trainer.build(experiment)
  abstract = train_step.abstract_state["params"]
  init = fresh_lora_params(model)
  base = lora_lib.without_lora(testing.random_params(model, seed=5))
  checkpoint_lib.save_params(str(tmp_path / "llm"), {"llm": base["llm"]})
  params, sources = trainer.load_init_from([str(tmp_path / "llm")], abstract, init)
  assert sources == {"llm": str(tmp_path / "llm")}
  jax.tree.map(np.testing.assert_array_equal, lora_lib.without_lora(params["llm"]), base["llm"])
  jax.tree.map(np.testing.assert_array_equal, lora_lib.lora_params(params),
               lora_lib.lora_params(init))
  jax.tree.map(np.testing.assert_array_equal, params["connector"], init["connector"])
  # A LoRA run's parameters (adapters included) restore whole.
  run = testing.random_params(model, seed=6)
  checkpoint_lib.save_params(str(tmp_path / "run"), run)
  params, _ = trainer.load_init_from([str(tmp_path / "run")], abstract, init)
  jax.tree.map(np.testing.assert_array_equal, lora_lib.lora_params(params),
               lora_lib.lora_params(run))


def test_merging_a_runs_checkpoint_gives_a_plain_model_with_the_same_logits(tmp_path):
  experiment = experiment_of(lora_config("moe", rslora=True))
  workdir = str(tmp_path / "run")
  testing.write_random_checkpoint(experiment, workdir, step=7)
  trainer.write_config(experiment, workdir)
  merged, description = convert.merge_lora_run(workdir)
  assert description["scale"] == pytest.approx(8.0 / 2.0)
  assert "llm/blocks/layer_1/moe/up" in description["merged_modules"]
  assert not lora_lib.lora_params(merged)
  convert.write_merged(str(tmp_path / "merged"), merged, description)

  lora_model = experiment.model
  plain_model = lora_model.replace(lora=LoraConfig())
  run_params = checkpoint_lib.load_params(workdir + "/checkpoints/7", abstract_params(lora_model))
  # The merged checkpoint is what init_from of a model without LoRA reads.
  plain_params = checkpoint_lib.load_params(str(tmp_path / "merged"), abstract_params(plain_model))
  batch = batch_for(lora_model)
  args = (batch["decoder_input_tokens"], batch["images"], batch["image_mask"])
  adapted = jax.jit(MM1Model(lora_model).apply)({"params": run_params}, *args)[0]
  plain = jax.jit(MM1Model(plain_model).apply)({"params": plain_params}, *args)[0]
  base = jax.jit(MM1Model(plain_model).apply)(
      {"params": lora_lib.without_lora(run_params)}, *args)[0]
  scale = float(np.max(np.abs(adapted)))
  assert float(np.max(np.abs(adapted - base))) > 1e-2 * scale
  np.testing.assert_allclose(plain, adapted, rtol=0, atol=1e-5 * scale)
  with pytest.raises(FileExistsError):
    convert.write_merged(str(tmp_path / "merged"), merged, description)


def test_qlora_quantises_init_from_and_trains_only_the_adapters(tmp_path):
  """QLoRA (tiny MoE: attention, MLP, router and experts in NF4): init_from a
  float checkpoint fills the NF4 arrays with bitsandbytes' quantisation of
  its kernels (as does a checkpoint the converter quantised); step 0 is the dequantised base model's loss; two steps move
  the adapters and the connector, never the codes; Adam state only for what
  trains; without the LLM in init_from the run is refused."""
  from mm1_jax.models import nf4, qlora
  from mm1_jax.typed_config import ConfigError

  experiment = experiment_of(lora_config("moe", quantize="nf4"))
  train_step, model = trainer.build(experiment)
  abstract = train_step.abstract_state["params"]
  float_model = model.replace(lora=dataclasses.replace(model.lora, quantize="none"))
  base = lora_lib.without_lora(testing.random_params(float_model, seed=5))
  checkpoint_lib.save_params(str(tmp_path / "llm"), {"llm": base["llm"]})
  state = train_step.init(jax.random.key(0))
  params, sources = trainer.load_init_from([str(tmp_path / "llm")], abstract, state["params"],
                                           model.lora)
  assert sources == {"llm": str(tmp_path / "llm")}
  query = params["llm"]["blocks"]["layer_0"]["attn"]["query"]
  expected = nf4.quantize_nf4(np.asarray(base["llm"]["blocks"]["layer_0"]["attn"]["query"][
      "kernel"]).reshape(2, 128, 128))
  np.testing.assert_array_equal(query["kernel_nf4_codes"], expected.codes)
  np.testing.assert_array_equal(query["kernel_nf4_absmax"], expected.absmax)
  assert query["kernel_nf4_codes"].sharding == abstract["llm"]["blocks"]["layer_0"]["attn"][
      "query"]["kernel_nf4_codes"].sharding
  jax.tree.map(np.testing.assert_array_equal, params["llm"]["embedder"], base["llm"]["embedder"])
  # Quantised by the converter instead (convert --nf4): loaded as it is, the same arrays.
  converted, _ = convert.quantize_llm(jax.device_get(base["llm"]), model.llm, ("llm/blocks/*",))
  checkpoint_lib.save_params(str(tmp_path / "llm_nf4"), {"llm": converted})
  preconverted, _ = trainer.load_init_from([str(tmp_path / "llm_nf4")], abstract,
                                           state["params"], model.lora)
  jax.tree.map(np.testing.assert_array_equal, lora_lib.without_lora(preconverted["llm"]),
               lora_lib.without_lora(params["llm"]))
  with pytest.raises(ConfigError, match=r"quantises the base weights of \['llm'\] from init_from"):
    trainer.load_init_from([str(tmp_path / "none")] * 0, abstract, state["params"], model.lora)

  rows = [batch_for(model, seed=10 * i) for i in range(train_step.batch_size // BATCH)]
  batch = make_global_batch({k: np.concatenate([r[k] for r in rows]) for k in rows[0]},
                            train_step.mesh)
  old = jax.device_get(params)  # The step donates the state.
  state = {**state, "params": params}
  history = []
  for _ in range(2):
    state, metrics = train_step.step(state, batch)
    history.append(jax.device_get(metrics))
  # Step 0: the plain model holding the dequantised kernels (B is zero).
  dequantised = lora_lib.merge_lora(old, model.lora)
  plain = MM1Model(float_model.replace(lora=LoraConfig()))
  logits, aux = jax.jit(plain.apply)({"params": dequantised}, batch["decoder_input_tokens"],
                                     batch["images"], batch["image_mask"],
                                     batch["decoder_positions"], batch["decoder_segment_ids"])
  assert history[0]["loss"] == pytest.approx(float(loss_lib.total_loss(logits, batch, aux)[0]),
                                              rel=1e-5)
  new = jax.device_get(state["params"])
  jax.tree.map(np.testing.assert_array_equal, lora_lib.without_lora(new["llm"]),
               lora_lib.without_lora(old["llm"]))
  assert np.any(new["llm"]["blocks"]["layer_1"]["moe"]["up_lora_b"])
  assert any(np.any(a != b) for a, b in zip(jax.tree.leaves(new["connector"]),
                                            jax.tree.leaves(old["connector"])))
  moments = [x for x in jax.tree.leaves(state["opt_state"]) if np.ndim(x)]
  assert size(moments) == 2 * (size(lora_lib.lora_params(old)) + size(old["connector"]))
