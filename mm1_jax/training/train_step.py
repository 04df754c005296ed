"""The sharded train step: state creation, batch assembly, one optimizer step.

Everything is compiled with jax.jit and explicit shardings (pjit semantics).
The parameters and optimizer state are created directly with their
shardings (jit with out_shardings over the init), so no host ever holds a
full copy; per-host batches become global arrays sharded over the batch
axes with jax.make_array_from_process_local_data.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mm1_jax import sharding
from mm1_jax.data.batch import abstract_batch, batch_logical_axes
from mm1_jax.models.config import MM1Config
from mm1_jax.models.multimodal import MM1Model
from mm1_jax.training import loss as loss_lib


def batch_shardings(batch: dict[str, Any], mesh: Mesh) -> dict[str, NamedSharding]:
  return {key: sharding.logical_sharding(batch_logical_axes(len(value.shape)),
                                         value.shape, mesh)
          for key, value in batch.items()}


def make_global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Per-host numpy batches -> global jax.Arrays sharded over the batch axes.

  Each host passes its own rows (global batch / process count); the global
  batch is their concatenation in process order.
  """
  out = {}
  for key, value in local_batch.items():
    global_shape = (value.shape[0] * jax.process_count(),) + value.shape[1:]
    target = sharding.logical_sharding(batch_logical_axes(value.ndim), global_shape, mesh)
    out[key] = jax.make_array_from_process_local_data(target, value, global_shape)
  return out


