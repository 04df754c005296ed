"""Training FLOPs per step, frozen towers included."""

import dataclasses

import pytest

from configs import tiny
from mm1_jax import config_lib, summary
from mm1_jax.training import metrics


@pytest.fixture(scope="module")
def forward():
  """(model, LLM forward FLOPs, encoder forward FLOPs) of one tiny step of 2 x 64."""
  model = config_lib.mm1_config(tiny.get_config("dense"))
  counts = summary.count_params(model)
  llm = 2 * 64 * summary.llm_flops_per_token(model, counts, 64)
  encoder = 2 * model.max_images * summary.encoder_flops_per_image(model, counts)
  assert llm > 0 and encoder > 0
  return model, llm, encoder


def test_everything_trains_costs_three_forwards(forward):
  model, llm, encoder = forward
  assert metrics.flops_per_step(model, 2, 64) == pytest.approx(3 * (llm + encoder))


def test_frozen_towers_skip_their_weight_gradients(forward):
  model, llm, encoder = forward
  stage1 = dataclasses.replace(model, freeze_encoder=True, freeze_llm=True)
  # LLaVA stage 1: the encoder only runs forward; the LLM passes gradients back.
  assert metrics.flops_per_step(stage1, 2, 64) == pytest.approx(encoder + 2 * llm)
  # Nothing before the LLM trains either: a frozen LLM is forward only.
  assert metrics.flops_per_step(stage1, 2, 64, frozen_connector=True) == pytest.approx(
      encoder + llm)
  llm_only = dataclasses.replace(model, freeze_encoder=True)
  assert metrics.flops_per_step(llm_only, 2, 64, frozen_connector=True) == pytest.approx(
      encoder + 3 * llm)


def test_format_duration():
  assert metrics.format_duration(59) == "0m59s"
  assert metrics.format_duration(3600 + 125) == "1h02m"
