"""import_llava: LLaVA JSON / JSONL -> records a conversation task reads back."""

import io
import json
import os

import numpy as np
import pytest
import seqio
import tensorflow as tf
from PIL import Image

from mm1_jax.data import health, user_tasks
from mm1_jax.data import import_llava as il

def encoded(color, file_format="PNG", size=(20, 12)):
  buffer = io.BytesIO()
  Image.new("RGB", size, color).save(buffer, format=file_format)
  return buffer.getvalue()


def turns(*pairs):
  return [{"from": speaker, "value": text} for speaker, text in pairs]


@pytest.fixture
def tasks_to_remove():
  """Names registered by a test, removed after it (the registry is global)."""
  names = []
  yield names
  for name in names:
    seqio.TaskRegistry.remove(name)


def make_llava(root):
  """An image folder and LLaVA records: good ones and one of each skip reason.

  Returns (records, {id: (roles, texts, image bytes)} of the usable ones).
  """
  (root / "coco").mkdir(parents=True)
  files = {"coco/red.jpg": encoded((220, 0, 0), "JPEG"), "coco/blue.png": encoded((0, 0, 210)),
           "gqa.png": encoded((0, 200, 0)), "pic.webp": encoded((9, 99, 199), "WEBP"),
           "broken.jpg": b"not an image"}
  for name, data in files.items():
    (root / name).write_bytes(data)
  records = [
      {"id": "single", "image": "coco/red.jpg",
       "conversations": turns(("human", "<image>\nWhat colour is it?"), ("gpt", "Red."))},
      {"id": "multi", "image": ["coco/red.jpg", str(root / "coco/blue.png")],  # Absolute too.
       "conversations": turns(("human", "Compare <image> with <image>."),
                              ("gpt", "One is red {and} one is \"blue\"."),
                              ("human", "Sure?"), ("gpt", "Yes [really]."))},
      {"id": "text_only", "conversations": turns(("human", "Hi"), ("gpt", "Hello! caf\u00e9"))},
      {"id": "system", "image": "gqa.png",
       "conversations": turns(("system", "Answer briefly."), ("human", "What is it?\n<image>"),
                              ("gpt", "Green."))},
      {"id": "gone", "image": "coco/missing.jpg",
       "conversations": turns(("human", "<image>"), ("gpt", "?"))},
      {"id": "garbage", "image": "broken.jpg",
       "conversations": turns(("human", "<image>"), ("gpt", "?"))},
      {"id": "bot", "conversations": turns(("human", "Hi"), ("bot", "Hello"))},
      {"id": "mismatch", "image": "coco/red.jpg",
       "conversations": turns(("human", "No marker here."), ("gpt", "Red."))},
      {"id": "no_answer", "conversations": turns(("human", "Hi"), ("gpt", "  "))},
      {"id": "no_conversations", "image": "coco/red.jpg"},
      {"id": 7, "image": "pic.webp",
       "conversations": turns(("human", "<image>"), ("gpt", "A webp picture."))},
  ]
  usable = {
      "single": (("user", "assistant"), ("<image>\nWhat colour is it?", "Red."),
                 (files["coco/red.jpg"],)),
      "multi": (("user", "assistant", "user", "assistant"),
                ("Compare <image> with <image>.", "One is red {and} one is \"blue\".", "Sure?",
                 "Yes [really]."), (files["coco/red.jpg"], files["coco/blue.png"])),
      "text_only": (("user", "assistant"), ("Hi", "Hello! caf\u00e9"), ()),
      "system": (("system", "user", "assistant"),
                 ("Answer briefly.", "What is it?\n<image>", "Green."), (files["gqa.png"],)),
      "7": (("user", "assistant"), ("<image>", "A webp picture."), None),  # Re-encoded.
  }
  return records, usable


def write_input(path, records, kind):
  if kind == "json":
    path.write_text(json.dumps(records, indent=1, ensure_ascii=False), encoding="utf-8")
  else:
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n", encoding="utf-8")
  return str(path)


def read_task(tasks_to_remove, name, report, split="train"):
  """Examples of a conversation task over the report's files, as plain values."""
  task = user_tasks.register_conversation_task(
      name, {s: info["pattern"] for s, info in report["splits"].items()},
      file_format=report["file_format"])
  tasks_to_remove.append(name)
  dataset = task.get_dataset(sequence_length=None, split=split, shuffle=False, use_cached=False)
  return [{key: (value.decode() if isinstance(value, bytes) else
                 tuple(v.decode() if key != "images" else v for v in value))
           for key, value in example.items()} for example in dataset.as_numpy_iterator()]


