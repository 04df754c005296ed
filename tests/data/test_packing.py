"""Marker expansion, fitting and packing: nothing lost, nothing misaligned."""

import itertools

import numpy as np
import pytest

from mm1_jax.data import packing
from mm1_jax.data.batch import check_image_placeholders

M = 4  # image tokens per image
MARKER, START, END, EOS = 3, 4, 5, 1
SHAPE = (2, 2, 3)  # tiny images: content is only compared, never looked at
LENGTH, MAX_IMAGES = 48, 3

RUN_IDS = [(None, None), (START, END), (START, None), (None, END)]


def raw_example(rng, image_counter):
  """An unexpanded example: prompt (no loss) + targets (+ EOS), 0..5 markers.

  Each image is filled with a unique value so it can be traced through.
  """
  num_images = int(rng.integers(0, 6))
  prompt = rng.integers(6, 100, int(rng.integers(0, 12)))
  targets = np.append(rng.integers(6, 100, int(rng.integers(0, 30))), EOS)
  tokens = np.concatenate([prompt, targets]).astype(np.int32)
  loss_mask = np.concatenate([np.zeros(len(prompt)), np.ones(len(targets))]).astype(np.int32)
  # Markers anywhere, the very end included (a trailing run to drop); their
  # loss is dropped by the expansion anyway.
  for position in np.sort(rng.integers(0, len(tokens) + 1, num_images))[::-1]:
    tokens = np.insert(tokens, position, MARKER)
    loss_mask = np.insert(loss_mask, position, 1)
  values = [next(image_counter) % 256 for _ in range(num_images)]
  images = np.full((num_images, *SHAPE), 0, np.uint8)
  images[:] = np.reshape(values, (-1, 1, 1, 1))
  return tokens, loss_mask, images


def fitted_examples(seed, count, start_id, end_id, length=LENGTH, max_images=MAX_IMAGES,
                    num_image_tokens=M):
  """Random examples, expanded and fitted; num_image_tokens=None lets fit infer M."""
  rng, counter = np.random.default_rng(seed), itertools.count(1)
  out = []
  for _ in range(count):
    tokens, loss_mask, images = raw_example(rng, counter)
    tokens, loss_mask = packing.expand_image_markers(tokens, loss_mask, MARKER, M, start_id,
                                                     end_id)
    tokens, loss_mask, images = packing.fit_example(
        tokens, loss_mask, images, length, max_images, MARKER, start_id, end_id,
        num_image_tokens=num_image_tokens)
    out.append({"tokens": tokens, "loss_mask": loss_mask, "images": images})
  return out


def make_packer(start_id, end_id, pack, length=LENGTH, max_images=MAX_IMAGES):
  return packing.Packer(length, max_images, SHAPE, MARKER, start_id, end_id, pack=pack,
                        num_image_tokens=M)


def run_packer(packer, examples):
  sequences = []
  for example in examples:
    sequences += packer.add(example)
  return sequences + packer.flush()


def placeholder_run_lengths(tokens):
  is_marker = np.concatenate([[False], tokens == MARKER, [False]])
  edges = np.flatnonzero(np.diff(is_marker.astype(np.int8)))
  return edges[1::2] - edges[::2]


def special(tokens, start_id, end_id):
  return np.isin(tokens, [i for i in (MARKER, start_id, end_id) if i is not None])


# --- expand_image_markers ----------------------------------------------------


def test_expand_replaces_each_marker_by_a_run_without_loss():
  tokens, loss_mask = packing.expand_image_markers([7, MARKER, 8, MARKER], [0, 1, 1, 1],
                                                   MARKER, 3, START, END)
  np.testing.assert_array_equal(tokens, [7, START, 3, 3, 3, END, 8, START, 3, 3, 3, END])
  np.testing.assert_array_equal(loss_mask, [0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0])
  assert tokens.dtype == np.int32 and loss_mask.dtype == np.int32
  tokens, _ = packing.expand_image_markers([MARKER, MARKER, 9], [1, 1, 1], MARKER, 2)
  np.testing.assert_array_equal(tokens, [3, 3, 3, 3, 9])
  tokens, _ = packing.expand_image_markers([], [], MARKER, 2, START, END)
  assert tokens.shape == (0,)


