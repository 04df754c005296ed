"""Data health: per-task counts, skip limits and the errors that name bad data."""

import itertools
import re
import threading

import numpy as np
import pytest
import seqio

from mm1_jax.data import health as health_lib
from mm1_jax.data import pipeline, tasks, user_tasks
from mm1_jax.data.config import InputConfig
from mm1_jax.typed_config import ConfigError
from tests.data.test_pipeline import MODEL, example_proto, make_input, png_bytes, write_records

GOOD = png_bytes((200, 30, 30))


# --- the counts themselves ----------------------------------------------------------

def test_counts_scalars_and_texts():
  health = health_lib.DataHealth()
  assert health.console_summary() == "" and health.end_of_run_report() == ""
  for _ in range(3):
    health.used("caps")
  health.skipped("caps", health_lib.UNDECODABLE_IMAGE, "a.tfrecord:3", "bad PNG")
  health.used("text")
  assert health.counts() == {
      "caps": {"read": 4, "used": 3, "truncated": 0, "skipped": {"undecodable image": 1}},
      "text": {"read": 1, "used": 1, "truncated": 0, "skipped": {}}}
  assert health.scalars() == {
      "data/caps/read": 4.0, "data/caps/used": 3.0, "data/caps/skipped": 1.0,
      "data/caps/skipped_undecodable_image": 1.0,
      "data/text/read": 1.0, "data/text/used": 1.0, "data/text/skipped": 0.0}
  assert health.console_summary() == "skipped 20.0% (caps: 25% undecodable image)"
  report = health.end_of_run_report()
  assert "1 (25.0%)" in report and "1 undecodable image" in report and "text" in report


def test_a_window_over_the_limit_names_the_task_reason_and_record():
  health = health_lib.DataHealth(max_skip_fraction=0.2, window=10)
  for i in range(10):
    if i % 5 == 4:  # 2 of 10: at the limit, not over it.
      health.skipped("caps", health_lib.EMPTY_TEXT, f"f:{i}")
    else:
      health.used("caps")
  health.used("caps")  # Window: 2 bad of the last 10.
  with pytest.raises(health_lib.DataHealthError,
                     match=r"task 'caps' skipped 3 of its last 10 records \(30.0% > "
                           r"data.max_skip_fraction=0.2; 3 empty text\); e.g. record 4 of "
                           r"task 'caps' \(f:4\)"):
    health.skipped("caps", health_lib.EMPTY_TEXT, "f:11")


def test_a_task_without_usable_examples_fails_at_the_bound():
  health = health_lib.DataHealth(max_skip_fraction=1.0, max_records_without_example=5)
  for i in range(4):
    health.skipped("bad", health_lib.UNDECODABLE_IMAGE, f"f:{i}")
  with pytest.raises(health_lib.DataHealthError,
                     match=r"task 'bad' gave no usable example in its first 5 records "
                           r"\(5 undecodable image\); e.g. record 0 of task 'bad' \(f:0\)"):
    health.skipped("bad", health_lib.UNDECODABLE_IMAGE, "f:4")


def test_state_round_trip_keeps_the_window():
  health = health_lib.DataHealth(max_skip_fraction=0.1, window=10)
  for i in range(9):
    health.used("caps")
  health.skipped("caps", health_lib.DOES_NOT_FIT, "f:9")
  restored = health_lib.DataHealth(max_skip_fraction=0.1, window=10)
  restored.load_state_dict(health.state_dict())
  assert restored.state_dict() == health.state_dict()
  # The restored window still holds the skip: one more is over 10%.
  with pytest.raises(health_lib.DataHealthError, match="2 of its last 10"):
    restored.skipped("caps", health_lib.DOES_NOT_FIT, "f:10")


@pytest.mark.parametrize("message, reason", [
    ("{{function_node __wrapped__X}} assertion failed: [undecodable image: bad PNG]",
     "undecodable image"),
    ("image too large: 40000 x 40000 pixels", "image too large"),
    ("Unknown image file format. One of JPEG, PNG required.", "undecodable image"),
])
def test_reason_of_error_messages(message, reason):
  assert health_lib.reason_of(message) == reason


def test_max_skip_fraction_must_be_a_fraction():
  assert InputConfig.from_dict({"max_skip_fraction": 0.5}).max_skip_fraction == 0.5
  with pytest.raises(ConfigError, match=r"data.max_skip_fraction: 1.5 is not a fraction"):
    InputConfig.from_dict({"max_skip_fraction": 1.5})


# --- through the pipeline -------------------------------------------------------------

