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
package (installed with requirements.txt) and a local --output.
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


def _resolve(root, written: str) -> str:
  """A captions row's path as find_images spells it (absolute, normalised)."""
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
      image = _resolve(root, written)
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


# --- writing -------------------------------------------------------------------------

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
  if image_key == text_key:
    raise ValueError(f"--image_key and --text_key must differ, both are {image_key!r}.")
  if eval_fraction and train_split == eval_split:
    raise ValueError(f"the train and eval splits must have different names, both are "
                     f"{train_split!r}.")

  pairs, skipped = find_pairs(images_dir, captions)
  # Decode each image once, before the split: unreadable files must not count.
  readable, converted = {}, set()
  for image in sorted({pair.image for pair in pairs}):
    data, reencoded = check_image(paths.as_path(image).read_bytes())
    readable[image] = data is not None
    if reencoded:
      converted.add(image)
    if data is None:
      skipped.setdefault(UNREADABLE_IMAGE, []).append(image)
  pairs = [pair for pair in pairs if readable[pair.image]]

  prefix = output_prefix(output)
  paths.as_path(prefix).parent.mkdir(parents=True, exist_ok=True)
  splits = assign_splits(pairs, eval_fraction, seed, train_split, eval_split) if pairs else {}
  written = {}
  for split, split_pairs in splits.items():
    shards = min(num_shards, len(split_pairs))
    names = shard_names(prefix, split, shards, file_format)
    # A rerun with another shard count: its old shards would match the pattern.
    shard_name = re.compile(re.escape(os.path.basename(f"{prefix}-{split}-")) +
                            r"\d{5}-of-\d{5}\." + file_format + "$")
    for stale in paths.as_path(prefix).parent.glob(os.path.basename(prefix) + "-*"):
      if shard_name.match(stale.name) and os.fspath(stale) not in names:
        stale.unlink()
    for shard, name in enumerate(names):
      writer = _Writer(name, file_format)
      try:
        for pair in split_pairs[shard::shards]:
          data = paths.as_path(pair.image).read_bytes()
          if pair.image in converted:
            data, _ = check_image(data)
          writer.write(to_example(data, pair.caption, image_key, text_key))
      finally:
        writer.close()
    written[split] = {"pattern": split_pattern(prefix, split, file_format), "files": names,
                      "records": len(split_pairs),
                      "images": len({pair.image for pair in split_pairs})}

  report = {
      "images_dir": os.fspath(paths.as_path(images_dir)),
      "captions": os.fspath(paths.as_path(captions)) if captions else "sidecar .txt files",
      "file_format": file_format, "features": {"image": image_key, "text": text_key},
      "num_shards": num_shards, "eval_fraction": eval_fraction, "seed": seed,
      "splits": written, "records": sum(s["records"] for s in written.values()),
      "reencoded_as_png": len(converted),
      "skipped": {reason: {"count": len(skipped[reason]), "meaning": REASONS[reason],
                           "paths": skipped[reason][:EXAMPLES_PER_REASON]}
                  for reason in REASONS if skipped.get(reason)}}
  report_path = paths.write_json(prefix + "-report.json", report, indent=2)
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
  total = sum(info["count"] for info in report["skipped"].values())
  log(f"skipped: {total}" + ("" if total else " (nothing)"))
  for reason, info in report["skipped"].items():
    shown = ", ".join(info["paths"][:3]) + (", ..." if info["count"] > 3 else "")
    log(f"  {reason}: {info['count']} ({info['meaning']}): {shown}")
  log(f"Wrote {report_path}")
  if report["splits"]:
    log("Register them in your tasks module:\n" + task_snippet(report))


# --- the command ---------------------------------------------------------------------

def define_flags() -> None:
  from absl import flags

  flags.DEFINE_string("images_dir", None, "Folder of images (searched recursively).")
  flags.DEFINE_string("captions", None, "A .csv (header: path,caption) or .jsonl file of "
                      "captions; default: a .txt sidecar next to each image.")
  flags.DEFINE_string("output", None, "Prefix of the files (e.g. records/photos), or a "
                      "directory; local or gs://.")
  flags.DEFINE_integer("num_shards", 1, "Files per split (at most one per record); give at "
                       "least as many as the hosts that train.", lower_bound=1)
  flags.DEFINE_float("eval_fraction", 0.0, "Fraction of the images held out as the eval "
                     "split (0: only a train split).", lower_bound=0.0, upper_bound=0.99)
  flags.DEFINE_integer("seed", 0, "Seed of the record order and the eval split.")
  flags.DEFINE_enum("file_format", "tfrecord", list(FILE_FORMATS), "Record file format.")
  flags.DEFINE_string("image_key", "image", "tf.Example feature of the image bytes.")
  flags.DEFINE_string("text_key", "text", "tf.Example feature of the caption.")
  flags.DEFINE_string("train_split", "train", "Name of the train split in the file names.")
  flags.DEFINE_string("eval_split", "validation", "Name of the eval split in the file names.")


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
