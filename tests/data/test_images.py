"""Image decoding and the three resize policies (tf.data, CPU)."""

import io
import struct
import zlib

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageOps

from mm1_jax.data import images
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


def test_grayscale_becomes_rgb_and_rgba_is_composited_over_the_background():
  gray = encode(np.full((10, 16), 77, np.uint8))
  rgba = encode(np.full((10, 16, 4), (1, 2, 3, 128), np.uint8))
  out = run([gray, rgba], "stretch")
  assert out.shape == (2, S, S, 3)
  assert (out[0] == 77).all()
  # Half-transparent, over the default white: (c * 128 + 255 * 127) / 255.
  assert (out[1] == (128, 128, 129)).all()


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


# --- images as users have them ---------------------------------------------
#
# One small fixture per kind, decoded at its native size and compared with
# what Pillow itself makes of the same bytes (composited over the background,
# EXIF-transposed, converted to RGB).

N = 24  # Fixture side; decode_and_resize(..., N, "stretch") is then the identity.
BACKGROUND = (255, 255, 255)


def photo(size=N):
  """uint8 [size, size, 3]: smooth and asymmetric (a rotation or flip shows)."""
  y, x = np.mgrid[0:size, 0:size]
  return np.stack([x * 10, y * 10, (x * y) % 256], -1).clip(0, 255).astype(np.uint8)


def glyph(size=N):
  """bool [size, size]: an asymmetric 'L' stroke."""
  mask = np.zeros((size, size), bool)
  mask[3:20, 4:8] = True
  mask[16:20, 4:18] = True
  return mask


def save(image, fmt, **options):
  buffer = io.BytesIO()
  image.save(buffer, format=fmt, **options)
  return buffer.getvalue()


def composited(image, background=BACKGROUND):
  """What Pillow shows for `image` over `background`: uint8 [h, w, 3]."""
  rgba = image.convert("RGBA")
  canvas = Image.new("RGBA", rgba.size, (*background, 255))
  return np.asarray(Image.alpha_composite(canvas, rgba).convert("RGB"))


def pil_rgb(data):
  return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def with_exif_orientation(orientation):
  exif = Image.Exif()
  exif[0x0112] = orientation
  return save(Image.fromarray(photo()), "JPEG", quality=95, exif=exif.tobytes())