@pytest.mark.parametrize("kind,file_format", [("json", "array_record"), ("jsonl", "tfrecord")])
def test_llava_records_round_trip_through_a_conversation_task(tmp_path, tasks_to_remove, kind,
                                                              file_format):
  records, usable = make_llava(tmp_path / "images")
  source = write_input(tmp_path / f"data.{kind}", records, kind)
  lines = []
  report = il.import_llava(source, str(tmp_path / "images"), str(tmp_path / "out" / "llava"),
                           num_shards=2, file_format=file_format, num_threads=3,
                           chunk_size=64, log=lines.append)

  assert report["complete"] and report["records_read"] == len(records)
  assert {reason: [(e["index"], e["id"]) for e in info["examples"]]
          for reason, info in report["skipped"].items()} == {
              "malformed_record": [(9, "no_conversations")], "unknown_role": [(6, "bot")],
              "no_assistant_turn": [(8, "no_answer")], "image_count_mismatch": [(7, "mismatch")],
              "missing_image": [(4, "gone")], "unreadable_image": [(5, "garbage")]}
  details = {r: info["examples"][0]["detail"] for r, info in report["skipped"].items()}
  assert details["malformed_record"].startswith("field 'conversations' is missing")
  assert details["unknown_role"] == "conversations[1].from is 'bot'; expected one of human, " \
                                    "gpt, system, user, assistant"
  assert details["image_count_mismatch"] == "0 <image> markers but 1 images"
  assert details["missing_image"].startswith("coco/missing.jpg (no file ")
  info = report["splits"]["train"]
  assert (info["records"], info["images"], report["reencoded_as_png"]) == (5, 5, 1)
  assert info["files"] == [str(tmp_path / "out" / f"llava-train-0000{i}-of-00002.{file_format}")
                           for i in range(2)]
  assert json.loads((tmp_path / "out" / "llava-report.json").read_text()) == report
  assert "unknown_role: 1 (" in "\n".join(lines) and "#6 bot" in "\n".join(lines)
  assert "user_tasks.register_conversation_task(" in lines[-1]

  examples = read_task(tasks_to_remove, f"llava_{kind}", report)
  assert all(e["problem"] == "" for e in examples)
  assert sorted(e["source"].rsplit(":", 1)[0] for e in examples) == sorted(
      [info["files"][0]] * 3 + [info["files"][1]] * 2)  # Record k in shard k % 2.
  found = {e["texts"]: e for e in examples}
  assert set(found) == {texts for _, texts, _ in usable.values()}
  assert set(examples[0]) == {"roles", "texts", "images", "problem", "source"}
  for roles, texts, images in usable.values():
    assert found[texts]["roles"] == roles
    if images is not None:
      assert found[texts]["images"] == images  # Byte for byte.
  (png,) = found[("<image>", "A webp picture.")]["images"]
  webp = Image.open(tmp_path / "images" / "pic.webp").convert("RGB")
  assert Image.open(io.BytesIO(png)).format == "PNG"
  np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png))), np.asarray(webp))


def test_eval_split_holds_out_seeded_records(tmp_path, tasks_to_remove):
  records, usable = make_llava(tmp_path / "images")
  records = records[:4] * 3  # 12 usable records.
  source = write_input(tmp_path / "data.json", records, "json")
  run = lambda seed, out: il.import_llava(source, str(tmp_path / "images"),
                                          str(tmp_path / out), eval_fraction=0.25, seed=seed,
                                          file_format="tfrecord", log=lambda _: None)
  report = run(0, "a")
  assert {s: i["records"] for s, i in report["splits"].items()} == {"train": 9, "validation": 3}
  held_out = [sorted(e["texts"] for e in read_task(tasks_to_remove, f"llava_eval_{i}",
                                                   run(seed, f"s{i}"), "validation"))
              for i, seed in enumerate((0, 0, 1, 2))]
  assert held_out[0] == held_out[1] and len({tuple(h) for h in held_out}) > 1


