"""The chat command: prompts rendered with the run's template and laid out as training
inputs, history across turns, /commands, --prompt mode, one-line errors."""

import dataclasses
import io
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from configs import tiny
from mm1_jax import chat, generate, testing
from mm1_jax.data import conversations, tokenizer
from mm1_jax.data.conversations import ASSISTANT, SYSTEM, USER, Turn
from mm1_jax.evaluation import decoding
from mm1_jax.experiment import Experiment
from process_env import one_device_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ANSWER = "Blue."
# The dense tiny model (the quickest to compile), as tests/test_evaluate.py.
OVERRIDES = ["--config=configs/tiny.py:dense", "--config.data.seq_len=64"]


def tiny_config():
  config = tiny.get_config("dense")
  config.data.seq_len = 64
  return Experiment.from_config(config)


@pytest.fixture(scope="module")
def experiment():
  return tiny_config()


@pytest.fixture(scope="module")
def template():
  return conversations.get_template("", tokenizer.get_vocabulary())


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
  """A 50x80 PNG (not square: the pipeline's resize must apply)."""
  path = tmp_path_factory.mktemp("images") / "shape.png"
  pixels = np.random.default_rng(0).integers(0, 256, (50, 80, 3), dtype=np.uint8)
  path.write_bytes(tf.io.encode_png(pixels).numpy())
  return str(path)


class Recording:
  """A decoder that records what it is asked to continue; answers with `answer` (ids)."""

  def __init__(self, answer=None, decoder=None):
    self.answer, self.decoder, self.calls = answer, decoder, []

  def __call__(self, tokens, images, rng):
    self.calls.append((np.array(tokens), np.array(images)))
    return self.decoder(tokens, images, rng) if self.decoder else self.answer


def answer_ids(template, text):
  """The ids a model trained on the template generates for `text`: text, then end of turn."""
  rendered = template.render([Turn(USER, "q"), Turn(ASSISTANT, text)])
  return rendered.tokens[rendered.loss_mask > 0]


def session_of(experiment, template, decoder, max_new_tokens=4, seq_len=128):
  """A session of the tiny model; seq_len: the conversation's limit (data.seq_len)."""
  data = dataclasses.replace(experiment.data, seq_len=seq_len)
  return chat.ChatSession(decoder, experiment.model, data, tokenizer.get_vocabulary(), template,
                          max_new_tokens)


def expected_prompt(template, turns, model_config):
  """Written a second way: the 0 start token, then the rendered ids with each
  <image> marker expanded to num_image_tokens placeholders."""
  ids = template.render(turns, add_generation_prompt=True).tokens
  marker = model_config.image_placeholder_id
  runs = [[t] * model_config.num_image_tokens if t == marker else [t] for t in ids]
  return np.array([0] + [t for run in runs for t in run], np.int32)


