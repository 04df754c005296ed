"""Conversations and chat templates: turns -> token ids with an assistant-only loss mask.

A conversation is an ordered list of turns (role "system" | "user" |
"assistant", text with one "<image>" marker per image) and its images. A
chat template renders it to token ids, building the loss mask while it
renders, segment by segment: each piece of the template (a role header, a
turn's text, an end-of-turn token) is tokenized on its own and carries its
own mask bit. Assistant text and its end-of-turn token get loss weight 1;
system and user turns, role headers, image markers and the separators
between turns get 0. Nothing is found afterwards by counting tokens of a
rendered string: that is how LLaVA's "tokenization mismatch" (a whole
sample silently masked) arises, and it cannot here.

Templates (data.chat_template; "" picks the vocabulary's own, see
`default_template_name`):

  mm1       the bundled tokenizer's role tokens (any vocabulary built by
            mm1_jax.data.tokenizer has them):
              <|system|>You are ...<|end|><|user|><image>
              What colour?<|end|><|assistant|>Blue.<|end|>
  gguf      the GGUF file's own `tokenizer.chat_template` (Jinja, rendered as
            Hugging Face's apply_chat_template does; SmolLM2's is ChatML):
              <|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\nHello<|im_end|>\\n
            Trained: the assistant text and the GGUF's end-of-turn token
            (its eos_token_id, <|im_end|>), not the newline after it.
  llava_v1  LLaVA's conv_vicuna_v1:
              {system} USER: {q} ASSISTANT: {a}</s>USER: ...
            Trained: " {a}" and the EOS id.
  plain     LLaVA's stage-1 format: each user turn contributes only its
            image markers; each assistant turn its text and "\\n" (trained).

Every text piece is tokenized as a continuation of what precedes it: for a
SentencePiece vocabulary without the dummy-prefix "▁" that `encode` puts at
the start of a text, so the ids decode to exactly the rendered string.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import re
from typing import TYPE_CHECKING, Callable, NamedTuple, Sequence

import numpy as np

from mm1_jax.data.config import CHAT_TEMPLATES

# seqio and the tokenizer (so TensorFlow) are imported where they are used:
# the chat program imports the turns and templates before its start-up
# (which quiets TensorFlow's console noise).
if TYPE_CHECKING:
  import seqio

SYSTEM, USER, ASSISTANT = "system", "user", "assistant"
ROLES = (SYSTEM, USER, ASSISTANT)
IMAGE_MARKER = "<image>"
TEMPLATES = CHAT_TEMPLATES

# Appended to a question whose expected answer is one word, in training data
# and in chat-format VQA evaluation alike (LLaVA-1.5's short-answer prompt).
SHORT_ANSWER_INSTRUCTION = "Answer the question using a single word."

# LLaVA's conv_vicuna_v1 system prompt (llava/conversation.py), used when a
# conversation brings none.
LLAVA_V1_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                   "The assistant gives helpful, detailed, and polite answers to the human's "
                   "questions.")


@dataclasses.dataclass(frozen=True)
class Turn:
  role: str  # One of ROLES.
  text: str  # May hold IMAGE_MARKERs.


class Rendered(NamedTuple):
  """A rendered conversation; all arrays have one entry per token.

  tokens     int32 [n]
  loss_mask  int32 [n]  1 on assistant text and its end-of-turn token
  turn_ends  bool  [n]  True at the last token of each assistant turn: the
                        places after which a too long conversation may be cut
  """
  tokens: np.ndarray
  loss_mask: np.ndarray
  turn_ends: np.ndarray


class ConversationError(ValueError):
  """A conversation the template cannot render (unknown role, misplaced system turn)."""


def turns_from_features(roles: Sequence, texts: Sequence) -> list[Turn]:
  """Turns of a task example: roles / texts are str or UTF-8 bytes [t]."""
  if len(roles) != len(texts):
    raise ConversationError(f"{len(roles)} roles but {len(texts)} texts.")

  def text(value):
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)
  return [Turn(text(role), text(body)) for role, body in zip(roles, texts)]


def check_turns(turns: Sequence[Turn]) -> None:
  """Raises ConversationError for an unknown role, a system turn after the
  first, or a conversation without an assistant turn."""
  for number, turn in enumerate(turns):
    if turn.role not in ROLES:
      raise ConversationError(f"turn {number}: unknown role {turn.role!r}; use one of {ROLES}.")
    if turn.role == SYSTEM and number:
      raise ConversationError(f"turn {number}: a system turn is only allowed first.")
  if not any(turn.role == ASSISTANT for turn in turns):
    raise ConversationError("no assistant turn: nothing to train on.")


# --- tokenizing pieces --------------------------------------------------------

class _PieceEncoder:
  """encode / decode of text pieces as continuations (no dummy prefix)."""

  def __init__(self, vocabulary: seqio.Vocabulary):
    import seqio
    if isinstance(vocabulary, seqio.SentencePieceVocabulary):
      import sentencepiece as spm
      from sentencepiece import sentencepiece_model_pb2

      model = sentencepiece_model_pb2.ModelProto.FromString(vocabulary.sp_model)
      model.normalizer_spec.add_dummy_prefix = False
      processor = spm.SentencePieceProcessor(model_proto=model.SerializeToString())
      self.encode = lambda text: processor.EncodeAsIds(text)
      self.decode = lambda ids: processor.DecodeIds([int(i) for i in ids])
    else:
      self.encode = lambda text: list(vocabulary.encode(text))
      # Every id written out: seqio's decode would stop at the first EOS.
      self.decode = lambda ids: vocabulary.tokenizer.decode([int(i) for i in ids],
                                                            skip_special_tokens=False)


@dataclasses.dataclass(frozen=True)
class _Segment:
  """A piece of a rendered conversation: text (tokenized) or ids (as they are)."""
  content: str | tuple[int, ...]
  trained: bool = False
  turn_end: bool = False  # The assistant turn ends with this piece.


# --- the templates --------------------------------------------------------------

class ChatTemplate(abc.ABC):
  """Renders conversations for one vocabulary.

  Example:
    template = get_template("mm1", vocabulary)
    rendered = template.render([Turn("user", "<image>\\nWhat colour?"),
                                Turn("assistant", "Blue.")])
    prompt = template.render(turns, add_generation_prompt=True).tokens
    template.stop_ids  # ids that end a generated answer

  answer_prefix: what the template puts before each assistant text inside
  its trained tokens (" " for llava_v1), so decode(trained) == prefix + text.
  """

  name: str = ""
  answer_prefix: str = ""

  def __init__(self, vocabulary: seqio.Vocabulary):
    self.vocabulary = vocabulary
    self._pieces = _PieceEncoder(vocabulary)

  @abc.abstractmethod
  def segments(self, turns: Sequence[Turn], add_generation_prompt: bool) -> list[_Segment]:
    """The template's layout of `turns` (checked by `render`)."""

  @property
  @abc.abstractmethod
  def stop_ids(self) -> tuple[int, ...]:
    """Ids that end an assistant answer in generation."""

  def render(self, turns: Sequence[Turn], add_generation_prompt: bool = False) -> Rendered:
    """Token ids, loss mask and turn ends of `turns` (see Rendered).

    add_generation_prompt: end with the header of a new assistant turn (for
    generation); the conversation may then end with a user turn.
    """
    turns = list(turns)
    if add_generation_prompt:
      for number, turn in enumerate(turns):
        if turn.role not in ROLES:
          raise ConversationError(f"turn {number}: unknown role {turn.role!r}; use one of "
                                  f"{ROLES}.")
    else:
      check_turns(turns)
    tokens, mask, ends = [], [], []
    for segment in self.segments(turns, add_generation_prompt):
      ids = (list(segment.content) if isinstance(segment.content, tuple)
             else self._pieces.encode(segment.content))
      tokens.extend(ids)
      mask.extend([int(segment.trained)] * len(ids))
      ends.extend([False] * len(ids))
      if segment.turn_end and ids:
        ends[-1] = True
    return Rendered(np.asarray(tokens, np.int32), np.asarray(mask, np.int32),
                    np.asarray(ends, bool))

  def decode(self, ids) -> str:
    """Text of ids rendered by this template (pieces joined as rendered)."""
    return self._pieces.decode(ids)

  def _id(self, token: str) -> int:
    return self._special_ids[token]

  @functools.cached_property
  def _special_ids(self) -> dict[str, int]:
    from mm1_jax.data import tokenizer
    return tokenizer.special_token_ids(self.vocabulary)


