"""The multimodal input pipeline: SeqIO mixture -> model batches.

    tf.data (SeqIO):  sample the mixture, tokenize, decode + resize images
    host (numpy):     MultimodalFeatureConverter (expand image markers to
                      placeholder runs, fit, pack), then batch

Each host reads a disjoint shard (seqio.ShardInfo from jax.process_index /
process_count). The stream is deterministic given the seed, and its position
(tf.data iterator state + the packer's partly filled sequence) can be saved
and restored, so a resumed run sees exactly the batches it would have seen.

Bad records (undecodable or truncated images, missing features, records with
neither text nor images, records that do not fit) are skipped and counted per
task and reason in `health` (mm1_jax/data/health.py); a task with too many of
them stops the run with a DataHealthError instead of silently vanishing.

Batch contract (per host, B = global batch / process count):
    decoder_input_tokens, decoder_target_tokens, decoder_loss_weights,
    decoder_segment_ids, decoder_positions: int32 [B, L]
    images: uint8 [B, max_images, H, W, 3]; image_mask: bool [B, max_images]
"""

from __future__ import annotations

import gc
import io
import json
import os
import re
from typing import Iterator

import numpy as np
import seqio
import tensorflow as tf

from mm1_jax import native_logs, paths, private_apis
from mm1_jax.data import health as health_lib
from mm1_jax.data import images as image_ops
from mm1_jax.data import conversations, image_split, packing, sources, tasks, tokenizer
from mm1_jax.data.converter import MultimodalFeatureConverter
from mm1_jax.data import config as data_config
from mm1_jax.data.config import InputConfig
from mm1_jax.models.config import MM1Config
from mm1_jax.typed_config import ConfigError

tf.config.set_visible_devices([], "GPU")


def _task_datasets(provider, config: InputConfig, shard: seqio.ShardInfo
                   ) -> tuple[list[str], tf.data.Dataset]:
  """The task names and the mixed stream, each record tagged with its task.

  seqio's Mixture.get_dataset drops every feature but the output ones, so the
  mixture is sampled here, as it does (same tasks, rates, seed semantics and
  sample function: the same records in the same order), after adding `task`
  (an index into the names), `problem` and `source` (see data/health.py).
  """
  keys = set(provider.output_features) | {health_lib.PROBLEM_KEY, health_lib.SOURCE_KEY}
  is_mixture = isinstance(provider, seqio.Mixture)
  task_list = [t for t in provider.tasks if config.split in t.splits] if is_mixture else [provider]
  if not task_list:
    raise ValueError(f"No datasets have a {config.split!r} split")

  def tagged(index, task):
    dataset = task.get_dataset(
        sequence_length=None, split=config.split, shuffle=config.shuffle, seed=config.seed,
        shard_info=shard, num_epochs=config.num_epochs, use_cached=False)

    def tag(example):
      # One structure for every task (sampling interleaves them): text tasks
      # lack the conversation features and conversation tasks the tokens.
      example = {k: v for k, v in example.items() if k in keys}
      for key in ("inputs", "targets"):
        example[key] = tf.cast(example.get(key, tf.zeros([0], tf.int32)), tf.int32)
      for key in tasks.STRING_FEATURES:
        example.setdefault(key, tf.zeros([0], tf.string))
      example.setdefault(health_lib.PROBLEM_KEY, tf.constant(""))
      example.setdefault(health_lib.SOURCE_KEY, tf.constant(""))
      return {**example, "task": tf.constant(index, tf.int32)}
    return dataset.map(tag, num_parallel_calls=tf.data.AUTOTUNE)

  datasets = [tagged(i, task) for i, task in enumerate(task_list)]
  if not is_mixture:
    return [provider.name], datasets[0]
  sample = private_apis.mixture_sample_fn(provider)
  # Mixture.get_dataset's seed: the given one, else None to shuffle, else 42.
  seed = config.seed if config.seed is not None else (None if config.shuffle else 42)
  mixed = sample(datasets, [provider.get_rate(task) for task in task_list], seed)
  return [task.name for task in task_list], mixed


