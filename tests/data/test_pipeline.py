"""The SeqIO mixture -> batch pipeline on the bundled real data."""

import contextlib
import dataclasses
import io
import math

import numpy as np
import pytest
import seqio
import tensorflow as tf
from etils import epath
from etils.epath import backend as epath_backend
from PIL import Image

from configs import tiny
from mm1_jax import config_lib
from mm1_jax.data import packing, pipeline, tasks, user_tasks
from mm1_jax.data.batch import DTYPES, check_image_placeholders
from mm1_jax.data.config import InputConfig

MODEL = config_lib.mm1_config(tiny.get_config())
CONFIG = InputConfig(mixture="mm1_pretrain", batch_size=4, seq_len=128, seed=7)


def make_input(config=CONFIG, **kwargs):
  return pipeline.MultimodalInput(config, MODEL, process_index=kwargs.pop("index", 0),
                                  process_count=kwargs.pop("count", 1), **kwargs)


def batches(source, count):
  return [next(source) for _ in range(count)]


def assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert set(x) == set(y)
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_batch_contract_and_every_run_matches_a_real_image():
  source = make_input()
  for batch in batches(source, 5):
    assert {k: v.dtype for k, v in batch.items()} == DTYPES
    assert batch["decoder_input_tokens"].shape == (4, 128)
    assert batch["images"].shape == (4, MODEL.max_images, 64, 64, 3)
    check_image_placeholders(batch["decoder_input_tokens"], batch["image_mask"],
                             MODEL.num_image_tokens, MODEL.image_placeholder_id)
    placeholders = batch["decoder_target_tokens"] == MODEL.image_placeholder_id
    assert not np.any(batch["decoder_loss_weights"][placeholders])
    assert not np.any(batch["decoder_loss_weights"][batch["decoder_segment_ids"] == 0])
    assert batch["image_mask"].any() and batch["decoder_loss_weights"].sum() > 0
    # Real images are real pictures (not blank slots), padding slots are zero.
    assert batch["images"][batch["image_mask"]].std() > 10
    assert not batch["images"][~batch["image_mask"]].any()
  assert source.num_skipped == 0


def task_of(example):
  """Which task an unpacked example came from, by its layout."""
  num_images = len(example["images"])
  if num_images == 0:
    return "shakespeare_text"
  # Captions put their image in the prompt; documents have no prompt.
  return "easy_vqa_caption" if len(example["inputs"]) else "easy_vqa_interleaved"


def test_mixture_frequencies_are_45_45_10():
  provider = tasks.get_task_or_mixture("mm1_pretrain")
  dataset = provider.get_dataset(sequence_length=None, split="train", shuffle=True, seed=3,
                                 use_cached=False)
  count = 3000
  counts = {name: 0 for name in tasks.MIXTURES["mm1_pretrain"]}
  for example in dataset.take(count).as_numpy_iterator():
    counts[task_of(example)] += 1
  for name, rate in tasks.MIXTURES["mm1_pretrain"].items():
    p = rate / 100
    # 4.5 standard deviations of a binomial proportion: fails by chance ~1e-5.
    assert abs(counts[name] / count - p) < 4.5 * math.sqrt(p * (1 - p) / count), counts


def test_same_seed_same_batches_other_seed_other_batches():
  first = batches(make_input(), 3)
  assert_same_batches(first, batches(make_input(), 3))
  other = batches(make_input(dataclasses.replace(CONFIG, seed=8)), 3)
  assert not np.array_equal(first[0]["decoder_target_tokens"], other[0]["decoder_target_tokens"])


def test_hosts_read_disjoint_shards():
  def captions(index, count):
    provider = tasks.get_task_or_mixture("easy_vqa_caption")
    dataset = provider.get_dataset(sequence_length=None, split="test", shuffle=False,
                                   shard_info=seqio.ShardInfo(index, count), num_epochs=1,
                                   use_cached=False)
    return [bytes(ex["images"][0]) for ex in dataset.as_numpy_iterator()]

  everything = captions(0, 1)
  host0, host1 = captions(0, 2), captions(1, 2)
  assert not set(host0) & set(host1)
  assert sorted(host0 + host1) == sorted(everything) and len(everything) == 1000


