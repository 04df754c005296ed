"""mm1_jax.summary's compiled memory analysis of the train step (8 virtual CPU devices)."""

import pytest

from configs import tiny
from mm1_jax import config_lib, summary
from mm1_jax.experiment import Experiment
from mm1_jax.models import accounting


def test_parse_mesh():
  assert summary.parse_mesh("fsdp=256") == {"fsdp": 256}
  assert summary.parse_mesh("data=2, fsdp=128") == {"data": 2, "fsdp": 128}
  with pytest.raises(ValueError, match="axis=size"):
    summary.parse_mesh("fsdp")


def test_compiled_memory_of_tiny_on_an_fsdp_mesh():
  config = tiny.get_config("dense")
  config.model.max_images = 1
  report = summary.train_step_memory(Experiment.from_config(config), {"fsdp": 8},
                                     batch_size=8, seq_len=32)
  assert report.mesh["fsdp"] == 8 and report.batch_size == 8 and report.seq_len == 32
  compiled = report.compiled
  assert compiled.argument > 0 and compiled.output > 0 and compiled.temp > 0
  # The donated state is aliased to the new state, so the total counts it once.
  assert 0 < compiled.alias <= compiled.output
  assert compiled.total == (compiled.argument + compiled.output - compiled.alias + compiled.temp
                            + compiled.generated_code)
  # fsdp splits the parameters (and Adam's moments) over the 8 devices.
  full = 4 * accounting.count_params(config_lib.mm1_config(config)).total
  assert report.params_bytes < full / 4
  assert report.optimizer_bytes < 2 * full / 4
  assert compiled.argument >= report.params_bytes + report.optimizer_bytes
  text = summary.format_train_step_memory(report, device_memory_gib=0.001)
  assert "fsdp=8" in text and "fits 0.001 GiB/device: NO" in text


def test_finetuning_modes_compared_on_their_compiled_steps():
  """--finetuning=full,lora,qlora: LoRA keeps Adam state for the adapters
  only; QLoRA's params shrink by the NF4 base (0.26x bfloat16); same batch."""
  config = tiny.get_config("dense")
  config.model.max_images = 1
  config.optimizer.freeze = ("encoder",)
  experiment = Experiment.from_config(config)
  # Replicated state (data=8): per-device bytes are whole-model bytes.
  rows = [summary.finetuning_memory(experiment, mode, {"data": 8}, 8, 32)
          for mode in summary.FINETUNING_MODES]
  full, lora, qlora = rows
  assert lora.report.model.lora.rank == summary.DEFAULT_LORA_RANK == qlora.report.model.lora.rank
  assert qlora.report.model.lora.quantize == "nf4" and full.report.model.lora.rank == 0
  assert lora.trainable_params == qlora.trainable_params < full.trainable_params
  assert lora.report.optimizer_bytes == qlora.report.optimizer_bytes < full.report.optimizer_bytes
  assert qlora.report.params_bytes < lora.report.params_bytes
  assert full.nf4_params == lora.nf4_params == 0 < qlora.nf4_params
  assert 0.25 < qlora.nf4_total_bytes / (2 * qlora.nf4_params) < 0.27
  text = summary.format_finetuning(rows, device_memory_gib=16)
  assert "qlora: the NF4 base holds" in text and "0.25" in text
  with pytest.raises(ValueError, match="unknown fine-tuning mode 'dora'"):
    summary.finetuning_variant(experiment, "dora")
