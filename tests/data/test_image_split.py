"""High-resolution image splitting: pixels, grid choice, tokens, fitting, the pipeline."""

import dataclasses
import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from configs import tiny
from mm1_jax import config_lib, experiment
from mm1_jax.data import config as data_config
from mm1_jax.data import image_split, images as image_ops, packing, pipeline, tasks
from mm1_jax.data.batch import check_image_placeholders
from mm1_jax.data.config import InputConfig, SplitScheme
from mm1_jax.data.converter import MultimodalFeatureConverter
from mm1_jax.typed_config import ConfigError

MODEL = dataclasses.replace(config_lib.mm1_config(tiny.get_config()), max_images=10)
S = MODEL.encoder.image_size  # 64
COLOR = tf.constant([120.0, 130.0, 140.0])


def png(height, width, seed=0):
  pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, "PNG")
  return buffer.getvalue(), pixels


def scheme(kind, grids, overview="", row_end=False, crop_indicators=False):
  return SplitScheme.from_config(InputConfig(image_split=kind, image_grids=grids,
                                             image_overview=overview, image_row_end=row_end,
                                             image_crop_indicators=crop_indicators))


def reassemble(crops, rows, cols):
  """[rows*cols, S, S, 3] row-major -> [rows*S, cols*S, 3]."""
  return np.concatenate([np.concatenate(list(crops[r * cols:(r + 1) * cols]), axis=1)
                         for r in range(rows)], axis=0)


@pytest.mark.parametrize("policy", ["stretch", "pad", "crop"])
def test_mm1_crops_tile_the_resized_image_and_the_overview_is_the_plain_resize(policy):
  encoded, pixels = png(150, 90)
  split = scheme("mm1", ((2, 3),))
  images, layouts = image_split.decode_and_split(tf.constant([encoded]), S, policy, split,
                                                 pad_color=(0.5, 0.5, 0.5))
  images, layouts = images.numpy(), layouts.numpy()
  assert images.shape == (7, S, S, 3) and layouts.tolist() == [[2, 3]]
  color = tf.constant([128.0, 128.0, 128.0])
  canvas = image_ops.resize_to(tf.constant(pixels), 2 * S, 3 * S, policy, color).numpy()
  np.testing.assert_array_equal(reassemble(images[:6], 2, 3), canvas)  # Overview last (mm1).
  plain = image_ops.decode_and_resize(tf.constant([encoded]), S, policy,
                                      pad_color=(0.5, 0.5, 0.5)).numpy()[0]
  np.testing.assert_array_equal(images[6], plain)


def llava_select_best_resolution(original_size, possible_resolutions):
  """LLaVA-NeXT's rule (llava/mm_utils.py), written out independently:
  sizes are (width, height)."""
  original_width, original_height = original_size
  best, best_effective, best_wasted = None, -1, float("inf")
  for width, height in possible_resolutions:
    scale = min(width / original_width, height / original_height)
    down_w, down_h = int(original_width * scale), int(original_height * scale)
    effective = min(down_w * down_h, original_width * original_height)
    wasted = width * height - effective
    if effective > best_effective or (effective == best_effective and wasted < best_wasted):
      best, best_effective, best_wasted = (width, height), effective, wasted
  return best


SIZES = [(336, 336), (100, 700), (700, 100), (1000, 400), (400, 1000), (672, 672),
         (1344, 1344), (500, 340), (340, 500), (2000, 1000), (30, 40), (1008, 336),
         (337, 673), (900, 1200), (1, 5000), (640, 480)]


@pytest.mark.parametrize("image_size,grids", [
    (336, ((1, 2), (2, 1), (2, 2), (1, 3), (3, 1))),  # LLaVA-NeXT's pinpoints for 336 px.
    (64, ((1, 1), (2, 2), (3, 3), (1, 4), (4, 1), (2, 3), (3, 2))),
])
def test_grid_choice_matches_llava_next(image_size, grids):
  pinpoints = [(cols * image_size, rows * image_size) for rows, cols in grids]
  for width, height in SIZES:
    index = int(image_split.select_grid(tf.constant(height), tf.constant(width), grids,
                                        image_size))
    rows, cols = grids[index]
    assert (cols * image_size, rows * image_size) == llava_select_best_resolution(
        (width, height), pinpoints), (width, height)


