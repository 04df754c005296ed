"""mm1_jax.summary counts what init really creates, quickly, for every config."""

import math
import time

import flax.linen as nn
import jax
import pytest

from configs import mm1_3b, mm1_3b_moe, mm1_30b, tiny
from mm1_jax import config_lib, summary, testing
from mm1_jax.models.multimodal import MM1Model


def test_counts_match_the_initialised_tiny_model():
  config = config_lib.mm1_config(tiny.get_config())
  batch = testing.random_multimodal_batch(config, 1, 32)
  variables = jax.eval_shape(MM1Model(config).init, jax.random.key(0), batch["tokens"],
                             batch["images"], batch["image_mask"])
  params = nn.unbox(variables)["params"]
  counts = summary.count_params(config)
  size = lambda tree: sum(math.prod(x.shape) for x in jax.tree.leaves(tree))
  assert counts.total == size(params)
  assert counts.encoder == size(params["encoder"])
  moe = params["llm"]["blocks"]["layer_1"]["moe"]
  assert counts.llm_experts == size({k: moe[k] for k in ("gate", "up", "down")})
  assert counts.llm_active_experts == counts.llm_experts * 2 // 8


@pytest.mark.parametrize("module, llm_billions", [(mm1_3b, 3.23), (mm1_30b, 30.37),
                                                  (mm1_3b_moe, 65.07)])
def test_large_configs_are_summarised_without_allocating(module, llm_billions):
  start = time.perf_counter()
  text = summary.format_summary(config_lib.mm1_config(module.get_config()), 4096, 256)
  counts = summary.count_params(config_lib.mm1_config(module.get_config()))
  assert abs(counts.llm / 1e9 - llm_billions) < 0.01
  assert "FLOPs/token" in text and "GiB/device" in text
  assert time.perf_counter() - start < 120  # eval_shape only; a real init would not fit in RAM.
