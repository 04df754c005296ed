"""MM1-7B-MoE: the 7B model with 32 experts replacing every 4th dense FFN.

Top-2 routing, experts as wide as the dense FFN; balance loss 0.01, router
z-loss 0.001 (MM1). 45.1B parameters in all; 8.2B of the LLM active per token.
"""

from configs import mm1_7b


def get_config(arg=None):
  config = mm1_7b.get_config(arg)
  config.model.llm.moe.update(num_experts=32, num_experts_per_token=2, moe_every=4,
                              dispatch="dropless", balance_loss_weight=0.01,
                              router_z_loss_weight=0.001)
  return config
