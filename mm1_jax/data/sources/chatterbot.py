"""TFDS builder `mm1_chatterbot`: the English dialogues of chatterbot-corpus.

chatterbot-corpus (PyPI chatterbot-corpus==1.3.3, BSD licence: the wheel's
classifier "License :: OSI Approved :: BSD License", BSD-3-Clause in the
upstream repository gunthercox/chatterbot-corpus; the dialogues are user
contributed) ships YAML files chatterbot_corpus/data/<language>/<topic>.yml,
each with a `conversations` list whose entries are lists of utterances
taking turns: the first speaker (the user), then the reply (the assistant),
and so on. Only the YAML files are read (the package has no code to run).
Each example:

    utterances  text [t]  t >= 2 turns, user first, alternating, a reply last
    topic       text      the file's name without .yml, e.g. "ai", "trivia"

Reading (`read_conversations`): scalars are kept as the YAML text says them
(yaml.BaseLoader: "1984" stays "1984", "yes" stays "yes", never a number or
a boolean); an entry that is not a list, has an utterance that is not text
(a nested list or mapping) or is empty, has no reply, or contains the image
marker "<image>" (which the pipeline would take for an image) is skipped; a
trailing utterance without a reply is dropped; exact repeats of an earlier
conversation are skipped (tech_support.yml repeats its 10 dialogues about
1,000 times). Each skip is counted and logged, never raised.

Splits: 'test' holds the conversations whose first utterance, normalised,
hashes (SHA-256) to 0 mod TEST_BUCKETS, 'train' the others, so all the
replies to one prompt fall in the same split.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import importlib.util
import os
import re
from typing import Any, Iterator

import tensorflow_datasets as tfds
import yaml
from absl import logging

LANGUAGE = "english"
# One conversation in TEST_BUCKETS (by its first utterance) is held out.
TEST_BUCKETS = 10
SPLITS = ("train", "test")
# The pipeline reads this string as an image's place; these dialogues have none.
IMAGE_MARKER = "<image>"


@dataclasses.dataclass(frozen=True)
class Conversation:
  """One dialogue: utterances[0] by the user, then alternating replies."""
  topic: str
  index: int  # Position of the entry in its file's `conversations` list.
  utterances: tuple[str, ...]


def corpus_dir(language: str = LANGUAGE) -> str:
  """chatterbot_corpus/data/<language>/ of the installed package (not imported)."""
  spec = importlib.util.find_spec("chatterbot_corpus")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError("the chatterbot-corpus package is not installed "
                            "(pip install chatterbot-corpus==1.3.3).")
  return os.path.join(list(spec.submodule_search_locations)[0], "data", language)


def utterance_text(value: Any) -> str | None:
  """An utterance's text, stripped; None for an empty or non-text value.

  Numbers (from a loader that resolves them) are written back as text;
  lists, mappings, None and booleans (which a resolving loader makes of
  "yes"/"no", losing the wording) are not text.
  """
  if isinstance(value, str):
    return value.strip() or None
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    return str(value)
  return None


def conversation_turns(entry: Any, skipped: collections.Counter) -> tuple[str, ...] | None:
  """The utterances of one YAML `conversations` entry, or None (counted in `skipped`).

  The result has an even length >= 2, so it ends with a reply.
  """
  if not isinstance(entry, list):
    skipped["not a list"] += 1
    return None
  texts = [utterance_text(value) for value in entry]
  if any(text is None for text in texts):
    skipped["empty or non-text utterance"] += 1
    return None
  if any(IMAGE_MARKER in text for text in texts):
    skipped["image marker in the text"] += 1
    return None
  if len(texts) < 2:
    skipped["no reply"] += 1
    return None
  if len(texts) % 2:
    skipped["last utterance without a reply (dropped)"] += 1  # The rest is kept.
    texts = texts[:-1]
  return tuple(texts)


def read_file(path: str) -> list[Any]:
  """The `conversations` entries of one corpus YAML file (empty when it has none)."""
  with open(path, encoding="utf-8") as f:
    document = yaml.load(f, Loader=yaml.BaseLoader)  # Scalars stay text.
  entries = document.get("conversations") if isinstance(document, dict) else None
  return entries if isinstance(entries, list) else []


def read_conversations(directory: str | None = None
                       ) -> tuple[list[Conversation], collections.Counter]:
  """(conversations, skipped): every usable dialogue of the *.yml files in
  `directory` (default: corpus_dir()), files in name order, first occurrence
  of a repeated dialogue kept; `skipped` counts what was left out and why."""
  directory = directory or corpus_dir()
  conversations, skipped, seen = [], collections.Counter(), set()
  for name in sorted(os.listdir(directory)):
    if not name.endswith((".yml", ".yaml")):
      continue
    topic = os.path.splitext(name)[0]
    for index, entry in enumerate(read_file(os.path.join(directory, name))):
      utterances = conversation_turns(entry, skipped)
      if utterances is None:
        continue
      if utterances in seen:
        skipped["repeat of an earlier conversation"] += 1
        continue
      seen.add(utterances)
      conversations.append(Conversation(topic, index, utterances))
  return conversations, skipped


def split_of(conversation: Conversation) -> str:
  """'test' or 'train', from a stable hash of the normalised first utterance."""
  prompt = re.sub(r"\s+", " ", conversation.utterances[0].lower()).strip()
  bucket = int.from_bytes(hashlib.sha256(prompt.encode("utf-8")).digest()[:8], "big")
  return "test" if bucket % TEST_BUCKETS == 0 else "train"


class Mm1Chatterbot(tfds.core.GeneratorBasedBuilder):
  """chatterbot-corpus English dialogues, read from the installed package."""

  name = "mm1_chatterbot"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {
      "1.0.0": f"chatterbot-corpus 1.3.3 {LANGUAGE} dialogues, repeats removed; "
               f"test = first utterance hash 0 mod {TEST_BUCKETS}.",
  }

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "utterances": tfds.features.Sequence(tfds.features.Text()),
            "topic": tfds.features.Text(),
        }),
        homepage="https://github.com/gunthercox/chatterbot-corpus",
        license="BSD-3-Clause",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Everything is in the installed package.
    conversations, skipped = read_conversations()
    logging.info("mm1_chatterbot: %d conversations kept; skipped: %s", len(conversations),
                 dict(skipped) or "none")
    return {split: self._generate_examples(conversations, split) for split in SPLITS}

  def _generate_examples(self, conversations: list[Conversation],
                         split: str) -> Iterator[tuple[str, dict]]:
    for conversation in conversations:
      if split_of(conversation) == split:
        yield f"{conversation.topic}/{conversation.index:05d}", {
            "utterances": list(conversation.utterances), "topic": conversation.topic}


BUILDER = Mm1Chatterbot