def test_the_session_decodes_the_rendered_history(experiment, template, image_path):
  model = experiment.model
  decoder = Recording(answer_ids(template, ANSWER))
  session = session_of(experiment, template, decoder)
  [image] = generate.read_images([image_path], model, experiment.data)

  session.attach_image(image_path)  # /image: goes with the next message only.
  assert session.ask("What shape is in the image?") == ANSWER
  first = Turn(USER, "<image>\nWhat shape is in the image?")
  tokens, images = decoder.calls[0]
  np.testing.assert_array_equal(tokens, expected_prompt(template, [first], model))
  np.testing.assert_array_equal(images, image.slots)
  assert template.decode(tokens[tokens != model.image_placeholder_id][1:]) == (
      "<|user|>\nWhat shape is in the image?<|end|><|assistant|>")

  # The history is re-rendered: the first exchange, then the new message (no image).
  assert session.ask("  And its colour? ") == ANSWER
  second = Turn(USER, "And its colour?")
  history = [first, Turn(ASSISTANT, ANSWER), second]
  tokens, images = decoder.calls[1]
  np.testing.assert_array_equal(tokens, expected_prompt(template, history, model))
  np.testing.assert_array_equal(images, image.slots)  # The first turn's image stays.
  np.testing.assert_array_equal(session.last_prompt, tokens)
  assert session.turns == history + [Turn(ASSISTANT, ANSWER)]

  # A system prompt opens the conversation; images given to ask() go with that message.
  session.set_system("Answer briefly.")
  session.ask("Again?", [image_path])
  history += [Turn(ASSISTANT, ANSWER), Turn(USER, "<image>\nAgain?")]
  tokens, images = decoder.calls[2]
  np.testing.assert_array_equal(
      tokens, expected_prompt(template, [Turn(SYSTEM, "Answer briefly.")] + history, model))
  assert images.shape == (2, 64, 64, 3)

  session.reset()
  assert (session.system, session.turns, session.images, session.pending) == ("", [], [], [])
  session.ask("Hi")
  np.testing.assert_array_equal(decoder.calls[3][0],
                                expected_prompt(template, [Turn(USER, "Hi")], model))
  assert decoder.calls[3][1].shape == (0, 64, 64, 3)


def test_a_tiny_model_answers_up_to_a_stop_id(experiment, template, image_path):
  """The real KV-cache decoder (random parameters): it decodes the session's prompt."""
  model = experiment.model
  decode_config = decoding.DecodeConfig(max_new_tokens=4, eos_id=template.stop_ids[0])
  params = testing.random_params(model, seed=1, stddev=0.2)
  decoder = Recording(decoder=generate.PromptDecoder(params, model, None, decode_config))
  session = session_of(experiment, template, decoder)
  for number, text in enumerate(["What shape is in the image?", "And its colour?"]):
    answer = session.ask(text, [image_path] if number == 0 else ())
    assert isinstance(answer, str) and answer == answer.strip()
    np.testing.assert_array_equal(decoder.calls[-1][0], session.last_prompt)
    np.testing.assert_array_equal(session.last_prompt,
                                  expected_prompt(template, session.turns[:-1], model))
  assert [t.role for t in session.turns] == [USER, ASSISTANT] * 2
  # Cut at the first stop id (EOS included), decoded without the answer prefix.
  end, eos = template.stop_ids[0], tokenizer.get_vocabulary().eos_id
  assert session.answer_text(list(answer_ids(template, " Red ")) + [7, 8]) == "Red"
  assert session.answer_text(answer_ids(template, "Red")[:-1].tolist() + [eos, end]) == "Red"


def test_the_terminal_loop_runs_commands_and_reports_errors_in_one_line(
    experiment, template, image_path, tmp_path):
  decoder = Recording(answer_ids(template, ANSWER))
  session = session_of(experiment, template, decoder)
  missing = str(tmp_path / "nope.png")
  lines = "\n".join([
      f"/image {image_path}", "What shape?", "", f"/image {missing}", "/image", "/colour",
      "Is <image> red?", "/reset", "/system Answer briefly.", "Hello", "/quit", "Never read."])
  out, errors = io.StringIO(), io.StringIO()
  chat.chat_loop(session, io.StringIO(lines), out, errors)
  assert out.getvalue().splitlines() == [
      "(image 1 of at most 4 attached to your next message: " + image_path + ")",
      f"assistant: {ANSWER}", "(new conversation)", "(system prompt set)",
      f"assistant: {ANSWER}"]
  assert errors.getvalue().splitlines() == [
      f"Error: image file not found: {missing}",
      "Error: /image needs a file: /image PATH.",
      f"Error: unknown command '/colour'; use {chat.COMMANDS}, or /help.",
      "Error: the message contains '<image>'; attach images with /image PATH (or --image): "
      "the marker is put in for you."]
  assert len(decoder.calls) == 2  # Errors decode nothing; /quit ends the loop.
  model = experiment.model
  np.testing.assert_array_equal(decoder.calls[0][0], expected_prompt(
      template, [Turn(USER, "<image>\nWhat shape?")], model))
  np.testing.assert_array_equal(decoder.calls[1][0], expected_prompt(
      template, [Turn(SYSTEM, "Answer briefly."), Turn(USER, "Hello")], model))


