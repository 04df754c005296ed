"""TFDS builder `mm1_easy_vqa_mosaic`: grids of easy-vqa images, questions about one cell.

Each example is a GRID x GRID mosaic (3 x 3 of 64 px cells = a 192 x 192 PNG)
of distinct easy-vqa images of one split: train mosaics are made of train
images only, test mosaics of test images only. Shown to a 64 px encoder the
whole mosaic shrinks each cell to ~21 px and the detail is lost, while a
3 x 3 split of the image gives each cell to the encoder at full resolution,
so the task measures what high-resolution image splitting buys.

    image      uint8 [192, 192, 3]  the mosaic, PNG bytes (Pillow, lossless)
    mosaic_id  int64                its number within its split
    grid       int64                N, cells per row and per column
    image_ids  sequence of int64    [N*N] easy-vqa image ids of the cells, row-major
    cell_shapes, cell_colors
               sequence of text     [N*N] each cell's shape and colour, row-major
    caption    text                 every cell in row-major order: "top left: a red
                                    circle; top middle: a blue triangle; ...;
                                    bottom right: a gray rectangle"
    questions  sequence of {question: text, answer: text, cell: int64}
               QUESTIONS_PER_MOSAIC questions about distinct random cells (cell:
               row-major index), e.g.
                 "what color is the shape in the top right cell?"  -> "red"
                 "what shape is in the center cell?"               -> "circle"
                 "is there a triangle in the bottom middle cell?"  -> "yes" | "no"

Cell names for N = 3: rows top / middle / bottom, columns left / middle /
right, the middle one "center"; for other N "row r, column c" (1-based).
Question kinds rotate over the questions of a split (a third each) and the
yes/no answers alternate (half each); a "no" question names a shape that
some other cell of the mosaic shows when there is one, so it cannot be
answered without finding the named cell. The cells' shapes and colours come
from easy_vqa.describe_image (the images' own questions, pixels where they
fall short). Everything is drawn from numpy.random.default_rng([split index,
mosaic index]), so a build is deterministic and each mosaic independent of
the others.

Build another grid or size with `Mm1EasyVqaMosaic(data_dir=..., grid=4,
num_mosaics={"train": 100, "test": 20})`, into a data_dir of its own: the
prepared directory is named by the builder and version only.
"""

from __future__ import annotations

import io
from typing import Iterator, Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from mm1_jax.data.sources import easy_vqa

GRID = 3
CELL_SIZE = easy_vqa.IMAGE_SIZE  # Cells hold the easy-vqa images at their full 64 px.
NUM_MOSAICS = {"train": 3000, "test": 500}
QUESTIONS_PER_MOSAIC = 4
# The split's position seeds its mosaics, so train and test never share a stream.
SPLITS = ("train", "test")
QUESTION_KINDS = ("color", "shape", "yes_no")

_ROW_NAMES = ("top", "middle", "bottom")
_COLUMN_NAMES = ("left", "middle", "right")


def cell_name(cell: int, grid: int = GRID) -> str:
  """'top right', 'center', ... for a 3 x 3 grid, else 'row 2, column 4' (1-based).

  `cell` is the row-major index, 0 <= cell < grid * grid.
  """
  if not 0 <= cell < grid * grid:
    raise ValueError(f"cell {cell} is outside a {grid} x {grid} grid.")
  row, column = divmod(cell, grid)
  if grid != 3:
    return f"row {row + 1}, column {column + 1}"
  if (row, column) == (1, 1):
    return "center"  # Not "middle middle".
  return f"{_ROW_NAMES[row]} {_COLUMN_NAMES[column]}"


def cell_phrase(cell: int, grid: int = GRID) -> str:
  """How questions name a cell: 'the top right cell', 'the cell at row 2, column 4'."""
  name = cell_name(cell, grid)
  return f"the {name} cell" if grid == 3 else f"the cell at {name}"


def mosaic_caption(shapes: Sequence[str], colors: Sequence[str], grid: int = GRID) -> str:
  """'top left: a red circle; ...; bottom right: a gray rectangle' (row-major cells)."""
  return "; ".join(f"{cell_name(cell, grid)}: {easy_vqa.caption(shape, color)}"
                   for cell, (shape, color) in enumerate(zip(shapes, colors)))


def question_kind(ordinal: int) -> str:
  """Kind of a split's question number `ordinal`: the kinds take turns."""
  return QUESTION_KINDS[ordinal % len(QUESTION_KINDS)]


