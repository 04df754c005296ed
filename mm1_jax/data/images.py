"""Image decoding and resizing for tf.data pipelines (graph mode, host CPU).

Examples carry their images as encoded bytes (tf.string [k]);
`decode_and_resize` turns them into the model's uint8 [k, S, S, 3] layout.
Normalisation (mean/std) happens on device, not here.

Decoding (`decode`, Pillow, called through tf.numpy_function):
  formats    PNG (1/8/16-bit, grayscale, palette, alpha), JPEG (baseline,
             progressive, CMYK), GIF and WebP (first frame), BMP. Anything
             else, and corrupt or truncated data, raises
             UndecodableImageError('undecodable image: <why>').
  alpha      RGBA, LA and palette images with transparency are composited
             over `background` (RGB 0..255, InputConfig.image_background,
             default white), never reduced to their colour channels: line
             art drawn only in the alpha channel would become a black square.
  EXIF       the Orientation tag (camera JPEGs, also PNG/WebP) is applied.
  16-bit     kept to the high byte (v >> 8), as Pillow does for 16-bit RGB;
             Pillow's own 'I;16' -> 'L' conversion clips everything above 255.
  size       an image whose header declares more than MAX_PIXELS (150 M)
             pixels is refused before any pixel is decoded ("too large").
             Below that, a JPEG is decoded at 1/2, 1/4 or 1/8 scale (DCT
             scaling, Image.draft) and any other image box-reduced by an
             integer factor, as long as both sides stay >= 2 S, so the
             final resize sees a few times S^2 pixels (long strips aside).
             The bound is a full-size decode of a non-JPEG, measured at 4
             (RGB), 7 (16-bit grey) and 8 (RGBA) bytes per pixel: <= 1.2 GB
             per image in flight at MAX_PIXELS.

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

An undecodable image raises tf.errors.InvalidArgumentError when the map runs,
its message holding "undecodable image: <why>" (`skip_reason` extracts it);
pipelines drop such examples with `ds.ignore_errors()`.
"""

from __future__ import annotations

import functools
import io
import re
from typing import Sequence

import numpy as np
import tensorflow as tf
from PIL import Image

from mm1_jax.data.config import IMAGE_POLICIES
from mm1_jax.models.config import CLIP_MEAN

# The data pipeline runs on the host; TF must not grab the accelerators JAX
# uses. Fails (RuntimeError) only if TF already initialised its devices, in
# which case whoever did that chose the placement.
try:
  tf.config.set_visible_devices([], "GPU")
except RuntimeError:
  pass

FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP")  # JPEG includes MPO (multi-picture).
MAX_PIXELS = 150_000_000  # Declared width x height above which an image is refused.
WHITE = (255, 255, 255)
REASON_PREFIX = "undecodable image: "

