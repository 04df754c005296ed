"""KV-cache decoding: search methods, EOS, compiles, padded batches, meshes."""

import functools

import jax
import numpy as np
import pytest

from configs import tiny
from mm1_jax import config_lib, sharding, testing
from mm1_jax.evaluation import decoding
from mm1_jax.typed_config import ConfigError
from mm1_jax.models.multimodal import MM1Model

MAX_NEW = 8


@pytest.fixture(scope="module")
def moe():
  """The tiny model (MoE, its default) with one image slot, random params
  and two prompts of different lengths (23 and 9 tokens)."""
  config = tiny.get_config()
  config.model.max_images = 1
  config = config_lib.mm1_config(config)
  token_lists, image_lists = prompt_rows(config)
  prompts = decoding.make_prompts(token_lists, image_lists, config)
  return config, testing.random_params(config, seed=0), prompts


def prompt_rows(config, seed=0):
  """Text, an image run, text; and text only. Returns (token lists, image lists)."""
  rng = np.random.default_rng(seed)
  text = lambda n: rng.integers(10, config.llm.vocab_size, n).tolist()
  run = [config.image_placeholder_id] * config.num_image_tokens
  size = config.encoder.image_size
  image = rng.integers(0, 256, (1, size, size, 3), dtype=np.uint8)
  return [[0] + text(3) + run + text(3), [0] + text(8)], [image, None]


def generate(config, params, prompts, rng=None, mesh=None, **decode_kw):
  generator = decoding.Generator(
      config, decoding.DecodeConfig(max_new_tokens=MAX_NEW, **decode_kw), mesh)
  return generator(params, prompts, rng)


@pytest.fixture(scope="module")
def greedy(moe):
  return generate(*moe)


def row_eos(greedy):
  """(step, token): a token row 0 first emits at `step` and row 1 never emits,
  to use as EOS, so that row 0 must stop there and row 1 must not."""
  for step in range(1, MAX_NEW - 2):
    token = int(greedy.tokens[0, step])
    if token not in greedy.tokens[0, :step] and token not in greedy.tokens[1]:
      return step, token
  raise AssertionError(f"no usable EOS in {greedy.tokens}")


@pytest.fixture(scope="module")
def stopped(moe, greedy):
  """Greedy decoding of `moe` with row_eos(greedy) as EOS: (step, eos, output)."""
  step, eos = row_eos(greedy)
  return step, eos, generate(*moe, eos_id=eos)


@pytest.fixture(scope="module")
def beam3(moe, stopped):
  """Beam search (3 beams) of `moe` with the EOS of `stopped`."""
  return generate(*moe, method="beam", num_beams=3, eos_id=stopped[1])


# ---------------------------------------------------------------------------
# Stopping and compiling.


def test_eos_stops_only_its_own_row(greedy, stopped):
  assert greedy.tokens.shape == (2, MAX_NEW) and (greedy.lengths == MAX_NEW).all()
  step, _, output = stopped
  pads = [0] * (MAX_NEW - step - 1)
  np.testing.assert_array_equal(output.tokens[0], list(greedy.tokens[0, :step + 1]) + pads)
  np.testing.assert_array_equal(output.tokens[1], greedy.tokens[1])
  np.testing.assert_array_equal(output.lengths, [step + 1, MAX_NEW])
  np.testing.assert_allclose(output.scores[1], greedy.scores[1], rtol=1e-6)
  assert output.scores[0] > greedy.scores[0]  # Fewer (negative) log-probs summed.


def test_one_compile_per_shape(moe, greedy):
  """Prefill and the decode loop compile once; another call of the same shapes,
  or other sampling settings, compile nothing."""
  config, params, prompts = moe
  before = dict(decoding.TRACE_COUNTS)
  generate(config, params, prompts._replace(tokens=prompts.tokens.copy()))
  generate(config, params, prompts, eos_id=7, pad_id=2)
  assert dict(decoding.TRACE_COUNTS) == before


