"""TFDS sources over bundled package files: sizes, features, derived labels, caching."""

import os
import time

import numpy as np
import pytest
from PIL import Image, ImageDraw

from mm1_jax.data import sources
from mm1_jax.data.sources import chatterbot, easy_vqa, shakespeare


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="session")
def easy_vqa_builder(data_dir):
  return sources.prepare("mm1_easy_vqa", data_dir)  # ~5 s for all 5,000 images.


@pytest.fixture(scope="session")
def shakespeare_builder(data_dir):
  return sources.prepare("mm1_shakespeare", data_dir)  # ~2 s.


@pytest.fixture(scope="session")
def chatterbot_builder(data_dir):
  return sources.prepare("mm1_chatterbot", data_dir)  # ~1 s.


def _examples(builder, split):
  return list(builder.as_dataset(split=split, shuffle_files=False).as_numpy_iterator())


def _text(value) -> str:
  return value.decode("utf-8")


def test_default_data_dir_follows_the_environment(monkeypatch):
  monkeypatch.setenv("MM1_DATA_DIR", "/somewhere/tfds")
  assert sources.default_data_dir() == "/somewhere/tfds"
  monkeypatch.delenv("MM1_DATA_DIR")
  assert sources.default_data_dir() == os.path.expanduser("~/.cache/mm1_jax/tfds")


def test_unknown_source_is_refused(tmp_path):
  with pytest.raises(ValueError, match="mm1_easy_vqa"):
    sources.prepare("coco", str(tmp_path))


def test_easy_vqa_splits_and_features(easy_vqa_builder):
  splits = easy_vqa_builder.info.splits
  assert (splits["train"].num_examples, splits["test"].num_examples) == (4000, 1000)
  assert set(easy_vqa_builder.info.features) == {
      "image", "image_id", "shape", "color", "caption", "questions"}
  example = next(easy_vqa_builder.as_dataset(split="train").take(1).as_numpy_iterator())
  assert example["image"].shape == (64, 64, 3) and example["image"].dtype == np.uint8
  shape, color = _text(example["shape"]), _text(example["color"])
  assert shape in easy_vqa.SHAPES and color in easy_vqa.COLORS
  assert _text(example["caption"]) == f"a {color} {shape}"
  assert len(example["questions"]["question"]) == len(example["questions"]["answer"]) > 0


def test_easy_vqa_stores_the_package_pngs(easy_vqa_builder):
  example = next(easy_vqa_builder.as_dataset(split="test").take(1).as_numpy_iterator())
  path = easy_vqa.image_path("test", int(example["image_id"]))
  np.testing.assert_array_equal(example["image"], np.asarray(Image.open(path).convert("RGB")))


def test_easy_vqa_captions_agree_with_pixels(easy_vqa_builder):
  examples = _examples(easy_vqa_builder, "test")  # All 1,000 test images.
  agree = question_checked = question_contradictions = 0
  for example in examples:
    pixels = easy_vqa.attributes_from_pixels(example["image"])
    agree += pixels == (_text(example["shape"]), _text(example["color"]))
    pairs = zip(map(_text, example["questions"]["question"]),
                map(_text, example["questions"]["answer"]))
    for said, seen in zip(easy_vqa.attributes_from_questions(list(pairs)), pixels):
      if said is not None:
        question_checked += 1
        question_contradictions += said != seen
  rate = agree / len(examples)
  print(f"caption/pixel agreement {rate:.4f} over {len(examples)} images; question/pixel "
        f"contradictions {question_contradictions} of {question_checked} attributes")
  assert len(examples) >= 200 and rate >= 0.97
  assert question_checked > 1500 and question_contradictions == 0


def test_attributes_from_questions():
  read = easy_vqa.attributes_from_questions
  assert read([("what is the blue shape?", "rectangle")]) == ("rectangle", "blue")
  assert read([("what color is the shape?", "teal")]) == (None, "teal")
  assert read([("what is the color of the triangle?", "gray")]) == ("triangle", "gray")
  assert read([("what shape does the image contain?", "circle")]) == ("circle", None)
  assert read([("is there a red shape?", "yes"),
               ("does the image contain a circle?", "yes")]) == ("circle", "red")
  assert read([("is there not a circle?", "no")]) == ("circle", None)
  assert read([("is no yellow shape present?", "no")]) == (None, "yellow")
  # Ruling out two of the three shapes leaves the third.
  assert read([("is there a circle?", "no"), ("is no triangle present?", "yes")]) == (
      "rectangle", None)
  assert read([("is there a circle?", "no")]) == (None, None)
  with pytest.raises(ValueError, match="contradict"):
    read([("what shape is present?", "circle"), ("is there a circle?", "no")])
  with pytest.raises(ValueError, match="unrecognised"):
    read([("how many shapes are there?", "2")])


@pytest.mark.parametrize("shape, color", [("circle", "red"), ("rectangle", "teal"),
                                          ("triangle", "yellow"), ("circle", "black"),
                                          ("rectangle", "brown"), ("triangle", "gray")])
def test_attributes_from_pixels_on_drawn_shapes(shape, color):
  image = Image.new("RGB", (64, 64), (236, 242, 250))
  draw = ImageDraw.Draw(image)
  fill = easy_vqa.PALETTE[color]
  if shape == "circle":
    draw.ellipse((10, 14, 40, 44), fill=fill)
  elif shape == "rectangle":
    draw.rectangle((30, 40, 63, 63), fill=fill)  # Touching the border.
  else:
    draw.polygon([(32, 8), (8, 50), (56, 50)], fill=fill)
  assert easy_vqa.attributes_from_pixels(np.asarray(image)) == (shape, color)


