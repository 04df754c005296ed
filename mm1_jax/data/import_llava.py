"""LLaVA-format conversations -> sharded record files a conversation task reads.

    python -m mm1_jax.data.import_llava --json=llava_v1_5_mix665k.json \
        --image_root=/data/llava --output=records/llava [--num_shards=64] \
        [--file_format=array_record|tfrecord] [--eval_fraction=0.01 --seed=0] \
        [--num_threads=8]

Input: LLaVA's JSON, a top-level array of records, or JSON lines (one record
a line; told apart by the first character, "[" or "{"):

    {"id": "000000033471",
     "image": "coco/train2017/000000033471.jpg",       (or a list, or absent)
     "conversations": [{"from": "human", "value": "<image>\\nWhat is it?"},
                       {"from": "gpt", "value": "A bus."}]}

Image paths are relative to --image_root (or absolute). Roles map human ->
user, gpt -> assistant, system -> system ("user" / "assistant" are taken as
they are). Texts are kept exactly, "<image>\\n" prefixes included; each
"<image>" marker takes the next image of `image`, in order. Records without
`image` are text-only conversations (ShareGPT's part of mix665k).

The file is read as a stream (an incremental parser of the top-level array,
json.JSONDecoder.raw_decode over chunks; JSON lines line by line), so a
1 GB JSON never sits in memory; images are read and checked on
--num_threads threads, records written in file order.

Each record is a tf.Example: `id` (bytes), `roles`, `texts` (bytes lists,
one entry per turn) and `images` (bytes list: the image files' bytes; JPEG,
PNG, GIF and BMP byte for byte, other formats PIL reads re-encoded as PNG),
what mm1_jax.data.user_tasks.register_conversation_task reads. Files:
{output}-{split}-{i:05d}-of-{n:05d}.{format}, record k of a split in shard
k % n, in the JSON's order (mix665k comes shuffled), and
{output}-report.json (as mm1_jax.data.write_records writes them).

Skipped, counted and listed (record index, id, detail) in the report: a
missing or unreadable image, an unknown role, a marker count that differs
from the image count, no assistant turn with text, and a record that is not
a LLaVA conversation (a missing or mistyped field; when the very first
record is one, the file is not LLaVA data and the import stops at once).
Malformed JSON stops the import with the file, byte offset, line and record
index; any stop writes the report of what was written so far ("complete":
false, "stopped": where and why) and leaves the files as "....partial".
Records are numbered from 0, as json.load(f)[i].
"""

from __future__ import annotations

import codecs
import collections
import concurrent.futures
import dataclasses
import json
import os
import re
from typing import IO, Any, Callable, Iterable, Iterator, Mapping, NamedTuple, Sequence

import numpy as np

from mm1_jax.data import write_records as wr

# LLaVA's `from` -> the conversation roles of mm1_jax.data.tasks.
ROLES = {"human": "user", "gpt": "assistant", "system": "system",
         "user": "user", "assistant": "assistant"}
IMAGE_MARKER = "<image>"
# Skip reasons, in the order reported.
MALFORMED_RECORD = "malformed_record"
UNKNOWN_ROLE = "unknown_role"
NO_ASSISTANT_TURN = "no_assistant_turn"
IMAGE_COUNT_MISMATCH = "image_count_mismatch"
MISSING_IMAGE = wr.MISSING_IMAGE
UNREADABLE_IMAGE = wr.UNREADABLE_IMAGE
REASONS = {
    MALFORMED_RECORD: "not a LLaVA conversation: a field missing or of the wrong type",
    UNKNOWN_ROLE: f"a turn whose `from` is not one of {', '.join(ROLES)}",
    NO_ASSISTANT_TURN: "no gpt (assistant) turn with text: nothing to train on",
    IMAGE_COUNT_MISMATCH: "<image> markers in the turns != images in `image`",
    MISSING_IMAGE: "an image file that does not exist under --image_root",
    UNREADABLE_IMAGE: "an image file that cannot be read or that PIL cannot decode",
}
CHUNK_SIZE = 1 << 20  # Bytes read from the JSON at a time.
DEFAULT_THREADS = 8
PROGRESS_EVERY = 10_000  # Records between progress lines.
# A JSON error this close to the end of the text read so far may be the
# record going on in the next chunk (a cut "tru", "\\u12" or "1e").
_TRUNCATION_MARGIN = 16
_WHITESPACE = re.compile(r"[ \t\n\r]*")


