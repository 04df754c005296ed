"""Register SeqIO tasks over your own files in a few lines.

Image-text pairs and interleaved documents, stored as serialized tf.Example
records in TFRecord or array_record files:

    from mm1_jax.data import user_tasks
    user_tasks.register_image_text_task(
        "my_captions", {"train": "/data/caps/train-*.tfrecord"},
        image_key="jpeg", text_key="caption")
    user_tasks.register_interleaved_task(
        "my_docs", {"train": "/data/docs/*.array_record"}, file_format="array_record")
    seqio.MixtureRegistry.add("my_mix", [("my_captions", 50), ("my_docs", 50)])

Conversations (visual instruction tuning; records as written by
`python -m mm1_jax.data.import_llava` from LLaVA JSON):

    user_tasks.register_conversation_task(
        "my_llava", {"train": "/data/llava/records-train-*.array_record"})

The tasks emit the features of mm1_jax/data/tasks.py (inputs, targets,
images; a conversation task roles, texts, images, untokenized, rendered
later by the pipeline's chat template), so they feed the same converter.
Each host reads whole files (seqio's file-level sharding): use at least as
many files per split as hosts.

Bad records are not dropped here but flagged: each example also carries
`problem` ("" or "<reason>: details", e.g. a missing feature key, naming the
task, the key asked for and the keys the record has) and `source`
("file:record number"), which the pipeline counts (mm1_jax/data/health.py).
"""

from __future__ import annotations

import collections
import os
import threading
from typing import Mapping

import seqio
import tensorflow as tf

from mm1_jax.data import health, tasks

FILE_FORMATS = ("tfrecord", "array_record")


# Records read per py_function call (its overhead, ~0.1 ms, is paid per chunk).
# tf.data saves the unread rest of the current chunk in an iterator
# checkpoint, so chunks stay small.
ARRAY_RECORD_CHUNK = 16
# Readers kept open, each holding a file descriptor; beyond this the least
# recently used is dropped (and closed once no read uses it).
MAX_OPEN_READERS = 64


class _OpenReaders:
  """array_record readers by path, each file opened once per process.

  tf.data calls the readers from its threads; array_record's random-access
  reads are thread-safe. A file rewritten since it was opened (another
  mtime, size or inode) is opened again, so a rerun's records are read.
  """

  def __init__(self, capacity: int):
    self.capacity = capacity
    self._readers: collections.OrderedDict[str, tuple] = collections.OrderedDict()
    self._lock = threading.Lock()

  @staticmethod
  def _version(path: str) -> tuple:
    try:
      stat = os.stat(path)
    except OSError:  # Not a local file: array_record reports the problem on open.
      return ()
    return (stat.st_mtime_ns, stat.st_size, stat.st_ino)

  def get(self, path: str):
    from array_record.python import array_record_module

    version = self._version(path)
    with self._lock:
      opened = self._readers.pop(path, None)
      if opened is None or opened[0] != version:
        # readahead 0: reads are by index range, the readahead buffer would
        # only hold memory (as grain's ArrayRecordDataSource opens them).
        opened = (version, array_record_module.ArrayRecordReader(
            path, "readahead_buffer_size:0", file_reader_buffer_size=32768))
      self._readers[path] = opened
      while len(self._readers) > self.capacity:
        self._readers.popitem(last=False)
      return opened[1]

  def clear(self) -> None:
    """Drops every reader (each closes once no read uses it)."""
    with self._lock:
      self._readers.clear()


_READERS = _OpenReaders(MAX_OPEN_READERS)


def _read_array_record(path: tf.Tensor) -> tf.data.Dataset:
  """Records of one array_record file: tf.string [] each, in file order.

  Chunks of ARRAY_RECORD_CHUNK records are read by index range through one
  reader per file (_READERS). A range dataset drives the chunks, so the
  order is deterministic and the iterator checkpointable (no generator).
  """
  def count(file_path):
    return _READERS.get(file_path.numpy().decode()).num_records()

  def read(file_path, start, end):
    records = _READERS.get(file_path.numpy().decode()).read(int(start), int(end))
    return tf.constant(records, tf.string)  # A list would be taken for several outputs.

  num_records = tf.reshape(tf.py_function(count, [path], tf.int64), [])

  def chunk(start):
    end = tf.minimum(start + ARRAY_RECORD_CHUNK, num_records)
    return tf.reshape(tf.py_function(read, [path, start, end], tf.string), [-1])

  return tf.data.Dataset.range(0, num_records, ARRAY_RECORD_CHUNK).map(chunk).unbatch()


def _record_keys(record: tf.Tensor) -> tf.Tensor:
  """The feature keys of a serialized tf.Example: tf.string [n]."""
  def field(data, message, name):
    return tf.io.decode_proto(data, message, [name], [tf.string])[1][0]
  features = tf.reshape(field(record, "tensorflow.Example", "features"), [])
  entries = tf.reshape(field(features, "tensorflow.Features", "feature"), [-1])
  return tf.reshape(field(entries, "tensorflow.Features.FeatureEntry", "key"), [-1])


