"""MM1-3B: ViT-H/14 at 378px, 144-token C-Abstractor, a 3B dense LLM.

MM1's LLM shapes are not public; this one has 2.62B non-embedding parameters
(26 layers of width 3072, 24 query / 8 key-value heads of 128, SwiGLU 8192)
and a 100k vocabulary, untied: 3.2B in all (`python -m mm1_jax.summary`).
"""

from mm1_jax import config_lib


def get_config(arg=None):
  del arg
  config = config_lib.base_config()
  config.model.llm.update(vocab_size=100_352, width=3072, depth=26, num_heads=24,
                          num_kv_heads=8, mlp_dim=8192, rope_theta=10_000.0)
  config.mesh.update(data=-1, fsdp=1)
  return config
