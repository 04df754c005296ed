"""mm1_easy_vqa_mosaic and its tasks: true pixels, true answers, split hygiene, balance."""

import collections
import io
import itertools
import re

import numpy as np
import pytest
import seqio
import tensorflow_datasets as tfds
from PIL import Image

from mm1_jax.data import sources, tasks, tokenizer
from mm1_jax.data.sources import easy_vqa, easy_vqa_mosaic
from mm1_jax.evaluation import evaluator, fewshot

# Row-major cell names of a 3 x 3 mosaic, written out rather than derived.
NAMES = ("top left", "top middle", "top right", "middle left", "center", "middle right",
         "bottom left", "bottom middle", "bottom right")
COLOR_QUESTION = re.compile(r"^what color is the shape in the (.+) cell\?$")
SHAPE_QUESTION = re.compile(r"^what shape is in the (.+) cell\?$")
YES_NO_QUESTION = re.compile(r"^is there a (circle|rectangle|triangle) in the (.+) cell\?$")
SMALL = {"train": 30, "test": 20}


def build(data_dir, **kwargs):
  """A mosaic builder prepared into data_dir, as sources.prepare does."""
  builder = easy_vqa_mosaic.Mm1EasyVqaMosaic(data_dir=str(data_dir), **kwargs)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      try_download_gcs=False, compute_stats=tfds.download.ComputeStatsMode.SKIP))
  return builder


def read(builder, split):
  """The split's records sorted by mosaic_id, PNG bytes kept, strings decoded."""
  dataset = builder.as_dataset(split=split, shuffle_files=False,
                               decoders={"image": tfds.decode.SkipDecoding()})
  records = []
  for ex in dataset.as_numpy_iterator():
    questions = ex["questions"]
    records.append({
        "png": bytes(ex["image"]), "mosaic_id": int(ex["mosaic_id"]), "grid": int(ex["grid"]),
        "image_ids": ex["image_ids"].tolist(),
        "shapes": [s.decode() for s in ex["cell_shapes"]],
        "colors": [c.decode() for c in ex["cell_colors"]],
        "caption": ex["caption"].decode(),
        "questions": list(zip([q.decode() for q in questions["question"]],
                              [a.decode() for a in questions["answer"]],
                              questions["cell"].tolist()))})
  return sorted(records, key=lambda r: r["mosaic_id"])


def pixels(png):
  return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


@pytest.fixture(scope="module")
def full():
  """The default-size dataset in the default data dir (the one the tasks read): ~15 s once."""
  builder = sources.prepare("mm1_easy_vqa_mosaic")
  return {split: read(builder, split) for split in easy_vqa_mosaic.SPLITS}


@pytest.fixture(scope="module")
def small_build(tmp_path_factory):
  """A second, independent build with fewer mosaics (~5 s)."""
  builder = build(tmp_path_factory.mktemp("small"), num_mosaics=SMALL)
  return {split: read(builder, split) for split in easy_vqa_mosaic.SPLITS}


@pytest.fixture(scope="module")
def source_images():
  """split -> {image_id: (uint8 [64, 64, 3], shape, color)} straight from the package."""
  result = {}
  for split in easy_vqa_mosaic.SPLITS:
    questions = easy_vqa.read_questions(split)
    result[split] = {}
    for image_id in easy_vqa.image_ids(split):
      with open(easy_vqa.image_path(split, image_id), "rb") as f:
        png = f.read()
      described = easy_vqa.describe_image(png, questions.get(image_id, []))
      result[split][image_id] = (easy_vqa.decode_png(png), described["shape"],
                                 described["color"])
  return result


def test_sizes_and_features(full):
  assert {split: len(records) for split, records in full.items()} == \
      easy_vqa_mosaic.NUM_MOSAICS == {"train": 3000, "test": 500}
  for records in full.values():
    assert [r["mosaic_id"] for r in records] == list(range(len(records)))
    assert all(r["grid"] == 3 and len(r["questions"]) == 4 for r in records)


