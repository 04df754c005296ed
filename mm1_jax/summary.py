"""Parameter counts, FLOPs per token and memory of a config; nothing allocated.

    python -m mm1_jax.summary --config=configs/mm1_3b.py [--seq_len=4096]

Shapes come from jax.eval_shape of the model's init, so even the 30B config
is summarised in seconds on a laptop.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from mm1_jax import config_lib
from mm1_jax.models.config import MM1Config
from mm1_jax.models.multimodal import MM1Model

ADAM_STATE_COPIES = 2  # First and second moments, float32.


@dataclasses.dataclass(frozen=True)
class ParamCounts:
  encoder: int
  connector: int
  llm_embedding: int  # Token embedding and (untied) output head.
  llm_dense: int  # Non-embedding LLM parameters outside the experts.
  llm_experts: int  # All experts of all MoE layers.
  llm_active_experts: int  # The top-k experts a token actually uses.

  @property
  def llm(self) -> int:
    return self.llm_embedding + self.llm_dense + self.llm_experts

  @property
  def total(self) -> int:
    return self.encoder + self.connector + self.llm

  @property
  def llm_active(self) -> int:
    """LLM parameters touched per token (embedding counted once, as a lookup+head)."""
    return self.llm_embedding + self.llm_dense + self.llm_active_experts

  @property
  def non_embedding_llm(self) -> int:
    """The N of MM1's learning-rate law."""
    return self.llm_dense + self.llm_experts


def abstract_params(config: MM1Config) -> Any:
  """Unboxed ShapeDtypeStructs of the model's params."""
  enc = config.encoder
  tokens = jax.ShapeDtypeStruct((1, config.num_image_tokens), jnp.int32)
  images = jax.ShapeDtypeStruct((1, 1, enc.image_size, enc.image_size, 3), jnp.uint8)
  image_mask = jax.ShapeDtypeStruct((1, 1), jnp.bool_)
  variables = jax.eval_shape(MM1Model(config).init, jax.random.key(0), tokens, images, image_mask)
  return nn.unbox(variables)["params"]


def _size(tree) -> int:
  return int(sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree)))


def count_params(config: MM1Config, params: Any | None = None) -> ParamCounts:
  params = abstract_params(config) if params is None else params
  llm = params["llm"]
  embedding = _size(llm["embedder"]) + _size(llm.get("lm_head", {}))
  experts = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(llm["blocks"])[0]:
    names = [getattr(p, "key", "") for p in path]
    if "moe" in names and names[-1] in ("gate", "up", "down"):
      experts += math.prod(leaf.shape)
  moe = config.llm.moe
  active = experts * moe.num_experts_per_token // moe.num_experts if moe.enabled else 0
  return ParamCounts(
      encoder=_size(params["encoder"]), connector=_size(params["connector"]),
      llm_embedding=embedding, llm_dense=_size(llm) - embedding - experts,
      llm_experts=experts, llm_active_experts=active)


def llm_flops_per_token(config: MM1Config, counts: ParamCounts, seq_len: int) -> float:
  """Forward FLOPs per text token: 2 per active weight (the embedding lookup
  is free, the output head is not) plus causal attention scores and values."""
  llm = config.llm
  weights = counts.llm_dense + counts.llm_active_experts + llm.vocab_size * llm.width
  attention = 2 * 2 * llm.depth * llm.num_heads * llm.resolved_head_dim * seq_len / 2
  return 2.0 * weights + attention


def encoder_flops_per_image(config: MM1Config, counts: ParamCounts) -> float:
  """Forward FLOPs per image through the ViT (patch matmuls + attention)."""
  enc = config.encoder
  tokens = enc.num_patches + int(enc.class_token)
  attention = 2 * 2 * enc.num_layers_built * enc.width * tokens * tokens
  return 2.0 * counts.encoder * tokens + attention


def memory_bytes(config: MM1Config, counts: ParamCounts) -> dict[str, int]:
  """Training-state memory: params, gradients and Adam moments (whole model)."""
  param_bytes = jnp.dtype(config.param_dtype).itemsize * counts.total
  return {"params": param_bytes, "gradients": param_bytes,
          "optimizer": ADAM_STATE_COPIES * 4 * counts.total}


def _human(count: float) -> str:
  """12345678 -> '  12.35 M' (counts in B, M or K)."""
  for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
    if count >= scale:
      return f"{count / scale:8.2f} {unit}"
  return f"{count:8.0f}  "


def format_summary(config: MM1Config, seq_len: int, num_devices: int) -> str:
  counts = count_params(config)
  giga = _human
  lines = [
      f"encoder    {giga(counts.encoder)}  (ViT {config.encoder.width}w x "
      f"{config.encoder.num_layers_built} layers, {config.encoder.image_size}px / "
      f"{config.encoder.patch_size} -> {config.encoder.num_patches} patches)",
      f"connector  {giga(counts.connector)}  ({config.connector.kind}, "
      f"{config.num_image_tokens} image tokens)",
      f"llm        {giga(counts.llm)}  (embedding {giga(counts.llm_embedding).strip()}, "
      f"non-embedding {giga(counts.non_embedding_llm).strip()})",
  ]
  if config.llm.moe.enabled:
    moe = config.llm.moe
    lines.append(f"  experts  {giga(counts.llm_experts)}  ({moe.num_experts} experts, top-"
                 f"{moe.num_experts_per_token}, every {moe.moe_every} layer(s); "
                 f"{giga(counts.llm_active_experts).strip()} active per token)")
  lines += [
      f"total      {giga(counts.total)}",
      f"active/token (LLM) {giga(counts.llm_active)}",
      f"FLOPs/token  LLM forward {llm_flops_per_token(config, counts, seq_len) / 1e9:.2f} GFLOP "
      f"at seq {seq_len} (x3 for a training step)",
      f"FLOPs/image  encoder forward {encoder_flops_per_image(config, counts) / 1e9:.1f} GFLOP",
  ]
  memory = memory_bytes(config, counts)
  total = sum(memory.values())
  lines.append("memory     " + ", ".join(f"{k} {v / 2**30:.1f} GiB" for k, v in memory.items())
               + f"; training state {total / 2**30:.1f} GiB = {total / num_devices / 2**30:.2f} "
               f"GiB/device fully sharded over {num_devices} (activations not included)")
  return "\n".join(lines)


def main(argv):
  del argv
  config = config_lib.mm1_config(flags.FLAGS.config)
  print(format_summary(config, flags.FLAGS.seq_len, flags.FLAGS.num_devices))


if __name__ == "__main__":
  # Flags are defined only when run as a program: the counting functions above
  # are also imported by the trainer and benchmarks, which define their own.
  config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
  flags.DEFINE_integer("seq_len", 4096, "Sequence length for attention FLOPs.")
  flags.DEFINE_integer("num_devices", 256, "Devices the training state is spread over (fsdp) "
                       "for the per-device memory estimate.")
  flags.mark_flag_as_required("config")
  app.run(main)