class Mm1Template(ChatTemplate):
  """<|role|>text<|end|> per turn; trained: assistant text + <|end|>."""

  name = "mm1"
  _HEADERS = {SYSTEM: "<|system|>", USER: "<|user|>", ASSISTANT: "<|assistant|>"}

  @functools.cached_property
  def stop_ids(self) -> tuple[int, ...]:
    return (self._id("<|end|>"),)

  def segments(self, turns, add_generation_prompt):
    end = self.stop_ids
    out = []
    for turn in turns:
      trained = turn.role == ASSISTANT
      out += [_Segment((self._id(self._HEADERS[turn.role]),)),
              _Segment(turn.text, trained), _Segment(end, trained, turn_end=trained)]
    if add_generation_prompt:
      out.append(_Segment((self._id("<|assistant|>"),)))
    return out


class LlavaV1Template(ChatTemplate):
  """LLaVA's vicuna_v1: "{system} USER: q ASSISTANT: a</s>" (see module doc)."""

  name = "llava_v1"
  answer_prefix = " "

  @property
  def stop_ids(self) -> tuple[int, ...]:
    return (self.vocabulary.eos_id,)

  def segments(self, turns, add_generation_prompt):
    system = LLAVA_V1_SYSTEM
    if turns and turns[0].role == SYSTEM:
      system, turns = turns[0].text, turns[1:]
    out = [_Segment(system + " ")]
    for turn in turns:
      if turn.role == USER:
        out.append(_Segment(f"USER: {turn.text} "))
      else:
        out += [_Segment("ASSISTANT:"), _Segment(" " + turn.text, True),
                _Segment(self.stop_ids, True, turn_end=True)]
    if add_generation_prompt:
      out.append(_Segment("ASSISTANT:"))
    return out


