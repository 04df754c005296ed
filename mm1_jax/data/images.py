"""Image decoding and resizing for tf.data pipelines (graph mode, host CPU).

Examples carry their images as encoded bytes (tf.string [k], PNG/JPEG/...);
`decode_and_resize` turns them into the model's uint8 [k, S, S, 3] layout.
Normalisation (mean/std) happens on device, not here.

Resize policies (S = image_size):
  'stretch'  resize to S x S, ignoring the aspect ratio;
  'pad'      resize so the longer side is S (aspect kept), then letterbox the
             shorter side, image centred, with `pad_color`;
  'crop'     the central S x S window after resizing the shorter side to S
             (aspect kept); done as crop-then-resize.

The pad colour defaults to CLIP's normalisation mean (as LLaVA's
expand2square does): after the encoder's (x / 255 - mean) / std the band is
~0, i.e. "no signal", instead of the strongly negative value black would give.
Pass the encoder's `image_mean` when it is not CLIP's.

An undecodable image raises tf.errors.InvalidArgumentError when the map runs;
pipelines drop such examples with `ds.ignore_errors()`.
"""

from __future__ import annotations

from typing import Sequence

import tensorflow as tf

from mm1_jax.data.config import IMAGE_POLICIES
from mm1_jax.models.config import CLIP_MEAN

# The data pipeline runs on the host; TF must not grab the accelerators JAX
# uses. Fails (RuntimeError) only if TF already initialised its devices, in
# which case whoever did that chose the placement.
try:
  tf.config.set_visible_devices([], "GPU")
except RuntimeError:
  pass

POLICIES = IMAGE_POLICIES


def _check_args(image_size: int, policy: str, pad_color: Sequence[float]) -> None:
  if policy not in POLICIES:
    raise ValueError(f"Unknown image resize policy {policy!r}; choose one of {POLICIES}.")
  if not isinstance(image_size, int) or image_size < 1:
    raise ValueError(f"image_size must be a positive int, got {image_size!r}.")
  if len(pad_color) != 3 or not all(0.0 <= c <= 1.0 for c in pad_color):
    raise ValueError(f"pad_color must be three RGB values in [0, 1], got {tuple(pad_color)}.")


def _resize(image: tf.Tensor, height: tf.Tensor, width: tf.Tensor) -> tf.Tensor:
  """uint8 [h, w, 3] -> float32 [height, width, 3], antialiased bilinear."""
  return tf.image.resize(image, tf.stack([height, width]), method="bilinear", antialias=True)


def _fit_inside(height: tf.Tensor, width: tf.Tensor, size: int) -> tuple[tf.Tensor, tf.Tensor]:
  """(height, width) scaled so the longer side is `size`; each side in [1, size]."""
  scale = size / tf.cast(tf.maximum(height, width), tf.float32)

  def one(side):
    side = tf.cast(tf.round(tf.cast(side, tf.float32) * scale), tf.int32)
    return tf.clip_by_value(side, 1, size)
  return one(height), one(width)


def _stretch(image: tf.Tensor, size: int) -> tf.Tensor:
  return _resize(image, tf.constant(size), tf.constant(size))


def _pad(image: tf.Tensor, size: int, pad_color: tf.Tensor) -> tf.Tensor:
  """Longer side -> size, centred on a size x size canvas of pad_color (0..255)."""
  height, width = tf.shape(image)[0], tf.shape(image)[1]
  new_height, new_width = _fit_inside(height, width, size)
  resized = _resize(image, new_height, new_width)
  top, left = (size - new_height) // 2, (size - new_width) // 2
  # Pad (resized - colour) with zeros, then add the colour back: a constant
  # per-channel pad value in one op.
  padded = tf.image.pad_to_bounding_box(resized - pad_color, top, left, size, size)
  return padded + pad_color


def _crop(image: tf.Tensor, size: int) -> tf.Tensor:
  """The central square (side = shorter side), resized to size x size.

  The same window as "shorter side -> size, then the central size x size",
  but cropped first: resizing a 1 x 10000 strip to size x 10000*size first
  would need gigabytes.
  """
  height, width = tf.shape(image)[0], tf.shape(image)[1]
  side = tf.minimum(height, width)
  square = tf.image.crop_to_bounding_box(image, (height - side) // 2, (width - side) // 2,
                                         side, side)
  return _resize(square, tf.constant(size), tf.constant(size))


def _to_uint8(image: tf.Tensor) -> tf.Tensor:
  """float32 in [0, 255] up to float error -> uint8 (rounded, clipped)."""
  return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)


def decode_and_resize(encoded: tf.Tensor, image_size: int, policy: str,
                      pad_color: Sequence[float] = CLIP_MEAN) -> tf.Tensor:
  """Decodes and resizes a list of encoded images.

  encoded: tf.string [k] (k >= 0), PNG/JPEG/BMP/GIF bytes (first frame);
  grayscale and RGBA become RGB. image_size: S. policy: one of POLICIES.
  pad_color: RGB in [0, 1] for the 'pad' band (default CLIP's mean).
  Returns tf.uint8 [k, S, S, 3]. Raises ValueError for an unknown policy
  (at trace time); a bad image raises tf.errors.InvalidArgumentError at run
  time.
  """
  _check_args(image_size, policy, pad_color)
  color = tf.constant([round(255.0 * c) for c in pad_color], tf.float32)

  def one(data: tf.Tensor) -> tf.Tensor:
    image = tf.io.decode_image(data, channels=3, expand_animations=False)
    if policy == "stretch":
      resized = _stretch(image, image_size)
    elif policy == "pad":
      resized = _pad(image, image_size, color)
    else:
      resized = _crop(image, image_size)
    return _to_uint8(resized)

  encoded = tf.convert_to_tensor(encoded, tf.string)
  images = tf.map_fn(one, encoded,
                     fn_output_signature=tf.TensorSpec([image_size, image_size, 3], tf.uint8))
  images.set_shape([None, image_size, image_size, 3])
  return images
