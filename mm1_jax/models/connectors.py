"""Vision-language connectors: patch features [B, L, Dv] -> image tokens [B, M, D].

L is the number of patches (a perfect square; the class token already
removed), Dv the encoder width, M = config.num_image_tokens and D the LLM
width (`out_dim`). Four kinds, chosen by ConnectorConfig.kind:

  c_abstractor  Honeybee's C-Abstractor (MM1's choice): RegNet stages around
                an adaptive average pool, then an MLP readout.
  avg_pool      adaptive average pool to a sqrt(M) grid, then one Linear.
  attn_pool     M learned queries cross-attending over the patches, then Linear.
  mlp           LLaVA-1.5's projector: Linear, GELU, Linear on every patch.

Grids are kept channels-last ([B, H, W, C]); a 1x1 convolution is then a
dense layer over the last axis. Norms run in float32; everything else in
`dtype`.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mm1_jax.models.config import ConnectorConfig, LoraConfig
from mm1_jax.typed_config import ConfigError
from mm1_jax.models.layers import (DEFAULT_KERNEL_INIT, RESIDUAL_AXES, Dtype, LoraScope, Mlp,
                                   as_dtype, dense, dot_product_attention, layer_norm)
from mm1_jax.sharding import constrain

# timm's LayerNorm2d (the C-Abstractor's norm) uses eps 1e-6.
CONV_NORM_EPS = 1e-6
# Honeybee initialises its position embedding with trunc_normal(std=0.02).
POS_EMBED_INIT = nn.initializers.truncated_normal(stddev=0.02)

_GRID_AXES = ("activation_batch", None, None, None)


@functools.lru_cache(maxsize=None)
def adaptive_pool_matrix(in_size: int, out_size: int) -> np.ndarray:
  """float32 [out_size, in_size] averaging matrix of torch's AdaptiveAvgPool.

  Output bin i averages inputs [floor(i * in / out), ceil((i + 1) * in / out)),
  so bins overlap when out_size does not divide in_size (e.g. 27 -> 12).
  """
  if in_size <= 0 or out_size <= 0:
    raise ValueError(f"adaptive pooling needs positive sizes, got {in_size} -> {out_size}.")
  matrix = np.zeros((out_size, in_size), np.float32)
  for i in range(out_size):
    start = (i * in_size) // out_size
    end = -((-(i + 1) * in_size) // out_size)  # ceil without floats.
    matrix[i, start:end] = 1.0 / (end - start)
  matrix.setflags(write=False)  # Cached: shared between callers.
  return matrix


def adaptive_avg_pool2d(x: jax.Array, out_size: int) -> jax.Array:
  """torch.nn.AdaptiveAvgPool2d((out_size, out_size)) on a channels-last grid.

  x: [B, H, W, C] -> [B, out_size, out_size, C], in x's dtype.
  A 2D bin average is the product of the two 1D averages, so the pool is two
  static matrix products (exact for non-divisible sizes, and jit-friendly).
  Accumulates in float32.
  """
  rows = jnp.asarray(adaptive_pool_matrix(x.shape[1], out_size))
  cols = jnp.asarray(adaptive_pool_matrix(x.shape[2], out_size))
  pooled = jnp.einsum("ih,jw,bhwc->bijc", rows, cols, x.astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST)  # Cheap; keep bins exact.
  return pooled.astype(x.dtype)


def _grid_side(num_patches: int) -> int:
  side = math.isqrt(num_patches)
  if side * side != num_patches:
    raise ValueError(f"the connector needs a square patch grid, got {num_patches} patches.")
  return side


def _norm(x: jax.Array, *, name: str, eps: float, param_dtype: Dtype) -> jax.Array:
  """LayerNorm over the last (channel) axis in float32, cast back to x's dtype."""
  return layer_norm(name=name, eps=eps, param_dtype=param_dtype)(x).astype(x.dtype)


class SqueezeExcite(nn.Module):
  """timm's SEModule: x * sigmoid(fc2(act(fc1(mean_hw(x))))).

  x: [B, H, W, C] -> [B, H, W, C]; fc1/fc2 are 1x1 convolutions with bias.
  """
  reduced_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  lora: LoraScope | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=True, lora=self.lora)
    # Mean over many positions: accumulate in float32.
    squeezed = jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True).astype(x.dtype)
    squeezed = nn.silu(dense(self.reduced_dim, ("embed", "mlp"), name="fc1", **kw)(squeezed))
    gate = dense(x.shape[-1], ("mlp", "embed"), name="fc2", **kw)(squeezed)
    return x * nn.sigmoid(gate)


