"""MM1's encoder-and-connector ablation: image tokens matter, the connector type less.

MM1 (Sec. 3.2) finds that image resolution and the number of image tokens
matter most and the vision-language connector's architecture matters little.
Here: the tiny dense model pre-trained on image captions (mm1_caption_only)
with 4, 16 or 64 image tokens through each connector (C-Abstractor, average
pooling, attention pooling; the MLP connector keeps all 64 patches); 0-shot
captioning (CIDEr) and 4- and 8-shot VQA. Captions, not the 45:45:10
mixture: after 200 steps of mm1_pretrain the tiny model writes one caption
for every image ("a green rectangle.", the same CIDEr for every connector;
benchmarks/RESULTS.md), so nothing about the image path could show, while
caption-only pre-training grounds its captions within 150 steps (mm1_data).

    python -m mm1_jax.ablate --suite=configs/ablations/mm1_encoder.py --workdir=DIR

`--suite=configs/ablations/mm1_encoder.py:emoji` pre-trains on emoji captions
(the Noto emoji's names) and evaluates emoji captioning and category VQA instead.

`--suite=configs/ablations/mm1_encoder.py:mosaic` is the resolution half, on
the one bundled task where resolution decides: 192 px mosaics of 3 x 3
easy-vqa images, one question about one named cell (easy_vqa_mosaic_vqa).
One run first learns single 64 px images (easy_vqa_vqa); from it each
variant is tuned on the mosaic questions either seeing the mosaic downscaled
to the 64 px encoder (~21 px a cell) or split MM1-style into its nine cells
at full resolution plus the overview (10 image slots), also with an
<image_row_end> token after each row of crops; 0-shot VQA accuracy. A
variant's connector and token count must match the run it starts from, so
this half varies resolution alone (benchmarks/highres_mosaic.py reports the
same comparison per question kind).

`--suite=configs/ablations/mm1_encoder.py:mosaic_long` is issue 19's
acceptance run: the downscaled mosaic against the MM1 split, and the split
with a learned <crop row,col> token before each crop (MM1.5's sub-image
position indicator), 2000 steps each (5x the mosaic suite), 2 seeds, scored
on all 2,000 test questions.
"""

from mm1_jax.ablation.suite import Pretrain, Suite, Variant

CONNECTORS = (("C-Abstractor", "c_abstractor"), ("avg pool", "avg_pool"),
              ("attn pool", "attn_pool"))


DATASETS = {"easy_vqa": "mm1_caption_only", "emoji": "emoji_caption_only"}


def get_suite(preset="full", dataset="easy_vqa"):
  if dataset in ("mosaic", "mosaic_long"):
    return resolution_suite(preset, long=dataset == "mosaic_long")
  if dataset not in DATASETS:
    raise ValueError(f"mm1_encoder: unknown dataset {dataset!r}; use one of "
                     f"{list(DATASETS) + ['mosaic', 'mosaic_long']}.")
  quick = preset == "quick"
  caption, vqa = f"{dataset}_caption", f"{dataset}_vqa"
  variants = [Variant(f"{label} {tokens} tokens",
                      {"model.connector.kind": kind, "model.connector.num_image_tokens": tokens})
              for label, kind in CONNECTORS for tokens in (4, 16, 64)]
  variants.append(Variant("MLP 64 tokens", {"model.connector.kind": "mlp",
                                            "model.connector.num_image_tokens": 64}))
  if quick:
    variants = [variants[0], variants[-1]]
  return Suite(
      name="mm1_encoder" + ("" if dataset == "easy_vqa" else f"_{dataset}"),
      description=__doc__.split("\n\n")[1],
      base="configs/tiny.py:dense",
      variants=tuple(variants),
      # ~4.5 minutes a run on 2 CPU cores: 10 variants x 2 seeds in ~90 minutes.
      num_steps=2 if quick else 200,
      seeds=(0,) if quick else (0, 1),
      overrides={"data.mixture": DATASETS[dataset],
                 "optimizer.warmup_steps": 1 if quick else 20,
                 "train.checkpoint_every": 2 if quick else 100},
      fewshot=(((caption, (0,)),) if quick else ((caption, (0,)), (vqa, (4, 8)))),
      max_queries=2 if quick else 100)


def resolution_suite(preset, long=False):
  """long: downscaled, split and split + crop indicators, 2000 steps, every
  test question (~40 minutes a seed on 2 CPU cores)."""
  quick = preset == "quick"
  split = {"data.image_split": "mm1", "data.image_grids": ((3, 3),)}
  if long:
    # MM1.5's indicators: which crop is which cell, told by a token; 9 more
    # tokens than the 192 a split question needs at most.
    marked = Variant("split + crop indicators", {**split, "data.image_crop_indicators": True,
                                                 "data.seq_len": 208})
  else:
    # LLaVA-NeXT's row ends: which crop is which cell, told by structure.
    marked = Variant("split + row-end tokens", {**split, "data.image_row_end": True})
  variants = (Variant("64 px (mosaic downscaled)", {"data.image_split": "none"}),
              Variant("3x3 crops + overview (MM1 split)", split), marked)
  # Room for the <image_row_end> and <crop r,c> ids after the tokenizer's
  # 4,096 (embedding rows in every stage, so that each variant can start from
  # the one pre-training).
  vocab = {"model.llm.vocab_size": 4160}
  num_steps = 2 if quick else (2000 if long else 400)
  return Suite(
      name="mm1_encoder_mosaic" + ("_long" if long else ""),
      description=__doc__.split("\n\n")[5 if long else 4],
      pretrain=Pretrain("configs/tiny.py:dense", num_steps=2 if quick else 300,
                        label="single images (easy_vqa_vqa)",
                        overrides={**vocab, "data.mixture": "easy_vqa_vqa",
                                   "optimizer.warmup_steps": 1 if quick else 30,
                                   "train.checkpoint_every": 2 if quick else 100}),
      base="configs/tiny.py:dense,mosaic",
      variants=(variants[0], variants[-1]) if quick else variants,
      num_steps=num_steps,
      seeds=(0,) if quick else (0, 1),
      overrides={**vocab, "optimizer.warmup_steps": 1 if quick else 20,
                 "train.checkpoint_every": 2 if quick else (500 if long else 200)},
      fewshot=(("easy_vqa_mosaic_vqa", (0,)),),
      # 0: all 2,000 test questions.
      max_queries=2 if quick else (0 if long else 1000))