# ---------------------------------------------------------------------------
# Search methods.


def test_beam_search_with_one_beam_equals_greedy(moe, stopped):
  _, eos, expected = stopped
  beam = generate(*moe, method="beam", num_beams=1, eos_id=eos, length_penalty=0.6)
  np.testing.assert_array_equal(beam.tokens, expected.tokens)
  np.testing.assert_array_equal(beam.lengths, expected.lengths)
  np.testing.assert_allclose(beam.scores, expected.scores, rtol=1e-5)


@functools.cache
def forward(config):
  return jax.jit(MM1Model(config).apply)


def log_probs_of(config, params, prompts, continuations):
  """log p(continuation | prompt) per row, by one full forward pass over the
  rows packed as segments of one sequence. continuations: token lists."""
  rows = [np.concatenate([prompts.tokens[r, :prompts.lengths[r]], c])
          for r, c in enumerate(continuations)]
  length = len(prompts.lengths) * (prompts.tokens.shape[1] + MAX_NEW)  # One shape, one compile.
  tokens, segments, positions = (np.zeros((1, length), np.int32) for _ in range(3))
  offset = 0
  for segment, row in enumerate(rows, start=1):
    tokens[0, offset:offset + len(row)] = row
    segments[0, offset:offset + len(row)] = segment
    positions[0, offset:offset + len(row)] = np.arange(len(row))
    offset += len(row)
  first = np.argmax(prompts.image_mask.sum(1) > 0)  # Only row 0 has an image here.
  logits, _ = forward(config)({"params": params}, tokens, prompts.images[first:first + 1],
                              prompts.image_mask[first:first + 1], positions, segments)
  log_probs = np.asarray(jax.nn.log_softmax(np.asarray(logits)[0], axis=-1))
  totals, offset = [], 0
  for r, continuation in enumerate(continuations):
    start = offset + prompts.lengths[r] - 1  # Predicts the first new token.
    picked = log_probs[np.arange(start, start + len(continuation)), continuation]
    totals.append(float(picked.sum()))
    offset += len(rows[r])
  return np.array(totals)


def test_beam_search_scores_are_the_log_probs_of_its_output(moe, greedy, stopped, beam3):
  """Beams (and their caches) are reordered every step; the returned score
  must still be the model's log-probability of the returned tokens."""
  config, params, prompts = moe
  eos = stopped[1]
  continuations = [beam3.tokens[r, :beam3.lengths[r]] for r in range(2)]
  for r, continuation in enumerate(continuations):
    assert (beam3.tokens[r, beam3.lengths[r]:] == 0).all()
    assert eos not in continuation[:-1]
  np.testing.assert_allclose(beam3.scores, log_probs_of(config, params, prompts, continuations),
                             rtol=1e-5)
  # The greedy continuation's score is right too.
  greedy_rows = [greedy.tokens[r] for r in range(2)]
  np.testing.assert_allclose(greedy.scores, log_probs_of(config, params, prompts, greedy_rows),
                             rtol=1e-5)


def test_sampling(moe, greedy):
  config, params, prompts = moe
  # top-k 1 and a tiny top-p leave only the argmax: greedy, whatever the seed.
  for kw in (dict(top_k=1), dict(top_p=1e-6, temperature=0.5)):
    sampled = generate(*moe, method="sample", rng=jax.random.key(3), **kw)
    np.testing.assert_array_equal(sampled.tokens, greedy.tokens, err_msg=str(kw))
  kw = dict(method="sample", temperature=2.0, top_k=50, top_p=0.9)
  first = generate(*moe, rng=jax.random.key(0), **kw)
  again = generate(*moe, rng=jax.random.key(0), **kw)
  other = generate(*moe, rng=jax.random.key(1), **kw)
  np.testing.assert_array_equal(first.tokens, again.tokens)
  assert (first.tokens != other.tokens).any() and (first.tokens != greedy.tokens).any()


