"""Held-out text perplexity: equal to the model's NLL computed by hand on the SeqIO task's
raw targets, and on a conversation task's answers rendered by the chat template; reachable
from the evaluator; bad tasks named."""

import math

import numpy as np
import pytest

from configs import tiny
from mm1_jax import config_lib, testing
import seqio
import tensorflow as tf

from mm1_jax.data import conversations, tasks
from mm1_jax.evaluation import evaluator, perplexity
from mm1_jax.models.multimodal import MM1Model

SEQ_LEN = 128


@pytest.fixture(scope="module")
def model_and_params():
  model = config_lib.mm1_config(tiny.get_config("dense"))
  return model, testing.random_params(model, seed=2, stddev=0.2)


def model_nll(model, params, targets, weights):
  """(sum of -log p(target) over the weighted targets, their count): inputs = 0
  then the targets shifted right, no images; float64."""
  network = MM1Model(model)
  size = model.encoder.image_size
  inputs = np.concatenate([[0], targets[:-1]]).astype(np.int32)
  logits, _ = network.apply(
      {"params": params}, inputs[None], np.zeros((1, model.max_images, size, size, 3), np.uint8),
      np.zeros((1, model.max_images), bool))
  logits = np.asarray(logits[0], np.float64)
  log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  token_nll = log_z - logits[np.arange(len(targets)), targets]
  return float(np.sum(token_nll * weights)), int(np.sum(weights))


def hand_perplexity(model, params, num_sequences):
  """Each validation passage alone: its SeqIO targets (text + EOS) cut to
  SEQ_LEN, inputs = 0 then the targets shifted right; NLL in float64."""
  task = tasks.get_task_or_mixture("shakespeare_text")
  dataset = task.get_dataset(sequence_length=None, split="validation", shuffle=False,
                             num_epochs=1, use_cached=False)
  total_nll, total_tokens = 0.0, 0
  for example in dataset.take(num_sequences).as_numpy_iterator():
    targets = example["targets"][:SEQ_LEN].astype(np.int32)
    nll, count = model_nll(model, params, targets, np.ones(len(targets)))
    total_nll, total_tokens = total_nll + nll, total_tokens + count
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


def test_a_conversation_tasks_perplexity_scores_its_held_out_answers(model_and_params):
  """chatterbot_chat has no validation split: its test dialogues, rendered with the mm1
  template by conversations.py directly, scored on the assistant turns only."""
  model, params = model_and_params
  result = perplexity.text_perplexity(params, model, "chatterbot_chat", seq_len=SEQ_LEN,
                                      batch_size=2, max_sequences=3, chat_template="mm1")
  task = tasks.get_task_or_mixture("chatterbot_chat")
  template = conversations.get_template("mm1", task.output_features["targets"].vocabulary)
  dataset = task.get_dataset(sequence_length=None, split="test", shuffle=False, num_epochs=1,
                             use_cached=False)
  total_nll, total_tokens = 0.0, 0
  for example in dataset.take(3).as_numpy_iterator():
    rendered = template.render(conversations.turns_from_features(example["roles"],
                                                                 example["texts"]))
    assert len(rendered.tokens) <= SEQ_LEN  # Short dialogues: nothing cut.
    nll, count = model_nll(model, params, rendered.tokens, rendered.loss_mask)
    total_nll, total_tokens = total_nll + nll, total_tokens + count
  assert perplexity.held_out_split("chatterbot_chat") == "test"
  assert result["num_sequences"] == 3
  assert result["num_tokens"] == total_tokens < 3 * SEQ_LEN
  assert result["perplexity"] == pytest.approx(math.exp(total_nll / total_tokens), rel=1e-4)


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


@pytest.fixture
def train_only_task():
  """A text task with a train split only, registered for the test."""
  name = "perplexity_test_train_only"
  seqio.TaskRegistry.add(
      name, source=seqio.FunctionDataSource(
          lambda split, shuffle_files: tf.data.Dataset.from_tensors({"targets": "text"}),
          splits=["train"]),
      preprocessors=[seqio.preprocessors.tokenize],
      output_features=tasks.get_task_or_mixture("shakespeare_text").output_features)
  yield name
  seqio.TaskRegistry.remove(name)


def test_bad_perplexity_tasks_are_named(train_only_task):
  with pytest.raises(ValueError, match="no_such_task"):
    evaluator.check_perplexity_tasks(["no_such_task"])
  with pytest.raises(ValueError, match=rf"perplexity task '{train_only_task}' has no held-out "
                     r"split \(it has \['train'\], none of \['validation', 'test'\]\)"):
    evaluator.check_perplexity_tasks([train_only_task])