class LlavaInputError(ValueError):
  """The input cannot be imported; the message names the file, record and field."""


# --- reading the JSON as a stream ------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Entry:
  """One top-level record: its number (from 0), where it starts, its value."""
  index: int
  offset: int  # Byte offset in the file.
  line: int  # From 1.
  value: Any


class _TextReader:
  """A UTF-8 file read as text, chunk by chunk, behind a parse cursor `pos`.

  `text` holds what is read and not yet consumed (before `pos` is consumed
  and dropped at the next read); locate(i) gives text[i]'s byte offset and
  line in the file, counted incrementally (each character once).
  """

  def __init__(self, file: IO[bytes], name: str, chunk_size: int, offset: int = 0):
    """offset: the byte offset in the file of `file`'s position (past a BOM)."""
    self._file, self._name, self._chunk_size = file, name, chunk_size
    self._utf8 = codecs.getincrementaldecoder("utf-8")()
    self.text, self.pos, self.eof = "", 0, False
    self._bytes_read = offset
    # (index into text, its byte offset, its line): a known location.
    self._mark = (0, offset, 1)

  def read_more(self, at_least: int = 0) -> None:
    """Drops text before pos, then appends >= max(chunk, at_least) bytes' text."""
    if self.eof:
      return
    mark = self.locate(self.pos)
    self.text, self._mark = self.text[self.pos:], (0, mark[0], mark[1])
    self.pos = 0
    data = self._file.read(max(self._chunk_size, at_least))
    try:
      self.text += self._utf8.decode(data, final=not data)
    except UnicodeDecodeError as error:
      raise LlavaInputError(f"{self._name}: not UTF-8 text near byte "
                            f"{self._bytes_read + error.start} ({error.reason}); save the "
                            "file as UTF-8") from None
    self._bytes_read += len(data)
    self.eof = not data

  def locate(self, index: int) -> tuple[int, int]:
    """(byte offset, line) in the file of text[index]."""
    start, offset, line = self._mark
    if index < start:  # Before the mark (an error position): count from the text's start.
      start, offset, line = 0, *self._start()
    piece = self.text[start:index]
    offset, line = offset + len(piece.encode("utf-8")), line + piece.count("\n")
    self._mark = (index, offset, line)
    return offset, line

  def _start(self) -> tuple[int, int]:
    start, offset, line = self._mark
    piece = self.text[:start]
    return offset - len(piece.encode("utf-8")), line - piece.count("\n")

  def peek(self) -> str:
    """The next character after whitespace (pos moves onto it); "" at the end."""
    while True:
      self.pos = _WHITESPACE.match(self.text, self.pos).end()
      if self.pos < len(self.text) or self.eof:
        return self.text[self.pos:self.pos + 1]
      self.read_more()

  def decode(self, decoder: json.JSONDecoder) -> Any:
    """The JSON value at pos (pos moves past it), reading on while it may be cut.

    Raises json.JSONDecodeError with .pos an index into text.
    """
    while True:
      try:
        value, end = decoder.raw_decode(self.text, self.pos)
      except json.JSONDecodeError as error:
        cut = (error.msg.startswith("Unterminated string")
               or len(self.text) - error.pos <= _TRUNCATION_MARGIN)
        if self.eof or not cut:
          raise
        self.read_more(at_least=len(self.text) - self.pos)  # Doubles: linear in the record.
        continue
      # A number may go on in the next chunk ("12" of "12.5").
      number = isinstance(value, (int, float)) and not isinstance(value, bool)
      if number and not self.eof and len(self.text) - end <= _TRUNCATION_MARGIN:
        self.read_more(at_least=len(self.text) - self.pos)
        continue
      self.pos = end
      return value