def fixture(kind):
  """(encoded bytes, the pixels Pillow makes of them: uint8 [N, N, 3])."""
  rgb = Image.fromarray(photo())
  if kind == "png_rgb":
    return save(rgb, "PNG"), photo()
  if kind == "png_gray_16bit":
    ramp = (np.arange(N * N, dtype=np.uint32).reshape(N, N) * 113).astype(np.uint16)
    data = save(Image.fromarray(ramp), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    # The high byte, as Pillow keeps of 16-bit RGB; its own I;16 -> RGB
    # clips everything above 255 to white.
    return data, np.repeat((ramp >> 8).astype(np.uint8)[..., None], 3, -1)
  if kind == "png_palette_transparent":
    data = save(rgb.quantize(8), "PNG", transparency=0)
    return data, composited(Image.open(io.BytesIO(data)))
  if kind == "png_rgb_colour_key":  # tRNS on an RGB image: one colour is transparent.
    key = tuple(int(c) for c in photo()[0, 0])
    data = save(rgb, "PNG", transparency=key)
    return data, composited(Image.open(io.BytesIO(data)))
  if kind == "png_rgba_line_art":  # Black colour channels; only alpha holds the glyph.
    art = np.zeros((N, N, 4), np.uint8)
    art[..., 3] = glyph() * 255
    return save(Image.fromarray(art), "PNG"), composited(Image.fromarray(art))
  if kind == "png_la":
    la = np.stack([photo()[..., 0], photo()[..., 1]], -1)  # Grey ramp, alpha ramp.
    image = Image.fromarray(la, "LA")
    return save(image, "PNG"), composited(image)
  if kind == "jpeg_baseline":
    data = save(rgb, "JPEG", quality=90)
    return data, pil_rgb(data)
  if kind == "jpeg_progressive":
    data = save(rgb, "JPEG", quality=90, progressive=True)
    assert Image.open(io.BytesIO(data)).info.get("progressive")
    return data, pil_rgb(data)
  if kind == "jpeg_cmyk":
    data = save(rgb.convert("CMYK"), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    return data, pil_rgb(data)
  if kind in ("jpeg_exif_6", "jpeg_exif_8"):
    data = with_exif_orientation(int(kind[-1]))
    return data, np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
  if kind == "gif_animated":  # First frame: the photo; later ones solid colours.
    frames = [rgb.quantize(64), Image.new("RGB", (N, N), RED), Image.new("RGB", (N, N), BLUE)]
    data = save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    return data, pil_rgb(data)
  if kind == "bmp":
    return save(rgb, "BMP"), photo()
  if kind == "webp_lossless":
    return save(rgb, "WEBP", lossless=True), photo()
  if kind == "webp_alpha":
    rgba = np.concatenate([photo(), (glyph() * 255).astype(np.uint8)[..., None]], -1)
    return save(Image.fromarray(rgba), "WEBP", lossless=True), composited(Image.fromarray(rgba))
  raise ValueError(kind)


KINDS = ["png_rgb", "png_gray_16bit", "png_palette_transparent", "png_rgb_colour_key",
         "png_rgba_line_art", "png_la", "jpeg_baseline", "jpeg_progressive", "jpeg_cmyk",
         "jpeg_exif_6", "jpeg_exif_8", "gif_animated", "bmp", "webp_lossless", "webp_alpha"]


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_decodes_as_pillow_shows_it(kind):
  data, expected = fixture(kind)
  np.testing.assert_array_equal(images.decode(data, BACKGROUND), expected)
  # The same pixels from the graph op (tf.data map), and called eagerly.
  ds = tf.data.Dataset.from_tensors(tf.constant([data])).map(
      lambda e: decode_and_resize(e, N, "stretch", background=BACKGROUND))
  [graph] = list(ds.as_numpy_iterator())
  np.testing.assert_array_equal(graph[0], expected)
  eager = decode_and_resize(tf.constant([data]), N, "stretch", background=BACKGROUND).numpy()
  np.testing.assert_array_equal(eager[0], expected)


def test_line_art_in_the_alpha_channel_stays_visible():
  data, _ = fixture("png_rgba_line_art")
  out = images.decode(data)
  # Black strokes on white, where reducing RGBA to RGB gives a black square.
  np.testing.assert_array_equal(out[glyph()], 0)
  np.testing.assert_array_equal(out[~glyph()], 255)
  teal = (0, 128, 255)
  on_teal = images.decode(data, teal)
  np.testing.assert_array_equal(on_teal[~glyph()], np.broadcast_to(teal, on_teal[~glyph()].shape))
  [out] = decode_and_resize(tf.constant([data]), N, "stretch", background=teal).numpy()
  np.testing.assert_array_equal(out, on_teal)


def test_palette_transparency_shows_the_background():
  data, _ = fixture("png_palette_transparent")
  indices = np.asarray(Image.open(io.BytesIO(data)))
  assert (indices == 0).any() and (indices != 0).any()
  out = images.decode(data, (1, 2, 3))
  assert (out[indices == 0] == (1, 2, 3)).all()


@pytest.mark.parametrize("orientation,upright", [(6, lambda a: np.rot90(a, -1)),
                                                 (8, lambda a: np.rot90(a, 1))])
def test_exif_orientation_is_applied(orientation, upright):
  data = with_exif_orientation(orientation)
  stored = pil_rgb(data)  # As the camera wrote it.
  out = images.decode(data)
  np.testing.assert_array_equal(out, upright(stored))
  assert not np.array_equal(out, stored)


def test_animated_gif_gives_its_first_frame():
  data, expected = fixture("gif_animated")
  out = images.decode(data)
  np.testing.assert_array_equal(out, expected)
  # The (quantised) photo, not one of the solid frames after it.
  first = Image.fromarray(photo()).quantize(64).convert("RGB")
  np.testing.assert_array_equal(out, np.asarray(first))


def test_bad_config_background_is_named():
  from mm1_jax.data.config import InputConfig
  from mm1_jax.typed_config import ConfigError
  assert InputConfig().image_background == (255, 255, 255)
  assert InputConfig.from_dict({"image_background": [0, 128, 255]}).image_background == (
      0, 128, 255)
  for bad in ([256, 0, 0], [0, 0], [0.5, 0, 0]):
    with pytest.raises(ConfigError, match="data.image_background"):
      InputConfig.from_dict({"image_background": bad})
  with pytest.raises(ValueError, match="background"):
    decode_and_resize(tf.zeros([0], tf.string), S, "pad", background=(0, 0, 300))


# --- skipped images and their reasons ---------------------------------------

def png_chunk(kind, payload):
  return (struct.pack(">I", len(payload)) + kind + payload
          + struct.pack(">I", zlib.crc32(kind + payload)))


def uniform_png(width, height, colour, rows=None):
  """An RGB PNG of one colour built row by row (cheap at any size).

  rows: how many rows of pixel data to include (None: all; fewer makes a
  file whose header promises more than it holds).
  """
  compressor = zlib.compressobj(1)
  row = b"\0" + bytes(colour) * width
  idat = b"".join(compressor.compress(row) for _ in range(height if rows is None else rows))
  idat += compressor.flush()
  header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
  return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", idat)
          + png_chunk(b"IEND", b""))


def reason(data):
  with pytest.raises(images.UndecodableImageError) as error:
    images.decode(data)
  message = str(error.value)
  assert message.startswith("undecodable image: ") and "\n" not in message
  return message


def test_reasons_for_what_cannot_be_decoded():
  noisy = encode(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
  jpeg = save(Image.fromarray(photo(64)), "JPEG", quality=90)
  assert reason(b"") == "undecodable image: empty"
  assert reason(b"not an image at all").startswith("undecodable image: unknown format")
  assert reason(noisy[:len(noisy) // 2]).startswith("undecodable image: truncated PNG")
  assert reason(jpeg[:len(jpeg) // 2]).startswith("undecodable image: truncated JPEG")
  tiff = save(Image.fromarray(photo()), "TIFF")
  assert reason(tiff) == "undecodable image: unsupported format TIFF"
  assert reason(b"\x89PNG\r\n\x1a\n" + b"\0" * 40) == "undecodable image: corrupt PNG header"


def corrupt_complete_png():
  """Garbled compressed data, but with IHDR and IEND intact."""
  data = bytearray(encode(np.random.default_rng(0).integers(0, 256, (32, 32, 3), np.uint8)))
  data[200:260] = b"\0" * 60
  return bytes(data)


@pytest.mark.parametrize("name", ["truncated_png", "garbage", "corrupt_complete_png"])
def test_skip_reason_from_the_graph_and_eager_errors(name):
  bad = {**bad_images(), "corrupt_complete_png": corrupt_complete_png()}[name]
  ds = tf.data.Dataset.from_tensors(tf.constant([bad])).map(
      lambda e: decode_and_resize(e, S, "stretch"))
  with pytest.raises(tf.errors.InvalidArgumentError) as graph_error:
    list(ds)
  with pytest.raises(tf.errors.InvalidArgumentError) as eager_error:
    decode_and_resize(tf.constant([bad]), S, "stretch")
  graph_reason = images.skip_reason(graph_error.value)
  assert graph_reason.startswith("undecodable image: ")
  assert eager_error.value.message.startswith(graph_reason.split(" (")[0])
  assert images.skip_reason(eager_error.value) == eager_error.value.message
  assert images.skip_reason(tf.errors.InvalidArgumentError(None, None, "other")) is None


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_a_huge_image_decodes_reduced_within_the_bound():
  colour = (10, 200, 30)
  data = uniform_png(12_000, 12_000, colour)
  assert 12_000 ** 2 <= images.MAX_PIXELS
  out = images.decode(data, min_side=2 * S)
  # Box-reduced by 12000 // 24 = 500 before it leaves Pillow.
  assert out.shape == (24, 24, 3) and (out == colour).all()
  assert (run([data], "pad") == colour).all()


def test_a_large_jpeg_is_decoded_at_reduced_scale():
  y, x = np.mgrid[0:3000, 0:4000]
  big = np.stack([x * 255 // 4000, y * 255 // 3000, np.full_like(x, 90)], -1).astype(np.uint8)
  data = save(Image.fromarray(big), "JPEG", quality=90)
  out = images.decode(data, min_side=100)
  # 1/8 by DCT scaling (500 x 375), then box-reduced by 3: both sides >= 100.
  assert out.shape == (125, 167, 3)
  reference = np.asarray(Image.fromarray(big).resize((167, 125), Image.Resampling.BOX))
  assert np.abs(out.astype(int) - reference).mean() < 3


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_an_image_over_max_pixels_is_refused_before_decoding():
  # Headers promising more pixels than they hold: refusing reads only the
  # header (decoding would report a truncated file instead).
  over = uniform_png(13_000, 12_000, (1, 2, 3), rows=2)
  assert 13_000 * 12_000 > images.MAX_PIXELS
  assert reason(over) == ("undecodable image: too large (13000 x 12000 pixels > MAX_PIXELS "
                          f"{images.MAX_PIXELS})")
  # Far over: Pillow's own guard refuses it first, with the same reason.
  assert reason(uniform_png(40_000, 40_000, (1, 2, 3), rows=2)).startswith(
      "undecodable image: too large")


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_reducing_before_compositing_equals_compositing_first(mode):
  # 480 x 480 line art: box-reduced by 10 (both sides stay >= 2 * 24).
  alpha = np.kron(glyph(), np.ones((20, 20), bool)) * np.uint8(255)
  art = Image.fromarray(np.stack([alpha // 3] * (3 if mode == "RGBA" else 1) + [alpha], -1), mode)
  out = images.decode(save(art, "PNG"), (0, 128, 255), min_side=48)
  reference = Image.fromarray(composited(art, (0, 128, 255))).reduce(10)
  assert out.shape == (48, 48, 3)
  assert np.abs(out.astype(int) - np.asarray(reference)).max() <= 1


def test_reduced_decode_resizes_like_the_full_size_image():
  big = np.asarray(Image.fromarray(photo()).resize((600, 600), Image.Resampling.BICUBIC))
  [out] = run([encode(big)], "stretch")  # 600 // (2 * 12) = 25: reduced to 24 x 24 first.
  full = tf.image.resize(big, [S, S], antialias=True).numpy()
  diff = np.abs(out.astype(float) - full)
  # Close on average; the largest gaps sit on the blue channel's wrap-around edges.
  assert diff.mean() < 1.5 and diff.max() < 10, (diff.mean(), diff.max())


def test_an_example_mixing_plain_pngs_and_other_kinds_keeps_each_in_place():
  kinds = ["png_rgb", "png_palette_transparent", "jpeg_exif_6", "png_gray_16bit", "png_rgb"]
  data, expected = zip(*(fixture(kind) for kind in kinds))
  ds = tf.data.Dataset.from_tensors(tf.constant(list(data))).map(
      lambda e: decode_and_resize(e, N, "stretch"))
  [out] = list(ds.as_numpy_iterator())
  np.testing.assert_array_equal(out, np.stack(expected))
