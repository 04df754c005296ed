"""The multimodal model: splicing, freezing, and batch checks."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from mm1_jax import config_lib, testing
from mm1_jax.data.batch import PlaceholderMismatchError, check_image_placeholders
from mm1_jax.models.connectors import build_connector
from mm1_jax.models.decoder import Decoder
from mm1_jax.models.multimodal import MM1Model, splice_image_embeddings
from mm1_jax.models.vit import VisionTransformer, normalize_images

CONFIG = config_lib.mm1_config(tiny.get_config("dense"))


@pytest.fixture(scope="module")
def model_and_params():
  model = MM1Model(CONFIG)
  batch = testing.random_multimodal_batch(CONFIG, 3, 64, seed=5)
  params = jax.jit(lambda: nn.unbox(model.init(
      jax.random.key(1), batch["tokens"], batch["images"], batch["image_mask"])))()
  return model, params


def batch_with_images(num_images_per_row, length=64, seed=0):
  """Rows with exactly the given number of images."""
  while True:
    batch = testing.random_multimodal_batch(CONFIG, len(num_images_per_row), length, seed=seed)
    if list(batch["image_mask"].sum(1)) == list(num_images_per_row):
      return batch
    seed += 1


def test_splice_puts_the_kth_image_into_the_kth_run():
  num_image_tokens, width = 3, 2
  tokens = np.array([[5, 9, 9, 9, 6, 9, 9, 9, 7, 8]])
  images = np.arange(1, 1 + 2 * num_image_tokens * width, dtype=np.float32).reshape(
      1, 2, num_image_tokens, width) * 100
  text = np.tile(np.arange(10, dtype=np.float32)[None, :, None], (1, 1, width))
  out = np.asarray(splice_image_embeddings(jnp.asarray(text), jnp.asarray(tokens),
                                           jnp.asarray(images), placeholder_id=9))
  np.testing.assert_array_equal(out[0, 1:4], images[0, 0])
  np.testing.assert_array_equal(out[0, 5:8], images[0, 1])
  for position in (0, 4, 8, 9):
    np.testing.assert_array_equal(out[0, position], text[0, position])


def test_forward_equals_the_pipeline_run_by_hand(model_and_params):
  """MM1Model == ViT -> connector -> write each image into its run -> decoder,
  computed here from the submodules and a Python loop over positions."""
  model, params = model_and_params
  batch = batch_with_images([2, 0, 1])
  logits, _ = model.apply(params, batch["tokens"], batch["images"], batch["image_mask"])

  p = params["params"]
  c = CONFIG
  llm = Decoder(c.llm, dtype=c.dtype, param_dtype=c.param_dtype)
  text = np.asarray(llm.apply({"params": p["llm"]}, jnp.asarray(batch["tokens"]), method="embed"))
  expected_inputs = text.copy()
  for row in range(3):
    num_real = int(batch["image_mask"][row].sum())
    if not num_real:
      continue
    pixels = normalize_images(batch["images"][row, :num_real], c.encoder)
    features = VisionTransformer(c.encoder).apply({"params": p["encoder"]}, pixels)
    image_tokens = np.asarray(build_connector(c.connector, c.llm.width, "float32", "float32").apply(
        {"params": p["connector"]}, features)).reshape(-1, c.llm.width)
    placeholder_positions = np.flatnonzero(batch["tokens"][row] == c.image_placeholder_id)
    assert len(placeholder_positions) == len(image_tokens)
    expected_inputs[row, placeholder_positions] = image_tokens
  expected, _ = llm.apply({"params": p["llm"]}, jnp.asarray(batch["tokens"]),
                          embeddings=jnp.asarray(expected_inputs))
  np.testing.assert_allclose(np.asarray(logits), np.asarray(expected), atol=1e-5, rtol=1e-5)


def test_padding_image_slots_do_not_change_the_output(model_and_params):
  model, params = model_and_params
  batch = batch_with_images([1, 2, 0])
  logits, _ = model.apply(params, batch["tokens"], batch["images"], batch["image_mask"])
  noisy = batch["images"].copy()
  noisy[~batch["image_mask"]] = 255 - noisy[~batch["image_mask"]]
  noisy_logits, _ = model.apply(params, batch["tokens"], noisy, batch["image_mask"])
  np.testing.assert_array_equal(np.asarray(logits), np.asarray(noisy_logits))
  real_changed = batch["images"].copy()
  real_changed[1, 1] = 255 - real_changed[1, 1]
  changed_logits, _ = model.apply(params, batch["tokens"], real_changed, batch["image_mask"])
  assert not np.allclose(np.asarray(logits)[1], np.asarray(changed_logits)[1])
  np.testing.assert_array_equal(np.asarray(logits)[0], np.asarray(changed_logits)[0])


@pytest.mark.parametrize("frozen, trained", [("freeze_encoder", "llm"), ("freeze_llm", "encoder")])
def test_freezing_stops_gradients(model_and_params, frozen, trained):
  _, params = model_and_params
  model = MM1Model(dataclasses.replace(CONFIG, **{frozen: True}))
  batch = batch_with_images([1, 2, 1])

  def loss(p):
    logits, _ = model.apply(p, batch["tokens"], batch["images"], batch["image_mask"])
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1))

  grads = jax.jit(jax.grad(loss))(params)["params"]
  frozen_part = "encoder" if frozen == "freeze_encoder" else "llm"
  assert all(not np.any(g) for g in jax.tree.leaves(grads[frozen_part]))
  assert any(np.any(g) for g in jax.tree.leaves(grads[trained]))
  assert any(np.any(g) for g in jax.tree.leaves(grads["connector"]))


def test_bfloat16_compute_keeps_float32_params():
  config = dataclasses.replace(CONFIG, dtype="bfloat16")
  model = MM1Model(config)
  batch = batch_with_images([1, 1])
  variables = jax.eval_shape(model.init, jax.random.key(0), batch["tokens"], batch["images"],
                             batch["image_mask"])
  assert {leaf.dtype for leaf in jax.tree.leaves(nn.unbox(variables))} == {jnp.dtype("float32")}
  logits, _ = jax.eval_shape(model.apply, nn.unbox(variables), batch["tokens"], batch["images"],
                             batch["image_mask"])
  assert logits.dtype == jnp.float32  # Upcast after the bf16 head.


@pytest.mark.parametrize("change, message", [
    ("extra_image_in_mask", r"row 0: the text has placeholders for 1 image\(s\) but image_mask marks 2"),
    ("split_run", r"row 0: a run of 15 placeholder tokens is not a whole number of images \(16"),
    ("mask_not_prefix", r"row 1: real images must fill the first image slots"),
])
def test_mismatched_placeholders_raise(model_and_params, change, message):
  model, params = model_and_params
  batch = batch_with_images([1, 1])
  tokens, mask = batch["tokens"].copy(), batch["image_mask"].copy()
  if change == "extra_image_in_mask":
    mask[0, 1] = True
  elif change == "split_run":
    tokens[0, np.flatnonzero(tokens[0] == CONFIG.image_placeholder_id)[-1]] = 100
  else:
    mask[1] = [False, True, False, False]
  with pytest.raises(PlaceholderMismatchError, match=message):
    check_image_placeholders(tokens, mask, CONFIG.num_image_tokens, CONFIG.image_placeholder_id)
  with pytest.raises(PlaceholderMismatchError, match=message):  # Eager calls check too.
    model.apply(params, tokens, batch["images"], mask)
