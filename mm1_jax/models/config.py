"""Typed model configuration, built from an ml_collections ConfigDict.

Experiment files (configs/*.py) describe the model as nested ConfigDicts;
`MM1Config.from_dict` turns them into these frozen dataclasses and
`validate` checks them before any module is built, so a bad value fails with
a message that names the field instead of a shape error deep inside jit.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from typing import Any, Mapping

from mm1_jax.typed_config import ConfigError, dataclass_from_dict, require_at_least, to_plain_dict

# CLIP's normalisation constants (OpenAI); ImageNet's are used by DINOv2.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ACTIVATIONS = ("gelu", "gelu_tanh", "quick_gelu", "silu", "relu")
CONNECTOR_KINDS = ("c_abstractor", "avg_pool", "attn_pool", "mlp")
MOE_DISPATCH = ("dropless", "capacity")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
DTYPES = ("float32", "bfloat16", "float16")
# "xla": our einsum attention (any backend and dtype). "cudnn": cuDNN's fused
# flash-attention kernel via jax.nn.dot_product_attention (NVIDIA GPU, bf16 /
# fp16), which never writes the [T, S] scores to memory.
ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn")


@dataclasses.dataclass(frozen=True)
class VitConfig:
  """A CLIP-style ViT. Defaults: ViT-H/14 at 378px (MM1's final encoder)."""
  image_size: int = 378
  patch_size: int = 14
  width: int = 1280
  depth: int = 32
  num_heads: int = 16
  mlp_dim: int = 5120
  activation: str = "gelu"
  class_token: bool = True
  patch_bias: bool = False  # CLIP's patch conv has no bias; SigLIP/DINOv2's do.
  pre_norm: bool = True  # CLIP's ln_pre after the embeddings.
  final_norm: bool = False  # SigLIP / DINOv2 normalise the last hidden state.
  layer_scale_init: float | None = None  # DINOv2's LayerScale, e.g. 1.0.
  norm_eps: float = 1e-5
  # Side of the position-embedding grid the weights were trained for; the
  # embeddings are bicubically resized when image_size // patch_size differs.
  # None means "trained at this resolution".
  pos_grid_size: int | None = None
  # Which block's output feeds the connector: -1 = the last block (then the
  # final norm, if any, is applied), -2 = the one before (LLaVA's choice), ...
  # Blocks after the chosen one are not built: they would be dead compute.
  feature_layer: int = -1
  image_mean: tuple[float, float, float] = CLIP_MEAN
  image_std: tuple[float, float, float] = CLIP_STD
  # Queries per attention block (0: all at once); see layers.dot_product_attention.
  attention_query_chunk: int = 0
  # "xla" (any backend) or "cudnn" (fused flash attention, NVIDIA GPU, bf16).
  attention_implementation: str = "xla"
  remat_policy: str = "none"
  # Scanned blocks per loop iteration (lax.scan's unroll); >= the depth: no
  # loop. The parameters stay stacked either way (same checkpoints).
  scan_unroll: int = 1

  @property
  def grid_size(self) -> int:
    return self.image_size // self.patch_size

  @property
  def num_patches(self) -> int:
    return self.grid_size**2

  @property
  def trained_grid_size(self) -> int:
    return self.pos_grid_size or self.grid_size

  @property
  def num_layers_built(self) -> int:
    return self.depth + self.feature_layer + 1 if self.feature_layer < 0 else self.feature_layer + 1

  @property
  def uses_final_norm(self) -> bool:
    return self.final_norm and self.num_layers_built == self.depth


@dataclasses.dataclass(frozen=True)
class ConnectorConfig:
  """Maps [B, L, Dv] patch features to [B, num_image_tokens, D_llm]."""
  kind: str = "c_abstractor"
  num_image_tokens: int = 144
  hidden_dim: int = 1024  # C-Abstractor width (Honeybee's default).
  depth: int = 3  # RegStage blocks before and after the pooling.
  mlp_depth: int = 2  # Readout MLP layers.
  num_heads: int = 8  # Attention pooling.
  se_ratio: float = 0.25


@dataclasses.dataclass(frozen=True)
class MoeConfig:
  """Mixture-of-experts FFN. num_experts == 0 means a dense model."""
  num_experts: int = 0
  num_experts_per_token: int = 2
  # An MoE FFN replaces the dense FFN of every `moe_every`-th layer (the last
  # layer of each block of moe_every layers); 1 = every layer (Mixtral).
  moe_every: int = 2
  dispatch: str = "dropless"
  capacity_factor: float = 1.25
  expert_mlp_dim: int | None = None  # None: the decoder's mlp_dim.
  balance_loss_weight: float = 0.01
  router_z_loss_weight: float = 0.001

  @property
  def enabled(self) -> bool:
    return self.num_experts > 0


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """A Llama-style decoder-only LLM."""
  vocab_size: int = 100_352
  width: int = 3072
  depth: int = 26
  num_heads: int = 24
  num_kv_heads: int = 8
  head_dim: int | None = None  # None: width // num_heads.
  mlp_dim: int = 8192
  qkv_bias: bool = False  # Qwen2-style biases on the q/k/v projections.
  rope_theta: float = 10_000.0
  norm_eps: float = 1e-5
  tie_embeddings: bool = False
  moe: MoeConfig = dataclasses.field(default_factory=MoeConfig)
  # Queries per attention block (0: all at once); see layers.dot_product_attention.
  attention_query_chunk: int = 0
  # Causal attention in this many query blocks, each skipping the keys after
  # it (about half the work at 8; 1: one block). Training passes, "xla" only.
  attention_causal_blocks: int = 8
  # "xla" (any backend) or "cudnn" (fused flash attention, NVIDIA GPU, bf16).
  attention_implementation: str = "xla"
  remat_policy: str = "none"
  # Scanned blocks per loop iteration (lax.scan's unroll); >= the depth: no
  # loop. The parameters stay stacked either way (same checkpoints).
  scan_unroll: int = 1

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim or self.width // self.num_heads

  @property
  def layers_per_block(self) -> int:
    """Layers scanned together: one dense layer, or moe_every layers."""
    return self.moe.moe_every if self.moe.enabled else 1

  @property
  def num_blocks(self) -> int:
    return self.depth // self.layers_per_block

  @property
  def expert_mlp_dim(self) -> int:
    return self.moe.expert_mlp_dim or self.mlp_dim


# LLaVA's LoRA targets: every linear of the LLM's layer stack (attention,
# MLP, and for an MoE LLM the router and the experts), not the token
# embedding, not lm_head, not the encoder or the connector.
LORA_DEFAULT_TARGETS = ("llm/blocks/*",)
LORA_QUANTIZE = ("none", "nf4")
# The NF4 block sizes bitsandbytes' quantize_4bit accepts (nf4.BLOCK_SIZES).
NF4_BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Low-rank adapters (LoRA, Hu et al. 2021; Hugging Face peft's conventions).

  A targeted linear y = x W computes y = x W + scale * dropout(x) A B, with
  A [*in_dims, rank] Kaiming-uniform (torch nn.Linear's default init, as
  peft), B [rank, *out_dims] zero, so the adapted model starts equal to the
  base; scale = alpha / rank, or alpha / sqrt(rank) with rslora. Only the
  adapters train in the parts they are in (the base weights are frozen
  there); see mm1_jax/models/lora.py.

  targets: fnmatch patterns over module paths in the params tree, "/"-joined,
  "*" also matching "/": e.g. "llm/blocks/layer_0/attn/query" (the layer
  stack is scanned, so one path covers that position in every block),
  "llm/lm_head", "llm/blocks/*/moe/up" (the experts' up projections),
  "llm/*/attn/*". Every pattern must match at least one linear.
  """
  rank: int = 0  # 0: no adapters.
  alpha: float = 8.0  # peft's default (with its default rank 8).
  rslora: bool = False  # Rank-stabilised scale alpha / sqrt(rank) (Kalajdzievski 2023).
  dropout: float = 0.0  # On the adapter's input, training only.
  targets: tuple[str, ...] = LORA_DEFAULT_TARGETS
  # QLoRA: "nf4" stores the targeted linears' frozen base weights as 4-bit
  # NormalFloat (bitsandbytes' format, mm1_jax/models/nf4.py), dequantised in
  # the compute dtype inside each layer; "none" keeps them in param_dtype.
  quantize: str = "none"
  block_size: int = 64  # NF4 values per absmax (bitsandbytes' blocksize).
  double_quant: bool = True  # 8-bit absmax in blocks of 256 (compress_statistics).

  @property
  def enabled(self) -> bool:
    return self.rank > 0

  @property
  def quantized(self) -> bool:
    """Whether the targeted linears' base weights are NF4 (QLoRA)."""
    return self.enabled and self.quantize == "nf4"

  @property
  def scale(self) -> float:
    """The factor of the low-rank update A B."""
    return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

  def quantizes_module(self, module_path: str) -> bool:
    """Whether the linear at `module_path` keeps its base weight as NF4 (QLoRA:
    every target but lm_head, which stays in full precision as in QLoRA)."""
    return (self.quantized and self.targets_module(module_path)
            and not module_path.endswith("/lm_head"))

  def targets_module(self, module_path: str) -> bool:
    """Whether the linear at `module_path` ("llm/blocks/layer_0/attn/query") gets adapters."""
    return self.enabled and any(fnmatch.fnmatchcase(module_path, pattern)
                                for pattern in self.targets)


@dataclasses.dataclass(frozen=True)
class MM1Config:
  """The multimodal model: encoder -> connector -> tokens spliced into the LLM."""
  encoder: VitConfig = dataclasses.field(default_factory=VitConfig)
  connector: ConnectorConfig = dataclasses.field(default_factory=ConnectorConfig)
  llm: DecoderConfig = dataclasses.field(default_factory=DecoderConfig)
  image_placeholder_id: int = 3
  max_images: int = 16
  freeze_encoder: bool = False
  freeze_llm: bool = False
  # Adapters on the LLM's linears (rank 0: none); the LLM's base is then frozen.
  lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
  dtype: str = "bfloat16"  # Compute dtype.
  param_dtype: str = "float32"

  @property
  def num_image_tokens(self) -> int:
    return self.connector.num_image_tokens

  @classmethod
  def from_dict(cls, values: Mapping[str, Any]) -> "MM1Config":
    """Builds and validates a config from a (nested) dict or ConfigDict."""
    config = dataclass_from_dict(cls, to_plain_dict(values), "model")
    validate(config)
    return config

  def replace(self, **changes) -> "MM1Config":
    return dataclasses.replace(self, **changes)


def _require(ok: bool, field: str, message: str) -> None:
  if not ok:
    raise ConfigError(f"{field}: {message}")


def _is_square(n: int) -> bool:
  return n > 0 and math.isqrt(n) ** 2 == n


def _validate_layer_stack(c: VitConfig | DecoderConfig, path: str) -> None:
  """The settings a ViT and a decoder share: remat and attention."""
  _require(c.remat_policy in REMAT_POLICIES, f"{path}.remat_policy",
           f"unknown remat policy {c.remat_policy!r}; use one of {REMAT_POLICIES}.")
  _require(c.scan_unroll >= 1, f"{path}.scan_unroll",
           f"must be >= 1 (1 = a loop over the blocks), got {c.scan_unroll}.")
  _require(c.attention_query_chunk >= 0, f"{path}.attention_query_chunk",
           f"must be >= 0 (0 = unchunked), got {c.attention_query_chunk}.")
  _require(c.attention_implementation in ATTENTION_IMPLEMENTATIONS,
           f"{path}.attention_implementation",
           f"unknown attention implementation {c.attention_implementation!r}; use one of "
           f"{ATTENTION_IMPLEMENTATIONS}.")


def validate_vit(config: VitConfig, path: str = "encoder") -> None:
  c = config
  require_at_least(c, path, image_size=1, patch_size=1, width=1, depth=1, num_heads=1,
                   mlp_dim=1, pos_grid_size=1)
  _require(c.norm_eps > 0, f"{path}.norm_eps", f"must be > 0, got {c.norm_eps}.")
  _require(c.layer_scale_init is None or c.layer_scale_init > 0, f"{path}.layer_scale_init",
           f"must be > 0 (or unset: no LayerScale), got {c.layer_scale_init}.")
  _require(c.image_size % c.patch_size == 0, f"{path}.patch_size",
           f"patch_size {c.patch_size} does not divide image_size {c.image_size}; "
           "choose an image_size that is a multiple of the patch size.")
  _require(c.width % c.num_heads == 0, f"{path}.width",
           f"width {c.width} is not divisible by num_heads {c.num_heads}.")
  _require(c.activation in ACTIVATIONS, f"{path}.activation",
           f"unknown activation {c.activation!r}; use one of {ACTIVATIONS}.")
  _require(-c.depth <= c.feature_layer < c.depth, f"{path}.feature_layer",
           f"feature_layer {c.feature_layer} is outside [-{c.depth}, {c.depth - 1}] "
           f"for a ViT of depth {c.depth}.")
  _validate_layer_stack(c, path)
  for field in ("image_mean", "image_std"):
    _require(len(getattr(c, field)) == 3, f"{path}.{field}",
             f"needs three (RGB) values, got {getattr(c, field)}.")
  _require(all(v > 0 for v in c.image_std), f"{path}.image_std",
           f"must be > 0 per channel (images are divided by it), got {c.image_std}.")


def validate_connector(config: ConnectorConfig, vit: VitConfig, path: str = "connector") -> None:
  c = config
  require_at_least(c, path, num_image_tokens=1, hidden_dim=1, depth=0, mlp_depth=1,
                   num_heads=1)
  _require(0 < c.se_ratio <= 1, f"{path}.se_ratio", f"must be in (0, 1], got {c.se_ratio}.")
  _require(c.kind in CONNECTOR_KINDS, f"{path}.kind",
           f"unknown connector {c.kind!r}; use one of {CONNECTOR_KINDS}.")
  if c.kind in ("c_abstractor", "avg_pool"):
    _require(_is_square(c.num_image_tokens), f"{path}.num_image_tokens",
             f"{c.kind} pools to a square grid, so num_image_tokens must be a "
             f"perfect square (64, 144, 256, ...), got {c.num_image_tokens}.")
    _require(math.isqrt(c.num_image_tokens) <= vit.grid_size, f"{path}.num_image_tokens",
             f"{c.num_image_tokens} tokens need a {math.isqrt(c.num_image_tokens)}-wide grid "
             f"but the encoder gives only {vit.grid_size}x{vit.grid_size} patches.")
  if c.kind == "mlp":
    _require(c.num_image_tokens == vit.num_patches, f"{path}.num_image_tokens",
             f"the MLP connector keeps every patch, so num_image_tokens must equal the "
             f"encoder's {vit.num_patches} patches, got {c.num_image_tokens}.")
  if c.kind == "attn_pool":
    _require(vit.width % c.num_heads == 0, f"{path}.num_heads",
             f"encoder width {vit.width} is not divisible by num_heads {c.num_heads}.")
  _require(c.num_image_tokens > 0, f"{path}.num_image_tokens", "must be positive.")
  _require(c.mlp_depth >= 1, f"{path}.mlp_depth", f"must be >= 1, got {c.mlp_depth}.")


def validate_decoder(config: DecoderConfig, path: str = "llm") -> None:
  c = config
  require_at_least(c, path, vocab_size=1, width=1, depth=1, num_heads=1, num_kv_heads=1,
                   head_dim=1, mlp_dim=1)
  _require(c.rope_theta > 0, f"{path}.rope_theta", f"must be > 0, got {c.rope_theta}.")
  _require(c.norm_eps > 0, f"{path}.norm_eps", f"must be > 0, got {c.norm_eps}.")
  require_at_least(c.moe, f"{path}.moe", num_experts=0, num_experts_per_token=1, moe_every=1,
                   expert_mlp_dim=1, balance_loss_weight=0.0, router_z_loss_weight=0.0)
  if c.head_dim is None:
    _require(c.width % c.num_heads == 0, f"{path}.width",
             f"width {c.width} is not divisible by num_heads {c.num_heads}; "
             "change one of them or set head_dim explicitly.")
  _require(c.num_kv_heads > 0 and c.num_heads % c.num_kv_heads == 0, f"{path}.num_kv_heads",
           f"num_kv_heads {c.num_kv_heads} does not divide num_heads {c.num_heads}.")
  _require(c.resolved_head_dim % 2 == 0, f"{path}.head_dim",
           f"RoPE needs an even head_dim, got {c.resolved_head_dim}.")
  _require(c.attention_causal_blocks >= 1, f"{path}.attention_causal_blocks",
           f"must be >= 1 (1 = one block), got {c.attention_causal_blocks}.")
  _validate_layer_stack(c, path)
  moe = c.moe
  if moe.enabled:
    _require(1 <= moe.num_experts_per_token <= moe.num_experts, f"{path}.moe.num_experts_per_token",
             f"top-k {moe.num_experts_per_token} must lie in [1, num_experts={moe.num_experts}].")
    _require(moe.moe_every >= 1 and c.depth % moe.moe_every == 0, f"{path}.moe.moe_every",
             f"depth {c.depth} is not a multiple of moe_every {moe.moe_every}; the layer "
             "stack is scanned in blocks of moe_every layers.")
    _require(moe.dispatch in MOE_DISPATCH, f"{path}.moe.dispatch",
             f"unknown dispatch {moe.dispatch!r}; use one of {MOE_DISPATCH}.")
    _require(moe.capacity_factor > 0, f"{path}.moe.capacity_factor",
             f"must be positive, got {moe.capacity_factor}.")


def validate_lora(config: LoraConfig, llm: DecoderConfig, path: str = "model.lora") -> None:
  """Rank, alpha, dropout, and a non-empty targets list."""
  c = config
  _require(isinstance(c.rank, int) and not isinstance(c.rank, bool) and c.rank >= 0,
           f"{path}.rank", f"must be an integer >= 0 (0 = no adapters), got {c.rank!r}.")
  _require(c.alpha > 0, f"{path}.alpha", f"must be > 0 (scale alpha / rank), got {c.alpha}.")
  _require(0.0 <= c.dropout < 1.0, f"{path}.dropout", f"must be in [0, 1), got {c.dropout}.")
  _require(c.quantize in LORA_QUANTIZE, f"{path}.quantize",
           f"unknown {c.quantize!r}; use one of {LORA_QUANTIZE} (nf4: QLoRA's 4-bit base).")
  _require(c.block_size in NF4_BLOCK_SIZES, f"{path}.block_size",
           f"{c.block_size} is not a block size bitsandbytes supports: {NF4_BLOCK_SIZES}.")
  _require(c.quantize == "none" or c.enabled, f"{path}.quantize",
           f"{c.quantize!r} quantises the base of the LoRA targets, but rank is 0 (no "
           "adapters); set model.lora.rank > 0, or quantize='none'.")
  if not c.enabled:
    return
  _require(len(c.targets) > 0, f"{path}.targets",
           f"empty with rank {c.rank}; name module paths (default {LORA_DEFAULT_TARGETS}), "
           "or set rank=0 for no adapters.")
  # That each target matches a linear of the model is checked from the
  # model's structure by mm1_jax.models.lora.check_targets (Experiment
  # validation calls it; the model is built from this module, so not here).


def validate(config: MM1Config) -> None:
  """Raises ConfigError naming the first field that cannot work."""
  validate_vit(config.encoder, "model.encoder")
  validate_connector(config.connector, config.encoder, "model.connector")
  validate_decoder(config.llm, "model.llm")
  _require(0 <= config.image_placeholder_id < config.llm.vocab_size, "model.image_placeholder_id",
           f"{config.image_placeholder_id} is not a token id of a vocabulary of "
           f"{config.llm.vocab_size}.")
  _require(config.max_images >= 1, "model.max_images", f"must be >= 1, got {config.max_images}.")
  validate_lora(config.lora, config.llm, "model.lora")
  for field in ("dtype", "param_dtype"):
    value = getattr(config, field)
    _require(value in DTYPES, f"model.{field}", f"unknown dtype {value!r}; use one of {DTYPES}.")
