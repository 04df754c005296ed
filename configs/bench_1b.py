"""~1B dense MM1 at sequence length 4096 in bfloat16: GPU / TPU MFU measurements.

LLM: 16 layers of width 2048, 16 query / 8 key-value heads of 128, SwiGLU
8192 and a 32k vocabulary, untied; a ViT-B/16 at 224px (12 layers of 768)
and a 64-token C-Abstractor (`python -m mm1_jax.summary
--config=configs/bench_1b.py` for the exact counts). bfloat16 compute with
float32 parameters, no rematerialisation (it fits one 80 GB device at the
default batch), 4 image slots per row. Meant for an accelerator:

    python benchmarks/train_step.py --config=configs/bench_1b.py \
        [--config.data.batch_size=16 --config.mesh.data=-1]

MFU is then taken against the device's vendor bf16 peak
(mm1_jax/training/metrics.py PEAK_TFLOPS). It does not fit a CPU run in
reasonable time (one step is ~90 TFLOP at batch 8).
"""

from mm1_jax import config_lib


def get_config(arg=None):
  del arg
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
  return config
