"""SeqIO tasks and mixtures over the bundled data, registered on import.

Every task has the same feature names, so any mixture of them feeds the
multimodal feature converter (mm1_jax/data/pipeline.py). A text task fills

    inputs   int32 [n_in]  prompt tokens, not trained on (may be empty)
    targets  int32 [n_t]   tokens trained on, EOS appended
    images   string [k]    encoded PNG/JPEG bytes, k >= 0

and a conversation task (mm1_jax/data/conversations.py) instead fills

    roles    string [t]    "system" | "user" | "assistant", one per turn
    texts    string [t]    each turn's text, untokenized
    images   string [k]

which the pipeline renders with the run's chat template (data.chat_template),
building the loss mask token by token. Each image appears in the text as one
IMAGE_MARKER ("<image>"), in the same order as `images`; the converter
expands it to the model's run of num_image_tokens placeholders.

Tasks:   easy_vqa_caption, easy_vqa_interleaved, shakespeare_text, easy_vqa_vqa,
          easy_vqa_vqa_documents, easy_vqa_mosaic_vqa, easy_vqa_mosaic_caption,
          emoji_caption, emoji_vqa, emoji_interleaved;
          conversation tasks easy_vqa_chat, easy_vqa_chat_compare,
          easy_vqa_caption_chat, chatterbot_chat (mm1_jax/data/instruction_tasks.py)
Mixtures: mm1_pretrain (interleaved 45 : caption 45 : text 10), MM1's
          data-ablation mixtures, easy_vqa_sft, easy_vqa_mosaic_sft,
          emoji_pretrain (the same proportions over the emoji), emoji_sft, and
          llava_stage1 / visual_sft / visual_sft_text (see MIXTURES).
"""

from __future__ import annotations

import os
import re
from typing import Sequence

import seqio
import tensorflow as tf
import tensorflow_datasets as tfds

from mm1_jax.data import instruction_tasks, sources, tokenizer
# Imported to register the TFDS builders.
from mm1_jax.data.sources import (  # noqa: F401
    easy_vqa as _easy_vqa, easy_vqa_mosaic as _easy_vqa_mosaic, emoji as _emoji,
    shakespeare as _shakespeare)

tf.config.set_visible_devices([], "GPU")

IMAGE_MARKER = "<image>"
# Bundled TFDS builders.
EASY_VQA, EASY_VQA_MOSAIC, SHAKESPEARE = "mm1_easy_vqa", "mm1_easy_vqa_mosaic", "mm1_shakespeare"
EMOJI = "mm1_emoji"
VOCABULARY = tokenizer.get_vocabulary()


def _strings() -> seqio.Feature:
  return seqio.Feature(seqio.PassThroughVocabulary(0), dtype=tf.string, rank=1, add_eos=False,
                       required=False)


# Features that stay strings (never tokenized by seqio).
STRING_FEATURES = ("images", "roles", "texts")


def output_features(vocabulary: seqio.Vocabulary = VOCABULARY,
                    conversation: bool = False) -> dict[str, seqio.Feature]:
  """The features of every task; `conversation` tasks leave `targets` empty.

  seqio mixes only tasks with the same feature names, so text tasks carry
  the (absent) conversation features and conversation tasks the text ones.
  """
  return {
      "inputs": seqio.Feature(vocabulary, add_eos=False, required=False),
      "targets": seqio.Feature(vocabulary, add_eos=not conversation, required=not conversation),
      # Encoded bytes, decoded and resized by the converter at the model's resolution.
      "images": _strings(),
      "roles": _strings(),
      "texts": _strings(),
  }


OUTPUT_FEATURES = output_features()


def tokenize_text(dataset: tf.data.Dataset, output_features) -> tf.data.Dataset:
  """seqio's tokenize, restricted to the text features (images are bytes too)."""
  text = {k: v for k, v in output_features.items() if k not in STRING_FEATURES}
  return seqio.preprocessors.tokenize(dataset, text, copy_pretokenized=False)


def _no_images() -> tf.Tensor:
  return tf.zeros([0], tf.string)


# --- easy-vqa ----------------------------------------------------------------

def _easy_vqa_source(split_names: Sequence[str] = ("train", "test")) -> seqio.TfdsDataSource:
  return seqio.TfdsDataSource(
      tfds_name=f"{EASY_VQA}:1.0.0", tfds_data_dir=sources.default_data_dir(),
      splits={name: name for name in split_names},
      decoders={"image": tfds.decode.SkipDecoding()})