def _source(name: str, split_to_pattern: Mapping[str, str], file_format: str,
            features: Mapping[str, tf.io.FixedLenFeature | tf.io.RaggedFeature],
            optional: tuple[str, ...] = ()) -> seqio.DataSource:
  """Parsed records plus `problem` (a missing key) and `source` (file:number).

  A missing list feature is no problem by itself (a document without images
  may omit it); `_absent` describes it, for `_register`'s problem check,
  unless it is `optional` (its absence never explains a problem).
  """
  if file_format not in FILE_FORMATS:
    raise ValueError(f"file_format {file_format!r} is not one of {FILE_FORMATS}.")
  read_file = tf.data.TFRecordDataset if file_format == "tfrecord" else _read_array_record
  # Defaults, so a record missing a key parses (and is flagged) instead of
  # raising inside tf.data, where the error names neither task nor key.
  lenient = {k: (tf.io.FixedLenFeature(f.shape, f.dtype, default_value="")
                 if isinstance(f, tf.io.FixedLenFeature) else f) for k, f in features.items()}
  checked = sorted(k for k in features if k not in optional)
  wanted = tf.constant(checked, tf.string)
  required = tf.constant([isinstance(features[k], tf.io.FixedLenFeature) for k in checked],
                         tf.bool)

  def parse(number, record, path):
    parsed = tf.io.parse_single_example(record, lenient)
    present = _record_keys(record)
    missing = tf.logical_not(tf.reduce_any(
        tf.equal(wanted[:, None], present[None, :]), axis=1))
    absent = tf.cond(
        tf.reduce_any(missing),
        lambda: tf.strings.join([
            f"{health.MISSING_FEATURE}: task {name!r} asks for key '",
            tf.strings.reduce_join(tf.boolean_mask(wanted, missing), separator="', '"),
            "'; the record has keys '", tf.strings.reduce_join(present, separator="', '"),
            "'"]),
        lambda: tf.constant(""))
    problem = tf.where(tf.reduce_any(missing & required), absent, "")
    source = tf.strings.join([path, tf.strings.as_string(number)], separator=":")
    return {**parsed, health.PROBLEM_KEY: problem, health.SOURCE_KEY: source,
            "_absent": absent}

  return seqio.FileDataSource(
      read_file_fn=lambda path: read_file(path).enumerate().map(
          lambda number, record: parse(number, record, path)),
      split_to_filepattern=dict(split_to_pattern))


def _register(name: str, source: seqio.DataSource, to_example, problem=None,
              conversation: bool = False) -> seqio.Task:
  """Registers `name`: records -> to_example (+ problem, source) -> tokens.

  problem(example) -> "" or "<reason>: details" flags records the pipeline
  should skip (and count) rather than dropping them here. A `conversation`
  task stops there: the pipeline renders its turns with the run's chat
  template, which tokenizes and ends the turns (no EOS appended here).
  """
  def with_health(record):
    example = to_example(record)
    flagged = record[health.PROBLEM_KEY]
    if problem is not None:
      found = tf.cond(flagged == "", lambda: problem(example), lambda: flagged)
      # A problem with a missing list feature behind it: name the key.
      flagged = tf.where((found != "") & (record["_absent"] != ""), record["_absent"], found)
    return {**example, health.PROBLEM_KEY: flagged, health.SOURCE_KEY: record[health.SOURCE_KEY]}

  preprocessors = [seqio.map_over_dataset(with_health)]
  if not conversation:
    preprocessors += [tasks.tokenize_text, seqio.preprocessors.append_eos_after_trim]
  return seqio.TaskRegistry.add(
      name, source=source, preprocessors=preprocessors,
      output_features=tasks.output_features(tasks.VOCABULARY, conversation=conversation))


def register_image_text_task(name: str, split_to_pattern: Mapping[str, str], *,
                             file_format: str = "tfrecord", image_key: str = "image",
                             text_key: str = "text", prompt: str = "") -> seqio.Task:
  """A caption-style task: "<prompt><image>" then the record's text.

  Records: tf.Example with `image_key` (encoded PNG/JPEG bytes) and
  `text_key` (UTF-8 text).
  """
  features = {image_key: tf.io.FixedLenFeature([], tf.string),
              text_key: tf.io.FixedLenFeature([], tf.string)}

  def to_example(record):
    return {"inputs": prompt + tasks.IMAGE_MARKER, "targets": record[text_key],
            "images": tf.reshape(record[image_key], [1])}

  return _register(name, _source(name, split_to_pattern, file_format, features), to_example)


