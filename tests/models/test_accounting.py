"""Parameter counts match what init creates; training FLOPs per step, frozen towers included."""

import dataclasses
import math

import flax.linen as nn
import jax
import pytest

from configs import tiny
from mm1_jax import config_lib, testing
from mm1_jax.models import accounting
from mm1_jax.models.multimodal import MM1Model


def test_counts_match_the_initialised_tiny_model():
  config = config_lib.mm1_config(tiny.get_config())
  batch = testing.random_multimodal_batch(config, 1, 32)
  variables = jax.eval_shape(MM1Model(config).init, jax.random.key(0), batch["tokens"],
                             batch["images"], batch["image_mask"])
  params = nn.unbox(variables)["params"]
  counts = accounting.count_params(config)
  size = lambda tree: sum(math.prod(x.shape) for x in jax.tree.leaves(tree))
  assert counts.total == size(params)
  assert counts.encoder == size(params["encoder"])
  moe = params["llm"]["blocks"]["layer_1"]["moe"]
  assert counts.llm_experts == size({k: moe[k] for k in ("gate", "up", "down")})
  assert counts.llm_active_experts == counts.llm_experts * 2 // 8


@pytest.fixture(scope="module")
def forward():
  """(model, LLM forward FLOPs, encoder forward FLOPs) of one tiny step of 2 x 64."""
  model = config_lib.mm1_config(tiny.get_config("dense"))
  counts = accounting.count_params(model)
  llm = 2 * 64 * accounting.llm_flops_per_token(model, counts, 64)
  encoder = 2 * model.max_images * accounting.encoder_flops_per_image(model, counts)
  assert llm > 0 and encoder > 0
  return model, llm, encoder


def test_everything_trains_costs_three_forwards(forward):
  model, llm, encoder = forward
  assert accounting.flops_per_step(model, 2, 64) == pytest.approx(3 * (llm + encoder))


def test_frozen_towers_skip_their_weight_gradients(forward):
  model, llm, encoder = forward
  stage1 = dataclasses.replace(model, freeze_encoder=True, freeze_llm=True)
  # LLaVA stage 1: the encoder only runs forward; the LLM passes gradients back.
  assert accounting.flops_per_step(stage1, 2, 64) == pytest.approx(encoder + 2 * llm)
  # Nothing before the LLM trains either: a frozen LLM is forward only.
  assert accounting.flops_per_step(stage1, 2, 64, frozen_connector=True) == pytest.approx(
      encoder + llm)
  llm_only = dataclasses.replace(model, freeze_encoder=True)
  assert accounting.flops_per_step(llm_only, 2, 64, frozen_connector=True) == pytest.approx(
      encoder + 3 * llm)
