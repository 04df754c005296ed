"""A folder of captioned images -> sharded record files a user task reads.

    python -m mm1_jax.data.write_records --images_dir=photos --output=records/photos \
        [--captions=captions.csv] [--num_shards=4] [--eval_fraction=0.1 --seed=0] \
        [--file_format=tfrecord|array_record]

Captions come from a sidecar text file next to each image (photos/cat.jpg ->
photos/cat.txt), or, with --captions, from a CSV (a header row naming a
`path` and a `caption` column) or a JSONL file ({"path": ..., "caption":
...} per line); paths are relative to --images_dir (or absolute), and an
image may have several caption rows (one record each). `file_name` / `image`
and `text` are accepted as column names too (Hugging Face's imagefolder
metadata).

Each record is a tf.Example with the encoded image bytes under `image` and
the UTF-8 caption under `text` (--image_key / --text_key), exactly what
mm1_jax.data.user_tasks.register_image_text_task reads by default. JPEG,
PNG, GIF and BMP files are stored byte for byte; other formats PIL reads
(WebP, TIFF, ...) are re-encoded as PNG, which the training pipeline's
tf.io.decode_image reads.

Files: {output}-{split}-{i:05d}-of-{n:05d}.{tfrecord|array_record}, one set
per split ("train", and with --eval_fraction > 0 "validation": whole images,
not caption rows, chosen by --seed), and {output}-report.json: what was
written, what was skipped and why (no caption, empty caption, a captions row
whose image file is missing, unreadable image bytes), with counts per reason
and the first paths of each. An --output that is a directory (or ends in
"/") gets files named "records-...". array_record needs the array_record
package (installed with requirements.txt) and a local --output. Files are
written as "....partial" and renamed when complete, so an interrupted run
leaves nothing a task would read.

One importer family: mm1_jax.data.import_llava (LLaVA conversations) shares
this module's writing half (ShardedWriter, SkipLog, check_image, the report
and the output flags).
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import io
import json
import os
import re
from typing import Mapping, Sequence

import numpy as np

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff")
FILE_FORMATS = ("tfrecord", "array_record")
# Formats tf.io.decode_image reads as they are; others are re-encoded as PNG.
TF_FORMATS = ("JPEG", "PNG", "GIF", "BMP")
PATH_COLUMNS = ("path", "file_name", "image")
CAPTION_COLUMNS = ("caption", "text")
# Skip reasons, in the order reported.
NO_CAPTION = "no_caption"
EMPTY_CAPTION = "empty_caption"
MISSING_IMAGE = "missing_image"
UNREADABLE_IMAGE = "unreadable_image"
REASONS = {NO_CAPTION: "image without a caption (no sidecar .txt / no captions row)",
           EMPTY_CAPTION: "caption empty or only whitespace",
           MISSING_IMAGE: "captions row whose image file does not exist",
           UNREADABLE_IMAGE: "image bytes PIL cannot decode"}
EXAMPLES_PER_REASON = 20  # Paths kept per skip reason in the report.
DEFAULT_PREFIX = "records"


@dataclasses.dataclass(frozen=True)
class Pair:
  """One record to write: an image file and one caption of it."""
  image: str
  caption: str


# --- finding the pairs -------------------------------------------------------------

def find_images(images_dir: str) -> list[str]:
  """Image files under images_dir (recursive, hidden files skipped), sorted."""
  from mm1_jax import paths

  root = paths.as_path(images_dir)
  if not root.is_dir():
    raise FileNotFoundError(f"--images_dir {images_dir}: no such directory.")
  found, folders = [], [root]
  while folders:  # epath has no recursive glob on gs://; a walk, one listing per folder.
    for path in folders.pop().iterdir():
      if path.name.startswith("."):
        continue
      if path.is_dir():
        folders.append(path)
      elif path.suffix.lower() in IMAGE_SUFFIXES:
        found.append(os.fspath(path))
  return sorted(found)


def _read_text(path, what: str) -> str:
  """A UTF-8 text file (a leading BOM, as spreadsheets write, dropped)."""
  try:
    return path.read_text(encoding="utf-8-sig")
  except UnicodeDecodeError as error:
    raise ValueError(f"{what} {path}: not UTF-8 text ({error.reason} at byte {error.start}); "
                     "save it as UTF-8.") from None


def _column(header: Sequence[str], names: Sequence[str], source: str, what: str) -> str:
  for name in names:
    if name in header:
      return name
  raise ValueError(f"--captions {source}: no {what} column; expected one of {list(names)}, "
                   f"found {list(header)}.")


def read_captions_file(captions: str) -> list[tuple[str, str]]:
  """(path as written, caption) rows of a .csv (header row) or .jsonl file."""
  from mm1_jax import paths

  path = paths.as_path(captions)
  if not path.exists():
    raise FileNotFoundError(f"--captions {captions}: no such file.")
  text = _read_text(path, "--captions")
  suffix = path.suffix.lower()
  if suffix == ".csv":
    reader = csv.DictReader(io.StringIO(text))
    header = reader.fieldnames or []
    rows = list(reader)
  elif suffix in (".jsonl", ".json"):
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as error:
        raise ValueError(f"--captions {captions}: line {number} is not JSON ({error}).") from None
      if not isinstance(row, dict):
        raise ValueError(f"--captions {captions}: line {number} is not a JSON object "
                         '({"path": ..., "caption": ...}).')
      rows.append(row)
    header = list(dict.fromkeys(key for row in rows for key in row))
  else:
    raise ValueError(f"--captions {captions}: expected a .csv or .jsonl file.")
  path_key = _column(header, PATH_COLUMNS, captions, "image path")
  caption_key = _column(header, CAPTION_COLUMNS, captions, "caption")
  return [(str(row.get(path_key) or ""), str(row.get(caption_key) or "")) for row in rows]


def resolve_path(root, written: str) -> str:
  """A path written in a captions row (or a LLaVA record), relative to root
  or absolute, as find_images spells it (absolute, normalised)."""
  from mm1_jax import paths

  if not written or paths.is_remote(written):
    return written
  image = os.fspath(root / written)  # An absolute `written` replaces root.
  return image if paths.is_remote(image) else os.path.normpath(image)


def find_pairs(images_dir: str, captions: str | None = None
               ) -> tuple[list[Pair], dict[str, list[str]]]:
  """The (image, caption) pairs to write and the skipped paths per reason.

  captions: a .csv / .jsonl file, or None for sidecar .txt files. Image
  bytes are not checked here (see check_image).
  """
  from mm1_jax import paths

  images = find_images(images_dir)
  skipped: dict[str, list[str]] = collections.defaultdict(list)
  pairs = []
  if captions is None:
    for image in images:
      sidecar = paths.as_path(os.path.splitext(image)[0] + ".txt")
      if not sidecar.exists():
        skipped[NO_CAPTION].append(image)
        continue
      pairs.append(Pair(image, _read_text(sidecar, "caption file")))
  else:
    root = paths.as_path(images_dir)
    listed = set()
    for written, caption in read_captions_file(captions):
      image = resolve_path(root, written)
      listed.add(image)
      if not written or not paths.as_path(image).exists():
        skipped[MISSING_IMAGE].append(written or "<empty path>")
        continue
      pairs.append(Pair(image, caption))
    skipped[NO_CAPTION] += [image for image in images if image not in listed]
  kept = []
  for pair in pairs:
    caption = pair.caption.strip()
    if not caption:
      skipped[EMPTY_CAPTION].append(pair.image)
    else:
      kept.append(Pair(pair.image, caption))
  return kept, dict(skipped)


def check_image(data: bytes) -> tuple[bytes | None, bool]:
  """(bytes to store, re-encoded?) of an image file's bytes; (None, False)
  when PIL cannot decode them (verify() for structure, load() for truncation)."""
  from PIL import Image

  try:
    with Image.open(io.BytesIO(data)) as image:
      image.verify()
    with Image.open(io.BytesIO(data)) as image:
      image.load()
      if image.format in TF_FORMATS:
        return data, False
      converted = io.BytesIO()
      image.convert("RGB").save(converted, format="PNG")
      return converted.getvalue(), True
  except Exception:  # PIL raises many types (OSError, SyntaxError, ValueError, ...).
    return None, False


# --- writing (shared with mm1_jax.data.import_llava) ----------------------------------

def output_prefix(output: str) -> str:
  """The path prefix of the files: output itself, or output/records for a directory."""
  from mm1_jax import paths

  if output.endswith("/") or paths.as_path(output).is_dir():
    return os.fspath(paths.as_path(output) / DEFAULT_PREFIX)
  return os.fspath(paths.as_path(output))


def shard_names(prefix: str, split: str, num_shards: int, file_format: str) -> list[str]:
  return [f"{prefix}-{split}-{i:05d}-of-{num_shards:05d}.{file_format}"
          for i in range(num_shards)]


def split_pattern(prefix: str, split: str, file_format: str) -> str:
  """The glob a user task names for the split's files."""
  return f"{prefix}-{split}-*.{file_format}"


