"""A seqio vocabulary rebuilt from a GGUF file's tokenizer metadata (SmolLM2).

llama.cpp's GGUF files carry the whole tokenizer as metadata:
tokenizer.ggml.model ("gpt2": byte-level BPE), tokenizer.ggml.pre (the
pre-tokenizer's name), .tokens, .merges, .token_type and the bos/eos/pad
ids. GgufBpeVocabulary reads those fields (never the weights) and rebuilds
the tokenizer with the `tokenizers` library, as SmolLM2's own
tokenizer.json defines it:

    normaliser     none
    pre-tokenizer  Digits(individual_digits) then ByteLevel(add_prefix_space=False)
    model          BPE over the GGUF's vocabulary and merges
    decoder        ByteLevel

The GGUF's control tokens (<|endoftext|>, <|im_start|>, <|im_end|>, ...)
are added tokens: they encode to their one id wherever they appear in text.
`extra_tokens` (mm1_jax.data.tokenizer passes its SPECIAL_TOKENS) are
appended after the GGUF vocabulary, ids base_size, base_size + 1, ... in
order. SmolLM2's ids:

    0 <|endoftext|> (eos, and seqio's pad)   1 <|im_start|>   2 <|im_end|>
    3..16  other control tokens              17..49151  byte-level BPE pieces
    49152.. <image> <image_start> <image_end> <|system|> <|user|> <|assistant|> <|end|>

Byte-level BPE has no unknown token: every string encodes, and
decode(encode(text)) == text for any text (whitespace, newlines and
unicode included) that does not contain the eos token "<|endoftext|>".

EOS is <|endoftext|> = 0 = seqio's pad id, on purpose:
  * it is SmolLM2's document separator in pre-training, and our decoder
    inputs start every segment with id 0 (packing's shift right), so a
    segment reads "<|endoftext|> document <|endoftext|>", the layout the
    pre-trained LLM knows;
  * nothing in this codebase tells padding by its token id: packing marks it
    with segment id 0 and loss weight 0 (the EOS target keeps loss weight 1),
    the model masks by segment ids, and decoding pads finished rows with
    pad_id after their EOS, which reads the same when they are equal;
  * seqio's decode stops at the first EOS, so trailing padding never shows.
  The one thing it would break is seqio's own feature converters
  (LMFeatureConverter etc.), which weigh the loss by `token != pad` and so
  would not train on the EOS; this codebase packs with its own converter.
  GGUF's eos_token_id (<|im_end|> = 2) is the chat model's end of turn; our
  chat format has its own <|end|>.
"""

from __future__ import annotations

import functools
import os
import threading
from typing import Any, Sequence

import numpy as np
import seqio
import tensorflow as tf

EOS_TOKEN = "<|endoftext|>"
# The GGUF token types that are whole tokens, not BPE pieces: they must match
# as one id wherever they appear in text.
_ADDED_TOKEN_TYPES = (2, 3, 4)  # gguf.TokenType UNKNOWN, CONTROL, USER_DEFINED
# tokenizer.ggml.pre names whose pre-tokenizer is implemented here.
_SUPPORTED_PRE = ("smollm",)


@functools.lru_cache(maxsize=8)
def _read_metadata(path: str, mtime_ns: int, size: int) -> dict[str, Any]:
  """The tokenizer fields of the GGUF at `path` as Python values.

  Cached per file version (mtime and size are part of the key): GGUFReader
  parses every field of the file (seconds for 49k tokens) and a run builds
  the same vocabulary several times (tasks, pipeline, evaluation).
  """
  del mtime_ns, size  # Only cache keys.
  import gguf  # Imported here: the SentencePiece path does not need it.

  reader = gguf.GGUFReader(path)

  def field(key: str, default: Any = None) -> Any:
    found = reader.fields.get(key)
    if found is None:
      if default is not None:
        return default
      raise ValueError(f"{path} has no {key!r} metadata: not a GGUF file with a tokenizer.")
    return found.contents()

  metadata = {
      "model": field("tokenizer.ggml.model"),
      "pre": field("tokenizer.ggml.pre", "default"),
      "tokens": list(field("tokenizer.ggml.tokens")),
      "merges": list(field("tokenizer.ggml.merges")),
      "token_type": [int(t) for t in field("tokenizer.ggml.token_type")],
  }
  del reader  # Drops the memory map.
  return metadata


