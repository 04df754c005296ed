"""Few-shot evaluation of an MM1 model: greedy answers, scored per task and shot count.

    results = evaluate(params, model_config, ["easy_vqa_vqa", "easy_vqa_caption"],
                       shots=(0, 4, 8), max_queries=500)
    results["easy_vqa_vqa"]["4shot"]
    # {"vqa_accuracy": 0.61, "exact_match": 0.61, "num_queries": 500,
    #  "examples": [{"prompt": " <image> Question: ... Answer:", "prediction": "red",
    #                "generation": " red <image> Question", "references": ["red"]}, ...]}

For each (task, k) the k-shot prompts of mm1_jax/evaluation/fewshot.py are
decoded greedily with the KV-cache Generator (decoding.py); each
continuation is cut at the first stop token (EOS, the next image) and by
fewshot.truncate_generation, then scored by metrics.score_predictions
(captions: cider, bleu4; VQA: vqa_accuracy, exact_match; fractions, not
percentages).

prompt_format="chat" evaluates an instruction-tuned model instead: 0-shot
prompts in the run's chat template (fewshot.ChatEvaluationSet: user
"<image>\n{question}\nAnswer the question using a single word." or
"<image>\nDescribe the image briefly.", then the assistant header); the
answer ends at the template's stop ids and is scored as it is (the VQA
metric normalises it). Its results key is "0shot_chat".

perplexity_tasks (e.g. shakespeare_text) are scored by held-out text
perplexity instead (perplexity.py: the task's validation split through the
training pipeline): results[task]["perplexity"] = {"perplexity",
"cross_entropy", "num_tokens", ...}, the text ability MM1's text data keeps.

"examples" keeps the first few queries for people to read; `scalars`
flattens the numbers for TensorBoard (eval/<task>/<k>shot/<metric>).

max_images. A k-shot prompt holds (k + 1) x images-per-example images, more
than a model is usually trained with (configs/tiny.py: 4). No parameter
depends on max_images (it only sizes the image slots of a batch; tested),
so each setting is evaluated with model_config.max_images raised to what its
prompts need, never lowered; the params are used as they are.

Compiles. Prompts go in batches of exactly batch_size rows (the last one
filled with copies of its first prompt, whose answers are dropped), right
padded to a multiple of length_bucket tokens. The prefill compiles once per
(setting, bucket) and the decode loop once per (setting, bucket, max new
tokens), so a setting costs one or two compilations, not one per batch.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from mm1_jax.data.config import SplitScheme, scheme_slots
from mm1_jax.evaluation import decoding, fewshot, metrics, perplexity
from mm1_jax.experiment import PROMPT_FORMATS
from mm1_jax.models.config import MM1Config

# Most new tokens per kind: easy-vqa answers are one word, captions ~5 tokens.
DEFAULT_MAX_NEW_TOKENS = {metrics.VQA: 8, metrics.CAPTION: 20}
DEFAULT_TASKS = ("easy_vqa_vqa", "easy_vqa_caption")
NUM_EXAMPLES = 3  # Queries kept per setting for people to read.
FEWSHOT, CHAT = PROMPT_FORMATS  # eval.prompt_format: MM1's k-shot prompts, or a chat template.
PERPLEXITY = "perplexity"  # The setting of a held-out text perplexity result.
# Metrics not shown x 100.
_UNSCALED = ("perplexity", "cross_entropy")


def setting_name(num_shots: int, prompt_format: str = FEWSHOT) -> str:
  """The results key of a setting: "4shot"; "0shot_chat" in the chat format (so
  that its TensorBoard tags differ from the few-shot format's)."""
  return f"{num_shots}shot" + ("" if prompt_format == FEWSHOT else f"_{prompt_format}")


def images_per_example(task_name: str, eval_split: str | None = None,
                       vocabulary_path: str = "") -> int:
  """How many images a query of the task holds (its first example's count)."""
  split = eval_split or fewshot.default_eval_split(task_name, vocabulary_path)
  first = fewshot.load_task_examples(task_name, split, vocabulary_path, 1)
  if not first:
    raise ValueError(f"task {task_name!r} split {split!r} has no examples.")
  return len(first[0].images)


def eval_model_config(model_config: MM1Config, num_shots: int, images_per_query: int = 1
                      ) -> MM1Config:
  """model_config with max_images raised to hold a k-shot prompt's images
  ((k + 1) x images_per_query); unchanged when it already does."""
  needed = (num_shots + 1) * images_per_query
  if needed <= model_config.max_images:
    return model_config
  return dataclasses.replace(model_config, max_images=needed)


def check_prompt_format(prompt_format: str, shots: Sequence[int]) -> None:
  """ValueError for an unknown prompt format, or shots > 0 in the (0-shot) chat format."""
  if prompt_format not in PROMPT_FORMATS:
    raise ValueError(f"eval.prompt_format: unknown format {prompt_format!r}; use one of "
                     f"{PROMPT_FORMATS}.")
  if prompt_format == CHAT and any(k != 0 for k in shots):
    raise ValueError(f"eval.prompt_format: 'chat' prompts are 0-shot (an instruction, no "
                     f"demonstrations) but the shot counts are {list(shots)}; use --shots=0 "
                     "(eval.shots=(0,)), or --prompt_format=fewshot for k-shot prompts.")


def check_tasks(tasks: Sequence[str], shots: Sequence[int], *, eval_split: str | None = None,
                train_split: str = "train", vocabulary_path: str = "",
                prompt_format: str = FEWSHOT) -> None:
  """ValueError before any decoding: unknown or unusable tasks, bad shot counts.

  Each message names the task and the shot count at fault: a name that is
  not a registered task (the list of registered ones follows), a mixture, a
  task without image + reference text, shots < 0, or more shots than the
  task's train split has examples to show; and an unknown prompt format, or
  shots > 0 in the chat format (check_prompt_format).
  """
  if not tasks:
    raise ValueError("no tasks to evaluate; name at least one, e.g. easy_vqa_vqa.")
  if not shots:
    raise ValueError("no shot counts to evaluate; give at least one, e.g. 0.")
  for k in shots:
    if int(k) != k or k < 0:
      raise ValueError(f"shot counts must be integers >= 0, got {k!r}.")
  check_prompt_format(prompt_format, shots)
  vocabulary = fewshot._vocabulary(vocabulary_path)
  for task in tasks:
    fewshot.get_task(task, vocabulary_path)  # Unknown names and mixtures, named.
    split = eval_split or fewshot.default_eval_split(task, vocabulary_path)
    first = fewshot.load_task_examples(task, split, vocabulary_path, 1)
    if not first:
      raise ValueError(f"task {task!r} split {split!r} has no examples.")
    fewshot.check_query_example(first[0], vocabulary, task)
    most = max(shots)
    if most:
      num_train = len(fewshot.load_task_examples(task, train_split, vocabulary_path))
      if most > num_train:
        raise ValueError(f"task {task!r}: {most}-shot prompts need {most} demonstrations but "
                         f"its {train_split!r} split has {num_train} examples; use shots <= "
                         f"{num_train}.")


def check_perplexity_tasks(tasks: Sequence[str], vocabulary_path: str = "") -> None:
  """ValueError naming a perplexity task that is not registered or has no held-out split."""
  for task in tasks:
    fewshot.get_task(task, vocabulary_path)  # Unknown names, named.
    perplexity.held_out_split(task, vocabulary_path)


def _bucketed(length: int, bucket: int) -> int:
  return bucket * math.ceil(length / bucket)


def _answer_text(tokens: np.ndarray, length: int, evaluation_set) -> str:
  """The generated ids up to (not including) the first stop token, decoded."""
  ids = [int(t) for t in tokens[:length]]
  for i, token in enumerate(ids):
    if token in evaluation_set.stop_ids:
      ids = ids[:i]
      break
  return evaluation_set.decode(ids)


def evaluation_set_of(task_name: str, model_config: MM1Config, num_shots: int, seed: int, *,
                      prompt_format: str = FEWSHOT, chat_template: str = "",
                      **options) -> fewshot.FewShotEvaluationSet:
  """The prompts of one setting: MM1's k-shot prompts, or 0-shot chat prompts.

  options: FewShotEvaluationSet's keywords (eval_split, max_queries, ...).
  """
  check_prompt_format(prompt_format, [num_shots])
  if prompt_format == CHAT:
    return fewshot.ChatEvaluationSet(task_name, model_config, seed, chat_template=chat_template,
                                     **options)
  return fewshot.FewShotEvaluationSet(task_name, model_config, num_shots, seed, **options)


def evaluate_setting(params: Any, model_config: MM1Config, task_name: str, num_shots: int, *,
                     max_queries: int | None = None, batch_size: int = 16, seed: int = 0,
                     max_new_tokens: Mapping[str, int] | None = None, mesh=None,
                     eval_split: str | None = None, image_policy: str = "stretch",
                     image_start_end: bool = False, vocabulary_path: str = "",
                     length_bucket: int = 64, num_examples: int = NUM_EXAMPLES,
                     prompt_format: str = FEWSHOT, chat_template: str = "",
                     image_split: SplitScheme | None = None) -> dict[str, Any]:
  """One task at one shot count: {metric: value, "num_queries": n, "examples": [...]}.

  Arguments as `evaluate`. model_config may have fewer image slots than the
  prompts need; they are raised here (module docstring).
  """
  max_new_tokens = {**DEFAULT_MAX_NEW_TOKENS, **(max_new_tokens or {})}
  per_query = images_per_example(task_name, eval_split, vocabulary_path)
  config = eval_model_config(model_config, num_shots,
                             per_query * scheme_slots(image_split))
  evaluation_set = evaluation_set_of(
      task_name, config, num_shots, seed, prompt_format=prompt_format,
      chat_template=chat_template, eval_split=eval_split, max_queries=max_queries,
      image_policy=image_policy, image_start_end=image_start_end,
      vocabulary_path=vocabulary_path, image_split=image_split)
  vocabulary = evaluation_set.vocabulary
  # The first stop id ends the loop: EOS (few-shot), the end of the turn (chat).
  generator = decoding.Generator(config, decoding.DecodeConfig(
      max_new_tokens=max_new_tokens[evaluation_set.kind], method="greedy",
      eos_id=evaluation_set.stop_ids[0], pad_id=vocabulary.pad_id), mesh)
  predictions, examples = [], []
  for start in range(0, len(evaluation_set), batch_size):
    prompts = evaluation_set[start:start + batch_size]
    rows = prompts + [prompts[0]] * (batch_size - len(prompts))  # A fixed batch shape.
    batch = fewshot.stack_prompts(
        rows, _bucketed(max(len(p.tokens) for p in rows), length_bucket))
    output = generator(params, decoding.Prompts(batch["tokens"], batch["lengths"],
                                                batch["images"], batch["image_mask"]))
    for row, prompt in enumerate(prompts):
      generation = _answer_text(output.tokens[row], output.lengths[row], evaluation_set)
      answer = evaluation_set.answer(generation)
      predictions.append(answer)
      if len(examples) < num_examples:
        examples.append({"prompt": prompt.text, "generation": generation,
                         "prediction": answer, "references": list(prompt.references)})
  scores = metrics.score_predictions(evaluation_set.kind, predictions, evaluation_set.references)
  return {**scores, "num_queries": len(predictions), "examples": examples}


def evaluate(params: Any, model_config: MM1Config, tasks: Sequence[str] = DEFAULT_TASKS,
             shots: Sequence[int] = fewshot.DEFAULT_SHOTS, *, max_queries: int | None = None,
             batch_size: int = 16, seed: int = 0,
             max_new_tokens: Mapping[str, int] | None = None, mesh=None,
             eval_split: str | None = None, image_policy: str = "stretch",
             image_start_end: bool = False, vocabulary_path: str = "",
             length_bucket: int = 64, num_examples: int = NUM_EXAMPLES,
             log: Callable[[str], None] | None = None, prompt_format: str = FEWSHOT,
             chat_template: str = "", image_split: SplitScheme | None = None,
             perplexity_tasks: Sequence[str] = (), seq_len: int = 256
             ) -> dict[str, dict[str, dict[str, Any]]]:
  """Greedy k-shot evaluation of every task at every shot count.

  params: the model's 'params' tree (on `mesh` when given: the run's mesh,
  e.g. from trainer.restore_params). tasks: registered SeqIO task names
  whose examples have image(s) in the prompt and reference text(s).
  shots: k values. max_queries: the first N queries of each eval split
  (None: all). batch_size: rows per generate call (fixed). seed: the
  demonstration sampling seed. max_new_tokens: {"vqa": n, "caption": n}
  (DEFAULT_MAX_NEW_TOKENS fills the rest). eval_split: default "test", else
  "validation". image_policy / image_start_end / vocabulary_path: as the
  training run's config.data; image_split: its SplitScheme.from_config(data)
  (None: images not split). perplexity_tasks: text tasks scored by held-out
  perplexity (setting "perplexity", sequences of seq_len: the run's
  data.seq_len), after the few-shot tasks; `tasks` may then be empty. log: called with a line per setting.
  prompt_format: "fewshot" (MM1's k-shot prompts) or "chat" (0-shot
  instructions in chat_template, "" = the vocabulary's own: the run's
  data.chat_template; shots must be (0,)).

  Returns {task: {"<k>shot": {metric: value, "num_queries": n,
  "examples": [{"prompt", "generation", "prediction", "references"}]}}}
  ("0shot_chat" in the chat format). Raises ValueError (check_tasks)
  before decoding anything.
  """
  check_perplexity_tasks(perplexity_tasks, vocabulary_path)
  if tasks or not perplexity_tasks:
    check_tasks(tasks, shots, eval_split=eval_split, vocabulary_path=vocabulary_path,
                prompt_format=prompt_format)
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
  results: dict[str, dict[str, dict[str, Any]]] = {}
  for task in tasks:
    results[task] = {}
    for k in shots:
      start = time.perf_counter()
      result = evaluate_setting(
          params, model_config, task, int(k), max_queries=max_queries, batch_size=batch_size,
          seed=seed, max_new_tokens=max_new_tokens, mesh=mesh, eval_split=eval_split,
          image_policy=image_policy, image_start_end=image_start_end,
          vocabulary_path=vocabulary_path, length_bucket=length_bucket,
          num_examples=num_examples, prompt_format=prompt_format, chat_template=chat_template,
          image_split=image_split)
      setting = setting_name(int(k), prompt_format)
      results[task][setting] = result
      if log:
        numbers = " ".join(f"{name} {value:.4f}" for name, value in result.items()
                           if name not in ("num_queries", "examples"))
        log(f"eval {task} {setting}: {numbers} ({result['num_queries']} queries, "
            f"{time.perf_counter() - start:.0f} s)")
  for task in perplexity_tasks:
    start = time.perf_counter()
    result = perplexity.text_perplexity(params, model_config, task, seq_len=seq_len,
                                        batch_size=batch_size, max_sequences=max_queries,
                                        vocabulary_path=vocabulary_path,
                                        chat_template=chat_template)
    results[task] = {PERPLEXITY: {**result, "num_queries": result["num_sequences"]}}
    if log:
      log(f"eval {task} {PERPLEXITY}: {result['perplexity']:.3f} ({result['num_tokens']} tokens "
          f"of {result['num_sequences']} "
          f"{perplexity.held_out_split(task, vocabulary_path)} sequences, "
          f"{time.perf_counter() - start:.0f} s)")
  return results


def scalars(results: Mapping[str, Mapping[str, Mapping[str, Any]]], prefix: str = "eval"
            ) -> dict[str, float]:
  """{"eval/<task>/<setting>/<metric>": value} of every number but num_queries."""
  return {f"{prefix}/{task}/{setting}/{name}": float(value)
          for task, settings in results.items() for setting, result in settings.items()
          for name, value in result.items()
          if name not in ("num_queries", "examples") and isinstance(value, (int, float))}


def format_table(results: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> str:
  """A fixed-width table: one row per (task, setting), metrics x 100 (perplexity as is)."""
  names = []
  for settings in results.values():
    for result in settings.values():
      names += [n for n in result if n not in metrics.REPORT_COUNT_FIELDS and n not in names]
  header = f"{'task':<22} {'setting':<15} {'queries':>7}" + "".join(f" {n:>12}" for n in names)
  lines = [header, "-" * len(header)]
  for task, settings in results.items():
    for setting, result in settings.items():
      cells = "".join(f" {(1 if n in _UNSCALED else 100) * result[n]:12.2f}" if n in result
                      else f" {'':>12}" for n in names)
      lines.append(f"{task:<22} {setting:<15} {result.get('num_queries', ''):>7}{cells}")
  lines.append("(metrics x 100: CIDEr as in papers, accuracies in %; perplexity and "
               "cross_entropy (nats) as they are)")
  return "\n".join(lines)


def write_scalars(writer, step: int, results, prefix: str = "eval") -> None:
  """TensorBoard scalars of `results` through a clu metric writer."""
  writer.write_scalars(step, scalars(results, prefix))
  writer.flush()
