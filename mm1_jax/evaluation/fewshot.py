"""MM1-style few-shot prompts over any registered SeqIO task, and a question-only baseline.

MM1 evaluates pre-trained models in context: a k-shot prompt is k
demonstrations - image-text pairs drawn from the train split, laid out as
the interleaved pre-training documents lay them out - then the query image
and its prompt; the model answers greedily. With the bundled tasks:

    easy_vqa_caption  " <image> a red circle. <image> a blue triangle. <image>"
    easy_vqa_vqa      " <image> Question: what color is the shape? Answer: red <image>
                        Question: is there a circle? Answer: no <image> Question: ... Answer:"

Each demonstration is the task's own example, inputs then targets, tokenized
by the task (so a swapped vocabulary just works) without its EOS; the query
is the inputs alone. The ids are then laid out as training lays them out
(mm1_jax/data/packing.py, through the converter's ids and checks): every
<image> marker expanded to a run of num_image_tokens placeholders, and
a leading 0, the "BOS" every training segment starts with (the decoder
inputs are the targets shifted right). The logits at a prompt's last
position are the model's first answer token.

Demonstrations are sampled without replacement from the whole train split
by np.random.default_rng([seed, query_index]): deterministic, different per
query, and independent of how many queries are evaluated.

    evaluation_set = FewShotEvaluationSet("easy_vqa_vqa", model_config, num_shots=4, seed=0)
    for start in range(0, len(evaluation_set), 8):
      batch = stack_prompts(evaluation_set[start:start + 8])
      ...                             # greedy decoding (mm1_jax/evaluation/decoding.py)
    answers = [truncate_generation(text, evaluation_set.kind) for text in decoded]
    metrics.score_predictions(evaluation_set.kind, answers, evaluation_set.references)

ChatEvaluationSet builds 0-shot prompts in a chat template instead (an
instruction-tuned model's format; evaluator prompt_format="chat"): one user
turn "<image>\n{question}\nAnswer the question using a single word." (VQA;
the question is the prompt without images and "Question:" / "Answer:") or
"<image>\nDescribe the image briefly." (captions), rendered with the
assistant header after it and laid out the same way; its answers end at the
template's stop ids.

A task can be evaluated when its examples put their image(s) in the prompt
(`inputs`) and the reference text in `targets` (or a list of reference
answers in an `answers` feature, as VQA annotators give). Its kind is
"vqa" when it has `answers` or text follows the last image of the prompt (a
question), else "caption"; pass kind= to say otherwise.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import re
from typing import Iterator, Sequence

import numpy as np
import seqio
import tensorflow as tf

from mm1_jax.data import image_split as image_split_ops
from mm1_jax.data import images as image_ops
from mm1_jax.data import conversations, packing, sources, tasks, tokenizer
from mm1_jax.data.config import SplitScheme, scheme_slots
from mm1_jax.data.converter import MultimodalFeatureConverter
from mm1_jax.data.image_split import expand_split_markers
from mm1_jax.evaluation import metrics
from mm1_jax.models.config import MM1Config

DEFAULT_SHOTS = (0, 4, 8)
BOS_ID = packing.PAD_ID  # Decoder inputs start every segment with 0 (shift right).
_EVAL_SPLITS = ("test", "validation")  # Tried in this order when no split is given.
_LOAD_BATCH = 1024


@dataclasses.dataclass(frozen=True)
class TaskExample:
  """One example of a task, as its SeqIO pipeline emits it.

  inputs:     int32 [n_in]  prompt ids, one <image> marker id per image
  targets:    int32 [n_t]   answer ids, without the EOS the task appends
  images:     k encoded images (PNG/JPEG bytes), in marker order
  references: the reference text(s): the `answers` feature when the task
              has one, else the decoded targets, outer whitespace stripped
  """
  inputs: np.ndarray
  targets: np.ndarray
  images: tuple[bytes, ...]
  references: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class FewShotPrompt:
  """One query's model input (unbatched) and what its answer is scored against.

  tokens:      int32 [T]  0, then the prompt with each image a placeholder run
  images:      uint8 [max_images, S, S, 3]  demonstrations' images, then the
               query's; zeros after them
  image_mask:  bool [max_images]  True on the k+1 real images (a prefix)
  references:  the query's reference texts
  kind:        "caption" | "vqa"
  query_index: the query's position in the evaluation split
  demonstration_indices: the demonstrations' positions in the train split
  text:        the prompt as text, one "<image>" per image (for logs)
  """
  tokens: np.ndarray
  images: np.ndarray
  image_mask: np.ndarray
  references: tuple[str, ...]
  kind: str
  query_index: int
  demonstration_indices: tuple[int, ...]
  text: str


# --- reading a task -------------------------------------------------------------

def _vocabulary(vocabulary_path: str) -> seqio.Vocabulary:
  return tokenizer.get_vocabulary(vocabulary_path) if vocabulary_path else tasks.VOCABULARY


def get_task(task_name: str, vocabulary_path: str = "") -> seqio.Task:
  """The registered task `task_name` (re-tokenized for vocabulary_path), sources prepared."""
  name = tasks.with_vocabulary(task_name, vocabulary_path)
  provider = tasks.get_task_or_mixture(name)
  if isinstance(provider, seqio.Mixture):
    raise ValueError(f"{task_name!r} is a mixture; few-shot evaluation reads one task, e.g. "
                     f"one of {sorted(t.name for t in provider.tasks)}.")
  for source_name in tasks.required_sources(name):
    sources.prepare(source_name)
  return provider


def default_eval_split(task_name: str, vocabulary_path: str = "") -> str:
  """'test' if the task has it, else 'validation'; ValueError naming the splits otherwise."""
  splits = list(get_task(task_name, vocabulary_path).splits)
  for split in _EVAL_SPLITS:
    if split in splits:
      return split
  raise ValueError(f"task {task_name!r} has splits {splits}, none of {list(_EVAL_SPLITS)}; "
                   "name the evaluation split (python -m mm1_jax.evaluate --split=NAME).")


def _strings(values) -> tuple[str, ...]:
  return tuple(v.decode("utf-8") if isinstance(v, bytes) else str(v)
               for v in np.asarray(values).reshape(-1))


def _task_example(record: dict, vocabulary: seqio.Vocabulary) -> TaskExample:
  inputs = np.asarray(record.get("inputs", np.zeros(0)), np.int32).reshape(-1)
  targets = np.asarray(record["targets"], np.int32).reshape(-1)
  if len(targets) and targets[-1] == vocabulary.eos_id:
    targets = targets[:-1]
  if "answers" in record:
    references = _strings(record["answers"])
  else:
    references = (vocabulary.decode(targets.tolist()).strip(),)
  images = tuple(bytes(b) for b in np.asarray(record.get("images", [])).reshape(-1))
  return TaskExample(inputs=inputs, targets=targets, images=images, references=references)


@functools.lru_cache(maxsize=8)
def load_task_examples(task_name: str, split: str, vocabulary_path: str = "",
                       max_examples: int | None = None) -> tuple[TaskExample, ...]:
  """The first max_examples (None: all) examples of a task's split, in order.

  Cached per arguments, so the 0/4/8-shot sets of one run read the train
  split once (easy_vqa_vqa's 38,575 train questions take ~10 s on 2 cores).
  """
  task = get_task(task_name, vocabulary_path)
  if split not in task.splits:
    raise ValueError(f"task {task_name!r} has no split {split!r}; it has {list(task.splits)}.")
  dataset = task.get_dataset(sequence_length=None, split=split, shuffle=False, num_epochs=1,
                             use_cached=False)
  if max_examples is not None:
    dataset = dataset.take(max_examples)
  vocabulary = _vocabulary(vocabulary_path)
  examples = []
  # Batched: per-element iteration costs ~1 ms of Python each (40 s for
  # easy_vqa_vqa's train split instead of ~10 s).
  for batch in dataset.ragged_batch(_LOAD_BATCH):
    columns = {key: _rows(value) for key, value in batch.items()}
    for row in range(len(columns["targets"])):
      examples.append(_task_example({key: rows[row] for key, rows in columns.items()},
                                    vocabulary))
  return tuple(examples)


def _rows(batched) -> list[np.ndarray]:
  """A feature batched by ragged_batch -> one numpy array per example."""
  if isinstance(batched, tf.RaggedTensor):
    if batched.ragged_rank == 1:
      return np.split(batched.flat_values.numpy(), batched.row_splits.numpy()[1:-1])
    return [np.asarray(row, dtype=object) for row in batched.to_list()]
  return list(batched.numpy())


def has_answers_feature(task_name: str, split: str, vocabulary_path: str = "") -> bool:
  """Whether the task's examples carry an `answers` list (annotators' answers)."""
  dataset = get_task(task_name, vocabulary_path).get_dataset(
      sequence_length=None, split=split, shuffle=False, use_cached=False)
  return "answers" in dataset.element_spec


# --- the prompt format ------------------------------------------------------------

def _marker_id(vocabulary: seqio.Vocabulary) -> int:
  return tokenizer.special_token_ids(vocabulary)[tasks.IMAGE_MARKER]


def _text_after_last_image(example: TaskExample, vocabulary: seqio.Vocabulary) -> str:
  inputs = example.inputs.tolist()
  marker = _marker_id(vocabulary)
  after = inputs[len(inputs) - inputs[::-1].index(marker):] if marker in inputs else inputs
  return vocabulary.decode(after).strip()


def infer_kind(example: TaskExample, vocabulary: seqio.Vocabulary,
               has_answers_feature: bool = False) -> str:
  """'vqa' when the task gives answer lists or a question follows the image, else 'caption'."""
  if has_answers_feature or _text_after_last_image(example, vocabulary):
    return metrics.VQA
  return metrics.CAPTION


def check_query_example(example: TaskExample, vocabulary: seqio.Vocabulary,
                        task_name: str = "") -> None:
  """ValueError unless the example has image(s), all of them in its prompt."""
  marker = _marker_id(vocabulary)
  in_prompt = int(np.count_nonzero(example.inputs == marker))
  in_answer = int(np.count_nonzero(example.targets == marker))
  if not example.images or in_answer or in_prompt != len(example.images):
    raise ValueError(
        f"task {task_name!r}: few-shot evaluation needs examples whose image(s) are in the "
        f"prompt (inputs) and whose targets are the reference text; this one has "
        f"{len(example.images)} image(s), {in_prompt} marker(s) in inputs and {in_answer} in "
        "targets (interleaved-document and text-only tasks cannot be evaluated this way).")


def demonstration_ids(example: TaskExample) -> np.ndarray:
  """int32 [n]: a demonstration as training shows it: inputs then targets (no EOS)."""
  return np.concatenate([example.inputs, example.targets]).astype(np.int32)


def sample_demonstrations(num_train: int, num_shots: int, seed: int,
                          query_index: int) -> tuple[int, ...]:
  """num_shots distinct train indices for query `query_index` (deterministic)."""
  if num_shots > num_train:
    raise ValueError(f"{num_shots}-shot prompts need {num_shots} demonstrations but the train "
                     f"split has {num_train} examples.")
  rng = np.random.default_rng([seed, query_index])
  return tuple(int(i) for i in rng.choice(num_train, size=num_shots, replace=False))


def check_image_capacity(num_shots: int, images_per_example: int, max_images: int) -> None:
  """ValueError naming k and max_images when a k-shot prompt's images do not fit."""
  needed = (num_shots + 1) * images_per_example
  if needed > max_images:
    raise ValueError(
        f"{num_shots}-shot prompts hold {needed} images ({num_shots} demonstrations + the "
        f"query, {images_per_example} image(s) each) but model.max_images is {max_images}; "
        f"use num_shots <= {max_images // images_per_example - 1} or set "
        f"model.max_images >= {needed}.")


