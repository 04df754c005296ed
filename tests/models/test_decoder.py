"""Decoder structure: scanned layers, remat, MoE block layout."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from configs import tiny
from mm1_jax import config_lib
from mm1_jax.models.config import MoeConfig
from mm1_jax.models.decoder import Decoder

LLM = config_lib.mm1_config(tiny.get_config()).llm  # MoE every 2nd layer.


def top_level_equations(config):
  tokens = jnp.zeros((1, 8), jnp.int32)
  params = jax.eval_shape(Decoder(config).init, jax.random.key(0), tokens)
  return len(jax.make_jaxpr(Decoder(config).apply)(nn.unbox(params), tokens).jaxpr.eqns)


def test_program_size_does_not_grow_with_depth():
  """The layer stack is one scan: 4 and 16 layers trace to the same program."""
  assert top_level_equations(LLM) == top_level_equations(dataclasses.replace(LLM, depth=16))


def test_moe_every_second_layer_is_scanned_in_blocks():
  tokens = jnp.zeros((1, 8), jnp.int32)
  params = nn.unbox(jax.eval_shape(Decoder(LLM).init, jax.random.key(0), tokens))["params"]
  blocks = params["blocks"]
  assert set(blocks) == {"layer_0", "layer_1"}
  assert "mlp" in blocks["layer_0"] and "moe" in blocks["layer_1"]
  assert blocks["layer_1"]["moe"]["gate"].shape == (2, 8, 128, 256)  # [blocks, E, D, F]


def test_remat_policies_give_the_same_gradients():
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, LLM.vocab_size, (2, 12)))
  base = dataclasses.replace(LLM, depth=2)
  params = jax.jit(lambda: nn.unbox(Decoder(base).init(jax.random.key(0), tokens)))()

  def grads(policy):
    model = Decoder(dataclasses.replace(base, remat_policy=policy))
    loss = lambda p: jnp.mean(model.apply(p, tokens)[0] ** 2)
    return jax.jit(jax.grad(loss))(params)

  reference = grads("none")
  for policy in ("full", "dots"):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 grads(policy), reference)


def test_unrolled_stack_is_the_same_model():
  """scan_unroll changes the program, not the parameters (same stacked tree,
  same checkpoints) nor the outputs and gradients."""
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, LLM.vocab_size, (2, 12)))
  base = dataclasses.replace(LLM, depth=2, moe=MoeConfig())  # Two dense blocks.
  params = jax.jit(lambda: nn.unbox(Decoder(base).init(jax.random.key(0), tokens)))()

  def value_and_grads(unroll):
    model = Decoder(dataclasses.replace(base, scan_unroll=unroll))
    loss = lambda p: jnp.mean(model.apply(p, tokens)[0] ** 2)
    return jax.jit(jax.value_and_grad(loss))(params)

  reference = value_and_grads(1)
  unrolled_params = jax.eval_shape(
      Decoder(dataclasses.replace(base, scan_unroll=2)).init, jax.random.key(0), tokens)
  assert jax.tree.structure(nn.unbox(unrolled_params)) == jax.tree.structure(params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               value_and_grads(2), reference)