@pytest.mark.parametrize("split", easy_vqa_mosaic.SPLITS)
def test_cells_are_distinct_images_of_their_own_split_at_full_resolution(
    full, source_images, split):
  own = source_images[split]
  other = source_images["train" if split == "test" else "test"]
  # easy-vqa's 5,000 images are pixel-distinct, within and across splits.
  other_pixels = {image.tobytes() for image, _, _ in other.values()}
  for record in full[split]:
    mosaic = pixels(record["png"])
    assert mosaic.shape == (192, 192, 3)
    assert len(set(record["image_ids"])) == 9
    for cell, image_id in enumerate(record["image_ids"]):
      row, column = divmod(cell, 3)
      crop = mosaic[64 * row:64 * (row + 1), 64 * column:64 * (column + 1)]
      np.testing.assert_array_equal(crop, own[image_id][0])
      assert crop.tobytes() not in other_pixels


@pytest.mark.parametrize("split", easy_vqa_mosaic.SPLITS)
def test_attributes_captions_and_answers_are_true_to_the_cells(full, source_images, split):
  for record in full[split]:
    truth = [source_images[split][image_id][1:] for image_id in record["image_ids"]]
    assert list(zip(record["shapes"], record["colors"])) == truth
    assert record["caption"] == "; ".join(
        f"{name}: a {color} {shape}" for name, (shape, color) in zip(NAMES, truth))
    cells = [cell for _, _, cell in record["questions"]]
    assert len(set(cells)) == len(cells)
    for question, answer, cell in record["questions"]:
      shape, color = truth[cell]
      if match := COLOR_QUESTION.match(question):
        assert (match[1], answer) == (NAMES[cell], color)
      elif match := SHAPE_QUESTION.match(question):
        assert (match[1], answer) == (NAMES[cell], shape)
      else:
        match = YES_NO_QUESTION.match(question)
        assert match and match[2] == NAMES[cell], question
        assert answer == ("yes" if match[1] == shape else "no")
        if answer == "no" and match[1] not in record["shapes"]:
          # Named shapes are found elsewhere in the mosaic whenever one can be.
          assert set(record["shapes"]) == {shape}


@pytest.mark.parametrize("split", easy_vqa_mosaic.SPLITS)
def test_question_kinds_and_yes_no_answers_are_balanced(full, split):
  kinds, yes_no = collections.Counter(), collections.Counter()
  for record in full[split]:
    for question, answer, _ in record["questions"]:
      kind = ("color" if COLOR_QUESTION.match(question) else
              "shape" if SHAPE_QUESTION.match(question) else "yes_no")
      kinds[kind] += 1
      if kind == "yes_no":
        yes_no[answer] += 1
  total = sum(kinds.values())
  assert max(kinds.values()) - min(kinds.values()) <= 1 and total == 4 * len(full[split])
  assert set(yes_no) == {"yes", "no"} and abs(yes_no["yes"] - yes_no["no"]) <= 1
  # The shape asked about in "no" questions is present elsewhere: yes/no answers
  # cannot be read off the mosaic without locating the cell.
  shown_elsewhere = sum(
      YES_NO_QUESTION.match(q)[1] in record["shapes"]
      for record in full[split] for q, a, _ in record["questions"] if a == "no")
  assert shown_elsewhere / yes_no["no"] > 0.95


def test_builds_are_deterministic_and_a_mosaic_depends_only_on_its_split_and_index(
    small_build, full):
  assert {split: len(records) for split, records in small_build.items()} == SMALL
  for split, records in small_build.items():
    # Every feature of the first mosaics equal, PNG bytes included.
    assert records == full[split][:len(records)]


def test_other_grid_sizes_build_and_name_cells_by_row_and_column(tmp_path):
  records = read(build(tmp_path, grid=2, num_mosaics={"train": 2, "test": 3}), "test")
  assert len(records) == 3
  for record in records:
    assert pixels(record["png"]).shape == (128, 128, 3) and len(set(record["image_ids"])) == 4
    assert record["caption"].startswith(f"row 1, column 1: a {record['colors'][0]} "
                                        f"{record['shapes'][0]}; row 1, column 2: ")
    for question, _, cell in record["questions"]:
      assert f"the cell at row {cell // 2 + 1}, column {cell % 2 + 1}?" in question
  assert easy_vqa_mosaic.cell_name(4) == "center"
  assert easy_vqa_mosaic.cell_name(7, grid=4) == "row 2, column 4"
  with pytest.raises(ValueError, match="outside a 3 x 3 grid"):
    easy_vqa_mosaic.cell_name(9)


