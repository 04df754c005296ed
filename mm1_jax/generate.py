"""Continue a multimodal prompt with the latest checkpoint of a training run.

    python -m mm1_jax.generate --config=configs/tiny.py --workdir=workdirs/tiny \
        --image=shape.png --prompt="<image> Question: What shape is in the image? Answer:" \
        [--method=greedy|sample|beam --max_new_tokens=32 --temperature=0.7 --top_k=40
         --top_p=0.9 --num_beams=4 --length_penalty=0.0 --seed=0]

Use the config (and overrides) the run was trained with: its parameters are
restored from {workdir}/checkpoints, and a checkpoint of another config is
refused with the same message as training. Each `<image>` in the prompt
stands for the next --image, in order; the prompt is tokenised with the
config's vocabulary and laid out exactly as the data pipeline lays out
training inputs (markers expanded to placeholder runs, the 0 start token in
front), and images are decoded and resized as the pipeline does. Prints the
continuation (up to EOS).

mm1_jax/chat.py shares this module's pieces: the decoding flags, reading
images, laying out prompt ids (layout_prompt) and PromptDecoder (a restored
model + the KV-cache Generator, prompts padded to length buckets).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Sequence

import numpy as np
from absl import flags
from ml_collections import config_flags

from mm1_jax import cli

if TYPE_CHECKING:
  import seqio


def define_decode_flags(max_new_tokens: int = 32) -> None:
  """The decoding flags (shared with mm1_jax.chat); read back by decode_config_from_flags."""
  flags.DEFINE_enum("method", "greedy", ["greedy", "sample", "beam"], "Decoding method.")
  flags.DEFINE_integer("max_new_tokens", max_new_tokens, "Most tokens to generate.")
  flags.DEFINE_float("temperature", 1.0, "Sampling temperature.")
  flags.DEFINE_integer("top_k", 0, "Sample from the k most likely tokens (0: all).")
  flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1: all).")
  flags.DEFINE_integer("num_beams", 4, "Beams of beam search.")
  flags.DEFINE_float("length_penalty", 0.0,
                     "Beam score = log-prob / length ** this.")
  flags.DEFINE_integer("seed", 0, "Sampling seed.")


def decode_config_from_flags():
  """The DecodeConfig of the flags of define_decode_flags (EOS and pad ids: the
  defaults, set from the vocabulary by the command)."""
  from mm1_jax.evaluation.decoding import DecodeConfig

  FLAGS = flags.FLAGS
  return DecodeConfig(
      max_new_tokens=FLAGS.max_new_tokens, method=FLAGS.method, temperature=FLAGS.temperature,
      top_k=FLAGS.top_k, top_p=FLAGS.top_p, num_beams=FLAGS.num_beams,
      length_penalty=FLAGS.length_penalty)


def define_flags() -> None:
  """The command-line flags; defined only when run as a program, so that
  other entry points (and tests) can import this module."""
  config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Workdir of the training run.")
  flags.DEFINE_multi_string("image", [], "Image file (local or gs://) for the next <image> "
                            "of the prompt.")
  flags.DEFINE_string("prompt", None, "Prompt text; <image> marks where an image goes.")
  define_decode_flags()


class GenerateInputError(ValueError):
  """A prompt or image the command cannot use; the message names it."""


def restore_params(experiment, workdir: str):
  """The latest checkpoint's parameters, placed on the run's mesh.

  Returns (params, model_config, mesh). Raises FileNotFoundError when the
  workdir has no checkpoint, and checkpoint.CheckpointMismatchError (the
  message training gives) when it holds another config's.
  """
  from mm1_jax.training import trainer
  params, model_config, mesh, _ = trainer.restore_params(experiment, workdir)
  return params, model_config, mesh


@dataclasses.dataclass(frozen=True)
class PromptImage:
  """One image as the model takes it.

  slots: uint8 [n, S, S, 3]: the resized image (n = 1), or with
  data.image_split its crops and overview in sequence order. layout: its
  (rows, cols) of crops ((1, 1) when not split).
  """
  slots: np.ndarray
  layout: tuple[int, int] = (1, 1)


def stack_images(images: Sequence[PromptImage], model_config) -> tuple[np.ndarray, np.ndarray]:
  """(slots uint8 [n, S, S, 3]: every image's slots in order (n may be 0),
  layouts int32 [k, 2])."""
  size = model_config.encoder.image_size
  slots = (np.concatenate([image.slots for image in images]) if images else
           np.zeros((0, size, size, 3), np.uint8))
  return slots, np.array([image.layout for image in images], np.int32).reshape(-1, 2)


def read_images(paths: Sequence[str], model_config, data_config) -> list[PromptImage]:
  """Decodes and resizes (or splits, data.image_split) image files as the
  data pipeline does; one PromptImage per path.

  Raises GenerateInputError naming a file that is missing or cannot be decoded.
  """
  import tensorflow as tf

  from mm1_jax import paths as workdir_paths
  from mm1_jax.data import image_split
  from mm1_jax.data import images as image_ops
  from mm1_jax.data.config import SplitScheme

  size, scheme = model_config.encoder.image_size, SplitScheme.from_config(data_config)
  decoded = []
  for path in paths:
    # Images may live next to the run, in its gs:// bucket.
    file = workdir_paths.as_path(path)
    if not file.is_file():
      raise GenerateInputError(f"image file not found: {path}")
    encoded = tf.constant([file.read_bytes()])
    try:
      if scheme is None:
        slots = image_ops.decode_and_resize(encoded, size, data_config.image_policy,
                                            pad_color=model_config.encoder.image_mean,
                                            background=data_config.image_background)
        layout = (1, 1)
      else:
        slots, layouts = image_split.decode_and_split(
            encoded, size, data_config.image_policy, scheme,
            pad_color=model_config.encoder.image_mean, background=data_config.image_background)
        layout = tuple(int(v) for v in layouts.numpy()[0])
    except tf.errors.OpError as error:
      raise GenerateInputError(f"cannot decode image {path} (PNG, JPEG, GIF, BMP or WebP "
                               f"expected): {error.message.splitlines()[0]}") from None
    decoded.append(PromptImage(slots.numpy(), layout))
  return decoded


def load_vocabulary(data_config) -> seqio.Vocabulary:
  """The run's vocabulary: data.vocabulary ("" = the bundled one)."""
  from mm1_jax.data import tokenizer
  return tokenizer.get_vocabulary(data_config.vocabulary or None)