def iter_json_array(file: IO[bytes], name: str, chunk_size: int = CHUNK_SIZE,
                    offset: int = 0) -> Iterator[Entry]:
  """The elements of the JSON array a binary file holds, one at a time.

  Memory: one chunk plus the largest element. Raises LlavaInputError naming
  `name`, the byte offset, line and record index for anything json.load
  would reject. offset: the byte offset of the file's position (past a BOM).
  """
  reader, decoder = _TextReader(file, name, chunk_size, offset), json.JSONDecoder()
  index = 0

  def error(message: str, at: int | None = None) -> LlavaInputError:
    offset, line = reader.locate(reader.pos if at is None else at)
    return LlavaInputError(f"{name}: malformed JSON at byte {offset}, line {line} "
                           f"(record {index}): {message}")

  if reader.peek() != "[":
    raise error("expected the array of records to start with '['")
  reader.pos += 1
  if reader.peek() == "]":
    reader.pos += 1
  else:
    while True:
      if reader.peek() == "":
        raise error("the file ends inside the array")
      offset, line = reader.locate(reader.pos)
      try:
        value = reader.decode(decoder)
      except json.JSONDecodeError as decode_error:
        raise error(decode_error.msg, decode_error.pos) from None
      yield Entry(index, offset, line, value)
      index += 1
      after = reader.peek()
      if after == "]":
        reader.pos += 1
        break
      if after != ",":
        raise error("expected ',' or ']' after a record, found "
                    + (repr(after) if after else "the end of the file"))
      reader.pos += 1
      if reader.peek() == "]":
        raise error("a ',' before the closing ']'")
  if reader.peek() != "":
    raise error("extra data after the array's closing ']'")


def iter_json_lines(file: IO[bytes], name: str, offset: int = 0) -> Iterator[Entry]:
  """The records of a JSON-lines file (blank lines skipped), one at a time.

  offset: the byte offset of the file's position (past a BOM).
  """
  index = 0
  for number, raw in enumerate(file, 1):
    start, offset = offset, offset + len(raw)
    try:
      text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
      raise LlavaInputError(f"{name}: not UTF-8 text at byte {start + error.start}, line "
                            f"{number} (record {index}); save the file as UTF-8") from None
    if not text.strip():
      continue
    try:
      value = json.loads(text)
    except json.JSONDecodeError as error:
      at = start + len(text[:error.pos].encode("utf-8"))
      raise LlavaInputError(f"{name}: malformed JSON at byte {at}, line {number} "
                            f"(record {index}): {error.msg}") from None
    yield Entry(index, start, number, value)
    index += 1


def iter_records_from(file: IO[bytes], name: str, chunk_size: int = CHUNK_SIZE
                      ) -> Iterator[Entry]:
  """The records of an open (seekable) JSON array or JSON-lines file, streamed.

  The first character tells them apart: "[" an array, "{" JSON lines.
  """
  head = file.read(4096)
  # A BOM (as Windows editors write) is skipped, and counted in byte offsets.
  start = len(codecs.BOM_UTF8) if head.startswith(codecs.BOM_UTF8) else 0
  first = head[start:].lstrip()[:1]
  file.seek(start)
  if first == b"[":
    yield from iter_json_array(file, name, chunk_size, start)
  elif first == b"{":
    yield from iter_json_lines(file, name, start)
  elif not first:
    raise LlavaInputError(f"{name}: the file is empty.")
  else:
    raise LlavaInputError(f"{name}: expected a JSON array of records ('[') or JSON lines "
                          f"('{{' per line), found {first.decode(errors='replace')!r}.")


def iter_records(json_path: str, chunk_size: int = CHUNK_SIZE) -> Iterator[Entry]:
  """The records of a LLaVA JSON array or JSON-lines file (local or gs://), streamed."""
  from mm1_jax import paths

  path = paths.as_path(json_path)
  if not path.exists():
    raise FileNotFoundError(f"--json {json_path}: no such file.")
  with path.open("rb") as file:
    yield from iter_records_from(file, json_path, chunk_size)


# --- checking a record --------------------------------------------------------------------

class RecordError(ValueError):
  """A record that is not a LLaVA conversation; the message names the field."""