def test_too_many_images_and_too_long_conversations_are_refused(experiment, template,
                                                                image_path):
  decoder = Recording(answer_ids(template, ANSWER))
  session = session_of(experiment, template, decoder, seq_len=64)
  for _ in range(4):  # tiny: model.max_images = 4.
    session.attach_image(image_path)
  with pytest.raises(chat.ChatInputError, match=r"^the conversation would hold 5 images but "
                                                r"the model takes at most model.max_images=4; "
                                                r"/reset to start a new conversation"):
    session.attach_image(image_path)
  with pytest.raises(chat.ChatInputError, match=r"^the conversation is \d+ tokens and the "
                                                r"answer may add max_new_tokens=4: more than "
                                                r"the model's sequence length "
                                                r"data.seq_len=64; /reset"):
    session.ask("What shapes?")  # 4 images x 16 tokens: over 64.
  assert not decoder.calls and not session.turns and len(session.pending) == 4  # Unchanged.
  session.reset()
  session.ask("A short one.")
  with pytest.raises(chat.ChatInputError, match="data.seq_len=64; /reset"):
    for _ in range(20):
      session.ask("Then a question that makes the conversation longer and longer.")
  with pytest.raises(chat.ChatInputError, match="the message is empty"):
    session.ask(" ")


def test_prompt_mode_answers_each_prompt_in_order(experiment, template, image_path):
  decoder = Recording(answer_ids(template, ANSWER))
  session = session_of(experiment, template, decoder)
  out = io.StringIO()
  answers = chat.answer_prompts(session, ["What shape?", "What colour?"], out, [image_path])
  assert answers == [ANSWER, ANSWER]
  assert out.getvalue() == f"assistant: {ANSWER}\nassistant: {ANSWER}\n"
  assert [len(images) for _, images in decoder.calls] == [1, 1]  # On the first turn only.
  assert session.turns[0] == Turn(USER, "<image>\nWhat shape?")
  assert session.turns[2] == Turn(USER, "What colour?")
  # No /reset in this mode: the error names the prompt and the fix.
  session = session_of(experiment, template, decoder, seq_len=64)
  with pytest.raises(chat.ChatInputError, match=r"^--prompt number 2: the conversation is \d+ "
                                                r"tokens .* use fewer or shorter --prompt turns"):
    chat.answer_prompts(session, ["What shape?", "Describe it. " * 20], io.StringIO(),
                        [image_path])


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A workdir holding a step-1 checkpoint of tiny_config(): random params,
  a zero optimizer state (built on the host: compiling the init is slow)."""
  workdir = str(tmp_path_factory.mktemp("run"))
  testing.write_random_checkpoint(tiny_config(), workdir, step=1)
  return workdir


def run_chat(*flags):
  return subprocess.run(
      [sys.executable, "-m", "mm1_jax.chat", *OVERRIDES, *flags], cwd=REPO,
      env=one_device_env(), capture_output=True, text=True, timeout=300)


def test_cli_prompt_mode_prints_one_answer_per_prompt(workdir, image_path, tmp_path):
  result = run_chat(f"--workdir={workdir}", f"--image={image_path}", "--max_new_tokens=4",
                    "--prompt=What shape is in the image?", "--prompt=And its colour?")
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.count("assistant: ") == 2, result.stdout
  assert result.stdout.startswith("assistant: ")

  # Mistakes: one line, exit status 1, before the checkpoint is read.
  missing = str(tmp_path / "nope.png")
  result = run_chat(f"--workdir={workdir}", f"--image={missing}", "--prompt=Hi")
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1] == f"Error: image file not found: {missing}"
