"""KV-cache decoding of MM1 models: greedy, sampling and beam search.

    generator = Generator(model_config, DecodeConfig(method="beam", num_beams=4), mesh)
    prompts = make_prompts([tokens_a, tokens_b], [images_a, images_b], model_config)
    output = generator(params, prompts)      # output.tokens [B, max_new_tokens]

Layout. Prompts of different lengths share a batch RIGHT-padded: row b's
prompt is tokens[b, :lengths[b]]. The cache has a fixed S = T +
max_new_tokens slots per row, and slot s always holds position s of its row
(see layers.KVCache): the prefill writes slots 0..T-1 (padding included),
and the n-th new token of row b goes to slot lengths[b] + n, overwriting
padding before any token can attend to it. So RoPE positions continue per
row, no left-padding offsets are needed, and a row decodes exactly as it
would alone (tested).

A generate call runs two jitted functions: the prefill, and a
lax.while_loop of decode steps. The prefill compiles once per prompt-batch
shape (and max_new_tokens, which sizes the cache); the loop once per shape
and (method, max_new_tokens, num_beams). Temperature, top-k, top-p, EOS,
pad and length penalty are traced values: changing them does not
recompile. Both compilations are cached per model config and mesh, so
Generators that differ only in those settings share them. Decoding stops
at max_new_tokens or when every row has ended with EOS; a row that emitted
EOS gets pad_id afterwards, the others go on.

Under a mesh the batch and the cache are split by the logical-axis rules of
mm1_jax/sharding.py ('cache_batch', 'cache_sequence', 'cache_kv_heads',
'cache_head_dim').

MoE models with `dispatch="capacity"` share expert capacity between the
tokens of a row, so a prompt's logits can depend on the padding of its
batch when tokens are dropped; "dropless" (the default) does not.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mm1_jax import sharding
from mm1_jax.data.batch import check_image_placeholders
from mm1_jax.models import decoder
from mm1_jax.models.config import MM1Config
from mm1_jax.models.multimodal import MM1Model
from mm1_jax.typed_config import ConfigError

METHODS = ("greedy", "sample", "beam")


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
  """How to choose the continuation.

  method: "greedy" (argmax), "sample" (temperature, then top-k, then top-p
  filtering of the distribution) or "beam" (num_beams beams, scored by the
  sum of log-probabilities divided by length ** length_penalty; 0 = plain
  sum). eos_id ends a row; pad_id fills it afterwards (defaults: the
  bundled vocabulary's </s> and <pad>).
  """
  max_new_tokens: int = 32
  method: str = "greedy"
  temperature: float = 1.0
  top_k: int = 0  # 0: no top-k filtering.
  top_p: float = 1.0  # 1.0: no nucleus filtering.
  num_beams: int = 4
  length_penalty: float = 0.0
  eos_id: int = 1
  pad_id: int = 0

  def validate(self, vocab_size: int) -> None:
    """Raises ConfigError naming the first field that cannot work."""
    checks = [
        (self.method in METHODS, "method", f"unknown method {self.method!r}; use one of {METHODS}."),
        (self.max_new_tokens >= 1, "max_new_tokens", f"must be >= 1, got {self.max_new_tokens}."),
        (self.temperature > 0, "temperature",
         f"must be > 0, got {self.temperature} (use method='greedy' for argmax)."),
        (0 <= self.top_k <= vocab_size, "top_k", f"must be in [0, {vocab_size}], got {self.top_k}."),
        (0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}."),
        (1 <= self.num_beams <= vocab_size, "num_beams",
         f"must be in [1, {vocab_size}], got {self.num_beams}."),
        (0 <= self.eos_id < vocab_size, "eos_id", f"{self.eos_id} is outside the vocabulary."),
        (0 <= self.pad_id < vocab_size, "pad_id", f"{self.pad_id} is outside the vocabulary."),
    ]
    for ok, field, message in checks:
      if not ok:
        raise ConfigError(f"decode.{field}: {message}")


class Prompts(NamedTuple):
  """A batch of right-padded prompts (host numpy arrays).

  tokens: int32 [B, T], row b's prompt in tokens[b, :lengths[b]], pad_id
  after; lengths: int32 [B] (>= 1); images: uint8 [B, max_images, H, W, 3];
  image_mask: bool [B, max_images] (real images first).
  """
  tokens: np.ndarray
  lengths: np.ndarray
  images: np.ndarray
  image_mask: np.ndarray


class DecodeOutput(NamedTuple):
  """tokens: int32 [B, max_new_tokens], the continuation, EOS included and
  pad_id after it; lengths: int32 [B], tokens generated (EOS included);
  scores: float32 [B], the sum of the model's log-probabilities of those
  tokens (before temperature / top-k / top-p)."""
  tokens: np.ndarray
  lengths: np.ndarray
  scores: np.ndarray


def make_prompts(token_lists: Sequence[Sequence[int]],
                 image_lists: Sequence[np.ndarray | None] | None, config: MM1Config,
                 pad_id: int = 0, length: int | None = None) -> Prompts:
  """Right-pads prompts into one batch.

  token_lists: per prompt, its token ids with each image already expanded
  to its placeholder run (as the data converter does); image_lists: per
  prompt uint8 [k, H, W, 3] (k <= max_images, in placeholder order) or None;
  length: T (default: the longest prompt). Raises ValueError naming the
  prompt that is empty, too long, or whose placeholders do not match its
  images.
  """
  batch = len(token_lists)
  if batch == 0:
    raise ValueError("make_prompts needs at least one prompt.")
  image_lists = list(image_lists) if image_lists is not None else [None] * batch
  if len(image_lists) != batch:
    raise ValueError(f"{batch} prompts but {len(image_lists)} image lists.")
  lengths = np.array([len(t) for t in token_lists], np.int32)
  length = int(lengths.max()) if length is None else length
  size = config.encoder.image_size
  tokens = np.full((batch, length), pad_id, np.int32)
  images = np.zeros((batch, config.max_images, size, size, 3), np.uint8)
  image_mask = np.zeros((batch, config.max_images), bool)
  for row, (row_tokens, row_images) in enumerate(zip(token_lists, image_lists)):
    if not 1 <= lengths[row] <= length:
      raise ValueError(f"prompt {row} has {lengths[row]} tokens; need 1 to {length}.")
    tokens[row, :lengths[row]] = row_tokens
    if row_images is not None and len(row_images):
      row_images = np.asarray(row_images, np.uint8)
      if len(row_images) > config.max_images or row_images.shape[1:] != (size, size, 3):
        raise ValueError(f"prompt {row}: images must be uint8 [k <= {config.max_images}, "
                         f"{size}, {size}, 3], got {row_images.shape}.")
      images[row, :len(row_images)] = row_images
      image_mask[row, :len(row_images)] = True
  try:
    check_image_placeholders(tokens, image_mask, config.num_image_tokens,
                             config.image_placeholder_id)
  except ValueError as error:
    raise ValueError(f"prompt {str(error).removeprefix('row ')}") from None
  return Prompts(tokens, lengths, images, image_mask)


# ---------------------------------------------------------------------------
# Choosing tokens.


class Settings(NamedTuple):
  """The DecodeConfig fields that are traced values (scalars) in the loop."""
  temperature: jax.Array
  top_k: jax.Array
  top_p: jax.Array
  eos_id: jax.Array
  pad_id: jax.Array
  length_penalty: jax.Array

  @classmethod
  def of(cls, config: DecodeConfig) -> "Settings":
    return cls(np.float32(config.temperature), np.int32(config.top_k), np.float32(config.top_p),
               np.int32(config.eos_id), np.int32(config.pad_id),
               np.float32(config.length_penalty))


def filter_logits(logits: jax.Array, temperature: jax.Array, top_k: jax.Array,
                  top_p: jax.Array) -> jax.Array:
  """The sampling distribution's logits: divided by the temperature, then
  only the top_k largest kept (0: all; ties with the k-th stay), then only
  the fewest most likely of those whose probability reaches top_p (1: all;
  the most likely token always stays). Dropped tokens get -inf.

  logits: float32 [B, V]; the settings are scalars (traced or not): one
  sort serves both filters, so k need not be static.
  """
  logits = logits / temperature
  descending = -jnp.sort(-logits, axis=-1)
  vocab = logits.shape[-1]
  kth = jax.lax.dynamic_index_in_dim(descending, jnp.clip(top_k - 1, 0, vocab - 1), axis=-1)
  k_threshold = jnp.where(top_k > 0, kth, -jnp.inf)  # [B, 1]
  descending = jnp.where(descending >= k_threshold, descending, -jnp.inf)
  probs = jax.nn.softmax(descending, axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs  # Of the more likely tokens.
  p_threshold = jnp.min(jnp.where(mass_before < top_p, descending, jnp.inf), axis=-1,
                        keepdims=True)
  # top_p = 1 keeps everything left (rounding could make mass_before reach 1).
  threshold = jnp.maximum(k_threshold, jnp.where(top_p < 1, p_threshold, -jnp.inf))
  return jnp.where(logits < threshold, -jnp.inf, logits)


def choose_tokens(logits: jax.Array, rng: jax.Array, settings: Settings,
                  greedy: bool) -> jax.Array:
  """The next token of every row: int32 [B]. logits: float32 [B, V]."""
  if greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  filtered = filter_logits(logits, settings.temperature, settings.top_k, settings.top_p)
  return jax.random.categorical(rng, filtered, axis=-1).astype(jnp.int32)


# ---------------------------------------------------------------------------
# The decoding loops (traced inside the jitted decode function).


def _step_tokens(tokens: jax.Array, step: jax.Array) -> jax.Array:
  """Column `step` of tokens [..., max_new] -> [...]."""
  return jax.lax.dynamic_index_in_dim(tokens, step, axis=-1, keepdims=False)


def _sample_loop(decode_step, logits, cache, prompt_lengths, rng, settings: Settings,
                 greedy: bool, max_new: int):
  """Greedy / sampled decoding of B rows.

  decode_step(tokens [B], positions [B], cache) -> (logits [B, V], cache);
  logits: the prefill's [B, V]; prompt_lengths: int [B].
  Returns tokens int32 [B, max_new], lengths int32 [B], scores float32 [B].
  """
  batch = logits.shape[0]

  def emit(state):
    """Chooses column `step` of the tokens from state['logits']."""
    rng, key = jax.random.split(state["rng"])
    chosen = choose_tokens(state["logits"], key, settings, greedy)
    log_probs = jax.nn.log_softmax(state["logits"], axis=-1)
    chosen_log_prob = jnp.take_along_axis(log_probs, chosen[:, None], axis=-1)[:, 0]
    active = ~state["done"]
    token = jnp.where(active, chosen, settings.pad_id)
    return {**state, "rng": rng, "step": state["step"] + 1,
            "tokens": jax.lax.dynamic_update_index_in_dim(state["tokens"], token,
                                                          state["step"], axis=1),
            "lengths": state["lengths"] + active.astype(jnp.int32),
            "scores": state["scores"] + jnp.where(active, chosen_log_prob, 0.0),
            "done": state["done"] | (active & (token == settings.eos_id))}

  def keep_going(state):
    return (state["step"] < max_new) & ~jnp.all(state["done"])

  def advance(state):
    previous = state["step"] - 1  # The column emitted last, now fed back.
    logits, cache = decode_step(_step_tokens(state["tokens"], previous),
                                prompt_lengths + previous, state["cache"])
    return emit({**state, "logits": logits, "cache": cache})

  state = emit({
      "step": jnp.zeros((), jnp.int32), "rng": rng, "logits": logits, "cache": cache,
      "tokens": jnp.full((batch, max_new), settings.pad_id, jnp.int32),
      "lengths": jnp.zeros((batch,), jnp.int32), "scores": jnp.zeros((batch,), jnp.float32),
      "done": jnp.zeros((batch,), bool)})
  state = jax.lax.while_loop(keep_going, advance, state)
  return state["tokens"], state["lengths"], state["scores"]


def _gather_beams(x: jax.Array, parent: jax.Array) -> jax.Array:
  """x [B, K, ...] reordered along the beams: out[b, k] = x[b, parent[b, k]]."""
  index = parent.reshape(parent.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, index, axis=1)


def _beam_loop(decode_step, logits, cache, prompt_lengths, settings: Settings, num_beams: int,
               max_new: int):
  """Beam search over B rows of K = num_beams beams.

  Each step extends every live beam by every token and keeps the K best
  (by summed log-probability) of the K * V candidates; a finished beam (it
  emitted EOS) stays a candidate with its score unchanged, extended by
  pad_id only. At the end the beam with the best score / length **
  length_penalty is returned. logits: the prefill's [B, V]; cache: B rows,
  repeated here to B * K (row b's beams are rows b * K ... b * K + K - 1).
  Returns tokens int32 [B, max_new], lengths int32 [B], scores float32 [B].
  """
  batch, vocab = logits.shape
  beams = num_beams
  cache = jax.tree.map(lambda x: jnp.repeat(x, beams, axis=1), cache)  # Batch is axis 1.
  logits = jnp.repeat(logits, beams, axis=0)
  positions_base = jnp.repeat(prompt_lengths, beams)  # [B * K]
  # Only beam 0 is live at the start, so the first step's K best are K
  # different tokens rather than K copies of the best one.
  scores = jnp.where(jnp.arange(beams) == 0, 0.0, -jnp.inf) * jnp.ones((batch, 1))
  pad_only = jnp.where(jnp.arange(vocab) == settings.pad_id, 0.0, -jnp.inf)

  def emit(state):
    log_probs = jax.nn.log_softmax(state["logits"], axis=-1).reshape(batch, beams, vocab)
    log_probs = jnp.where(state["finished"][..., None], pad_only, log_probs)
    candidates = (state["scores"][..., None] + log_probs).reshape(batch, beams * vocab)
    top_scores, top_index = jax.lax.top_k(candidates, beams)  # [B, K], best first.
    parent, token = top_index // vocab, (top_index % vocab).astype(jnp.int32)
    was_finished = _gather_beams(state["finished"], parent)
    rows = (jnp.arange(batch)[:, None] * beams + parent).reshape(-1)  # Into the B * K rows.
    tokens = jax.lax.dynamic_update_index_in_dim(_gather_beams(state["tokens"], parent), token,
                                                 state["step"], axis=2)
    return {**state, "step": state["step"] + 1, "scores": top_scores, "tokens": tokens,
            "cache": jax.tree.map(lambda x: jnp.take(x, rows, axis=1), state["cache"]),
            "lengths": _gather_beams(state["lengths"], parent) + (~was_finished).astype(jnp.int32),
            "finished": was_finished | (token == settings.eos_id)}

  def keep_going(state):
    # Without a length penalty scores only fall as beams grow, so a finished
    # best beam stays best; with one, wait until every beam has finished.
    settled = jnp.where(settings.length_penalty == 0, state["finished"][:, 0],
                        jnp.all(state["finished"], axis=1))
    return (state["step"] < max_new) & ~jnp.all(settled)

  def advance(state):
    previous = state["step"] - 1
    logits, cache = decode_step(_step_tokens(state["tokens"], previous).reshape(-1),
                                positions_base + previous, state["cache"])
    return emit({**state, "logits": logits, "cache": cache})

  state = emit({
      "step": jnp.zeros((), jnp.int32), "logits": logits, "cache": cache, "scores": scores,
      "tokens": jnp.full((batch, beams, max_new), settings.pad_id, jnp.int32),
      "lengths": jnp.zeros((batch, beams), jnp.int32),
      "finished": jnp.zeros((batch, beams), bool)})
  state = jax.lax.while_loop(keep_going, advance, state)
  lengths = jnp.maximum(state["lengths"], 1).astype(jnp.float32)
  best = jnp.argmax(state["scores"] / lengths ** settings.length_penalty, axis=1)[:, None]
  pick = lambda x: _gather_beams(x, best)[:, 0]
  return pick(state["tokens"]), pick(state["lengths"]), pick(state["scores"])


# ---------------------------------------------------------------------------
# The compiled functions, cached per model config and mesh.

# How many times each jitted function was traced, i.e. compiled (for tests).
TRACE_COUNTS: collections.Counter = collections.Counter()


def _mesh_context(mesh: Mesh | None):
  return sharding.use_mesh(mesh) if mesh is not None else contextlib.nullcontext()


@functools.lru_cache(maxsize=None)
def _prefill_fn(model_config: MM1Config, mesh: Mesh | None):
  """jit of (params, tokens, images, image_mask, lengths; max_new_tokens)
  -> (logits [B, V] of each row's last prompt token, cache of T +
  max_new_tokens slots)."""
  model = MM1Model(model_config)

  def prefill(params, tokens, images, image_mask, lengths, max_new_tokens):
    TRACE_COUNTS["prefill"] += 1
    with _mesh_context(mesh):
      batch, prompt_length = tokens.shape
      cache = decoder.init_cache(model_config.llm, batch, prompt_length + max_new_tokens,
                                 model_config.dtype)
      return model.apply({"params": params}, tokens, images, image_mask, lengths, cache,
                         method=MM1Model.prefill)

  return jax.jit(prefill, static_argnames="max_new_tokens")


@functools.lru_cache(maxsize=None)
def _decode_fn(model_config: MM1Config, mesh: Mesh | None, method: str, max_new_tokens: int,
               num_beams: int):
  """jit of (params, logits, cache, prompt_lengths, rng, settings) -> (tokens
  [B, max_new], lengths [B], scores [B])."""
  model = MM1Model(model_config)

  def decode(params, logits, cache, prompt_lengths, rng, settings):
    TRACE_COUNTS["decode"] += 1
    with _mesh_context(mesh):
      def decode_step(step_tokens, positions, cache):
        return model.apply({"params": params}, step_tokens, positions, cache,
                           method=MM1Model.decode_step)

      if method == "beam":
        return _beam_loop(decode_step, logits, cache, prompt_lengths, settings, num_beams,
                          max_new_tokens)
      return _sample_loop(decode_step, logits, cache, prompt_lengths, rng, settings,
                          method == "greedy", max_new_tokens)

  return jax.jit(decode)


class Generator:
  """Prefill + decode of an MM1Config under a DecodeConfig (and a mesh).

  __call__(params, prompts, rng) -> DecodeOutput. params: the model's
  'params' tree (placed with their shardings when a mesh is given; see
  sharding.params_shardings). rng: a jax.random key (sampling only).
  """

  def __init__(self, model_config: MM1Config, decode_config: DecodeConfig,
               mesh: Mesh | None = None):
    decode_config.validate(model_config.llm.vocab_size)
    self.model_config, self.decode_config, self.mesh = model_config, decode_config, mesh
    self._prefill = _prefill_fn(model_config, mesh)
    self._decode = _decode_fn(model_config, mesh, decode_config.method,
                              decode_config.max_new_tokens,
                              decode_config.num_beams if decode_config.method == "beam" else 1)

  def _put(self, array: np.ndarray) -> jax.Array:
    """A host batch array on the devices, split over the batch axes of the mesh."""
    if self.mesh is None:
      return jnp.asarray(array)
    names = ("activation_batch",) + (None,) * (array.ndim - 1)
    return jax.device_put(array, sharding.logical_sharding(names, array.shape, self.mesh))

  def __call__(self, params: Any, prompts: Prompts, rng: jax.Array | None = None) -> DecodeOutput:
    check_image_placeholders(prompts.tokens, prompts.image_mask,
                             self.model_config.num_image_tokens,
                             self.model_config.image_placeholder_id)
    rng = jax.random.key(0) if rng is None else rng
    if self.mesh is not None:
      rng = jax.device_put(rng, NamedSharding(self.mesh, PartitionSpec()))
    tokens, lengths, images, image_mask = (self._put(np.asarray(a)) for a in (
        prompts.tokens.astype(np.int32), prompts.lengths.astype(np.int32), prompts.images,
        prompts.image_mask))
    logits, cache = self._prefill(params, tokens, images, image_mask, lengths,
                                  max_new_tokens=self.decode_config.max_new_tokens)
    output = self._decode(params, logits, cache, lengths, rng,
                          Settings.of(self.decode_config))
    return DecodeOutput(*(np.asarray(x) for x in jax.device_get(output)))
