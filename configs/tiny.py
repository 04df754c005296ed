"""Tiny MM1 that runs in seconds on a laptop CPU: ViT + C-Abstractor + LLM.

64px images (the bundled easy-vqa size), patch 8 -> 8x8 patches pooled to
16 image tokens; a 4-layer LLM of width 128. `--config=configs/tiny.py:dense`
gives the dense LLM; the default is MoE (8 experts, top-2, every 2nd layer).
Float32: bfloat16 matmuls are slow on CPUs. Trains on mm1_pretrain (bundled
easy-vqa + Shakespeare) with the bundled 4k tokenizer.

`--config=configs/tiny.py:sft` instruction-tunes a pre-trained tiny run on
the bundled conversations (visual_sft, the bundled tokenizer's <|user|> /
<|assistant|> template, loss on the answers only; encoder frozen), starting
from workdirs/tiny (or `from_workdir=DIR`):

    make train
    python -m mm1_jax.train --config=configs/tiny.py:sft --workdir=workdirs/tiny_sft
    python -m mm1_jax.chat --config=configs/tiny.py:sft --workdir=workdirs/tiny_sft \
        --image=shape.png --prompt="What shape is this?"

`--config=configs/tiny.py:mosaic,split=mm1,from_workdir=DIR` fine-tunes a run
that learned single easy-vqa images (DIR, e.g. trained on easy_vqa_vqa) on
the 192 px easy-vqa mosaics' questions (one of 3 x 3 cells; mm1_jax/data/
sources/easy_vqa_mosaic.py) with each image split into 3 x 3 crops of 64 px
+ an overview (10 image slots, 160 image tokens); `split=none` shows the
encoder the mosaic downscaled to 64 px, `split=anyres` lets LLaVA-NeXT's rule
pick among 1 x 1, 2 x 2 and 3 x 3. One example per sequence, so every
variant sees the same examples in the same order (benchmarks/highres_mosaic.py).
"""

from mm1_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, dense=False, moe=False, dispatch="dropless", sft=False,
                             from_workdir="", mosaic=False, split="none")
  config = config_lib.base_config()
  model = config.model
  model.update(dtype="float32", param_dtype="float32", max_images=4, image_placeholder_id=3)
  model.encoder.update(image_size=64, patch_size=8, width=64, depth=2, num_heads=4,
                       mlp_dim=128)
  model.connector.update(kind="c_abstractor", num_image_tokens=16, hidden_dim=64, depth=1)
  # One attention block: at 256 tokens of width 128 attention is a small share
  # of the step, and skipping causal blocks (8 by default) costs ~20% more
  # compile time in a config that most tests compile.
  model.llm.update(vocab_size=4096, width=128, depth=4, num_heads=8, num_kv_heads=4,
                   mlp_dim=256, rope_theta=10_000.0, attention_causal_blocks=1)
  if not arg.dense:
    model.llm.moe.update(num_experts=8, num_experts_per_token=2, moe_every=2,
                         dispatch=arg.dispatch, capacity_factor=2.0)
  config.data.update(mixture="mm1_pretrain", batch_size=8, seq_len=256, pack=True)
  # About 10 minutes on 2 CPU cores (`make train`).
  config.train.update(num_steps=300, log_every=10, checkpoint_every=100)
  config.optimizer.update(learning_rate=1e-3, warmup_steps=30, weight_decay=0.1)
  if arg.sft:
    config.data.update(mixture="visual_sft", chat_template="mm1")
    model.freeze_encoder = True
    config.optimizer.update(freeze=("encoder",), learning_rate=3e-4)
    config.init_from = arg.from_workdir or "workdirs/tiny"
  if arg.mosaic:
    model.max_images = 10
    config.data.update(mixture="easy_vqa_mosaic_vqa", seq_len=192, pack=False,
                       image_split=arg.split)
    if arg.split == "mm1":
      config.data.image_grids = ((3, 3),)
    elif arg.split == "anyres":
      config.data.image_grids = ((1, 1), (2, 2), (3, 3))
    config.train.update(num_steps=400, checkpoint_every=200)
    config.optimizer.update(learning_rate=3e-4, warmup_steps=20)
    config.eval.update(tasks=("easy_vqa_mosaic_vqa",), shots=(0,), max_queries=0)
    if arg.from_workdir:
      config.init_from = arg.from_workdir
  return config
