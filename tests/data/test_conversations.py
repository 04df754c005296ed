"""Chat templates: rendered ids, structural loss masks, and Hugging Face's own rendering."""

import os
import re

import numpy as np
import pytest

from mm1_jax.data import conversations, tokenizer
from mm1_jax.data.conversations import ASSISTANT, SYSTEM, USER, Turn

WORDS = ("What", "colour", "is", "the", "shape", "?", "It", "is", "blue", ".", "A", "circle",
         "42", "3.14", ",", "!", "\n", "don't", "café", "naïve", "🙂", "(yes)", "x=1;",
         "  ", "\t", "Answer", "the", "question", "red", "triangle", "Hello", "world")


def random_text(rng, images=0):
  words = list(rng.choice(WORDS, size=int(rng.integers(1, 12))))
  for _ in range(images):
    words.insert(int(rng.integers(0, len(words) + 1)), conversations.IMAGE_MARKER)
  text = ""
  for word in words:
    text += word if (not text or word in ".,?!\n" or text.endswith("\n")) else " " + word
  return text


def random_conversation(rng, with_images=True, lstrip=False):
  """lstrip: no text starts with whitespace (see test_gguf_keeps_the_turn_boundary)."""
  turns = []
  text = (lambda images=0: random_text(rng, images).lstrip()) if lstrip else (
      lambda images=0: random_text(rng, images))
  if rng.random() < 0.4:
    turns.append(Turn(SYSTEM, text()))
  for _ in range(int(rng.integers(1, 4))):
    turns.append(Turn(USER, text(int(rng.integers(0, 3)) if with_images else 0)))
    turns.append(Turn(ASSISTANT, text()))
  return turns


@pytest.fixture(scope="module")
def sentencepiece():
  return tokenizer.get_vocabulary()


@pytest.fixture(scope="module")
def smollm2():
  return tokenizer.get_vocabulary("smollm2")


def expected_text(name, turns, vocabulary):
  """The rendered string of each template, written a second way (format strings)."""
  if name == "mm1":
    return "".join(f"<|{t.role}|>{t.text}<|end|>" for t in turns)
  if name == "llava_v1":
    system = conversations.LLAVA_V1_SYSTEM
    if turns[0].role == SYSTEM:
      system, turns = turns[0].text, turns[1:]
    text = system + " "
    eos = conversations.get_template(name, vocabulary).decode([vocabulary.eos_id])
    for t in turns:  # LLaVA's get_prompt, SeparatorStyle.TWO, seps " " and "</s>" (EOS).
      text += f"USER: {t.text} " if t.role == USER else f"ASSISTANT: {t.text}{eos}"
    return text
  if name == "plain":
    return "".join(conversations.IMAGE_MARKER * t.text.count(conversations.IMAGE_MARKER)
                   if t.role == USER else t.text + "\n" for t in turns if t.role != SYSTEM)
  raise AssertionError(name)


ANSWER_END = {"mm1": "<|end|>", "plain": "\n", "gguf": "<|im_end|>"}


def check_rendering(template, turns, vocabulary):
  rendered = template.render(turns)
  tokens, mask, ends = rendered
  assert tokens.dtype == np.int32 and tokens.shape == mask.shape == ends.shape
  # The trained tokens, cut at the turn ends, decode to exactly the assistant texts.
  answers = [t.text for t in turns if t.role == ASSISTANT]
  spans = np.split(np.flatnonzero(mask), np.flatnonzero(ends[mask > 0])[:-1] + 1)
  assert int(ends.sum()) == len(answers) == len(spans)
  for span, answer in zip(spans, answers):
    assert ends[span[-1]], "each trained span ends at a turn end"
    assert np.all(np.diff(span) == 1), "one contiguous span per answer"
    end = ANSWER_END.get(template.name) or template.decode([vocabulary.eos_id])
    assert template.decode(tokens[span]) == template.answer_prefix + answer + end
  # Every image marker of the user turns is one marker id, untrained.
  marker = tokenizer.special_token_ids(vocabulary)["<image>"]
  num_images = sum(t.text.count(conversations.IMAGE_MARKER) for t in turns if t.role == USER)
  assert np.count_nonzero(tokens == marker) == num_images
  assert not mask[tokens == marker].any()
  return rendered


@pytest.mark.parametrize("name", ["mm1", "llava_v1", "plain"])
@pytest.mark.parametrize("which", ["sentencepiece", "smollm2"])
def test_random_conversations_render_with_assistant_only_masks(name, which, request):
  vocabulary = request.getfixturevalue(which)
  template = conversations.get_template(name, vocabulary)
  rng = np.random.default_rng(0)
  for _ in range(60):
    turns = random_conversation(rng)
    tokens = check_rendering(template, turns, vocabulary).tokens
    assert template.decode(tokens) == expected_text(name, turns, vocabulary)


def _hf_tokenizer(path, monkeypatch):
  transformers = pytest.importorskip("transformers")
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  return transformers.AutoTokenizer.from_pretrained(os.path.dirname(path),
                                                    gguf_file=os.path.basename(path))