# --- fit_example: truncation never misaligns ----------------------------------


def image_stack(*values):
  return np.stack([np.full(SHAPE, v, np.uint8) for v in values])


def expanded(tokens, start_id=START, end_id=END):
  return packing.expand_image_markers(tokens, np.ones(len(tokens)), MARKER, M, start_id,
                                      end_id)


def fit(tokens, images, length=100, max_images=MAX_IMAGES, start_id=START, end_id=END):
  tokens, loss_mask = expanded(tokens, start_id, end_id)
  return packing.fit_example(tokens, loss_mask, images, length, max_images, MARKER, start_id,
                             end_id, num_image_tokens=M)


def test_fit_cuts_before_the_run_after_max_images():
  tokens, _, images = fit([7, MARKER, 8, MARKER, 9, MARKER, 10], image_stack(1, 2, 3),
                          max_images=2)
  np.testing.assert_array_equal(tokens, [7, START, 3, 3, 3, 3, END, 8, START, 3, 3, 3, 3, END, 9])
  np.testing.assert_array_equal(images[:, 0, 0, 0], [1, 2])


def test_fit_too_many_images_then_drops_the_newly_trailing_run():
  # Cutting before image 3 leaves image 2 last: it goes too.
  tokens, _, images = fit([7, MARKER, 8, MARKER, MARKER, 10], image_stack(1, 2, 3),
                          max_images=2)
  np.testing.assert_array_equal(tokens, [7, START, 3, 3, 3, 3, END, 8])
  np.testing.assert_array_equal(images[:, 0, 0, 0], [1])


@pytest.mark.parametrize("length", range(9, 15))  # every cut inside the second run
def test_fit_cut_inside_a_run_drops_that_run(length):
  tokens, _, images = fit([7, MARKER, 8, MARKER, 9], image_stack(1, 2), length=length)
  np.testing.assert_array_equal(tokens, [7, START, 3, 3, 3, 3, END, 8])
  np.testing.assert_array_equal(images[:, 0, 0, 0], [1])


def test_fit_drops_a_trailing_run_and_its_image():
  tokens, _, images = fit([7, MARKER], image_stack(1))
  np.testing.assert_array_equal(tokens, [7])
  assert images.shape == (0, *SHAPE)
  # The length cut lands exactly after a run's end token.
  tokens, _, images = fit([7, MARKER, 8, 9], image_stack(1), length=7)
  np.testing.assert_array_equal(tokens, [7])
  assert images.shape == (0, *SHAPE)


def test_fit_drops_touching_trailing_runs_without_start_end_ids():
  tokens, _, images = fit([7, MARKER, MARKER], image_stack(1, 2), start_id=None, end_id=None)
  np.testing.assert_array_equal(tokens, [7])
  assert len(images) == 0
  # Cut inside the second of two touching runs: both go (the first is then last).
  tokens, _, images = fit([7, MARKER, MARKER, 8], image_stack(1, 2), length=7, start_id=None,
                          end_id=None)
  np.testing.assert_array_equal(tokens, [7])
  assert len(images) == 0


def test_fit_leaves_fitting_examples_alone():
  tokens, loss_mask = expanded([7, MARKER, 8])
  out_tokens, out_mask, images = packing.fit_example(tokens, loss_mask, image_stack(5),
                                                     len(tokens), 1, MARKER, START, END)
  np.testing.assert_array_equal(out_tokens, tokens)
  np.testing.assert_array_equal(out_mask, loss_mask)
  assert len(images) == 1


def test_fit_can_leave_nothing():
  tokens, _, images = fit([MARKER, 7], image_stack(1), length=3)
  assert tokens.shape == (0,) and images.shape == (0, *SHAPE)


