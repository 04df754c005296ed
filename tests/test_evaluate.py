"""The evaluate command: checkpoint restore, JSON report, TensorBoard, bad input."""

import glob
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
import seqio
import tensorflow as tf

from configs import tiny
from mm1_jax import evaluate, testing
from mm1_jax.evaluation import evaluator
from mm1_jax.experiment import Experiment
from mm1_jax.training import checkpoint as checkpoint_lib
from mm1_jax.training import trainer
from process_env import one_device_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**llm):
  """The dense tiny model (the quickest to compile; evaluation is the same code)."""
  config = tiny.get_config("dense")
  config.data.seq_len = 64
  config.model.llm.update(llm)
  return Experiment.from_config(config)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A workdir holding a step-7 checkpoint of tiny_config(): random params,
  a zero optimizer state (built on the host: compiling the init is slow)."""
  workdir = str(tmp_path_factory.mktemp("run"))
  testing.write_random_checkpoint(tiny_config(), workdir, step=7)
  return workdir


def tensorboard_tags(workdir):
  """{(tag, step)} of every event file in workdir."""
  found = set()
  for path in glob.glob(os.path.join(workdir, "events.out.tfevents.*")):
    for event in tf.compat.v1.train.summary_iterator(path):
      found |= {(value.tag, event.step) for value in event.summary.value}
  return found


def test_cli_writes_the_report_tensorboard_scalars_and_a_table(workdir):
  result = subprocess.run(
      [sys.executable, "-m", "mm1_jax.evaluate", "--config=configs/tiny.py:dense",
       "--config.data.seq_len=64", f"--workdir={workdir}", "--shots=0",
       "--tasks=easy_vqa_vqa,easy_vqa_caption", "--max_queries=2", "--batch_size=2",
       "--num_examples=1"],
      cwd=REPO, env=one_device_env(), capture_output=True, text=True,
      timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  with open(os.path.join(workdir, "eval", "step_7.json")) as f:
    report = json.load(f)
  assert report["step"] == 7 and not report["untrained"]
  assert report["settings"] == {"tasks": ["easy_vqa_vqa", "easy_vqa_caption"], "shots": [0],
                                "max_queries": 2, "batch_size": 2, "seed": 0,
                                "num_examples": 1, "split": None,  # Each task's default:
                                "eval_splits": {"easy_vqa_vqa": "test",
                                                "easy_vqa_caption": "test"},
                                "prompt_format": "fewshot", "chat_template": None,
                                "perplexity_tasks": []}
  vqa, captions = report["results"]["easy_vqa_vqa"], report["results"]["easy_vqa_caption"]
  assert set(vqa) == {"0shot", "question_prior"} and set(captions) == {"0shot"}
  assert vqa["0shot"]["num_queries"] == 2 and 0 <= vqa["0shot"]["vqa_accuracy"] <= 1
  assert captions["0shot"]["num_queries"] == 2 and captions["0shot"]["cider"] >= 0
  assert len(vqa["0shot"]["examples"]) == 1 == len(captions["0shot"]["examples"])
  assert set(vqa["question_prior"]) == {"vqa_accuracy", "exact_match", "num_queries"}
  tags = tensorboard_tags(workdir)
  for tag in ("eval/easy_vqa_vqa/0shot/vqa_accuracy", "eval/easy_vqa_caption/0shot/cider",
              "eval/easy_vqa_vqa/question_prior/vqa_accuracy"):
    assert (tag, 7) in tags, tag
  assert re.search(r"easy_vqa_vqa +question_prior +2 ", result.stdout), result.stdout
  assert "Wrote " in result.stdout


def test_a_checkpoint_of_another_config_is_refused_as_in_training(workdir):
  with pytest.raises(checkpoint_lib.CheckpointMismatchError,
                     match=r"does not match the train state of this config(.|\n)*"
                           r"params/llm/blocks/layer_0/mlp/gate/kernel: checkpoint "
                           r"\(4, 128, 256\) vs config \(4, 128, 384\)"):
    evaluate.run(tiny_config(mlp_dim=384), workdir, tasks=["easy_vqa_caption"], shots=[0],
                 max_queries=1)


def test_unknown_tasks_and_impossible_shots_are_named_before_restoring(tmp_path):
  fresh = str(tmp_path / "fresh")  # No checkpoint: the task check must come first.
  with pytest.raises(ValueError, match=r"unknown SeqIO task or mixture 'easy_vqa_vqq'"):
    evaluate.run(tiny_config(), fresh, tasks=["easy_vqa_vqq"], shots=[0])
  with pytest.raises(ValueError, match=r"task 'easy_vqa_caption': 4001-shot prompts need 4001"):
    evaluate.run(tiny_config(), fresh, tasks=["easy_vqa_caption"], shots=[0, 4001])
  with pytest.raises(ValueError, match=r"task 'easy_vqa_caption' has no split 'validation'; "
                                      r"it has \['train', 'test'\]"):
    evaluate.run(tiny_config(), fresh, tasks=["easy_vqa_caption"], shots=[0], split="validation")
  with pytest.raises(ValueError, match="eval.split: empty"):
    evaluate.run(tiny_config(), fresh, tasks=["easy_vqa_caption"], shots=[0], split=" ")
  with pytest.raises(FileNotFoundError, match="no checkpoints in"):
    evaluate.run(tiny_config(), fresh, tasks=["easy_vqa_caption"], shots=[0])
  assert not os.path.exists(fresh)


def test_a_user_task_without_test_or_validation_split_needs_split(tmp_path):
  """Records from write_records with only a train split: --split names it."""
  from PIL import Image

  from mm1_jax.data import user_tasks, write_records

  for i, color in enumerate(("red", "blue")):
    Image.new("RGB", (16, 16), color).save(tmp_path / f"{i}.png")
    (tmp_path / f"{i}.txt").write_text(f"a {color} square.")
  report = write_records.write_records(str(tmp_path), str(tmp_path / "records" / "caps"),
                                       log=lambda _: None)
  user_tasks.register_image_text_task("eval_train_only",
                                      {"train": report["splits"]["train"]["pattern"]})
  fresh = str(tmp_path / "fresh")
  try:
    with pytest.raises(ValueError, match=r"task 'eval_train_only' has splits \['train'\], none "
                                          r"of \['test', 'validation'\]; name the evaluation "
                                          r"split \(python -m mm1_jax.evaluate --split=NAME\)"):
      evaluate.run(tiny_config(), fresh, tasks=["eval_train_only"], shots=[0])
    # With the split named, the checks pass and only the checkpoint is missing.
    with pytest.raises(FileNotFoundError, match="no checkpoints in"):
      evaluate.run(tiny_config(), fresh, tasks=["eval_train_only"], shots=[0, 1], split="train")
  finally:
    seqio.TaskRegistry.remove("eval_train_only")


def test_untrained_baseline(tmp_path, monkeypatch):
  """--untrained: the parameters training starts from, reported at step 0.
  (Decoding is the checkpoint path's: stubbed here, it is tested above.)"""
  config = tiny_config()
  train_step, _ = trainer.build(config)
  seen = {}

  def fake_evaluate(params, model_config, tasks, shots, **kwargs):
    seen["params"], seen["eval_split"] = params, kwargs["eval_split"]
    return {"easy_vqa_caption": {"0shot": {"cider": 0.0, "bleu4": 0.0, "num_queries": 2,
                                           "examples": []}}}

  monkeypatch.setattr(evaluator, "evaluate", fake_evaluate)
  output = str(tmp_path / "untrained.json")
  report = evaluate.run(config, str(tmp_path), untrained=True, output=output,
                        tasks=["easy_vqa_caption"], shots=[0], max_queries=2, batch_size=2,
                        split="train")  # A named split, threaded through and recorded.
  assert report["step"] == 0 and report["untrained"]
  assert seen["eval_split"] == "train"
  assert (report["settings"]["split"], report["settings"]["eval_splits"]) == (
      "train", {"easy_vqa_caption": "train"})
  abstract = train_step.abstract_state["params"]
  assert jax.tree.structure(seen["params"]) == jax.tree.structure(abstract)
  assert all(p.shape == a.shape for p, a in zip(jax.tree.leaves(seen["params"]),
                                                jax.tree.leaves(abstract)))
  # Initialised, not zeros: e.g. the token embedding.
  assert float(np.abs(np.asarray(seen["params"]["llm"]["embedder"]["embedding"])).max()) > 0
  with open(output) as f:
    assert json.load(f)["results"]["easy_vqa_caption"]["0shot"]["num_queries"] == 2
  assert ("eval/easy_vqa_caption/0shot/cider", 0) in tensorboard_tags(str(tmp_path))


def test_the_chat_format_is_run_and_recorded_in_the_report(tmp_path, monkeypatch):
  """--prompt_format=chat: passed to the evaluator with the run's template, named in
  the report, written next to (not over) the few-shot report. (Decoding and
  restoring are stubbed: tests/evaluation/test_chat_format.py decodes.)"""
  config = tiny_config()
  fresh = str(tmp_path / "fresh")
  # Refused before the checkpoint is read: the config's shots (0, 4, 8) are not 0-shot.
  with pytest.raises(ValueError, match=r"'chat' prompts are 0-shot .* use --shots=0"):
    evaluate.run(config, fresh, tasks=["easy_vqa_caption"], prompt_format="chat")
  assert not os.path.exists(fresh)

  seen = {}

  def fake_restore(experiment, workdir):
    return {}, experiment.model, None, 7

  def fake_evaluate(params, model_config, tasks, shots, **kwargs):
    seen.update(kwargs)
    return {"easy_vqa_caption": {"0shot_chat": {"cider": 0.5, "bleu4": 0.0, "num_queries": 2,
                                                "examples": []}}}

  monkeypatch.setattr(trainer, "restore_params", fake_restore)
  monkeypatch.setattr(evaluator, "evaluate", fake_evaluate)
  report = evaluate.run(config, str(tmp_path), tasks=["easy_vqa_caption"], shots=[0],
                        max_queries=2, prompt_format="chat")
  assert (seen["prompt_format"], seen["chat_template"]) == ("chat", "")  # data.chat_template.
  assert (report["settings"]["prompt_format"], report["settings"]["chat_template"]) == (
      "chat", "mm1")  # "" resolved for the bundled vocabulary.
  with open(tmp_path / "eval" / "step_7_chat.json") as f:
    assert json.load(f)["settings"]["prompt_format"] == "chat"
  assert ("eval/easy_vqa_caption/0shot_chat/cider", 7) in tensorboard_tags(str(tmp_path))
