"""The bundled SentencePiece vocabulary: ids, round trips, byte fallback, reproducibility."""

import pytest
import sentencepiece as spm

from mm1_jax.data import tokenizer
from mm1_jax.data.sources import shakespeare


@pytest.fixture(scope="module")
def vocabulary():
  return tokenizer.get_vocabulary()


def test_ids_and_size(vocabulary):
  assert vocabulary.vocab_size == 4096
  assert (vocabulary.pad_id, vocabulary.eos_id, vocabulary.unk_id) == (0, 1, 2)
  assert vocabulary.tokenizer.bos_id() == -1
  assert tokenizer.special_token_ids(vocabulary) == {
      "<image>": 3, "<image_start>": 4, "<image_end>": 5, "<|system|>": 6,
      "<|user|>": 7, "<|assistant|>": 8, "<|end|>": 9}


def test_round_trip_on_shakespeare(vocabulary):
  files = shakespeare.play_files()
  _, passages = shakespeare.play_passages(files[shakespeare.VALIDATION_PLAYS[0]])
  num_tokens = num_words = 0
  for passage in passages:  # A held-out play: not in the tokenizer's training text.
    ids = vocabulary.encode(passage)
    assert vocabulary.decode(ids) == passage
    assert vocabulary.unk_id not in ids
    num_tokens, num_words = num_tokens + len(ids), num_words + len(passage.split())
  assert num_tokens < 1.9 * num_words  # 1.74 tokens per word when trained.


def test_image_marker_is_one_id(vocabulary):
  text = "<image_start><image><image_end>\nQuestion: what color is the shape?<|end|>"
  ids = vocabulary.encode(text)
  assert ids.count(3) == 1 and ids.count(4) == 1 and ids.count(5) == 1 and ids.count(9) == 1
  assert vocabulary.decode(ids) == text
  ids = vocabulary.encode("a picture<image>of a blue circle")
  assert ids.count(3) == 1 and vocabulary.decode(ids) == "a picture<image>of a blue circle"


@pytest.mark.parametrize("text", ["你好，世界", "emoji 🌍🎭 and café", "tabs\tand  double  spaces",
                                  "digits 20240917"])
def test_byte_fallback_round_trips_unseen_characters(vocabulary, text):
  ids = vocabulary.encode(text)
  assert vocabulary.unk_id not in ids
  assert vocabulary.decode(ids) == text


def test_special_token_ids_names_a_missing_token(tmp_path):
  prefix = str(tmp_path / "plain")
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(["to be or not to be", "that is the question"] * 20),
      model_prefix=prefix, model_type="bpe", vocab_size=40, pad_id=0, eos_id=1, unk_id=2,
      bos_id=-1, minloglevel=2)
  with pytest.raises(ValueError, match="<image>"):
    tokenizer.special_token_ids(tokenizer.get_vocabulary(prefix + ".model"))


def test_training_is_deterministic(tmp_path):
  sentences = list(tokenizer.easy_vqa_sentences()) + list(tokenizer.TEMPLATES)
  first = tokenizer.train_tokenizer(str(tmp_path / "a" / "model"), 512, sentences)
  second = tokenizer.train_tokenizer(str(tmp_path / "b"), 512, sentences)
  with open(first, "rb") as f, open(second, "rb") as g:
    assert f.read() == g.read()
  assert tokenizer.special_token_ids(tokenizer.get_vocabulary(first))["<|end|>"] == 9


def test_bundled_model_is_reproducible(tmp_path):
  # Fails when the sources' text changed: rerun
  # python -m mm1_jax.data.tokenizer --output=mm1_jax/data/assets/mm1_sp4k
  path = tokenizer.train_tokenizer(str(tmp_path / "mm1_sp4k"))
  with open(path, "rb") as f, open(tokenizer.DEFAULT_MODEL, "rb") as g:
    assert f.read() == g.read(), "mm1_sp4k.model is stale: retrain it (see comment)."
