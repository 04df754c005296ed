"""Hugging Face vision towers (CLIP, SigLIP, DINOv2) -> VisionTransformer params.

    hf = transformers.CLIPVisionModel.from_pretrained(...)
    config = vit_config_from_hf(hf.config, "clip", feature_layer=-2)
    state = {k: v.float().numpy() for k, v in hf.state_dict().items()}
    params = convert_hf_vision(state, config, "clip")
    feats = VisionTransformer(config).apply({"params": params}, images)

State-dict keys are those of model.state_dict() of CLIPVisionModel,
SiglipVisionModel and Dinov2Model in transformers 5. The legacy names found
in hub checkpoints and older transformers (a "vision_model." prefix; DINOv2's
"attention.attention.query" / "attention.output.dense") are accepted too.

`export_hf_vision(params, config, model_type)` is the inverse for CLIP and
SigLIP (and DINOv2), through the same name table and per-layer spec:
(transformers 5 name, tensor) pairs, one at a time.

The result is a plain nested dict of numpy arrays shaped like
nn.unbox(VisionTransformer(config).init(...))["params"]; the scanned block
parameters are stacked on a leading layer axis. The stacks are allocated once
and filled slice by slice, reading one source tensor at a time, so a lazy
state dict (safetensors_dir.LazyStateDict) costs the result plus one tensor.
"""

from __future__ import annotations

import dataclasses
import re
from types import SimpleNamespace
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from mm1_jax.conversion.params_builder import ConversionError
from mm1_jax.models.config import (CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, VitConfig,
                                   validate_vit)

MODEL_TYPES = ("clip", "siglip", "dinov2")

# HF hidden_act -> our activation names (config.ACTIVATIONS).
_HF_ACTIVATIONS = {
    "gelu": "gelu",
    "quick_gelu": "quick_gelu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "silu": "silu",
    "swish": "silu",
    "relu": "relu",
}

SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)


def _check_model_type(model_type: str) -> None:
  if model_type not in MODEL_TYPES:
    raise ValueError(f"unknown vision model type {model_type!r}; use one of {MODEL_TYPES}.")


def vit_config_from_hf(hf_config: Any, model_type: str, **overrides) -> VitConfig:
  """VitConfig matching a HF vision config (CLIPVisionConfig, SiglipVisionConfig,
  Dinov2Config, or a CLIPConfig / SiglipConfig whose vision_config is used).

  overrides: VitConfig fields to change, e.g. image_size=378 (the position
  embeddings are then resized from the checkpoint's grid) or feature_layer=-2.
  """
  _check_model_type(model_type)
  if isinstance(hf_config, Mapping):
    hf_config = SimpleNamespace(**hf_config)
  hf = getattr(hf_config, "vision_config", None) or hf_config
  if isinstance(hf, Mapping):
    hf = SimpleNamespace(**hf)
  if hf.hidden_act not in _HF_ACTIVATIONS:
    raise ValueError(f"{model_type}: unsupported hidden_act {hf.hidden_act!r}; "
                     f"supported: {sorted(_HF_ACTIVATIONS)}.")
  patch = hf.patch_size
  grid = hf.image_size // patch
  common = dict(
      # HF's stride-p conv silently drops the last image_size % patch pixels
      # (e.g. SigLIP so400m-patch14-384: 27 patches of 14 = 378 px), so the
      # same patches come from an image of grid * patch pixels.
      image_size=grid * patch,
      patch_size=patch,
      width=hf.hidden_size,
      depth=hf.num_hidden_layers,
      num_heads=hf.num_attention_heads,
      activation=_HF_ACTIVATIONS[hf.hidden_act],
      norm_eps=hf.layer_norm_eps,
      # The position embeddings are for this grid whatever image_size the
      # overrides choose; VisionTransformer resizes them.
      pos_grid_size=grid,
  )
  if model_type == "clip":
    config = VitConfig(**common, mlp_dim=hf.intermediate_size, class_token=True,
                       patch_bias=False, pre_norm=True, final_norm=False,
                       image_mean=CLIP_MEAN, image_std=CLIP_STD)
  elif model_type == "siglip":
    config = VitConfig(**common, mlp_dim=hf.intermediate_size, class_token=False,
                       patch_bias=True, pre_norm=False, final_norm=True,
                       image_mean=SIGLIP_MEAN, image_std=SIGLIP_STD)
  else:
    if getattr(hf, "use_swiglu_ffn", False):
      raise ValueError("dinov2: use_swiglu_ffn=True (the giant model's SwiGLU MLP) is not "
                       "supported by VisionTransformer.")
    if not getattr(hf, "qkv_bias", True):
      raise ValueError("dinov2: qkv_bias=False is not supported; VisionTransformer's "
                       "attention always has q/k/v biases.")
    config = VitConfig(**common, mlp_dim=int(hf.hidden_size * hf.mlp_ratio), class_token=True,
                       patch_bias=True, pre_norm=False, final_norm=True,
                       layer_scale_init=float(hf.layerscale_value),
                       image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)
  config = dataclasses.replace(config, **overrides)
  validate_vit(config)
  return config


