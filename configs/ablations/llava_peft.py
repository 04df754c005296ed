"""The scaling-LLaVA study's fine-tuning ablation: LoRA ~ full fine-tuning, QLoRA ~ LoRA.

Lu et al. (2023) find LoRA at rank 64 matches full fine-tuning (33B: 71.8 vs
72.0) and QLoRA-64 matches LoRA (71.6), at a fraction of the trainable
parameters and memory; the LoRA runs use alpha = 2 x rank and 5x the full
run's learning rate (1e-4 vs 2e-5). Here: the tiny dense model pre-trained
once on mm1_pretrain, then instruction-tuned on the bundled conversations
(visual_sft, the mm1 chat template, encoder frozen) four ways from that one
checkpoint: full, LoRA r=8, LoRA r=64 and QLoRA r=64 (NF4 base) on every
linear of the LLM's layers; 0-shot easy-vqa VQA in the chat format, and what
each costs (trainable parameters, step time, peak memory).

    python -m mm1_jax.ablate --suite=configs/ablations/llava_peft.py --workdir=DIR
"""

from mm1_jax.ablation.suite import Pretrain, Suite, Variant

FULL_LEARNING_RATE = 3e-4  # configs/tiny.py:sft's.
LORA_LEARNING_RATE = 5 * FULL_LEARNING_RATE  # The paper's ratio (1e-4 vs 2e-5).


def lora(rank, quantize="none"):
  return {"model.lora.rank": rank, "model.lora.alpha": 2.0 * rank,
          "model.lora.quantize": quantize, "optimizer.learning_rate": LORA_LEARNING_RATE}


def get_suite(preset="full"):
  quick = preset == "quick"
  variants = [Variant("full", {}), Variant("LoRA r=8", lora(8)),
              Variant("LoRA r=64", lora(64)), Variant("QLoRA r=64", lora(64, "nf4"))]
  if quick:
    variants = [variants[0], variants[-1]]
  return Suite(
      name="llava_peft",
      description=__doc__.split("\n\n")[1],
      pretrain=Pretrain("configs/tiny.py:dense", num_steps=2 if quick else 300,
                        label="pre-training (mm1_pretrain)",
                        overrides={"optimizer.warmup_steps": 1 if quick else 30,
                                   "train.checkpoint_every": 2 if quick else 100}),
      base="configs/tiny.py:dense,sft",
      variants=tuple(variants),
      # ~4 minutes a run on 2 CPU cores: 4 variants x 2 seeds + the pre-training in ~45 minutes.
      num_steps=2 if quick else 200,
      seeds=(0,) if quick else (0, 1),
      overrides={"optimizer.warmup_steps": 1 if quick else 20,
                 "train.checkpoint_every": 2 if quick else 100},
      fewshot=(("easy_vqa_vqa", (0,)),),
      prompt_format="chat",
      max_queries=2 if quick else 100)