def test_anyres_crops_tile_the_padded_canvas_overview_first():
  encoded, pixels = png(40, 130)  # Wide: the 1 x 3 grid fits best.
  split = scheme("anyres", ((2, 2), (1, 3), (3, 1)))
  images, layouts = image_split.decode_and_split(tf.constant([encoded]), S, "stretch", split)
  images, layouts = images.numpy(), layouts.numpy()
  assert layouts.tolist() == [[1, 3]] and images.shape == (4, S, S, 3)
  mean = tf.constant([round(255 * c) for c in MODEL.encoder.image_mean], tf.float32)
  canvas = image_ops.resize_to(tf.constant(pixels), S, 3 * S, "pad", mean).numpy()
  np.testing.assert_array_equal(reassemble(images[1:], 1, 3), canvas)
  stretched = image_ops.resize_to(tf.constant(pixels), S, S, "stretch", mean).numpy()
  np.testing.assert_array_equal(images[0], stretched)


def test_images_of_different_grids_in_one_example_keep_their_order():
  tall, _ = png(200, 60, seed=1)
  wide, _ = png(60, 200, seed=2)
  split = scheme("anyres", ((3, 1), (1, 3)))
  images, layouts = image_split.decode_and_split(tf.constant([tall, wide]), S, "stretch", split)
  assert layouts.numpy().tolist() == [[3, 1], [1, 3]] and images.shape[0] == 8
  first, _ = image_split.decode_and_split(tf.constant([tall]), S, "stretch", split)
  second, _ = image_split.decode_and_split(tf.constant([wide]), S, "stretch", split)
  np.testing.assert_array_equal(images.numpy(), np.concatenate([first, second]))


def test_markers_become_one_per_slot_with_row_ends():
  split = scheme("anyres", ((2, 2), (1, 3)), overview="last", row_end=True)
  tokens = np.array([10, 3, 11, 3, 12])
  out, mask, group, cut = image_split.expand_split_markers(
      tokens, np.ones(5), 3, [[2, 2], [1, 3]], split, row_end_id=99,
      cut_after=np.array([0, 0, 1, 0, 1], bool))
  assert out.tolist() == [10, 3, 3, 99, 3, 3, 99, 3, 11, 3, 3, 3, 99, 3, 12]
  assert mask.tolist() == [1] + [0] * 7 + [1] + [0] * 5 + [1]
  assert group.tolist() == [-1] + [0] * 7 + [-1] + [1] * 5 + [-1]
  assert cut.tolist() == [False] * 8 + [True] + [False] * 5 + [True]
  with pytest.raises(ValueError, match="2 image marker"):
    image_split.expand_split_markers(tokens, np.ones(5), 3, [[2, 2]], split, 99)


def test_crop_indicators_name_each_crop_by_its_row_and_column():
  """<crop r,c> = base + r * G + c (G: the largest grid side), before each crop."""
  split = scheme("anyres", ((2, 2), (1, 3)), overview="first", row_end=True,
                 crop_indicators=True)
  tokens = np.array([10, 3, 11, 3])
  out, mask, group, _ = image_split.expand_split_markers(
      tokens, np.ones(4), 3, [[2, 2], [1, 3]], split, row_end_id=99, crop_indicator_base=100)
  assert out.tolist() == [10, 3, 100, 3, 101, 3, 99, 103, 3, 104, 3, 99,
                          11, 3, 100, 3, 101, 3, 102, 3, 99]
  assert mask.tolist() == [1] + [0] * 11 + [1] + [0] * 8
  assert group.tolist() == [-1] + [0] * 11 + [-1] + [1] * 8
  with pytest.raises(ValueError, match="no crop_indicator_base"):
    image_split.expand_split_markers(tokens, np.ones(4), 3, [[2, 2], [1, 3]], split, 99)


def test_crop_indicators_are_laid_out_by_the_converter_and_never_trained_on():
  split = scheme("mm1", ((3, 3),), crop_indicators=True)
  # 4096 ids of the tokenizer, <image_row_end> 4096, <crop 0,0>..<crop 2,2> 4097..4105.
  model = dataclasses.replace(MODEL, max_images=10,
                              llm=dataclasses.replace(MODEL.llm, vocab_size=4106))
  conv = converter(512, split, model=model)
  assert (conv.row_end_id, conv.crop_indicator_base) == (None, 4097)
  marker = MODEL.image_placeholder_id
  prepared = conv.prepare({"tokens": np.array([20, marker, 21, 1]),
                           "loss_mask": np.array([0, 0, 1, 1]), "images": numbered_slots(10),
                           "image_layouts": np.array([[3, 3]])})
  (row,) = conv.convert(prepared) or conv.flush()
  targets = row["decoder_target_tokens"]
  check_image_placeholders(targets[None], row["image_mask"][None], MODEL.num_image_tokens, marker)
  np.testing.assert_array_equal(row["images"][:, 0, 0, 0], np.arange(10))
  indicators = np.flatnonzero(targets >= 4097)
  assert targets[indicators].tolist() == list(range(4097, 4106))
  # Each indicator directly precedes its crop's run; the overview (last) has none.
  run = MODEL.num_image_tokens
  assert (np.diff(indicators) == run + 1).all()
  assert (targets[indicators + 1] == marker).all()
  assert (targets[indicators[-1] + run + 1:][:run] == marker).all()
  assert not row["decoder_loss_weights"][indicators].any()
  too_small = dataclasses.replace(model, llm=dataclasses.replace(MODEL.llm, vocab_size=4100))
  with pytest.raises(ConfigError, match=r"image_crop_indicators: the <crop row,col> tokens of a "
                                        r"grid side of 3 take ids 4097..4105 .*vocab_size "
                                        r">= 4106"):
    converter(512, split, model=too_small)


