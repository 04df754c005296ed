"""Chat with a training run's model, in the chat template it was trained with.

    python -m mm1_jax.chat --config=configs/tiny.py --workdir=workdirs/tiny [--image=shape.png]
    you: What shape is in the image?
    assistant: A circle.
    you: /image other.png
    you: And in this one?
    ...

    # For scripts: each --prompt is the next user turn, answered in order;
    # --image files go with the first one. One "assistant: ..." per prompt.
    python -m mm1_jax.chat --config=configs/tiny.py --workdir=workdirs/tiny \
        --image=shape.png --prompt="What shape is in the image?" --prompt="What colour is it?"

Use the config (and overrides) the run was trained with: the parameters are
restored as by mm1_jax.generate, and the conversation is rendered with the
run's chat template (data.chat_template for data.vocabulary; "" = the
vocabulary's own, mm1_jax/data/conversations.py), as the training pipeline
renders conversation tasks. Every turn re-renders the whole conversation
with the generation prompt (the assistant header) at its end, lays it out
as training lays out inputs (image runs, the 0 start token) and decodes it
with the KV-cache Generator (decoding flags as generate's); the answer ends
at the first of the template's stop ids (or EOS) and joins the history as
text.

Commands (interactive): /image PATH attaches an image to your next message
(an "<image>\\n" marker goes before its text, as LLaVA does), /system TEXT
sets the system prompt (empty: none), /reset forgets the conversation, its
images and the system prompt, /quit ends (so does end of input), /help.

The conversation plus max_new_tokens must fit the model's sequence length
(data.seq_len, what it was trained on), and its images model.max_images;
past either, /reset starts over. Mistakes are reported as one line
(`Error: ...`); interactively the chat goes on.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Callable, Sequence, TextIO

import numpy as np
from absl import flags
from ml_collections import config_flags

from mm1_jax import cli, generate
from mm1_jax.data import conversations
from mm1_jax.data.conversations import ASSISTANT, IMAGE_MARKER, SYSTEM, USER, Turn

# Put before a user message's text per attached image (LLaVA's layout).
IMAGE_LINE = IMAGE_MARKER + "\n"
# How to get past a full conversation: interactively, and in --prompt mode.
RESET_HINT = "/reset to start a new conversation"
PROMPT_MODE_HINT = "use fewer or shorter --prompt turns"
COMMANDS = ("/image PATH (attach an image to your next message), /system TEXT (set the system "
            "prompt; empty: none), /reset (start a new conversation), /quit")


def define_flags() -> None:
  """The command-line flags; defined only when run as a program, so that
  other entry points (and tests) can import this module."""
  config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Workdir of the training run.")
  flags.DEFINE_multi_string("image", [], "Image file (local or gs://) for the first user "
                            "message; repeat for several.")
  flags.DEFINE_multi_string("prompt", [], "A user message; repeated: successive turns, "
                            "answered in order, then the command exits (no interactive chat).")
  flags.DEFINE_string("system", "", "System prompt (interactively: /system TEXT).")
  generate.define_decode_flags(max_new_tokens=64)


class ChatInputError(generate.GenerateInputError):
  """A message, image or command the chat cannot use; the message says how to fix it."""


class ChatSession:
  """A conversation with a model: ask() re-renders the whole history and decodes an answer.

  decoder: (tokens int32 [n], images uint8 [k, S, S, 3], rng) -> generated
  ids int32 [m] (generate.PromptDecoder, whose eos_id should be
  template.stop_ids[0] so that decoding ends with the answer).
  model_config / data_config: the run's MM1Config and InputConfig (prompt
  layout, image size, max_images, seq_len). template: the run's
  conversations.ChatTemplate for `vocabulary`. max_new_tokens: the
  decoder's, for the length check. seed: sampling seed (folded with the
  turn number, so turns differ).

  State: system (str, "" = none), turns (user / assistant Turns, in order),
  images (generate.PromptImage each, in the order of their markers in turns),
  pending (images for the next user message), last_prompt (the laid-out
  tokens of the last ask, int32 [n]).
  """

  def __init__(self, decoder: Callable, model_config, data_config, vocabulary,
               template: conversations.ChatTemplate, max_new_tokens: int, seed: int = 0):
    self.decoder, self.model_config, self.data_config = decoder, model_config, data_config
    self.vocabulary, self.template = vocabulary, template
    self.max_new_tokens, self.seed = max_new_tokens, seed
    # An answer ends at the template's end of turn; EOS too (a model that
    # saw documents end with it may end an answer that way).
    self.stop_ids = tuple(dict.fromkeys(template.stop_ids + (vocabulary.eos_id,)))
    self.restart_hint = RESET_HINT  # The fix named by a too long / too full conversation.
    self.system = ""
    self.turns: list[Turn] = []
    self.images: list[generate.PromptImage] = []
    self.pending: list[generate.PromptImage] = []
    self.last_prompt: np.ndarray | None = None
    self._asked = 0

  @classmethod
  def restore(cls, experiment, workdir: str, decode_config, seed: int = 0,
              image_paths: Sequence[str] = ()) -> "ChatSession":
    """A session with the latest checkpoint of the run in `workdir`.

    experiment: the run's Experiment; decode_config: a DecodeConfig (its
    eos_id / pad_id are set here from the template and vocabulary).
    image_paths: images for the first user message. Bad flags and images
    are refused before the checkpoint is read.
    """
    from mm1_jax.typed_config import ConfigError

    data_config, model_config = experiment.data, experiment.model
    vocabulary = generate.load_vocabulary(data_config)
    try:
      template = conversations.get_template(data_config.chat_template, vocabulary)
    except ValueError as error:  # A template the vocabulary cannot render: the config's.
      raise ConfigError(str(error)) from None
    decode_config = dataclasses.replace(decode_config, eos_id=template.stop_ids[0],
                                        pad_id=vocabulary.pad_id)
    decode_config.validate(model_config.llm.vocab_size)
    images = generate.read_images(image_paths, model_config, data_config)
    check_image_count(_num_slots(images), model_config.max_images,
                      fix=f"pass at most {model_config.max_images} --image files")
    params, model_config, mesh = generate.restore_params(experiment, workdir)
    decoder = generate.PromptDecoder(params, model_config, mesh, decode_config)
    session = cls(decoder, model_config, data_config, vocabulary, template,
                  decode_config.max_new_tokens, seed)
    session.pending = list(images)
    return session

  # --- the conversation -----------------------------------------------------------

  def conversation(self) -> list[Turn]:
    """The turns rendered for the next answer, system prompt first (without the new message)."""
    return ([Turn(SYSTEM, self.system)] if self.system else []) + list(self.turns)

  def set_system(self, text: str) -> None:
    """Sets the system prompt ("" removes it); it opens the conversation from now on."""
    self.system = text.strip()

  def reset(self) -> None:
    """Forgets the turns, their images, the pending images and the system prompt."""
    self.system, self.turns, self.images, self.pending = "", [], [], []
    self._asked = 0

  def attach_image(self, path: str) -> None:
    """Reads an image (as the pipeline decodes it) for the next user message."""
    self.pending += self._read_images([path])

  def _read_images(self, paths: Sequence[str]) -> list[generate.PromptImage]:
    """One PromptImage per path, refused when the conversation could not hold them."""
    images = generate.read_images(paths, self.model_config, self.data_config)
    check_image_count(_num_slots(self.images + self.pending + images),
                      self.model_config.max_images, self.restart_hint)
    return images

  def prompt_tokens(self, turns: Sequence[Turn], images: Sequence[generate.PromptImage]
                    ) -> np.ndarray:
    """int32 [n]: `turns` rendered with the generation prompt, laid out as training inputs.

    images: one PromptImage per <image> marker of the turns, in order.
    """
    ids = self.template.render(turns, add_generation_prompt=True).tokens
    return generate.layout_prompt(ids, images, self.model_config, self.data_config,
                                  self.vocabulary)

  def ask(self, text: str, image_paths: Sequence[str] = ()) -> str:
    """The model's answer to a user message; both join the history.

    image_paths: images for this message, after the ones attached with
    attach_image. Nothing changes when it raises ChatInputError (empty
    message, a typed "<image>", a missing image, too many images, a
    conversation too long for the model; a missing or undecodable image
    raises its parent, generate.GenerateInputError).
    """
    import jax

    if not text.strip():
      raise ChatInputError("the message is empty; type a message, or /quit.")
    if IMAGE_MARKER in text:
      raise ChatInputError(f"the message contains {IMAGE_MARKER!r}; attach images with "
                           "/image PATH (or --image): the marker is put in for you.")
    pending = self.pending + self._read_images(image_paths)
    user = Turn(USER, IMAGE_LINE * len(pending) + text.strip())
    images = self.images + pending
    tokens = self.prompt_tokens(self.conversation() + [user], images)
    check_length(len(tokens), self.max_new_tokens, self.data_config.seq_len, self.restart_hint)
    self.last_prompt = tokens
    rng = jax.random.fold_in(jax.random.key(self.seed), self._asked)
    generated = self.decoder(tokens, generate.stack_images(images, self.model_config)[0], rng)
    answer = self.answer_text(generated)
    self.turns += [user, Turn(ASSISTANT, answer)]
    self.images, self.pending = images, []
    self._asked += 1
    return answer

  def answer_text(self, generated: Sequence[int]) -> str:
    """The answer in generated ids: up to the first stop id, decoded, without
    the template's answer prefix and outer whitespace (as training texts are)."""
    text = self.template.decode(generate.until_stop(generated, self.stop_ids))
    return text.removeprefix(self.template.answer_prefix).strip()


