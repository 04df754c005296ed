"""The multimodal feature converter: task examples -> the model's batch contract.

seqio's LMFeatureConverter drops every feature but tokens, so images need a
converter of their own. Task examples arrive with decoded images:

    tokens     int32 [n]          inputs + targets, one <image> marker per image
    loss_mask  int32 [n]          1 on targets
    images     uint8 [k, S, S, 3]

and leave as sequences of the batch contract (see mm1_jax/data/packing.py):
each marker expanded to a run of num_image_tokens placeholders (bracketed by
<image_start>/<image_end> if configured), cut to fit without splitting a run,
and packed several to a sequence. With high-resolution splitting
(data.image_split, mm1_jax/data/image_split.py) an example also carries
`image_layouts` int32 [k, 2] and its k images arrive as their sub-images:
each marker first becomes one marker per sub-image (and row ends), and an
image's sub-images are kept or cut together. It runs on the host, in numpy: packing is
plain, testable code, and its state (a partly filled sequence) is small and
saved with the data position for exact resume.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import seqio

from mm1_jax.data import config as data_config
from mm1_jax.data import packing, tokenizer
from mm1_jax.data.config import SplitScheme
from mm1_jax.data.image_split import expand_split_markers
from mm1_jax.models.config import MM1Config
from mm1_jax.typed_config import ConfigError


class MultimodalFeatureConverter:
  """Expands, fits and packs examples for an MM1Config.

  convert(example) -> finished sequences (maybe none yet); flush() -> the
  rest; get_state()/set_state() for resuming mid-sequence.
  """

  def __init__(self, model: MM1Config, vocabulary: seqio.Vocabulary, seq_len: int,
               pack: bool = True, image_start_end: bool = False,
               image_split: SplitScheme | None = None):
    special = tokenizer.special_token_ids(vocabulary)
    self.marker_id = special["<image>"]
    if self.marker_id != model.image_placeholder_id:
      raise ConfigError(
          f"model.image_placeholder_id: {model.image_placeholder_id} but the vocabulary's "
          f"'<image>' token is {self.marker_id}; set model.image_placeholder_id="
          f"{self.marker_id}.")
    if vocabulary.vocab_size > model.llm.vocab_size:
      raise ConfigError(f"llm.vocab_size: {model.llm.vocab_size} is smaller than the "
                        f"tokenizer's {vocabulary.vocab_size} ids.")
    self.model, self.seq_len, self.eos_id = model, seq_len, vocabulary.eos_id
    self.start_id = special["<image_start>"] if image_start_end else None
    self.end_id = special["<image_end>"] if image_start_end else None
    self.image_split = image_split
    # <image_row_end> and <crop r,c>: ids after the tokenizer's last, learned
    # by the LLM's embedding table like any token.
    self.row_end_id, self.crop_indicator_base = data_config.split_token_ids(
        image_split, vocabulary.vocab_size, model.llm.vocab_size)
    size = model.encoder.image_size
    self._packer = packing.Packer(
        length=seq_len, max_images=model.max_images, image_shape=(size, size, 3),
        marker_id=self.marker_id, start_id=self.start_id, end_id=self.end_id, pack=pack,
        num_image_tokens=model.num_image_tokens)

  def prepare(self, example: Mapping[str, Any]) -> dict[str, np.ndarray] | None:
    """Expanded and fitted example, or None when nothing trainable is left.

    example: tokens int [n], loss_mask [n], images [k, S, S, 3], and for a
    conversation cut_after bool [n] (its turn ends: where a too long one may
    be cut). With image splitting, image_layouts int [k', 2] ((rows, cols)
    per marker) and images [k, S, S, 3] their sub-images, k = sum of rows *
    cols + 1. The result has tokens, loss_mask, images and `truncated`
    (whether the end was cut off to fit).
    """
    tokens, loss_mask = np.asarray(example["tokens"]), np.asarray(example["loss_mask"])
    images = np.asarray(example["images"])
    if not len(images) and not np.any(tokens[loss_mask > 0] != self.eos_id):
      return None  # An empty record (at most an EOS).
    cut_after = example.get("cut_after")
    image_group = None
    if self.image_split is not None:
      if "image_layouts" not in example:
        raise ValueError("data.image_split is on but the example has no image_layouts; "
                         "decode its images with image_split.decode_and_split.")
      tokens, loss_mask, image_group, cut_after = expand_split_markers(
          tokens, loss_mask, self.marker_id, example["image_layouts"], self.image_split,
          self.row_end_id, cut_after, self.crop_indicator_base)
    run_length = self.model.num_image_tokens + (self.start_id is not None) + (
        self.end_id is not None)
    if cut_after is not None:
      cut_after = packing.expand_flags(cut_after, tokens, self.marker_id, run_length)
    if image_group is not None:
      image_group = packing.expand_per_token(image_group, tokens, self.marker_id, run_length)
    tokens, loss_mask = packing.expand_image_markers(
        tokens, loss_mask, self.marker_id, self.model.num_image_tokens, self.start_id,
        self.end_id)
    expanded_length = len(tokens)
    tokens, loss_mask, images = packing.fit_example(
        tokens, loss_mask, images, self.seq_len, self.model.max_images, self.marker_id,
        self.start_id, self.end_id, self.model.num_image_tokens, cut_after, image_group)
    if not len(tokens):
      return None
    return {"tokens": tokens, "loss_mask": loss_mask, "images": images,
            "truncated": len(tokens) < expanded_length}

  def convert(self, prepared: Mapping[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """Adds a prepared example; returns the sequences it completed."""
    return self._packer.add(prepared)

  def flush(self) -> list[dict[str, np.ndarray]]:
    return self._packer.flush()

  def empty_sequence(self) -> dict[str, np.ndarray]:
    """An all-padding sequence (fills the last batch of a finite split)."""
    return self._packer.empty_sequence()

  def get_state(self) -> dict[str, Any]:
    return self._packer.get_state()

  def set_state(self, state: Mapping[str, Any]) -> None:
    self._packer.set_state(state)