def numbered_slots(count):
  """[count, S, S, 3] images whose pixels are their index (to track order)."""
  return np.broadcast_to(np.arange(count, dtype=np.uint8)[:, None, None, None],
                         (count, S, S, 3)).copy()


def converter(seq_len, split, pack=True, image_start_end=False, model=MODEL):
  return MultimodalFeatureConverter(model, tasks.VOCABULARY, seq_len, pack, image_start_end,
                                    split)


@pytest.mark.parametrize("image_start_end", [False, True])
def test_placeholder_runs_and_image_slots_line_up_after_packing(image_start_end):
  split = scheme("mm1", ((2, 2),), row_end=True)
  model = dataclasses.replace(MODEL, llm=dataclasses.replace(MODEL.llm, vocab_size=4097))
  conv = converter(512, split, image_start_end=image_start_end, model=model)
  marker = MODEL.image_placeholder_id
  examples = [{"tokens": np.array([20, marker, 21, 22, 1]), "loss_mask": np.array([0, 0, 1, 1, 1]),
               "images": numbered_slots(5), "image_layouts": np.array([[2, 2]])},
              {"tokens": np.array([marker, 30, 1]), "loss_mask": np.array([0, 1, 1]),
               "images": numbered_slots(5) + 5, "image_layouts": np.array([[2, 2]])}]
  for example in examples:
    prepared = conv.prepare(example)
    assert not prepared["truncated"]
    conv.convert(prepared)
  (row,) = conv.flush()
  check_image_placeholders(row["decoder_target_tokens"][None], row["image_mask"][None],
                           MODEL.num_image_tokens, marker)
  assert row["image_mask"].sum() == 10
  np.testing.assert_array_equal(row["images"][:, 0, 0, 0], np.arange(10))
  targets = row["decoder_target_tokens"]
  # Two row ends per image, none trained on; overview last: 4 crops, then it.
  assert np.count_nonzero(targets == 4096) == 4
  assert not row["decoder_loss_weights"][targets == 4096].any()
  run = MODEL.num_image_tokens + 2 * image_start_end
  first = np.flatnonzero(targets == marker)[0] - int(image_start_end)
  layout = targets[first:first + 4 * run + 2 + run]
  assert layout[2 * run] == 4096 and layout[4 * run + 1] == 4096


def test_fitting_never_cuts_inside_an_image_of_sub_images():
  split = scheme("mm1", ((2, 2),))
  marker = MODEL.image_placeholder_id
  example = {"tokens": np.array([20, marker, 21, marker, 22, 1]),
             "loss_mask": np.ones(6), "images": numbered_slots(10),
             "image_layouts": np.array([[2, 2], [2, 2]])}
  per_image = 5 * MODEL.num_image_tokens
  # Room for the first image and part of the second: the second goes whole.
  prepared = converter(2 + per_image + 3 * MODEL.num_image_tokens, split).prepare(example)
  assert prepared["truncated"] and len(prepared["images"]) == 5
  assert prepared["tokens"].tolist() == [20] + [marker] * per_image + [21]
  # max_images 7: the second image's slots do not all fit, so none of them.
  model = dataclasses.replace(MODEL, max_images=7)
  prepared = converter(1000, split, model=model).prepare(example)
  assert len(prepared["images"]) == 5 and prepared["tokens"][-1] == 21


def test_row_end_needs_room_in_the_vocabulary():
  with pytest.raises(ConfigError, match=r"llm.vocab_size >= 4097"):
    converter(64, scheme("mm1", ((2, 2),), row_end=True))