def check_output_arguments(output: str, file_format: str, num_shards: int,
                           eval_fraction: float, train_split: str, eval_split: str) -> None:
  """Raises ValueError naming the flag for arguments no importer can write."""
  from mm1_jax import paths

  if file_format not in FILE_FORMATS:
    raise ValueError(f"--file_format={file_format!r} is not one of {FILE_FORMATS}.")
  if file_format == "array_record":
    try:
      import array_record.python.array_record_module  # noqa: F401
    except ImportError:
      raise ValueError("--file_format=array_record needs the array_record package "
                       "(pip install array_record); or use tfrecord.") from None
    if paths.is_remote(output):
      raise ValueError(f"--output {output}: array_record files are written locally only; "
                       "write them here and copy them, or use tfrecord.")
  if num_shards < 1:
    raise ValueError(f"--num_shards must be >= 1, got {num_shards}.")
  if not 0 <= eval_fraction < 1:
    raise ValueError(f"--eval_fraction must be in [0, 1), got {eval_fraction}.")
  if eval_fraction and train_split == eval_split:
    raise ValueError(f"the train and eval splits must have different names, both are "
                     f"{train_split!r}.")


class _Writer:
  """Serialized records to one file of either format."""

  def __init__(self, path: str, file_format: str):
    if file_format == "tfrecord":
      import tensorflow as tf
      self._writer = tf.io.TFRecordWriter(path)
    else:
      from array_record.python import array_record_module
      # group_size:1 lets readers fetch any record by index cheaply.
      self._writer = array_record_module.ArrayRecordWriter(path, "group_size:1")

  def write(self, record: bytes) -> None:
    self._writer.write(record)

  def close(self) -> None:
    self._writer.close()


