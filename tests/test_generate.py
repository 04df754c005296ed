"""The generate command: checkpoint restore, prompt layout, images, bad input."""

import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from configs import tiny
from mm1_jax import generate, testing
from mm1_jax.data import tokenizer
from mm1_jax.experiment import Experiment
from mm1_jax.evaluation import decoding
from mm1_jax.training import checkpoint as checkpoint_lib
from process_env import one_device_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "<image> Question: What shape is in the image? Answer:"
OVERRIDES = ["--config.model.max_images=1", "--config.data.seq_len=64"]


def tiny_config(**llm):
  config = tiny.get_config()
  config.model.max_images = 1
  config.data.seq_len = 64
  config.model.llm.update(llm)
  return Experiment.from_config(config)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A workdir holding a step-1 checkpoint of tiny_config(): random params,
  a zero optimizer state (built on the host: compiling the init is slow)."""
  workdir = str(tmp_path_factory.mktemp("run"))
  testing.write_random_checkpoint(tiny_config(), workdir, step=1)
  return workdir


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
  """A 50x80 PNG (not square: the pipeline's resize must apply)."""
  path = tmp_path_factory.mktemp("images") / "shape.png"
  pixels = np.random.default_rng(0).integers(0, 256, (50, 80, 3), dtype=np.uint8)
  path.write_bytes(tf.io.encode_png(pixels).numpy())
  return str(path)


def test_prompt_is_laid_out_like_the_training_inputs(image_path):
  config = tiny_config()
  model, data = config.model, config.data
  vocabulary = tokenizer.get_vocabulary()
  images = generate.read_images([image_path], model, data)
  assert len(images) == 1 and images[0].layout == (1, 1)
  assert images[0].slots.shape == (1, 64, 64, 3) and images[0].slots.dtype == np.uint8
  tokens = generate.encode_prompt(PROMPT, images, model, data, vocabulary)
  # The 0 start token, then the prompt with its marker expanded to 16 placeholders.
  marker = model.image_placeholder_id
  expected = [0] + [t for i in vocabulary.encode(PROMPT) for t in ([i] * 16 if i == marker else [i])]
  np.testing.assert_array_equal(tokens, expected)
  assert np.count_nonzero(tokens == marker) == 16


def test_generate_restores_the_checkpoint_and_continues(workdir, image_path):
  config = tiny_config()
  decode_config = decoding.DecodeConfig(max_new_tokens=6)
  text = generate.generate(config, workdir, [image_path], PROMPT, decode_config)
  assert isinstance(text, str) and text

  # The same continuation from the command line.
  result = subprocess.run(
      [sys.executable, "-m", "mm1_jax.generate", "--config=configs/tiny.py", *OVERRIDES,
       f"--workdir={workdir}", f"--image={image_path}", f"--prompt={PROMPT}",
       "--max_new_tokens=6"],
      cwd=REPO, env=one_device_env(), capture_output=True, text=True,
      timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.rstrip("\n") == text


def test_a_checkpoint_of_another_config_is_refused_as_in_training(workdir, image_path):
  with pytest.raises(checkpoint_lib.CheckpointMismatchError,
                     match=r"does not match the train state of this config(.|\n)*"
                           r"params/llm/blocks/layer_0/mlp/gate/kernel: checkpoint "
                           r"\(2, 128, 256\) vs config \(2, 128, 384\)"):
    generate.generate(tiny_config(mlp_dim=384), workdir, [image_path], PROMPT,
                      decoding.DecodeConfig(max_new_tokens=2))


def test_bad_input_is_named(workdir, image_path, tmp_path):
  config, decode_config = tiny_config(), decoding.DecodeConfig(max_new_tokens=2)
  missing = str(tmp_path / "nope.png")
  with pytest.raises(generate.GenerateInputError, match=f"image file not found: {missing}"):
    generate.generate(config, workdir, [missing], PROMPT, decode_config)
  garbage = tmp_path / "garbage.png"
  garbage.write_bytes(b"this is not an image")
  with pytest.raises(generate.GenerateInputError, match=f"cannot decode image {garbage}"):
    generate.generate(config, workdir, [str(garbage)], PROMPT, decode_config)
  for empty in ("", "  \n"):
    with pytest.raises(generate.GenerateInputError, match="the prompt is empty"):
      generate.generate(config, workdir, [], empty, decode_config)
  with pytest.raises(generate.GenerateInputError,
                     match=r"1 <image> marker\(s\) but 2 --image file\(s\)"):
    generate.generate(config, workdir, [image_path, image_path], PROMPT, decode_config)
  with pytest.raises(FileNotFoundError, match="no checkpoints in"):
    generate.generate(config, str(tmp_path / "fresh"), [image_path], PROMPT, decode_config)
  assert not (tmp_path / "fresh").exists()

  # From the command line: a one-line error, exit status 1.
  result = subprocess.run(
      [sys.executable, "-m", "mm1_jax.generate", "--config=configs/tiny.py",
       f"--workdir={workdir}", f"--image={missing}", f"--prompt={PROMPT}"],
      cwd=REPO, env=one_device_env(), capture_output=True, text=True,
      timeout=300)
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1] == f"Error: image file not found: {missing}"
