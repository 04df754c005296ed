"""The multimodal input pipeline: SeqIO mixture -> model batches.

    tf.data (SeqIO):  sample the mixture, tokenize, decode + resize images
    host (numpy):     MultimodalFeatureConverter (expand image markers to
                      placeholder runs, fit, pack), then batch

Each host reads a disjoint shard (seqio.ShardInfo from jax.process_index /
process_count). The stream is deterministic given the seed, and its position
(tf.data iterator state + the packer's partly filled sequence) can be saved
and restored, so a resumed run sees exactly the batches it would have seen.

Bad records (undecodable or truncated images, records with neither text nor
images) are skipped and counted in `num_skipped`, never fatal.

Batch contract (per host, B = global batch / process count):
    decoder_input_tokens, decoder_target_tokens, decoder_loss_weights,
    decoder_segment_ids, decoder_positions: int32 [B, L]
    images: uint8 [B, max_images, H, W, 3]; image_mask: bool [B, max_images]
"""

from __future__ import annotations

import io
import json
import os
from typing import Iterator

import numpy as np
import seqio
import tensorflow as tf

from mm1_jax import paths
from mm1_jax.data import images as image_ops
from mm1_jax.data import packing, sources, tasks, tokenizer
from mm1_jax.data.converter import MultimodalFeatureConverter
from mm1_jax.data.config import InputConfig
from mm1_jax.models.config import MM1Config
from mm1_jax.typed_config import ConfigError

tf.config.set_visible_devices([], "GPU")


def _tf_stream(provider, config: InputConfig, model: MM1Config, shard: seqio.ShardInfo
               ) -> tf.data.Dataset:
  """Tokenized examples with decoded images, numbered so skips can be counted."""
  dataset = provider.get_dataset(
      sequence_length=None, split=config.split, shuffle=config.shuffle, seed=config.seed,
      shard_info=shard, num_epochs=config.num_epochs, use_cached=False)
  image_size = model.encoder.image_size

  def decode(index, example):
    inputs = tf.cast(example.get("inputs", tf.zeros([0], tf.int32)), tf.int32)
    targets = tf.cast(example["targets"], tf.int32)
    encoded = example.get("images", tf.zeros([0], tf.string))
    return {
        "index": index,
        "tokens": tf.concat([inputs, targets], 0),
        "loss_mask": tf.concat([tf.zeros_like(inputs), tf.ones_like(targets)], 0),
        "images": image_ops.decode_and_resize(encoded, image_size, config.image_policy,
                                              pad_color=model.encoder.image_mean),
    }

  dataset = dataset.enumerate().map(decode, num_parallel_calls=tf.data.AUTOTUNE,
                                    deterministic=True)
  # A record whose image does not decode raises inside the map; drop it here.
  # The index gap it leaves is how the host side counts it.
  dataset = dataset.ignore_errors()
  options = tf.data.Options()
  options.deterministic = True
  # Sources that read files by index through py_function are deterministic in
  # the index, so their "external state" needs no checkpointing.
  options.experimental_external_state_policy = tf.data.experimental.ExternalStatePolicy.IGNORE
  return dataset.with_options(options).prefetch(tf.data.AUTOTUNE)


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
    self.converter = MultimodalFeatureConverter(model, self.vocabulary, config.seq_len,
                                                config.pack, config.image_start_end)
    name = tasks.with_vocabulary(config.mixture, config.vocabulary)
    provider = tasks.get_task_or_mixture(name)
    for source_name in tasks.required_sources(name):
      sources.prepare(source_name)
    shard = seqio.ShardInfo(index=process_index, num_shards=process_count)
    self._dataset = _tf_stream(provider, config, model, shard)
    self._iterator = iter(self._dataset)
    self._ready: list[dict[str, np.ndarray]] = []  # Finished sequences not yet batched.
    self._next_index = 0  # The index the next good record should have.
    self.num_skipped = 0  # Bad records skipped so far (a training metric).
    self.num_examples = 0  # Good records consumed.
    self._exhausted = False

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def _take_example(self) -> dict[str, np.ndarray] | None:
    """The next usable example (expanded and fitted), or None at the end.

    Skips, and counts, records the tf.data stage dropped (their index is
    missing) and records with nothing to train on.
    """
    while True:
      try:
        record = next(self._iterator)
      except StopIteration:
        return None
      index = int(record["index"])
      self.num_skipped += index - self._next_index
      self._next_index = index + 1
      example = self.converter.prepare({key: record[key].numpy()
                                        for key in ("tokens", "loss_mask", "images")})
      if example is None:
        self.num_skipped += 1
        continue
      self.num_examples += 1
      return example

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
        {"num_ready": len(self._ready), "next_index": self._next_index,
         "num_skipped": self.num_skipped, "num_examples": self.num_examples,
         "exhausted": self._exhausted}))

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
    self._next_index = counters["next_index"]
    self.num_skipped = counters["num_skipped"]
    self.num_examples = counters["num_examples"]
    self._exhausted = counters["exhausted"]