def test_filter_logits():
  logits = np.log(np.array([[0.1, 0.4, 0.2, 0.3], [0.25, 0.25, 0.25, 0.25]], np.float32))
  kept = lambda **kw: np.isfinite(np.asarray(decoding.filter_logits(
      logits, kw.get("t", 1.0), kw.get("k", 0), kw.get("p", 1.0)))).astype(int).tolist()
  assert kept() == [[1, 1, 1, 1]] * 2
  assert kept(k=2) == [[0, 1, 0, 1], [1, 1, 1, 1]]  # Ties with the k-th stay.
  assert kept(k=1)[0] == [0, 1, 0, 0]
  # The most likely tokens until their probability reaches p.
  assert kept(p=0.4)[0] == [0, 1, 0, 0]
  assert kept(p=0.5)[0] == [0, 1, 0, 1]
  assert kept(p=0.75)[0] == [0, 1, 1, 1]
  assert kept(p=0.7, t=0.01)[0] == [0, 1, 0, 0]  # After the temperature.
  # top-p applies to what top-k kept (renormalised): 0.4 / 0.7 > 0.5.
  assert kept(k=2, p=0.5)[0] == [0, 1, 0, 0]
  scaled = np.asarray(decoding.filter_logits(logits, 2.0, 0, 1.0))
  np.testing.assert_allclose(scaled, logits / 2.0)


# ---------------------------------------------------------------------------
# Batches of prompts of different lengths, and meshes.


def test_a_padded_batch_decodes_like_each_prompt_alone(moe, greedy):
  """Right-padding: row 1 (9 tokens) is padded to 23 in the batch."""
  config, params, prompts = moe
  token_lists, image_lists = prompt_rows(config)
  assert list(map(len, token_lists)) == [23, 9]
  for row in range(2):
    alone = generate(config, params,
                     decoding.make_prompts([token_lists[row]], [image_lists[row]], config))
    np.testing.assert_array_equal(alone.tokens[0], greedy.tokens[row], err_msg=f"row {row}")
    np.testing.assert_allclose(alone.scores[0], greedy.scores[row], rtol=1e-5)


def test_decoding_under_a_mesh_matches_one_device(moe, greedy, stopped, beam3):
  config, params, prompts = moe
  assert jax.device_count() == 8  # Virtual CPU devices (tests/conftest.py).
  mesh = sharding.make_mesh(dict(data=2, tensor=2, expert=2))
  with sharding.use_mesh(mesh):
    boxed = jax.eval_shape(MM1Model(config).init, jax.random.key(1), prompts.tokens,
                           prompts.images, prompts.image_mask)
  params = jax.device_put(params, sharding.params_shardings(boxed, mesh)["params"])
  for kw, expected in ((dict(), greedy), (dict(method="beam", num_beams=3), beam3)):
    got = generate(config, params, prompts, mesh=mesh, eos_id=stopped[1] if kw else 1, **kw)
    np.testing.assert_array_equal(got.tokens, expected.tokens, err_msg=str(kw))
    np.testing.assert_allclose(got.scores, expected.scores, rtol=1e-5, err_msg=str(kw))


# ---------------------------------------------------------------------------
# Input checks.


def test_bad_settings_and_prompts_are_named(moe):
  config = moe[0]
  with pytest.raises(ConfigError, match="decode.top_p"):
    decoding.DecodeConfig(top_p=0.0).validate(config.llm.vocab_size)
  with pytest.raises(ConfigError, match="decode.method"):
    decoding.DecodeConfig(method="nucleus").validate(config.llm.vocab_size)
  with pytest.raises(ValueError, match="prompt 1 has 0 tokens"):
    decoding.make_prompts([[5, 6], []], None, config)
  run = [config.image_placeholder_id] * config.num_image_tokens
  with pytest.raises(ValueError, match="prompt 0: the text has placeholders for 1 image"):
    decoding.make_prompts([[5] + run + [6]], None, config)