@dataclasses.dataclass
class TrainStep:
  """The model, optimizer and mesh, with the jitted functions built from them.

  init(rng) -> state; step(state, batch) -> (state, metrics). The state is
  {'step', 'params', 'opt_state', 'rng'}.
  """
  model_config: MM1Config
  optimizer: optax.GradientTransformation
  schedule: optax.Schedule
  mesh: Mesh
  batch_size: int
  seq_len: int
  z_loss_weight: float = 0.0
  grad_accum_steps: int = 1

  def __post_init__(self):
    self.model = MM1Model(self.model_config)
    self.batch_spec = abstract_batch(self.batch_size, self.seq_len, self.model_config)
    with sharding.use_mesh(self.mesh):
      boxed = jax.eval_shape(self._init_boxed, jax.random.key(0))
    params_shardings = sharding.params_shardings(boxed["params"], self.mesh)
    abstract_params = nn.unbox(boxed["params"])
    abstract_opt_state = jax.eval_shape(self.optimizer.init, abstract_params)
    # Optimizer moments mirror their parameters' shardings; scalars replicate.
    opt_shardings = _like_params(abstract_opt_state, abstract_params, params_shardings, self.mesh)
    replicated = NamedSharding(self.mesh, PartitionSpec())
    self.state_shardings = {"step": replicated, "params": params_shardings,
                            "opt_state": opt_shardings, "rng": replicated}
    self.abstract_state = jax.tree.map(
        lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s),
        {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": abstract_params,
         "opt_state": abstract_opt_state, "rng": jax.eval_shape(lambda: jax.random.key(0))},
        self.state_shardings)
    self.batch_shardings = batch_shardings(self.batch_spec, self.mesh)
    self.init = jax.jit(self._init, out_shardings=self.state_shardings)
    self.step = jax.jit(self._step, in_shardings=(self.state_shardings, self.batch_shardings),
                        out_shardings=(self.state_shardings, None), donate_argnums=(0,))

  def _model_inputs(self):
    spec = self.batch_spec
    return tuple(jnp.zeros(spec[key].shape, spec[key].dtype)
                 for key in ("decoder_input_tokens", "images", "image_mask"))

  def _init_boxed(self, rng):
    rows = slice(0, 1)  # Parameter shapes do not depend on the batch.
    tokens, images, image_mask = (x[rows] for x in self._model_inputs())
    return self.model.init(rng, tokens, images, image_mask)

  def _init(self, rng):
    params_rng, state_rng = jax.random.split(rng)
    with sharding.use_mesh(self.mesh):
      params = nn.unbox(self._init_boxed(params_rng))["params"]
    return {"step": jnp.zeros((), jnp.int32), "params": params,
            "opt_state": self.optimizer.init(params), "rng": state_rng}

  def _loss(self, params, batch, rng):
    # Dropout (LoRA's, the only one) draws from a 'dropout' rng: only when it
    # is on, so that a model without it compiles exactly as before.
    rngs = {"dropout": rng} if self.model_config.lora.dropout > 0 else {}
    logits, aux = self.model.apply(
        {"params": params}, batch["decoder_input_tokens"], batch["images"], batch["image_mask"],
        batch["decoder_positions"], batch["decoder_segment_ids"], rngs=rngs)
    return loss_lib.total_loss(logits, batch, aux, self.z_loss_weight)

  def _grads(self, params, batch, rng):
    """Gradients and metrics, accumulated over micro-batches when configured.

    Micro-batch gradients are weighted by their token counts, so the result
    equals the full-batch gradient of the token-mean loss. rng: this step's
    key (dropout), folded with the micro-batch index.
    """
    # Integer leaves (QLoRA's NF4 codes) are frozen and cannot be
    # differentiated: the gradient is taken over the float leaves only, and
    # the integer ones get zeros (which the optimizer's frozen label ignores).
    leaves, treedef = jax.tree.flatten(params)
    floating = [jnp.issubdtype(leaf.dtype, jnp.inexact) for leaf in leaves]

    def loss_of_floats(float_leaves, batch, rng):
      float_iter = iter(float_leaves)
      full = [next(float_iter) if is_float else leaf for leaf, is_float in zip(leaves, floating)]
      return self._loss(jax.tree.unflatten(treedef, full), batch, rng)

    float_grad_fn = jax.value_and_grad(loss_of_floats, has_aux=True)
    float_leaves = [leaf for leaf, is_float in zip(leaves, floating) if is_float]

    def grad_fn(_, batch, rng):
      value, float_grads = float_grad_fn(float_leaves, batch, rng)
      grads_iter = iter(float_grads)
      grads = [next(grads_iter) if is_float else jnp.zeros_like(leaf)
               for leaf, is_float in zip(leaves, floating)]
      return value, jax.tree.unflatten(treedef, grads)

    if self.grad_accum_steps == 1:
      (_, metrics), grads = grad_fn(params, batch, rng)
      return grads, metrics
    micro = jax.tree.map(
        lambda x: x.reshape((self.grad_accum_steps, -1) + x.shape[1:]), batch)

    def accumulate(carry, micro_batch_and_index):
      grads_sum, metrics_sum, tokens_sum = carry
      micro_batch, index = micro_batch_and_index
      (_, metrics), grads = grad_fn(params, micro_batch, jax.random.fold_in(rng, index))
      tokens = metrics["num_tokens"]
      grads_sum = jax.tree.map(lambda a, g: a + (g * tokens).astype(a.dtype), grads_sum, grads)
      metrics_sum = jax.tree.map(lambda a, m: a + m * tokens, metrics_sum, metrics)
      return (grads_sum, metrics_sum, tokens_sum + tokens), None

    zeros_grads = jax.tree.map(jnp.zeros_like, params)
    first = jax.tree.map(lambda x: x[0], micro)
    metrics_shape = jax.eval_shape(lambda: grad_fn(params, first, rng)[0][1])
    zeros_metrics = jax.tree.map(lambda m: jnp.zeros(m.shape, m.dtype), metrics_shape)
    (grads_sum, metrics_sum, tokens), _ = jax.lax.scan(
        accumulate, (zeros_grads, zeros_metrics, jnp.zeros((), jnp.float32)),
        (micro, jnp.arange(self.grad_accum_steps)))
    total = jnp.maximum(tokens, 1.0)
    metrics = jax.tree.map(lambda m: m / total, metrics_sum)
    metrics["num_tokens"] = tokens
    return jax.tree.map(lambda g: (g / total).astype(g.dtype), grads_sum), metrics

  def _step(self, state, batch):
    with sharding.use_mesh(self.mesh):
      grads, metrics = self._grads(state["params"], batch, state["rng"])
      updates, opt_state = self.optimizer.update(grads, state["opt_state"], state["params"])
      params = optax.apply_updates(state["params"], updates)
    metrics = {**metrics, "grad_norm": optax.global_norm(grads),
               "learning_rate": self.schedule(state["step"])}
    new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state,
                 "rng": jax.random.fold_in(state["rng"], state["step"])}
    return new_state, metrics

  def lower(self):
    """The step lowered on abstract inputs (for memory analysis; nothing allocated)."""
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=self.batch_shardings[k])
             for k, v in self.batch_spec.items()}
    return self.step.lower(self.abstract_state, batch)


def _like_params(opt_state, params, params_shardings, mesh: Mesh):
  """Shardings for an optimizer state: a leaf whose path ends with a parameter's
  path and has its shape (Adam's mu and nu) takes that parameter's sharding;
  anything else (counts, masked placeholders) is replicated."""
  replicated = NamedSharding(mesh, PartitionSpec())
  by_path = {}
  for (path, leaf), target in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                                  jax.tree.leaves(params_shardings)):
    by_path[_keys(path)] = (leaf.shape, target)

  def one(path, leaf):
    keys = _keys(path)
    for start in range(len(keys)):
      match = by_path.get(keys[start:])
      if match is not None and match[0] == leaf.shape:
        return match[1]
    return replicated

  return jax.tree_util.tree_map_with_path(one, opt_state)


def _keys(path) -> tuple[str, ...]:
  return tuple(str(getattr(entry, "key", getattr(entry, "name", entry))) for entry in path)

