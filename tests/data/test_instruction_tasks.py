"""Bundled conversation tasks and mixtures: well-formed turns, answers true to the images."""

import itertools
import re

import pytest
import seqio
import tensorflow_datasets as tfds

from mm1_jax.data import conversations, instruction_tasks, sources, tasks
from mm1_jax.data.sources import chatterbot, easy_vqa

IMAGE_TASKS = ("easy_vqa_chat", "easy_vqa_chat_compare", "easy_vqa_caption_chat")
ALL_TASKS = IMAGE_TASKS + ("chatterbot_chat",)


@pytest.fixture(scope="module", autouse=True)
def prepared():
  for name in tasks.required_sources("visual_sft_text"):
    sources.prepare(name)  # Reused as is when already built.


def read(name, split="test", count=None):
  """Examples of task `name` in record order, strings decoded: roles/texts lists, images bytes."""
  dataset = seqio.get_mixture_or_task(name).get_dataset(None, split=split, shuffle=False)
  return [{"roles": [r.decode() for r in ex["roles"]], "texts": [t.decode() for t in ex["texts"]],
           "images": [bytes(i) for i in ex["images"]]}
          for ex in itertools.islice(dataset.as_numpy_iterator(), count)]


@pytest.fixture(scope="module")
def examples():
  return {name: read(name) for name in ALL_TASKS}


@pytest.fixture(scope="module")
def records():
  """The easy-vqa test records in stored order, as dicts with text fields decoded."""
  builder = tfds.builder("mm1_easy_vqa", data_dir=sources.default_data_dir())
  dataset = builder.as_dataset(split="test", shuffle_files=False,
                               decoders={"image": tfds.decode.SkipDecoding()})
  return [{"image": bytes(ex["image"]), "image_id": int(ex["image_id"]),
           "shape": ex["shape"].decode(), "color": ex["color"].decode(),
           "caption": ex["caption"].decode(),
           "questions": list(zip([q.decode() for q in ex["questions"]["question"]],
                                 [a.decode() for a in ex["questions"]["answer"]]))}
          for ex in dataset.as_numpy_iterator()]


@pytest.fixture(scope="module")
def by_image(records):
  return {record["image"]: record for record in records}


def qa_pairs(example):
  """[(user text, assistant text)] after the optional system turn."""
  body = example["texts"][1:] if example["roles"][0] == "system" else example["texts"]
  return list(zip(body[0::2], body[1::2]))


