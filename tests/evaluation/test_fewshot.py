"""Few-shot prompts over the bundled easy-vqa tasks, and the question-only baseline."""

import dataclasses
import re

import numpy as np
import pytest

from configs import tiny
from mm1_jax import config_lib
from mm1_jax.data import tasks, tokenizer
from mm1_jax.data.batch import check_image_placeholders
from mm1_jax.data.converter import MultimodalFeatureConverter
from mm1_jax.data.sources import easy_vqa
from mm1_jax.evaluation import fewshot, metrics
from mm1_jax.evaluation.fewshot import FewShotEvaluationSet, TaskExample

# The tiny model with room for 8 demonstrations + the query.
MODEL = dataclasses.replace(config_lib.mm1_config(tiny.get_config()), max_images=9)
M = MODEL.num_image_tokens
PLACEHOLDER = MODEL.image_placeholder_id
VOCABULARY = tasks.VOCABULARY


@pytest.fixture(scope="module")
def captions_4shot():
  return FewShotEvaluationSet("easy_vqa_caption", MODEL, num_shots=4, seed=0, max_queries=12)


@pytest.fixture(scope="module")
def vqa_8shot():
  return FewShotEvaluationSet("easy_vqa_vqa", MODEL, num_shots=8, seed=0, max_queries=12)


def _placeholder_images(prompt) -> int:
  return int(np.count_nonzero(prompt.tokens == PLACEHOLDER)) // M


def test_caption_prompt_is_demonstrations_then_the_query_image(captions_4shot):
  assert captions_4shot.kind == metrics.CAPTION and captions_4shot.eval_split == "test"
  assert len(captions_4shot) == 12
  prompt = captions_4shot[0]
  # " <image> a red circle. <image> a blue triangle. ... <image>"
  assert re.fullmatch(r"(\s*<image> a \w+ \w+\.){4} <image>", prompt.text), prompt.text
  for shown, index in zip(re.findall(r"<image> (a \w+ \w+\.)", prompt.text),
                          prompt.demonstration_indices):
    assert shown == captions_4shot.train[index].references[0]
  assert prompt.references == captions_4shot.queries[0].references
  assert re.fullmatch(r"a \w+ \w+\.", prompt.references[0])
  # Model inputs: BOS 0, one run of M placeholders per real image.
  assert prompt.tokens.dtype == np.int32 and prompt.tokens[0] == 0
  assert prompt.tokens[-M:].tolist() == [PLACEHOLDER] * M
  assert _placeholder_images(prompt) == 5
  check_image_placeholders(prompt.tokens[None], prompt.image_mask[None], M, PLACEHOLDER)
  assert prompt.images.shape == (9, 64, 64, 3) and prompt.images.dtype == np.uint8
  assert prompt.image_mask.tolist() == [True] * 5 + [False] * 4
  assert not prompt.images[5:].any()


def test_images_are_the_demonstrations_then_the_query(captions_4shot):
  prompt = captions_4shot[1]
  sources = [captions_4shot.train[i] for i in prompt.demonstration_indices]
  sources.append(captions_4shot.queries[1])
  for slot, example in enumerate(sources):
    # 64x64 PNGs at the tiny model's 64px: the stretch resize keeps every pixel.
    np.testing.assert_array_equal(prompt.images[slot], easy_vqa.decode_png(example.images[0]))


def test_zero_shot_tokens_are_the_training_layout_of_the_prompt():
  evaluation_set = FewShotEvaluationSet("easy_vqa_caption", MODEL, num_shots=0, max_queries=3)
  query = evaluation_set.queries[2]
  prompt = evaluation_set[2]
  # What the training converter makes of the whole example (prompt + caption).
  converter = MultimodalFeatureConverter(MODEL, VOCABULARY, seq_len=256, pack=False)
  trained = converter.prepare({
      "tokens": np.concatenate([query.inputs, query.targets, [VOCABULARY.eos_id]]),
      "loss_mask": np.concatenate([np.zeros_like(query.inputs),
                                   np.ones(len(query.targets) + 1, np.int32)]),
      "images": np.zeros((1, 64, 64, 3), np.uint8)})["tokens"]
  n = len(prompt.tokens) - 1
  np.testing.assert_array_equal(prompt.tokens[1:], trained[:n])
  np.testing.assert_array_equal(trained[n:-1], query.targets)
  assert prompt.demonstration_indices == () and prompt.image_mask.sum() == 1


def test_image_start_end_brackets_every_run():
  evaluation_set = FewShotEvaluationSet("easy_vqa_caption", MODEL, num_shots=2, max_queries=1,
                                        image_start_end=True)
  tokens = evaluation_set[0].tokens.tolist()
  start, end = (tokenizer.special_token_ids(VOCABULARY)[t]
                for t in ("<image_start>", "<image_end>"))
  assert tokens.count(start) == tokens.count(end) == 3
  assert tokens[-M - 2:] == [start] + [PLACEHOLDER] * M + [end]


def test_demonstrations_are_seeded_distinct_and_per_query(captions_4shot):
  again = FewShotEvaluationSet("easy_vqa_caption", MODEL, num_shots=4, seed=0, max_queries=5)
  other_seed = FewShotEvaluationSet("easy_vqa_caption", MODEL, num_shots=4, seed=1,
                                    max_queries=5)
  chosen = [captions_4shot[i].demonstration_indices for i in range(5)]
  # Independent of how many queries are evaluated.
  assert [again[i].demonstration_indices for i in range(5)] == chosen
  assert [other_seed[i].demonstration_indices for i in range(5)] != chosen
  assert len(set(chosen)) == 5  # Each query draws its own.
  for indices in chosen:
    assert len(set(indices)) == 4 and all(0 <= i < 4000 for i in indices)
  np.testing.assert_array_equal(again[3].tokens, captions_4shot[3].tokens)