PARTIAL_SUFFIX = ".partial"


class ShardedWriter:
  """One split's records, dealt round-robin to at most num_shards files.

  Record k goes to shard k % num_shards, so records can stream in without
  their count being known. Files open as their first record arrives and are
  written under temporary names ({prefix}-{split}-{i:05d}.{format}.partial,
  which no split pattern matches); close() renames them to
  shard_names(prefix, split, n, file_format), n = min(num_shards, records),
  and deletes the split's files an earlier run with another n left. A run
  that stops half-way (abort()) thus leaves nothing a task would read.
  """

  def __init__(self, prefix: str, split: str, num_shards: int, file_format: str):
    self.prefix, self.split = prefix, split
    self.num_shards, self.file_format = num_shards, file_format
    self.records = 0
    self._writers: list[_Writer] = []

  def _partial_name(self, shard: int) -> str:
    return f"{self.prefix}-{self.split}-{shard:05d}.{self.file_format}{PARTIAL_SUFFIX}"

  def write(self, record: bytes) -> None:
    shard = self.records % self.num_shards
    if shard == len(self._writers):
      self._writers.append(_Writer(self._partial_name(shard), self.file_format))
    self._writers[shard].write(record)
    self.records += 1

  def _close_writers(self) -> list[str]:
    for writer in self._writers:
      writer.close()
    names = [self._partial_name(shard) for shard in range(len(self._writers))]
    self._writers = []
    return names

  def abort(self) -> list[str]:
    """Closes the files, leaving them under their .partial names; returns those."""
    return self._close_writers()

  def close(self) -> list[str]:
    """Closes and renames the files; returns their names ([] without records)."""
    from mm1_jax import paths

    partial = self._close_writers()
    names = shard_names(self.prefix, self.split, len(partial), self.file_format)
    for temporary, name in zip(partial, names):
      paths.as_path(temporary).replace(name)
    # Files of this split's naming scheme this run did not write: an earlier
    # run's shards with another count would match the split's pattern.
    scheme = re.compile(
        re.escape(os.path.basename(f"{self.prefix}-{self.split}-")) + r"\d{5}(-of-\d{5})?\." +
        re.escape(self.file_format) + "(" + re.escape(PARTIAL_SUFFIX) + ")?$")
    folder = paths.as_path(self.prefix).parent
    for stale in folder.glob(os.path.basename(self.prefix) + "-*"):
      if scheme.match(stale.name) and os.fspath(stale) not in names:
        stale.unlink()
    return names