def _pre_tokenizer(pre: str, path: str):
  """The `tokenizers` pre-tokenizer of GGUF pre-tokenizer name `pre`."""
  from tokenizers import pre_tokenizers

  if pre not in _SUPPORTED_PRE:
    raise ValueError(f"{path}: tokenizer.ggml.pre is {pre!r}; only {_SUPPORTED_PRE} (SmolLM2) "
                     "is implemented. Add its pre-tokenizer to mm1_jax/data/gguf_vocabulary.py.")
  # SmolLM2's tokenizer.json: every digit on its own, then GPT-2's byte-level
  # split. No prefix space: "The" and " The" are different pieces.
  return pre_tokenizers.Sequence([
      pre_tokenizers.Digits(individual_digits=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
  ])


def build_tokenizer(path: str, extra_tokens: Sequence[str] = ()):
  """The tokenizers.Tokenizer of the GGUF at `path`, `extra_tokens` appended."""
  from tokenizers import AddedToken, Tokenizer, decoders, models

  stat = os.stat(path)
  metadata = _read_metadata(path, stat.st_mtime_ns, stat.st_size)
  if metadata["model"] != "gpt2":
    raise ValueError(f"{path}: tokenizer.ggml.model is {metadata['model']!r}; only byte-level "
                     "BPE ('gpt2') GGUF tokenizers are supported.")
  tokens = metadata["tokens"]
  merges = [tuple(merge.split(" ")) for merge in metadata["merges"]]
  bad = [merge for merge in merges if len(merge) != 2]
  if bad:
    raise ValueError(f"{path}: merges must be two pieces joined by one space, got {bad[:3]}.")
  tokenizer = Tokenizer(models.BPE(vocab={token: i for i, token in enumerate(tokens)},
                                   merges=merges))
  tokenizer.pre_tokenizer = _pre_tokenizer(metadata["pre"], path)
  tokenizer.decoder = decoders.ByteLevel()
  # Not normalised (the text is matched as is) and not stripped of
  # neighbouring spaces, so "a<image>b" and " <|im_end|>" keep every character.
  tokenizer.add_special_tokens([
      AddedToken(token, special=True, normalized=False)
      for token, kind in zip(tokens, metadata["token_type"]) if kind in _ADDED_TOKEN_TYPES])
  for offset, token in enumerate(extra_tokens):
    if tokenizer.token_to_id(token) is not None:
      raise ValueError(f"extra token {token!r} is already id {tokenizer.token_to_id(token)} of "
                       f"{path}; leave it out of extra_tokens.")
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False)])
    # add_special_tokens takes the first free id, which is len(tokens) +
    # offset only if the GGUF's ids are 0..len(tokens) - 1 without repeats.
    if tokenizer.token_to_id(token) != len(tokens) + offset:
      raise ValueError(f"{path}: extra token {token!r} got id {tokenizer.token_to_id(token)}, "
                       f"not {len(tokens) + offset}: the GGUF's token list has repeats.")
  return tokenizer


@functools.lru_cache(maxsize=8)
def _read_chat_metadata(path: str, mtime_ns: int, size: int) -> dict[str, Any]:
  del mtime_ns, size  # Only cache keys.
  import gguf

  reader = gguf.GGUFReader(path)

  def field(key: str) -> Any:
    found = reader.fields.get(key)
    return None if found is None else found.contents()

  metadata = {"chat_template": field("tokenizer.chat_template") or "",
              "bos_token_id": field("tokenizer.ggml.bos_token_id"),
              "eos_token_id": field("tokenizer.ggml.eos_token_id")}
  del reader
  return metadata


def chat_metadata(path: str) -> dict[str, Any]:
  """The GGUF's chat fields: chat_template (Jinja source, "" if none) and the
  bos / eos token ids (None if absent; a chat model's eos ends a turn)."""
  stat = os.stat(path)
  return _read_chat_metadata(path, stat.st_mtime_ns, stat.st_size)