class Skip(NamedTuple):
  reason: str  # One of REASONS.
  detail: str


@dataclasses.dataclass(frozen=True)
class Conversation:
  """A checked record: roles (user|assistant|system) and texts [t], image paths [k]."""
  id: str
  roles: tuple[str, ...]
  texts: tuple[str, ...]
  images: tuple[str, ...]  # As written in the record.


def record_id(value: Any) -> str:
  """A record's `id` as text ("" when it has none usable)."""
  if isinstance(value, dict) and isinstance(value.get("id"), (str, int)):
    return str(value["id"])
  return ""


def _type_name(value: Any) -> str:
  return "null" if value is None else type(value).__name__


def parse_record(value: Any) -> tuple[str, list[tuple[str, str]], list[str]]:
  """(id, [(from, text)], image paths) of a LLaVA record; RecordError names the field."""
  if not isinstance(value, dict):
    raise RecordError(f"the record is a {_type_name(value)}, not an object")
  if "id" in value and not isinstance(value["id"], (str, int)):
    raise RecordError(f"field 'id' is a {_type_name(value['id'])}, not a string")
  images = value.get("image", [])
  if isinstance(images, str):
    images = [images]
  if not isinstance(images, list) or not all(isinstance(i, str) and i for i in images):
    raise RecordError("field 'image' is not a path or a list of paths")
  if "conversations" not in value:
    raise RecordError(f"field 'conversations' is missing (the record has "
                      f"{', '.join(map(repr, value)) or 'no fields'})")
  turns = value["conversations"]
  if not isinstance(turns, list):
    raise RecordError(f"field 'conversations' is a {_type_name(turns)}, not a list")
  parsed = []
  for number, turn in enumerate(turns):
    field = f"conversations[{number}]"
    if not isinstance(turn, dict):
      raise RecordError(f"field '{field}' is a {_type_name(turn)}, not an object")
    for key in ("from", "value"):
      if not isinstance(turn.get(key), str):
        problem = "is missing" if key not in turn else f"is a {_type_name(turn[key])}"
        raise RecordError(f"field '{field}.{key}' {problem}, not a string")
    parsed.append((turn["from"], turn["value"]))
  return record_id(value), parsed, images


def to_conversation(value: Any) -> Conversation | Skip:
  """The checked conversation of a record, or why it is skipped (no image IO)."""
  try:
    id_, turns, images = parse_record(value)
  except RecordError as error:
    return Skip(MALFORMED_RECORD, str(error))
  for number, (speaker, _) in enumerate(turns):
    if speaker not in ROLES:
      return Skip(UNKNOWN_ROLE, f"conversations[{number}].from is {speaker!r}; expected one "
                                f"of {', '.join(ROLES)}")
  markers = sum(text.count(IMAGE_MARKER) for _, text in turns)
  if markers != len(images):
    return Skip(IMAGE_COUNT_MISMATCH, f"{markers} {IMAGE_MARKER} markers but {len(images)} "
                                      "images")
  roles = tuple(ROLES[speaker] for speaker, _ in turns)
  texts = tuple(text for _, text in turns)
  if not any(role == "assistant" and text.strip() for role, text in zip(roles, texts)):
    return Skip(NO_ASSISTANT_TURN, f"none of its {len(turns)} turns is a gpt turn with text")
  return Conversation(id_, roles, texts, tuple(images))


class Prepared(NamedTuple):
  """A record ready to write: its conversation and image bytes [k]."""
  conversation: Conversation
  images: list[bytes]
  reencoded: int  # Images re-encoded as PNG.


def load_images(conversation: Conversation, image_root) -> Prepared | Skip:
  """Reads and checks each image (write_records.check_image)."""
  from mm1_jax import paths

  loaded, reencoded = [], 0
  for written in conversation.images:
    path = paths.as_path(wr.resolve_path(image_root, written))
    if not path.is_file():
      return Skip(MISSING_IMAGE, f"{written} (no file {os.fspath(path)})")
    try:
      data = path.read_bytes()
    except Exception as error:  # OSError locally; gs:// raises TensorFlow's errors.
      return Skip(UNREADABLE_IMAGE, f"{written}: {type(error).__name__}: {error}")
    stored, converted = wr.check_image(data)
    if stored is None:
      return Skip(UNREADABLE_IMAGE, f"{written}: PIL cannot decode its {len(data)} bytes")
    loaded.append(stored)
    reencoded += converted
  return Prepared(conversation, loaded, reencoded)


