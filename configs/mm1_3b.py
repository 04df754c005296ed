"""MM1-3B pre-training: ViT-H/14 at 378px, 144-token C-Abstractor, a 3B dense LLM.

MM1's LLM shapes are not public; this one has 2.62B non-embedding parameters
(26 layers of width 3072, 24 query / 8 key-value heads of 128, SwiGLU 8192)
and a 100k vocabulary, untied: 3.2B in all (`python -m mm1_jax.summary`).

The MM1 recipe: mm1_pretrain (45% interleaved, 45% captions, 10% text),
512 sequences of 4096 tokens with up to 16 images each, 200k steps, peak
learning rate and weight decay from the MM1 law (~6e-5 here), 2000 warmup
steps and cosine to 10%.

Memory: parameters and optimizer state sharded over fsdp, attention heads,
MLP and vocabulary split over tensor=2, every layer rematerialised,
attention computed in query blocks, and 4 micro-batches of 128 sequences
(one sequence per fsdp shard at a time): on 256 devices (fsdp=128 x
tensor=2) the compiled step needs ~12 GiB per device, within 16 GiB
(benchmarks/RESULTS.md, `python -m mm1_jax.summary --memory_analysis`).

`--config=configs/mm1_3b.py:sft_highres` is MM1's final high-resolution SFT:
the encoder at 672 px (its 378 px position embeddings interpolated when the
pre-trained weights load), every image as a 2 x 2 grid of 672 px crops of
the image at 1344 px plus a 672 px overview (data.image_split='mm1'): 5 x 144
= 720 image tokens per image; ~1.45M instructions, 10k steps of 256 x 2048,
lr 1e-5 cosine, encoder and LLM unfrozen. Start it from the pre-trained run:
`init_from=WORKDIR` (`python -m mm1_jax.summary` prints the image tokens).
"""

from mm1_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, sft_highres=False, init_from="")
  config = config_lib.base_config()
  config.model.llm.update(vocab_size=100_352, width=3072, depth=26, num_heads=24,
                          num_kv_heads=8, mlp_dim=8192, rope_theta=10_000.0,
                          remat_policy="full", attention_query_chunk=512)
  config.model.encoder.update(remat_policy="full", attention_query_chunk=243)  # 729 patches / 3.
  config.model.max_images = 16
  config.data.update(mixture="mm1_pretrain", batch_size=512, seq_len=4096, pack=True)
  config.train.num_steps = 200_000
  config.optimizer.update(lr_law=True, warmup_steps=2000, end_lr_fraction=0.1,
                          grad_accum_steps=4)
  config.mesh.update(data=1, fsdp=-1, tensor=2)
  if arg.sft_highres:
    # 672 / 14 = 48 x 48 = 2304 patches per sub-image, attended in 4 blocks;
    # the position embeddings keep their 27 x 27 (378 px) grid and are resized
    # bicubically on the fly, as transformers' interpolate_pos_encoding.
    config.model.encoder.update(image_size=672, pos_grid_size=27, attention_query_chunk=576)
    config.model.max_images = 5  # One image of 5 slots per sequence (two: 17.4 GiB/device).
    config.data.update(mixture="visual_sft", chat_template="mm1", batch_size=256,
                       seq_len=2048, image_split="mm1", image_grids=((2, 2),))
    config.train.num_steps = 10_000
    config.optimizer.update(lr_law=False, learning_rate=1e-5, warmup_steps=100,
                            end_lr_fraction=0.0, grad_accum_steps=2)
    if arg.init_from:
      config.init_from = arg.init_from
  return config
