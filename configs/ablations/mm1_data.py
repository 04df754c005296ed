"""MM1's data ablation: which pre-training mixture gives which ability.

MM1 (Sec. 3.3) finds: interleaved data drives few-shot and text-only
performance, captions drive zero-shot captioning, text-only data keeps text
ability, and a 45:45:10 (interleaved : caption : text) mixture balances them.
Here: the tiny dense model pre-trained from scratch on each bundled easy-vqa
+ Shakespeare mixture; 0-shot captioning (CIDEr), 4- and 8-shot VQA, and
perplexity on held-out Shakespeare plays.

    python -m mm1_jax.ablate --suite=configs/ablations/mm1_data.py --workdir=DIR

`--suite=configs/ablations/mm1_data.py:emoji` runs the same mixtures over the
Noto emoji (real drawings with human-written names) instead of easy-vqa's
synthetic shapes: captioning is naming the emoji, VQA asks its category and
subcategory (question prior on the test split: 38%).
"""

from mm1_jax.ablation.suite import Suite, Variant

# (label, easy-vqa mixture, emoji mixture): interleaved : caption : text.
MIXTURES = (
    ("caption only", "mm1_caption_only", "emoji_caption_only"),
    ("interleaved only", "mm1_interleaved_only", "emoji_interleaved_only"),
    ("interleaved:caption 50:50", "mm1_interleaved_caption_50_50",
     "emoji_interleaved_caption_50_50"),
    ("45:45:10 (MM1)", "mm1_pretrain", "emoji_pretrain"),
    ("33:33:33", "mm1_equal_33_33_33", "emoji_equal_33_33_33"),
    ("image-text 91:9", "mm1_image_text_91_9", "emoji_image_text_91_9"),
)
DATASETS = ("easy_vqa", "emoji")


def get_suite(preset="full", dataset="easy_vqa"):
  if dataset not in DATASETS:
    raise ValueError(f"mm1_data: unknown dataset {dataset!r}; use one of {DATASETS}.")
  quick = preset == "quick"
  column = DATASETS.index(dataset) + 1
  mixtures = [(row[0], row[column]) for row in (MIXTURES[:2] if quick else MIXTURES)]
  caption, vqa = f"{dataset}_caption", f"{dataset}_vqa"
  return Suite(
      name="mm1_data" + ("" if dataset == "easy_vqa" else f"_{dataset}"),
      description=__doc__.split("\n\n")[1],
      base="configs/tiny.py:dense",
      variants=tuple(Variant(label, {"data.mixture": mixture}) for label, mixture in mixtures),
      # ~7 minutes a run on 2 CPU cores: 6 variants x 2 seeds in ~90 minutes.
      num_steps=2 if quick else 300,
      seeds=(0,) if quick else (0, 1),
      overrides={"optimizer.warmup_steps": 1 if quick else 30,
                 "train.checkpoint_every": 2 if quick else 100},
      # quick: one evaluation command per run (the test suite runs it).
      fewshot=(((caption, (0,)),) if quick else ((caption, (0,)), (vqa, (4, 8)))),
      perplexity_tasks=("shakespeare_text",),
      max_queries=2 if quick else 100)