def test_vqa_prompt_asks_the_query_question_without_its_answer(vqa_8shot):
  assert vqa_8shot.kind == metrics.VQA
  assert len(vqa_8shot.train) == 38575  # Demonstrations come from the whole train split.
  prompt = vqa_8shot[5]
  demonstration = r"\s*<image> Question: [^?]+\? Answer: +\w+"
  assert re.fullmatch(rf"({demonstration}){{8}} <image> Question: [^?]+\? Answer:",
                      prompt.text), prompt.text
  assert prompt.references == (vqa_8shot.queries[5].references[0],)
  assert prompt.references[0] in {"yes", "no", *easy_vqa.SHAPES, *easy_vqa.COLORS}
  assert _placeholder_images(prompt) == 9 and prompt.image_mask.all()
  check_image_placeholders(prompt.tokens[None], prompt.image_mask[None], M, PLACEHOLDER)


def test_too_many_shots_for_max_images_names_both():
  model = dataclasses.replace(MODEL, max_images=4)
  with pytest.raises(ValueError, match=r"4-shot prompts hold 5 images .* model\.max_images is 4"):
    FewShotEvaluationSet("easy_vqa_caption", model, num_shots=4, max_queries=1)


def test_tasks_without_an_image_prompt_or_mixtures_are_refused():
  with pytest.raises(ValueError, match="interleaved-document and text-only"):
    FewShotEvaluationSet("easy_vqa_interleaved", MODEL, num_shots=0, max_queries=1)
  with pytest.raises(ValueError, match="is a mixture"):
    FewShotEvaluationSet("mm1_pretrain", MODEL, num_shots=0, max_queries=1)
  with pytest.raises(ValueError, match="unknown SeqIO task"):
    FewShotEvaluationSet("coco_captions", MODEL, num_shots=0, max_queries=1)


def test_stack_prompts_pads_right_or_left(captions_4shot):
  prompts = [captions_4shot[0], fewshot.FewShotEvaluationSet(
      "easy_vqa_caption", MODEL, num_shots=1, max_queries=1)[0]]
  lengths = [len(p.tokens) for p in prompts]
  right = fewshot.stack_prompts(prompts)
  assert right["tokens"].shape == (2, max(lengths)) and right["lengths"].tolist() == lengths
  assert right["images"].shape == (2, 9, 64, 64, 3) and right["image_mask"].shape == (2, 9)
  np.testing.assert_array_equal(right["tokens"][1, :lengths[1]], prompts[1].tokens)
  assert not right["tokens"][1, lengths[1]:].any()
  assert right["positions"][1, :lengths[1]].tolist() == list(range(lengths[1]))
  assert right["segment_ids"][1].tolist() == [1] * lengths[1] + [0] * (max(lengths) - lengths[1])
  left = fewshot.stack_prompts(prompts, length=200, pad_side="left")
  np.testing.assert_array_equal(left["tokens"][1, 200 - lengths[1]:], prompts[1].tokens)
  assert left["positions"][1, -1] == lengths[1] - 1 and left["segment_ids"][1, 0] == 0
  check_image_placeholders(left["tokens"], left["image_mask"], M, PLACEHOLDER)


@pytest.mark.parametrize("kind, generated, answer", [
    (metrics.VQA, " red <image> Question: what", "red"),
    (metrics.VQA, " Yes.\nQuestion:", "Yes"),
    (metrics.CAPTION, " a red circle. <image> a blue", "a red circle."),
    (metrics.CAPTION, " a red circle. Here is a blue one.", "a red circle."),
    (metrics.CAPTION, " a red circle", "a red circle"),
])
def test_truncate_generation_keeps_the_answer(kind, generated, answer):
  assert fewshot.truncate_generation(generated, kind) == answer


def test_stop_token_ids_are_eos_and_image_starts():
  assert fewshot.stop_token_ids() == (1, PLACEHOLDER, 4)


def _example(question, answer):
  inputs = VOCABULARY.encode(f"<image> Question: {question} Answer:")
  return TaskExample(inputs=np.asarray(inputs, np.int32),
                     targets=np.asarray(VOCABULARY.encode(" " + answer), np.int32),
                     images=(b"png",), references=(answer,))


def test_question_prior_is_the_most_frequent_answer_per_question():
  train = [_example("what color is the shape?", a) for a in ("red", "blue", "blue", "red")]
  train += [_example("is there a circle?", a) for a in ("no", "no", "no", "yes")]
  train += [_example("what shape is it?", "circle")]
  prior = fewshot.fit_question_prior(train, VOCABULARY)
  key = fewshot.question_text(_example("is there a circle?", "?"), VOCABULARY)
  assert key == "Question: is there a circle? Answer:"
  assert prior.predict(key) == "no"
  # Ties go to the alphabetically first answer; unseen questions to the overall favourite.
  assert prior.predict("Question: what color is the shape? Answer:") == "blue"
  assert prior.predict("Question: is it big? Answer:") == "no"


def test_question_prior_baseline_on_easy_vqa(vqa_8shot):
  scores = fewshot.question_prior_baseline("easy_vqa_vqa", max_queries=1000)
  assert set(scores) == {"vqa_accuracy", "exact_match"}
  # One reference per question: both metrics agree. Blind guessing beats
  # chance on yes/no but not on colours and shapes.
  assert scores["vqa_accuracy"] == scores["exact_match"]
  assert 0.2 < scores["vqa_accuracy"] < 0.8