@pytest.fixture
def register(tmp_path):
  """register(name, records, kind="caps", **keys): a user task over a TFRecord file."""
  names = []

  def add(name, records, kind="caps", **keys):
    path = tmp_path / f"{name}.tfrecord"
    write_records(path, records, "tfrecord")
    if kind == "caps":
      user_tasks.register_image_text_task(name, {"train": str(path)}, **keys)
    else:
      user_tasks.register_interleaved_task(name, {"train": str(path)}, **keys)
    names.append(name)
    return str(path)

  yield add
  for name in names:
    seqio.TaskRegistry.remove(name)
  for name in list(seqio.MixtureRegistry.names()):
    if name.startswith("health_"):
      seqio.MixtureRegistry.remove(name)


def caption(i, image=GOOD):
  return example_proto({"image": image, "text": f"a red box number {i}"})


def with_deadline(function, seconds=180):
  """function()'s result or exception; fails (instead of hanging) past the deadline."""
  outcome = {}

  def run():
    try:
      outcome["value"] = function()
    except Exception as error:  # pylint: disable=broad-except
      outcome["error"] = error

  thread = threading.Thread(target=run, daemon=True)
  thread.start()
  thread.join(seconds)
  assert not thread.is_alive(), f"still running after {seconds}s: the pipeline hangs"
  return outcome


def config(mixture, **kwargs):
  return InputConfig(**{"mixture": mixture, "batch_size": 2, "seq_len": 96, "seed": 1, **kwargs})


def test_a_task_whose_images_are_all_undecodable_stops_the_mixture(register):
  register("health_good", [caption(i) for i in range(5)])
  path = register("health_broken", [caption(i, b"not an image %d" % i) for i in range(5)])
  seqio.MixtureRegistry.add("health_mix", [("health_good", 1), ("health_broken", 1)])
  source = make_input(config("health_mix"))
  outcome = with_deadline(lambda: list(itertools.islice(source, 1000)))
  error = outcome.get("error")
  assert isinstance(error, health_lib.DataHealthError), outcome
  message = str(error)
  assert "task 'health_broken' gave no usable example in its first 100 records" in message
  assert "100 undecodable image" in message and f"({path}:0)" in message
  counts = source.health.counts()
  assert counts["health_broken"] == {"read": 100, "used": 0, "truncated": 0,
                                     "skipped": {"undecodable image": 100}}
  assert counts["health_good"]["skipped"] == {}


def test_a_single_task_of_bad_records_fails_instead_of_spinning(register):
  register("health_empty", [example_proto({"image": GOOD, "text": ""})], kind="docs",
           images_key="image")
  outcome = with_deadline(lambda: next(make_input(config("health_empty"))))
  assert isinstance(outcome.get("error"), health_lib.DataHealthError), outcome
  assert "image count mismatch" in str(outcome["error"])