def test_read_time_problems_are_flagged_not_dropped(tmp_path, tasks_to_remove):
  """Records written by other tools: the task flags what the importer skips."""
  conversation = lambda roles, texts, images=(): il.to_example(
      il.Conversation("x", tuple(roles), tuple(texts), ()), list(images))
  image = encoded((1, 2, 3))
  examples = [
      conversation(["user", "assistant"], ["<image> hi", "fine"], [image]),
      conversation(["user", "robot"], ["hi", "fine"]),
      conversation(["user", "assistant"], ["<image><image> hi", "fine"], [image]),
      conversation(["user", "assistant"], ["hi"]),
      conversation(["user", "user"], ["hi", "there"]),
      conversation([], []),
  ]
  path = tmp_path / "bad.tfrecord"
  with tf.io.TFRecordWriter(str(path)) as writer:
    for example in examples:
      writer.write(example)
  report = {"splits": {"train": {"pattern": str(path)}}, "file_format": "tfrecord"}
  problems = [e["problem"] for e in read_task(tasks_to_remove, "llava_read_problems", report)]
  assert problems == [
      "", "unknown role: turn 1 has role 'robot'; expected one of system, user, assistant",
      "image count mismatch: 2 <image> markers but 1 images",
      "turn count mismatch: 2 roles but 1 texts",
      "no assistant text: none of the 2 turns is an assistant turn with text",
      "no assistant text: none of the 0 turns is an assistant turn with text"]
  assert [health.reason_of(p) for p in problems[1:]] == [
      user_tasks.UNKNOWN_ROLE, health.IMAGE_COUNT_MISMATCH, user_tasks.TURN_COUNT_MISMATCH,
      user_tasks.NO_ASSISTANT_TEXT, user_tasks.NO_ASSISTANT_TEXT]


# --- stopping -------------------------------------------------------------------------

def test_malformed_json_mid_file_stops_saying_where(tmp_path):
  records, _ = make_llava(tmp_path / "images")
  good = json.dumps(records[:3], indent=1, ensure_ascii=False)  # Non-ASCII: bytes != chars.
  text = good[:-1].rstrip() + ',\n {"id": "broken", "conversations": [}\n, {"id": "after"}]'
  (tmp_path / "data.json").write_text(text, encoding="utf-8")
  with pytest.raises(json.JSONDecodeError) as expected:
    json.loads(text)
  offset = len(text[:expected.value.pos].encode("utf-8"))
  with pytest.raises(il.LlavaInputError) as stopped:
    il.import_llava(str(tmp_path / "data.json"), str(tmp_path / "images"),
                    str(tmp_path / "out"), chunk_size=32, num_threads=2, log=lambda _: None)
  message = str(stopped.value)
  assert message.startswith(f"{tmp_path / 'data.json'}: malformed JSON at byte {offset}, line "
                            f"{expected.value.lineno} (record 3): Expecting value. The import "
                            "stopped at record 3 after writing 3 records (0 skipped) of the 3 "
                            "before it; the files written end in .partial; see "), message
  assert "\n" not in message
  report = json.loads((tmp_path / "out-report.json").read_text())
  assert not report["complete"] and report["records"] == 3
  assert report["stopped"]["index"] == 3 and report["splits"] == {"train": {
      "pattern": str(tmp_path / "out-train-*.array_record"),
      "files": [str(tmp_path / "out-train-00000.array_record.partial")], "records": 3,
      "images": 3}}
  assert sorted(os.listdir(tmp_path)) == [
      "data.json", "images", "out-report.json", "out-train-00000.array_record.partial"]

  (tmp_path / "data.jsonl").write_text('{"id": "a", "conversations": []}\n\n{"id": "b", ]\n')
  with pytest.raises(il.LlavaInputError, match=r"data.jsonl: malformed JSON at byte 46, line 3 "
                                               r"\(record 1\): Expecting property name"):
    il.import_llava(str(tmp_path / "data.jsonl"), str(tmp_path / "images"),
                    str(tmp_path / "out"), log=lambda _: None)


def test_an_error_mid_way_names_the_record_and_what_was_written(tmp_path, monkeypatch):
  records, _ = make_llava(tmp_path / "images")
  source = write_input(tmp_path / "data.json", records, "json")
  real = il.to_example

  def fail_on_system(conversation, images):
    if conversation.id == "system":
      raise OSError("disk full")
    return real(conversation, images)
  monkeypatch.setattr(il, "to_example", fail_on_system)
  lines = []
  with pytest.raises(OSError, match="disk full") as stopped:
    il.import_llava(source, str(tmp_path / "images"), str(tmp_path / "out"), log=lines.append)
  where = ("The import stopped at record 3 (id 'system') after writing 3 records (0 skipped) of "
           "the 3 before it")
  assert stopped.value.__notes__[0].startswith(where) and lines[-1].startswith(where)
  report = json.loads((tmp_path / "out-report.json").read_text())
  assert report["stopped"] == {"index": 3, "id": "system", "error": "OSError: disk full"}