@dataclasses.dataclass(frozen=True)
class _Names:
  """Where each of our tensors lives in a HF state dict (None: not in it)."""
  patch_weight: str
  patch_bias: str | None
  class_token: str | None
  pos_embed: str
  pos_has_batch_dim: bool  # DINOv2 stores [1, T, D].
  pre_norm: str | None
  final_norm: str | None
  layer_prefix: str  # Followed by "{i}.".
  norm1: str
  query: str
  key: str
  value: str
  out: str
  norm2: str
  fc1: str
  fc2: str
  ls1: str | None
  ls2: str | None
  ignored: tuple[str, ...]  # Regexes of keys that are deliberately unused.


_CLIP_LAYER = dict(
    layer_prefix="encoder.layers.", norm1="layer_norm1", query="self_attn.q_proj",
    key="self_attn.k_proj", value="self_attn.v_proj", out="self_attn.out_proj",
    norm2="layer_norm2", fc1="mlp.fc1", fc2="mlp.fc2", ls1=None, ls2=None)

_NAMES = {
    "clip": _Names(
        patch_weight="embeddings.patch_embedding.weight", patch_bias=None,
        class_token="embeddings.class_embedding",
        pos_embed="embeddings.position_embedding.weight", pos_has_batch_dim=False,
        pre_norm="pre_layrnorm", final_norm=None,
        # post_layernorm only normalises CLIP's pooled class token.
        ignored=(r"^post_layernorm\.", r"^embeddings\.position_ids$"), **_CLIP_LAYER),
    "siglip": _Names(
        patch_weight="embeddings.patch_embedding.weight",
        patch_bias="embeddings.patch_embedding.bias", class_token=None,
        pos_embed="embeddings.position_embedding.weight", pos_has_batch_dim=False,
        pre_norm=None, final_norm="post_layernorm",
        # The attention-pooling head makes SigLIP's pooled embedding; MM1 uses patches.
        ignored=(r"^head\.", r"^embeddings\.position_ids$"), **_CLIP_LAYER),
    "dinov2": _Names(
        patch_weight="embeddings.patch_embeddings.projection.weight",
        patch_bias="embeddings.patch_embeddings.projection.bias",
        class_token="embeddings.cls_token",
        pos_embed="embeddings.position_embeddings", pos_has_batch_dim=True,
        pre_norm=None, final_norm="layernorm",
        layer_prefix="encoder.layer.", norm1="norm1", query="attention.q_proj",
        key="attention.k_proj", value="attention.v_proj", out="attention.o_proj",
        norm2="norm2", fc1="mlp.fc1", fc2="mlp.fc2",
        ls1="layer_scale1.lambda1", ls2="layer_scale2.lambda1",
        # mask_token is only used for masked-image pretraining.
        ignored=(r"^embeddings\.mask_token$",)),
}