def test_a_few_bad_records_train_and_are_counted_per_task(register):
  register("health_good", [caption(i) for i in range(5)])
  register("health_some", [caption(i, b"garbage" if i == 3 else GOOD) for i in range(20)]
           + [caption(20, GOOD[:len(GOOD) // 2])])  # A truncated PNG.
  seqio.MixtureRegistry.add("health_mix", [("health_good", 1), ("health_some", 1)])
  source = make_input(config("health_mix", max_skip_fraction=0.5))
  batches = list(itertools.islice(source, 30))
  assert all(b["decoder_loss_weights"].sum() > 0 for b in batches)
  counts = source.health.counts()
  some, good = counts["health_some"], counts["health_good"]
  assert some["read"] > 21 and good["read"] > 5 and good["skipped"] == {}
  assert set(some["skipped"]) == {"undecodable image"}
  assert some["read"] == some["used"] + sum(some["skipped"].values())
  scalars = source.health.scalars()
  assert scalars["data/health_some/skipped_undecodable_image"] >= 1
  assert scalars["data/health_good/used"] == good["used"]
  assert source.num_skipped == sum(some["skipped"].values())
  assert "health_some: " in source.health.console_summary()


def document(text, images):
  return example_proto({"text": text, "images": images})


def test_a_document_may_omit_its_empty_image_list(register):
  register("health_text_docs", [example_proto({"text": "just words"})], kind="docs")
  source = make_input(config("health_text_docs", shuffle=False, num_epochs=1))
  assert len(list(source)) == 1
  assert source.health.counts()["health_text_docs"] == {"read": 1, "used": 1, "truncated": 0,
                                                             "skipped": {}}


@pytest.mark.parametrize("kind, last, reason", [
    ("caps", caption(4, b"\x89PNG truncated"), "undecodable image"),
    ("docs", document("", []), "empty text"),  # Only an EOS to train on.
    ("docs", document("two <image> <image>", [GOOD]), "image count mismatch"),
], ids=["truncated_png", "empty_text", "image_count_mismatch"])  # Same ids on every worker.
def test_a_bad_record_at_the_end_of_a_finite_stream_is_counted(register, kind, last, reason):
  records = ([caption(i) for i in range(4)] if kind == "caps" else
             [document(f"box <image> {i}", [GOOD]) for i in range(4)])
  path = register("health_tail", records + [last], kind=kind)
  source = make_input(config("health_tail", shuffle=False, num_epochs=1))
  assert len(list(source)) >= 1
  assert source.health.counts() == {
      "health_tail": {"read": 5, "used": 4, "truncated": 0, "skipped": {reason: 1}}}
  assert f"{path}:4" in source.health.state_dict()["health_tail"]["example"][reason]


@pytest.mark.parametrize("prompt, seq_len, reason", [
    # The placeholder run fills the sequence: no token is left to follow it.
    ("", MODEL.num_image_tokens, "no image fits"),
    # The image and caption come after seq_len prompt tokens: no target left.
    ("word " * 100, 96, "no image fits"),
])
def test_a_record_that_cannot_fit_is_counted(register, prompt, seq_len, reason):
  register("health_long", [caption(0)], prompt=prompt)
  source = make_input(config("health_long", shuffle=False, num_epochs=1, seq_len=seq_len))
  assert list(source) == []
  assert source.health.counts()["health_long"] == {"read": 1, "used": 0, "truncated": 0,
                                                   "skipped": {reason: 1}}


@pytest.mark.parametrize("kind, keys, asked", [
    ("caps", {"image_key": "jpeg"}, "jpeg"),
    ("docs", {"images_key": "pictures"}, "pictures"),
])
def test_a_wrong_feature_key_is_named_at_the_first_record(register, kind, keys, asked):
  register("health_keys", [example_proto({"image": GOOD, "text": "one <image> here"})],
           kind=kind, **keys)
  outcome = with_deadline(lambda: next(make_input(config("health_keys"))))
  error = outcome.get("error")
  assert isinstance(error, health_lib.DataHealthError), outcome
  assert ("task 'health_keys': its first record has a missing feature, check the task's "
          "feature keys; record 0 of task 'health_keys'") in str(error)
  assert re.search(rf"asks for key '{asked}'; the record has keys ('image', 'text'|'text', "
                   r"'image')", str(error)), error


def test_tagged_stream_is_seqios_mixture():
  """Sampling the mixture here (to tag tasks) keeps seqio's records and order."""
  provider = tasks.get_task_or_mixture("mm1_pretrain")
  shard = seqio.ShardInfo(0, 1)
  cfg = InputConfig(mixture="mm1_pretrain", seed=5)
  theirs = provider.get_dataset(sequence_length=None, split="train", shuffle=True, seed=5,
                                shard_info=shard, use_cached=False)
  names, ours = pipeline._task_datasets(provider, cfg, shard)  # pylint: disable=protected-access
  for a, b in zip(theirs.take(40).as_numpy_iterator(), ours.take(40).as_numpy_iterator()):
    np.testing.assert_array_equal(a["targets"], b["targets"])
    assert len(a["images"]) == len(b["images"])
    layout = ("shakespeare_text" if not len(b["images"]) else
              "easy_vqa_caption" if len(b["inputs"]) else "easy_vqa_interleaved")
    assert names[b["task"]] == layout


def test_counts_survive_save_and_restore(register, tmp_path):
  register("health_some", [caption(i, b"garbage" if i % 4 == 0 else GOOD) for i in range(12)])
  cfg = config("health_some", max_skip_fraction=0.5)
  source = make_input(cfg)
  list(itertools.islice(source, 3))
  source.save(str(tmp_path / "position"))
  saved = source.health.state_dict()
  expected = list(itertools.islice(source, 3))
  restored = make_input(cfg)
  restored.restore(str(tmp_path / "position"))
  assert restored.health.state_dict() == saved
  again = list(itertools.islice(restored, 3))
  for a, b in zip(again, expected):
    np.testing.assert_array_equal(a["decoder_target_tokens"], b["decoder_target_tokens"])
  assert restored.health.state_dict() == source.health.state_dict()
  assert source.health.counts()["health_some"]["skipped"]["undecodable image"] >= 1