def test_bad_input_is_named_in_one_line(tmp_path):
  images = tmp_path / "images"
  images.mkdir()
  run = lambda name: il.import_llava(str(tmp_path / name), str(images), str(tmp_path / "out"),
                                     log=lambda _: None)
  (tmp_path / "vqa.json").write_text(json.dumps([{"id": "q1", "question": "?", "answer": "!"}]))
  with pytest.raises(il.LlavaInputError, match=r"vqa.json: record 0 \(id 'q1'\): field "
                                               r"'conversations' is missing \(the record has "
                                               r"'id', 'question', 'answer'\); is this LLaVA"):
    run("vqa.json")
  (tmp_path / "turn.json").write_text(json.dumps(
      [{"id": "t", "conversations": [{"from": "human", "value": None}]}]))
  with pytest.raises(il.LlavaInputError, match=r"field 'conversations\[0\].value' is a null, "
                                               "not a string"):
    run("turn.json")
  (tmp_path / "object.json").write_text('"not records"')
  with pytest.raises(il.LlavaInputError, match=r"object.json: expected a JSON array of "
                                               r"records \('\['\) or JSON lines"):
    run("object.json")
  (tmp_path / "empty.json").write_text('[{"id": "n", "conversations": []}]')
  with pytest.raises(il.LlavaInputError, match=r"no usable conversations in .*empty.json; see"):
    run("empty.json")
  with pytest.raises(FileNotFoundError, match="--image_root .*nowhere: no such directory"):
    il.import_llava(str(tmp_path / "empty.json"), str(tmp_path / "nowhere"), str(tmp_path / "o"))


# --- the streaming parser ------------------------------------------------------------------

TRICKY = [
    {"id": "a]b", "conversations": [{"from": "human", "value": "brackets ] [ } { and \"quotes\""}]},
    {"text": "escapes \\\" \\\\ \\n \u00e9\u4e2d\U0001F600 /", "nested": [[[]], {"k": {"l": []}}]},
    12345678901234567890, -1.5e-3, 0, True, False, None, "a string, with, commas]",
    [], {}, {"": ""}, {"long": "x" * 300},
]


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 7, 64, 1 << 20])
def test_the_streaming_parser_agrees_with_json_load(chunk_size):
  for text in (json.dumps(TRICKY), json.dumps(TRICKY, indent=2, ensure_ascii=False),
               "\ufeff \r\n[ " + " ,\t".join(json.dumps(v) for v in TRICKY) + "\n]\n", "[]"):
    data = text.encode("utf-8")
    entries = list(il.iter_records_from(io.BytesIO(data), "x.json", chunk_size))
    assert [e.value for e in entries] == json.loads(text.lstrip("\ufeff"))
    assert [e.index for e in entries] == list(range(len(entries)))
    for entry in entries:  # Each entry's offset and line point at its record.
      value, _ = json.JSONDecoder().raw_decode(data[entry.offset:].decode("utf-8"))
      assert value == entry.value
      assert entry.line == data[:entry.offset].count(b"\n") + 1


@pytest.mark.parametrize("text,message", [
    ('[{"a": 1},, {"b": 2}]', "(record 1): Expecting value"),
    ('[{"a": 1} {"b": 2}]', "(record 1): expected ',' or ']' after a record, found '{'"),
    ('[{"a": 1},]', "(record 1): a ',' before the closing ']'"),
    ('[{"a": 1}, {"b": "unterminated}]', "(record 1): Unterminated string"),
    ('[{"a": 1}, {"b": 2}', "(record 2): expected ',' or ']' after a record, found the end"),
    ('[{"a": 1}] x', "(record 1): extra data after the array's closing ']'"),
    ('[{"a": 1}, {"b": tru}]', "(record 1): Expecting value"),
])
def test_the_streaming_parser_names_byte_line_and_record_of_bad_json(text, message):
  try:
    json.loads(text)
    position = None
  except json.JSONDecodeError as error:
    position = error.pos
  for chunk_size in (1, 4, 1024):
    with pytest.raises(il.LlavaInputError) as bad:
      list(il.iter_records_from(io.BytesIO(text.encode()), "x.json", chunk_size))
    assert message in str(bad.value)
    if position is not None and "extra data" not in message and "closing" not in message:
      assert f"at byte {position}, line 1 " in str(bad.value)