def test_tokens_and_slots_per_image():
  cases = [  # config, slots, tokens (16 placeholders per slot)
      (InputConfig(), 1, 16),
      (InputConfig(image_start_end=True), 1, 18),
      (InputConfig(image_split="mm1", image_grids=((3, 3),)), 10, 160),
      (InputConfig(image_split="mm1", image_grids=((2, 2),), image_row_end=True), 5, 82),
      (InputConfig(image_split="mm1", image_grids=((3, 3),), image_row_end=True,
                   image_crop_indicators=True), 10, 172),
      (InputConfig(image_split="anyres", image_grids=((1, 2), (2, 2), (1, 3)),
                   image_start_end=True), 5, 90),
  ]
  for config, slots, tokens in cases:
    assert data_config.slots_per_image(config) == slots
    assert data_config.tokens_per_image(config, 16) == tokens


@pytest.mark.parametrize("override,match", [
    ({"image_split": "tiles"}, "data.image_split: unknown scheme 'tiles'"),
    ({"image_split": "mm1", "image_grids": ((2, 2), (3, 3))}, "2 are given"),
    ({"image_split": "anyres", "image_grids": ((2, 0),)}, "data.image_grids"),
    ({"image_split": "anyres", "image_grids": ()}, "data.image_grids"),
    ({"image_split": "anyres", "image_grids": ((1, 2), (1, 2))}, "twice"),
    ({"image_split": "mm1", "image_overview": "middle"}, "data.image_overview"),
    ({"image_row_end": True}, "data.image_row_end: set, but"),
    ({"image_crop_indicators": True}, "data.image_crop_indicators: set, but"),
])
def test_bad_split_configs_are_refused(override, match):
  with pytest.raises(ConfigError, match=match):
    data_config.validate(InputConfig(**override))


def test_max_images_must_hold_one_split_image():
  config = tiny.get_config()
  config.data.update(image_split="mm1", image_grids=((3, 3),))
  with pytest.raises(ConfigError, match=r"model.max_images: 4, .* up to 10 sub-images .*"
                                        r"max_images >= 10"):
    experiment.Experiment.from_config(config)
  config.model.max_images = 10
  config.data.seq_len = 160
  with pytest.raises(ConfigError, match=r"seq_len: 160 cannot hold one image \(160 tokens\)"):
    experiment.Experiment.from_config(config)


def test_row_end_token_needs_an_embedding_row_before_training():
  """Refused up front (the whole model's config), not at the pipeline's start."""
  config = tiny.get_config("mosaic,split=mm1")
  config.data.image_row_end = True
  with pytest.raises(ConfigError, match=r"<image_row_end> token takes id 4096 .* set "
                                        r"llm.vocab_size >= 4097"):
    experiment.Experiment.from_config(config)
  config.model.llm.vocab_size = 4097
  experiment.Experiment.from_config(config)
  config.data.image_crop_indicators = True
  with pytest.raises(ConfigError, match=r"take ids 4097..4105 .*vocab_size >= 4106"):
    experiment.Experiment.from_config(config)
  config.model.llm.vocab_size = 4106
  experiment.Experiment.from_config(config)


def test_pipeline_batches_hold_every_sub_image():
  config = InputConfig(mixture="easy_vqa_caption", batch_size=2, seq_len=192, seed=3,
                       image_split="mm1", image_grids=((2, 2),))
  model = dataclasses.replace(MODEL, max_images=10)
  source = pipeline.MultimodalInput(config, model, process_index=0, process_count=1)
  batch = next(source)
  check_image_placeholders(batch["decoder_input_tokens"], batch["image_mask"],
                           model.num_image_tokens, model.image_placeholder_id)
  # Caption examples hold one image each: 5 slots per segment.
  segments = batch["decoder_segment_ids"].max(axis=1)
  np.testing.assert_array_equal(batch["image_mask"].sum(axis=1), 5 * segments)
  # The overview (last of each image) equals the plain pipeline's image.
  plain = pipeline.MultimodalInput(dataclasses.replace(config, image_split="none"), model,
                                   process_index=0, process_count=1)
  plain_batch = next(plain)
  np.testing.assert_array_equal(batch["images"][0, 4], plain_batch["images"][0, 0])
  source.close()
  plain.close()