def _easy_vqa_mosaic_source() -> seqio.TfdsDataSource:
  """3 x 3 mosaics of easy-vqa images (sources/easy_vqa_mosaic.py); the same image and
  caption / questions features as _easy_vqa_source, so the same preprocessors apply."""
  return seqio.TfdsDataSource(
      tfds_name=f"{EASY_VQA_MOSAIC}:1.0.0", tfds_data_dir=sources.default_data_dir(),
      splits={"train": "train", "test": "test"},
      decoders={"image": tfds.decode.SkipDecoding()})


def _emoji_source() -> seqio.TfdsDataSource:
  """Noto emoji at 64 px (sources/emoji.py), split by base emoji. Its records carry
  easy-vqa's image / caption (the emoji's name) / questions features, so the
  caption and VQA preprocessors read them as they are."""
  return seqio.TfdsDataSource(
      tfds_name=f"{EMOJI}:1.0.0", tfds_data_dir=sources.default_data_dir(),
      splits={"train": "train", "test": "test"},
      decoders={"image": tfds.decode.SkipDecoding()})


def caption_example(example):
  """One image, then its caption: "<image>" -> "a blue rectangle."."""
  return {"inputs": IMAGE_MARKER, "targets": example["caption"] + ".",
          "images": tf.reshape(example["image"], [1])}


# Interleaved documents: 1..MAX_DOC_IMAGES images with text before, between
# and after them, like a web page. Templates vary with the image id.
MAX_DOC_IMAGES = 4
_BEFORE = (
    "Here is {c}.", "This picture shows {c}.", "Look at {c}:", "Next, {c}.",
    "The image below contains {c}.", "Figure: {c}.",
)
_AFTER = (
    "The shape is {shape} and it is {color}.", "Its colour is {color}.",
    "You can see a {shape} here.", "Notice the {color} {shape}.", "",
    "{question} {answer}.",
)


def _capitalized(text):
  return tf.strings.upper(tf.strings.substr(text, 0, 1)) + tf.strings.substr(text, 1, -1)


def _with_first_question(example):
  """Keeps one question/answer pair per image (or a fallback) as scalars."""
  questions = example["questions"]
  has_question = tf.size(questions["question"]) > 0
  question = tf.cond(has_question, lambda: _capitalized(questions["question"][0]),
                     lambda: tf.constant("What is it?"))
  answer = tf.cond(has_question, lambda: _capitalized(questions["answer"][0]),
                   lambda: _capitalized(example["caption"]))
  return {"image": example["image"], "image_id": example["image_id"],
          "caption": example["caption"], "shape": example["shape"],
          "color": example["color"], "question": question, "answer": answer}


# Template placeholder -> the field of _with_first_question's output that fills it.
_EASY_VQA_FIELDS = (("{c}", "caption"), ("{shape}", "shape"), ("{color}", "color"),
                    ("{question}", "question"), ("{answer}", "answer"))


def _fill(template, example, fields=_EASY_VQA_FIELDS):
  for key, field in fields:
    template = tf.strings.regex_replace(template, key, example[field])
  return template