def prepare(entry: Entry, image_root) -> Prepared | Skip:
  """A record's conversation and images, or why it is skipped."""
  conversation = to_conversation(entry.value)
  if isinstance(conversation, Skip):
    return conversation
  return load_images(conversation, image_root)


def to_example(conversation: Conversation, images: Sequence[bytes]) -> bytes:
  """A serialized tf.Example: id, roles, texts (UTF-8), images (bytes; may be empty)."""
  import tensorflow as tf

  def strings(values):
    return tf.train.Feature(bytes_list=tf.train.BytesList(
        value=[v.encode("utf-8") if isinstance(v, str) else v for v in values]))
  return tf.train.Example(features=tf.train.Features(feature={
      "id": strings([conversation.id]), "roles": strings(conversation.roles),
      "texts": strings(conversation.texts), "images": strings(images)})).SerializeToString()


# --- importing ---------------------------------------------------------------------------

def in_order(entries: Iterable[Entry], function: Callable[[Entry], Any], num_threads: int
             ) -> Iterator[tuple[Entry, Any]]:
  """(entry, function(entry)) in entry order, function run on num_threads threads.

  At most 4 x num_threads entries are in flight (memory stays bounded). An
  error of `entries` (malformed JSON) is raised after every entry before it
  has been yielded; an error of `function` when its entry's turn comes.
  """
  pending: collections.deque = collections.deque()
  entries, failure = iter(entries), None
  with concurrent.futures.ThreadPoolExecutor(max(1, num_threads)) as pool:
    try:
      while True:
        while failure is None and len(pending) < 4 * max(1, num_threads):
          try:
            entry = next(entries)
          except StopIteration:
            break
          except Exception as error:  # pylint: disable=broad-except
            failure = error
            break
          pending.append((entry, pool.submit(function, entry)))
        if not pending:
          break
        entry, future = pending.popleft()
        yield entry, future.result()
    finally:
      for _, future in pending:
        future.cancel()
  if failure is not None:
    raise failure


def held_out_records(json_path: str, eval_fraction: float, seed: int,
                     chunk_size: int = CHUNK_SIZE) -> tuple[int, set[int]]:
  """(records in the file, the indices of the eval split's records).

  A first pass counts the records (no images read), then round(fraction x
  records), at least 1, are chosen by seed; whole records, before checking,
  so which records are held out does not depend on the images present.
  """
  total = sum(1 for _ in iter_records(json_path, chunk_size))
  num_eval = max(1, round(eval_fraction * total))
  if num_eval >= total:
    raise ValueError(f"--eval_fraction={eval_fraction} of {total} record(s) leaves none for "
                     "training; use a smaller fraction or more records.")
  rng = np.random.default_rng(seed)
  return total, {int(i) for i in rng.permutation(total)[:num_eval]}


class _Failed(NamedTuple):
  """prepare's unexpected error, raised by the import in record order."""
  error: Exception


def _prepare_or_fail(entry: Entry, image_root) -> Prepared | Skip | _Failed:
  try:
    return prepare(entry, image_root)
  except Exception as error:  # pylint: disable=broad-except
    return _Failed(error)


@dataclasses.dataclass
class _Progress:
  """What the import has done so far (for the report, also when it stops)."""
  read: int = 0
  current: Entry | None = None  # The record being handled.
  last: Entry | None = None  # The last record handled.
  images: dict[str, int] = dataclasses.field(default_factory=collections.Counter)
  reencoded: int = 0

  def stopped(self, error: BaseException) -> dict:
    """{"index", "id", "error"} of the record the import stopped at: the one
    being handled, else the next one (the JSON parser's; its id unknown, "")."""
    if self.current is not None:
      index, id_ = self.current.index, record_id(self.current.value)
    else:
      index, id_ = (self.last.index + 1 if self.last else 0), ""
    return {"index": index, "id": id_, "error": f"{type(error).__name__}: {error}"}