def register_interleaved_task(name: str, split_to_pattern: Mapping[str, str], *,
                              file_format: str = "tfrecord", images_key: str = "images",
                              text_key: str = "text") -> seqio.Task:
  """An interleaved-document task.

  Records: tf.Example with `text_key` (the document's text, one "<image>"
  marker where each image goes) and `images_key` (encoded images, in the
  order of their markers). Documents whose marker count differs from their
  image count would misalign, so they are skipped (and counted).
  """
  features = {images_key: tf.io.RaggedFeature(tf.string),
              text_key: tf.io.FixedLenFeature([], tf.string)}

  def to_example(record):
    return {"inputs": "", "targets": record[text_key], "images": record[images_key]}

  def mismatch(example):
    num_markers = tf.size(tf.strings.split(example["targets"], tasks.IMAGE_MARKER)) - 1
    num_images = tf.size(example["images"])
    return tf.cond(
        tf.equal(tf.cast(num_markers, tf.int32), num_images), lambda: tf.constant(""),
        lambda: tf.strings.join([
            f"{health.IMAGE_COUNT_MISMATCH}: ", tf.strings.as_string(num_markers),
            " <image> markers but ", tf.strings.as_string(num_images), " images"]))

  return _register(name, _source(name, split_to_pattern, file_format, features), to_example,
                   problem=mismatch)


# --- conversations ----------------------------------------------------------------

CONVERSATION_ROLES = ("system", "user", "assistant")
# Why a conversation record is skipped, besides health.IMAGE_COUNT_MISMATCH
# (health.reason_of finds these as the "<reason>: " a problem starts with).
UNKNOWN_ROLE = "unknown role"
TURN_COUNT_MISMATCH = "turn count mismatch"
NO_ASSISTANT_TEXT = "no assistant text"


def count_markers(texts: tf.Tensor) -> tf.Tensor:
  """IMAGE_MARKERs in tf.string [t] texts: int64 []."""
  return tf.reduce_sum(tf.strings.split(texts, tasks.IMAGE_MARKER).row_lengths() - 1)


def conversation_problem(example: Mapping[str, tf.Tensor]) -> tf.Tensor:
  """"" or "<reason>: details" for a conversation the pipeline cannot train on.

  example: roles / texts tf.string [t], images tf.string [k]. Checked in
  order: one role per text, known roles, one image per "<image>" marker,
  an assistant turn with text (nothing would be trained on otherwise).
  """
  roles, texts, images = example["roles"], example["texts"], example["images"]
  as_string = tf.strings.as_string

  def turn_counts_differ():
    return tf.strings.join([f"{TURN_COUNT_MISMATCH}: ", as_string(tf.size(roles)),
                            " roles but ", as_string(tf.size(texts)), " texts"])

  def turns_problem():
    known = tf.reduce_any(tf.equal(roles[:, None], tf.constant(CONVERSATION_ROLES)[None, :]),
                          axis=1)
    first_unknown = tf.argmin(tf.cast(known, tf.int32))
    num_markers, num_images = count_markers(texts), tf.size(images, out_type=tf.int64)
    answered = tf.reduce_any(tf.equal(roles, "assistant")
                             & (tf.strings.length(tf.strings.strip(texts)) > 0))

    def unknown_role():
      return tf.strings.join([
          f"{UNKNOWN_ROLE}: turn ", as_string(first_unknown), " has role '",
          roles[first_unknown], "'; expected one of ", ", ".join(CONVERSATION_ROLES)])

    def image_count_mismatch():
      return tf.strings.join([f"{health.IMAGE_COUNT_MISMATCH}: ", as_string(num_markers),
                              " <image> markers but ", as_string(num_images), " images"])

    def no_assistant_text():
      return tf.strings.join([f"{NO_ASSISTANT_TEXT}: none of the ", as_string(tf.size(roles)),
                              " turns is an assistant turn with text"])

    return tf.cond(
        tf.reduce_all(known),
        lambda: tf.cond(
            tf.equal(num_markers, num_images),
            lambda: tf.cond(answered, lambda: tf.constant(""), no_assistant_text),
            image_count_mismatch),
        unknown_role)

  return tf.cond(tf.equal(tf.size(roles), tf.size(texts)), turns_problem, turn_counts_differ)


def register_conversation_task(name: str, split_to_pattern: Mapping[str, str], *,
                               file_format: str = "array_record") -> seqio.Task:
  """A conversation task (visual instruction tuning) over record files.

  Records: tf.Example with `roles` (bytes list [t]: "system" | "user" |
  "assistant"), `texts` (bytes list [t]: each turn's text, one "<image>"
  marker per image) and `images` (bytes list [k]: encoded images in marker
  order; may be empty or absent), as mm1_jax.data.import_llava writes them.
  Examples: roles, texts, images, problem, source; untokenized, for the
  pipeline's chat template (data.chat_template). Records that cannot train
  (conversation_problem) are flagged, and skipped and counted downstream.
  """
  features = {"roles": tf.io.RaggedFeature(tf.string),
              "texts": tf.io.RaggedFeature(tf.string),
              "images": tf.io.RaggedFeature(tf.string)}

  def to_example(record):
    return {"roles": record["roles"], "texts": record["texts"], "images": record["images"]}

  source = _source(name, split_to_pattern, file_format, features, optional=("images",))
  return _register(name, source, to_example, problem=conversation_problem, conversation=True)