class GgufBpeVocabulary(seqio.Vocabulary):
  """seqio vocabulary of a GGUF file's byte-level BPE tokenizer (see module doc).

  Example:
    vocabulary = GgufBpeVocabulary(path, extra_tokens=("<image>",))
    vocabulary.encode("The capital of France is")  # [504, 3575, 282, 4649, 314]
    vocabulary.token_to_id("<image>")               # 49152

  Built lazily from the path and cached per instance (the parsed metadata is
  also cached per file), so copies and pickles stay small.
  """

  def __init__(self, path: str, extra_tokens: Sequence[str] = ()):
    if not os.path.isfile(path):
      raise FileNotFoundError(f"no GGUF file at {path!r}; pass the path of a .gguf file.")
    self._path = os.path.realpath(path)
    self._extra_tokens = tuple(extra_tokens)
    self._tokenizer = None
    self._lock = threading.Lock()  # tf.data tokenizes on many threads at once.
    super().__init__(extra_ids=0)

  # --- pickling: the path is the state --------------------------------------

  def __getstate__(self) -> dict[str, Any]:
    return {"path": self._path, "extra_tokens": self._extra_tokens}

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__init__(state["path"], state["extra_tokens"])

  def __eq__(self, other) -> bool:
    return (isinstance(other, GgufBpeVocabulary) and self._path == other._path and
            self._extra_tokens == other._extra_tokens)

  def __hash__(self) -> int:
    return hash((self._path, self._extra_tokens))

  def __repr__(self) -> str:
    return f"GgufBpeVocabulary({self._path!r}, extra_tokens={self._extra_tokens!r})"

  # --- the tokenizer ----------------------------------------------------------

  @property
  def path(self) -> str:
    return self._path

  @property
  def tokenizer(self):
    """The tokenizers.Tokenizer, built on first use."""
    if self._tokenizer is None:
      with self._lock:
        if self._tokenizer is None:
          self._tokenizer = build_tokenizer(self._path, self._extra_tokens)
    return self._tokenizer

  def token_to_id(self, token: str) -> int | None:
    """The id of a whole token or piece ("<image>", "Ġcapital"); None if absent."""
    return self.tokenizer.token_to_id(token)

  def id_to_token(self, token_id: int) -> str | None:
    """The vocabulary entry of an id (byte-level form: " a" is "Ġa")."""
    return self.tokenizer.id_to_token(int(token_id))

  @property
  def extra_token_ids(self) -> dict[str, int]:
    """extra_tokens -> their ids (after the GGUF vocabulary, in order)."""
    return {token: self.token_to_id(token) for token in self._extra_tokens}

  # --- seqio.Vocabulary -------------------------------------------------------

  @property
  def _base_vocab_size(self) -> int:
    return self.tokenizer.get_vocab_size(with_added_tokens=True)

  @property
  def eos_id(self) -> int:
    # <|endoftext|>, which is 0 = pad_id in SmolLM2: see the module docstring.
    token_id = self.token_to_id(EOS_TOKEN)
    if token_id is None:
      raise ValueError(f"{self._path} has no {EOS_TOKEN!r} token to end sequences with.")
    return token_id

  @property
  def bos_id(self) -> None:
    # None added: the decoder's shift right puts id 0 (<|endoftext|>) first.
    return None

  @property
  def unk_id(self) -> None:
    # Byte-level BPE encodes every string; None also keeps seqio's decode
    # from mapping out-of-range ids to an unknown id.
    return None

  def _encode(self, s: str) -> list[int]:
    return self.tokenizer.encode(s, add_special_tokens=False).ids

  def _decode(self, ids) -> str:
    """Text of `ids`, control tokens written out; EOS/padding (id 0) and ids
    past the vocabulary (the model's embedding padding) have no text."""
    size, eos = self._base_vocab_size, self.eos_id
    ids = [int(i) for i in ids]
    ids = [i for i in ids if 0 <= i < size and i != eos and i != self.pad_id]
    return self.tokenizer.decode(ids, skip_special_tokens=False)

  def _encode_many(self, texts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """bytes [n] -> (int32 ids of all texts concatenated, int64 lengths [n])."""
    encoded = [self._encode(text.decode("utf-8")) for text in texts.reshape(-1)]
    ids = np.fromiter((i for row in encoded for i in row), np.int32)
    return ids, np.array([len(row) for row in encoded], np.int64)

  def _encode_tf(self, s: tf.Tensor) -> tf.Tensor | tf.RaggedTensor:
    """Scalar string -> int32 [n]; string [k] -> int32 ragged [k, None]."""
    s = tf.convert_to_tensor(s, tf.string)
    if s.shape.rank not in (0, 1):
      raise ValueError(f"encode_tf takes a scalar or 1-D string tensor, got shape {s.shape}.")
    ids, lengths = tf.numpy_function(self._encode_many, [tf.reshape(s, [-1])],
                                     [tf.int32, tf.int64], stateful=False)
    ids.set_shape([None])
    lengths.set_shape([None])
    if s.shape.rank == 0:
      return ids
    return tf.RaggedTensor.from_row_lengths(ids, lengths)

  def _decode_rows(self, rows: np.ndarray) -> np.ndarray:
    return np.array([self._decode(row).encode("utf-8") for row in rows], dtype=object)

  def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
    """int [..., n] -> string [...] (seqio has already cut after the first EOS)."""
    ids = tf.cast(ids, tf.int32)
    shape = tf.shape(ids)
    text = tf.numpy_function(self._decode_rows, [tf.reshape(ids, [-1, shape[-1]])],
                             tf.string, stateful=False)
    return tf.reshape(text, shape[:-1])
