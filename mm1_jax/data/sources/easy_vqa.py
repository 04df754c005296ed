"""TFDS builder `mm1_easy_vqa` over the files of the installed easy-vqa package.

easy-vqa (PyPI easy-vqa==1.0, MIT) ships 4,000 train and 1,000 test 64x64 RGB
PNGs, each one coloured circle, rectangle or triangle on a light tinted
background, plus question/answer pairs about them. One example per image:

    image      uint8 [64, 64, 3]  the package's PNG bytes, stored as is
    image_id   int64              the file's number (N.png) within its split
    shape      text               circle | rectangle | triangle
    color      text               red | green | blue | black | gray | teal | brown | yellow
    caption    text               "a blue rectangle"
    questions  sequence of {question: text, answer: text}

Shape and colour come from the image's own questions where they pin them down
(the shape for 95.8% of the 5,000 images, the colour for 92.7%, both for
89.3%), otherwise from the pixels (`attributes_from_pixels`). The pixel
reading agrees with every question-given attribute of both splits.
"""

from __future__ import annotations

import collections
import importlib.util
import io
import json
import os
import re
from typing import Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

IMAGE_SIZE = 64
SHAPES = ("circle", "rectangle", "triangle")
COLORS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")

# RGB of each answer colour, calibrated on the 4,261 images whose questions
# name the colour: the shape's interior pixels are these values to within 4
# (the CSS named colours, "green" being CSS lime).
PALETTE = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
    "teal": (0, 128, 128),
    "brown": (165, 42, 42),
    "yellow": (255, 255, 0),
}

# Filled fraction of the shape's bounding box: ideal circle pi/4 ~ 0.785,
# rectangle 1.0, triangle 0.5. Measured on the question-labelled images
# (anti-aliased edges, shapes down to ~6 px): circle 0.74-0.91, rectangle
# 0.96-1.0, triangle 0.50-0.66; the cuts sit in the gaps.
TRIANGLE_MAX_FILL = 0.70
RECTANGLE_MIN_FILL = 0.93

# A pixel belongs to the shape when it is at least this fraction of the
# largest pixel-to-background distance away from the background.
SHAPE_DISTANCE_FRACTION = 0.5
# Pixels this close to the largest distance are the shape's interior, free of
# anti-aliasing blend with the background: their mean gives the colour.
CORE_DISTANCE_FRACTION = 0.9

# Yes/no questions: the attribute word follows "a"/"an"/"no" ("is there a red
# shape?", "is no circle present?"); negated forms contain "not" or "is no".
_SUBJECT = re.compile(r"\b(?:an?|no) (\w+)\b")
_NEGATED = re.compile(r"\bnot\b|^is no\b")
# "what is the blue shape?" -> answer is the shape, blue the colour.
_WHAT_IS_THE_COLOR_SHAPE = re.compile(r"^what is the (\w+) shape\?$")
# "what color is the triangle?", "what is the color of the shape?" -> answer is the colour.
_WHAT_COLOR = re.compile(r"^(?:what colou?r is the|what is the colou?r of the) (\w+)\?$")
_WHAT_SHAPE = re.compile(r"^what shape\b")


def package_data_dir() -> str:
  """The installed easy_vqa package's data/ folder (without importing the package)."""
  spec = importlib.util.find_spec("easy_vqa")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError("the easy-vqa package is not installed (pip install easy-vqa==1.0).")
  return os.path.join(list(spec.submodule_search_locations)[0], "data")


def read_questions(split: str) -> dict[int, list[tuple[str, str]]]:
  """image_id -> [(question, answer), ...] of `split` ('train' | 'test'), file order."""
  with open(os.path.join(package_data_dir(), split, "questions.json")) as f:
    entries = json.load(f)
  by_image = collections.defaultdict(list)
  for question, answer, image_id in entries:
    by_image[int(image_id)].append((question, answer))
  return dict(by_image)


def image_ids(split: str) -> list[int]:
  """Sorted ids N of the files images/N.png of `split`."""
  names = os.listdir(os.path.join(package_data_dir(), split, "images"))
  return sorted(int(name[:-4]) for name in names if name.endswith(".png"))


def image_path(split: str, image_id: int) -> str:
  return os.path.join(package_data_dir(), split, "images", f"{image_id}.png")


class _Evidence:
  """What the questions say about one attribute: a value seen, values excluded."""

  def __init__(self, name: str, vocabulary: Sequence[str]):
    self.name = name
    self.vocabulary = vocabulary
    self.value: str | None = None
    self.excluded: set[str] = set()

  def assert_is(self, value: str) -> None:
    if value in self.excluded or self.value not in (None, value):
      raise ValueError(f"questions contradict each other on the {self.name}: "
                       f"{value!r} vs {self.value or sorted(self.excluded)}.")
    self.value = value

  def assert_not(self, value: str) -> None:
    if self.value == value:
      raise ValueError(f"questions contradict each other on the {self.name}: "
                       f"{value!r} both present and absent.")
    self.excluded.add(value)

  def resolve(self) -> str | None:
    """The value if stated, or the last one left when all others are excluded."""
    if self.value is not None:
      return self.value
    remaining = [v for v in self.vocabulary if v not in self.excluded]
    return remaining[0] if len(remaining) == 1 else None


