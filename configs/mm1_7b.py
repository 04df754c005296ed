"""MM1-7B: ViT-H/14 at 378px, 144-token C-Abstractor, a 7B dense LLM.

32 layers of width 4096, 32 query / 8 key-value heads of 128, SwiGLU 12288,
100k vocabulary untied: 6.2B non-embedding, 7.0B LLM parameters.
"""

from mm1_jax import config_lib


def get_config(arg=None):
  del arg
  config = config_lib.base_config()
  config.model.llm.update(vocab_size=100_352, width=4096, depth=32, num_heads=32,
                          num_kv_heads=8, mlp_dim=12_288, rope_theta=10_000.0)
  config.mesh.update(data=1, fsdp=-1)
  return config