@pytest.mark.parametrize("name", ALL_TASKS)
def test_conversations_are_well_formed(examples, name):
  assert len(examples[name]) > 50
  for example in examples[name]:
    roles, texts = example["roles"], example["texts"]
    assert len(roles) == len(texts)
    body = roles[1:] if roles[0] == "system" else roles
    assert body and body == ["user", "assistant"] * (len(body) // 2), roles
    assert all(text.strip() for text in texts), texts
    assert sum(text.count(tasks.IMAGE_MARKER) for text in texts) == len(example["images"])
    # The renderer's own checks accept it.
    conversations.check_turns(conversations.turns_from_features(roles, texts))


def test_chat_asks_the_images_own_questions(examples, by_image):
  for example in examples["easy_vqa_chat"]:
    (image,) = example["images"]
    record = by_image[image]
    pairs = qa_pairs(example)
    expected = min(2 + record["image_id"] % 3, len(record["questions"]))
    assert len(pairs) == expected and 2 <= expected <= 4
    assert pairs[0][0].startswith(tasks.IMAGE_MARKER + "\n")
    for question, answer in pairs:
      question = question.removeprefix(tasks.IMAGE_MARKER + "\n")
      assert tasks.IMAGE_MARKER not in question
      # A bare-word answer, and only it, follows the short-answer instruction.
      instruction = "\n" + conversations.SHORT_ANSWER_INSTRUCTION
      assert question.endswith(instruction) == (answer == answer.lower() and " " not in answer)
      question = question.removesuffix(instruction)
      truth = dict(record["questions"])[question[0].lower() + question[1:]]
      # The bare answer word is there to score VQA accuracy against.
      assert truth in re.findall(r"[a-z]+", answer.lower()), (question, answer, truth)
      assert len(answer.split()) <= 5, answer  # Short answers, as VQA asks for.


def test_chat_mixes_bare_answers_and_sentences(examples):
  answers = [a for ex in examples["easy_vqa_chat"] for _, a in qa_pairs(ex)]
  bare = sum(" " not in a and not a.endswith(".") for a in answers) / len(answers)
  assert 0.2 < bare < 0.6, bare


def which(first, second, value):
  """The expected answer index: 0 neither, 1 first, 2 second, 3 both."""
  return int(first == value) + 2 * int(second == value)


def test_compare_answers_are_true_to_both_images(examples, records, by_image):
  order = {record["image"]: index for index, record in enumerate(records)}
  answer_index = {text: i for texts in instruction_tasks.WHICH_ANSWERS
                  for i, text in enumerate(texts)}
  seen_answers, seen_same = set(), set()
  for example in examples["easy_vqa_chat_compare"]:
    first, second = (by_image[image] for image in example["images"])
    # Consecutive records, paired from the start.
    assert order[example["images"][1]] == order[example["images"][0]] + 1
    assert order[example["images"][0]] % 2 == 0
    pairs = qa_pairs(example)
    assert pairs[0][0].startswith(f"{tasks.IMAGE_MARKER}\n{tasks.IMAGE_MARKER}\n")
    question, answer = pairs[0]
    value = re.search(r"(?:shows a|contains a|is there a|is the shape) (\w+)(?: shape)?\?$",
                      question)[1]
    field = "shape" if value in easy_vqa.SHAPES else "color"
    assert value in easy_vqa.SHAPES + easy_vqa.COLORS
    expected = which(first[field], second[field], value)
    assert answer_index[answer] == expected, (question, answer, first[field], second[field])
    seen_answers.add(expected)
    for question, answer in pairs[1:]:
      other = {instruction_tasks.SAME_SHAPE_QUESTION: "shape",
               instruction_tasks.SAME_COLOR_QUESTION: "color"}[question]
      assert other != field  # The follow-up asks about the other attribute.
      same = first[other] == second[other]
      assert answer.startswith("Yes," if same else "No,"), (question, answer)
      assert f" {first[other]}" in answer and (same or f" {second[other]}." in answer)
      seen_same.add(same)
  assert seen_answers == {0, 1, 2, 3} and seen_same == {True, False}


@pytest.mark.parametrize("name", ("easy_vqa_chat", "easy_vqa_chat_compare"))
def test_system_prompt_on_every_third_image(examples, by_image, name):
  with_prompt = 0
  for example in examples[name]:
    image_id = by_image[example["images"][0]]["image_id"]
    has_system = example["roles"][0] == "system"
    assert has_system == (image_id % instruction_tasks.SYSTEM_PROMPT_EVERY == 0)
    if has_system:
      assert example["texts"][0] in instruction_tasks.SYSTEM_PROMPTS
    with_prompt += has_system
  assert 0.2 < with_prompt / len(examples[name]) < 0.45


def test_caption_chat_is_the_caption(examples, by_image):
  for example in examples["easy_vqa_caption_chat"]:
    (image,) = example["images"]
    assert example["roles"] == ["user", "assistant"]
    assert example["texts"] == [tasks.IMAGE_MARKER, by_image[image]["caption"] + "."]


def test_chatterbot_splits_are_disjoint_text_conversations(examples):
  train, test = read("chatterbot_chat", "train"), examples["chatterbot_chat"]
  kept, _ = chatterbot.read_conversations()
  assert len(train) + len(test) == len(kept) and len(test) > 30 and len(train) > 10 * 30
  for example in train + test:
    assert example["images"] == []
  conversation = lambda ex: tuple(ex["texts"])  # noqa: E731
  assert not {conversation(ex) for ex in train} & {conversation(ex) for ex in test}
  # All replies to one prompt sit in one split.
  assert not {ex["texts"][0].lower() for ex in train} & {ex["texts"][0].lower() for ex in test}


def test_two_reads_are_equal():
  for name in ALL_TASKS:
    assert read(name, "train", 40) == read(name, "train", 40), name


def test_marker_and_roles_are_the_pipelines():
  assert instruction_tasks.IMAGE_MARKER == tasks.IMAGE_MARKER == conversations.IMAGE_MARKER
  assert (instruction_tasks.SYSTEM, instruction_tasks.USER, instruction_tasks.ASSISTANT) == \
      conversations.ROLES


def test_tasks_are_registered_as_conversations():
  assert set(instruction_tasks.TASKS) <= set(tasks.TASKS)
  assert tasks.TEXT_ONLY_TASKS >= {"chatterbot_chat"}
  for name in ALL_TASKS:
    features = seqio.get_mixture_or_task(name).output_features
    assert not features["targets"].required and not features["targets"].add_eos
  assert tasks.has_images("easy_vqa_chat") and not tasks.has_images("chatterbot_chat")
  assert tasks.required_sources("chatterbot_chat") == {"mm1_chatterbot"}


def test_mixtures():
  expected = {
      "llava_stage1": {"easy_vqa_caption_chat": 1},
      "visual_sft": {"easy_vqa_chat": 80, "easy_vqa_chat_compare": 20},
      "visual_sft_text": {"easy_vqa_chat": 80, "easy_vqa_chat_compare": 20,
                          "chatterbot_chat": 15},
  }
  for name, rates in expected.items():
    assert tasks.MIXTURES[name] == rates
    mixture = seqio.get_mixture_or_task(name)
    assert {task.name: mixture.get_rate(task) for task in mixture.tasks} == rates
    assert tasks.has_images(name)
  text_share = 15 / sum(expected["visual_sft_text"].values())
  assert 0.1 <= text_share <= 0.2
  assert tasks.required_sources("visual_sft_text") == {"mm1_easy_vqa", "mm1_chatterbot"}
  # Image and text-only conversations have one structure, so seqio can mix them.
  dataset = seqio.get_mixture_or_task("visual_sft_text").get_dataset(
      None, split="train", shuffle=False, num_epochs=1, seed=0)
  assert len(list(itertools.islice(dataset.as_numpy_iterator(), 20))) == 20


def test_with_vocabulary_registers_the_suffixed_mixture():
  name = tasks.with_vocabulary("visual_sft_text", "smollm2")
  suffix = name.removeprefix("visual_sft_text")
  assert suffix.startswith("__")
  mixture = tasks.get_task_or_mixture(name)
  assert sorted(task.name for task in mixture.tasks) == sorted(
      task + suffix for task in tasks.MIXTURES["visual_sft_text"])
  assert tasks.with_vocabulary("visual_sft", "smollm2") == "visual_sft" + suffix
  task = tasks.get_task_or_mixture("easy_vqa_chat" + suffix)
  assert task.output_features["texts"].dtype.name == "string"
  assert read("easy_vqa_chat" + suffix, "train", 3) == read("easy_vqa_chat", "train", 3)
  assert not tasks.has_images("chatterbot_chat" + suffix)
