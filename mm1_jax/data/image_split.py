"""High-resolution images as several encoder-size sub-images (MM1, LLaVA-NeXT "anyres").

An encoder sees S x S pixels (model.encoder.image_size). `data.image_split`
lets one image fill several image slots, each an S x S sub-image with its
own placeholder run, so the LLM sees the image at a multiple of S:

  none    one slot: the image resized to S x S by data.image_policy.
  mm1     MM1's fixed grid (data.image_grids holds one (rows, cols); MM1's
          final SFT uses 2 x 2 at 672 px from a 1344 px image): the image
          resized by data.image_policy to rows*S x cols*S and cut into
          rows*cols crops, plus an overview.
  anyres  LLaVA-NeXT's select_best_resolution: among the candidate grids of
          data.image_grids (LLaVA's pinpoints divided by S; (width, height)
          pinpoint (cols*S, rows*S)) the one whose canvas keeps the most of
          the image's pixels, min(area of the image scaled to fit the canvas,
          original area), then wastes the least canvas; the image is resized
          keeping its aspect ratio to fit the canvas, centred on the pad
          colour (the encoder's mean, as the 'pad' policy; LLaVA pads
          black), and cut into crops; plus an overview.

The overview is the whole image resized to S x S by data.image_policy.
Per image the slots are the crops in row-major order, the overview first
(LLaVA-NeXT's base image) or last (MM1.5), by data.image_overview; with
data.image_row_end an <image_row_end> token (a learned embedding: the id
after the tokenizer's last, so llm.vocab_size must exceed the tokenizer's
size) follows each row of crops, like LLaVA-NeXT's image_newline.

All of an image's slots count against model.max_images; SplitScheme,
`slots_per_image` and `tokens_per_image` (mm1_jax/data/config.py, free of
TensorFlow) give the numbers the config checks use. The data
converter never cuts an example inside one image's slots (packing.fit_example
with `image_group`).

    tf.data:  decode_and_split(encoded [k]) -> images [n, S, S, 3], layouts [k, 2]
    host:     expand_split_markers(tokens, ..., layouts) -> one marker per slot
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import tensorflow as tf

from mm1_jax.data import images as image_ops
from mm1_jax.data.config import SplitScheme
from mm1_jax.models.config import CLIP_MEAN


# --- tf.data side: pixels -----------------------------------------------------

def select_grid(height: tf.Tensor, width: tf.Tensor, grids: Sequence[tuple[int, int]],
                image_size: int) -> tf.Tensor:
  """int32 []: the index in `grids` of the (rows, cols) LLaVA-NeXT's
  select_best_resolution picks.

  height, width: the image's size (scalars). For each grid's canvas (rows*S,
  cols*S): scale = min(canvas_w / w, canvas_h / h); effective = min(floor(w *
  scale) * floor(h * scale), w * h); wasted = canvas area - effective. The
  largest effective resolution wins, then the least waste, then the first.
  """
  rows = np.array([r for r, _ in grids], np.float64)
  cols = np.array([c for _, c in grids], np.float64)
  canvas_h, canvas_w = tf.constant(rows * image_size), tf.constant(cols * image_size)
  h, w = tf.cast(height, tf.float64), tf.cast(width, tf.float64)
  scale = tf.minimum(canvas_w / w, canvas_h / h)
  effective = tf.minimum(tf.floor(w * scale) * tf.floor(h * scale), w * h)
  wasted = canvas_h * canvas_w - effective
  # Exact in float64: areas stay below 2^53.
  best = tf.reduce_max(effective)
  wasted = tf.where(effective == best, wasted, tf.constant(np.inf, tf.float64))
  return tf.argmin(wasted, output_type=tf.int32)  # The first of equal minima.


def _cut(canvas: tf.Tensor, rows: int, cols: int, image_size: int) -> tf.Tensor:
  """uint8 [rows*S, cols*S, 3] -> [rows*cols, S, S, 3], row-major."""
  blocks = tf.reshape(canvas, [rows, image_size, cols, image_size, 3])
  return tf.reshape(tf.transpose(blocks, [0, 2, 1, 3, 4]), [-1, image_size, image_size, 3])


def split_one(image: tf.Tensor, scheme: SplitScheme, image_size: int, policy: str,
              pad_color: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
  """One decoded image -> its slots.

  image: uint8 [h, w, 3]; pad_color: float32 [3] (0..255). Returns (slots
  uint8 [scheme.max_slots, S, S, 3], zero after the first `count`; count
  int32 []; grid int32 [2] (rows, cols)).
  """
  size = image_size
  overview = image_ops.resize_to(image, size, size, policy, pad_color)[None]
  if scheme.kind == "mm1":
    rows, cols = scheme.grids[0]
    canvas = image_ops.resize_to(image, rows * size, cols * size, policy, pad_color)
    crops = _cut(canvas, rows, cols, size)
    grid = tf.constant([rows, cols], tf.int32)
  else:
    index = select_grid(tf.shape(image)[0], tf.shape(image)[1], scheme.grids, size)
    grid = tf.gather(tf.constant(np.array(scheme.grids, np.int32)), index)
    # A branch per grid keeps every resize's target static.
    branches = [
        (lambda r=r, c=c: _cut(image_ops.resize_to(image, r * size, c * size, "pad",
                                                   pad_color), r, c, size))
        for r, c in scheme.grids]
    crops = tf.switch_case(index, branches)
    crops.set_shape([None, size, size, 3])
  slots = tf.concat([overview, crops] if scheme.overview_first else [crops, overview], 0)
  count = tf.shape(slots)[0]
  padded = tf.pad(slots, [[0, scheme.max_slots - count], [0, 0], [0, 0], [0, 0]])
  padded.set_shape([scheme.max_slots, size, size, 3])
  return padded, count, grid


def decode_and_split(encoded: tf.Tensor, image_size: int, policy: str, scheme: SplitScheme,
                     pad_color: Sequence[float] = CLIP_MEAN,
                     background: Sequence[int] = image_ops.WHITE
                     ) -> tuple[tf.Tensor, tf.Tensor]:
  """Decodes images and splits each into its slots.

  encoded: tf.string [k]. Returns (images uint8 [n, S, S, 3]: every image's
  slots in order, n = sum over images of rows * cols + 1; layouts int32 [k, 2]:
  each image's (rows, cols)). Errors as images.decode_and_resize.
  """
  color = image_ops.check_resize_args(image_size, policy, pad_color, background)
  # Reduced decodes keep both sides >= 2 x the largest canvas side.
  min_side = 2 * image_size * scheme.max_grid_side

  @tf.autograph.experimental.do_not_convert
  def one(data: tf.Tensor):
    return split_one(image_ops.decode_one(data, min_side, background), scheme, image_size,
                     policy, color)

  encoded = tf.convert_to_tensor(encoded, tf.string)
  slots, counts, layouts = tf.map_fn(
      one, encoded, fn_output_signature=(
          tf.TensorSpec([scheme.max_slots, image_size, image_size, 3], tf.uint8),
          tf.TensorSpec([], tf.int32), tf.TensorSpec([2], tf.int32)))
  valid = tf.reshape(tf.range(scheme.max_slots)[None, :] < counts[:, None], [-1])
  images = tf.boolean_mask(tf.reshape(slots, [-1, image_size, image_size, 3]), valid)
  images.set_shape([None, image_size, image_size, 3])
  layouts.set_shape([None, 2])
  return images, layouts


# --- host side: tokens ---------------------------------------------------------

def expand_split_markers(tokens: Any, loss_mask: Any, marker_id: int, layouts: Any,
                         scheme: SplitScheme, row_end_id: int | None = None,
                         cut_after: Any = None, crop_indicator_base: int | None = None
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
  """Replaces each image's marker by one marker per slot (and row ends,
  crop indicators).

  tokens: int [n] with one marker per image; loss_mask: [n]; layouts: int
  [k, 2] (rows, cols) per image, k = the markers; row_end_id: the
  <image_row_end> id when scheme.row_end; cut_after: bool [n] or None;
  crop_indicator_base: the <crop 0,0> id when scheme.crop_indicators (crop
  (r, c) gets base + r * scheme.max_grid_side + c, before its marker).
  Returns (tokens int32 [n'], loss_mask int32 [n'] (0 on the inserted
  tokens), image_group int32 [n'] (the image's index on its markers, row
  ends and indicators, -1 on text), cut_after bool [n'] or None (False
  inside an image)). Raises ValueError when markers and layouts differ in
  number.
  """
  tokens = np.asarray(tokens, np.int32).reshape(-1)
  loss_mask = (np.asarray(loss_mask).reshape(-1) != 0).astype(np.int32)
  layouts = np.asarray(layouts, np.int64).reshape(-1, 2)
  markers = np.flatnonzero(tokens == marker_id)
  if len(markers) != len(layouts):
    raise ValueError(f"the tokens hold {len(markers)} image marker(s) but {len(layouts)} "
                     "image layout(s) came with them.")
  if scheme.row_end and row_end_id is None:
    raise ValueError("the split scheme has row-end tokens but no row_end_id was given.")
  if scheme.crop_indicators and crop_indicator_base is None:
    raise ValueError("the split scheme has crop indicators but no crop_indicator_base was "
                     "given.")
  side = scheme.max_grid_side
  pieces_tokens, pieces_mask, pieces_group, pieces_cut = [], [], [], []
  cut_after = None if cut_after is None else np.asarray(cut_after, bool).reshape(-1)
  previous = 0
  for image, (position, (rows, cols)) in enumerate(zip(markers, layouts)):
    pieces_tokens.append(tokens[previous:position])
    pieces_mask.append(loss_mask[previous:position])
    pieces_group.append(np.full(position - previous, -1, np.int32))
    if cut_after is not None:
      pieces_cut.append(cut_after[previous:position])
    crops = []
    for row in range(int(rows)):
      for col in range(int(cols)):
        if scheme.crop_indicators:
          crops.append(crop_indicator_base + row * side + col)
        crops.append(marker_id)
      if scheme.row_end:
        crops.append(row_end_id)
    run = [marker_id] + crops if scheme.overview_first else crops + [marker_id]
    pieces_tokens.append(np.asarray(run, np.int32))
    pieces_mask.append(np.zeros(len(run), np.int32))
    pieces_group.append(np.full(len(run), image, np.int32))
    if cut_after is not None:
      pieces_cut.append(np.zeros(len(run), bool))
    previous = position + 1
  pieces_tokens.append(tokens[previous:])
  pieces_mask.append(loss_mask[previous:])
  pieces_group.append(np.full(len(tokens) - previous, -1, np.int32))
  if cut_after is not None:
    pieces_cut.append(cut_after[previous:])
  return (np.concatenate(pieces_tokens).astype(np.int32),
          np.concatenate(pieces_mask).astype(np.int32),
          np.concatenate(pieces_group).astype(np.int32),
          None if cut_after is None else np.concatenate(pieces_cut))
