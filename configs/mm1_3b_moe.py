"""MM1-3B-MoE: the 3B model with 64 experts replacing every 2nd dense FFN.

Top-2 routing, experts as wide as the dense FFN; balance loss 0.01, router
z-loss 0.001 (MM1). 65.7B parameters in all; 4.2B of the LLM active per token.
"""

from configs import mm1_3b


def get_config(arg=None):
  config = mm1_3b.get_config(arg)
  config.model.llm.moe.update(num_experts=64, num_experts_per_token=2, moe_every=2,
                              dispatch="dropless", balance_loss_weight=0.01,
                              router_z_loss_weight=0.001)
  # The 3B's mesh (fsdp x tensor=2): experts are split like every other weight.
  return config