def _describe(entry: Entry) -> str:
  id_ = record_id(entry.value)
  return f"record {entry.index}" + (f" (id {id_!r})" if id_ else "")


def import_llava(json_path: str, image_root: str, output: str, *, num_shards: int = 1,
                 file_format: str = "array_record", eval_fraction: float = 0.0,
                 seed: int = 0, train_split: str = "train", eval_split: str = "validation",
                 num_threads: int = DEFAULT_THREADS, chunk_size: int = CHUNK_SIZE,
                 log=print) -> dict:
  """Writes the conversations of a LLaVA JSON / JSONL file as sharded records.

  Arguments as the flags (module docstring). Returns the report, also
  written to {prefix}-report.json: per split its file pattern, files,
  records and images; per skip reason its count and first examples
  ({"index", "id", "detail"}); "complete" and, when the import stopped,
  "stopped" ({"index", "id", "error"}: the record it stopped at). Raises
  ValueError for bad arguments, and LlavaInputError (a ValueError) for
  malformed JSON or when nothing could be written (after the report).
  """
  from mm1_jax import paths

  wr.check_output_arguments(output, file_format, num_shards, eval_fraction, train_split,
                            eval_split)
  root = paths.as_path(image_root)
  if not root.is_dir():
    raise FileNotFoundError(f"--image_root {image_root}: no such directory.")
  if not paths.as_path(json_path).exists():
    raise FileNotFoundError(f"--json {json_path}: no such file.")
  held_out = set()
  if eval_fraction:
    total, held_out = held_out_records(json_path, eval_fraction, seed, chunk_size)
    log(f"{json_path}: {total} records; {len(held_out)} held out as {eval_split!r}")

  prefix = wr.output_prefix(output)
  paths.as_path(prefix).parent.mkdir(parents=True, exist_ok=True)
  splits = [train_split] + ([eval_split] if eval_fraction else [])
  writers = {split: wr.ShardedWriter(prefix, split, num_shards, file_format) for split in splits}
  skipped, progress = wr.SkipLog(REASONS, examples_key="examples"), _Progress()

  def report(written: Mapping[str, list[str]], **ending) -> dict:
    return {
        "json": os.fspath(paths.as_path(json_path)), "image_root": os.fspath(root),
        "file_format": file_format, "features": ["id", "roles", "texts", "images"],
        "num_shards": num_shards, "eval_fraction": eval_fraction, "seed": seed,
        "held_out": {eval_split: len(held_out)} if eval_fraction else {},
        "records_read": progress.read,
        "splits": {split: {"pattern": wr.split_pattern(prefix, split, file_format),
                           "files": files, "records": writers[split].records,
                           "images": progress.images[split]}
                   for split, files in written.items() if files},
        "records": sum(writer.records for writer in writers.values()),
        "reencoded_as_png": progress.reencoded, "skipped": skipped.report(), **ending}

  records = in_order(iter_records(json_path, chunk_size),
                     lambda entry: _prepare_or_fail(entry, root), num_threads)
  try:
    for entry, result in records:
      progress.current = entry
      if isinstance(result, _Failed):
        raise result.error
      if isinstance(result, Skip):
        if result.reason == MALFORMED_RECORD and entry.index == 0:
          raise LlavaInputError(
              f"{json_path}: {_describe(entry)}: {result.detail}; is this LLaVA data? Each "
              "record needs 'conversations': [{'from': 'human' | 'gpt' | 'system', "
              "'value': text}, ...].")
        skipped.add(result.reason, {"index": entry.index, "id": record_id(entry.value),
                                    "detail": result.detail})
      else:
        split = eval_split if entry.index in held_out else train_split
        writers[split].write(to_example(result.conversation, result.images))
        progress.images[split] += len(result.images)
        progress.reencoded += result.reencoded
      progress.read += 1
      progress.current, progress.last = None, entry
      if progress.read % PROGRESS_EVERY == 0:
        log(f"{progress.read} records read: {sum(w.records for w in writers.values())} "
            f"written, {skipped.total} skipped")
  except BaseException as error:  # Interrupts too: always say where it stopped.
    records.close()  # Stops the image threads (the records in flight are dropped).
    partial = {split: writer.abort() for split, writer in writers.items()}
    stopped = progress.stopped(error)
    report_path = wr.write_report(prefix, report(partial, complete=False, stopped=stopped))
    written = sum(writer.records for writer in writers.values())
    where = (f"The import stopped at record {stopped['index']}"
             + (f" (id {stopped['id']!r})" if stopped["id"] else "")
             + f" after writing {written} records ({skipped.total} skipped) of the "
             f"{progress.read} before it; the files written end in {wr.PARTIAL_SUFFIX}; "
             f"see {report_path}.")
    if isinstance(error, LlavaInputError):
      message = str(error)
      raise LlavaInputError(message + ("" if message.endswith(".") else ".") + " " + where
                            ) from None
    log(where)
    error.add_note(where)
    raise

  written = {split: writer.close() for split, writer in writers.items()}
  result = report(written, complete=True)
  report_path = wr.write_report(prefix, result)
  _log_report(result, report_path, log)
  if not result["records"]:
    raise LlavaInputError(f"no usable conversations in {json_path}; see {report_path}.")
  return result