class PlainTemplate(ChatTemplate):
  """LLaVA's stage-1 `plain`: image markers, then the caption and "\\n" (trained)."""

  name = "plain"

  @functools.cached_property
  def stop_ids(self) -> tuple[int, ...]:
    newline = self._pieces.encode("\n")
    return tuple(newline[-1:]) + (self.vocabulary.eos_id,)

  def segments(self, turns, add_generation_prompt):
    out = []
    for turn in turns:
      if turn.role == USER:
        markers = turn.text.count(IMAGE_MARKER)
        if markers:
          out.append(_Segment(IMAGE_MARKER * markers))
      elif turn.role == ASSISTANT:
        out.append(_Segment(turn.text + "\n", True, turn_end=True))
    return out


class GgufTemplate(ChatTemplate):
  """The GGUF's tokenizer.chat_template, rendered with Jinja as Hugging Face does.

  Each message's content is replaced by a sentinel, the template is
  rendered once per sequence of roles (cached), and the output is cut at the
  sentinels: the literal text between them is the template's own (headers,
  separators), never trained, except the end-of-turn token that follows an
  assistant content. So the template must insert each content unchanged
  (no .strip(), no case changes), which the rendering checks.
  """

  name = "gguf"
  _SENTINEL = "\ue000{}\ue001"
  _SENTINEL_RE = re.compile("\ue000(\\d+)\ue001")

  def __init__(self, vocabulary: seqio.Vocabulary):
    super().__init__(vocabulary)
    from mm1_jax.data import gguf_vocabulary
    if not isinstance(vocabulary, gguf_vocabulary.GgufBpeVocabulary):
      raise ValueError(f"data.chat_template: 'gguf' needs a GGUF vocabulary, got {vocabulary}; "
                       "use 'mm1' or 'llava_v1' with a SentencePiece vocabulary.")
    chat = gguf_vocabulary.chat_metadata(vocabulary.path)
    if not chat["chat_template"]:
      raise ValueError(f"data.chat_template: {vocabulary.path} has no tokenizer.chat_template "
                       "metadata; use 'mm1' or 'llava_v1'.")
    self._end_of_turn = vocabulary.id_to_token(chat["eos_token_id"])
    bos_id = chat["bos_token_id"]
    self._bos = vocabulary.id_to_token(bos_id) if bos_id is not None else ""
    self._jinja = _compile_jinja(chat["chat_template"])
    self._literals: dict[tuple[tuple[str, ...], bool], list[str]] = {}

  @property
  def stop_ids(self) -> tuple[int, ...]:
    return (self.vocabulary.token_to_id(self._end_of_turn),)

  def literals(self, roles: tuple[str, ...], add_generation_prompt: bool) -> list[str]:
    """The template's text around len(roles) contents: len(roles) + 1 strings."""
    key = (roles, add_generation_prompt)
    if key not in self._literals:
      messages = [{"role": role, "content": self._SENTINEL.format(i)}
                  for i, role in enumerate(roles)]
      text = self._jinja.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                bos_token=self._bos, eos_token=self._end_of_turn)
      parts = self._SENTINEL_RE.split(text)
      found = [int(i) for i in parts[1::2]]
      if found != list(range(len(roles))):
        raise ValueError(f"the GGUF chat template does not insert each message's content once, "
                         f"in order (found contents {found} for roles {list(roles)}); it cannot "
                         "be rendered with a structural loss mask.")
      if len(self._literals) > 256:  # Bounded: role sequences repeat.
        self._literals.clear()
      self._literals[key] = parts[0::2]
    return self._literals[key]

  def segments(self, turns, add_generation_prompt):
    literals = self.literals(tuple(turn.role for turn in turns), add_generation_prompt)
    out = [_Segment(literals[0])]
    for turn, after in zip(turns, literals[1:]):
      if turn.role != ASSISTANT:
        out += [_Segment(turn.text), _Segment(after)]
        continue
      # Trained: the content and the end-of-turn token that closes it.
      end = after.find(self._end_of_turn)
      if end < 0:
        raise ValueError(f"the GGUF chat template does not close an assistant turn with "
                         f"{self._end_of_turn!r} (its end-of-turn token).")
      end += len(self._end_of_turn)
      out += [_Segment(turn.text, True), _Segment(after[:end], True, turn_end=True),
              _Segment(after[end:])]
    return [segment for segment in out if segment.content]