def layout_prompt(ids: np.ndarray, images: Sequence[PromptImage], model_config, data_config,
                  vocabulary) -> np.ndarray:
  """The model's input tokens for prompt ids, as training lays them out.

  ids: int32 [n], one <image> marker id per image; images: one PromptImage
  per marker. Each marker becomes its placeholder run(s) (one per slot,
  bracketed when data.image_start_end, row ends with data.image_row_end,
  crop indicators with data.image_crop_indicators) by the data converter;
  the input is the converter's decoder_input_tokens, i.e. the 0 start token
  followed by the whole prompt. Returns int32 [m].
  Raises GenerateInputError when markers and images differ in number or
  their slots exceed model.max_images.
  """
  from mm1_jax.data import packing, tokenizer
  from mm1_jax.data.config import SplitScheme, tokens_per_image
  from mm1_jax.data.converter import MultimodalFeatureConverter

  ids = np.asarray(ids, np.int32)
  marker_id = tokenizer.special_token_ids(vocabulary)["<image>"]
  num_markers = int(np.count_nonzero(ids == marker_id))
  if num_markers != len(images):
    raise GenerateInputError(f"the prompt has {num_markers} <image> marker(s) but "
                             f"{len(images)} image(s); they must match.")
  slots, layouts = stack_images(images, model_config)
  if len(slots) > model_config.max_images:
    what = (f"{num_markers} images" if len(slots) == num_markers else
            f"{num_markers} images in {len(slots)} sub-images (data.image_split)")
    raise GenerateInputError(f"the prompt has {what}; the model takes at most "
                             f"max_images={model_config.max_images}.")
  # An upper bound of the expanded length (each image's most tokens, the EOS
  # below), so the converter's fitting never cuts the prompt.
  seq_len = len(ids) + 1 + num_markers * tokens_per_image(data_config,
                                                          model_config.num_image_tokens)
  scheme = SplitScheme.from_config(data_config)
  converter = MultimodalFeatureConverter(model_config, vocabulary, seq_len, pack=False,
                                         image_start_end=data_config.image_start_end,
                                         image_split=scheme)
  # The pipeline feeds the targets shifted right by one (a 0 start token in
  # front), so the last token of an example is never an input: append EOS
  # to keep the whole prompt.
  example = {"tokens": np.append(ids, vocabulary.eos_id),
             "loss_mask": np.ones(len(ids) + 1, np.int32), "images": slots}
  if scheme is not None:
    example["image_layouts"] = layouts
  prepared = converter.prepare(example)
  [sequence] = converter.convert(prepared)
  length = int(np.count_nonzero(sequence["decoder_segment_ids"]))
  assert length == len(prepared["tokens"]) and packing.PAD_ID == 0
  return sequence["decoder_input_tokens"][:length]


