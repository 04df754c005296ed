"""mm1_emoji and its tasks: counts against emoji.json, split by base emoji, names, pixels."""

import collections
import hashlib
import io
import itertools
import json
import re
import tarfile

import numpy as np
import pytest
import seqio
import tensorflow_datasets as tfds
from PIL import Image

from mm1_jax.data import images, sources, tasks, tokenizer
from mm1_jax.data.sources import emoji
from mm1_jax.evaluation import evaluator, fewshot

PNG_DIR = "package/img/google/64/"
WHITE = (255, 255, 255)


@pytest.fixture(scope="module")
def package():
  """emoji.json and {file name: PNG bytes} of the 64 px Google images, read here directly."""
  entries, pngs = None, {}
  with tarfile.open(emoji.tarball_path(), "r:gz") as archive:
    for member in archive:
      if member.name == "package/emoji.json":
        entries = json.load(archive.extractfile(member))
      elif member.name.startswith(PNG_DIR) and member.isfile():
        pngs[member.name[len(PNG_DIR):]] = archive.extractfile(member).read()
  return entries, pngs


@pytest.fixture(scope="module")
def full():
  """split -> [record] of the dataset in the default data dir (the one the tasks read).

  Built once (~3 s) if `python -m mm1_jax.data.sources` has not already.
  """
  builder = sources.prepare("mm1_emoji")
  result = {}
  for split in emoji.SPLITS:
    dataset = builder.as_dataset(split=split, shuffle_files=False,
                                 decoders={"image": tfds.decode.SkipDecoding()})
    records = []
    for ex in dataset.as_numpy_iterator():
      records.append({
          "png": bytes(ex["image"]), "image_id": int(ex["image_id"]),
          **{key: ex[key].decode() for key in ("unified", "base_unified", "name", "caption",
                                               "category", "subcategory")},
          "questions": list(zip([q.decode() for q in ex["questions"]["question"]],
                                [a.decode() for a in ex["questions"]["answer"]]))})
    result[split] = records
  return result


def by_name(full, name):
  matches = [r for records in full.values() for r in records if r["name"] == name]
  assert len(matches) == 1, (name, len(matches))
  return matches[0]


def expected_split(base_unified):
  """The documented rule, written out: SHA-256 of the base's code points, 0 mod 5 is test."""
  digest = hashlib.sha256(base_unified.encode()).digest()
  return "test" if int.from_bytes(digest[:8], "big") % 5 == 0 else "train"


def test_counts_match_emoji_json(package, full):
  entries, pngs = package
  assert len(entries) == 1911 and len(pngs) == 3786
  # Every emoji and variant has a Google image in 16.0.0, so none is dropped.
  assert all(e["has_img_google"] for e in entries)
  variants = [(e, v) for e in entries for v in (e.get("skin_variations") or {}).values()]
  assert all(v["has_img_google"] for _, v in variants)
  images_of = {e["unified"]: e["image"] for e in entries}
  images_of.update({v["unified"]: v["image"] for _, v in variants})
  assert len(images_of) == len(entries) + len(variants) == len(pngs)
  records = full["train"] + full["test"]
  assert len(records) == len(pngs)
  assert sorted(r["image_id"] for r in records) == list(range(len(pngs)))
  for record in records:
    assert record["png"] == pngs[images_of[record["unified"]]]
  assert sum(r["unified"] == r["base_unified"] for r in records) == len(entries)
  # Train/test sizes from the rule, applied to emoji.json's emoji and their variants.
  expected = collections.Counter()
  for entry in entries:
    expected[expected_split(entry["unified"])] += 1 + len(entry.get("skin_variations") or {})
  assert {split: len(records) for split, records in full.items()} == dict(expected) == \
      {"train": 2925, "test": 861}
  assert emoji.catalogue(entries, frozenset(pngs))[1] == 0


def test_no_base_emoji_straddles_the_split(package, full):
  entries, _ = package
  bases = {split: {r["base_unified"] for r in records} for split, records in full.items()}
  assert not bases["train"] & bases["test"]
  assert {split: len(b) for split, b in bases.items()} == {"train": 1505, "test": 406}
  for split, records in full.items():
    assert all(expected_split(r["base_unified"]) == split for r in records)
  # Each variant points at its own base emoji, and carries its category.
  base_of = {v["unified"]: e for e in entries for v in (e.get("skin_variations") or {}).values()}
  base_of.update({e["unified"]: e for e in entries})
  for record in full["train"] + full["test"]:
    entry = base_of[record["unified"]]
    assert record["base_unified"] == entry["unified"]
    assert (record["category"], record["subcategory"]) == (entry["category"],
                                                           entry["subcategory"])