def _compile_jinja(source: str):
  """The template compiled with Hugging Face's Jinja settings (apply_chat_template)."""
  import jinja2
  from jinja2 import ext, sandbox

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  environment = sandbox.ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True, extensions=[ext.loopcontrols])
  environment.globals["raise_exception"] = raise_exception
  return environment.from_string(source)


_TEMPLATE_CLASSES: dict[str, Callable[[seqio.Vocabulary], ChatTemplate]] = {
    "mm1": Mm1Template, "gguf": GgufTemplate, "llava_v1": LlavaV1Template, "plain": PlainTemplate,
}


def default_template_name(vocabulary: seqio.Vocabulary) -> str:
  """"gguf" for a GGUF vocabulary that brings a chat template, else "mm1"."""
  from mm1_jax.data import gguf_vocabulary
  if isinstance(vocabulary, gguf_vocabulary.GgufBpeVocabulary):
    if gguf_vocabulary.chat_metadata(vocabulary.path)["chat_template"]:
      return "gguf"
  return "mm1"


def get_template(name: str, vocabulary: seqio.Vocabulary) -> ChatTemplate:
  """The template `name` (one of TEMPLATES; "" = default_template_name) for `vocabulary`."""
  name = name or default_template_name(vocabulary)
  if name not in _TEMPLATE_CLASSES:
    raise ValueError(f"data.chat_template: unknown template {name!r}; use one of {TEMPLATES} "
                     "or '' for the vocabulary's own.")
  return _TEMPLATE_CLASSES[name](vocabulary)
