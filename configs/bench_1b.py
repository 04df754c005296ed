"""~1B dense MM1 at sequence length 4096 in bfloat16: GPU / TPU MFU measurements.

LLM: 16 layers of width 2048, 16 query / 8 key-value heads of 128, SwiGLU
8192 and a 32k vocabulary, untied; a ViT-B/16 at 224px (12 layers of 768)
and a 64-token C-Abstractor (`python -m mm1_jax.summary
--config=configs/bench_1b.py` for the exact counts). bfloat16 compute with
float32 parameters, 4 image slots per row. Meant for an accelerator:

    python benchmarks/train_step.py --config=configs/bench_1b.py:gpu \
        [--config.data.batch_size=16 --config.mesh.data=-1]

`gpu` (NVIDIA): cuDNN's fused attention in both towers and the LLM's
matmul outputs kept, the rest rematerialised (remat "dots"): 41% MFU and
52 GiB on one H100 (benchmarks/RESULTS.md). Without it (TPU, or the GPU
baseline) nothing is rematerialised and attention is XLA's; that does not
fit 80 GB at 8 x 4096 (the [T, S] scores of every layer are kept).

`moe`: the LLM's FFN becomes 8 experts of 4096, top-2, in every layer (a
MoE with the dense model's ~1B active parameters per token; dropless
dispatch): `configs/bench_1b.py:gpu,moe`.

MFU is then taken against the device's vendor bf16 peak
(mm1_jax/training/metrics.py PEAK_TFLOPS). It does not fit a CPU run in
reasonable time (one step is ~90 TFLOP at batch 8).
"""

from mm1_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, gpu=False, moe=False)
  config = config_lib.base_config()
  model = config.model
  model.update(dtype="bfloat16", param_dtype="float32", max_images=4)
  model.encoder.update(image_size=224, patch_size=16, width=768, depth=12, num_heads=12,
                       mlp_dim=3072, remat_policy="none")
  model.connector.update(kind="c_abstractor", num_image_tokens=64, hidden_dim=768, depth=2)
  model.llm.update(vocab_size=32_768, width=2048, depth=16, num_heads=16, num_kv_heads=8,
                   mlp_dim=8192, rope_theta=10_000.0, remat_policy="none")
  config.data.update(mixture="mm1_pretrain", batch_size=8, seq_len=4096, pack=True)
  config.mesh.update(data=-1, fsdp=1)
  config.optimizer.update(warmup_steps=100)  # Benchmarks run tens of steps, not 2000.
  if arg.moe:
    model.llm.moe.update(num_experts=8, num_experts_per_token=2, moe_every=1,
                         expert_mlp_dim=4096)
  if arg.gpu:
    model.encoder.attention_implementation = "cudnn"
    model.llm.update(attention_implementation="cudnn", remat_policy="dots")
  return config
