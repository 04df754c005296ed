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

# How an image is split into encoder-size sub-images for high resolution
# (mm1_jax/data/image_split.py).
IMAGE_SPLITS = ("none", "mm1", "anyres")


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
  # High resolution (mm1_jax/data/image_split.py): "none" (one S x S slot per
  # image), "mm1" (a fixed grid of S x S crops + an overview) or "anyres"
  # (LLaVA-NeXT: the grid of image_grids that fits the image best + an
  # overview). Every crop and the overview take an image slot (model.max_images).
  image_split: str = "none"
  # (rows, cols) grids of S x S crops: "mm1" takes exactly one (MM1: (2, 2));
  # "anyres" chooses among them (LLaVA-NeXT's 336 px pinpoints are (1, 2),
  # (2, 1), (2, 2), (1, 3), (3, 1)).
  image_grids: tuple[tuple[int, int], ...] = ((2, 2),)
  # The overview's place among an image's slots: "first" | "last"; "" = the
  # scheme's own (mm1: last, as MM1.5; anyres: first, as LLaVA-NeXT).
  image_overview: str = ""
  # An <image_row_end> token after each row of crops (LLaVA-NeXT's
  # image_newline); its id is the one after the tokenizer's last.
  image_row_end: bool = False
  # A learned <crop row,col> token before each crop (MM1.5's sub-image
  # position indicator, without its image index): ids after <image_row_end>'s,
  # one per cell of the largest grid side squared.
  image_crop_indicators: bool = False
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
  _validate_image_split(c)
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


def _validate_image_split(c: InputConfig) -> None:
  if c.image_split not in IMAGE_SPLITS:
    raise ConfigError(f"data.image_split: unknown scheme {c.image_split!r}; use one of "
                      f"{IMAGE_SPLITS}.")
  grids = c.image_grids
  if (not isinstance(grids, (tuple, list)) or not grids or not all(
      isinstance(g, (tuple, list)) and len(g) == 2 and all(
          isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in g)
      for g in grids)):
    raise ConfigError(f"data.image_grids: expected one or more (rows, cols) pairs of ints >= "
                      f"1, got {grids!r}; e.g. ((2, 2),) for MM1's 2 x 2 grid.")
  if c.image_split == "mm1" and len(grids) != 1:
    raise ConfigError(f"data.image_grids: image_split='mm1' cuts every image into one fixed "
                      f"grid but {len(grids)} are given ({grids!r}); give one, e.g. ((2, 2),), "
                      "or use image_split='anyres' to choose among them.")
  if len(set(tuple(g) for g in grids)) != len(grids):
    raise ConfigError(f"data.image_grids: {grids!r} lists a grid twice; list each once.")
  if c.image_overview not in ("", "first", "last"):
    raise ConfigError(f"data.image_overview: {c.image_overview!r} is not 'first', 'last' or "
                      "'' (the scheme's own place).")
  if c.image_split == "none":
    for field in ("image_overview", "image_row_end", "image_crop_indicators"):
      if getattr(c, field):
        raise ConfigError(f"data.{field}: set, but data.image_split='none' does not split "
                          "images; set image_split='mm1' or 'anyres', or unset it.")


def split_token_ids(scheme: "SplitScheme | None", tokenizer_size: int,
                    llm_vocab_size: int) -> tuple[int | None, int | None]:
  """(<image_row_end> id, <crop 0,0> id), each None when the scheme has none.

  Learned tokens after the tokenizer's last id, at fixed places whichever are
  used (so one checkpoint's rows mean the same in every variant):
  <image_row_end> = tokenizer_size; <crop r,c> = tokenizer_size + 1 + r * G +
  c, G = scheme.max_grid_side. Raises ConfigError when the LLM's embedding
  table has no row for one of them.
  """
  if scheme is None:
    return None, None
  row_end_id = tokenizer_size if scheme.row_end else None
  crop_base = tokenizer_size + 1 if scheme.crop_indicators else None
  if row_end_id is not None and row_end_id >= llm_vocab_size:
    raise ConfigError(
        f"data.image_row_end: the <image_row_end> token takes id {tokenizer_size} (after the "
        f"tokenizer's {tokenizer_size} ids) but llm.vocab_size is {llm_vocab_size}; set "
        f"llm.vocab_size >= {tokenizer_size + 1} or image_row_end=False.")
  if crop_base is not None:
    last = crop_base + scheme.max_grid_side ** 2 - 1
    if last >= llm_vocab_size:
      raise ConfigError(
          f"data.image_crop_indicators: the <crop row,col> tokens of a grid side of "
          f"{scheme.max_grid_side} take ids {crop_base}..{last} (after the tokenizer's "
          f"{tokenizer_size} ids and <image_row_end>) but llm.vocab_size is {llm_vocab_size}; "
          f"set llm.vocab_size >= {last + 1} or image_crop_indicators=False.")
  return row_end_id, crop_base


@dataclasses.dataclass(frozen=True)
class SplitScheme:
  """How images are split: data.image_split and its options, resolved.

  grids: (rows, cols) per candidate; overview_first: the overview's place
  among an image's slots; row_end: an <image_row_end> token after each row;
  crop_indicators: a <crop row,col> token before each crop.
  """
  kind: str
  grids: tuple[tuple[int, int], ...]
  overview_first: bool
  row_end: bool
  crop_indicators: bool = False

  @classmethod
  def from_config(cls, config: InputConfig) -> "SplitScheme | None":
    """The scheme of a validated InputConfig; None for image_split='none'."""
    if config.image_split == "none":
      return None
    overview = config.image_overview or ("last" if config.image_split == "mm1" else "first")
    return cls(kind=config.image_split,
               grids=tuple((int(r), int(c)) for r, c in config.image_grids),
               overview_first=overview == "first", row_end=config.image_row_end,
               crop_indicators=config.image_crop_indicators)

  @property
  def max_slots(self) -> int:
    """The most image slots one image can take: largest grid + the overview."""
    return max(rows * cols for rows, cols in self.grids) + 1

  @property
  def max_grid_side(self) -> int:
    return max(max(grid) for grid in self.grids)


def scheme_slots(scheme: SplitScheme | None) -> int:
  """Image slots (sub-images) one image takes at most; None: not split."""
  return 1 if scheme is None else scheme.max_slots


def slots_per_image(config: InputConfig) -> int:
  """Image slots (sub-images) one image takes at most under `config`."""
  return scheme_slots(SplitScheme.from_config(config))


def tokens_per_image(config: InputConfig, num_image_tokens: int) -> int:
  """Sequence tokens one image takes at most: each slot's run (placeholders,
  start/end), the row-end and the crop-indicator tokens."""
  run = num_image_tokens + 2 * int(config.image_start_end)
  scheme = SplitScheme.from_config(config)
  if scheme is None:
    return run
  return max((rows * cols + 1) * run + (rows if scheme.row_end else 0)
             + (rows * cols if scheme.crop_indicators else 0) for rows, cols in scheme.grids)
