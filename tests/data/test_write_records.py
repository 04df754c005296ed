"""write_records: a folder of captioned images -> records a user task reads back."""

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import seqio
from PIL import Image

from mm1_jax.data import tasks, user_tasks
from mm1_jax.data import write_records as wr

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def encoded(color, file_format="PNG", size=(24, 16)):
  buffer = io.BytesIO()
  Image.new("RGB", size, color).save(buffer, format=file_format)
  return buffer.getvalue()


def make_folder(root):
  """Images with sidecars (good ones and every skip reason); returns
  {path: (bytes, caption)} of the usable pairs."""
  (root / "nested").mkdir(parents=True)
  good = {"red.png": (encoded((220, 0, 0)), "a red box."),
          "green.jpg": (encoded((0, 200, 0), "JPEG"), "a green box."),
          "nested/blue.png": (encoded((0, 0, 210)), "a blue box."),
          "yellow.png": (encoded((230, 220, 0)), "a yellow box."),
          "teal.png": (encoded((0, 128, 128)), "  a teal box.\n"),  # Stripped.
          "gray.bmp": (encoded((128, 128, 128), "BMP"), "a gray box.")}
  for name, (data, caption) in good.items():
    (root / name).write_bytes(data)
    (root / name).with_suffix(".txt").write_text(caption)
  (root / "nocaption.png").write_bytes(encoded((1, 2, 3)))
  (root / "empty.png").write_bytes(encoded((4, 5, 6)))
  (root / "empty.txt").write_text(" \n\t")
  (root / "garbage.png").write_bytes(b"not an image")
  (root / "garbage.txt").write_text("garbage")
  png = encoded((7, 8, 9), size=(64, 64))
  (root / "truncated.png").write_bytes(png[:len(png) // 2])
  (root / "truncated.txt").write_text("cut short")
  (root / "notes.md").write_text("not an image, ignored")
  (root / ".hidden.png").write_bytes(b"ignored: hidden")
  return {str(root / name): (data, caption.strip()) for name, (data, caption) in good.items()}


def raw_records(report, split):
  """(image bytes, text) of a split, read by a user task's own source (its parse)."""
  name = f"wr_raw_{split}_{abs(hash(report['splits'][split]['pattern']))}"
  task = user_tasks.register_image_text_task(
      name, {split: report["splits"][split]["pattern"]}, file_format=report["file_format"])
  try:
    return sorted((r["image"], r["text"].decode()) for r in
                  task.source.get_dataset(split, shuffle=False).as_numpy_iterator())
  finally:
    seqio.TaskRegistry.remove(name)


@pytest.mark.parametrize("file_format", ["tfrecord", "array_record"])
def test_a_sidecar_folder_round_trips_through_a_user_task(tmp_path, file_format):
  expected = make_folder(tmp_path / "photos")
  lines = []
  report = wr.write_records(str(tmp_path / "photos"), str(tmp_path / "out" / "caps"),
                            num_shards=2, eval_fraction=0.34, seed=3, file_format=file_format,
                            log=lines.append)
  skipped = {reason: info["count"] for reason, info in report["skipped"].items()}
  assert skipped == {"no_caption": 1, "empty_caption": 1, "unreadable_image": 2}
  assert set(report["skipped"]["unreadable_image"]["paths"]) == {
      str(tmp_path / "photos" / "garbage.png"), str(tmp_path / "photos" / "truncated.png")}
  assert report["records"] == 6 and report["reencoded_as_png"] == 0
  assert {s: i["records"] for s, i in report["splits"].items()} == {"train": 4, "validation": 2}
  for info in report["splits"].values():
    assert len(info["files"]) == 2 and all(os.path.exists(f) for f in info["files"])
  with open(tmp_path / "out" / "caps-report.json") as f:
    assert json.load(f) == report
  assert any("unreadable_image: 2" in line for line in lines), lines

  # Byte for byte, every usable pair once, through the user task's parse.
  found = raw_records(report, "train") + raw_records(report, "validation")
  assert sorted(found) == sorted(expected.values())

  # And through the task's whole pipeline (tokenized, "<image>" prompt).
  patterns = {split: info["pattern"] for split, info in report["splits"].items()}
  task = user_tasks.register_image_text_task(f"wr_task_{file_format}", patterns,
                                             file_format=file_format)
  try:
    examples = list(task.get_dataset(sequence_length=None, split="validation", shuffle=False,
                                     use_cached=False).as_numpy_iterator())
  finally:
    seqio.TaskRegistry.remove(f"wr_task_{file_format}")
  assert len(examples) == 2
  by_image = {data: caption for data, caption in expected.values()}
  for example in examples:
    (image,) = example["images"]
    assert tasks.VOCABULARY.decode(example["inputs"].tolist()) == tasks.IMAGE_MARKER
    targets = example["targets"].tolist()
    assert targets[-1] == tasks.VOCABULARY.eos_id
    assert tasks.VOCABULARY.decode(targets[:-1]) == by_image[image]


def test_splits_are_whole_images_and_deterministic_by_seed(tmp_path):
  make_folder(tmp_path / "photos")
  write = lambda seed, out: wr.write_records(str(tmp_path / "photos"), str(tmp_path / out),
                                             eval_fraction=0.5, seed=seed, log=lambda _: None)
  first, again = write(0, "a"), write(0, "b")
  for split in ("train", "validation"):
    assert raw_records(first, split) == raw_records(again, split)
  held_out = [{text for _, text in raw_records(write(seed, f"s{seed}"), "validation")}
              for seed in range(6)]
  assert all(len(h) == 3 for h in held_out) and len({frozenset(h) for h in held_out}) > 1
  with pytest.raises(ValueError, match="leaves none for training"):
    wr.write_records(str(tmp_path / "photos"), str(tmp_path / "c"), eval_fraction=0.95,
                     log=lambda _: None)


@pytest.mark.parametrize("suffix", ["csv", "jsonl"])
def test_a_captions_file(tmp_path, suffix):
  photos = tmp_path / "photos"
  photos.mkdir()
  red, blue = encoded((200, 0, 0)), encoded((0, 0, 200))
  (photos / "red.png").write_bytes(red)
  (photos / "blue.png").write_bytes(blue)
  (photos / "unlisted.png").write_bytes(red)
  (photos / "pic.webp").write_bytes(encoded((0, 150, 0), "WEBP"))
  rows = [("red.png", "a red box."), ("red.png", "red, one more time: caf\u00e9."),
          (str(photos / "blue.png"), "a blue box."),  # Absolute.
          ("./pic.webp", "a green box."), ("gone.png", "a missing file."),
          ("blue.png", "   ")]
  if suffix == "csv":
    text = "caption,path\n" + "".join(f'"{c}",{p}\n' for p, c in rows)
  else:
    text = "".join(json.dumps({"file_name": p, "text": c}) + "\n\n" for p, c in rows)
  (tmp_path / f"captions.{suffix}").write_text(text, encoding="utf-8")
  report = wr.write_records(str(photos), str(tmp_path / "out") + "/",
                            captions=str(tmp_path / f"captions.{suffix}"), log=lambda _: None)
  assert {r: i["paths"] for r, i in report["skipped"].items()} == {
      "no_caption": [str(photos / "unlisted.png")], "empty_caption": [str(photos / "blue.png")],
      "missing_image": ["gone.png"]}
  assert report["reencoded_as_png"] == 1
  assert report["splits"]["train"]["pattern"] == str(
      tmp_path / "out" / "records-train-*.tfrecord")
  found = raw_records(report, "train")
  assert sorted(text for _, text in found) == sorted([
      "a red box.", "red, one more time: caf\u00e9.", "a blue box.", "a green box."])
  assert {text: data for data, text in found}["a blue box."] == blue
  png = Image.open(io.BytesIO({text: data for data, text in found}["a green box."]))
  webp = Image.open(photos / "pic.webp").convert("RGB")  # Lossy: compare decoded pixels.
  assert png.format == "PNG" and np.array_equal(np.asarray(png), np.asarray(webp))


def test_bad_captions_files_and_nothing_usable_are_named(tmp_path):
  photos = tmp_path / "photos"
  photos.mkdir()
  (photos / "a.png").write_bytes(encoded((1, 1, 1)))
  (tmp_path / "caps.csv").write_text("image_path,description\na.png,x\n")
  with pytest.raises(ValueError, match=r"no image path column; expected one of \['path', "
                                       r"'file_name', 'image'\], found \['image_path', "):
    wr.write_records(str(photos), str(tmp_path / "out"), captions=str(tmp_path / "caps.csv"))
  (tmp_path / "caps.txt").write_text("a.png,x\n")
  with pytest.raises(ValueError, match="expected a .csv or .jsonl file"):
    wr.write_records(str(photos), str(tmp_path / "out"), captions=str(tmp_path / "caps.txt"))
  (tmp_path / "caps.jsonl").write_text('{"path": "a.png", "caption": "x"}\n["a.png", "x"]\n')
  with pytest.raises(ValueError, match="line 2 is not a JSON object"):
    wr.write_records(str(photos), str(tmp_path / "out"), captions=str(tmp_path / "caps.jsonl"))
  (photos / "a.txt").write_bytes("caf\u00e9".encode("latin-1"))
  with pytest.raises(ValueError, match=r"caption file .*a.txt: not UTF-8 text"):
    wr.write_records(str(photos), str(tmp_path / "out"))
  (photos / "a.txt").unlink()
  with pytest.raises(ValueError, match=r"no usable captioned images .*see .*out-report.json"):
    wr.write_records(str(photos), str(tmp_path / "out"), log=lambda _: None)
  with open(tmp_path / "out-report.json") as f:
    assert json.load(f)["skipped"]["no_caption"]["count"] == 1
  with pytest.raises(FileNotFoundError, match="no such directory"):
    wr.write_records(str(tmp_path / "nowhere"), str(tmp_path / "out"))


def test_a_rerun_with_fewer_shards_leaves_no_stale_shards(tmp_path):
  make_folder(tmp_path / "photos")
  write = lambda shards: wr.write_records(str(tmp_path / "photos"), str(tmp_path / "o" / "c"),
                                          num_shards=shards, log=lambda _: None)
  write(3)
  (tmp_path / "o" / "c-train-notes.txt").write_text("someone else's file")
  write(2)
  assert sorted(os.listdir(tmp_path / "o")) == [
      "c-report.json", "c-train-00000-of-00002.tfrecord", "c-train-00001-of-00002.tfrecord",
      "c-train-notes.txt"]


def run_cli(*args):
  return subprocess.run([sys.executable, "-m", "mm1_jax.data.write_records", *args], cwd=REPO,
                        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}, capture_output=True,
                        text=True, timeout=300)


def test_cli_writes_shards_and_reports_skips_and_errors_in_one_line(tmp_path):
  expected = make_folder(tmp_path / "photos")
  result = run_cli(f"--images_dir={tmp_path / 'photos'}", f"--output={tmp_path / 'out'}/",
                   "--num_shards=2", "--eval_fraction=0.2")
  assert result.returncode == 0, result.stderr[-3000:]
  out = result.stdout
  assert "train: 5 records of 5 images in 2 file(s)" in out, out
  assert "validation: 1 records of 1 images in 1 file(s)" in out, out
  for line in ("skipped: 4", "no_caption: 1", "empty_caption: 1", "unreadable_image: 2"):
    assert line in out, out
  assert "user_tasks.register_image_text_task(" in out
  report = json.loads((tmp_path / "out" / "records-report.json").read_text())
  found = raw_records(report, "train") + raw_records(report, "validation")
  assert sorted(found) == sorted(expected.values())

  result = run_cli(f"--images_dir={tmp_path / 'nowhere'}", f"--output={tmp_path / 'out'}")
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1] == (
      f"Error: --images_dir {tmp_path / 'nowhere'}: no such directory.")
  assert "Traceback" not in result.stderr