# Leading bytes of the formats read here, and of others users have, so the
# skip reason can name them.
_OWN_FORMATS = ((b"\x89PNG", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF8", "GIF"), (b"BM", "BMP"))
_OTHER_FORMATS = ((b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"%PDF", "PDF"),
                  (b"<svg", "SVG"), (b"<?xml", "SVG/XML"), (b"8BPS", "PSD"))
_ISO_BRANDS = {b"heic": "HEIC", b"heix": "HEIC", b"mif1": "HEIF", b"avif": "AVIF"}

# EXIF Orientation -> the transposition that makes the image upright (the
# table of PIL.ImageOps.exif_transpose).
_ORIENTATION = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
                6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
                8: Image.Transpose.ROTATE_90}


class UndecodableImageError(ValueError):
  """An image to skip; str(error) is 'undecodable image: <why>' (one line)."""

  def __init__(self, why: str):
    # One line without brackets or quotes: TF's messages wrap it in either.
    why = re.sub(r"[\[\]\s'\"]+", " ", why).strip()
    super().__init__(REASON_PREFIX + why)


def skip_reason(error: BaseException | str) -> str | None:
  """The 'undecodable image: <why>' an exception or TF error message holds.

  None when the error is not about an undecodable image.
  """
  message = error if isinstance(error, str) else getattr(error, "message", None) or str(error)
  match = re.search(re.escape(REASON_PREFIX) + r"[^\]\n'\"]*", message)
  if match:
    return match.group(0).strip()
  if "decode_plain_png" in message:  # The TF fast path: a complete PNG with broken data.
    return REASON_PREFIX + "corrupt PNG"
  return None


def _unknown_format(data: bytes) -> str:
  head = data[:16].lstrip()
  for magic, name in _OWN_FORMATS:
    if data.startswith(magic):  # Pillow's plugin refused what follows.
      return f"corrupt {name} header"
  if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
    return "corrupt WEBP header"
  for magic, name in _OTHER_FORMATS:
    if head.startswith(magic):
      return f"unsupported format {name}"
  if data[4:8] == b"ftyp" and data[8:12] in _ISO_BRANDS:
    return f"unsupported format {_ISO_BRANDS[data[8:12]]}"
  return "unknown format (not PNG, JPEG, GIF, BMP or WebP)"


def _orientation(image: Image.Image) -> int:
  try:
    return int(image.getexif().get(0x0112, 1))
  except Exception:  # noqa: BLE001 - corrupt EXIF: the pixels are fine, keep them as stored.
    return 1


def _l_rgb_la_or_rgba(image: Image.Image) -> Image.Image:
  """Any decoded mode -> 'L' or 'RGB', or 'LA' / 'RGBA' when it has transparency.

  Grey stays one channel until after the reduction: a third of the memory.
  """
  mode = image.mode
  if mode in ("RGB", "L") and "transparency" in image.info:  # A PNG tRNS colour key.
    return image.convert("RGBA")
  if mode in ("L", "RGB", "LA", "RGBA"):
    return image
  if mode.startswith("I;16") or mode == "I":
    # 16-bit grey: keep the high byte (Pillow's convert('L') clips at 255).
    pixels = np.asarray(image)
    if mode == "I":
      pixels = np.clip(pixels, 0, 65535)
    return Image.fromarray((pixels >> 8).astype(np.uint8), "L")
  if mode in ("P", "PA"):
    return image.convert("RGBA" if mode == "PA" or image.has_transparency_data else "RGB")
  if mode in ("La", "RGBa"):
    return image.convert("RGBA")
  if mode == "1":
    return image.convert("L")
  if mode in ("CMYK", "YCbCr", "RGBX", "LAB", "HSV"):
    return image.convert("RGB")
  raise UndecodableImageError(f"unsupported {image.format} pixel mode {mode}")


def decode(data: bytes, background: Sequence[int] = WHITE, min_side: int | None = None
           ) -> np.ndarray:
  """Encoded image bytes -> uint8 [h, w, 3] RGB, upright, alpha composited.

  background: RGB 0..255 behind transparent pixels. min_side: None decodes at
  full size; otherwise the image may come back reduced (JPEG DCT scaling,
  integer box reduction) with both sides kept >= min_side (or as they were,
  if smaller). Raises UndecodableImageError for anything it cannot decode.
  """
  if not data:
    raise UndecodableImageError("empty")
  try:
    image = Image.open(io.BytesIO(data), formats=FORMATS)
  except Image.DecompressionBombError as error:
    raise UndecodableImageError(f"too large ({error})") from None
  except Image.UnidentifiedImageError:
    raise UndecodableImageError(_unknown_format(data)) from None
  except Exception as error:  # noqa: BLE001 - any header Pillow rejects is a corrupt file.
    raise UndecodableImageError(f"corrupt header ({type(error).__name__}: {error})") from None
  with image:
    width, height = image.size
    if width * height > MAX_PIXELS:
      raise UndecodableImageError(f"too large ({width} x {height} pixels > MAX_PIXELS "
                                  f"{MAX_PIXELS})")
    if width < 1 or height < 1:
      raise UndecodableImageError(f"empty ({width} x {height} pixels)")
    if min_side and image.format in ("JPEG", "MPO"):
      image.draft(None, (min_side, min_side))  # Both sides stay >= min_side.
    fmt = image.format
    try:
      image.load()  # The first frame of an animation.
      orientation = _orientation(image)
      image = _l_rgb_la_or_rgba(image)
      if min_side:
        factor = min(image.size) // min_side
        if factor >= 2:
          # A box average; LA / RGBA are averaged premultiplied, so
          # compositing after it equals compositing before it.
          image = image.reduce(factor)
      if image.mode in ("LA", "RGBA"):
        canvas = Image.new("RGBA", image.size, (*(int(c) for c in background), 255))
        image = Image.alpha_composite(canvas, image.convert("RGBA"))
      image = image.convert("RGB") if image.mode != "RGB" else image
      if orientation in _ORIENTATION:
        image = image.transpose(_ORIENTATION[orientation])
      return np.asarray(image, np.uint8)
    except UndecodableImageError:
      raise
    except Exception as error:  # noqa: BLE001 - user bytes: any failure means skip the image.
      kind = ("out of memory decoding" if isinstance(error, MemoryError) else
              "truncated" if "truncated" in str(error) else "corrupt")
      raise UndecodableImageError(f"{kind} {fmt} ({type(error).__name__}: {error})") from None


def _check_args(image_size: int, policy: str, pad_color: Sequence[float],
                background: Sequence[int]) -> None:
  if policy not in IMAGE_POLICIES:
    raise ValueError(f"Unknown image resize policy {policy!r}; choose one of {IMAGE_POLICIES}.")
  if not isinstance(image_size, int) or image_size < 1:
    raise ValueError(f"image_size must be a positive int, got {image_size!r}.")
  if len(pad_color) != 3 or not all(0.0 <= c <= 1.0 for c in pad_color):
    raise ValueError(f"pad_color must be three RGB values in [0, 1], got {tuple(pad_color)}.")
  if len(background) != 3 or not all(isinstance(c, (int, np.integer)) and 0 <= c <= 255
                                     for c in background):
    raise ValueError(f"background must be three RGB ints in [0, 255], got {tuple(background)}.")


def _resize(image: tf.Tensor, height: tf.Tensor, width: tf.Tensor) -> tf.Tensor:
  """uint8 [h, w, 3] -> float32 [height, width, 3], antialiased bilinear."""
  return tf.image.resize(image, tf.stack([height, width]), method="bilinear", antialias=True)


def _fit_inside(height: tf.Tensor, width: tf.Tensor, target_height: int, target_width: int
                ) -> tuple[tf.Tensor, tf.Tensor]:
  """(height, width) scaled to fit inside the target, aspect kept; each side in [1, target]."""
  scale = tf.minimum(target_height / tf.cast(height, tf.float32),
                     target_width / tf.cast(width, tf.float32))

  def one(side, target):
    side = tf.cast(tf.round(tf.cast(side, tf.float32) * scale), tf.int32)
    return tf.clip_by_value(side, 1, target)
  return one(height, target_height), one(width, target_width)


def _stretch(image: tf.Tensor, height: int, width: int) -> tf.Tensor:
  return _resize(image, tf.constant(height), tf.constant(width))


def _pad(image: tf.Tensor, height: int, width: int, pad_color: tf.Tensor) -> tf.Tensor:
  """Fitted inside height x width (aspect kept), centred on a canvas of pad_color (0..255)."""
  new_height, new_width = _fit_inside(tf.shape(image)[0], tf.shape(image)[1], height, width)
  resized = _resize(image, new_height, new_width)
  top, left = (height - new_height) // 2, (width - new_width) // 2
  # Pad (resized - colour) with zeros, then add the colour back: a constant
  # per-channel pad value in one op.
  padded = tf.image.pad_to_bounding_box(resized - pad_color, top, left, height, width)
  return padded + pad_color


def _crop(image: tf.Tensor, height: int, width: int) -> tf.Tensor:
  """The largest central window of the target's aspect ratio, resized to height x width.

  The same window as "cover the target keeping the aspect, then take its
  centre", but cropped first: resizing a 1 x 10000 strip to size x
  10000*size first would need gigabytes.
  """
  image_height, image_width = tf.shape(image)[0], tf.shape(image)[1]
  # Window = target scaled by min(image_h / h, image_w / w), at least 1 px.
  scale = tf.minimum(tf.cast(image_height, tf.float32) / height,
                     tf.cast(image_width, tf.float32) / width)
  window_height = tf.clip_by_value(tf.cast(tf.round(height * scale), tf.int32), 1, image_height)
  window_width = tf.clip_by_value(tf.cast(tf.round(width * scale), tf.int32), 1, image_width)
  window = tf.image.crop_to_bounding_box(image, (image_height - window_height) // 2,
                                         (image_width - window_width) // 2, window_height,
                                         window_width)
  return _resize(window, tf.constant(height), tf.constant(width))


def resize_to(image: tf.Tensor, height: int, width: int, policy: str, pad_color: tf.Tensor
              ) -> tf.Tensor:
  """uint8 [h, w, 3] -> uint8 [height, width, 3] by `policy` (module docstring;
  a non-square target generalises each: stretch, fit and pad, or centre window).

  pad_color: float32 [3], RGB 0..255.
  """
  if policy == "stretch":
    resized = _stretch(image, height, width)
  elif policy == "pad":
    resized = _pad(image, height, width, pad_color)
  else:
    resized = _crop(image, height, width)
  return _to_uint8(resized)


def _to_uint8(image: tf.Tensor) -> tf.Tensor:
  """float32 in [0, 255] up to float error -> uint8 (rounded, clipped)."""
  return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)


