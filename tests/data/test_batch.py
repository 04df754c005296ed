"""The batch contract: keys, dtypes and shapes, sharding axes, token counts."""

import numpy as np

from configs import tiny
from mm1_jax import config_lib
from mm1_jax.data import batch as batch_lib

MODEL = config_lib.mm1_config(tiny.get_config("dense"))


def test_contract_keys_and_dtypes():
  assert batch_lib.DTYPES == {
      "decoder_target_tokens": np.int32, "decoder_input_tokens": np.int32,
      "decoder_loss_weights": np.int32, "decoder_segment_ids": np.int32,
      "decoder_positions": np.int32, "images": np.uint8, "image_mask": np.bool_}
  assert set(batch_lib.TOKEN_KEYS) < set(batch_lib.DTYPES)


def test_empty_sequence_is_zeros_of_the_contract():
  seq = batch_lib.empty_sequence(16, 3, (8, 8, 3))
  assert {k: (v.dtype, v.shape) for k, v in seq.items()} == {
      k: (batch_lib.DTYPES[k], s) for k, s in batch_lib.sequence_shapes(16, 3, (8, 8, 3)).items()}
  assert seq["images"].shape == (3, 8, 8, 3) and seq["image_mask"].shape == (3,)
  assert not any(v.any() for v in seq.values())


def test_abstract_batch_is_the_stacked_sequences():
  size = MODEL.encoder.image_size
  abstract = batch_lib.abstract_batch(4, 32, MODEL)
  rows = batch_lib.empty_sequence(32, MODEL.max_images, (size, size, 3))
  assert {k: (v.shape, v.dtype) for k, v in abstract.items()} == {
      k: ((4,) + v.shape, v.dtype) for k, v in rows.items()}


def test_only_the_batch_axis_is_split():
  assert batch_lib.batch_logical_axes(5) == ("activation_batch", None, None, None, None)
  assert batch_lib.batch_logical_axes(2) == ("activation_batch", None)


def test_count_tokens_skips_padding():
  segments = np.array([[1, 1, 2, 0], [1, 0, 0, 0]], np.int32)
  assert batch_lib.count_tokens({"decoder_segment_ids": segments}) == 4
