"""The batch contract between the input pipeline and the train step.

A batch (B rows, L = seq_len, N = max_images, S = the image size):

  decoder_target_tokens  int32 [B, L]  the tokens; 0 on padding
  decoder_input_tokens   int32 [B, L]  targets shifted right within each segment
  decoder_loss_weights   int32 [B, L]  1 where the target is trained on
  decoder_segment_ids    int32 [B, L]  1, 2, ... per packed example; 0 padding
  decoder_positions      int32 [B, L]  0, 1, ... restarting per segment
  images                 uint8 [B, N, S, S, 3]  in order of appearance, zeros after
  image_mask             bool  [B, N]  True for the real images (a prefix)

mm1_jax/data/packing.py builds the rows (and documents their layout), the
pipeline stacks them, the train step shards and consumes them. Host side,
numpy only: JAX is imported only by abstract_batch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

if TYPE_CHECKING:
  import jax

  from mm1_jax.models.config import MM1Config

TOKEN_KEYS = ("decoder_target_tokens", "decoder_input_tokens", "decoder_loss_weights",
              "decoder_segment_ids", "decoder_positions")
# Every key of a batch (the token keys, then the image keys) and its dtype.
DTYPES = {**{key: np.dtype(np.int32) for key in TOKEN_KEYS},
          "images": np.dtype(np.uint8), "image_mask": np.dtype(np.bool_)}


def sequence_shapes(length: int, max_images: int, image_shape: Sequence[int]
                    ) -> dict[str, tuple[int, ...]]:
  """Shapes of one unbatched row: tokens [L], images [N, S, S, 3], image_mask [N]."""
  shapes = {key: (int(length),) for key in TOKEN_KEYS}
  shapes["images"] = (int(max_images), *(int(d) for d in image_shape))
  shapes["image_mask"] = (int(max_images),)
  return shapes


def empty_sequence(length: int, max_images: int, image_shape: Sequence[int]
                   ) -> dict[str, np.ndarray]:
  """An all-padding row: zeros of every key's shape and dtype."""
  return {key: np.zeros(shape, DTYPES[key])
          for key, shape in sequence_shapes(length, max_images, image_shape).items()}


def abstract_batch(batch_size: int, seq_len: int, model: MM1Config
                   ) -> dict[str, jax.ShapeDtypeStruct]:
  """ShapeDtypeStructs of a global batch [batch_size, ...] for `model`."""
  import jax  # Here: the pipeline and packing use this module without JAX.

  size = model.encoder.image_size
  shapes = sequence_shapes(seq_len, model.max_images, (size, size, 3))
  return {key: jax.ShapeDtypeStruct((batch_size, *shape), DTYPES[key])
          for key, shape in shapes.items()}


def batch_logical_axes(ndim: int) -> tuple[str | None, ...]:
  """Logical axes of any batch array of rank `ndim`: rows split over the batch
  mesh axes, the rest replicated."""
  return ("activation_batch",) + (None,) * (ndim - 1)


def count_tokens(batch: Mapping[str, Any]) -> int:
  """Real (non-padding) tokens of a batch: positions with a segment id."""
  return int(np.sum(np.asarray(batch["decoder_segment_ids"]) > 0))


class PlaceholderMismatchError(ValueError):
  """Placeholder runs in the tokens do not match the real images of a row."""


def check_image_placeholders(tokens: Any, image_mask: Any, num_image_tokens: int,
                             placeholder_id: int) -> None:
  """Host-side check that every placeholder run matches a real image.

  tokens: int [B, T]; image_mask: bool [B, max_images]. Per row: real image
  slots come first (a prefix of the mask), every maximal run of placeholders
  is a whole number of images, and there are exactly num_image_tokens per
  real image. Raises PlaceholderMismatchError naming the row otherwise.
  """
  tokens, image_mask = np.asarray(tokens), np.asarray(image_mask, dtype=bool)
  if tokens.shape[0] != image_mask.shape[0]:
    raise PlaceholderMismatchError(f"tokens have batch {tokens.shape[0]} but image_mask has "
                                   f"batch {image_mask.shape[0]}.")
  for row, (row_tokens, row_mask) in enumerate(zip(tokens, image_mask)):
    num_real = int(row_mask.sum())
    if not row_mask[:num_real].all():
      raise PlaceholderMismatchError(
          f"row {row}: real images must fill the first image slots, got image_mask "
          f"{row_mask.astype(int).tolist()}.")
    is_placeholder = np.concatenate([[False], row_tokens == placeholder_id, [False]])
    edges = np.flatnonzero(np.diff(is_placeholder.astype(np.int8)))
    run_lengths = edges[1::2] - edges[::2]
    bad = [int(n) for n in run_lengths if n % num_image_tokens]
    if bad:
      raise PlaceholderMismatchError(
          f"row {row}: a run of {bad[0]} placeholder tokens is not a whole number of images "
          f"({num_image_tokens} tokens each); an image was split or truncated.")
    num_placeholder_images = int(run_lengths.sum()) // num_image_tokens
    if num_placeholder_images != num_real:
      raise PlaceholderMismatchError(
          f"row {row}: the text has placeholders for {num_placeholder_images} image(s) but "
          f"image_mask marks {num_real} real image(s).")