# --- reading array_record ------------------------------------------------------------------

def write_array_record(path, records):
  from array_record.python import array_record_module
  writer = array_record_module.ArrayRecordWriter(str(path), "group_size:1")
  for record in records:
    writer.write(record)
  writer.close()


def test_array_record_files_are_opened_once_and_read_in_order(tmp_path, monkeypatch):
  from array_record.python import array_record_module

  opened = []
  real = array_record_module.ArrayRecordReader

  def counting(path, *args, **kwargs):
    opened.append(os.path.basename(path))
    return real(path, *args, **kwargs)
  monkeypatch.setattr(array_record_module, "ArrayRecordReader", counting)
  sizes = {"a.array_record": 2 * user_tasks.ARRAY_RECORD_CHUNK + 3, "b.array_record": 5}
  for name, size in sizes.items():
    write_array_record(tmp_path / name, [f"{name} {i}".encode() for i in range(size)])

  for name, size in sizes.items():
    records = list(user_tasks._read_array_record(tf.constant(str(tmp_path / name)))
                   .as_numpy_iterator())
    assert records == [f"{name} {i}".encode() for i in range(size)]
  assert sorted(opened) == sorted(sizes)  # Once per file, not per record.

  # The iterator resumes exactly from a checkpoint (no generator in the way).
  options = tf.data.Options()
  options.experimental_external_state_policy = tf.data.experimental.ExternalStatePolicy.IGNORE
  dataset = user_tasks._read_array_record(
      tf.constant(str(tmp_path / "a.array_record"))).with_options(options)
  iterator = iter(dataset)
  first = [next(iterator).numpy() for _ in range(user_tasks.ARRAY_RECORD_CHUNK + 2)]
  saved = tf.train.Checkpoint(iterator=iterator).write(str(tmp_path / "ckpt" / "it"))
  rest = [r.numpy() for r in iterator]
  resumed = iter(dataset)
  tf.train.Checkpoint(iterator=resumed).read(saved).assert_consumed()
  assert [r.numpy() for r in resumed] == rest and len(first) + len(rest) == sizes[
      "a.array_record"]
  assert sorted(opened) == sorted(sizes)

  # A file written again is read again (not from the reader of its old contents).
  write_array_record(tmp_path / "b.array_record", [b"new"])
  assert list(user_tasks._read_array_record(
      tf.constant(str(tmp_path / "b.array_record"))).as_numpy_iterator()) == [b"new"]


def test_an_imported_task_trains_through_the_pipeline_with_any_vocabulary(tmp_path,
                                                                          tasks_to_remove):
  """Conversation tasks are rendered by the pipeline, so data.vocabulary needs
  no re-registration; every usable record trains, answers only."""
  from configs import tiny
  from mm1_jax import config_lib
  from mm1_jax.data import conversations, pipeline, tasks
  from mm1_jax.data.config import InputConfig

  records, usable = make_llava(tmp_path / "images")
  source = write_input(tmp_path / "data.json", records, "json")
  report = il.import_llava(source, str(tmp_path / "images"), str(tmp_path / "out" / "llava"),
                           num_shards=2, log=lambda line: None)
  read_task(tasks_to_remove, "llava_pipeline", report)
  assert tasks.with_vocabulary("llava_pipeline", "smollm2") == "llava_pipeline"
  model = config_lib.mm1_config(tiny.get_config())
  config = InputConfig(mixture="llava_pipeline", batch_size=2, seq_len=256, shuffle=False,
                       num_epochs=1, image_policy="pad")
  source = pipeline.MultimodalInput(config, model, process_index=0, process_count=1)
  batches = list(source)
  counts = source.health.counts()["llava_pipeline"]
  assert counts["used"] == len(usable) == 5 and counts["skipped"] == {}
  template = conversations.get_template("mm1", tasks.VOCABULARY)
  trained = "".join(template.decode(b["decoder_target_tokens"][r][b["decoder_loss_weights"][r] > 0])
                    for b in batches for r in range(len(b["decoder_target_tokens"])))
  for roles, texts, _ in usable.values():
    for role, text in zip(roles, texts):
      assert (text + "<|end|>" in trained) == (role == "assistant"), (role, text)