# Legacy (hub checkpoint / transformers 4) names -> transformers 5 names.
_LEGACY_RENAMES = {
    "clip": ((r"^vision_model\.", ""),),
    "siglip": ((r"^vision_model\.", ""),),
    "dinov2": ((r"\.attention\.attention\.query\.", ".attention.q_proj."),
               (r"\.attention\.attention\.key\.", ".attention.k_proj."),
               (r"\.attention\.attention\.value\.", ".attention.v_proj."),
               (r"\.attention\.output\.dense\.", ".attention.o_proj.")),
}


def _to_numpy(value: Any) -> np.ndarray:
  if hasattr(value, "detach"):  # A torch tensor; .float() because numpy has no bfloat16.
    value = value.detach().cpu()
    if not value.is_floating_point() or value.dtype.itemsize < 4:
      value = value.float()
    return value.numpy()
  return np.asarray(value)


def _canonical_keys(state_dict: Mapping[str, Any], model_type: str) -> dict[str, str]:
  """canonical (transformers 5) key -> key as given. Reads names only, so a
  lazy mapping (safetensors_dir.LazyStateDict) loads nothing here."""
  out: dict[str, str] = {}
  for key in state_dict.keys():
    canonical = key
    for pattern, replacement in _LEGACY_RENAMES[model_type]:
      canonical = re.sub(pattern, replacement, canonical)
    if canonical in out:
      raise ValueError(f"{model_type}: state dict has both {out[canonical]!r} and {key!r}, "
                       "which name the same tensor.")
    out[canonical] = key
  return out


class _Reader:
  """Takes tensors out of a state dict one at a time, recording every problem
  on the way, and writes them into preallocated params arrays."""

  def __init__(self, state_dict: Mapping[str, Any], model_type: str, dtype: Any):
    self.state_dict = state_dict
    self.keys = _canonical_keys(state_dict, model_type)  # canonical -> given
    self.dtype = dtype
    self.used: set[str] = set()
    self.missing: list[str] = []
    self.mismatched: list[str] = []
    self.params: dict[tuple[str, ...], np.ndarray] = {}  # our path -> array

  def _read(self, key: str | None, shape: tuple[int, ...], what: str) -> np.ndarray | None:
    """The tensor `key` (canonical name), which must have HF shape `shape`; None on error."""
    if key is None or key not in self.keys:
      self.missing.append(key or f"<{what}: the config needs it but this model has none>")
      return None
    self.used.add(key)
    original = self.keys[key]
    value = _to_numpy(self.state_dict[original])
    if tuple(value.shape) != tuple(shape):
      self.mismatched.append(f"{original}: shape {tuple(value.shape)} does not fit the config, "
                             f"which needs {tuple(shape)} ({what})")
      return None
    return value

  def take(self, path: tuple[str, ...], key: str | None, shape: tuple[int, ...], what: str,
           transform: Callable[[np.ndarray], np.ndarray] = lambda x: x) -> None:
    """params[path] = transform(tensor `key`), cast to the params dtype."""
    value = self._read(key, shape, what)
    if value is not None:
      self.params[path] = np.asarray(transform(value), dtype=self.dtype)

  def take_layer(self, path: tuple[str, ...], index: int, num_layers: int, key: str | None,
                 shape: tuple[int, ...], what: str,
                 transform: Callable[[np.ndarray], np.ndarray]) -> None:
    """params[path][index] = transform(tensor `key`): the stack [num_layers, ...]
    is allocated at its first slice and filled in place, so the blocks exist
    once (not as per-layer arrays plus their np.stack)."""
    value = self._read(key, shape, what)
    if value is None:
      return
    value = transform(value)
    if path not in self.params:
      self.params[path] = np.empty((num_layers,) + value.shape, dtype=self.dtype)
    self.params[path][index] = value  # Casts to the params dtype in place.


def _listing(title: str, items: list[str], limit: int = 20) -> str:
  shown = items[:limit] + ([f"... and {len(items) - limit} more"] if len(items) > limit else [])
  return f"{title}:\n" + "\n".join(f"  {item}" for item in shown)


