"""MM1's data ablation: which pre-training mixture gives which ability.

MM1 (Sec. 3.3) finds: interleaved data drives few-shot and text-only
performance, captions drive zero-shot captioning, text-only data keeps text
ability, and a 45:45:10 (interleaved : caption : text) mixture balances them.
Here: the tiny dense model pre-trained from scratch on each bundled easy-vqa
+ Shakespeare mixture; 0-shot captioning (CIDEr), 4- and 8-shot VQA, and
perplexity on held-out Shakespeare plays.

    python -m mm1_jax.ablate --suite=configs/ablations/mm1_data.py --workdir=DIR
"""

from mm1_jax.ablation.suite import Suite, Variant

MIXTURES = (
    ("caption only", "mm1_caption_only"),
    ("interleaved only", "mm1_interleaved_only"),
    ("interleaved:caption 50:50", "mm1_interleaved_caption_50_50"),
    ("45:45:10 (MM1)", "mm1_pretrain"),
    ("33:33:33", "mm1_equal_33_33_33"),
    ("image-text 91:9", "mm1_image_text_91_9"),
)


def get_suite(preset="full"):
  quick = preset == "quick"
  mixtures = MIXTURES[:2] if quick else MIXTURES
  return Suite(
      name="mm1_data",
      description=__doc__.split("\n\n")[1],
      base="configs/tiny.py:dense",
      variants=tuple(Variant(label, {"data.mixture": mixture}) for label, mixture in mixtures),
      # ~7 minutes a run on 2 CPU cores: 6 variants x 2 seeds in ~90 minutes.
      num_steps=2 if quick else 300,
      seeds=(0,) if quick else (0, 1),
      overrides={"optimizer.warmup_steps": 1 if quick else 30,
                 "train.checkpoint_every": 2 if quick else 100},
      # quick: one evaluation command per run (the test suite runs it).
      fewshot=((("easy_vqa_caption", (0,)),) if quick else
               (("easy_vqa_caption", (0,)), ("easy_vqa_vqa", (4, 8)))),
      perplexity_tasks=("shakespeare_text",),
      max_queries=2 if quick else 100)
