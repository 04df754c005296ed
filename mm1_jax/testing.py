"""Synthetic batches that honour the model's batch contract (tests, benchmarks)."""

from __future__ import annotations

import numpy as np

from mm1_jax.models.config import MM1Config


def random_multimodal_batch(config: MM1Config, batch_size: int, length: int, seed: int = 0,
                            max_images_per_row: int | None = None) -> dict[str, np.ndarray]:
  """Random tokens with placeholder runs for 0..max_images_per_row real images.

  Returns tokens int32 [B, T], images uint8 [B, max_images, H, W, 3],
  image_mask bool [B, max_images]. Each image's run of num_image_tokens
  placeholders sits at a random offset, runs never touch (so each run is
  exactly one image).
  """
  rng = np.random.default_rng(seed)
  num_image_tokens, placeholder = config.num_image_tokens, config.image_placeholder_id
  limit = min(config.max_images, max_images_per_row or config.max_images,
              length // (num_image_tokens + 1))
  # Text ids avoid the placeholder id (and the few special ids below it).
  tokens = rng.integers(placeholder + 1, config.llm.vocab_size, (batch_size, length))
  image_mask = np.zeros((batch_size, config.max_images), dtype=bool)
  for row in range(batch_size):
    num_images = int(rng.integers(0, limit + 1))
    image_mask[row, :num_images] = True
    slack = length - num_images * (num_image_tokens + 1)
    # Random gaps (>= 1 text token before each image) that fit in the row.
    gaps = np.diff(np.sort(rng.integers(0, slack + 1, num_images)), prepend=0)
    start = 0
    for gap in gaps:
      start += int(gap) + 1
      tokens[row, start:start + num_image_tokens] = placeholder
      start += num_image_tokens
  size = config.encoder.image_size
  images = rng.integers(0, 256, (batch_size, config.max_images, size, size, 3), dtype=np.uint8)
  return {"tokens": tokens.astype(np.int32), "images": images, "image_mask": image_mask}


def random_params(config: MM1Config, seed: int = 0, stddev: float = 0.05) -> dict:
  """Random parameters of MM1Model(config), built on the host (no compile).

  Norm scales are 1, everything else is N(0, stddev): not the model's
  initialisation, but random enough for tests of the computation, and it
  costs no compilation of the (slow to compile) initialisers. Returns the
  'params' tree of numpy float arrays.
  """
  import flax.linen as nn
  import jax

  from mm1_jax.models.multimodal import MM1Model

  model, size = MM1Model(config), config.encoder.image_size
  abstract = jax.eval_shape(lambda: nn.unbox(model.init(
      jax.random.key(0), np.zeros((1, 4), np.int32),
      np.zeros((1, config.max_images, size, size, 3), np.uint8),
      np.zeros((1, config.max_images), bool))))["params"]
  return random_tree(abstract, seed, stddev)


def random_tree(abstract, seed: int = 0, stddev: float = 0.05) -> dict:
  """numpy arrays shaped like the abstract params tree `abstract` (e.g.
  jax.eval_shape of an init): norm scales 1, everything else N(0, stddev)."""
  import jax

  rng = np.random.default_rng(seed)

  def one(path, leaf):
    if getattr(path[-1], "key", None) == "scale":
      return np.ones(leaf.shape, leaf.dtype)
    return (stddev * rng.standard_normal(leaf.shape)).astype(leaf.dtype)

  return jax.tree_util.tree_map_with_path(one, abstract)


def write_random_checkpoint(experiment, workdir: str, step: int) -> None:
  """Writes a train-state checkpoint of `experiment` (an Experiment) at `step`
  into workdir: random_params and a zero optimizer state, built on the host
  (compiling the real init is slow)."""
  import jax

  from mm1_jax.training import checkpoint as checkpoint_lib
  from mm1_jax.training import trainer

  train_step, _ = trainer.build(experiment)
  opt_state = jax.tree.map(lambda leaf: np.zeros(leaf.shape, leaf.dtype),
                           train_step.abstract_state["opt_state"])
  state = {"step": np.int32(step), "params": random_params(experiment.model),
           "opt_state": opt_state, "rng": jax.random.key(0)}
  with checkpoint_lib.Checkpointer(workdir, save_every=1, keep=1) as checkpointer:
    checkpointer.save(step, state, force=True)
