"""mm1_jax.summary describes even the largest configs quickly (shapes only)."""

import time

import pytest

from configs import mm1_3b, mm1_3b_moe, mm1_30b
from mm1_jax import config_lib, experiment, summary
from mm1_jax.models import accounting


@pytest.mark.parametrize("module, llm_billions", [(mm1_3b, 3.23), (mm1_30b, 30.37),
                                                  (mm1_3b_moe, 65.07)])
def test_large_configs_are_summarised_without_allocating(module, llm_billions):
  start = time.perf_counter()
  text = summary.format_summary(config_lib.mm1_config(module.get_config()), 4096, 256)
  counts = accounting.count_params(config_lib.mm1_config(module.get_config()))
  assert abs(counts.llm / 1e9 - llm_billions) < 0.01
  assert "FLOPs/token" in text and "GiB/device" in text
  assert time.perf_counter() - start < 120  # eval_shape only; a real init would not fit in RAM.


def test_the_high_resolution_sft_is_summarised_with_its_image_tokens():
  run = experiment.Experiment.from_config(mm1_3b.get_config("sft_highres"), num_devices=256,
                                          check_init_from=False)
  assert run.model.encoder.image_size == 672 and run.model.num_image_tokens == 144
  text = summary.format_summary(run.model, 2048, 256, run.data)
  assert ("images     mm1 split, grid 2x2 of 672px crops + overview (up to 1344x1344px): up to "
          "5 image slot(s) = 720 sequence tokens per image (144 per slot); 1 image(s) per "
          "sequence at model.max_images=5") in text