def yes_no_answer(ordinal: int) -> str:
  """Answer of question `ordinal` (a yes/no one): 'yes' and 'no' take turns."""
  return ("yes", "no")[(ordinal // len(QUESTION_KINDS)) % 2]


def make_questions(shapes: Sequence[str], colors: Sequence[str], cells: Sequence[int],
                   first_ordinal: int, rng: np.random.Generator,
                   grid: int = GRID) -> list[dict]:
  """[{question, answer, cell}] about `cells`, the i-th the split's question first_ordinal + i.

  shapes / colors: [grid * grid] the cells' attributes, row-major. A "no"
  question names a shape absent from its cell, preferably one another cell
  shows.
  """
  questions = []
  for offset, cell in enumerate(cells):
    ordinal = first_ordinal + offset
    phrase = cell_phrase(cell, grid)
    kind = question_kind(ordinal)
    if kind == "color":
      question, answer = f"what color is the shape in {phrase}?", colors[cell]
    elif kind == "shape":
      question, answer = f"what shape is in {phrase}?", shapes[cell]
    else:
      answer = yes_no_answer(ordinal)
      if answer == "yes":
        named = shapes[cell]
      else:
        absent = [s for s in easy_vqa.SHAPES if s != shapes[cell]]
        elsewhere = [s for s in absent if s in shapes]
        named = str(rng.choice(elsewhere or absent))
      question = f"is there a {named} in {phrase}?"
    questions.append({"question": question, "answer": answer, "cell": int(cell)})
  return questions


def tile(cells: np.ndarray, grid: int) -> np.ndarray:
  """uint8 [grid * H, grid * W, 3] from [grid * grid, H, W, 3] cells in row-major order."""
  count, height, width, channels = cells.shape
  if count != grid * grid:
    raise ValueError(f"a {grid} x {grid} mosaic takes {grid * grid} cells, got {count}.")
  return (cells.reshape(grid, grid, height, width, channels).transpose(0, 2, 1, 3, 4)
          .reshape(grid * height, grid * width, channels))


def encode_png(image: np.ndarray) -> bytes:
  """PNG bytes of uint8 [H, W, 3] (Pillow's defaults: lossless, deterministic)."""
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="png")
  return buffer.getvalue()


class _SplitImages:
  """One easy-vqa split in memory: ids, pixels, shapes and colours (~1 s for train)."""

  def __init__(self, split: str):
    self.ids = easy_vqa.image_ids(split)
    questions = easy_vqa.read_questions(split)
    pixels, shapes, colors = [], [], []
    for image_id in self.ids:
      with open(easy_vqa.image_path(split, image_id), "rb") as f:
        png = f.read()
      pixels.append(easy_vqa.decode_png(png))
      described = easy_vqa.describe_image(png, questions.get(image_id, []))
      shapes.append(described["shape"])
      colors.append(described["color"])
    self.pixels = np.stack(pixels)  # uint8 [num_images, 64, 64, 3]
    self.shapes, self.colors = shapes, colors


class Mm1EasyVqaMosaic(tfds.core.GeneratorBasedBuilder):
  """Mosaics of distinct easy-vqa images with per-cell questions and a full caption."""

  name = "mm1_easy_vqa_mosaic"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {
      "1.0.0": "3 x 3 mosaics of easy-vqa 1.0 images (3,000 train, 500 test), "
               "4 questions per mosaic about named cells, row-major captions.",
  }

  def __init__(self, *, grid: int = GRID, num_mosaics: Mapping[str, int] | None = None,
               **kwargs):
    """grid: cells per side; num_mosaics: split -> count (default NUM_MOSAICS)."""
    num_mosaics = dict(NUM_MOSAICS if num_mosaics is None else num_mosaics)
    if grid < 2:
      raise ValueError(f"a mosaic needs grid >= 2 cells per side, got {grid}.")
    if QUESTIONS_PER_MOSAIC > grid * grid:
      raise ValueError(f"{QUESTIONS_PER_MOSAIC} questions about distinct cells need "
                       f"grid >= {int(np.ceil(np.sqrt(QUESTIONS_PER_MOSAIC)))}, got {grid}.")
    if set(num_mosaics) != set(SPLITS) or min(num_mosaics.values()) < 1:
      raise ValueError(f"num_mosaics must give a positive count for each of {SPLITS}, "
                       f"got {num_mosaics}.")
    # Set before the base class, which may already read _info().
    self.grid, self.num_mosaics = grid, num_mosaics
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    size = self.grid * CELL_SIZE
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(size, size, 3), encoding_format="png"),
            "mosaic_id": tfds.features.Scalar(np.int64),
            "grid": tfds.features.Scalar(np.int64),
            "image_ids": tfds.features.Sequence(tfds.features.Scalar(np.int64)),
            "cell_shapes": tfds.features.Sequence(tfds.features.Text()),
            "cell_colors": tfds.features.Sequence(tfds.features.Text()),
            "caption": tfds.features.Text(),
            "questions": tfds.features.Sequence({
                "question": tfds.features.Text(),
                "answer": tfds.features.Text(),
                "cell": tfds.features.Scalar(np.int64),
            }),
        }),
        homepage="https://github.com/vzhou842/easy-VQA",
        license="MIT",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Everything is in the installed easy-vqa package.
    return {split: self._generate_examples(split) for split in SPLITS}

  def _generate_examples(self, split: str) -> Iterator[tuple[int, dict]]:
    images = _SplitImages(split)
    cells_per_mosaic = self.grid * self.grid
    if cells_per_mosaic > len(images.ids):
      raise ValueError(f"a {self.grid} x {self.grid} mosaic needs {cells_per_mosaic} distinct "
                       f"images; easy-vqa's {split} split has {len(images.ids)}.")
    for mosaic_id in range(self.num_mosaics[split]):
      rng = np.random.default_rng([SPLITS.index(split), mosaic_id])
      picks = rng.choice(len(images.ids), size=cells_per_mosaic, replace=False)
      shapes = [images.shapes[i] for i in picks]
      colors = [images.colors[i] for i in picks]
      asked = rng.choice(cells_per_mosaic, size=QUESTIONS_PER_MOSAIC, replace=False)
      yield mosaic_id, {
          "image": encode_png(tile(images.pixels[picks], self.grid)),
          "mosaic_id": mosaic_id,
          "grid": self.grid,
          "image_ids": [images.ids[i] for i in picks],
          "cell_shapes": shapes,
          "cell_colors": colors,
          "caption": mosaic_caption(shapes, colors, self.grid),
          "questions": make_questions(shapes, colors, asked,
                                      mosaic_id * QUESTIONS_PER_MOSAIC, rng, self.grid),
      }


BUILDER = Mm1EasyVqaMosaic
