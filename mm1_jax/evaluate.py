"""Few-shot evaluation of a training run's latest checkpoint (or of its untrained model).

    python -m mm1_jax.evaluate --config=configs/tiny.py --workdir=workdirs/tiny \
        [--shots=0,4,8] [--tasks=easy_vqa_vqa,easy_vqa_caption] [--max_queries=500] \
        [--untrained] [--output=PATH] [--batch_size=16 --seed=0 --import=my_project.tasks] \
        [--num_examples=3] [--split=validation] [--prompt_format=fewshot|chat] \
        [--perplexity_tasks=shakespeare_text]

Use the config (and overrides) the run was trained with: a checkpoint of
another config is refused with the same message as training. --untrained
evaluates the parameters training starts from (config.train.seed) instead,
the untrained baseline; nothing needs to be in the workdir then.

Defaults come from config.eval (tasks, shots, max_queries, batch_size,
seed); --max_queries=0 evaluates whole eval splits. --split names the split
queries come from (default: each task's "test", else its "validation");
demonstrations always come from "train". Every VQA task also
gets the question-only prior (the most frequent train answer of each
question string, no image) as setting "question_prior".

--prompt_format=chat (default: config.eval.prompt_format, "fewshot")
evaluates an instruction-tuned run with 0-shot prompts in its chat template
(data.chat_template): a VQA query is the conversation [user:
"<image>\n{question}\nAnswer the question using a single word."], a caption
query [user: "<image>\nDescribe the image briefly."], each with the
assistant header after it; the answer ends at the template's stop ids.
Only 0-shot: shots > 0 are refused (pass --shots=0). Its setting is
"0shot_chat", and its report step_{step}_chat.json.

--perplexity_tasks (default config.eval.perplexity_tasks) scores text tasks
by held-out perplexity (their validation split, else test; sequences of
data.seq_len: mm1_jax/evaluation/perplexity.py), e.g. shakespeare_text, whose
validation plays are never trained on, or chatterbot_chat's test dialogues
(rendered with the run's chat template, scored on the answers); with
--tasks= (empty) only those are evaluated.

Writes a JSON report (default {workdir}/eval/step_{step}.json, or
step_0_untrained.json) with the metrics, example answers per setting (3, or
--num_examples; 0 keeps all, for error analysis) and the settings used (the
prompt format and, for chat, the template among them); TensorBoard scalars
into the workdir (the training run's event files), tagged
eval/<task>/<k>shot/<metric> at the checkpoint's step (0 for --untrained);
and prints a table (metrics x 100).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import sys
import time

from absl import app, flags
from ml_collections import config_flags

from mm1_jax import cli


def define_flags() -> None:
  """The command-line flags; defined only when run as a program, so that
  other entry points (and tests) can import this module."""
  config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Workdir of the training run.")
  flags.DEFINE_list("tasks", None, "SeqIO tasks to evaluate (default: config.eval.tasks).")
  flags.DEFINE_list("shots", None, "Shot counts, e.g. 0,4,8 (default: config.eval.shots).")
  flags.DEFINE_list("perplexity_tasks", None, "Text tasks scored by held-out perplexity "
                    "(their validation split), e.g. shakespeare_text (default: "
                    "config.eval.perplexity_tasks); --tasks= (empty) then evaluates only them.")
  flags.DEFINE_integer("max_queries", None, "Queries per setting, the first N of "
                       "the eval split; 0: all (default: config.eval.max_queries).",
                       lower_bound=0)
  flags.DEFINE_integer("batch_size", None, "Prompts per generate call "
                       "(default: config.eval.batch_size).", lower_bound=1)
  flags.DEFINE_integer("seed", None,
                       "Demonstration sampling seed (default: config.eval.seed).", lower_bound=0)
  flags.DEFINE_integer("num_examples", None, "Predictions kept per setting in the report, "
                       "for reading errors; 0: all (default: 3).", lower_bound=0)
  flags.DEFINE_bool("untrained", False, "Evaluate freshly initialised parameters "
                    "(config.train.seed) instead of the latest checkpoint.")
  flags.DEFINE_string("output", None, "JSON report path (default: "
                      "{workdir}/eval/step_{step}.json).")
  flags.DEFINE_string("split", None, "Split the queries come from, e.g. validation "
                      "(default: each task's 'test', else its 'validation'); demonstrations "
                      "come from 'train'.")
  flags.DEFINE_enum("prompt_format", None, ["fewshot", "chat"],
                    "fewshot: MM1's k-shot prompts; chat: 0-shot instructions in the run's "
                    "chat template (data.chat_template), with --shots=0 "
                    "(default: config.eval.prompt_format).")
  flags.DEFINE_list("import", [], "Modules to import first, e.g. ones that register "
                    "SeqIO tasks of your own.")


def settings(experiment, tasks=None, shots=None, max_queries=None, batch_size=None, seed=None,
             num_examples=None, split=None, prompt_format=None, perplexity_tasks=None) -> dict:
  """The evaluation settings: the flags given, else experiment.eval's values
  (split: None, each task's default evaluation split). Raises ConfigError
  naming a bad value."""
  from mm1_jax.experiment import validate_eval

  given = dict(tasks=tasks, shots=shots, max_queries=max_queries, batch_size=batch_size,
               seed=seed, split=split, prompt_format=prompt_format,
               perplexity_tasks=perplexity_tasks)
  chosen = dataclasses.replace(experiment.eval, **{
      k: tuple(v) if isinstance(v, list) else v for k, v in given.items() if v is not None})
  validate_eval(chosen)
  return {"tasks": list(chosen.tasks), "shots": list(chosen.shots),
          "max_queries": chosen.max_queries or None, "batch_size": chosen.batch_size,
          "seed": chosen.seed, "num_examples": num_examples,  # None: the evaluator's default.
          "split": chosen.split,  # None: each task's default.
          "prompt_format": chosen.prompt_format,
          "perplexity_tasks": list(chosen.perplexity_tasks)}


def chat_template_name(experiment) -> str:
  """The chat template the run renders conversations with (data.chat_template, ""
  resolved for data.vocabulary), as the chat format's prompts use it."""
  from mm1_jax.data import conversations, tokenizer

  vocabulary = tokenizer.get_vocabulary(experiment.data.vocabulary or None)
  return conversations.get_template(experiment.data.chat_template, vocabulary).name


def untrained_params(experiment):
  """The parameters training starts from (train.seed), on the run's mesh."""
  import jax

  from mm1_jax.training import trainer

  train_step, model_config = trainer.build(experiment)
  state = train_step.init(jax.random.key(experiment.train.seed))
  return state["params"], model_config, train_step.mesh


def run(experiment, workdir: str, *, untrained: bool = False, output: str | None = None,
        **overrides) -> dict:
  """Evaluates the run in `workdir` (or its untrained model); returns the report.

  experiment: the run's mm1_jax.experiment.Experiment; overrides: the
  settings() keywords (the command's flags), None for experiment.eval's.
  """
  from clu import metric_writers

  from mm1_jax import paths
  from mm1_jax.data.config import SplitScheme
  from mm1_jax.evaluation import evaluator, fewshot, perplexity
  from mm1_jax.training import trainer

  chosen = settings(experiment, **overrides)
  data_config = experiment.data
  vocabulary_path = data_config.vocabulary
  # A bad task, split or shot count fails before the checkpoint is read.
  split = chosen["split"]
  prompt_format = chosen["prompt_format"]
  evaluator.check_perplexity_tasks(chosen["perplexity_tasks"], vocabulary_path)
  if chosen["tasks"] or not chosen["perplexity_tasks"]:
    evaluator.check_tasks(chosen["tasks"], chosen["shots"], eval_split=split,
                          vocabulary_path=vocabulary_path, prompt_format=prompt_format)
  # The split each task is evaluated on, and the chat template, for the report.
  chosen["eval_splits"] = {task: split or fewshot.default_eval_split(task, vocabulary_path)
                           for task in chosen["tasks"]}
  chosen["eval_splits"].update({task: perplexity.held_out_split(task, vocabulary_path)
                               for task in chosen["perplexity_tasks"]})
  chosen["chat_template"] = (chat_template_name(experiment) if prompt_format == evaluator.CHAT
                             else None)
  if untrained:
    params, model_config, mesh = untrained_params(experiment)
    step = 0
  else:
    params, model_config, mesh, step = trainer.restore_params(experiment, workdir)
  start = time.perf_counter()
  results = evaluator.evaluate(
      params, model_config, chosen["tasks"], chosen["shots"], max_queries=chosen["max_queries"],
      batch_size=chosen["batch_size"], seed=chosen["seed"], mesh=mesh, eval_split=split,
      image_policy=data_config.image_policy, image_start_end=data_config.image_start_end,
      vocabulary_path=vocabulary_path, log=print,
      num_examples=(evaluator.NUM_EXAMPLES if chosen["num_examples"] is None
                    else chosen["num_examples"] or sys.maxsize),
      prompt_format=prompt_format, chat_template=data_config.chat_template,
      image_split=SplitScheme.from_config(data_config),
      perplexity_tasks=chosen["perplexity_tasks"], seq_len=data_config.seq_len)
  for task in chosen["tasks"]:
    first = next(iter(results[task].values()))
    if "vqa_accuracy" in first:  # A VQA task: add the blind baseline.
      prior = fewshot.question_prior_baseline(task, eval_split=split,
                                              max_queries=chosen["max_queries"],
                                              vocabulary_path=vocabulary_path)
      results[task]["question_prior"] = {**prior, "num_queries": first["num_queries"]}
  report = {"workdir": os.fspath(paths.as_path(workdir)), "step": step, "untrained": untrained,
            "settings": chosen, "seconds": round(time.perf_counter() - start, 1),
            "metrics_scale": "fractions (x 100 for papers' numbers)", "results": results,
            "config": json.loads(experiment.config_json)}
  # A chat-format report does not overwrite the few-shot one of the same step.
  name = (f"step_{step}" + ("_untrained" if untrained else "")
          + ("_chat" if prompt_format == evaluator.CHAT else "") + ".json")
  output = paths.write_json(output or paths.as_path(workdir) / "eval" / name, report, indent=2)
  writer = metric_writers.create_default_writer(workdir)
  evaluator.write_scalars(writer, step, results)
  writer.close()
  print(evaluator.format_table(results))
  print(f"Wrote {output}")
  return report


def main(argv):
  cli.start(argv)
  from mm1_jax.experiment import Experiment

  FLAGS = flags.FLAGS
  for module in FLAGS["import"].value:
    importlib.import_module(module)
  try:
    shots = None if FLAGS.shots is None else [int(k) for k in FLAGS.shots]
  except ValueError:
    raise app.UsageError(f"--shots must be integers, got {','.join(FLAGS.shots)}") from None
  experiment = Experiment.from_config(FLAGS.config, check_init_from=False)
  run(experiment, FLAGS.workdir, untrained=FLAGS.untrained, output=FLAGS.output,
      tasks=FLAGS.tasks, shots=shots, max_queries=FLAGS.max_queries,
      batch_size=FLAGS.batch_size, seed=FLAGS.seed, num_examples=FLAGS.num_examples,
      split=FLAGS.split, prompt_format=FLAGS.prompt_format,
      perplexity_tasks=FLAGS.perplexity_tasks)


if __name__ == "__main__":
  define_flags()
  # ValueError: unknown tasks or splits, and shot counts a task cannot take
  # (evaluator.check_tasks).
  cli.run(main, required=["config", "workdir"], extra_errors=(ValueError,))