def test_fit_refuses_malformed_runs():
  with pytest.raises(ValueError, match="2 image"):
    fit([7, MARKER, 8], image_stack(1, 2))
  with pytest.raises(ValueError, match="multiple of num_image_tokens"):
    packing.fit_example([7, MARKER, MARKER, 8], [1] * 4, image_stack(1), 10, 2, MARKER,
                        num_image_tokens=M)
  with pytest.raises(ValueError, match="3 placeholder"):
    packing.fit_example([7, MARKER, MARKER, MARKER, 8], [1] * 5, image_stack(1, 2), 10, 2,
                        MARKER)
  with pytest.raises(ValueError, match="image_start"):
    tokens, loss_mask = expanded([7, MARKER, 8], start_id=None)
    packing.fit_example(tokens, loss_mask, image_stack(1), 10, 2, MARKER, START, END)


# --- Packer: the batch contract -------------------------------------------------


@pytest.mark.parametrize("pack", [True, False])
@pytest.mark.parametrize("start_id,end_id", RUN_IDS)
def test_packing_preserves_everything_and_keeps_images_aligned(start_id, end_id, pack):
  seed = 10 * RUN_IDS.index((start_id, end_id)) + pack
  examples = fitted_examples(seed=seed, count=150,
                             start_id=start_id, end_id=end_id)
  sequences = run_packer(make_packer(start_id, end_id, pack), examples)
  batch = packing.stack(sequences)
  assert {k: (v.dtype, v.shape[1:]) for k, v in batch.items()} == {
      "decoder_target_tokens": (np.int32, (LENGTH,)),
      "decoder_input_tokens": (np.int32, (LENGTH,)),
      "decoder_loss_weights": (np.int32, (LENGTH,)),
      "decoder_segment_ids": (np.int32, (LENGTH,)),
      "decoder_positions": (np.int32, (LENGTH,)),
      "images": (np.uint8, (MAX_IMAGES, *SHAPE)),
      "image_mask": (np.bool_, (MAX_IMAGES,))}

  # The model's own check on what it will see.
  check_image_placeholders(batch["decoder_input_tokens"], batch["image_mask"], M, MARKER)
  check_image_placeholders(batch["decoder_target_tokens"], batch["image_mask"], M, MARKER)

  # Every token, loss and image comes back, in order.
  kept = [e for e in examples if len(e["tokens"])]
  unpacked = [e for s in sequences for e in packing.unpack(s, MARKER, M)]
  assert len(unpacked) == len(kept)
  assert sum(len(e["images"]) for e in kept) > 50  # the draw did exercise images
  for got, want in zip(unpacked, kept):
    np.testing.assert_array_equal(got["tokens"], want["tokens"])
    np.testing.assert_array_equal(
        got["loss_mask"], want["loss_mask"] * ~special(want["tokens"], start_id, end_id))
    np.testing.assert_array_equal(got["images"], want["images"])

  for seq in sequences:
    check_sequence_layout(seq, start_id, end_id)
    if not pack:
      assert seq["decoder_segment_ids"].max() == 1
  if pack:
    check_next_fit(sequences)


def check_sequence_layout(seq, start_id, end_id):
  targets, inputs = seq["decoder_target_tokens"], seq["decoder_input_tokens"]
  segments, positions = seq["decoder_segment_ids"], seq["decoder_positions"]
  weights = seq["decoder_loss_weights"]
  padding = segments == 0
  used = int(np.count_nonzero(~padding))
  assert not padding[:used].any(), "segments are contiguous from the start"
  assert (targets[padding] == 0).all() and (inputs[padding] == 0).all()
  assert (positions[padding] == 0).all() and (weights[padding] == 0).all()
  assert (weights[special(targets, start_id, end_id)] == 0).all()
  assert set(np.unique(weights)) <= {0, 1}
  ids = segments[:used]
  assert ids[0] == 1 and set(np.diff(ids)) <= {0, 1}
  for segment in range(1, int(ids.max(initial=0)) + 1):
    where = np.flatnonzero(segments == segment)
    np.testing.assert_array_equal(positions[where], np.arange(len(where)))
    np.testing.assert_array_equal(inputs[where], np.concatenate([[0], targets[where][:-1]]))
  runs = placeholder_run_lengths(inputs)
  assert runs.sum() == M * seq["image_mask"].sum()
  if start_id is not None or end_id is not None:
    assert (runs == M).all()  # delimited runs never touch
  num_real = int(seq["image_mask"].sum())
  assert seq["image_mask"][:num_real].all() and (seq["images"][num_real:] == 0).all()


