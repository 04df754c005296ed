"""What the input pipeline reads and how it lays batches out (no TensorFlow here,
so configs and tools can import it cheaply)."""

from __future__ import annotations

import dataclasses

from mm1_jax.typed_config import ConfigError, dataclass_from_dict, require_at_least, to_plain_dict

# data.chat_template values (mm1_jax/data/conversations.py); "" = the vocabulary's own.
CHAT_TEMPLATES = ("mm1", "gguf", "llava_v1", "plain")

# How an image of another aspect ratio is fitted to the encoder's square
# (mm1_jax/data/images.py).
IMAGE_POLICIES = ("stretch", "pad", "crop")


@dataclasses.dataclass(frozen=True)
class InputConfig:
  """What to read and how to lay it out. Model-dependent sizes come from MM1Config.

  The bundled sources are prepared under $MM1_DATA_DIR (default
  ~/.cache/mm1_jax/tfds), read when mm1_jax.data.tasks registers them.
  """
  mixture: str = "mm1_pretrain"
  split: str = "train"
  batch_size: int = 8  # Global, over all hosts.
  seq_len: int = 256
  pack: bool = True
  image_policy: str = "stretch"  # stretch | pad | crop (aspect-ratio handling).
  # RGB (0..255) behind the transparent pixels of RGBA / LA / palette images:
  # white, what viewers show (line art drawn only in alpha stays visible).
  image_background: tuple[int, int, int] = (255, 255, 255)
  image_start_end: bool = False  # Bracket each placeholder run with <image_start>/<image_end>.
  shuffle: bool = True
  seed: int = 0
  num_epochs: int | None = None  # None: repeat forever (training).
  # "" = the bundled mm1_sp4k tokenizer; a SentencePiece .model file; a .gguf
  # file (its byte-level BPE tokenizer, SPECIAL_TOKENS appended); or "smollm2"
  # = SmolLM2-135M-Instruct's GGUF (49,159 ids: set llm.vocab_size >= that,
  # e.g. 49216, and image_placeholder_id=49152).
  vocabulary: str = ""
  # How conversation tasks are rendered to tokens (mm1_jax/data/conversations.py):
  # "mm1" (the <|user|> ... <|end|> role tokens), "gguf" (the GGUF's own
  # tokenizer.chat_template: ChatML for SmolLM2), "llava_v1" or "plain"
  # (LLaVA's stage-1 captions); "" = "gguf" for a GGUF vocabulary with a
  # template, else "mm1". Text tasks are not affected.
  chat_template: str = ""
  # Per task, the largest fraction of its last 1000 records that may be
  # skipped as bad (undecodable image, missing feature, ...) before the run
  # stops with a DataHealthError naming the task and a bad record; 1 = no
  # limit. A task with no usable example in its first 100 records always stops.
  max_skip_fraction: float = 0.05

  @classmethod
  def from_dict(cls, values) -> "InputConfig":
    config = dataclass_from_dict(cls, to_plain_dict(values), "data")
    validate(config)
    return config


def validate(config: InputConfig) -> None:
  """Raises ConfigError naming the first data field that cannot work."""
  c = config
  # Two tokens: one input and one target at least.
  require_at_least(c, "data", batch_size=1, seq_len=2, seed=0, num_epochs=1)
  if not 0.0 <= c.max_skip_fraction <= 1.0:
    raise ConfigError(f"data.max_skip_fraction: {c.max_skip_fraction} is not a fraction; use "
                      "a value in [0, 1] (0.05: stop when over 5% of a task's records are bad).")
  if c.chat_template and c.chat_template not in CHAT_TEMPLATES:
    raise ConfigError(f"data.chat_template: unknown template {c.chat_template!r}; use one of "
                      f"{CHAT_TEMPLATES}, or '' for the vocabulary's own.")
  if c.chat_template == "gguf" and not c.vocabulary.lower().endswith((".gguf", "smollm2")):
    raise ConfigError(f"data.chat_template: 'gguf' reads the template of a GGUF vocabulary, "
                      f"but data.vocabulary is {c.vocabulary!r}; set data.vocabulary to a .gguf "
                      "file (or 'smollm2'), or use 'mm1' / 'llava_v1'.")
  if c.image_policy not in IMAGE_POLICIES:
    raise ConfigError(f"data.image_policy: unknown policy {c.image_policy!r}; use one of "
                      f"{IMAGE_POLICIES}.")
  background = c.image_background
  if (not isinstance(background, (tuple, list)) or len(background) != 3
      or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255
                 for v in background)):
    raise ConfigError(f"data.image_background: expected three RGB ints in 0..255, got "
                      f"{background!r}; e.g. (255, 255, 255) for white.")
  for field in ("mixture", "split"):
    if not getattr(c, field).strip():
      raise ConfigError(f"data.{field}: empty; name a registered SeqIO "
                        f"{'task or mixture' if field == 'mixture' else 'split'}.")
