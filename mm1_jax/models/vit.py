"""CLIP-style ViT image encoder (also covers SigLIP and DINOv2 checkpoints).

images [B, H, W, 3] (normalised) -> patch features [B, num_patches, width].

Layout of the parameters (what mm1_jax/conversion/hf_vision.py produces):
  patch_embed/{kernel [p, p, 3, D], bias [D]?}
  class_token [D]?                       (config.class_token)
  pos_embed [trained_grid**2 (+1), D]    (class position first, if any)
  pre_norm/{scale, bias}?                (config.pre_norm)
  blocks/...                             (every leaf has a leading layer axis)
  final_norm/{scale, bias}?              (config.uses_final_norm)
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mm1_jax.models.config import LoraConfig, VitConfig
from mm1_jax.models.layers import (RESIDUAL_AXES, Attention, Dtype, LoraScope, Mlp, as_dtype,
                                   dense, layer_norm, maybe_remat)
from mm1_jax.sharding import constrain

_EMBED_INIT = nn.initializers.normal(stddev=0.02)


def normalize_images(images: jax.Array, config: VitConfig) -> jax.Array:
  """uint8 [..., H, W, 3] -> float32 (x / 255 - mean) / std, per channel."""
  mean = np.asarray(config.image_mean, np.float32)
  std = np.asarray(config.image_std, np.float32)
  return (jnp.asarray(images).astype(jnp.float32) / 255.0 - mean) / std


def _cubic_weights(t: np.ndarray, a: float = -0.75) -> np.ndarray:
  """Keys' cubic-convolution weights of the 4 taps at offsets -1, 0, 1, 2.

  t: fractional positions [n] in [0, 1). Returns [n, 4]. a = -0.75 is what
  PyTorch (and OpenCV) use; jax.image.resize uses -0.5.
  """
  def near(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1

  def far(x):  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

  return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


@functools.lru_cache(maxsize=None)
def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out_size, in_size] float32 matrix of 1-D bicubic resampling.

  Matches torch.nn.functional.interpolate(mode="bicubic",
  align_corners=False) without a scale_factor: source coordinate
  (i + 0.5) * in / out - 0.5 (not clamped at 0, as PyTorch does for cubic),
  taps outside [0, in_size) clamped to the border.
  """
  src = (np.arange(out_size, dtype=np.float64) + 0.5) * (in_size / out_size) - 0.5
  base = np.floor(src)
  weights = _cubic_weights(src - base)  # [out, 4]
  taps = np.clip(base[:, None].astype(np.int64) + np.arange(-1, 3), 0, in_size - 1)
  matrix = np.zeros((out_size, in_size), np.float64)
  # Clamped taps may repeat an index, so accumulate rather than assign.
  np.add.at(matrix, (np.repeat(np.arange(out_size), 4), taps.ravel()), weights.ravel())
  return matrix.astype(np.float32)


def resize_position_grid(pos: jax.Array, new_size: int) -> jax.Array:
  """Bicubically resizes a square grid of position embeddings.

  pos: [g * g, D] (row-major grid) -> [new_size * new_size, D], float32.
  Equals torch bicubic interpolation (align_corners=False) of the grid, which
  is how CLIP / DINOv2 / SigLIP checkpoints are adapted to new resolutions.
  """
  size = int(round(np.sqrt(pos.shape[0])))
  if size * size != pos.shape[0]:
    raise ValueError(f"resize_position_grid: {pos.shape[0]} positions are not a square grid.")
  pos = jnp.asarray(pos, jnp.float32)
  if size == new_size:
    return pos
  matrix = bicubic_matrix(size, new_size)
  grid = pos.reshape(size, size, -1)
  # Separable: rows then columns. HIGHEST so TPUs do not round to bfloat16.
  out = jnp.einsum("ny,mx,yxd->nmd", matrix, matrix, grid,
                   precision=jax.lax.Precision.HIGHEST)
  return out.reshape(new_size * new_size, -1)


class Block(nn.Module):
  """Pre-norm transformer block; x: [B, T, width] -> ([B, T, width], None).

  x += ls1 * attn(norm1(x)); x += ls2 * mlp(norm2(x)), with the layer scales
  (DINOv2) only when config.layer_scale_init is set. Returns a scan carry.
  """
  config: VitConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  lora: LoraScope | None = None  # Adapters on the targeted projections.

  def _layer_scale(self, name: str, h: jax.Array) -> jax.Array:
    if self.config.layer_scale_init is None:
      return h
    scale = self.param(
        name, nn.with_logical_partitioning(
            nn.initializers.constant(self.config.layer_scale_init), ("norm",)),
        (self.config.width,), as_dtype(self.param_dtype))
    return h * scale.astype(h.dtype)

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, None]:
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, lora=self.lora)
    norm = functools.partial(layer_norm, eps=c.norm_eps, param_dtype=self.param_dtype)
    dtype = as_dtype(self.dtype)

    h = norm(name="norm1")(x).astype(dtype)
    h = Attention(num_heads=c.num_heads, num_kv_heads=c.num_heads,
                  head_dim=c.width // c.num_heads, qkv_bias=True, out_bias=True,
                  query_chunk_size=c.attention_query_chunk,
                  implementation=c.attention_implementation,
                  name="attn", **kw)(h)  # Bidirectional: no mask, no rope.
    x = x + self._layer_scale("ls1", h)

    h = norm(name="norm2")(x).astype(dtype)
    h = Mlp(c.mlp_dim, activation=c.activation, name="mlp", **kw)(h)
    x = x + self._layer_scale("ls2", h)
    return constrain(x, RESIDUAL_AXES), None