def test_gguf_template_equals_hugging_face_apply_chat_template(smollm2, monkeypatch):
  """SmolLM2's ChatML, read from the GGUF: our ids == transformers' on the same turns."""
  reference = _hf_tokenizer(smollm2.path, monkeypatch)
  template = conversations.get_template("", smollm2)
  assert template.name == "gguf"
  rng = np.random.default_rng(1)
  for number in range(60):
    # Whitespace runs before a digit tokenize differently in transformers' GGUF
    # conversion than in SmolLM2's tokenizer.json (digits split first, as
    # ours): a tokenizer matter, not a template one, so kept out.
    turns = [Turn(t.role, re.sub(r"\s+(?=\d)", " ", t.text))
             for t in random_conversation(rng, with_images=False, lstrip=True)]
    messages = [{"role": t.role, "content": t.text} for t in turns]
    rendered = check_rendering(template, turns, smollm2)
    expected = reference.apply_chat_template(messages, tokenize=True, return_dict=True)
    assert rendered.tokens.tolist() == list(expected["input_ids"]), (number, messages)
    # The generation prompt too, after the last user turn.
    prompt = template.render(turns[:-1], add_generation_prompt=True).tokens
    expected = reference.apply_chat_template(messages[:-1], add_generation_prompt=True,
                                             tokenize=True, return_dict=True)
    assert prompt.tolist() == list(expected["input_ids"])
  # The default system prompt of SmolLM2's template, untrained.
  rendered = template.render([Turn(USER, "Hi"), Turn(ASSISTANT, "Hello")])
  assert template.decode(rendered.tokens).startswith(
      "<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
  assert template.stop_ids == (smollm2.token_to_id("<|im_end|>"),)


def test_gguf_keeps_the_turn_boundary(smollm2, monkeypatch):
  """A text that starts with whitespace: Hugging Face tokenizes the rendered
  string, so the header's "\n" and the text's "\t" merge into one token
  that straddles the turn boundary; we keep them apart, so the trained ids
  are the answer's own and a generation prompt ends where training's did."""
  reference = _hf_tokenizer(smollm2.path, monkeypatch)
  template = conversations.get_template("gguf", smollm2)
  turns = [Turn(USER, "Hi"), Turn(ASSISTANT, "\t circle")]
  ours = template.render(turns)
  theirs = reference.apply_chat_template([{"role": t.role, "content": t.text} for t in turns],
                                         tokenize=True, return_dict=True)["input_ids"]
  assert template.decode(ours.tokens) == reference.decode(theirs)
  assert len(ours.tokens) == len(theirs) + 1
  assert ours.tokens[ours.loss_mask > 0].tolist() == (
      smollm2.encode("\t circle") + [smollm2.token_to_id("<|im_end|>")])


def test_gguf_template_keeps_images_as_marker_ids(smollm2):
  template = conversations.get_template("gguf", smollm2)
  turns = [Turn(USER, "<image>\n<image>\nWhich one is red?"), Turn(ASSISTANT, "The first.")]
  check_rendering(template, turns, smollm2)


def test_generation_prompts_end_with_the_assistant_header(sentencepiece):
  turns = [Turn(USER, "<image>\nWhat colour?")]
  mm1 = conversations.get_template("mm1", sentencepiece)
  prompt = mm1.render(turns, add_generation_prompt=True)
  assert mm1.decode(prompt.tokens).endswith("<|end|><|assistant|>")
  assert not prompt.loss_mask.any() and not prompt.turn_ends.any()
  assert mm1.stop_ids == (tokenizer.special_token_ids(sentencepiece)["<|end|>"],)
  llava = conversations.get_template("llava_v1", sentencepiece)
  assert llava.decode(llava.render(turns, add_generation_prompt=True).tokens).endswith(
      "? ASSISTANT:")
  assert llava.stop_ids == (sentencepiece.eos_id,)


@pytest.mark.parametrize("turns, message", [
    ([Turn("human", "hi"), Turn(ASSISTANT, "x")], "unknown role 'human'"),
    ([Turn(USER, "hi"), Turn(SYSTEM, "be brief"), Turn(ASSISTANT, "x")], "only allowed first"),
    ([Turn(SYSTEM, "s"), Turn(USER, "hi")], "no assistant turn"),
])
def test_bad_conversations_are_named(sentencepiece, turns, message):
  with pytest.raises(conversations.ConversationError, match=message):
    conversations.get_template("mm1", sentencepiece).render(turns)


def test_template_names_and_vocabularies(sentencepiece, smollm2):
  assert conversations.default_template_name(sentencepiece) == "mm1"
  assert conversations.default_template_name(smollm2) == "gguf"
  with pytest.raises(ValueError, match="unknown template 'chatgpt'.*mm1"):
    conversations.get_template("chatgpt", sentencepiece)
  with pytest.raises(ValueError, match="'gguf' needs a GGUF vocabulary"):
    conversations.get_template("gguf", sentencepiece)


def test_turns_from_features_decodes_bytes():
  turns = conversations.turns_from_features([b"user", b"assistant"], ["caf\u00e9".encode(), b"ok"])
  assert turns == [Turn(USER, "café"), Turn(ASSISTANT, "ok")]
  with pytest.raises(conversations.ConversationError, match="2 roles but 1 texts"):
    conversations.turns_from_features([b"user", b"assistant"], [b"x"])