def test_host_batches_split_the_global_batch():
  config = dataclasses.replace(CONFIG, batch_size=8)
  batch = next(make_input(config, index=1, count=2))
  assert batch["decoder_input_tokens"].shape[0] == 4
  with pytest.raises(Exception, match=r"data.batch_size: 8 does not split evenly over 3 hosts"):
    make_input(config, index=0, count=3)


def gfile_open(original_open, path, mode):
  """epath's open of a gs:// path: TensorFlow's gfile (write-only when writing)."""
  del original_open
  return epath_backend.tf_backend.open(path, mode)


@pytest.mark.parametrize("file_system", ["local", "gfile"])
def test_restored_position_gives_the_same_next_batches(tmp_path, file_system):
  source = make_input()
  batches(source, 3)
  # "gfile": the file objects epath hands out for a gs:// workdir.
  with (epath.testing.mock_epath(open=gfile_open) if file_system == "gfile"
        else contextlib.nullcontext()):
    source.save(str(tmp_path / "position"))
    expected = batches(source, 3)
    restored = make_input()
    restored.restore(str(tmp_path / "position"))
  assert_same_batches(batches(restored, 3), expected)
  assert restored.num_examples == source.num_examples
  # Per-task counts continue from the saved ones (mm1_jax/data/health.py).
  assert restored.health.state_dict() == source.health.state_dict()
  assert set(restored.health.counts()) == set(tasks.MIXTURES["mm1_pretrain"])


def test_packing_keeps_every_example_of_the_unpacked_stream():
  config = dataclasses.replace(CONFIG, shuffle=False)
  unpacked = batches(make_input(dataclasses.replace(config, pack=False)), 6)
  packed = batches(make_input(config), 2)

  def examples(batch_list):
    out = []
    for batch in batch_list:
      for row in range(batch["decoder_target_tokens"].shape[0]):
        sequence = {k: v[row] for k, v in batch.items()}
        out += packing.unpack(sequence, MODEL.image_placeholder_id, MODEL.num_image_tokens)
    return out

  from_packed, from_unpacked = examples(packed), examples(unpacked)
  assert len(from_packed) > len(packed[0]["decoder_target_tokens"])  # Really packed.
  for a, b in zip(from_packed, from_unpacked):
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
    np.testing.assert_array_equal(a["images"], b["images"])


def test_unknown_mixture_lists_registered_names():
  with pytest.raises(ValueError, match=r"unknown SeqIO task or mixture 'mm1_pretrian'.*mm1_pretrain"):
    make_input(dataclasses.replace(CONFIG, mixture="mm1_pretrian"))


def test_placeholder_id_must_match_the_tokenizer():
  model = dataclasses.replace(MODEL, image_placeholder_id=5)
  with pytest.raises(Exception, match=r"model.image_placeholder_id: 5 but the vocabulary's "
                                      r"'<image>' token is 3"):
    pipeline.MultimodalInput(CONFIG, model, process_index=0, process_count=1)


# --- user files and bad data ----------------------------------------------------

def png_bytes(color, size=(40, 24)):
  buffer = io.BytesIO()
  Image.new("RGB", size, color).save(buffer, format="PNG")
  return buffer.getvalue()


def example_proto(features):
  def feature(value):
    values = value if isinstance(value, list) else [value]
    values = [v.encode() if isinstance(v, str) else v for v in values]
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=values))
  return tf.train.Example(features=tf.train.Features(
      feature={k: feature(v) for k, v in features.items()})).SerializeToString()