@functools.lru_cache(maxsize=16)
def _image_decoder(image_size: int, policy: str, pad_color: tuple[float, ...],
                   image_split: SplitScheme | None):
  """A compiled decoder for [k] encoded images (any k): (images [n, S, S, 3],
  layouts int32 [k, 2]), as the training pipeline decodes them."""
  @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
  def decode(encoded):
    if image_split is not None:
      return image_split_ops.decode_and_split(encoded, image_size, policy, image_split,
                                              pad_color=pad_color)
    images = image_ops.decode_and_resize(encoded, image_size, policy, pad_color=pad_color)
    return images, tf.ones([tf.shape(encoded)[0], 2], tf.int32)
  return decode


def decode_images(encoded: Sequence[bytes], model: MM1Config, policy: str = "stretch",
                  image_split: SplitScheme | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(images uint8 [n, S, S, 3], layouts int32 [k, 2]): k images decoded and
  resized (or split into n sub-images) as the training pipeline does."""
  size = model.encoder.image_size
  if not encoded:
    return np.zeros((0, size, size, 3), np.uint8), np.zeros((0, 2), np.int32)
  decoder = _image_decoder(size, policy, tuple(float(c) for c in model.encoder.image_mean),
                           image_split)
  images, layouts = decoder(tf.constant(list(encoded), tf.string))
  return images.numpy(), layouts.numpy()


# --- the evaluation set -----------------------------------------------------------

class FewShotEvaluationSet:
  """The k-shot prompts of a task's evaluation split, built lazily per query.

  task_name: a registered SeqIO task (mm1_jax.data.tasks registers the
  bundled ones; import yours first). model: the MM1Config the prompts are
  for (resolution, max_images, num_image_tokens, placeholder id).
  num_shots: k >= 0. seed: the demonstration sampling seed.
  eval_split: default 'test', else 'validation'. train_split: where
  demonstrations come from. max_queries: evaluate only the first N.
  image_policy / image_start_end / vocabulary_path / image_split (a
  SplitScheme, None = not split): as config.data's
  image_policy / image_start_end / vocabulary of the run that trained the
  model. kind: 'caption' | 'vqa'; None infers it (module docstring).

  len(s) queries; s[i] -> FewShotPrompt; s[i:j] -> list; iter(s);
  s.references -> every query's references; s.kind.
  Raises ValueError when k+1 images exceed model.max_images.
  """

  def __init__(self, task_name: str, model: MM1Config, num_shots: int, seed: int = 0, *,
               eval_split: str | None = None, train_split: str = "train",
               max_queries: int | None = None, image_policy: str = "stretch",
               image_start_end: bool = False, vocabulary_path: str = "",
               kind: str | None = None, image_split: SplitScheme | None = None):
    if num_shots < 0:
      raise ValueError(f"num_shots must be >= 0, got {num_shots}.")
    self.task_name, self.model, self.num_shots, self.seed = task_name, model, num_shots, seed
    self.image_policy, self.image_split = image_policy, image_split
    self.vocabulary = _vocabulary(vocabulary_path)
    # The converter checks the vocabulary against the model (placeholder id,
    # vocab size) and gives the ids of the image runs, exactly as in training.
    converter = MultimodalFeatureConverter(model, self.vocabulary, seq_len=1, pack=False,
                                           image_start_end=image_start_end,
                                           image_split=image_split)
    self._marker_id, self._start_id, self._end_id = (converter.marker_id, converter.start_id,
                                                     converter.end_id)
    self._row_end_id = converter.row_end_id
    self._crop_indicator_base = converter.crop_indicator_base
    self.eval_split = eval_split or default_eval_split(task_name, vocabulary_path)
    self.queries = load_task_examples(task_name, self.eval_split, vocabulary_path, max_queries)
    if not self.queries:
      raise ValueError(f"task {task_name!r} split {self.eval_split!r} has no examples.")
    self.train = load_task_examples(task_name, train_split, vocabulary_path) if num_shots else ()
    first = self.queries[0]
    check_query_example(first, self.vocabulary, task_name)
    check_image_capacity(num_shots, len(first.images) * scheme_slots(image_split),
                         model.max_images)
    self.kind = kind or infer_kind(
        first, self.vocabulary, has_answers_feature(task_name, self.eval_split, vocabulary_path))
    if self.kind not in metrics.KINDS:
      raise ValueError(f"unknown evaluation kind {self.kind!r}; choose one of {metrics.KINDS}.")

  def __len__(self) -> int:
    return len(self.queries)

  @property
  def references(self) -> list[tuple[str, ...]]:
    return [query.references for query in self.queries]

  def __getitem__(self, index):
    if isinstance(index, slice):
      return [self.prompt(i) for i in range(*index.indices(len(self)))]
    return self.prompt(index)

  def __iter__(self) -> Iterator[FewShotPrompt]:
    return (self.prompt(i) for i in range(len(self)))

  def prompt(self, query_index: int) -> FewShotPrompt:
    """The k-shot prompt of query `query_index` (module docstring's layout)."""
    if not -len(self) <= query_index < len(self):
      raise IndexError(f"query {query_index} of {len(self)}.")
    query_index %= len(self)
    query = self.queries[query_index]
    check_query_example(query, self.vocabulary, self.task_name)
    chosen = sample_demonstrations(len(self.train), self.num_shots, self.seed, query_index)
    demonstrations = [self.train[i] for i in chosen]
    for demonstration in demonstrations:
      check_query_example(demonstration, self.vocabulary, self.task_name)
    ids = self.prompt_ids(query, demonstrations)
    encoded = [image for example in demonstrations + [query] for image in example.images]
    decoded, layouts = decode_images(encoded, self.model, self.image_policy, self.image_split)
    if len(decoded) > self.model.max_images:  # Examples with more images than the first.
      raise ValueError(f"query {query_index}: its {self.num_shots}-shot prompt holds "
                       f"{len(decoded)} image slots ({len(encoded)} images) but "
                       f"model.max_images is {self.model.max_images}; use fewer shots or a "
                       "larger max_images.")
    expanded = ids
    if self.image_split is not None:
      expanded, _, _, _ = expand_split_markers(
          ids, np.zeros_like(ids), self._marker_id, layouts, self.image_split,
          self._row_end_id, crop_indicator_base=self._crop_indicator_base)
    expanded, _ = packing.expand_image_markers(expanded, np.zeros_like(expanded),
                                               self._marker_id, self.model.num_image_tokens,
                                               self._start_id, self._end_id)
    size = self.model.encoder.image_size
    images = np.zeros((self.model.max_images, size, size, 3), np.uint8)
    images[:len(decoded)] = decoded
    image_mask = np.arange(self.model.max_images) < len(decoded)
    return FewShotPrompt(
        tokens=np.concatenate([[BOS_ID], expanded]).astype(np.int32),
        images=images, image_mask=image_mask, references=query.references, kind=self.kind,
        query_index=query_index, demonstration_indices=chosen, text=self.decode(ids))

  def prompt_ids(self, query: TaskExample, demonstrations: Sequence[TaskExample]
                 ) -> np.ndarray:
    """int32 [n]: the demonstrations (inputs then targets), then the query's inputs;
    one <image> marker id per image."""
    return np.concatenate([demonstration_ids(d) for d in demonstrations]
                          + [query.inputs]).astype(np.int32)

  def decode(self, ids) -> str:
    """Text of prompt or generated ids."""
    return self.vocabulary.decode([int(i) for i in ids])

  @property
  def stop_ids(self) -> tuple[int, ...]:
    """Ids that end a generated answer (the first also ends the decoding loop)."""
    return stop_token_ids(self.vocabulary)

  def answer(self, generation: str) -> str:
    """The answer scored in a decoded generation (already cut at stop_ids)."""
    return truncate_generation(generation, self.kind)


# --- the chat format ----------------------------------------------------------------

# The instructions of a 0-shot chat query (LLaVA's short-answer VQA prompt).
CHAT_VQA_INSTRUCTION = conversations.SHORT_ANSWER_INSTRUCTION  # As the bundled conversations.
CHAT_CAPTION_INSTRUCTION = "Describe the image briefly."
# The labels of the few-shot VQA format ("<image> Question: ... Answer:").
_QUESTION_LABELS = re.compile(r"^Question:\s*|\s*Answer:$")


def vqa_question(example: TaskExample, vocabulary: seqio.Vocabulary) -> str:
  """The question of a VQA example: its prompt text without images, whitespace
  collapsed, and without the few-shot format's "Question:" / "Answer:" labels.
  " <image> Question: what color is the shape? Answer:" -> "what color is the shape?"."""
  return _QUESTION_LABELS.sub("", question_text(example, vocabulary)).strip()


def chat_query_turns(example: TaskExample, vocabulary: seqio.Vocabulary, kind: str
                     ) -> list[conversations.Turn]:
  """The 0-shot chat conversation of a query: one user turn, an "<image>\\n" per
  image (LLaVA's layout), then the question and CHAT_VQA_INSTRUCTION on lines of
  their own (VQA), or CHAT_CAPTION_INSTRUCTION (captions)."""
  markers = (conversations.IMAGE_MARKER + "\n") * len(example.images)
  if kind == metrics.VQA:
    # Written as a sentence, as a user types it and as the bundled
    # conversations ask (easy-vqa's questions are lower case): a model tuned on
    # a few hundred conversations is sensitive to it (benchmarks/RESULTS.md).
    question = vqa_question(example, vocabulary)
    text = f"{markers}{question[:1].upper()}{question[1:]}\n{CHAT_VQA_INSTRUCTION}"
  else:
    text = markers + CHAT_CAPTION_INSTRUCTION
  return [conversations.Turn(conversations.USER, text)]


class ChatEvaluationSet(FewShotEvaluationSet):
  """0-shot prompts of a task in a chat template: an instruction-tuned model's format.

  Each query is chat_query_turns(query) rendered by the template with the
  generation prompt (the assistant header) at its end, then laid out as
  FewShotEvaluationSet lays out its prompts (image runs, the leading 0).
  Answers end at the template's stop ids (or EOS) and are scored as they
  are, outer whitespace stripped (the VQA metric normalises them).

  chat_template: a conversations.TEMPLATES name, "" = the vocabulary's own
  (data.chat_template of the run). Other arguments as FewShotEvaluationSet's.
  """

  def __init__(self, task_name: str, model: MM1Config, seed: int = 0, *,
               chat_template: str = "", eval_split: str | None = None,
               max_queries: int | None = None, image_policy: str = "stretch",
               image_start_end: bool = False, vocabulary_path: str = "",
               kind: str | None = None, image_split: SplitScheme | None = None):
    super().__init__(task_name, model, 0, seed, eval_split=eval_split, max_queries=max_queries,
                     image_policy=image_policy, image_start_end=image_start_end,
                     vocabulary_path=vocabulary_path, kind=kind, image_split=image_split)
    self.template = conversations.get_template(chat_template, self.vocabulary)

  def prompt_ids(self, query: TaskExample, demonstrations: Sequence[TaskExample]
                 ) -> np.ndarray:
    assert not demonstrations, "chat prompts are 0-shot"
    turns = chat_query_turns(query, self.vocabulary, self.kind)
    return self.template.render(turns, add_generation_prompt=True).tokens

  def decode(self, ids) -> str:
    return self.template.decode(ids)

  @property
  def stop_ids(self) -> tuple[int, ...]:
    # The end of the assistant turn first: it ends the decoding loop.
    return tuple(dict.fromkeys(self.template.stop_ids + (self.vocabulary.eos_id,)))

  def answer(self, generation: str) -> str:
    return generation.removeprefix(self.template.answer_prefix).strip()


def stack_prompts(prompts: Sequence[FewShotPrompt], length: int | None = None,
                  pad_side: str = "right") -> dict[str, np.ndarray]:
  """Prompts -> one batch of the model's inputs.

  length: L >= the longest prompt (None: the longest). pad_side: 'right'
  (prompt at positions 0..n-1) or 'left' (prompts end together at L-1).
  Returns tokens int32 [B, L] (0 on padding), positions int32 [B, L] (0..n-1
  over each prompt, 0 on padding), segment_ids int32 [B, L] (1 on the
  prompt, 0 on padding), lengths int32 [B], images uint8 [B, max_images, S,
  S, 3], image_mask bool [B, max_images].
  """
  if not prompts:
    raise ValueError("stack_prompts needs at least one prompt.")
  if pad_side not in ("right", "left"):
    raise ValueError(f"pad_side must be 'right' or 'left', got {pad_side!r}.")
  lengths = np.array([len(p.tokens) for p in prompts], np.int32)
  length = int(lengths.max()) if length is None else length
  if length < lengths.max():
    raise ValueError(f"length {length} is shorter than the longest prompt ({lengths.max()}).")
  batch = {key: np.zeros((len(prompts), length), np.int32)
           for key in ("tokens", "positions", "segment_ids")}
  for row, prompt in enumerate(prompts):
    n = len(prompt.tokens)
    span = slice(0, n) if pad_side == "right" else slice(length - n, length)
    batch["tokens"][row, span] = prompt.tokens
    batch["positions"][row, span] = np.arange(n)
    batch["segment_ids"][row, span] = 1
  batch["lengths"] = lengths
  batch["images"] = np.stack([p.images for p in prompts])
  batch["image_mask"] = np.stack([p.image_mask for p in prompts])
  return batch


def stop_token_ids(vocabulary: seqio.Vocabulary | None = None) -> tuple[int, ...]:
  """Ids that end an answer when generated: EOS, and the start of a next image
  (<image>, <image_start>): the model moving on to another demonstration."""
  vocabulary = vocabulary or tasks.VOCABULARY
  special = tokenizer.special_token_ids(vocabulary)
  return (vocabulary.eos_id, special["<image>"], special["<image_start>"])


# Where a generated answer ends: the model goes on with the next
# demonstration-like segment after it.
_SEGMENT_BOUNDARY = re.compile(r"<image>|<image_start>|\n|Question:|Answer:")


def truncate_generation(text: str, kind: str) -> str:
  """The answer part of a greedy continuation.

  Cut at the first image marker, newline, "Question:" or "Answer:" (the
  start of another demonstration), then for VQA at the first period
  (answers are words or phrases) and for captions after the first period
  (one sentence, as the demonstrations are). Outer whitespace stripped.
  "red <image> Question: ..." -> "red"; " a red circle. Here is" -> "a red circle.".
  """
  text = _SEGMENT_BOUNDARY.split(text, maxsplit=1)[0]
  head, period, _ = text.partition(".")
  text = head if kind == metrics.VQA else head + period
  return text.strip()


# --- question-only prior baseline -------------------------------------------------

def question_text(example: TaskExample, vocabulary: seqio.Vocabulary) -> str:
  """The prompt without its images, whitespace collapsed: the question string."""
  marker = _marker_id(vocabulary)
  text = vocabulary.decode([i for i in example.inputs.tolist() if i != marker])
  return " ".join(text.split())


@dataclasses.dataclass(frozen=True)
class QuestionPrior:
  """Blind VQA baseline: the most frequent train answer of each question string.

  answers: question string -> its most frequent answer (ties: the
  alphabetically first); fallback: the most frequent answer overall, for
  questions the train split never asks.
  """
  answers: dict[str, str]
  fallback: str

  def predict(self, question: str) -> str:
    return self.answers.get(question, self.fallback)


def _most_frequent(counts: collections.Counter) -> str:
  return min(counts, key=lambda answer: (-counts[answer], answer))


def fit_question_prior(train_examples: Sequence[TaskExample],
                       vocabulary: seqio.Vocabulary) -> QuestionPrior:
  """Counts every reference answer of each train question string."""
  if not train_examples:
    raise ValueError("fit_question_prior needs train examples.")
  per_question = collections.defaultdict(collections.Counter)
  overall = collections.Counter()
  texts = {}  # Prompt ids -> question text: a few hundred distinct prompts, decoded once.
  for example in train_examples:
    key = example.inputs.tobytes()
    if key not in texts:
      texts[key] = question_text(example, vocabulary)
    per_question[texts[key]].update(example.references)
    overall.update(example.references)
  return QuestionPrior({q: _most_frequent(c) for q, c in per_question.items()},
                       _most_frequent(overall))


def question_prior_baseline(task_name: str, *, eval_split: str | None = None,
                            train_split: str = "train", max_queries: int | None = None,
                            vocabulary_path: str = "") -> dict[str, float]:
  """The question-only prior scored like the model: {"vqa_accuracy", "exact_match"}.

  What a model gets without looking at the image (the answer bias of the
  questions). Same queries as FewShotEvaluationSet with the same arguments.
  """
  vocabulary = _vocabulary(vocabulary_path)
  eval_split = eval_split or default_eval_split(task_name, vocabulary_path)
  prior = fit_question_prior(load_task_examples(task_name, train_split, vocabulary_path),
                             vocabulary)
  queries = load_task_examples(task_name, eval_split, vocabulary_path, max_queries)
  predictions = [prior.predict(question_text(q, vocabulary)) for q in queries]
  return metrics.score_predictions(metrics.VQA, predictions, [q.references for q in queries])
