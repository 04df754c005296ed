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

The tasks emit the features of mm1_jax/data/tasks.py (inputs, targets,
images), so they mix with the bundled ones and feed the same converter.
Each host reads whole files (seqio's file-level sharding): use at least as
many files per split as hosts.

Bad records are not dropped here but flagged: each example also carries
`problem` ("" or "<reason>: details", e.g. a missing feature key, naming the
task, the key asked for and the keys the record has) and `source`
("file:record number"), which the pipeline counts (mm1_jax/data/health.py).
"""

from __future__ import annotations

from typing import Mapping

import seqio
import tensorflow as tf

from mm1_jax.data import health, tasks

FILE_FORMATS = ("tfrecord", "array_record")


def _read_array_record(path: tf.Tensor) -> tf.data.Dataset:
  """Records of one array_record file, read by index (deterministic)."""
  from array_record.python import array_record_module

  def read(index, file_path):
    reader = array_record_module.ArrayRecordReader(file_path.numpy().decode())
    try:
      return reader.read([int(index)])[0]
    finally:
      reader.close()

  def count(file_path):
    reader = array_record_module.ArrayRecordReader(file_path.numpy().decode())
    try:
      return reader.num_records()
    finally:
      reader.close()

  num_records = tf.py_function(count, [path], tf.int64)
  return tf.data.Dataset.range(num_records).map(
      lambda i: tf.reshape(tf.py_function(read, [i, path], tf.string), []))


def _record_keys(record: tf.Tensor) -> tf.Tensor:
  """The feature keys of a serialized tf.Example: tf.string [n]."""
  def field(data, message, name):
    return tf.io.decode_proto(data, message, [name], [tf.string])[1][0]
  features = tf.reshape(field(record, "tensorflow.Example", "features"), [])
  entries = tf.reshape(field(features, "tensorflow.Features", "feature"), [-1])
  return tf.reshape(field(entries, "tensorflow.Features.FeatureEntry", "key"), [-1])


def _source(name: str, split_to_pattern: Mapping[str, str], file_format: str,
            features: Mapping[str, tf.io.FixedLenFeature | tf.io.RaggedFeature]
            ) -> seqio.DataSource:
  """Parsed records plus `problem` (a missing key) and `source` (file:number).

  A missing list feature is no problem by itself (a document without images
  may omit it); `_absent` describes it, for `_register`'s problem check.
  """
  if file_format not in FILE_FORMATS:
    raise ValueError(f"file_format {file_format!r} is not one of {FILE_FORMATS}.")
  read_file = tf.data.TFRecordDataset if file_format == "tfrecord" else _read_array_record
  # Defaults, so a record missing a key parses (and is flagged) instead of
  # raising inside tf.data, where the error names neither task nor key.
  lenient = {k: (tf.io.FixedLenFeature(f.shape, f.dtype, default_value="")
                 if isinstance(f, tf.io.FixedLenFeature) else f) for k, f in features.items()}
  wanted = tf.constant(sorted(features))
  required = tf.constant([isinstance(features[k], tf.io.FixedLenFeature)
                          for k in sorted(features)])

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


def _register(name: str, source: seqio.DataSource, to_example, problem=None) -> seqio.Task:
  """Registers `name`: records -> to_example (+ problem, source) -> tokens.

  problem(example) -> "" or "<reason>: details" flags records the pipeline
  should skip (and count) rather than dropping them here.
  """
  def with_health(record):
    example = to_example(record)
    flagged = record[health.PROBLEM_KEY]
    if problem is not None:
      found = tf.cond(flagged == "", lambda: problem(example), lambda: flagged)
      # A problem with a missing list feature behind it: name the key.
      flagged = tf.where((found != "") & (record["_absent"] != ""), record["_absent"], found)
    return {**example, health.PROBLEM_KEY: flagged, health.SOURCE_KEY: record[health.SOURCE_KEY]}

  preprocessors = [seqio.map_over_dataset(with_health), tasks.tokenize_text,
                   seqio.preprocessors.append_eos_after_trim]
  return seqio.TaskRegistry.add(name, source=source, preprocessors=preprocessors,
                                output_features=tasks.OUTPUT_FEATURES)


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