def test_names_categories_and_questions_of_known_emoji(full):
  known = {
      # name: (unified, category, subcategory)
      "grinning face": ("1F600", "Smileys & Emotion", "face-smiling"),
      "waving hand sign": ("1F44B", "People & Body", "hand-fingers-open"),
      "waving hand sign: medium skin tone": ("1F44B-1F3FD", "People & Body",
                                             "hand-fingers-open"),
      "people holding hands: light skin tone, dark skin tone": (
          "1F9D1-1F3FB-200D-1F91D-200D-1F9D1-1F3FF", "People & Body", "family"),
      "sark flag": ("1F1E8-1F1F6", "Flags", "country-flag"),
      "emoji modifier fitzpatrick type-3": ("1F3FC", "Component", "skin-tone"),
  }
  for name, (unified, category, subcategory) in known.items():
    record = by_name(full, name)
    assert (record["unified"], record["category"], record["subcategory"]) == \
        (unified, category, subcategory), name
    assert record["caption"] == name
    assert record["questions"] == [("what category is this emoji?", category.lower()),
                                   ("what subcategory is this emoji?", subcategory)]
  # Two tones the same: named once, after the base name's own colon with a comma.
  assert by_name(full, "kiss: man, man, light skin tone")["base_unified"] == \
      "1F468-200D-2764-FE0F-200D-1F48B-200D-1F468"
  records = full["train"] + full["test"]
  assert all(r["name"] == r["name"].lower() for r in records)
  assert len({r["category"] for r in records}) == 10
  assert len({r["subcategory"] for r in records}) == 99


def test_skin_tone_names():
  assert emoji.variant_name("waving hand sign", "1F3FD") == "waving hand sign: medium skin tone"
  assert emoji.variant_name("kiss: man, man", "1F3FB-1F3FF") == \
      "kiss: man, man, light skin tone, dark skin tone"
  with pytest.raises(ValueError, match="unknown skin-tone modifier '1F600'"):
    emoji.skin_tone_name("1F3FB-1F600")


def test_emoji_without_a_google_image_are_dropped_with_their_variants():
  def entry(unified, sort_order, has_image, variants=()):
    return {"unified": unified, "name": unified, "image": unified.lower() + ".png",
            "category": "Objects", "subcategory": "tool", "sort_order": sort_order,
            "has_img_google": has_image,
            "skin_variations": {tone: {"unified": f"{unified}-{tone}", "has_img_google": ok,
                                       "image": f"{unified}-{tone}.png".lower()}
                                for tone, ok in variants}}

  entries = [entry("B", 2, True, [("1F3FB", True), ("1F3FC", False)]),
             entry("A", 1, False, [("1F3FB", True)]), entry("C", 0, True)]
  built, dropped = emoji.catalogue(entries, {"b.png", "b-1f3fb.png", "c.png"})
  assert [(i.image_id, i.unified, i.name) for i in built] == [
      (0, "C", "c"), (1, "B", "b"), (2, "B-1F3FB", "b: light skin tone")]
  assert dropped == 3  # A, A's variant, B's second variant.
  with pytest.raises(ValueError, match="no package/img/google/64/c.png in the tarball"):
    emoji.catalogue(entries, {"b.png", "b-1f3fb.png"})


def test_pngs_decode_to_64_px(full):
  builder = sources.prepare("mm1_emoji")
  decoded = next(builder.as_dataset(split="test", shuffle_files=False).as_numpy_iterator())
  assert decoded["image"].shape == (64, 64, 4) and decoded["image"].dtype == np.uint8
  # One image of each PNG kind in the set: RGBA, grey + alpha, palette with transparency.
  by_mode = {}
  for record in full["train"] + full["test"]:
    by_mode.setdefault(Image.open(io.BytesIO(record["png"])).mode, record)
  assert set(by_mode) == {"RGBA", "LA", "P"}
  for mode, record in by_mode.items():
    pixels = images.decode(record["png"])
    assert pixels.shape == (64, 64, 3), mode
    # The corner is transparent: the pipeline composites it over white.
    assert tuple(pixels[0, 0]) == WHITE, (mode, record["name"])


def first(task, split, count):
  dataset = seqio.get_mixture_or_task(task).get_dataset(None, split=split, shuffle=False)
  return list(itertools.islice(dataset.as_numpy_iterator(), count))