def write_report(prefix: str, report: Mapping):
  """Writes {prefix}-report.json; returns its path."""
  from mm1_jax import paths

  return paths.write_json(prefix + "-report.json", report, indent=2)


class SkipLog:
  """Skipped inputs per reason: counts and the first EXAMPLES_PER_REASON examples.

  meanings: {reason: what it means}, in the order reported; examples_key
  names the report's list ("paths" here, "examples" for LLaVA records).
  """

  def __init__(self, meanings: Mapping[str, str], examples_key: str = "paths"):
    self.meanings, self.examples_key = meanings, examples_key
    self.counts: dict[str, int] = collections.Counter()
    self.examples: dict[str, list] = collections.defaultdict(list)

  def add(self, reason: str, example) -> None:
    if reason not in self.meanings:
      raise KeyError(f"unknown skip reason {reason!r}; known: {list(self.meanings)}")
    self.counts[reason] += 1
    if len(self.examples[reason]) < EXAMPLES_PER_REASON:
      self.examples[reason].append(example)

  @property
  def total(self) -> int:
    return sum(self.counts.values())

  def report(self) -> dict[str, dict]:
    """{reason: {"count", "meaning", examples_key: first examples}}, reasons seen only."""
    return {reason: {"count": self.counts[reason], "meaning": meaning,
                     self.examples_key: list(self.examples[reason])}
            for reason, meaning in self.meanings.items() if self.counts[reason]}


def log_skipped(skipped: Mapping[str, Mapping], log, examples_key: str = "paths",
                shown=str) -> None:
  """Logs a SkipLog report: the total, then per reason its count, meaning and
  first three examples (shown(example) -> str)."""
  total = sum(info["count"] for info in skipped.values())
  log(f"skipped: {total}" + ("" if total else " (nothing)"))
  for reason, info in skipped.items():
    text = ", ".join(shown(example) for example in info[examples_key][:3])
    log(f"  {reason}: {info['count']} ({info['meaning']}): {text}"
        + (", ..." if info["count"] > 3 else ""))


def to_example(image: bytes, caption: str, image_key: str, text_key: str) -> bytes:
  """A serialized tf.Example: {image_key: image bytes, text_key: UTF-8 caption}."""
  import tensorflow as tf

  feature = lambda value: tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))
  return tf.train.Example(features=tf.train.Features(feature={
      image_key: feature(image), text_key: feature(caption.encode("utf-8"))})).SerializeToString()