def _num_slots(images: Sequence[generate.PromptImage]) -> int:
  """Image slots the images take (their sub-images with data.image_split)."""
  return sum(len(image.slots) for image in images)


def check_image_count(count: int, max_images: int, fix: str = RESET_HINT) -> None:
  """ChatInputError when a conversation would hold more images than the model takes
  (count: image slots, i.e. sub-images with data.image_split)."""
  if count > max_images:
    raise ChatInputError(f"the conversation would hold {count} images but the model takes at "
                         f"most model.max_images={max_images}; {fix} (or attach fewer "
                         "images).")


def check_length(prompt_length: int, max_new_tokens: int, seq_len: int,
                 fix: str = RESET_HINT) -> None:
  """ChatInputError when the laid-out conversation and its answer exceed data.seq_len."""
  if prompt_length + max_new_tokens > seq_len:
    raise ChatInputError(
        f"the conversation is {prompt_length} tokens and the answer may add max_new_tokens="
        f"{max_new_tokens}: more than the model's sequence length data.seq_len={seq_len}; "
        f"{fix} (or lower --max_new_tokens).")


# --- the terminal -------------------------------------------------------------------

def chat_loop(session: ChatSession, lines: TextIO, out: TextIO, errors: TextIO,
              prompt: str = "") -> None:
  """Reads messages and commands line by line until /quit or end of input.

  lines: the input stream (sys.stdin, or io.StringIO in tests); answers go
  to `out` as "assistant: ...", mistakes to `errors` as one "Error: ..."
  line each, and the chat goes on. prompt: written before each line is read
  (e.g. "you: " on a terminal).
  """
  while True:
    if prompt:
      out.write(prompt)
      out.flush()
    line = lines.readline()
    if not line:  # End of input.
      return
    line = line.strip()
    if not line:
      continue
    try:
      if line.startswith("/"):
        if not run_command(session, line, out):
          return
      else:
        print(f"assistant: {session.ask(line)}", file=out, flush=True)
    except generate.GenerateInputError as error:  # ChatInputError, or an unreadable image.
      print(f"Error: {error}", file=errors, flush=True)