def _layer_spec(names: _Names, c: VitConfig
                ) -> list[tuple[tuple[str, ...], str | None, tuple[int, ...], Callable, Callable]]:
  """Per layer: (our path, their name, their shape, HF -> ours, ours -> HF)."""
  d, heads, mlp = c.width, c.num_heads, c.mlp_dim
  head_dim = d // heads
  same = lambda w: w

  def linear_in(w):  # torch [out=heads*hd, in=D] -> [D, heads, hd].
    return w.T.reshape(d, heads, head_dim)

  def linear_out(w):  # torch [out=D, in=heads*hd] -> [heads, hd, D].
    return w.T.reshape(heads, head_dim, d)

  spec = []
  for ours, theirs in (("norm1", names.norm1), ("norm2", names.norm2)):
    spec += [((ours, "scale"), f"{theirs}.weight", (d,), same, same),
             ((ours, "bias"), f"{theirs}.bias", (d,), same, same)]
  for ours, theirs in (("query", names.query), ("key", names.key), ("value", names.value)):
    spec += [(("attn", ours, "kernel"), f"{theirs}.weight", (d, d), linear_in,
              lambda k: k.reshape(d, d).T),
             (("attn", ours, "bias"), f"{theirs}.bias", (d,),
              lambda w: w.reshape(heads, head_dim), lambda b: b.reshape(d))]
  spec += [
      (("attn", "out", "kernel"), f"{names.out}.weight", (d, d), linear_out,
       lambda k: k.reshape(d, d).T),
      (("attn", "out", "bias"), f"{names.out}.bias", (d,), same, same),
      (("mlp", "fc1", "kernel"), f"{names.fc1}.weight", (mlp, d), lambda w: w.T, lambda k: k.T),
      (("mlp", "fc1", "bias"), f"{names.fc1}.bias", (mlp,), same, same),
      (("mlp", "fc2", "kernel"), f"{names.fc2}.weight", (d, mlp), lambda w: w.T, lambda k: k.T),
      (("mlp", "fc2", "bias"), f"{names.fc2}.bias", (d,), same, same),
  ]
  if c.layer_scale_init is not None:
    spec += [(("ls1",), names.ls1, (d,), same, same), (("ls2",), names.ls2, (d,), same, same)]
  return spec