def check_next_fit(sequences):
  """The first example of each sequence did not fit in the one before."""
  for before, after in zip(sequences, sequences[1:]):
    used_tokens = int(np.count_nonzero(before["decoder_segment_ids"]))
    used_images = int(before["image_mask"].sum())
    first = after["decoder_segment_ids"] == 1
    first_tokens = int(np.count_nonzero(first))
    first_images = int(np.count_nonzero(after["decoder_target_tokens"][first] == MARKER)) // M
    assert (used_tokens + first_tokens > LENGTH or used_images + first_images > MAX_IMAGES)


def test_loss_weights_skip_the_prompt_and_image_runs():
  tokens, loss_mask = packing.expand_image_markers([20, MARKER, 21, 22, MARKER, 23, EOS],
                                                   [0, 0, 0, 1, 1, 1, 1], MARKER, 2, START, END)
  packer = packing.Packer(16, 2, SHAPE, MARKER, START, END, pack=False, num_image_tokens=2)
  [seq] = packer.add({"tokens": tokens, "loss_mask": loss_mask, "images": image_stack(1, 2)})
  # tokens: 20 S 3 3 E 21 22 S 3 3 E 23 EOS, then padding
  np.testing.assert_array_equal(seq["decoder_loss_weights"],
                                [0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 1, 0, 0, 0])
  np.testing.assert_array_equal(seq["decoder_input_tokens"][:14],
                                [0, 20, START, 3, 3, END, 21, 22, START, 3, 3, END, 23, 0])


def test_segments_positions_and_inputs_restart_per_example():
  packer = packing.Packer(10, 2, SHAPE, MARKER, pack=True)
  assert packer.add({"tokens": [7, 8, 9], "loss_mask": [1, 1, 1]}) == []
  assert packer.add({"tokens": [10, 11], "loss_mask": [1, 1]}) == []
  [seq] = packer.flush()
  np.testing.assert_array_equal(seq["decoder_segment_ids"], [1, 1, 1, 2, 2, 0, 0, 0, 0, 0])
  np.testing.assert_array_equal(seq["decoder_positions"], [0, 1, 2, 0, 1, 0, 0, 0, 0, 0])
  np.testing.assert_array_equal(seq["decoder_input_tokens"], [0, 7, 8, 0, 10, 0, 0, 0, 0, 0])
  np.testing.assert_array_equal(seq["decoder_target_tokens"], [7, 8, 9, 10, 11, 0, 0, 0, 0, 0])
  assert packer.flush() == []


def test_image_slots_start_a_new_sequence_when_full():
  packer = packing.Packer(40, 1, SHAPE, MARKER, START, END, pack=True)
  tokens, loss_mask = expanded([7, MARKER, 8])
  assert packer.add({"tokens": tokens, "loss_mask": loss_mask, "images": image_stack(1)}) == []
  [first] = packer.add({"tokens": tokens, "loss_mask": loss_mask, "images": image_stack(2)})
  [second] = packer.flush()
  assert first["images"][0, 0, 0, 0] == 1 and second["images"][0, 0, 0, 0] == 2
  assert first["decoder_segment_ids"].max() == second["decoder_segment_ids"].max() == 1


@pytest.mark.parametrize("pack", [True, False])
def test_an_example_of_exactly_length_tokens_fits_alone(pack):
  tokens, loss_mask = expanded([7, 8, MARKER, 9])
  length = len(tokens)
  fitted = packing.fit_example(tokens, loss_mask, image_stack(4), length, 1, MARKER, START, END)
  np.testing.assert_array_equal(fitted[0], tokens)
  packer = packing.Packer(length, 1, SHAPE, MARKER, START, END, pack=pack)
  [seq] = packer.add(dict(zip(("tokens", "loss_mask", "images"), fitted)))
  assert (seq["decoder_segment_ids"] == 1).all()
  np.testing.assert_array_equal(seq["decoder_target_tokens"], tokens)
  assert seq["image_mask"].tolist() == [True]
  assert packer.flush() == []