class Bottleneck(nn.Module):
  """timm's RegNet Bottleneck as Honeybee configures it.

  bottle_ratio 1, group_size 1 (so the 3x3 conv is depthwise), SE after the
  3x3 conv, LayerNorm2d (eps 1e-6) and SiLU:

    h = silu(ln1(conv1x1(x)))
    h = silu(ln2(depthwise3x3(h)))
    h = se(h)                        # reduced width round(se_ratio * C_in)
    h = ln3(conv1x1(h))
    out = silu(h + shortcut(x))      # shortcut: identity, or conv1x1 + LN

  x: [B, H, W, C_in] -> [B, H, W, out_dim].
  """
  out_dim: int
  se_ratio: float = 0.25
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  lora: LoraScope | None = None  # Adapters on the targeted 1x1 convs (linears).

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, lora=self.lora)
    norm = functools.partial(_norm, eps=CONV_NORM_EPS, param_dtype=self.param_dtype)
    in_dim = x.shape[-1]

    h = dense(self.out_dim, ("embed", "mlp"), name="conv1", **kw)(x)
    h = nn.silu(norm(h, name="norm1"))
    h = nn.Conv(
        self.out_dim, kernel_size=(3, 3), padding=((1, 1), (1, 1)),
        feature_group_count=self.out_dim, use_bias=False, name="conv2",
        dtype=as_dtype(self.dtype), param_dtype=as_dtype(self.param_dtype),
        # [3, 3, 1, C]. Flax refuses a logical name used twice in one array, so
        # the (replicated) spatial dims cannot both be "conv_spatial".
        kernel_init=nn.with_logical_partitioning(
            DEFAULT_KERNEL_INIT, ("conv_spatial", None, "conv_in", "embed")))(h)
    h = nn.silu(norm(h, name="norm2"))
    if self.se_ratio:
      # timm sizes the squeeze from the block's *input* width, not its own.
      h = SqueezeExcite(int(round(in_dim * self.se_ratio)), name="se", **kw)(h)
    h = norm(dense(self.out_dim, ("mlp", "embed"), name="conv3", **kw)(h), name="norm3")

    shortcut = x
    if in_dim != self.out_dim:
      shortcut = dense(self.out_dim, ("embed", "mlp"), name="shortcut_conv", **kw)(x)
      shortcut = norm(shortcut, name="shortcut_norm")
    return nn.silu(h + shortcut)


class RegStage(nn.Module):
  """`depth` Bottlenecks (timm's RegStage, stride 1): the first maps C_in -> out_dim.

  x: [B, H, W, C_in] -> [B, H, W, out_dim].
  """
  depth: int
  out_dim: int
  se_ratio: float = 0.25
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  lora: LoraScope | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i in range(self.depth):
      # Blocks named b1, b2, ... as in timm, to ease checkpoint conversion.
      x = Bottleneck(self.out_dim, self.se_ratio, dtype=self.dtype,
                     param_dtype=self.param_dtype, lora=self.lora, name=f"b{i + 1}")(x)
      x = constrain(x, _GRID_AXES)
    return x


class Connector(nn.Module):
  """Fields shared by every connector: [B, L, Dv] -> [B, num_image_tokens, out_dim].

  lora: adapters on the linears it targets (module paths "connector/...";
  None or rank 0: none).
  """
  config: ConnectorConfig
  out_dim: int  # The LLM width.
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  lora: LoraConfig | None = None

  @property
  def lora_scope(self) -> LoraScope | None:
    if self.lora is None or not self.lora.enabled:
      return None
    return LoraScope(self.lora, "connector", tuple(self.path))


class CAbstractor(Connector):
  """Honeybee's C-Abstractor (MM1's connector).

  x [B, L, Dv] + pos_embed [L, Dv] -> grid [B, g, g, Dv] (g = sqrt(L))
  -> RegStage(depth, Dv -> hidden) -> adaptive avg pool to [B, m, m, hidden]
  (m = sqrt(M)) -> RegStage(depth, hidden -> hidden) -> [B, M, hidden]
  -> Linear(hidden -> D), then (SiLU, Linear(D -> D)) x (mlp_depth - 1).
  Returns [B, M, D] in `dtype`.
  """
  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, lora=self.lora_scope)
    batch, num_patches, width = x.shape
    side = _grid_side(num_patches)
    out_side = _grid_side(c.num_image_tokens)

    # Stored [L, Dv] (Honeybee's is [1, L, Dv]; the leading 1 only broadcasts).
    pos_embed = self.param("pos_embed", nn.with_logical_partitioning(
        POS_EMBED_INIT, ("patches", "embed")), (num_patches, width), as_dtype(self.param_dtype))
    x = x.astype(as_dtype(self.dtype)) + pos_embed.astype(as_dtype(self.dtype))

    # Row-major reshape matches Honeybee's "b (h w) d -> b d h w".
    grid = x.reshape(batch, side, side, width)
    stage = functools.partial(RegStage, c.depth, c.hidden_dim, c.se_ratio, **kw)
    grid = stage(name="s1")(grid)
    grid = adaptive_avg_pool2d(grid, out_side)
    grid = stage(name="s2")(grid)
    # Empty stages (depth 0) leave Dv channels, as Honeybee's readout then does.
    tokens = grid.reshape(batch, out_side * out_side, grid.shape[-1])

    tokens = dense(self.out_dim, ("mlp", "embed"), name="readout_0", use_bias=True, **kw)(tokens)
    for i in range(1, c.mlp_depth):
      tokens = dense(self.out_dim, ("mlp", "embed"), name=f"readout_{i}", use_bias=True,
                     **kw)(nn.silu(tokens))
    return constrain(tokens, RESIDUAL_AXES)