def _decode_or_reason(data: bytes, background: tuple[int, ...], min_side: int
                      ) -> tuple[np.ndarray, bytes]:
  """`decode` for tf.numpy_function: (uint8 [h, w, 3], b"") or (empty, reason).

  The reason is returned, not raised: a Python exception inside
  numpy_function would print its traceback for every skipped image.
  """
  if isinstance(data, np.ndarray):  # numpy_function hands a 0-d array of bytes.
    data = data.item()
  try:
    return decode(data, background, min_side), b""
  except UndecodableImageError as error:
    return np.zeros((0, 0, 3), np.uint8), str(error).encode()


_IEND = b"\0\0\0\0IEND\xaeB`\x82"


def _plain_png(data: tf.Tensor, min_side: int) -> tf.Tensor:
  """tf.bool [...] per tf.string [...]: 8-bit grey/RGB PNG, no transparency
  or EXIF, not reducible.

  Such files decode to the same pixels with tf.io.decode_png, without a
  Python call into Pillow (most small dataset images are these).
  A chunk name that only appears inside compressed data merely sends the
  file down the Pillow path.
  """
  header = tf.strings.substr(data + b"\0" * 26, 0, 26)
  # Width, height (big-endian; over 2^31 reads negative: Pillow's path).
  size = tf.cast(tf.io.decode_raw(tf.strings.substr(header, 16, 8), tf.int32,
                                  little_endian=False), tf.int64)
  depth_and_colour = tf.strings.substr(header, 24, 2)
  return tf.logical_and(
      tf.reduce_all(tf.stack([
          tf.equal(tf.strings.substr(header, 0, 16), b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR"),
          # 8-bit grey or RGB: no alpha channel, no palette.
          tf.logical_or(tf.equal(depth_and_colour, b"\x08\x00"),
                        tf.equal(depth_and_colour, b"\x08\x02")),
          tf.reduce_min(size, -1) >= 1,
          tf.reduce_min(size, -1) < 2 * min_side,  # `decode` would not reduce it
          tf.reduce_prod(size, -1) <= MAX_PIXELS]), 0),
      # Ends with IEND: a truncated file goes to Pillow, which names it.
      tf.logical_and(
          tf.equal(tf.strings.substr(b"\0" * 12 + data, -12, 12), _IEND),
          # tRNS: a transparent colour key; eXIf: an orientation to apply.
          # (An unanchored literal: RE2 scans any bytes for it, where a
          # full match's '.' would stop at bytes that are not UTF-8.)
          tf.equal(tf.strings.length(tf.strings.regex_replace(data, "tRNS|eXIf", "",
                                                              replace_global=False)),
                   tf.strings.length(data))))


def decode_one(data: tf.Tensor, min_side: int, background: Sequence[int] = WHITE) -> tf.Tensor:
  """tf.string [] -> uint8 [h, w, 3], decoded as `decode` does (graph or eager).

  min_side: as `decode`'s (the reduced image keeps both sides >= it). A plain
  PNG (`_plain_png`) decodes with tf.io.decode_png, anything else through
  Pillow. An undecodable image raises tf.errors.InvalidArgumentError holding
  "undecodable image: <why>" (at run time in a graph, at once eagerly).
  """
  background = tuple(int(c) for c in background)
  plain = _plain_png(data, min_side)
  if tf.executing_eagerly():
    # A direct call (generate, the pipeline's re-decode of a skipped record):
    # raise the usual error type, its message starting with the reason.
    try:
      if bool(plain):
        return tf.io.decode_png(data, channels=3)
      return tf.constant(decode(data.numpy(), background, min_side))
    except UndecodableImageError as error:
      raise tf.errors.InvalidArgumentError(None, None, str(error)) from None
    except tf.errors.OpError as error:
      why = re.sub(r"\s*\[Op:.*", "", error.message.splitlines()[0])
      raise tf.errors.InvalidArgumentError(
          None, None, str(UndecodableImageError(f"corrupt PNG ({why})"))) from None

  def pillow() -> tf.Tensor:
    decode_fn = functools.partial(_decode_or_reason, background=background, min_side=min_side)
    image, reason = tf.numpy_function(decode_fn, [data], [tf.uint8, tf.string], stateful=False,
                                      name="decode_image")
    image.set_shape([None, None, 3])
    reason.set_shape([])
    check = tf.debugging.Assert(tf.equal(reason, ""), [reason])
    with tf.control_dependencies([check]):
      return tf.identity(image)

  return tf.cond(plain, lambda: tf.io.decode_png(data, channels=3, name="decode_plain_png"),
                 pillow)


def check_resize_args(image_size: int, policy: str, pad_color: Sequence[float],
                      background: Sequence[int]) -> tf.Tensor:
  """Raises ValueError for a bad argument; returns pad_color as float32 [3] in 0..255."""
  _check_args(image_size, policy, pad_color, background)
  return tf.constant([round(255.0 * c) for c in pad_color], tf.float32)


def decode_and_resize(encoded: tf.Tensor, image_size: int, policy: str,
                      pad_color: Sequence[float] = CLIP_MEAN,
                      background: Sequence[int] = WHITE) -> tf.Tensor:
  """Decodes and resizes a list of encoded images.

  encoded: tf.string [k] (k >= 0), any format `decode` reads. image_size: S.
  policy: one of IMAGE_POLICIES. pad_color: RGB in [0, 1] for the 'pad' band
  (default CLIP's mean). background: RGB ints 0..255 behind transparent
  pixels (default white). Returns tf.uint8 [k, S, S, 3]. Raises ValueError
  for bad arguments (at trace time); an undecodable image raises
  tf.errors.InvalidArgumentError holding "undecodable image: <why>" at run
  time.
  """
  color = check_resize_args(image_size, policy, pad_color, background)
  # Reduced decodes keep both sides >= 2 S, so the antialiased resize still
  # does the last (>= 2x) step itself and sees a few times S^2 pixels at most
  # (long strips excepted).
  min_side = 2 * image_size

  def resize(image: tf.Tensor) -> tf.Tensor:
    return resize_to(image, image_size, image_size, policy, color)

  # Not autograph-converted: it would wrap the eager error in "in user code".
  @tf.autograph.experimental.do_not_convert
  def one(data: tf.Tensor) -> tf.Tensor:
    return resize(decode_one(data, min_side, background))

  @tf.autograph.experimental.do_not_convert
  def one_plain(data: tf.Tensor) -> tf.Tensor:
    return resize(tf.io.decode_png(data, channels=3, name="decode_plain_png"))

  encoded = tf.convert_to_tensor(encoded, tf.string)
  spec = tf.TensorSpec([image_size, image_size, 3], tf.uint8)
  if tf.executing_eagerly():
    images = tf.map_fn(one, encoded, fn_output_signature=spec)
  else:
    # One test per example, outside the loop: the common all-plain case then
    # runs the old per-image graph, without a conditional per image.
    images = tf.cond(tf.reduce_all(_plain_png(encoded, min_side)),
                     lambda: tf.map_fn(one_plain, encoded, fn_output_signature=spec),
                     lambda: tf.map_fn(one, encoded, fn_output_signature=spec))
  images.set_shape([None, image_size, image_size, 3])
  return images
