"""Bundled conversation tasks and mixtures for visual instruction tuning.

A conversation task leaves tokenizing to the pipeline, which renders each
example with the run's chat template (data.chat_template) and trains on the
assistant turns only (mm1_jax/data/conversations.py). Each example:

    roles   string [t]  "system" | "user" | "assistant"; user first (after an
                        optional system turn), user/assistant alternating,
                        an assistant turn last
    texts   string [t]  each turn's text; one "<image>" per image
    images  string [k]  encoded PNG bytes, k = number of "<image>" markers

Tasks (registered by tasks.register_all, so data.vocabulary re-registers them
under a suffix like every bundled task):

  easy_vqa_chat          one easy-vqa image, 2..4 of its question/answer pairs
                         as turns; answers as a short sentence or the bare
                         answer word
  easy_vqa_chat_compare  two consecutive images: "which image shows ...?"
                         (first / second / both / neither) and, on half of
                         them, "same shape/colour?", all derived from the two
                         records' shape and colour
  easy_vqa_caption_chat  LLaVA stage 1: user "<image>", assistant the caption
                         (a config renders it with the `plain` template)
  chatterbot_chat        text-only dialogues of chatterbot-corpus (no images)

easy_vqa_chat and easy_vqa_chat_compare open with a short system prompt when
the (first) image id is a multiple of SYSTEM_PROMPT_EVERY. Every choice of
wording follows from the image id, so a task yields the same conversations
on every read.

Mixtures: llava_stage1 (captions), visual_sft (chat 80 : compare 20),
visual_sft_text (visual_sft + chatterbot_chat at 15, ~13% of examples: the
"mix in language-only instruction data" ablation of the scaling-LLaVA study).

This module does not import mm1_jax.data.tasks (which imports it to register
these tasks at import time); tasks.register_all hands it the output features.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import seqio
import tensorflow as tf
import tensorflow_datasets as tfds

from mm1_jax.data import conversations, sources
from mm1_jax.data.sources import chatterbot, easy_vqa

# The marker and roles conversations.py renders (tasks.IMAGE_MARKER is the same).
IMAGE_MARKER = conversations.IMAGE_MARKER
SYSTEM, USER, ASSISTANT = conversations.SYSTEM, conversations.USER, conversations.ASSISTANT

# --- shared pieces --------------------------------------------------------------

# A system prompt on one conversation in SYSTEM_PROMPT_EVERY (by image id),
# so the model learns to answer with and without one.
SYSTEM_PROMPT_EVERY = 3
SYSTEM_PROMPTS = (
    "You are a helpful assistant who answers questions about pictures.",
    "Answer briefly and accurately.",
    "You are a visual assistant. Look carefully at every image before you answer.",
)


def _pick(options: Sequence[str], index: tf.Tensor) -> tf.Tensor:
  """options[index % len(options)] as a string scalar (index: int scalar >= 0)."""
  return tf.gather(tf.constant(options), tf.cast(index, tf.int64) % len(options))


def _capitalized(text: tf.Tensor) -> tf.Tensor:
  """First character upper-cased, elementwise (the easy-vqa questions are lower case)."""
  return tf.strings.upper(tf.strings.substr(text, 0, 1)) + tf.strings.substr(text, 1, -1)


def has_system_prompt(image_id: tf.Tensor) -> tf.Tensor:
  """bool scalar: whether the conversation keyed by `image_id` opens with a system turn."""
  return tf.equal(image_id % SYSTEM_PROMPT_EVERY, 0)


def _turns(questions: tf.Tensor, answers: tf.Tensor, image_id: tf.Tensor
           ) -> dict[str, tf.Tensor]:
  """{roles, texts} [t]: the system prompt if due, then questions[i], answers[i] for each i.

  questions, answers: string [n], n >= 1.
  """
  n = tf.shape(questions)[0]
  roles = tf.tile(tf.constant([USER, ASSISTANT]), [n])
  texts = tf.reshape(tf.stack([questions, answers], axis=1), [-1])  # q0 a0 q1 a1 ...
  system_count = tf.cast(has_system_prompt(image_id), tf.int32)  # 0 or 1 leading turns.
  system_text = _pick(SYSTEM_PROMPTS, image_id // SYSTEM_PROMPT_EVERY)
  return {"roles": tf.concat([tf.constant([SYSTEM])[:system_count], roles], 0),
          "texts": tf.concat([tf.reshape(system_text, [1])[:system_count], texts], 0)}


# --- easy_vqa_chat ---------------------------------------------------------------

MIN_TURNS, MAX_TURNS = 2, 4  # Question/answer pairs per conversation (images have >= 2).


def _bare_and_sentences(answers: tf.Tensor) -> tf.Tensor:
  """string [n, 4]: ways to say each answer, every one containing the answer word.

  Column 1 (and 3 for yes/no) is the bare word ("blue") so that short
  answers, which VQA accuracy scores, stay in the training data; the others
  are short sentences that fit the kind of answer (yes/no, a shape, a colour).
  """
  capital = _capitalized(answers)
  yes_no = tf.stack([capital + ".", answers, capital + ".", answers], axis=1)
  shape = tf.stack(["It is a " + answers + ".", answers, "A " + answers + ".",
                    "The shape is a " + answers + "."], axis=1)
  color = tf.stack(["It is " + answers + ".", answers, capital + ".",
                    "The color is " + answers + "."], axis=1)
  is_yes_no = tf.logical_or(tf.equal(answers, "yes"), tf.equal(answers, "no"))
  is_shape = tf.reduce_any(tf.equal(answers[:, None], tf.constant(easy_vqa.SHAPES)), axis=1)
  return tf.where(is_yes_no[:, None], yes_no, tf.where(is_shape[:, None], shape, color))


def phrase_answers(answers: tf.Tensor, image_id: tf.Tensor) -> tf.Tensor:
  """string [n]: answer i phrased by variant (image_id + i) of _bare_and_sentences."""
  n = tf.shape(answers)[0]
  variants = _bare_and_sentences(answers)
  column = (tf.cast(image_id, tf.int32) + tf.range(n)) % tf.shape(variants)[1]
  return tf.gather(variants, column, axis=1, batch_dims=1)


def chat_conversation(example: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
  """One mm1_easy_vqa record -> a conversation about its image.

  Turns: [system], user "<image>\\nQ1", assistant A1, user Q2, assistant A2, ...
  with n = 2 + image_id % 3 of the image's questions (fewer if it has
  fewer), spread evenly over its list: easy-vqa lists an image's open
  questions first, each asked twice in other words, then the yes/no ones,
  so consecutive questions would mostly repeat each other.
  """
  image_id = example["image_id"]
  questions, answers = example["questions"]["question"], example["questions"]["answer"]
  count = tf.shape(questions)[0]
  wanted = MIN_TURNS + tf.cast(image_id % (MAX_TURNS - MIN_TURNS + 1), tf.int32)
  n = tf.minimum(wanted, count)
  chosen = tf.range(n) * count // n  # Increasing, distinct: i * count / n.
  asked = _capitalized(tf.gather(questions, chosen))
  asked = tf.concat([[IMAGE_MARKER + "\n" + asked[0]], asked[1:]], 0)
  answers = tf.gather(answers, chosen)
  phrased = phrase_answers(answers, image_id)
  # A bare-word answer follows the short-answer instruction (LLaVA-1.5's
  # VQA format), so an instruction-tuned model answers VQA in one word.
  asked = tf.where(tf.equal(phrased, answers),
                   asked + "\n" + conversations.SHORT_ANSWER_INSTRUCTION, asked)
  return {**_turns(asked, phrased, image_id), "images": tf.reshape(example["image"], [1])}


# --- easy_vqa_chat_compare -------------------------------------------------------------

# "Which image ...?" about a shape or a colour; {x} is the value asked about.
WHICH_SHAPE = ("Which image shows a {x}?", "Which of the two images contains a {x}?",
               "In which image is there a {x}?")
WHICH_COLOR = ("Which image shows a {x} shape?", "Which of the two images contains a {x} shape?",
               "In which image is the shape {x}?")
# Answers indexed by (value in first) + 2 * (value in second).
WHICH_ANSWERS = (("Neither image.", "The first image.", "The second image.", "Both images."),
                 ("Neither.", "The first one.", "The second one.", "Both."))
SAME_SHAPE_QUESTION = "Do the two images show the same shape?"
SAME_COLOR_QUESTION = "Are the two shapes the same color?"


def _which_turn(values: tf.Tensor, vocabulary: Sequence[str], templates: Sequence[str],
                key: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
  """(question, answer) scalars: which of two images has one value of an attribute.

  values: string [2], the two images' shapes (or colours). The value asked
  about is the first image's, the second's or one drawn from `vocabulary`
  (often in neither), by `key`.
  """
  choice = (key // 2) % 3
  asked = tf.where(choice == 0, values[0],
                   tf.where(choice == 1, values[1], _pick(vocabulary, key // 6)))
  question = tf.strings.regex_replace(_pick(templates, key // 3), r"\{x\}", asked)
  index = tf.cast(tf.equal(values[0], asked), tf.int64) + 2 * tf.cast(
      tf.equal(values[1], asked), tf.int64)
  answers = tf.gather(tf.constant(WHICH_ANSWERS), (key // 5) % len(WHICH_ANSWERS))
  return question, tf.gather(answers, index)


def _same_shape_turn(shapes: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
  """(question, answer): do the two images show the same shape? shapes: string [2]."""
  answer = tf.where(tf.equal(shapes[0], shapes[1]),
                    "Yes, both show a " + shapes[0] + ".",
                    "No, the first shows a " + shapes[0] + " and the second a " + shapes[1] + ".")
  return tf.constant(SAME_SHAPE_QUESTION), answer


def _same_color_turn(colors: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
  """(question, answer): are the two shapes the same colour? colors: string [2]."""
  answer = tf.where(tf.equal(colors[0], colors[1]),
                    "Yes, both are " + colors[0] + ".",
                    "No, the first is " + colors[0] + " and the second is " + colors[1] + ".")
  return tf.constant(SAME_COLOR_QUESTION), answer


def compare_conversation(pair: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
  """Two mm1_easy_vqa records (fields stacked, [2, ...]) -> a conversation about both.

  Turns: [system], user "<image>\\n<image>\\nWhich image shows a circle?",
  assistant "The first image.", then on every other pair a user question
  on whether both show the same colour (after a shape question) or shape
  (after a colour one) and its answer. Wording and what is asked follow
  from the first image's id.
  """
  key = pair["image_id"][0]
  shape_first = tf.equal(key % 2, 0)
  shape_q, shape_a = _which_turn(pair["shape"], easy_vqa.SHAPES, WHICH_SHAPE, key)
  color_q, color_a = _which_turn(pair["color"], easy_vqa.COLORS, WHICH_COLOR, key)
  same_color_q, same_color_a = _same_color_turn(pair["color"])
  same_shape_q, same_shape_a = _same_shape_turn(pair["shape"])
  questions = tf.where(shape_first, tf.stack([shape_q, same_color_q]),
                       tf.stack([color_q, same_shape_q]))
  answers = tf.where(shape_first, tf.stack([shape_a, same_color_a]),
                     tf.stack([color_a, same_shape_a]))
  questions = tf.concat([[IMAGE_MARKER + "\n" + IMAGE_MARKER + "\n" + questions[0]],
                         questions[1:]], 0)
  n = 1 + tf.cast(tf.equal((key // 7) % 2, 0), tf.int32)  # One or two question/answer pairs.
  return {**_turns(questions[:n], answers[:n], key), "images": pair["image"]}


def compare_conversations(dataset: tf.data.Dataset) -> tf.data.Dataset:
  """Pairs consecutive records (a last odd one is dropped) into compare conversations."""
  pairs = dataset.map(lambda ex: {k: ex[k] for k in ("image", "image_id", "shape", "color")})
  return pairs.batch(2, drop_remainder=True).map(compare_conversation)


# --- easy_vqa_caption_chat -------------------------------------------------------------

def caption_conversation(example: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
  """user "<image>", assistant "a blue rectangle." (as easy_vqa_caption's target)."""
  return {"roles": tf.constant([USER, ASSISTANT]),
          "texts": tf.stack([tf.constant(IMAGE_MARKER), example["caption"] + "."]),
          "images": tf.reshape(example["image"], [1])}


# --- chatterbot_chat ----------------------------------------------------------------------

def dialogue_conversation(example: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
  """mm1_chatterbot utterances [2m] -> roles user, assistant, ... [2m]; no images."""
  utterances = example["utterances"]
  roles = tf.tile(tf.constant([USER, ASSISTANT]), [tf.shape(utterances)[0] // 2])
  return {"roles": roles, "texts": utterances, "images": tf.zeros([0], tf.string)}


# --- registration ------------------------------------------------------------------------

TASKS = ("easy_vqa_chat", "easy_vqa_chat_compare", "easy_vqa_caption_chat", "chatterbot_chat")
TEXT_ONLY_TASKS = frozenset({"chatterbot_chat"})
MIXTURES = {
    # LLaVA stage 1 (feature alignment): captions only.
    "llava_stage1": {"easy_vqa_caption_chat": 1},
    # LLaVA stage 2 (visual instruction tuning).
    "visual_sft": {"easy_vqa_chat": 80, "easy_vqa_chat_compare": 20},
    # Stage 2 with language-only conversations mixed in (15 / 115 ~ 13%).
    "visual_sft_text": {"easy_vqa_chat": 80, "easy_vqa_chat_compare": 20, "chatterbot_chat": 15},
}


def _tfds_source(builder: str, splits: Mapping[str, str], decoders=None) -> seqio.TfdsDataSource:
  """A bundled builder's version 1.0.0, read from sources.default_data_dir()."""
  return seqio.TfdsDataSource(tfds_name=f"{builder}:1.0.0",
                              tfds_data_dir=sources.default_data_dir(),
                              splits=dict(splits), decoders=decoders)


def _easy_vqa_source() -> seqio.TfdsDataSource:
  # Images stay encoded PNG bytes: the pipeline decodes them at the model's size.
  return _tfds_source(easy_vqa.BUILDER.name, {"train": "train", "test": "test"},
                      decoders={"image": tfds.decode.SkipDecoding()})


def register(features: Mapping[str, seqio.Feature], suffix: str = "") -> None:
  """Registers the conversation TASKS as name + suffix (not the mixtures:
  tasks.register_all registers MIXTURES with its own).

  features: tasks.output_features(vocabulary, conversation=True).
  """
  easy_vqa_tasks = {
      "easy_vqa_chat": [seqio.map_over_dataset(chat_conversation)],
      "easy_vqa_chat_compare": [compare_conversations],
      "easy_vqa_caption_chat": [seqio.map_over_dataset(caption_conversation)],
  }
  for name, preprocessors in easy_vqa_tasks.items():
    seqio.TaskRegistry.add(name + suffix, source=_easy_vqa_source(), preprocessors=preprocessors,
                           output_features=features)
  seqio.TaskRegistry.add(
      "chatterbot_chat" + suffix,
      source=_tfds_source(chatterbot.BUILDER.name, {"train": "train", "test": "test"}),
      preprocessors=[seqio.map_over_dataset(dialogue_conversation)], output_features=features)