def convert_hf_vision(state_dict: Mapping[str, Any], config: VitConfig, model_type: str, *,
                      dtype: Any = np.float32, check: bool = True) -> dict[str, Any]:
  """HF state dict -> VisionTransformer params (nested dict of numpy arrays).

  state_dict: key -> array [torch layout] (numpy arrays or CPU torch tensors).
  config: the target VitConfig (see vit_config_from_hf); only its first
    config.num_layers_built layers are converted, the later ones ignored.
  dtype: dtype of the returned arrays (numpy or ml_dtypes, e.g. jnp.bfloat16).
  check: also compare the result with the model's abstract params.
  Raises ValueError naming every tensor whose shape does not fit the config,
  and listing missing and unexpected keys.
  """
  _check_model_type(model_type)
  names = _NAMES[model_type]
  reader = _Reader(state_dict, model_type, np.dtype(dtype))
  c = config
  d, p, heads, mlp = c.width, c.patch_size, c.num_heads, c.mlp_dim
  num_pos = c.trained_grid_size**2 + (1 if c.class_token else 0)

  # torch conv [out, in, kh, kw] -> our patchify kernel [kh, kw, in, out].
  reader.take(("patch_embed", "kernel"), names.patch_weight, (d, 3, p, p),
              "patch conv [width, 3, patch, patch]", lambda w: w.transpose(2, 3, 1, 0))
  if c.patch_bias:
    reader.take(("patch_embed", "bias"), names.patch_bias, (d,), "patch conv bias [width]")
  pos_shape = (1, num_pos, d) if names.pos_has_batch_dim else (num_pos, d)
  reader.take(
      ("pos_embed",), names.pos_embed, pos_shape,
      f"position embeddings: trained grid {c.trained_grid_size}**2"
      f"{' + class token' if c.class_token else ''}, width",
      lambda w: w.reshape(num_pos, d))
  if c.class_token:
    reader.take(("class_token",), names.class_token,
                (1, 1, d) if model_type == "dinov2" else (d,), "class token",
                lambda w: w.reshape(d))
  norms = [("pre_norm", names.pre_norm, c.pre_norm),
           ("final_norm", names.final_norm, c.uses_final_norm)]
  for ours, theirs, wanted in norms:
    if wanted:
      for leaf, suffix in (("scale", "weight"), ("bias", "bias")):
        key = f"{theirs}.{suffix}" if theirs else None
        reader.take((ours, leaf), key, (d,), f"{ours} [width]")

  for path, theirs, shape, transform, _ in _layer_spec(names, c):
    for i in range(c.num_layers_built):
      reader.take_layer(("blocks",) + path, i, c.num_layers_built,
                        f"{names.layer_prefix}{i}.{theirs}" if theirs else None, shape,
                        f"block {'/'.join(path)}", transform)

  unexpected = []
  layer_index = re.compile(rf"^{re.escape(names.layer_prefix)}(\d+)\.")
  for key, original in reader.keys.items():
    if key in reader.used or any(re.search(pattern, key) for pattern in names.ignored):
      continue
    match = layer_index.match(key)
    if match and c.num_layers_built <= int(match.group(1)) < c.depth:
      continue  # Blocks after the feature layer are not built.
    if not c.uses_final_norm and names.final_norm and key.startswith(names.final_norm + "."):
      continue  # The final norm only follows the last block.
    unexpected.append(original)

  problems = []
  if reader.mismatched:
    problems.append(_listing("shape mismatches", reader.mismatched))
  if reader.missing:
    problems.append(_listing("missing keys", reader.missing))
  if unexpected:
    problems.append(_listing("unexpected keys", sorted(unexpected)))
  if problems:
    raise ConversionError(
        f"cannot convert the {model_type} state dict to VitConfig(width={d}, depth={c.depth}, "
        f"layers built={c.num_layers_built}, num_heads={heads}, mlp_dim={mlp}, patch_size={p}, "
        f"trained_grid_size={c.trained_grid_size}, class_token={c.class_token}):\n"
        + "\n".join(problems))

  params: dict[str, Any] = {}
  for path, value in reader.params.items():
    _set(params, path, value)
  if check:
    check_tree_matches(params, expected_param_shapes(config))
  return params


def hf_vision_type(config: VitConfig) -> str | None:
  """"clip" or "siglip" when a transformers CLIPVisionModel / SiglipVisionModel
  computes `config`'s ViT (vit_config_from_hf's shapes), else None."""
  if config.layer_scale_init is not None or config.activation not in _TO_HF_ACTIVATION:
    return None
  if config.class_token and config.pre_norm and not config.patch_bias:
    return "clip"
  if not config.class_token and not config.pre_norm and config.patch_bias:
    return "siglip"
  return None


# Our activation -> the transformers name vit_config_from_hf reads as it.
_TO_HF_ACTIVATION = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_tanh": "gelu_pytorch_tanh",
                     "silu": "silu", "relu": "relu"}


def hf_vision_config_dict(config: VitConfig, model_type: str) -> dict[str, Any]:
  """The vision_config of a transformers CLIP / SigLIP tower holding the
  blocks `config` builds (num_layers_built): config.json values. Its
  image_size is the position embeddings' trained grid (pos_grid_size); a run
  at another size needs interpolate_pos_encoding=True there."""
  values = {"model_type": f"{model_type}_vision_model", "hidden_size": config.width,
            "intermediate_size": config.mlp_dim, "num_hidden_layers": config.num_layers_built,
            "num_attention_heads": config.num_heads,
            "image_size": config.trained_grid_size * config.patch_size,
            "patch_size": config.patch_size, "num_channels": 3,
            "hidden_act": _TO_HF_ACTIVATION[config.activation],
            "layer_norm_eps": config.norm_eps, "attention_dropout": 0.0}
  if model_type == "siglip":
    values["vision_use_head"] = False  # The attention-pooling head: never imported, not used.
  return values