def _document_segment(example, before=_BEFORE, after=_AFTER, fields=_EASY_VQA_FIELDS):
  """One image's text, 'before <image> after': templates picked by its id, filled from fields."""
  image_id = example["image_id"]
  before = _fill(tf.gather(tf.constant(before), image_id % len(before)), example, fields)
  after = _fill(tf.gather(tf.constant(after), (image_id // 7) % len(after)), example, fields)
  return tf.strings.join([before, IMAGE_MARKER, after], separator=" ")


def interleaved_documents(dataset: tf.data.Dataset, image_fields=_with_first_question,
                          segment=_document_segment) -> tf.data.Dataset:
  """Groups consecutive image records into documents of 1..MAX_DOC_IMAGES.

  image_fields maps a record to scalars (at least "image" and "image_id"),
  so records batch; segment maps those of one image to its text, one
  IMAGE_MARKER in it. The defaults write easy-vqa documents.
  Deterministic: the group size comes from the first image's id.
  """
  def to_document(group):
    size = tf.cast(1 + group["image_id"][0] % MAX_DOC_IMAGES, tf.int32)
    segments = tf.map_fn(
        lambda i: segment(tf.nest.map_structure(lambda t: t[i], group)),
        tf.range(size), fn_output_signature=tf.string)
    return {"inputs": "", "targets": tf.strings.reduce_join(segments, separator=" "),
            "images": group["image"][:size]}

  return dataset.map(image_fields).batch(MAX_DOC_IMAGES, drop_remainder=True).map(to_document)


# Emoji documents: the name before the image, its category or subcategory after. The name
# ends its sentence: skin-tone variants' names have colons and commas of their own.
_EMOJI_BEFORE = (
    "Here is the emoji for {name}.", "This emoji is called {name}.", "Next, {name}.",
    "The emoji below shows {name}.", "Emoji: {name}.", "Emoji of the day: {name}.",
)
_EMOJI_AFTER = (
    "It is in the {category} category.", "Category: {category}; subcategory: {subcategory}.",
    "", "You will find it under {category}, with the {subcategory} emoji.",
    "{Name} is one of the {category} emoji.", "Its subcategory is {subcategory}.",
)
_EMOJI_FIELDS = (("{name}", "name"), ("{Name}", "capitalized_name"), ("{category}", "category"),
                 ("{subcategory}", "subcategory"))


def _emoji_fields(example):
  """The scalars of one emoji record that its document segment reads."""
  return {"image": example["image"], "image_id": example["image_id"], "name": example["name"],
          "capitalized_name": _capitalized(example["name"]), "category": example["category"],
          "subcategory": example["subcategory"]}


def _emoji_segment(example):
  return _document_segment(example, _EMOJI_BEFORE, _EMOJI_AFTER, _EMOJI_FIELDS)


def emoji_documents(dataset: tf.data.Dataset) -> tf.data.Dataset:
  """Interleaved documents of 1..MAX_DOC_IMAGES emoji: "Here is the emoji for grinning
  face. <image> It is in the Smileys & Emotion category. Next, ...". Deterministic."""
  return interleaved_documents(dataset, image_fields=_emoji_fields, segment=_emoji_segment)


def vqa_examples(dataset: tf.data.Dataset) -> tf.data.Dataset:
  """One example per question: "<image> Question: ... Answer:" -> " blue"."""
  def per_question(example):
    questions = example["questions"]
    count = tf.size(questions["question"])
    return tf.data.Dataset.from_tensor_slices({
        "inputs": tf.strings.join([IMAGE_MARKER + " Question: ", questions["question"],
                                   " Answer:"]),
        "targets": tf.strings.join([" ", questions["answer"]]),
        "images": tf.repeat(tf.reshape(example["image"], [1, 1]), count, axis=0),
        "answers": tf.reshape(questions["answer"], [-1, 1]),
    })
  return dataset.flat_map(per_question)


# Few-shot-style VQA documents: question/answer pairs about different images
# back to back, in the evaluator's k-shot prompt format. MM1 traces its
# few-shot ability to interleaved data; instruction tuning on single
# questions alone teaches the model to look at the only image it is shown.
VQA_DOCUMENT_QUESTIONS = 5  # A 4-shot prompt and its query.
_VQA_DOCUMENT_SHUFFLE = 2048  # Mixes questions of different images.


def vqa_documents(dataset: tf.data.Dataset) -> tf.data.Dataset:
  """VQA_DOCUMENT_QUESTIONS questions per example, one image each:
  "<image> Question: q1 Answer: a1<image> Question: q2 Answer: a2..." (no
  separator, as fewshot prompts join demonstrations). Deterministic."""
  def to_document(group):
    return {"inputs": "", "targets": tf.strings.reduce_join(group["inputs"] + group["targets"]),
            "images": tf.reshape(group["images"], [-1])}

  questions = vqa_examples(dataset).shuffle(_VQA_DOCUMENT_SHUFFLE, seed=0)
  return questions.batch(VQA_DOCUMENT_QUESTIONS, drop_remainder=True).map(to_document)


# --- Shakespeare ---------------------------------------------------------------

def text_example(example):
  return {"inputs": "", "targets": example["text"], "images": _no_images()}


# --- registration ------------------------------------------------------------

TASKS = ("easy_vqa_caption", "easy_vqa_interleaved", "shakespeare_text", "easy_vqa_vqa",
         "easy_vqa_vqa_documents", "easy_vqa_mosaic_vqa", "easy_vqa_mosaic_caption",
         "emoji_caption", "emoji_vqa", "emoji_interleaved") + instruction_tasks.TASKS

# MM1's pre-training mixture and its data ablations (interleaved : caption : text).
MIXTURES = {
    "mm1_pretrain": {"easy_vqa_interleaved": 45, "easy_vqa_caption": 45, "shakespeare_text": 10},
    "mm1_caption_only": {"easy_vqa_caption": 1},
    "mm1_interleaved_only": {"easy_vqa_interleaved": 1},
    "mm1_interleaved_caption_50_50": {"easy_vqa_interleaved": 50, "easy_vqa_caption": 50},
    "mm1_interleaved_caption_66_33": {"easy_vqa_interleaved": 66, "easy_vqa_caption": 33},
    "mm1_equal_33_33_33": {"easy_vqa_interleaved": 33, "easy_vqa_caption": 33,
                           "shakespeare_text": 33},
    "mm1_image_text_91_9": {"easy_vqa_interleaved": 45.5, "easy_vqa_caption": 45.5,
                            "shakespeare_text": 9},
    # Visual instruction tuning: single questions and few-shot-style documents.
    "easy_vqa_sft": {"easy_vqa_vqa": 50, "easy_vqa_vqa_documents": 50},
    # Questions about one cell of a 3 x 3 mosaic (192 px), and its every-cell caption: at a
    # 64 px encoder only high-resolution image splitting keeps the cells readable.
    "easy_vqa_mosaic_sft": {"easy_vqa_mosaic_vqa": 80, "easy_vqa_mosaic_caption": 20},
    # Real drawings (Noto emoji) with human-written names: mm1_pretrain's proportions, and
    # their category / subcategory questions.
    "emoji_pretrain": {"emoji_interleaved": 45, "emoji_caption": 45, "shakespeare_text": 10},
    "emoji_sft": {"emoji_vqa": 1},
    # MM1's data ablations over the emoji (configs/ablations/mm1_data.py:emoji).
    "emoji_caption_only": {"emoji_caption": 1},
    "emoji_interleaved_only": {"emoji_interleaved": 1},
    "emoji_interleaved_caption_50_50": {"emoji_interleaved": 50, "emoji_caption": 50},
    "emoji_equal_33_33_33": {"emoji_interleaved": 33, "emoji_caption": 33,
                             "shakespeare_text": 33},
    "emoji_image_text_91_9": {"emoji_interleaved": 45.5, "emoji_caption": 45.5,
                              "shakespeare_text": 9},
    # Conversations (rendered with data.chat_template): llava_stage1, visual_sft,
    # visual_sft_text; see instruction_tasks.
    **instruction_tasks.MIXTURES,
}


def register_all(vocabulary: seqio.Vocabulary = VOCABULARY, suffix: str = "") -> None:
  """Registers every bundled task and mixture, names ending in `suffix`."""
  features = output_features(vocabulary)
  postprocess = [tokenize_text, seqio.preprocessors.append_eos_after_trim]
  easy_vqa = {
      "easy_vqa_caption": [seqio.map_over_dataset(caption_example)],
      "easy_vqa_interleaved": [interleaved_documents],
      "easy_vqa_vqa": [vqa_examples],
      "easy_vqa_vqa_documents": [vqa_documents],
  }
  for name, preprocessors in easy_vqa.items():
    seqio.TaskRegistry.add(name + suffix, source=_easy_vqa_source(),
                           preprocessors=preprocessors + postprocess, output_features=features)
  # The mosaic records carry easy-vqa's image / caption / questions features (plus each
  # question's cell, unused here), so the single-image preprocessors read them as they are.
  easy_vqa_mosaic = {
      "easy_vqa_mosaic_vqa": [vqa_examples],
      "easy_vqa_mosaic_caption": [seqio.map_over_dataset(caption_example)],
  }
  for name, preprocessors in easy_vqa_mosaic.items():
    seqio.TaskRegistry.add(name + suffix, source=_easy_vqa_mosaic_source(),
                           preprocessors=preprocessors + postprocess, output_features=features)
  emoji = {
      "emoji_caption": [seqio.map_over_dataset(caption_example)],
      "emoji_vqa": [vqa_examples],
      "emoji_interleaved": [emoji_documents],
  }
  for name, preprocessors in emoji.items():
    seqio.TaskRegistry.add(name + suffix, source=_emoji_source(),
                           preprocessors=preprocessors + postprocess, output_features=features)
  seqio.TaskRegistry.add(
      "shakespeare_text" + suffix,
      source=seqio.TfdsDataSource(
          tfds_name=f"{SHAKESPEARE}:1.0.0", tfds_data_dir=sources.default_data_dir(),
          splits={"train": "train", "test": "validation", "validation": "validation"}),
      preprocessors=[seqio.map_over_dataset(text_example)] + postprocess,
      output_features=features)
  instruction_tasks.register(output_features(vocabulary, conversation=True), suffix)
  for name, rates in MIXTURES.items():
    seqio.MixtureRegistry.add(name + suffix, [(task + suffix, rate) for task, rate in rates.items()])


if "mm1_pretrain" not in seqio.MixtureRegistry.names():
  register_all()


def with_vocabulary(name: str, vocabulary_path: str | None) -> str:
  """The name of task/mixture `name` tokenized with another vocabulary.

  `vocabulary_path` is a data.vocabulary value: a SentencePiece model, a
  .gguf file, or the alias "smollm2" (see tokenizer.get_vocabulary). The
  bundled tasks are registered again, once, under a suffix derived from the
  file's name (the alias's file for an alias, so both share one
  registration), so a config can swap tokenizers with one field. A task or
  mixture of conversation tasks only is returned as it is: its text is
  tokenized by the pipeline's chat template, with the run's vocabulary.
  """
  if not vocabulary_path:
    return name
  if name not in set(TASKS) | set(MIXTURES) and _all_conversation_tasks(name):
    return name
  path = tokenizer.resolve_vocabulary_path(vocabulary_path)
  if os.path.abspath(path) == tokenizer.DEFAULT_MODEL:
    return name
  suffix = "__" + re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0])
  if name + suffix not in set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names()):
    if name not in set(TASKS) | set(MIXTURES):
      raise ValueError(f"{name!r} is not a bundled task or mixture, so it cannot be "
                       "re-tokenized by data.vocabulary; register it with your vocabulary.")
    if "mm1_pretrain" + suffix not in seqio.MixtureRegistry.names():
      register_all(tokenizer.get_vocabulary(path), suffix)
  return name + suffix