def assign_splits(pairs: Sequence[Pair], eval_fraction: float, seed: int, train_split: str,
                  eval_split: str) -> dict[str, list[Pair]]:
  """{split: pairs in a seeded random order}. Whole images go to the eval
  split (an image's captions never straddle splits): round(fraction x
  images), at least 1 when the fraction is > 0."""
  rng = np.random.default_rng(seed)
  order = [pairs[i] for i in rng.permutation(len(pairs))]
  if not eval_fraction:
    return {train_split: order}
  images = sorted({pair.image for pair in pairs})
  num_eval = max(1, round(eval_fraction * len(images)))
  if num_eval >= len(images):
    raise ValueError(f"--eval_fraction={eval_fraction} of {len(images)} usable image(s) leaves "
                     "none for training; use a smaller fraction or more images.")
  held_out = {images[i] for i in rng.permutation(len(images))[:num_eval]}
  return {train_split: [p for p in order if p.image not in held_out],
          eval_split: [p for p in order if p.image in held_out]}


def write_records(images_dir: str, output: str, *, captions: str | None = None,
                  num_shards: int = 1, eval_fraction: float = 0.0, seed: int = 0,
                  file_format: str = "tfrecord", image_key: str = "image",
                  text_key: str = "text", train_split: str = "train",
                  eval_split: str = "validation", log=print) -> dict:
  """Writes the pairs of images_dir as sharded records; returns the report.

  Arguments as the flags (module docstring). Each split gets
  min(num_shards, its records) files. The report (also written to
  {prefix}-report.json) holds per split its file pattern, files and
  counts, and per skip reason its count and first paths. Raises ValueError
  for bad arguments or when nothing could be written (after writing the
  report, so the reasons can be read).
  """
  from mm1_jax import paths

  check_output_arguments(output, file_format, num_shards, eval_fraction, train_split,
                         eval_split)
  if image_key == text_key:
    raise ValueError(f"--image_key and --text_key must differ, both are {image_key!r}.")

  pairs, skipped_paths = find_pairs(images_dir, captions)
  skipped = SkipLog(REASONS)
  for reason, skipped_in in skipped_paths.items():
    for path in skipped_in:
      skipped.add(reason, path)
  # Decode each image once, before the split: unreadable files must not count.
  readable, converted = {}, set()
  for image in sorted({pair.image for pair in pairs}):
    data, reencoded = check_image(paths.as_path(image).read_bytes())
    readable[image] = data is not None
    if reencoded:
      converted.add(image)
    if data is None:
      skipped.add(UNREADABLE_IMAGE, image)
  pairs = [pair for pair in pairs if readable[pair.image]]

  prefix = output_prefix(output)
  paths.as_path(prefix).parent.mkdir(parents=True, exist_ok=True)
  splits = assign_splits(pairs, eval_fraction, seed, train_split, eval_split) if pairs else {}
  written = {}
  for split, split_pairs in splits.items():
    writer = ShardedWriter(prefix, split, num_shards, file_format)
    try:
      for pair in split_pairs:
        data = paths.as_path(pair.image).read_bytes()
        if pair.image in converted:
          data, _ = check_image(data)
        writer.write(to_example(data, pair.caption, image_key, text_key))
    except BaseException:
      writer.abort()
      raise
    written[split] = {"pattern": split_pattern(prefix, split, file_format),
                      "files": writer.close(), "records": len(split_pairs),
                      "images": len({pair.image for pair in split_pairs})}

  report = {
      "images_dir": os.fspath(paths.as_path(images_dir)),
      "captions": os.fspath(paths.as_path(captions)) if captions else "sidecar .txt files",
      "file_format": file_format, "features": {"image": image_key, "text": text_key},
      "num_shards": num_shards, "eval_fraction": eval_fraction, "seed": seed,
      "splits": written, "records": sum(s["records"] for s in written.values()),
      "reencoded_as_png": len(converted), "skipped": skipped.report()}
  report_path = write_report(prefix, report)
  _log_report(report, report_path, log)
  if not written:
    raise ValueError(f"no usable captioned images in {images_dir}; see {report_path}.")
  return report


