"""Held-out text perplexity: equal to the model's NLL computed by hand on the SeqIO task's
raw targets; reachable from the evaluator; bad tasks named."""

import math

import numpy as np
import pytest

from configs import tiny
from mm1_jax import config_lib, testing
from mm1_jax.data import tasks
from mm1_jax.evaluation import evaluator, perplexity
from mm1_jax.models.multimodal import MM1Model

SEQ_LEN = 128


@pytest.fixture(scope="module")
def model_and_params():
  model = config_lib.mm1_config(tiny.get_config("dense"))
  return model, testing.random_params(model, seed=2, stddev=0.2)


def hand_perplexity(model, params, num_sequences):
  """Each validation passage alone: its SeqIO targets (text + EOS) cut to
  SEQ_LEN, inputs = 0 then the targets shifted right; NLL in float64."""
  task = tasks.get_task_or_mixture("shakespeare_text")
  dataset = task.get_dataset(sequence_length=None, split="validation", shuffle=False,
                             num_epochs=1, use_cached=False)
  total_nll, total_tokens = 0.0, 0
  network = MM1Model(model)
  size = model.encoder.image_size
  for example in dataset.take(num_sequences).as_numpy_iterator():
    targets = example["targets"][:SEQ_LEN].astype(np.int32)
    inputs = np.concatenate([[0], targets[:-1]]).astype(np.int32)
    logits, _ = network.apply(
        {"params": params}, inputs[None], np.zeros((1, model.max_images, size, size, 3), np.uint8),
        np.zeros((1, model.max_images), bool))
    logits = np.asarray(logits[0], np.float64)
    log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    total_nll += float(np.sum(log_z - logits[np.arange(len(targets)), targets]))
    total_tokens += len(targets)
  return math.exp(total_nll / total_tokens), total_tokens


def test_perplexity_is_the_models_nll_on_the_held_out_text(model_and_params):
  model, params = model_and_params
  # 5 passages in batches of 2: the last batch holds one passage.
  result = perplexity.text_perplexity(params, model, "shakespeare_text", seq_len=SEQ_LEN,
                                      batch_size=2, max_sequences=5)
  expected, num_tokens = hand_perplexity(model, params, 5)
  assert result["num_sequences"] == 5 and result["num_tokens"] == num_tokens
  assert result["perplexity"] == pytest.approx(expected, rel=1e-4)
  assert result["num_truncated"] > 0  # Passages of 60-200 words exceed 128 tokens.
  assert result["cross_entropy"] == pytest.approx(math.log(result["perplexity"]))


def test_the_evaluator_reports_perplexity_tasks(model_and_params):
  model, params = model_and_params
  results = evaluator.evaluate(params, model, [], perplexity_tasks=["shakespeare_text"],
                               max_queries=3, batch_size=3, seq_len=SEQ_LEN)
  result = results["shakespeare_text"]["perplexity"]
  assert result["num_queries"] == 3 and result["num_tokens"] > 100
  assert evaluator.scalars(results)["eval/shakespeare_text/perplexity/perplexity"] == (
      pytest.approx(result["perplexity"]))
  table = evaluator.format_table(results)
  assert f"{result['perplexity']:12.2f}" in table  # As is, not x 100.


@pytest.mark.parametrize("task,message", [
    ("no_such_task", "no_such_task"),
    ("easy_vqa_caption", "perplexity task 'easy_vqa_caption' has no 'validation' split"),
])
def test_bad_perplexity_tasks_are_named(task, message):
  with pytest.raises(ValueError, match=message):
    evaluator.check_perplexity_tasks([task])