class AveragePooling(Connector):
  """MM1's average-pooling connector.

  x [B, L, Dv] -> adaptive avg pool of the sqrt(L) grid to sqrt(M) x sqrt(M)
  -> Linear(Dv -> D). Returns [B, M, D] in `dtype`.
  """
  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    batch, num_patches, width = x.shape
    side = _grid_side(num_patches)
    out_side = _grid_side(self.config.num_image_tokens)
    grid = x.astype(as_dtype(self.dtype)).reshape(batch, side, side, width)
    tokens = adaptive_avg_pool2d(grid, out_side).reshape(batch, out_side * out_side, width)
    tokens = dense(self.out_dim, ("embed", "mlp"), name="proj", use_bias=True,
                   dtype=self.dtype, param_dtype=self.param_dtype, lora=self.lora_scope)(tokens)
    return constrain(tokens, RESIDUAL_AXES)


class AttentionPooling(Connector):
  """MM1's attention-pooling connector.

  M learned queries [M, Dv] attend (num_heads heads, q/k/v/out projections
  with bias) over LayerNorm(x); x: [B, L, Dv]. The pooled [B, M, Dv] goes
  through Linear(Dv -> D). Returns [B, M, D] in `dtype`.
  The keys carry no position information: the encoder's features already do.
  """
  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=True,
              lora=self.lora_scope)
    dtype = as_dtype(self.dtype)
    batch, _, width = x.shape
    if width % c.num_heads:
      raise ValueError(f"encoder width {width} is not divisible by num_heads {c.num_heads}.")
    head_dim = width // c.num_heads

    queries = self.param("queries", nn.with_logical_partitioning(
        nn.initializers.normal(stddev=0.02), ("image_tokens", "embed")),
        (c.num_image_tokens, width), as_dtype(self.param_dtype))
    queries = jnp.broadcast_to(queries.astype(dtype)[None], (batch, *queries.shape))
    x = _norm(x.astype(dtype), name="norm", eps=1e-5, param_dtype=self.param_dtype)

    heads = (c.num_heads, head_dim)
    query = dense(heads, ("embed", "heads", "head_dim"), name="query", **kw)(queries)
    key = dense(heads, ("embed", "heads", "head_dim"), name="key", **kw)(x)
    value = dense(heads, ("embed", "heads", "head_dim"), name="value", **kw)(x)
    pooled = dot_product_attention(query, key, value, mask=None)  # [B, M, H, hd]
    pooled = dense(width, ("heads", "head_dim", "embed"), name="out", axis=(-2, -1),
                   **kw)(pooled)
    tokens = dense(self.out_dim, ("embed", "mlp"), name="proj", **kw)(pooled)
    return constrain(tokens, RESIDUAL_AXES)


class MlpConnector(Connector):
  """LLaVA-1.5's projector: Linear(Dv -> D), exact GELU, Linear(D -> D).

  Keeps every patch (M == L): x [B, L, Dv] -> [B, L, D] in `dtype`.
  """
  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if x.shape[1] != self.config.num_image_tokens:
      raise ValueError(f"the MLP connector keeps all {x.shape[1]} patches, but "
                       f"num_image_tokens is {self.config.num_image_tokens}.")
    tokens = Mlp(self.out_dim, activation="gelu", out_dim=self.out_dim, dtype=self.dtype,
                 param_dtype=self.param_dtype, lora=self.lora_scope,
                 name="mlp")(x.astype(as_dtype(self.dtype)))
    return constrain(tokens, RESIDUAL_AXES)


CONNECTORS = {
    "c_abstractor": CAbstractor,
    "avg_pool": AveragePooling,
    "attn_pool": AttentionPooling,
    "mlp": MlpConnector,
}


def build_connector(config: ConnectorConfig, out_dim: int, dtype: Dtype = jnp.float32,
                    param_dtype: Dtype = jnp.float32, lora: LoraConfig | None = None
                    ) -> nn.Module:
  """The connector module named by config.kind, mapping [B, L, Dv] -> [B, M, out_dim]."""
  if config.kind not in CONNECTORS:
    raise ConfigError(f"connector.kind: unknown connector {config.kind!r}; "
                      f"use one of {tuple(CONNECTORS)}.")
  return CONNECTORS[config.kind](config=config, out_dim=out_dim, dtype=dtype,
                                 param_dtype=param_dtype, lora=lora)
