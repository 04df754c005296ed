"""TFDS builder `mm1_emoji`: Google's Noto emoji drawings with their names and categories.

Read straight from the npm tarball of emoji-datasource-google 16.0.0 (emoji.json
MIT, Cal Henderson's emoji-data; the images Noto Emoji v2.048, Apache-2.0),
which `make setup` fetches with npm into <venv>/share/mm1_jax/ (nothing
downloads at run time; `$MM1_EMOJI_TARBALL` points elsewhere). The tarball's
package/emoji.json lists 1,911 emoji in 10 categories ("Smileys & Emotion",
..., "Flags", and "Component": the 5 skin-tone swatches) and 99 subcategories;
package/img/google/64/ holds 3,786 PNGs: the 1,911 base emoji and 1,875
skin-tone variants (RGBA, a few grey+alpha or palette; the pipeline
composites their transparency over data.image_background). One example per
PNG:

    image         uint8 [64, 64, 4]  the tarball's PNG bytes, stored as is
    image_id      int64              position in the catalogue: base emoji by
                                     sort_order, each followed by its variants
    unified       text               the image's code points, "1F44B-1F3FD"
    base_unified  text               its base emoji's, "1F44B" (= unified for a base)
    name          text               lower case: "grinning face"; variants append
                                     the CLDR tone names, "waving hand sign: medium
                                     skin tone", "kiss: man, man, light skin tone,
                                     dark skin tone"
    caption       text               = name (the feature the caption tasks read)
    category      text               as emoji.json spells it: "Smileys & Emotion"
    subcategory   text               "face-smiling"
    questions     sequence of {question: text, answer: text}
                    "what category is this emoji?"    -> "smileys & emotion"
                    "what subcategory is this emoji?" -> "face-smiling"

Names are emoji.json's (Unicode character names, flags as "Sark Flag"),
lower-cased; emoji.json names no variant, so a variant's name is its base's
plus the tones of its modifier code points. Names are not quite unique:
emoji.json calls both 1F935 and its man form "MAN IN TUXEDO" (6 images
each, with the variants). An emoji or variant whose has_img_google is false
is dropped (none in 16.0.0: every one of the 3,786 has a Google image); one
whose flag is true but whose PNG is missing fails the build.

Splits, by base emoji so a base and its skin-tone variants never straddle
them: 'test' holds the emoji whose base_unified hashes (SHA-256) to 0 mod
TEST_BUCKETS (1 in 5), 'train' the others.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import tarfile
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

PACKAGE = "emoji-datasource-google@16.0.0"
TARBALL_NAME = "emoji-datasource-google-16.0.0.tgz"
TARBALL_ENV = "MM1_EMOJI_TARBALL"
CATALOGUE_MEMBER = "package/emoji.json"
IMAGE_DIR = "package/img/google/64/"
IMAGE_SIZE = 64
SPLITS = ("train", "test")
# One base emoji in TEST_BUCKETS (by its code points) is held out, variants with it.
TEST_BUCKETS = 5
CATEGORY_QUESTION = "what category is this emoji?"
SUBCATEGORY_QUESTION = "what subcategory is this emoji?"

# Fitzpatrick modifier code point -> CLDR name, as in "waving hand: medium skin tone".
SKIN_TONES = {
    "1F3FB": "light skin tone",
    "1F3FC": "medium-light skin tone",
    "1F3FD": "medium skin tone",
    "1F3FE": "medium-dark skin tone",
    "1F3FF": "dark skin tone",
}


@dataclasses.dataclass(frozen=True)
class EmojiImage:
  """One PNG of the catalogue: a base emoji or one of its skin-tone variants."""
  image_id: int
  unified: str
  base_unified: str
  name: str
  category: str
  subcategory: str
  image_file: str  # Its file name in IMAGE_DIR, "1f44b-1f3fd.png".


def default_tarball() -> str:
  """Where `make setup` puts the tarball: <sys.prefix>/share/mm1_jax/TARBALL_NAME."""
  return os.path.join(sys.prefix, "share", "mm1_jax", TARBALL_NAME)


def tarball_path() -> str:
  """$MM1_EMOJI_TARBALL if set, else default_tarball(); FileNotFoundError if it is absent."""
  path = os.environ.get(TARBALL_ENV) or default_tarball()
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"the emoji tarball {path} is missing: run `make setup` (it fetches {PACKAGE} with "
        f"npm), or point ${TARBALL_ENV} at a copy of {TARBALL_NAME}.")
  return path


def read_tarball(path: str) -> tuple[list[dict[str, Any]], dict[str, bytes]]:
  """(emoji.json's entries, {file name: PNG bytes} of IMAGE_DIR) in one sequential pass.

  A .tgz has no index: reading its members in archive order decompresses it
  once (~1 s), where out-of-order access would restart the stream per file.
  """
  entries, images = None, {}
  with tarfile.open(path, "r:gz") as archive:
    for member in archive:
      if not member.isfile():
        continue
      if member.name == CATALOGUE_MEMBER:
        entries = json.load(archive.extractfile(member))
      elif member.name.startswith(IMAGE_DIR) and member.name.endswith(".png"):
        images[member.name[len(IMAGE_DIR):]] = archive.extractfile(member).read()
  if entries is None:
    raise ValueError(f"{path} has no {CATALOGUE_MEMBER}: it is not the {PACKAGE} tarball; "
                     "delete it and run `make setup` again.")
  return entries, images


def skin_tone_name(modifiers: str) -> str:
  """'medium skin tone' for '1F3FD'; 'light skin tone, dark skin tone' for '1F3FB-1F3FF'.

  A repeated tone is named once, as CLDR does ("kiss: man, man, light skin tone").
  """
  names = []
  for code in modifiers.upper().split("-"):
    if code not in SKIN_TONES:
      raise ValueError(f"unknown skin-tone modifier {code!r} in {modifiers!r}; "
                       f"known: {sorted(SKIN_TONES)}.")
    if SKIN_TONES[code] not in names:
      names.append(SKIN_TONES[code])
  return ", ".join(names)


def variant_name(base_name: str, modifiers: str) -> str:
  """A variant's name: 'waving hand sign: medium skin tone'.

  The tones follow a colon, or a comma when the base name has its own colon
  (CLDR's "kiss: man, man, light skin tone").
  """
  separator = ", " if ":" in base_name else ": "
  return base_name + separator + skin_tone_name(modifiers)


def catalogue(entries: Sequence[Mapping[str, Any]],
              image_files: set[str] | frozenset[str]) -> tuple[list[EmojiImage], int]:
  """(every image to build, ordered by image_id; the number dropped for has_img_google false).

  entries: emoji.json's list; image_files: the PNG names present in IMAGE_DIR.
  Base emoji come in sort_order, each followed by its variants in
  emoji.json's key order. Raises ValueError when a PNG flagged present is
  missing.
  """
  images, dropped = [], 0

  def add(entry, base_unified, name, category, subcategory):
    nonlocal dropped
    if not entry["has_img_google"]:
      dropped += 1
      return
    if entry["image"] not in image_files:
      raise ValueError(f"emoji {entry['unified']} has has_img_google true but no "
                       f"{IMAGE_DIR}{entry['image']} in the tarball: a damaged download; "
                       "delete the tarball and run `make setup` again.")
    images.append(EmojiImage(
        image_id=len(images), unified=entry["unified"], base_unified=base_unified, name=name,
        category=category, subcategory=subcategory, image_file=entry["image"]))

  for entry in sorted(entries, key=lambda e: e["sort_order"]):
    name, unified = entry["name"].lower(), entry["unified"]
    if not entry["has_img_google"]:
      # Its variants go with it: they would be a skin tone of an emoji the set lacks.
      dropped += 1 + len(entry.get("skin_variations") or {})
      continue
    add(entry, unified, name, entry["category"], entry["subcategory"])
    for modifiers, variant in (entry.get("skin_variations") or {}).items():
      add(variant, unified, variant_name(name, modifiers), entry["category"],
          entry["subcategory"])
  return images, dropped


def split_of(base_unified: str) -> str:
  """'test' or 'train', from a stable hash of the base emoji's code points."""
  digest = hashlib.sha256(base_unified.upper().encode("ascii")).digest()
  return "test" if int.from_bytes(digest[:8], "big") % TEST_BUCKETS == 0 else "train"


def questions(image: EmojiImage) -> list[dict[str, str]]:
  """[{question, answer}]: the category and subcategory, lower case."""
  return [{"question": CATEGORY_QUESTION, "answer": image.category.lower()},
          {"question": SUBCATEGORY_QUESTION, "answer": image.subcategory.lower()}]


class Mm1Emoji(tfds.core.GeneratorBasedBuilder):
  """Noto emoji 64 px PNGs with names, categories and questions, from the npm tarball."""

  name = "mm1_emoji"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {
      "1.0.0": f"{PACKAGE}: every Google 64 px PNG (base emoji and skin-tone variants), "
               f"lower-cased names, category questions; test = base hash 0 mod {TEST_BUCKETS}.",
  }

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            # 4 channels: TFDS's own decoder expands grey+alpha and palette PNGs to RGBA.
            "image": tfds.features.Image(
                shape=(IMAGE_SIZE, IMAGE_SIZE, 4), encoding_format="png"),
            "image_id": tfds.features.Scalar(np.int64),
            "unified": tfds.features.Text(),
            "base_unified": tfds.features.Text(),
            "name": tfds.features.Text(),
            "caption": tfds.features.Text(),
            "category": tfds.features.Text(),
            "subcategory": tfds.features.Text(),
            "questions": tfds.features.Sequence({
                "question": tfds.features.Text(),
                "answer": tfds.features.Text(),
            }),
        }),
        homepage="https://github.com/iamcal/emoji-data",
        license="MIT (emoji.json); images Apache-2.0 (Noto Emoji)",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Everything is in the tarball that `make setup` fetched.
    path = tarball_path()
    entries, pngs = read_tarball(path)
    images, dropped = catalogue(entries, frozenset(pngs))
    logging.info("mm1_emoji: %d images of %d emoji from %s; %d dropped (no Google image).",
                 len(images), len(entries), path, dropped)
    return {split: self._generate_examples(split, images, pngs) for split in SPLITS}

  def _generate_examples(self, split: str, images: Sequence[EmojiImage],
                         pngs: Mapping[str, bytes]) -> Iterator[tuple[str, dict]]:
    for image in images:
      if split_of(image.base_unified) != split:
        continue
      yield image.unified, {
          "image": pngs[image.image_file],
          "image_id": image.image_id,
          "unified": image.unified,
          "base_unified": image.base_unified,
          "name": image.name,
          "caption": image.name,
          "category": image.category,
          "subcategory": image.subcategory,
          "questions": questions(image),
      }


BUILDER = Mm1Emoji