def attributes_from_questions(
    questions: Sequence[tuple[str, str]]) -> tuple[str | None, str | None]:
  """(shape, color) that an image's (question, answer) pairs determine, else None.

  A value counts when a question names it outright ("what is the blue shape?"
  -> "rectangle": shape rectangle, colour blue; "what color is the shape?" ->
  colour), when a yes/no question affirms it ("is there a red shape?" yes,
  "is no circle present?" no), or when the yes/no questions rule out every
  other value. Raises ValueError on an unrecognised question or on questions
  that contradict each other.
  """
  shape = _Evidence("shape", SHAPES)
  color = _Evidence("color", COLORS)

  def claim(word: str, present: bool) -> None:
    evidence = shape if word in SHAPES else color if word in COLORS else None
    if evidence is None:
      return
    if present:
      evidence.assert_is(word)
    else:
      evidence.assert_not(word)

  for question, answer in questions:
    if match := _WHAT_IS_THE_COLOR_SHAPE.match(question):
      claim(match[1], True)
      claim(answer, True)
    elif match := _WHAT_COLOR.match(question):
      claim(match[1], True)  # "shape" is neither a shape nor a colour: ignored.
      claim(answer, True)
    elif _WHAT_SHAPE.match(question):
      claim(answer, True)
    elif answer in ("yes", "no") and (match := _SUBJECT.search(question)):
      negated = _NEGATED.search(question) is not None
      claim(match[1], (answer == "yes") != negated)
    else:
      raise ValueError(f"unrecognised easy-vqa question {question!r} (answer {answer!r}).")
  return shape.resolve(), color.resolve()


def background_color(image: np.ndarray) -> np.ndarray:
  """float32 [3]: per-channel median of the border pixels of uint8 [H, W, 3].

  The median ignores the shape where it touches the border.
  """
  border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
  return np.median(border.astype(np.float32), axis=0)


def nearest_palette_color(rgb: np.ndarray) -> str:
  """Name of the PALETTE colour nearest (Euclidean) to float [3] `rgb`."""
  names = list(PALETTE)
  palette = np.asarray([PALETTE[n] for n in names], np.float32)
  return names[int(np.argmin(np.linalg.norm(palette - rgb, axis=-1)))]


def shape_from_fill(fill: float) -> str:
  """Shape whose filled fraction of its bounding box is `fill`."""
  if fill < TRIANGLE_MAX_FILL:
    return "triangle"
  if fill > RECTANGLE_MIN_FILL:
    return "rectangle"
  return "circle"


def attributes_from_pixels(image: np.ndarray) -> tuple[str, str]:
  """(shape, color) read off a uint8 [64, 64, 3] easy-vqa image.

  The shape is the set of pixels far from the background (the border median);
  its colour is the palette entry nearest to the mean of its interior pixels,
  its kind follows from how much of its bounding box it fills.
  """
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"expected an RGB image [H, W, 3], got shape {image.shape}.")
  pixels = image.astype(np.float32)
  distance = np.linalg.norm(pixels - background_color(image), axis=-1)
  largest = distance.max()
  if largest == 0:
    raise ValueError("the image is uniform: there is no shape to read.")
  color = nearest_palette_color(pixels[distance >= CORE_DISTANCE_FRACTION * largest].mean(0))
  rows, cols = np.nonzero(distance >= SHAPE_DISTANCE_FRACTION * largest)
  box_area = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
  return shape_from_fill(rows.size / box_area), color


def caption(shape: str, color: str) -> str:
  """'a blue rectangle'."""
  return f"a {color} {shape}"


def decode_png(png: bytes) -> np.ndarray:
  """uint8 [H, W, 3] from PNG bytes."""
  return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def describe_image(png: bytes, questions: Sequence[tuple[str, str]]) -> dict[str, str]:
  """{'shape', 'color', 'caption'}: the questions' attributes, pixels where they fall short."""
  shape, color = attributes_from_questions(questions)
  if shape is None or color is None:
    pixel_shape, pixel_color = attributes_from_pixels(decode_png(png))
    shape, color = shape or pixel_shape, color or pixel_color
  return {"shape": shape, "color": color, "caption": caption(shape, color)}


class Mm1EasyVqa(tfds.core.GeneratorBasedBuilder):
  """easy-vqa images with captions and questions, read from the installed package."""

  name = "mm1_easy_vqa"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {
      "1.0.0": "easy-vqa 1.0 images (PNG bytes as shipped), question-or-pixel "
               "derived shape/colour captions, all question/answer pairs.",
  }

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(
                shape=(IMAGE_SIZE, IMAGE_SIZE, 3), encoding_format="png"),
            "image_id": tfds.features.Scalar(np.int64),
            "shape": tfds.features.Text(),
            "color": tfds.features.Text(),
            "caption": tfds.features.Text(),
            "questions": tfds.features.Sequence({
                "question": tfds.features.Text(),
                "answer": tfds.features.Text(),
            }),
        }),
        homepage="https://github.com/vzhou842/easy-VQA",
        license="MIT",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Everything is in the installed package.
    return {"train": self._generate_examples("train"),
            "test": self._generate_examples("test")}

  def _generate_examples(self, split: str) -> Iterator[tuple[int, dict]]:
    questions = read_questions(split)
    for image_id in image_ids(split):
      with open(image_path(split, image_id), "rb") as f:
        png = f.read()
      pairs = questions.get(image_id, [])
      yield image_id, {
          "image": png,
          "image_id": image_id,
          **describe_image(png, pairs),
          "questions": [{"question": q, "answer": a} for q, a in pairs],
      }


BUILDER = Mm1EasyVqa