def test_bad_builder_arguments_are_refused(tmp_path):
  with pytest.raises(ValueError, match="grid >= 2"):
    easy_vqa_mosaic.Mm1EasyVqaMosaic(data_dir=str(tmp_path), grid=1)
  with pytest.raises(ValueError, match="num_mosaics"):
    easy_vqa_mosaic.Mm1EasyVqaMosaic(data_dir=str(tmp_path), num_mosaics={"train": 5})


def first(task, split, count):
  dataset = seqio.get_mixture_or_task(task).get_dataset(None, split=split, shuffle=False)
  return list(itertools.islice(dataset.as_numpy_iterator(), count))


@pytest.mark.parametrize("split", ("train", "test"))
def test_tasks_give_one_mosaic_and_one_marker_per_example(full, split):
  vocabulary = tasks.VOCABULARY
  marker = tokenizer.special_token_ids(vocabulary)[tasks.IMAGE_MARKER]
  by_png = {record["png"]: record for record in full[split]}
  vqa = first("easy_vqa_mosaic_vqa", split, 40)
  captions = first("easy_vqa_mosaic_caption", split, 10)
  for example in vqa + captions:
    assert example["images"].shape == (1,)
    assert pixels(bytes(example["images"][0])).shape == (192, 192, 3)
    assert np.count_nonzero(example["inputs"] == marker) == 1
    assert np.count_nonzero(example["targets"] == marker) == 0
    assert example["targets"][-1] == vocabulary.eos_id
  for example in vqa:
    record = by_png[bytes(example["images"][0])]
    prompt = vocabulary.decode(example["inputs"].tolist())
    target = vocabulary.decode(example["targets"].tolist())
    question = re.fullmatch(r"<image> Question: (.+) Answer:", prompt)[1]
    assert (question, target.strip()) in {(q, a) for q, a, _ in record["questions"]}
    assert target == " " + target.strip() and [a.decode() for a in example["answers"]] == \
        [target.strip()]
  for example in captions:
    record = by_png[bytes(example["images"][0])]
    assert vocabulary.decode(example["inputs"].tolist()) == "<image>"
    assert vocabulary.decode(example["targets"].tolist()) == record["caption"] + "."


def test_mixture_sources_and_evaluation_kinds(full):
  del full  # Prepared in the default data dir.
  mixture = seqio.get_mixture_or_task("easy_vqa_mosaic_sft")
  assert {task.name: mixture.get_rate(task) for task in mixture.tasks} == \
      {"easy_vqa_mosaic_vqa": 80, "easy_vqa_mosaic_caption": 20}
  assert tasks.MIXTURES["easy_vqa_mosaic_sft"] == {"easy_vqa_mosaic_vqa": 80,
                                                    "easy_vqa_mosaic_caption": 20}
  assert {"easy_vqa_mosaic_vqa", "easy_vqa_mosaic_caption"} <= set(tasks.TASKS)
  for name in ("easy_vqa_mosaic_sft", "easy_vqa_mosaic_vqa", "easy_vqa_mosaic_caption"):
    assert tasks.required_sources(name) == {"mm1_easy_vqa_mosaic"}
    assert tasks.has_images(name)
  evaluator.check_tasks(["easy_vqa_mosaic_vqa", "easy_vqa_mosaic_caption"], [0])
  for name, kind in (("easy_vqa_mosaic_vqa", "vqa"), ("easy_vqa_mosaic_caption", "caption")):
    query = fewshot.load_task_examples(name, "test", max_examples=1)[0]
    assert fewshot.infer_kind(query, tasks.VOCABULARY,
                              fewshot.has_answers_feature(name, "test")) == kind
