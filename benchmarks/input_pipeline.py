"""Throughput of the multimodal input pipeline (SeqIO mixture -> packed batches).

    python benchmarks/input_pipeline.py --config=configs/tiny.py
    python benchmarks/input_pipeline.py --config=configs/mm1_3b.py \
        --config.data.seq_len=4096 --config.data.batch_size=8     # 378px images

Prints examples/s, real images/s (decoded from PNG and resized to the
model's resolution), non-padding tokens/s, and images/s per CPU core, after
a warm-up. The data comes from the bundled sources (prepared on first use).
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from mm1_jax.experiment import Experiment  # noqa: E402
from mm1_jax.data import pipeline  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Experiment config.")
_WARMUP = flags.DEFINE_integer("warmup_batches", 5, "Batches read before timing.")
_SECONDS = flags.DEFINE_float("seconds", 20.0, "How long to time.")


def main(argv):
  del argv
  config = Experiment.from_config(_CONFIG.value)
  model = config.model
  source = pipeline.MultimodalInput(config.data, model, process_index=0, process_count=1)
  for _ in range(_WARMUP.value):
    next(source)
  examples0, images, tokens, batches = source.num_examples, 0, 0, 0
  start = time.perf_counter()
  while time.perf_counter() - start < _SECONDS.value:
    batch = next(source)
    images += int(batch["image_mask"].sum())
    tokens += int((batch["decoder_segment_ids"] > 0).sum())
    batches += 1
  elapsed = time.perf_counter() - start
  examples = source.num_examples - examples0
  cores = os.cpu_count()
  size = model.encoder.image_size
  print(f"mixture {config.data.mixture}, {size}px, batch {config.data.batch_size} x "
        f"{config.data.seq_len} tokens, pack={config.data.pack}, {cores} CPU cores")
  print(f"{batches / elapsed:8.2f} batches/s  {examples / elapsed:9.1f} examples/s  "
        f"{images / elapsed:9.1f} images/s ({images / elapsed / cores:.1f} per core)  "
        f"{tokens / elapsed:10.0f} tokens/s  (skipped records: {source.num_skipped})")


if __name__ == "__main__":
  app.run(main)