def write_records(path, records, file_format):
  if file_format == "tfrecord":
    with tf.io.TFRecordWriter(str(path)) as writer:
      for record in records:
        writer.write(record)
  else:
    from array_record.python import array_record_module
    writer = array_record_module.ArrayRecordWriter(str(path), "group_size:1")
    for record in records:
      writer.write(record)
    writer.close()


@pytest.mark.parametrize("file_format", ["tfrecord", "array_record"])
def test_user_tasks_over_files_with_bad_records_skipped_and_counted(tmp_path, file_format):
  good = png_bytes((200, 30, 30))
  truncated = good[: len(good) // 2]
  captions = [example_proto({"jpeg": good, "caption": f"a red box number {i}"}) for i in range(6)]
  captions.insert(2, example_proto({"jpeg": b"not an image at all", "caption": "broken"}))
  captions.insert(4, example_proto({"jpeg": truncated, "caption": "cut short"}))
  docs = [example_proto({"text": "Two boxes: <image> and <image> side by side.",
                         "images": [good, png_bytes((0, 0, 250), (24, 40))]}),
          example_proto({"text": "", "images": []}),  # An empty record.
          example_proto({"text": "One <image> only.", "images": [good]})]
  write_records(tmp_path / f"caps.{file_format}", captions, file_format)
  write_records(tmp_path / f"docs.{file_format}", docs, file_format)
  suffix = file_format
  user_tasks.register_image_text_task(
      f"test_caps_{suffix}", {"train": str(tmp_path / f"caps.{file_format}")},
      file_format=file_format, image_key="jpeg", text_key="caption")
  user_tasks.register_interleaved_task(
      f"test_docs_{suffix}", {"train": str(tmp_path / f"docs.{file_format}")},
      file_format=file_format)
  try:
    found, skipped, kept, counts = [], 0, 0, {}
    # One task at a time: a finite mixture ends when its first task runs out.
    for task in (f"test_caps_{suffix}", f"test_docs_{suffix}"):
      config = InputConfig(mixture=task, batch_size=2, seq_len=96, shuffle=False, num_epochs=1,
                           image_policy="pad")
      source = make_input(config)
      found += list(source)
      skipped, kept = skipped + source.num_skipped, kept + source.num_examples
      counts.update(source.health.counts())
    assert skipped == 3  # Garbage bytes, a truncated PNG, an empty record.
    assert kept == 6 + 2
    assert counts == {
        f"test_caps_{suffix}": {"read": 8, "used": 6, "truncated": 0,
                                "skipped": {"undecodable image": 2}},
        f"test_docs_{suffix}": {"read": 3, "used": 2, "truncated": 0,
                                "skipped": {"empty text": 1}}}
    images = np.concatenate([b["images"][b["image_mask"]] for b in found])
    assert len(images) == 6 + 3
    for batch in found:
      check_image_placeholders(batch["decoder_input_tokens"], batch["image_mask"],
                               MODEL.num_image_tokens, MODEL.image_placeholder_id)
  finally:
    for name in (f"test_caps_{suffix}", f"test_docs_{suffix}"):
      seqio.TaskRegistry.remove(name)


def test_a_config_can_swap_the_tokenizer(tmp_path):
  from mm1_jax.data import tokenizer
  tokenizer.train_tokenizer(str(tmp_path / "small"), vocab_size=1024)
  config = dataclasses.replace(CONFIG, shuffle=False, pack=False)
  swapped = make_input(dataclasses.replace(config, vocabulary=str(tmp_path / "small.model")))
  default = make_input(config)
  a, b = next(swapped), next(default)
  assert a["decoder_target_tokens"].max() < 1024 and not np.array_equal(
      a["decoder_target_tokens"], b["decoder_target_tokens"])
  text = lambda source, batch: source.vocabulary.decode(
      [int(t) for t, w in zip(batch["decoder_target_tokens"][0], batch["decoder_loss_weights"][0])
       if w])
  assert text(swapped, a) == text(default, b)  # Same example, other pieces.
  np.testing.assert_array_equal(a["images"], b["images"])