def export_hf_vision(params: Mapping[str, Any], config: VitConfig, model_type: str
                     ) -> Iterator[tuple[str, np.ndarray]]:
  """(transformers 5 state-dict name, tensor) of every tensor of a
  VisionTransformer(config)'s params (host numpy arrays), through the name
  table the import reads. The blocks built (num_layers_built) are written;
  the final norm, when the features skip it, and CLIP's post_layernorm
  (which the import drops: it only normalises the pooled class token) as
  the identity (ones, zeros): the tower holds them, patch features at a
  block's output never pass them. Position embeddings are the trained
  grid's (pos_grid_size)."""
  _check_model_type(model_type)
  names = _NAMES[model_type]
  d = config.width
  as_array = lambda *path: np.asarray(_get(params, path))
  # Our patchify kernel [kh, kw, in, out] -> torch conv [out, in, kh, kw].
  yield names.patch_weight, as_array("patch_embed", "kernel").transpose(3, 2, 0, 1)
  if config.patch_bias:
    yield names.patch_bias, as_array("patch_embed", "bias")
  position = as_array("pos_embed")
  yield names.pos_embed, position[None] if names.pos_has_batch_dim else position
  if config.class_token:
    token = as_array("class_token")
    yield names.class_token, token.reshape(1, 1, d) if model_type == "dinov2" else token
  if config.pre_norm:
    yield f"{names.pre_norm}.weight", as_array("pre_norm", "scale")
    yield f"{names.pre_norm}.bias", as_array("pre_norm", "bias")
  for i in range(config.num_layers_built):
    for path, theirs, _, _, to_hf in _layer_spec(names, config):
      yield f"{names.layer_prefix}{i}.{theirs}", to_hf(as_array("blocks", *path)[i])
  if model_type == "clip":  # Its post_layernorm only makes the pooled class token (not imported).
    yield "post_layernorm.weight", np.ones(d, np.float32)
    yield "post_layernorm.bias", np.zeros(d, np.float32)
  if names.final_norm:
    used = config.uses_final_norm
    yield (f"{names.final_norm}.weight",
           as_array("final_norm", "scale") if used else np.ones(d, np.float32))
    yield (f"{names.final_norm}.bias",
           as_array("final_norm", "bias") if used else np.zeros(d, np.float32))


def _get(tree: Mapping[str, Any], path: tuple[str, ...]) -> Any:
  for name in path:
    tree = tree[name]
  return tree


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
  for name in path[:-1]:
    tree = tree.setdefault(name, {})
  tree[path[-1]] = value


def expected_param_shapes(config: VitConfig, param_dtype: Any = "float32") -> dict[str, Any]:
  """The VisionTransformer's params as ShapeDtypeStructs (nested dict), untraced."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  from mm1_jax.models.vit import VisionTransformer

  model = VisionTransformer(config, param_dtype=param_dtype)
  images = jnp.zeros((1, config.image_size, config.image_size, 3), jnp.float32)
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), images))
  return nn.unbox(abstract)["params"]


def check_tree_matches(params: Mapping[str, Any], expected: Mapping[str, Any]) -> None:
  """Raises ValueError listing paths that are missing, extra or differently shaped.

  params, expected: nested mappings whose leaves have .shape (arrays,
  ShapeDtypeStructs; flax boxes are unboxed first).
  """
  import flax.linen as nn
  from flax import traverse_util

  flat = traverse_util.flatten_dict(nn.unbox(dict(params)), sep="/")
  want = traverse_util.flatten_dict(nn.unbox(dict(expected)), sep="/")
  problems = [f"missing {k} {tuple(want[k].shape)}" for k in sorted(set(want) - set(flat))]
  problems += [f"unexpected {k} {tuple(np.shape(flat[k]))}" for k in sorted(set(flat) - set(want))]
  problems += [f"{k}: shape {tuple(np.shape(flat[k]))}, expected {tuple(want[k].shape)}"
               for k in sorted(set(flat) & set(want))
               if tuple(np.shape(flat[k])) != tuple(want[k].shape)]
  if problems:
    raise ConversionError("parameter tree does not match the model:\n" + "\n".join(problems))