@pytest.mark.parametrize("crop_indicators", [False, True])
def test_fewshot_prompts_split_images_as_training_does(crop_indicators):
  from mm1_jax.evaluation import fewshot
  split = scheme("mm1", ((2, 2),), crop_indicators=crop_indicators)
  # Room for <crop 0,0>..<crop 1,1> at 4097..4100.
  model = dataclasses.replace(MODEL, llm=dataclasses.replace(MODEL.llm, vocab_size=4101))
  evaluation_set = fewshot.FewShotEvaluationSet("easy_vqa_vqa", model, num_shots=1,
                                                max_queries=2, image_split=split)
  prompt = evaluation_set[0]
  assert prompt.image_mask.sum() == 10  # 2 images x (4 crops + overview).
  marker = MODEL.image_placeholder_id
  assert np.count_nonzero(prompt.tokens == marker) == 10 * MODEL.num_image_tokens
  assert np.count_nonzero(prompt.tokens >= 4097) == (8 if crop_indicators else 0)
  # The same ids through the training converter give the same layout.
  query = evaluation_set.queries[0]
  demonstration = evaluation_set.train[prompt.demonstration_indices[0]]
  ids = evaluation_set.prompt_ids(query, [demonstration])
  encoded = list(demonstration.images) + list(query.images)
  images, layouts = fewshot.decode_images(encoded, MODEL, "stretch", split)
  prepared = converter(4096, split, model=model).prepare(
      {"tokens": np.append(ids, 1), "loss_mask": np.ones(len(ids) + 1),
       "images": images, "image_layouts": layouts})
  np.testing.assert_array_equal(prompt.tokens[1:], prepared["tokens"][:-1])
  np.testing.assert_array_equal(prompt.images[:10], images)
  with pytest.raises(ValueError, match=r"max_images is 9; use num_shots <= 0 or set "
                                       r"model.max_images >= 10"):
    fewshot.FewShotEvaluationSet("easy_vqa_vqa", dataclasses.replace(model, max_images=9),
                                 num_shots=1, max_queries=2, image_split=split)


def test_conversations_split_their_images_with_row_ends():
  config = InputConfig(mixture="easy_vqa_chat", batch_size=2, seq_len=256, seed=3,
                       chat_template="mm1", image_split="anyres",
                       image_grids=((1, 2), (2, 1), (2, 2)), image_row_end=True)
  model = dataclasses.replace(MODEL, max_images=10,
                              llm=dataclasses.replace(MODEL.llm, vocab_size=4160))
  source = pipeline.MultimodalInput(config, model, process_index=0, process_count=1)
  batch = next(source)
  check_image_placeholders(batch["decoder_input_tokens"], batch["image_mask"],
                           model.num_image_tokens, model.image_placeholder_id)
  targets = batch["decoder_target_tokens"]
  # A 64 px image fits every canvas whole; LLaVA's rule then takes the least
  # waste, the 1 x 2 grid: overview + 2 crops and one row end per image.
  images_per_row = batch["image_mask"].sum(axis=1)
  assert np.all(images_per_row % 3 == 0) and images_per_row.sum() > 0
  np.testing.assert_array_equal((targets == 4096).sum(axis=1), images_per_row // 3)
  assert not batch["decoder_loss_weights"][targets == 4096].any()
  assert batch["decoder_loss_weights"].sum() > 0
  source.close()


def test_generate_reads_and_lays_out_split_images(tmp_path):
  from mm1_jax import generate
  path = tmp_path / "wide.png"
  path.write_bytes(png(60, 200, seed=4)[0])
  data = InputConfig(image_split="anyres", image_grids=((1, 3), (3, 1)))
  [image] = generate.read_images([str(path)], MODEL, data)
  assert image.layout == (1, 3) and image.slots.shape == (4, S, S, 3)
  ids = tasks.VOCABULARY.encode("Describe <image> please")
  tokens = generate.layout_prompt(ids, [image], MODEL, data, tasks.VOCABULARY)
  assert np.count_nonzero(tokens == MODEL.image_placeholder_id) == 4 * MODEL.num_image_tokens
  small = dataclasses.replace(MODEL, max_images=3)
  with pytest.raises(generate.GenerateInputError, match="1 images in 4 sub-images"):
    generate.layout_prompt(ids, [image], small, data, tasks.VOCABULARY)
  # With row ends and crop indicators (ids 4096 and 4097..4105 for grid side 3)
  # the whole prompt is laid out as training lays it out.
  marked = dataclasses.replace(data, image_row_end=True, image_crop_indicators=True)
  roomy = dataclasses.replace(MODEL, llm=dataclasses.replace(MODEL.llm, vocab_size=4106))
  tokens = generate.layout_prompt(ids, [image], roomy, marked, tasks.VOCABULARY)
  extra = tokens[tokens >= 4096].tolist()
  assert extra == [4097, 4098, 4099, 4096]  # <crop 0,0..2>, then the row's end.
  # The 0 start token, the text around the marker, 4 runs, 4 inserted tokens.
  assert len(tokens) == 1 + (len(ids) - 1) + 4 * MODEL.num_image_tokens + 4