def _decode_images(encoded: tf.Tensor, config: InputConfig, model: MM1Config
                   ) -> tuple[tf.Tensor, tf.Tensor]:
  """tf.string [k] -> (images uint8 [n, S, S, 3], layouts int32 [k, 2]).

  Without image splitting n = k and the layouts are (1, 1); with it, every
  image's sub-images and its (rows, cols) (mm1_jax/data/image_split.py).
  Raises on an undecodable image.
  """
  scheme = data_config.SplitScheme.from_config(config)
  if scheme is not None:
    return image_split.decode_and_split(encoded, model.encoder.image_size,
                                        config.image_policy, scheme,
                                        pad_color=model.encoder.image_mean,
                                        background=config.image_background)
  images = image_ops.decode_and_resize(encoded, model.encoder.image_size, config.image_policy,
                                       pad_color=model.encoder.image_mean,
                                       background=config.image_background)
  return images, tf.ones([tf.shape(encoded)[0], 2], tf.int32)


def _tf_stream(provider, config: InputConfig, model: MM1Config, shard: seqio.ShardInfo
               ) -> tuple[list[str], tf.data.Dataset]:
  """Task names and tokenized records with decoded images, none dropped.

  A record whose images do not decode comes out with decoded=False and its
  encoded images (for the host to learn why), so every record is counted.
  """
  task_names, dataset = _task_datasets(provider, config, shard)
  image_size = model.encoder.image_size

  def tokens(example):
    inputs, targets = example["inputs"], example["targets"]
    return {
        "task": example["task"],
        "problem": example[health_lib.PROBLEM_KEY],
        "source": example[health_lib.SOURCE_KEY],
        "tokens": tf.concat([inputs, targets], 0),
        "loss_mask": tf.concat([tf.zeros_like(inputs), tf.ones_like(targets)], 0),
        # A conversation's turns, rendered on the host with the chat template.
        "roles": example["roles"],
        "texts": example["texts"],
        "encoded": example["images"],
    }

  def decoded(record):
    images, layouts = _decode_images(record["encoded"], config, model)
    return {**record, "images": images, "image_layouts": layouts,
            "encoded": tf.zeros([0], tf.string), "decoded": tf.constant(True)}

  def failed(record):
    return {**record, "images": tf.zeros([0, image_size, image_size, 3], tf.uint8),
            "image_layouts": tf.zeros([0, 2], tf.int32), "decoded": tf.constant(False)}

  def decode_or_flag(record):
    # tf.data has no try/except: decode in a one-record dataset whose error is
    # ignored, then fall back to the flagged record. Nothing is dropped.
    single = tf.data.Dataset.from_tensors(record)
    return single.map(decoded).ignore_errors().concatenate(single.map(failed)).take(1)

  dataset = dataset.map(tokens, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  # One record per inner dataset: the output keeps the input's order.
  dataset = dataset.interleave(decode_or_flag, cycle_length=8, block_length=1,
                               num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  options = tf.data.Options()
  options.deterministic = True
  # Sources that read files by index through py_function are deterministic in
  # the index, so their "external state" needs no checkpointing.
  options.experimental_external_state_policy = tf.data.experimental.ExternalStatePolicy.IGNORE
  return task_names, dataset.with_options(options).prefetch(tf.data.AUTOTUNE)


def _first_line(message: str) -> str:
  """An error message's first line without TensorFlow's {{function_node ...}}."""
  message = re.sub(r"\{\{[^}]*\}\}\s*", "", message).strip()
  return message.splitlines()[0] if message else ""


class MultimodalInput:
  """Iterator of host-local batches (dicts of numpy arrays) with saveable position.

  Example:
    pipeline = MultimodalInput(InputConfig(mixture="mm1_pretrain"), model_config)
    batch = next(pipeline)
    pipeline.save(directory); ...; pipeline.restore(directory)
  """

  def __init__(self, config: InputConfig, model: MM1Config, process_index: int | None = None,
               process_count: int | None = None, vocabulary: seqio.Vocabulary | None = None):
    if process_index is None or process_count is None:
      import jax  # Only the data layer's caller needs JAX to be initialised.
      process_index, process_count = jax.process_index(), jax.process_count()
    if config.batch_size % process_count:
      raise ConfigError(f"data.batch_size: {config.batch_size} does not split evenly over "
                        f"{process_count} hosts; use a multiple of {process_count}.")
    self.config, self.model = config, model
    self.local_batch_size = config.batch_size // process_count
    self.vocabulary = vocabulary or (tokenizer.get_vocabulary(config.vocabulary)
                                     if config.vocabulary else tasks.VOCABULARY)
    self.converter = MultimodalFeatureConverter(
        model, self.vocabulary, config.seq_len, config.pack, config.image_start_end,
        data_config.SplitScheme.from_config(config))
    try:
      self.chat_template = conversations.get_template(config.chat_template, self.vocabulary)
    except ValueError as error:
      raise ConfigError(str(error)) from None
    name = tasks.with_vocabulary(config.mixture, config.vocabulary)
    provider = tasks.get_task_or_mixture(name)
    for source_name in tasks.required_sources(name):
      sources.prepare(source_name)
    shard = seqio.ShardInfo(index=process_index, num_shards=process_count)
    self._task_names, self._dataset = _tf_stream(provider, config, model, shard)
    self._iterator = iter(self._dataset)
    self._ready: list[dict[str, np.ndarray]] = []  # Finished sequences not yet batched.
    # Per-task read/used/skipped counts (scalars, console and end-of-run text).
    self.health = health_lib.DataHealth(config.max_skip_fraction)
    self._exhausted = False

  @property
  def num_skipped(self) -> int:
    """Bad records skipped so far, all tasks (a training metric)."""
    return self.health.num_skipped

  @property
  def num_examples(self) -> int:
    """Good records consumed, all tasks."""
    return self.health.num_used

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def _take_example(self) -> dict[str, np.ndarray] | None:
    """The next usable example (expanded and fitted), or None at the end.

    Every record read is counted in `health`, used or skipped with its reason;
    raises DataHealthError when a task's data is too broken to train on.
    """
    while True:
      try:
        record = next(self._iterator)
      except StopIteration:
        return None
      except (tf.errors.InvalidArgumentError, tf.errors.DataLossError) as error:
        # Raised upstream of the task tag (e.g. a corrupt file); the iterator
        # goes on with the next record.
        self.health.skipped(health_lib.UNKNOWN_TASK,
                            health_lib.reason_of(error.message, "tf.data error"),
                            detail=_first_line(error.message))
        continue
      task = self._task_names[int(record["task"])]
      source = record["source"].numpy().decode("utf-8", "replace")
      problem = record["problem"].numpy().decode("utf-8", "replace")
      if problem:
        self.health.skipped(task, health_lib.reason_of(problem, "bad record"), source, problem)
        continue
      if not bool(record["decoded"]):
        self._skip_undecodable(task, source, record["encoded"].numpy())
        continue
      images, layouts = record["images"].numpy(), record["image_layouts"].numpy()
      example = {"images": images}
      if self.converter.image_split is not None:
        example["image_layouts"] = layouts
      if len(record["roles"].numpy()):
        try:
          example.update(self._render(record, len(layouts)))
        except conversations.ConversationError as error:
          reason = (health_lib.IMAGE_COUNT_MISMATCH if str(error).startswith(
              health_lib.IMAGE_COUNT_MISMATCH) else health_lib.BAD_CONVERSATION)
          self.health.skipped(task, reason, source, str(error))
          continue
      else:
        example.update(tokens=record["tokens"].numpy(), loss_mask=record["loss_mask"].numpy())
      tokens, loss_mask = example["tokens"], example["loss_mask"]
      if not len(images) and not np.any(tokens[loss_mask > 0] != self.converter.eos_id):
        self.health.skipped(task, health_lib.EMPTY_TEXT, source)
        continue
      prepared = self.converter.prepare(example)
      if prepared is None or not prepared["loss_mask"].any():
        # Cut to fit, nothing is left to train on: a too long prompt, a
        # prompt that is an image whose run does not fit, or a conversation
        # whose first answer ends past seq_len.
        no_image = len(images) and (prepared is None or not len(prepared["images"]))
        reason = (health_lib.FIRST_ANSWER_DOES_NOT_FIT if "cut_after" in example else
                  health_lib.NO_IMAGE_FITS if no_image else health_lib.DOES_NOT_FIT)
        self.health.skipped(task, reason, source)
        continue
      self.health.used(task, truncated=prepared.pop("truncated"))
      return prepared

  def _render(self, record, num_images: int) -> dict[str, np.ndarray]:
    """tokens, loss_mask and cut_after of a conversation record (chat template).

    Raises ConversationError when it cannot be rendered or its image markers
    do not match its images.
    """
    turns = conversations.turns_from_features(record["roles"].numpy(), record["texts"].numpy())
    tokens, loss_mask, turn_ends = self.chat_template.render(turns)
    num_markers = int(np.count_nonzero(tokens == self.converter.marker_id))
    if num_markers != num_images:
      raise conversations.ConversationError(
          f"{health_lib.IMAGE_COUNT_MISMATCH}: {num_markers} <image> markers but "
          f"{num_images} images")
    return {"tokens": tokens, "loss_mask": loss_mask, "cut_after": turn_ends}

  def _skip_undecodable(self, task: str, source: str, encoded: np.ndarray) -> None:
    """Counts a record whose images did not decode, with the decoder's reason.

    tf.data only said that it failed: decoding again here (bad records are
    rare) gives the error message, whose prefix is the reason.
    """
    for number, data in enumerate(encoded):
      try:
        _decode_images(tf.constant([data]), self.config, self.model)
      except (tf.errors.OpError, ValueError) as error:
        message = error.message if isinstance(error, tf.errors.OpError) else str(error)
        self.health.skipped(task, health_lib.reason_of(message), source,
                            f"image {number}: {_first_line(message)}")
        return
    self.health.skipped(task, health_lib.UNDECODABLE_IMAGE, source)

  def __next__(self) -> dict[str, np.ndarray]:
    while len(self._ready) < self.local_batch_size and not self._exhausted:
      example = self._take_example()
      if example is None:
        self._exhausted = True
        self._ready.extend(self.converter.flush())
      else:
        self._ready.extend(self.converter.convert(example))
    if not self._ready:
      raise StopIteration
    batch, self._ready = self._ready[:self.local_batch_size], self._ready[self.local_batch_size:]
    while len(batch) < self.local_batch_size:  # Only at the end of a finite split.
      batch.append(self.converter.empty_sequence())
    return packing.stack(batch)

  def close(self) -> None:
    """Releases the tf.data stream (the end of a run). Its known warning
    about an in-memory cache not read to its end is kept off the console."""
    with native_logs.filtered(native_logs.PARTIAL_CACHE_READ):
      self._iterator = self._dataset = None
      gc.collect()  # The C++ iterator is destroyed (and warns) here, inside the filter.

  # --- saving and restoring the position -------------------------------------

  def save(self, directory: str) -> None:
    """Writes the stream position under `directory` (created if needed).

    `directory` may be a gs:// URI: files go through etils.epath, the
    iterator through tf.train.Checkpoint (TensorFlow's file systems).
    """
    directory = paths.as_path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tf.train.Checkpoint(iterator=self._iterator).write(os.fspath(directory / "tf_data"))
    arrays = {f"ready_{i}_{k}": v for i, seq in enumerate(self._ready) for k, v in seq.items()}
    arrays.update({f"packer_{k}": np.asarray(v) for k, v in self.converter.get_state().items()})
    # Zipped in memory: zipfile seeks back in its output, which the write-only
    # file objects of gs:// (tf.io.gfile) refuse.
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    with (directory / "host_state.npz").open("wb") as f:
      f.write(buffer.getvalue())
    (directory / "counters.json").write_text(json.dumps(
        {"num_ready": len(self._ready), "num_skipped": self.num_skipped,
         "num_examples": self.num_examples, "exhausted": self._exhausted,
         "health": self.health.state_dict()}))

  def restore(self, directory: str) -> None:
    """Continues from a position written by `save` with the same configs."""
    directory = paths.as_path(directory)
    tf.train.Checkpoint(iterator=self._iterator).read(
        os.fspath(directory / "tf_data")).assert_consumed()
    counters = json.loads((directory / "counters.json").read_text())
    with (directory / "host_state.npz").open("rb") as f:
      data = io.BytesIO(f.read())
    with np.load(data) as arrays:
      self._ready = [{k.split("_", 2)[2]: arrays[k] for k in arrays.files
                      if k.startswith(f"ready_{i}_")} for i in range(counters["num_ready"])]
      self.converter.set_state({k[len("packer_"):]: arrays[k] for k in arrays.files
                              if k.startswith("packer_")})
    # Positions saved before per-task counts existed restore with none.
    self.health.load_state_dict(counters.get("health", {}))
    self._exhausted = counters["exhausted"]

