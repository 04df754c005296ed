"""Held-out text perplexity: is the LLM's text ability kept through multimodal training?

    result = text_perplexity(params, model_config, "shakespeare_text")
    result["perplexity"], result["num_tokens"]

MM1 keeps 10% text-only data in pre-training to keep the model's text
ability; this measures it instead of assuming it. The task's held-out split
(held_out_split: "validation", else "test"; shakespeare_text: "validation",
the plays Julius Caesar and The Tempest, never trained on) goes through the
training input pipeline (tokenised and laid out exactly as in training, one
passage per sequence, no packing, in order, once), and the score is
exp(mean next-token cross-entropy over every target token), the loss
weights' tokens (padding excluded). A passage longer than seq_len is cut
there, as training cuts it; the counts say how many.

A conversation task (chatterbot_chat: text-only dialogues, "test" held out)
is rendered with the run's chat template and scored on its assistant turns,
exactly the tokens a chat fine-tuning run trains on.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mm1_jax.data.config import InputConfig
from mm1_jax.models.config import MM1Config
from mm1_jax.models.multimodal import MM1Model

HELD_OUT_SPLITS = ("validation", "test")  # The first one a task has is scored.


def held_out_split(task: str, vocabulary_path: str = "") -> str:
  """The split perplexity scores: "validation" if the task has one, else
  "test"; ValueError naming the task's splits when it has neither."""
  from mm1_jax.data import tasks as tasks_lib  # SeqIO: only for evaluations that read data.
  splits = tasks_lib.get_task_or_mixture(tasks_lib.with_vocabulary(task, vocabulary_path)).splits
  for split in HELD_OUT_SPLITS:
    if split in splits:
      return split
  raise ValueError(f"perplexity task {task!r} has no held-out split (it has {sorted(splits)}, "
                   f"none of {list(HELD_OUT_SPLITS)}); perplexity is measured on text held out "
                   "of training, e.g. shakespeare_text.")


@functools.lru_cache(maxsize=8)
def _sum_nll(model_config: MM1Config):
  """A jitted (params, batch) -> (sum of token NLL, sum of weights)."""
  model = MM1Model(model_config)

  @jax.jit
  def run(params, batch):
    logits, _ = model.apply({"params": params}, batch["decoder_input_tokens"], batch["images"],
                            batch["image_mask"], batch["decoder_positions"],
                            batch["decoder_segment_ids"])
    logits = logits.astype(jnp.float32)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    target = jnp.take_along_axis(log_probs, batch["decoder_target_tokens"][..., None], -1)[..., 0]
    weights = batch["decoder_loss_weights"].astype(jnp.float32)
    return -jnp.sum(jnp.where(weights > 0, target * weights, 0.0)), jnp.sum(weights)
  return run


def text_perplexity(params: Any, model_config: MM1Config, task: str, *,
                    split: str | None = None, seq_len: int = 256, batch_size: int = 8,
                    max_sequences: int | None = None, vocabulary_path: str = "",
                    chat_template: str = "") -> dict[str, Any]:
  """Perplexity of a text task's held-out split.

  params: the model's 'params' tree. task: a registered SeqIO task or
  mixture of text (shakespeare_text) or of text conversations
  (chatterbot_chat, rendered with chat_template: the run's
  data.chat_template). split: default held_out_split(task). max_sequences:
  the first N passages (None: all). Returns {"perplexity", "cross_entropy"
  (nats per token), "num_tokens", "num_sequences", "num_truncated" (cut at
  seq_len), "num_skipped" (bad records, as training counts them)}.
  Raises ValueError when the split yields no target token.
  """
  from mm1_jax.data import pipeline  # TensorFlow: only for evaluations that read data.

  split = split or held_out_split(task, vocabulary_path)
  config = InputConfig(mixture=task, split=split, batch_size=batch_size, seq_len=seq_len,
                       pack=False, shuffle=False, num_epochs=1, vocabulary=vocabulary_path,
                       chat_template=chat_template)
  source = pipeline.MultimodalInput(config, model_config, process_index=0, process_count=1)
  run = _sum_nll(model_config)
  total_nll, total_tokens, num_sequences = 0.0, 0.0, 0
  try:
    for batch in source:
      rows = np.flatnonzero(batch["decoder_segment_ids"].max(axis=1) > 0)
      if max_sequences is not None:
        rows = rows[:max(0, max_sequences - num_sequences)]
      if not len(rows):
        break
      mask = np.zeros(len(batch["decoder_segment_ids"]), bool)
      mask[rows] = True
      batch = {key: np.where(mask.reshape((-1,) + (1,) * (value.ndim - 1)), value, 0)
               for key, value in batch.items()}
      nll, tokens = run(params, batch)
      total_nll, total_tokens = total_nll + float(nll), total_tokens + float(tokens)
      num_sequences += len(rows)
      if max_sequences is not None and num_sequences >= max_sequences:
        break
    counts = source.health.counts().values()
    truncated = sum(c["truncated"] for c in counts)
    skipped = sum(sum(c["skipped"].values()) for c in counts)
  finally:
    source.close()
  if not total_tokens:
    raise ValueError(f"perplexity: task {task!r} split {split!r} gave no target tokens; name a "
                     "text task with a held-out split, e.g. shakespeare_text (validation).")
  cross_entropy = total_nll / total_tokens
  return {"perplexity": math.exp(cross_entropy), "cross_entropy": cross_entropy,
          "num_tokens": int(total_tokens), "num_sequences": num_sequences,
          "num_truncated": int(truncated), "num_skipped": int(skipped)}