def encode_prompt(prompt: str, images: Sequence[PromptImage], model_config, data_config,
                  vocabulary) -> np.ndarray:
  """The model's input tokens for prompt text, as training would lay it out.

  The text is tokenised like the data tasks' `inputs`, then laid out by
  layout_prompt. Returns int32 [n]. Raises GenerateInputError for an empty
  prompt, or markers that do not match the images.
  """
  from mm1_jax.data import tokenizer

  if not prompt or not prompt.strip():
    raise GenerateInputError("the prompt is empty; pass --prompt=\"...\" (use <image> where "
                             "each --image goes).")
  ids = np.asarray(vocabulary.encode(prompt), np.int32)
  marker_id = tokenizer.special_token_ids(vocabulary)["<image>"]
  num_markers = int(np.count_nonzero(ids == marker_id))
  if num_markers != len(images):
    raise GenerateInputError(f"the prompt has {num_markers} <image> marker(s) but "
                             f"{len(images)} --image file(s) were given; they must match.")
  return layout_prompt(ids, images, model_config, data_config, vocabulary)


def until_stop(ids: Sequence[int], stop_ids: Sequence[int]) -> list[int]:
  """ids up to (not including) the first of stop_ids."""
  ids = [int(i) for i in ids]
  for position, token in enumerate(ids):
    if token in stop_ids:
      return ids[:position]
  return ids


class PromptDecoder:
  """A model's parameters and a KV-cache Generator: one laid-out prompt -> its continuation.

  params / model_config / mesh: as restore_params returns them.
  decode_config: a DecodeConfig whose eos_id ends the decoding loop.
  length_bucket: prompts are right-padded to a multiple of it, so that a
  chat (prompts growing turn by turn) compiles once per bucket, not once per
  turn (the prefill and the decode loop compile per prompt shape).

  decoder(tokens int32 [n], images uint8 [k, S, S, 3] (every image slot:
  stack_images), rng) -> int32 [m]:
  the generated ids, the eos_id that ended them included (m <=
  max_new_tokens).
  """

  def __init__(self, params, model_config, mesh, decode_config, length_bucket: int = 64):
    from mm1_jax.evaluation import decoding

    self.params, self.model_config, self.decode_config = params, model_config, decode_config
    self.length_bucket = length_bucket
    self._generator = decoding.Generator(model_config, decode_config, mesh)

  def __call__(self, tokens: np.ndarray, images: np.ndarray, rng) -> np.ndarray:
    from mm1_jax.evaluation import decoding

    length = self.length_bucket * -(-len(tokens) // self.length_bucket)
    prompts = decoding.make_prompts([tokens], [images], self.model_config,
                                    pad_id=self.decode_config.pad_id, length=length)
    output = self._generator(self.params, prompts, rng)
    return output.tokens[0, :output.lengths[0]]


def generate(experiment, workdir: str, image_paths: Sequence[str], prompt: str,
             decode_config, seed: int = 0) -> str:
  """The continuation of `prompt` (text up to EOS) by the run in `workdir`.

  experiment: the run's mm1_jax.experiment.Experiment.
  """
  import jax

  data_config, model_config = experiment.data, experiment.model
  vocabulary = load_vocabulary(data_config)
  decode_config = dataclasses.replace(decode_config, eos_id=vocabulary.eos_id,
                                      pad_id=vocabulary.pad_id)
  # Input errors first: they should not wait for the checkpoint to load.
  decode_config.validate(model_config.llm.vocab_size)
  images = read_images(image_paths, model_config, data_config)
  tokens = encode_prompt(prompt, images, model_config, data_config, vocabulary)
  params, model_config, mesh = restore_params(experiment, workdir)
  decoder = PromptDecoder(params, model_config, mesh, decode_config)
  generated = decoder(tokens, stack_images(images, model_config)[0], jax.random.key(seed))
  return vocabulary.decode(until_stop(generated, [vocabulary.eos_id]))


def main(argv):
  cli.start(argv)
  from mm1_jax.experiment import Experiment

  FLAGS = flags.FLAGS
  experiment = Experiment.from_config(FLAGS.config, check_init_from=False)
  print(generate(experiment, FLAGS.workdir, FLAGS.image, FLAGS.prompt,
                 decode_config_from_flags(), FLAGS.seed))


if __name__ == "__main__":
  define_flags()
  cli.run(main, required=["config", "workdir", "prompt"], extra_errors=(GenerateInputError,))