def test_shakespeare_passages(shakespeare_builder):
  splits = {split: _examples(shakespeare_builder, split) for split in ("train", "validation")}
  plays = {split: {_text(e["play"]) for e in examples} for split, examples in splits.items()}
  assert len(plays["validation"]) == 2 and not plays["validation"] & plays["train"]
  assert len(plays["train"]) == 36
  for examples in splits.values():
    for example in examples:
      text = _text(example["text"])
      assert shakespeare.MIN_WORDS <= len(text.split()) <= shakespeare.MAX_WORDS, text
      assert not any(mark in text for mark in ("**", "_", "#", "\\", "  \n")), text


def test_shakespeare_validation_plays_are_held_out_whole():
  assert shakespeare.split_plays("validation") == sorted(shakespeare.VALIDATION_PLAYS)
  train = shakespeare.split_plays("train")
  assert len(train) == 36 and not set(train) & set(shakespeare.VALIDATION_PLAYS)


def test_shakespeare_cleans_markdown():
  markdown = ("# A Play\n\n## ACT I\n\n### SCENE I. A heath.\n\n_Enter a Witch,\nslowly_\n\n"
              "**First Witch**  \n_\\[Aside]_  \nWhen shall we  \nmeet again?\n")
  title, blocks = shakespeare.parse_play(markdown)
  assert title == "A Play"
  assert [b.render() for b in blocks] == [
      "ACT I", "SCENE I. A heath.", "Enter a Witch, slowly",
      "First Witch:\n[Aside]\nWhen shall we\nmeet again?"]


def test_shakespeare_splits_a_long_speech_between_lines():
  block = shakespeare.Block(tuple(f"line {i} has five words" for i in range(100)), "KING")
  passages = list(shakespeare.pack_passages([block]))
  assert len(passages) == 3
  assert all(p.startswith("KING:\n") for p in passages)
  assert all(60 <= len(p.split()) <= 200 for p in passages)


def test_chatterbot_dialogues(chatterbot_builder):
  splits = {split: _examples(chatterbot_builder, split) for split in ("train", "test")}
  assert len(splits["test"]) > 30 and len(splits["train"]) > 8 * len(splits["test"])
  assert set(chatterbot_builder.info.features) == {"utterances", "topic"}
  prompts = {}
  for split, examples in splits.items():
    for example in examples:
      utterances = [_text(u) for u in example["utterances"]]
      assert len(utterances) >= 2 and len(utterances) % 2 == 0 and all(utterances)
      prompts.setdefault(split, set()).add(utterances[0].lower())
  assert not prompts["train"] & prompts["test"]
  assert "tech_support" in {_text(e["topic"]) for e in splits["train"] + splits["test"]}


def test_chatterbot_reader_converts_or_skips_odd_values_and_counts(tmp_path):
  (tmp_path / "a.yml").write_text(
      "categories: [test]\n"
      "conversations:\n"
      "- - What year?\n"             # Unquoted number and yes: kept as written.
      "  - 1984\n"
      "- - Are you sure?\n"
      "  - yes\n"
      "  - Really?\n"                # No reply: this last utterance is dropped.
      "- - Only a question\n"        # No reply at all: skipped.
      "- A plain string entry\n"     # Not a list: skipped.
      "- - Nested\n"
      "  - [a, b]\n"                 # Not text: skipped.
      "- - Empty\n"
      "  -\n"                        # Empty: skipped.
      "- - Show me <image>\n"        # Would read as an image placeholder: skipped.
      "  - No.\n"
      "- - What year?\n"
      "  - 1984\n")                  # A repeat: skipped.
  (tmp_path / "b.yml").write_text("categories: [none]\n")  # No conversations.
  (tmp_path / "notes.txt").write_text("- - ignored\n  - too\n")
  kept, skipped = chatterbot.read_conversations(str(tmp_path))
  assert [(c.topic, c.index, c.utterances) for c in kept] == [
      ("a", 0, ("What year?", "1984")), ("a", 1, ("Are you sure?", "yes"))]
  assert skipped == {"last utterance without a reply (dropped)": 1, "no reply": 1,
                     "not a list": 1, "empty or non-text utterance": 2,
                     "repeat of an earlier conversation": 1, "image marker in the text": 1}
  assert chatterbot.utterance_text(3.5) == "3.5" and chatterbot.utterance_text(True) is None
  assert chatterbot.split_of(kept[0]) in ("train", "test")


def _files(directory):
  return {os.path.join(root, name): os.stat(os.path.join(root, name)).st_mtime_ns
          for root, _, names in os.walk(directory) for name in names}


def test_preparing_twice_reuses_the_cache(easy_vqa_builder, shakespeare_builder,
                                          chatterbot_builder, data_dir):
  before = _files(data_dir)
  start = time.perf_counter()
  for name in ("mm1_easy_vqa", "mm1_shakespeare", "mm1_chatterbot"):
    builder = sources.prepare(name, data_dir)
    assert builder.data_dir.endswith(os.path.join(name, "1.0.0"))
  assert time.perf_counter() - start < 2.0
  assert _files(data_dir) == before
