"""The scaling-LLaVA study's data ablation: language-only conversations in visual SFT.

Lu et al. (2023) find that mixing language-only instruction data into visual
instruction tuning adds ~2 points and keeps the model's language ability.
Here: the tiny dense model pre-trained once on mm1_pretrain, then tuned on the
bundled conversations (the mm1 chat template, encoder frozen) with and
without chatterbot's text-only dialogues (visual_sft vs visual_sft_text,
~13% of examples text-only); 0-shot easy-vqa VQA in the chat format, and
held-out perplexity on chatterbot's test dialogues (the answers) and on
Shakespeare plays kept out of training.

    python -m mm1_jax.ablate --suite=configs/ablations/llava_mixing.py --workdir=DIR
"""

from mm1_jax.ablation.suite import Pretrain, Suite, Variant


def get_suite(preset="full"):
  quick = preset == "quick"
  return Suite(
      name="llava_mixing",
      description=__doc__.split("\n\n")[1],
      pretrain=Pretrain("configs/tiny.py:dense", num_steps=2 if quick else 300,
                        label="pre-training (mm1_pretrain)",
                        overrides={"optimizer.warmup_steps": 1 if quick else 30,
                                   "train.checkpoint_every": 2 if quick else 100}),
      base="configs/tiny.py:dense,sft",
      variants=(Variant("visual SFT", {"data.mixture": "visual_sft"}),
                Variant("visual SFT + text conversations", {"data.mixture": "visual_sft_text"})),
      # ~5 minutes a run on 2 CPU cores: 2 variants x 3 seeds + the pre-training in ~35 minutes.
      num_steps=2 if quick else 200,
      seeds=(0,) if quick else (0, 1, 2),
      overrides={"optimizer.warmup_steps": 1 if quick else 20,
                 "train.checkpoint_every": 2 if quick else 100},
      fewshot=(("easy_vqa_vqa", (0,)),),
      prompt_format="chat",
      perplexity_tasks=("chatterbot_chat", "shakespeare_text"),
      max_queries=2 if quick else 100)
