"""Image decoding and the three resize policies (tf.data, CPU)."""

import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from mm1_jax.data.images import decode_and_resize
from mm1_jax.models.config import CLIP_MEAN

S = 12
RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)
PAD = np.round(255 * np.asarray(CLIP_MEAN)).astype(np.uint8)


def encode(array, fmt="PNG"):
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
  return buffer.getvalue()


def stripes(width_each=20, height=20):
  """uint8 [20, 60, 3]: red | green | blue vertical stripes (wide, 3:1)."""
  return np.concatenate([np.full((height, width_each, 3), c, np.uint8)
                         for c in (RED, GREEN, BLUE)], axis=1)


def run(images, policy, **kwargs):
  return decode_and_resize(tf.constant(images, tf.string), S, policy, **kwargs).numpy()


def assert_colour(pixels, colour, tolerance):
  diff = np.abs(pixels.astype(int) - np.asarray(colour)).max()
  assert diff <= tolerance, f"pixels differ from {colour} by {diff}"


FORMATS = [("PNG", 0), ("JPEG", 24)]  # JPEG is lossy: colours only roughly


@pytest.mark.parametrize("fmt,tolerance", FORMATS)
def test_stretch_fills_the_square(fmt, tolerance):
  [out] = run([encode(stripes(), fmt)], "stretch")
  assert out.shape == (S, S, 3) and out.dtype == np.uint8
  # Each 20-pixel stripe becomes 4 columns, full height; centre columns are pure.
  assert_colour(out[:, 1:3], RED, tolerance)
  assert_colour(out[:, 5:7], GREEN, tolerance)
  assert_colour(out[:, 9:11], BLUE, tolerance)


@pytest.mark.parametrize("fmt,tolerance", FORMATS)
def test_pad_keeps_the_aspect_and_letterboxes(fmt, tolerance):
  [wide, tall] = run([encode(stripes(), fmt), encode(stripes().transpose(1, 0, 2), fmt)], "pad")
  # 60x20 -> 12x4, centred: rows 4..7 hold the image, the rest is the pad colour.
  assert_colour(wide[:4], PAD, 0)
  assert_colour(wide[8:], PAD, 0)
  assert_colour(wide[4:8, 1:3], RED, tolerance)
  assert_colour(wide[4:8, 5:7], GREEN, tolerance)
  assert_colour(wide[4:8, 9:11], BLUE, tolerance)
  # Portrait: the band is on the left and right.
  assert_colour(tall[:, :4], PAD, 0)
  assert_colour(tall[:, 8:], PAD, 0)
  assert_colour(tall[1:3, 4:8], RED, tolerance)
  assert_colour(tall[9:11, 4:8], BLUE, tolerance)


def test_pad_colour_can_be_chosen():
  [out] = run([encode(stripes())], "pad", pad_color=(0.0, 0.0, 0.0))
  assert (out[:4] == 0).all() and (out[8:] == 0).all()


@pytest.mark.parametrize("fmt,tolerance", FORMATS)
def test_crop_keeps_the_centre(fmt, tolerance):
  [out] = run([encode(stripes(), fmt)], "crop")
  # Shorter side 20 -> 12 makes the width 36; the central 12 columns are the
  # green stripe (only its outermost columns blend with the neighbours).
  assert_colour(out[:, 1:11], GREEN, tolerance)
  assert (out[..., 1] > out[..., 0]).all() and (out[..., 1] > out[..., 2]).all()


def test_images_of_different_sizes_stack_in_order():
  encoded = [encode(np.full((h, w, 3), v, np.uint8)) for h, w, v in
             [(5, 9, 10), (30, 30, 20), (60, 15, 30)]]
  for policy in ("stretch", "pad", "crop"):
    out = run(encoded, policy, pad_color=(0.0, 0.0, 0.0))
    assert out.shape == (3, S, S, 3)
    centre = out[:, S // 2, S // 2]
    np.testing.assert_array_equal(centre[:, 0], [10, 20, 30])


@pytest.mark.parametrize("policy", ["stretch", "pad", "crop"])
def test_extreme_aspect_ratios(policy):
  strip = np.full((1, 3000, 3), 200, np.uint8)
  out = run([encode(strip), encode(strip.transpose(1, 0, 2))], policy, pad_color=(0, 0, 0))
  assert out.shape == (2, S, S, 3)
  assert out.max() == 200  # the strip survives (a 1-pixel line at least)


def test_no_images():
  out = decode_and_resize(tf.zeros([0], tf.string), S, "pad")
  assert out.shape == (0, S, S, 3) and out.dtype == tf.uint8
  # Also inside a tf.data map, where k varies per element.
  examples = [[], [encode(stripes())], []]
  ds = tf.data.Dataset.from_generator(
      lambda: iter(examples), output_signature=tf.TensorSpec([None], tf.string))
  ds = ds.map(lambda images: decode_and_resize(images, S, "crop"))
  assert [x.shape[0] for x in ds.as_numpy_iterator()] == [0, 1, 0]


def test_grayscale_and_rgba_become_rgb():
  gray = encode(np.full((10, 16), 77, np.uint8))
  rgba = encode(np.full((10, 16, 4), (1, 2, 3, 128), np.uint8))
  out = run([gray, rgba], "stretch")
  assert out.shape == (2, S, S, 3)
  assert (out[0] == 77).all()
  assert (out[1] == (1, 2, 3)).all()


def test_unknown_policy_is_named():
  with pytest.raises(ValueError, match=r"'squash'.*'stretch', 'pad', 'crop'"):
    decode_and_resize(tf.zeros([0], tf.string), S, "squash")


def bad_images():
  noisy = encode(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
  return {"truncated_png": noisy[:len(noisy) // 2], "garbage": b"not an image at all"}


@pytest.mark.parametrize("name", ["truncated_png", "garbage"])
def test_bad_image_raises_and_ignore_errors_drops_exactly_it(name):
  bad = bad_images()[name]
  good = [encode(np.full((8, 8, 3), v, np.uint8)) for v in (10, 20, 30)]
  elements = [[good[0]], [good[1], bad], [good[2]]]

  def dataset():
    ds = tf.data.Dataset.from_generator(
        lambda: iter(elements), output_signature=tf.TensorSpec([None], tf.string))
    return ds.map(lambda images: decode_and_resize(images, S, "stretch"))

  with pytest.raises(tf.errors.InvalidArgumentError):
    list(dataset().as_numpy_iterator())
  kept = list(dataset().ignore_errors().as_numpy_iterator())
  assert [int(x[0, 0, 0, 0]) for x in kept] == [10, 30]