def run_command(session: ChatSession, line: str, out: TextIO) -> bool:
  """Runs one /command line; False for /quit. Raises ChatInputError for a bad one."""
  command, _, argument = line.partition(" ")
  argument = argument.strip()
  if command in ("/quit", "/exit"):
    return False
  if command == "/image":
    if not argument:
      raise ChatInputError("/image needs a file: /image PATH.")
    session.attach_image(argument)
    print(f"(image {len(session.images) + len(session.pending)} of at most "
          f"{session.model_config.max_images} attached to your next message: {argument})",
          file=out, flush=True)
  elif command == "/system":
    session.set_system(argument)
    print("(system prompt set)" if session.system else "(no system prompt)", file=out,
          flush=True)
  elif command == "/reset":
    session.reset()
    print("(new conversation)", file=out, flush=True)
  elif command == "/help":
    print(f"Commands: {COMMANDS}.", file=out, flush=True)
  else:
    raise ChatInputError(f"unknown command {command!r}; use {COMMANDS}, or /help.")
  return True


def answer_prompts(session: ChatSession, prompts: Sequence[str], out: TextIO,
                   image_paths: Sequence[str] = ()) -> list[str]:
  """Asks each prompt as the next user turn, in order, and prints "assistant: ..." per
  answer. image_paths go with the first prompt. Returns the answers; a
  ChatInputError names the prompt at fault by its number."""
  answers = []
  session.restart_hint = PROMPT_MODE_HINT  # There is no /reset here.
  for number, text in enumerate(prompts):
    try:
      answers.append(session.ask(text, image_paths if number == 0 else ()))
    except ChatInputError as error:
      raise ChatInputError(f"--prompt number {number + 1}: {error}") from None
    print(f"assistant: {answers[-1]}", file=out, flush=True)
  return answers


def main(argv):
  cli.start(argv)
  from mm1_jax.experiment import Experiment

  FLAGS = flags.FLAGS
  experiment = Experiment.from_config(FLAGS.config, check_init_from=False)
  session = ChatSession.restore(experiment, FLAGS.workdir, generate.decode_config_from_flags(),
                                seed=FLAGS.seed, image_paths=FLAGS.image)
  session.set_system(FLAGS.system)
  if FLAGS.prompt:
    answer_prompts(session, FLAGS.prompt, sys.stdout)
    return
  interactive = sys.stdin.isatty()
  if interactive:
    print(f"Chat with the run in {FLAGS.workdir} (chat template {session.template.name!r}). "
          f"Commands: {COMMANDS}.")
  try:
    chat_loop(session, sys.stdin, sys.stdout, sys.stderr, prompt="you: " if interactive else "")
  except KeyboardInterrupt:  # Ctrl-C ends the chat like /quit.
    print()


if __name__ == "__main__":
  define_flags()
  cli.run(main, required=["config", "workdir"], extra_errors=(generate.GenerateInputError,))