def test_packer_refuses_examples_that_would_misalign():
  packer = packing.Packer(8, 1, SHAPE, MARKER, START, END, num_image_tokens=M)
  with pytest.raises(ValueError, match="exceeds"):
    packer.add({"tokens": np.arange(9) + 6, "loss_mask": np.ones(9)})
  with pytest.raises(ValueError, match="ends inside an image run"):
    packer.add({"tokens": [7, START, 3, 3, 3, 3, END], "loss_mask": np.zeros(7),
                "images": image_stack(1)})
  with pytest.raises(ValueError, match="2 placeholders per image, expected 4"):
    packer.add({"tokens": [7, START, 3, 3, END, 8], "loss_mask": np.zeros(6),
                "images": image_stack(1)})
  with pytest.raises(ValueError, match="3 placeholder"):
    packing.Packer(8, 2, SHAPE, MARKER).add({"tokens": [7, 3, 3, 3, 8], "loss_mask": np.zeros(5),
                                            "images": image_stack(1, 2)})
  with pytest.raises(ValueError, match="pad id"):
    packing.Packer(8, 1, SHAPE, 0)


def test_empty_examples_are_skipped():
  packer = packing.Packer(8, 1, SHAPE, MARKER, pack=False)
  assert packer.add({"tokens": np.zeros(0, np.int32), "loss_mask": np.zeros(0)}) == []
  assert packer.flush() == []


def test_empty_sequence_is_all_padding():
  seq = make_packer(START, END, pack=True).empty_sequence()
  assert not seq["image_mask"].any() and seq["images"].shape == (MAX_IMAGES, *SHAPE)
  for key in ("decoder_target_tokens", "decoder_input_tokens", "decoder_loss_weights",
              "decoder_segment_ids", "decoder_positions"):
    assert seq[key].shape == (LENGTH,) and not seq[key].any()
  assert packing.unpack(seq, MARKER) == []


@pytest.mark.parametrize("start_id,end_id", RUN_IDS)
def test_inferred_num_image_tokens_fits_the_same(start_id, end_id):
  explicit = fitted_examples(seed=11, count=80, start_id=start_id, end_id=end_id)
  inferred = fitted_examples(seed=11, count=80, start_id=start_id, end_id=end_id,
                             num_image_tokens=None)
  for a, b in zip(explicit, inferred):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


@pytest.mark.parametrize("start_id,end_id", [(START, END), (None, None)])
def test_restored_state_continues_identically(start_id, end_id, tmp_path):
  examples = fitted_examples(seed=7, count=60, start_id=start_id, end_id=end_id)
  original = make_packer(start_id, end_id, pack=True)
  for example in examples[:31]:
    original.add(example)
  state = original.get_state()
  assert len(state["segment_lengths"]) >= 1  # a partially filled sequence
  # Through a file, as a checkpoint would store it.
  np.savez(tmp_path / "state.npz", **state)
  restored = make_packer(start_id, end_id, pack=True)
  restored.set_state(dict(np.load(tmp_path / "state.npz")))
  want = run_packer(original, examples[31:])
  got = run_packer(restored, examples[31:])
  assert len(got) == len(want)
  for a, b in zip(got, want):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_state_of_a_different_shape_is_refused():
  state = make_packer(START, END, pack=True).get_state()
  with pytest.raises(ValueError, match="length=48"):
    make_packer(START, END, pack=True, length=32).set_state(state)


def test_stack_batches_every_key():
  packer = make_packer(START, END, pack=False)
  sequences = run_packer(packer, fitted_examples(seed=3, count=5, start_id=START, end_id=END))
  batch = packing.stack(sequences)
  assert batch["images"].shape == (len(sequences), MAX_IMAGES, *SHAPE)
  assert batch["decoder_target_tokens"].shape == (len(sequences), LENGTH)
  with pytest.raises(ValueError):
    packing.stack([])