def test_the_sharded_writer_deals_records_round_robin_and_renames_when_complete(tmp_path):
  import tensorflow as tf

  prefix = str(tmp_path / "x")
  stopped = wr.ShardedWriter(prefix, "train", 4, "tfrecord")
  for i in range(6):
    stopped.write(b"old %d" % i)
  partial = stopped.abort()  # An interrupted run: nothing matches the split's pattern.
  assert partial == [f"{prefix}-train-0000{i}.tfrecord.partial" for i in range(4)]
  assert not tf.io.gfile.glob(wr.split_pattern(prefix, "train", "tfrecord"))

  for shards, records, expected in ((4, 3, [[0], [1], [2]]), (2, 5, [[0, 2, 4], [1, 3]])):
    writer = wr.ShardedWriter(prefix, "train", shards, "tfrecord")
    for i in range(records):
      writer.write(b"record %d" % i)
    names = writer.close()  # min(shards, records) files; the old .partial ones removed.
    assert names == wr.shard_names(prefix, "train", len(expected), "tfrecord")
    assert sorted(os.listdir(tmp_path)) == sorted(os.path.basename(n) for n in names)
    assert [[r.numpy() for r in tf.data.TFRecordDataset(n)] for n in names] == [
        [b"record %d" % i for i in shard] for shard in expected]