def is_conversation_task(task: seqio.Task) -> bool:
  """Whether `task` emits roles/texts (output_features(conversation=True))."""
  return not task.output_features["targets"].required


def _all_conversation_tasks(name: str) -> bool:
  provider = get_task_or_mixture(name)
  tasks = provider.tasks if isinstance(provider, seqio.Mixture) else [provider]
  return all(is_conversation_task(task) for task in tasks)


def get_task_or_mixture(name: str) -> seqio.Task | seqio.Mixture:
  """The registered task or mixture `name`; the error lists what exists."""
  known = sorted(set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names()))
  if name not in known:
    raise ValueError(f"unknown SeqIO task or mixture {name!r}; registered: {', '.join(known)}. "
                     "Import the module that registers it (e.g. your own tasks file) first.")
  return seqio.get_mixture_or_task(name)


def required_sources(name: str) -> set[str]:
  """The bundled TFDS builders a task or mixture reads (to prepare them first)."""
  provider = get_task_or_mixture(name)
  tasks = provider.tasks if isinstance(provider, seqio.Mixture) else [provider]
  needed = set()
  for task in tasks:
    source = task.source
    if isinstance(source, seqio.TfdsDataSource):
      needed.add(source.tfds_dataset.name.split(":")[0])
  return needed & set(sources.BUILDER_MODULES)


# Bundled tasks whose examples never carry images (every other task may).
TEXT_ONLY_TASKS = frozenset({"shakespeare_text"}) | instruction_tasks.TEXT_ONLY_TASKS


def has_images(name: str) -> bool:
  """Whether a registered task or mixture can yield examples with images."""
  provider = get_task_or_mixture(name)
  tasks = provider.tasks if isinstance(provider, seqio.Mixture) else [provider]
  return any(task.name.split("__")[0] not in TEXT_ONLY_TASKS for task in tasks)