@pytest.mark.parametrize("split", emoji.SPLITS)
def test_tasks_give_one_marker_per_image(full, split):
  vocabulary = tasks.VOCABULARY
  marker = tokenizer.special_token_ids(vocabulary)[tasks.IMAGE_MARKER]
  by_png = {record["png"]: record for record in full[split]}
  captions, vqa = first("emoji_caption", split, 10), first("emoji_vqa", split, 20)
  documents = first("emoji_interleaved", split, 20)
  for example in captions + vqa:
    assert example["images"].shape == (1,)
    assert np.count_nonzero(example["inputs"] == marker) == 1
    assert np.count_nonzero(example["targets"] == marker) == 0
    assert example["targets"][-1] == vocabulary.eos_id
  for example in captions:
    record = by_png[bytes(example["images"][0])]
    assert vocabulary.decode(example["inputs"].tolist()) == "<image>"
    assert vocabulary.decode(example["targets"].tolist()) == record["name"] + "."
  for example in vqa:
    record = by_png[bytes(example["images"][0])]
    prompt = vocabulary.decode(example["inputs"].tolist())
    question = re.fullmatch(r"<image> Question: (.+) Answer:", prompt)[1]
    answer = vocabulary.decode(example["targets"].tolist())
    assert answer[0] == " " and (question, answer[1:]) in record["questions"]
    assert [a.decode() for a in example["answers"]] == [answer[1:]]
  sizes = collections.Counter()
  for example in documents:
    count = len(example["images"])
    sizes[count] += 1
    assert 1 <= count <= tasks.MAX_DOC_IMAGES
    assert np.count_nonzero(example["targets"] == marker) == count
    assert example["inputs"].size == 0
    text = vocabulary.decode(example["targets"].tolist())
    # Each image's name is in the text before its marker.
    segments = text.split("<image>")
    for index, png in enumerate(example["images"]):
      assert by_png[bytes(png)]["name"] in segments[index], text
  assert len(sizes) > 1


def test_mixtures_sources_and_evaluation_kinds(full):
  del full  # Prepared in the default data dir.
  assert tasks.MIXTURES["emoji_pretrain"] == {"emoji_interleaved": 45, "emoji_caption": 45,
                                              "shakespeare_text": 10}
  assert tasks.MIXTURES["emoji_sft"] == {"emoji_vqa": 1}
  mixture = seqio.get_mixture_or_task("emoji_pretrain")
  assert {task.name: mixture.get_rate(task) for task in mixture.tasks} == \
      tasks.MIXTURES["emoji_pretrain"]
  assert {"emoji_caption", "emoji_vqa", "emoji_interleaved"} <= set(tasks.TASKS)
  assert tasks.required_sources("emoji_pretrain") == {"mm1_emoji", "mm1_shakespeare"}
  for name in ("emoji_sft", "emoji_vqa", "emoji_caption", "emoji_interleaved"):
    assert tasks.required_sources(name) == {"mm1_emoji"}
    assert tasks.has_images(name)
  evaluator.check_tasks(["emoji_vqa", "emoji_caption"], [0])
  for name, kind in (("emoji_vqa", "vqa"), ("emoji_caption", "caption")):
    query = fewshot.load_task_examples(name, "test", max_examples=1)[0]
    assert fewshot.infer_kind(query, tasks.VOCABULARY,
                              fewshot.has_answers_feature(name, "test")) == kind


def test_question_prior_is_the_train_category_prior(full):
  # Most frequent train answer per question, scored on test, counted here from the records.
  scores = []
  for question in ("what category is this emoji?", "what subcategory is this emoji?"):
    train = collections.Counter(dict(r["questions"])[question] for r in full["train"])
    guess = min(train, key=lambda answer: (-train[answer], answer))
    scores += [dict(r["questions"])[question] == guess for r in full["test"]]
  prior = fewshot.question_prior_baseline("emoji_vqa")
  assert prior["vqa_accuracy"] == pytest.approx(np.mean(scores))


def test_missing_tarball_says_to_run_make_setup(monkeypatch, tmp_path):
  missing = tmp_path / "nowhere.tgz"
  monkeypatch.setenv(emoji.TARBALL_ENV, str(missing))
  with pytest.raises(FileNotFoundError, match=re.escape(f"the emoji tarball {missing} is "
                                                        "missing: run `make setup`")):
    sources.prepare("mm1_emoji", str(tmp_path / "tfds"))
  monkeypatch.delenv(emoji.TARBALL_ENV)
  assert emoji.tarball_path() == emoji.default_tarball()