def task_snippet(report: Mapping, name: str = "my_llava") -> str:
  """Python that registers a conversation task over the written files."""
  split_patterns = ", ".join(f"{split!r}: {info['pattern']!r}"
                             for split, info in report["splits"].items())
  return (f"user_tasks.register_conversation_task(\n    {name!r}, {{{split_patterns}}},\n"
          f"    file_format={report['file_format']!r})")


def _log_report(report: Mapping, report_path, log) -> None:
  log(f"{report['records_read']} records read from {report['json']}")
  for split, info in report["splits"].items():
    log(f"{split}: {info['records']} conversations with {info['images']} images in "
        f"{len(info['files'])} file(s) {info['pattern']}")
  for split, count in report["held_out"].items():
    if split not in report["splits"]:
      log(f"{split}: nothing usable; all {count} records held out for it were skipped "
          "(raise --eval_fraction or change --seed)")
  if report["reencoded_as_png"]:
    log(f"re-encoded as PNG (formats tf.io.decode_image does not read): "
        f"{report['reencoded_as_png']} image(s)")
  wr.log_skipped(report["skipped"], log, "examples",
                 lambda example: f"#{example['index']}" + (f" {example['id']}"
                                                           if example["id"] else ""))
  log(f"Wrote {report_path}")
  if report["splits"]:
    log("Register them in your tasks module:\n" + task_snippet(report))


# --- the command ---------------------------------------------------------------------

def define_flags() -> None:
  from absl import flags

  flags.DEFINE_string("json", None, "LLaVA-format JSON (an array of records) or JSON lines, "
                      "e.g. llava_v1_5_mix665k.json; local or gs://.")
  flags.DEFINE_string("image_root", None, "Folder the records' `image` paths are relative to.")
  wr.define_output_flags("array_record", "conversations")
  flags.DEFINE_integer("num_threads", DEFAULT_THREADS, "Threads reading and checking images.",
                       lower_bound=1)


def main(argv: Sequence[str]) -> None:
  from absl import flags

  from mm1_jax import cli

  cli.start(argv)
  FLAGS = flags.FLAGS
  import_llava(FLAGS.json, FLAGS.image_root, FLAGS.output, num_shards=FLAGS.num_shards,
               file_format=FLAGS.file_format, eval_fraction=FLAGS.eval_fraction,
               seed=FLAGS.seed, train_split=FLAGS.train_split, eval_split=FLAGS.eval_split,
               num_threads=FLAGS.num_threads)


if __name__ == "__main__":
  from mm1_jax import cli

  define_flags()
  # ValueError: bad arguments, malformed JSON, nothing usable.
  cli.run(main, required=["json", "image_root", "output"], extra_errors=(ValueError,))
