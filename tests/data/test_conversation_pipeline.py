"""Conversation tasks through the input pipeline: rendering, packing, truncation, rates."""

import collections

import numpy as np
import pytest
import seqio

from configs import tiny
from mm1_jax import config_lib
from mm1_jax.data import conversations, health, packing, pipeline, tasks
from mm1_jax.data.config import InputConfig

MODEL = config_lib.mm1_config(tiny.get_config())
MIXED = "test_chat_and_captions"


@pytest.fixture(scope="module", autouse=True)
def mixed_mixture():
  # Conversations and a text task (inputs/targets) in one mixture.
  seqio.MixtureRegistry.add(MIXED, [("easy_vqa_chat", 1), ("easy_vqa_caption", 1)])
  yield
  seqio.MixtureRegistry.remove(MIXED)


def make_input(**overrides):
  values = dict(mixture=MIXED, batch_size=4, seq_len=256, shuffle=False, num_epochs=1, seed=3)
  values.update(overrides)
  return pipeline.MultimodalInput(InputConfig(**values), MODEL, process_index=0,
                                  process_count=1)


def segments(batches):
  """Every packed example of the batches: (target tokens, loss weights, image count)."""
  out = []
  for batch in batches:
    for row in range(len(batch["decoder_segment_ids"])):
      ids = batch["decoder_segment_ids"][row]
      for segment in range(1, ids.max() + 1):
        where = ids == segment
        out.append((batch["decoder_target_tokens"][row][where],
                    batch["decoder_loss_weights"][row][where]))
  return out


def test_packed_conversations_keep_every_token_and_image():
  packed, unpacked = make_input(), make_input(pack=False)
  packed_batches = [next(packed) for _ in range(6)]
  unpacked_batches = [next(unpacked) for _ in range(24)]
  a, b = segments(packed_batches), segments(unpacked_batches)
  assert len(a) > 12
  for (tokens, weights), (tokens_1, weights_1) in zip(a, b):
    np.testing.assert_array_equal(tokens, tokens_1)
    np.testing.assert_array_equal(weights, weights_1)
  images = np.concatenate([x["images"][x["image_mask"]] for x in packed_batches])
  images_1 = np.concatenate([x["images"][x["image_mask"]] for x in unpacked_batches])
  np.testing.assert_array_equal(images, images_1[:len(images)])
  assert packed.health.counts()["easy_vqa_chat"]["used"] > 0
  assert packed.health.counts()["easy_vqa_caption"]["used"] > 0


def test_conversation_segments_are_the_template_rendering():
  """A second computation: the raw task example rendered by the template, its
  markers expanded as packing does, equals the segment the pipeline built."""
  source = make_input(mixture="easy_vqa_chat", pack=False)
  template = conversations.get_template("", tasks.VOCABULARY)
  raw = seqio.get_mixture_or_task("easy_vqa_chat").get_dataset(
      sequence_length=None, split="train", shuffle=False, num_epochs=1)
  found = segments([next(source) for _ in range(2)])
  for (tokens, weights), example in zip(found, raw.as_numpy_iterator()):
    rendered = template.render(conversations.turns_from_features(example["roles"],
                                                                 example["texts"]))
    expected, mask = packing.expand_image_markers(
        rendered.tokens, rendered.loss_mask, MODEL.image_placeholder_id, MODEL.num_image_tokens)
    np.testing.assert_array_equal(tokens, expected)
    np.testing.assert_array_equal(weights, mask)
    # Trained: the assistant answers and their <|end|>, nothing else.
    answers = [t.decode() for r, t in zip(example["roles"], example["texts"])
               if r == b"assistant"]
    assert template.decode(tokens[weights > 0]) == "".join(a + "<|end|>" for a in answers)


def test_long_conversations_are_cut_after_an_answer_and_counted():
  # 128 tokens hold the image run (MODEL.num_image_tokens) and a turn or two.
  source = make_input(mixture="easy_vqa_chat", seq_len=MODEL.num_image_tokens + 24, pack=False)
  end_id = conversations.get_template("mm1", tasks.VOCABULARY).stop_ids[0]
  found = segments([next(source) for _ in range(6)])
  for tokens, weights in found:
    assert tokens[-1] == end_id and weights[-1] == 1, "cut right after an answer's <|end|>"
  counts = source.health.counts()["easy_vqa_chat"]
  assert counts["truncated"] > 0
  assert source.health.scalars()["data/easy_vqa_chat/truncated"] == counts["truncated"]
  assert f"({counts['truncated']} cut)" in source.health.end_of_run_report()


def test_a_first_answer_that_does_not_fit_is_skipped_and_counted():
  source = make_input(mixture="easy_vqa_chat", seq_len=MODEL.num_image_tokens + 4,
                      max_skip_fraction=1.0)
  with pytest.raises(health.DataHealthError, match="first answer does not fit"):
    next(source)  # No conversation of the task fits: stops, naming the reason.


def test_mixture_rates_hold_for_conversations_and_text_dialogues():
  source = make_input(mixture="visual_sft_text", shuffle=True, num_epochs=None, seq_len=512)
  for _ in range(40):
    next(source)
  read = collections.Counter({t: c["read"] for t, c in source.health.counts().items()})
  rates = tasks.MIXTURES["visual_sft_text"]
  total = sum(read.values())
  for task, rate in rates.items():
    expected = rate / sum(rates.values())
    assert abs(read[task] / total - expected) < 0.08, (task, read, total)
  assert source.num_skipped == 0


def test_unknown_chat_template_is_a_config_error():
  from mm1_jax.typed_config import ConfigError
  with pytest.raises(ConfigError, match="data.chat_template: unknown template 'chatgpt'"):
    InputConfig.from_dict({"chat_template": "chatgpt"})
  with pytest.raises(ConfigError, match="'gguf' reads the template of a GGUF vocabulary"):
    InputConfig.from_dict({"chat_template": "gguf"})
