"""MM1-30B: ViT-H/14 at 378px, 144-token C-Abstractor, a 30B dense LLM.

54 layers of width 7168, 56 query / 8 key-value heads of 128, SwiGLU 19456,
100k vocabulary untied: 28.9B non-embedding, 30.4B LLM parameters. Needs
fsdp (and usually tensor) sharding; see WORKSPACE.md.
"""

from mm1_jax import config_lib


def get_config(arg=None):
  del arg
  config = config_lib.base_config()
  config.model.llm.update(vocab_size=100_352, width=7168, depth=54, num_heads=56,
                          num_kv_heads=8, mlp_dim=19_456, rope_theta=10_000.0,
                          remat_policy="full")
  config.model.encoder.remat_policy = "full"
  config.mesh.update(data=1, fsdp=-1, tensor=1)
  return config
