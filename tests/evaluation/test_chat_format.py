"""The chat prompt format of the evaluator: 0-shot prompts rendered by the run's chat
template, answers cut at its stop ids, shots > 0 refused."""

import numpy as np
import pytest

from configs import tiny
from mm1_jax import config_lib, testing
from mm1_jax.data import conversations
from mm1_jax.data.conversations import USER, Turn
from mm1_jax.evaluation import decoding, evaluator, fewshot, metrics
from mm1_jax.experiment import EvalConfig, validate_eval
from mm1_jax.typed_config import ConfigError

VQA_INSTRUCTION = "Answer the question using a single word."


def dense_model():
  """The dense tiny model (quick to compile), one image slot: chat prompts are 0-shot."""
  config = tiny.get_config("dense")
  config.model.max_images = 1
  return config_lib.mm1_config(config)


def expected_tokens(template, turns, model):
  """The 0 start token, then the rendering with each marker expanded to its placeholder run."""
  ids = template.render(turns, add_generation_prompt=True).tokens
  runs = [[t] * model.num_image_tokens if t == model.image_placeholder_id else [t] for t in ids]
  return np.array([0] + [t for run in runs for t in run], np.int32)


@pytest.mark.parametrize("template_name", ["", "llava_v1"])
def test_chat_prompts_are_the_template_rendering(template_name):
  model = dense_model()
  vqa = fewshot.ChatEvaluationSet("easy_vqa_vqa", model, chat_template=template_name,
                                  max_queries=2)
  template = conversations.get_template(template_name, vqa.vocabulary)
  assert vqa.kind == metrics.VQA and template.name == (template_name or "mm1")
  for prompt, query in zip(vqa, vqa.queries):
    # The few-shot format's " <image> Question: ... Answer:", without its labels.
    few_shot_text = vqa.vocabulary.decode(query.inputs.tolist())
    question = few_shot_text.split("Question:")[1].split("Answer:")[0].strip()
    assert question.endswith("?") and fewshot.vqa_question(query, vqa.vocabulary) == question
    question = question[0].upper() + question[1:]  # Chat prompts write it as a sentence.
    turns = [Turn(USER, f"<image>\n{question}\n{VQA_INSTRUCTION}")]
    np.testing.assert_array_equal(prompt.tokens, expected_tokens(template, turns, model))
    assert prompt.text == template.decode(template.render(turns, True).tokens)
    assert prompt.image_mask.tolist() == [True] and prompt.demonstration_indices == ()
  if not template_name:
    assert prompt.text == f"<|user|><image>\n{question}\n{VQA_INSTRUCTION}<|end|><|assistant|>"
    assert vqa.stop_ids == (template.stop_ids[0], vqa.vocabulary.eos_id)
  else:
    assert prompt.text.endswith(f"USER: <image>\n{question}\n{VQA_INSTRUCTION} ASSISTANT:")
  # Answers are scored as generated (the metric normalises), without the answer prefix.
  assert vqa.answer(template.answer_prefix + "Red. ") == "Red."

  captions = fewshot.ChatEvaluationSet("easy_vqa_caption", model, chat_template=template_name,
                                       max_queries=1)
  turns = [Turn(USER, "<image>\nDescribe the image briefly.")]
  assert captions.kind == metrics.CAPTION
  np.testing.assert_array_equal(captions[0].tokens, expected_tokens(template, turns, model))


def test_chat_with_shots_or_an_unknown_format_is_refused():
  with pytest.raises(ValueError, match=r"eval.prompt_format: 'chat' prompts are 0-shot \(an "
                                       r"instruction, no demonstrations\) but the shot counts "
                                       r"are \[0, 4\]; use --shots=0"):
    evaluator.check_tasks(["easy_vqa_vqa"], [0, 4], prompt_format="chat")
  with pytest.raises(ValueError, match=r"eval.prompt_format: unknown format 'zeroshot'; use "
                                       r"one of \('fewshot', 'chat'\)"):
    evaluator.check_tasks(["easy_vqa_vqa"], [0], prompt_format="zeroshot")
  with pytest.raises(ValueError, match="'chat' prompts are 0-shot"):
    evaluator.evaluate(None, dense_model(), ["easy_vqa_caption"], shots=(1,),
                       prompt_format="chat")
  # The config: the allowed values listed; chat during training needs shots=(0,).
  with pytest.raises(ConfigError, match=r"eval.prompt_format: unknown format 'Chat'; use one "
                                        r"of \('fewshot', 'chat'\)"):
    validate_eval(EvalConfig(prompt_format="Chat"))
  with pytest.raises(ConfigError, match=r"eval.prompt_format: 'chat' prompts are 0-shot .* "
                                        r"eval.shots is \(0, 4, 8\); set eval.shots=\(0,\)"):
    validate_eval(EvalConfig(prompt_format="chat", every_steps=100))
  validate_eval(EvalConfig(prompt_format="chat", every_steps=100, shots=(0,)))


def test_chat_evaluation_equals_a_hand_run_generator():
  """Decoded until the template's end of turn, cut at its stop ids, scored as generated."""
  model = dense_model()
  params = testing.random_params(model, seed=1, stddev=0.2)
  results = evaluator.evaluate(params, model, ["easy_vqa_vqa"], shots=(0,), max_queries=2,
                               batch_size=2, max_new_tokens={"vqa": 4}, prompt_format="chat")
  assert set(results["easy_vqa_vqa"]) == {"0shot_chat"}
  result = results["easy_vqa_vqa"]["0shot_chat"]

  vqa = fewshot.ChatEvaluationSet("easy_vqa_vqa", model, max_queries=2)
  generator = decoding.Generator(model, decoding.DecodeConfig(
      max_new_tokens=4, eos_id=vqa.template.stop_ids[0]))
  batch = fewshot.stack_prompts(list(vqa), 64)  # The evaluator's bucket: compiled once.
  output = generator(params, decoding.Prompts(batch["tokens"], batch["lengths"], batch["images"],
                                              batch["image_mask"]))
  predictions = []
  for row in range(2):
    ids = output.tokens[row, :output.lengths[row]].tolist()
    stops = [i for i, t in enumerate(ids) if t in vqa.stop_ids]
    predictions.append(vqa.template.decode(ids[:stops[0]] if stops else ids).strip())
  assert [e["prediction"] for e in result["examples"]] == predictions
  assert result["examples"][0]["prompt"] == vqa[0].text
  scores = metrics.score_predictions(metrics.VQA, predictions, vqa.references)
  for name, value in scores.items():
    assert result[name] == pytest.approx(value, abs=1e-12), name
  assert evaluator.scalars(results).keys() == {"eval/easy_vqa_vqa/0shot_chat/vqa_accuracy",
                                               "eval/easy_vqa_vqa/0shot_chat/exact_match"}
