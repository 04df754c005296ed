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
"""

from __future__ import annotations

from typing import Mapping

import seqio
import tensorflow as tf

from mm1_jax.data import tasks

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


def _source(split_to_pattern: Mapping[str, str], file_format: str,
            features: Mapping[str, tf.io.FixedLenFeature | tf.io.RaggedFeature]
            ) -> seqio.DataSource:
  if file_format not in FILE_FORMATS:
    raise ValueError(f"file_format {file_format!r} is not one of {FILE_FORMATS}.")
  read_file = tf.data.TFRecordDataset if file_format == "tfrecord" else _read_array_record
  parse = lambda record: tf.io.parse_single_example(record, features)
  return seqio.FileDataSource(
      read_file_fn=lambda path: read_file(path).map(parse),
      split_to_filepattern=dict(split_to_pattern))


def _register(name: str, source: seqio.DataSource, to_example, keep=None) -> seqio.Task:
  """Registers `name`: records -> to_example -> (filter by keep) -> tokens."""
  preprocessors = [seqio.map_over_dataset(to_example)]
  if keep is not None:
    preprocessors.append(lambda dataset: dataset.filter(keep))
  preprocessors += [tasks.tokenize_text, seqio.preprocessors.append_eos_after_trim]
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

  return _register(name, _source(split_to_pattern, file_format, features), to_example)


def register_interleaved_task(name: str, split_to_pattern: Mapping[str, str], *,
                              file_format: str = "tfrecord", images_key: str = "images",
                              text_key: str = "text") -> seqio.Task:
  """An interleaved-document task.

  Records: tf.Example with `text_key` (the document's text, one "<image>"
  marker where each image goes) and `images_key` (encoded images, in the
  order of their markers). Documents whose marker count differs from their
  image count would misalign, so they are dropped.
  """
  features = {images_key: tf.io.RaggedFeature(tf.string),
              text_key: tf.io.FixedLenFeature([], tf.string)}

  def to_example(record):
    return {"inputs": "", "targets": record[text_key], "images": record[images_key]}

  def consistent(example):
    num_markers = tf.size(tf.strings.split(example["targets"], tasks.IMAGE_MARKER)) - 1
    return tf.equal(tf.cast(num_markers, tf.int32), tf.size(example["images"]))

  return _register(name, _source(split_to_pattern, file_format, features), to_example,
                   keep=consistent)