class VisionTransformer(nn.Module):
  """ViT encoder. __call__: images float [B, S, S, 3] (normalised, S =
  config.image_size) -> patch features [B, num_patches, width] in `dtype`,
  class token removed.

  Only config.num_layers_built blocks exist (config.feature_layer); the final
  norm runs only when the last block is the feature layer.

  lora: adapters on the linears it targets (module paths "encoder/...",
  e.g. "encoder/blocks/attn/query"; None or rank 0: none).
  """
  config: VitConfig
  dtype: Dtype = "float32"
  param_dtype: Dtype = "float32"
  lora: LoraConfig | None = None

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    c = self.config
    dtype = as_dtype(self.dtype)
    param_dtype = as_dtype(self.param_dtype)
    batch, height, width, channels = images.shape
    if (height, width, channels) != (c.image_size, c.image_size, 3):
      raise ValueError(f"VisionTransformer expects images [B, {c.image_size}, {c.image_size}, 3] "
                       f"(encoder.image_size), got {tuple(images.shape)}.")
    grid, patch = c.grid_size, c.patch_size
    lora = (LoraScope(self.lora, "encoder", tuple(self.path))
            if self.lora is not None and self.lora.enabled else None)

    # Patchify + dense == the stride-p conv of the reference models, and is a
    # plain matmul on every backend. [B, g, g, p, p, 3] -> [B, g, g, D]; the
    # kernel is laid out like a conv's, [p, p, 3, D].
    x = images.astype(dtype).reshape(batch, grid, patch, grid, patch, 3)
    x = x.transpose(0, 1, 3, 2, 4, 5)
    # The second spatial dim is unnamed (None = replicated, as conv_spatial
    # is): Flax rejects a logical name used twice in one array once a mesh
    # and logical rules are active ("Dimensions ... occur more than once").
    x = dense(c.width, ("conv_spatial", None, "conv_in", "embed"), axis=(-3, -2, -1),
              name="patch_embed", use_bias=c.patch_bias, dtype=dtype, param_dtype=param_dtype,
              lora=lora)(x)
    x = x.reshape(batch, grid * grid, c.width)

    num_prefix = 1 if c.class_token else 0
    pos = self.param("pos_embed", nn.with_logical_partitioning(_EMBED_INIT, ("patches", "embed")),
                     (c.trained_grid_size**2 + num_prefix, c.width), param_dtype)
    # Resizing is static matrices on a small table: cheap enough to redo per
    # call, and it keeps the stored parameter at the checkpoint's shape.
    patch_pos = resize_position_grid(pos[num_prefix:], grid)
    x = x + patch_pos.astype(dtype)[None]
    if c.class_token:
      cls = self.param("class_token", nn.with_logical_partitioning(_EMBED_INIT, ("embed",)),
                       (c.width,), param_dtype)
      cls = (cls.astype(jnp.float32) + pos[0].astype(jnp.float32)).astype(dtype)
      x = jnp.concatenate([jnp.broadcast_to(cls, (batch, 1, c.width)), x], axis=1)

    if c.pre_norm:
      x = layer_norm(name="pre_norm", eps=c.norm_eps, param_dtype=param_dtype)(x).astype(dtype)
    x = constrain(x, RESIDUAL_AXES)

    # One scanned block: compile time and HLO size do not grow with depth.
    stack = nn.scan(
        maybe_remat(Block, c.remat_policy),
        variable_axes={"params": 0},
        split_rngs={"params": True, "dropout": True},  # Each block its own LoRA dropout.
        length=c.num_layers_built,
        unroll=min(c.scan_unroll, c.num_layers_built),
        metadata_params={nn.PARTITION_NAME: "layers"},
    )(c, dtype=dtype, param_dtype=param_dtype, lora=lora, name="blocks")
    x, _ = stack(x)

    if c.uses_final_norm:
      x = layer_norm(name="final_norm", eps=c.norm_eps, param_dtype=param_dtype)(x)
    return x[:, num_prefix:].astype(dtype)