def task_snippet(report: Mapping, name: str = "my_captions") -> str:
  """Python that registers a user task over the written files."""
  split_patterns = ", ".join(f"{split!r}: {info['pattern']!r}"
                             for split, info in report["splits"].items())
  features = report["features"]
  return (f"user_tasks.register_image_text_task(\n    {name!r}, {{{split_patterns}}},\n"
          f"    file_format={report['file_format']!r}, image_key={features['image']!r}, "
          f"text_key={features['text']!r})")


def _log_report(report: Mapping, report_path, log) -> None:
  for split, info in report["splits"].items():
    log(f"{split}: {info['records']} records of {info['images']} images in "
        f"{len(info['files'])} file(s) {info['pattern']}")
  if report["reencoded_as_png"]:
    log(f"re-encoded as PNG (formats tf.io.decode_image does not read): "
        f"{report['reencoded_as_png']} image(s)")
  log_skipped(report["skipped"], log)
  log(f"Wrote {report_path}")
  if report["splits"]:
    log("Register them in your tasks module:\n" + task_snippet(report))


# --- the command ---------------------------------------------------------------------

def define_output_flags(file_format: str, held_out: str) -> None:
  """The flags of every importer's output: --output, sharding, splits, format.

  file_format: the default --file_format; held_out: what --eval_fraction
  is a fraction of ("images", "conversations").
  """
  from absl import flags

  flags.DEFINE_string("output", None, "Prefix of the files (e.g. records/photos), or a "
                      "directory; local or gs://.")
  flags.DEFINE_integer("num_shards", 1, "Files per split (at most one per record); give at "
                       "least as many as the hosts that train.", lower_bound=1)
  flags.DEFINE_float("eval_fraction", 0.0, f"Fraction of the {held_out} held out as the eval "
                     "split (0: only a train split).", lower_bound=0.0, upper_bound=0.99)
  flags.DEFINE_integer("seed", 0, "Seed of the eval split (and of the record order where "
                       "records are shuffled).")
  flags.DEFINE_enum("file_format", file_format, list(FILE_FORMATS), "Record file format.")
  flags.DEFINE_string("train_split", "train", "Name of the train split in the file names.")
  flags.DEFINE_string("eval_split", "validation", "Name of the eval split in the file names.")


def define_flags() -> None:
  from absl import flags

  flags.DEFINE_string("images_dir", None, "Folder of images (searched recursively).")
  flags.DEFINE_string("captions", None, "A .csv (header: path,caption) or .jsonl file of "
                      "captions; default: a .txt sidecar next to each image.")
  define_output_flags("tfrecord", "images")
  flags.DEFINE_string("image_key", "image", "tf.Example feature of the image bytes.")
  flags.DEFINE_string("text_key", "text", "tf.Example feature of the caption.")


def main(argv: Sequence[str]) -> None:
  from absl import flags

  from mm1_jax import cli

  cli.start(argv)
  FLAGS = flags.FLAGS
  write_records(FLAGS.images_dir, FLAGS.output, captions=FLAGS.captions,
                num_shards=FLAGS.num_shards, eval_fraction=FLAGS.eval_fraction, seed=FLAGS.seed,
                file_format=FLAGS.file_format, image_key=FLAGS.image_key,
                text_key=FLAGS.text_key, train_split=FLAGS.train_split,
                eval_split=FLAGS.eval_split)


if __name__ == "__main__":
  from mm1_jax import cli

  define_flags()
  # ValueError: bad arguments, a malformed captions file, nothing usable.
  cli.run(main, required=["images_dir", "output"], extra_errors=(ValueError,))
