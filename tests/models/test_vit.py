"""VisionTransformer + HF converters against transformers' CLIP / SigLIP / DINOv2.

Tiny random float32 models, built from config objects (no downloads).
"""

import dataclasses
import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from jax.sharding import PartitionSpec as P

from mm1_jax.conversion.hf_vision import (check_tree_matches, convert_hf_vision,
                                          expected_param_shapes, vit_config_from_hf)
from mm1_jax.models.config import VitConfig
from mm1_jax.models.vit import VisionTransformer, normalize_images, resize_position_grid
from mm1_jax.sharding import make_mesh, params_shardings, use_mesh

TOL = 1e-4
SMALL = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32,
             patch_size=8)
TINY_VIT = VitConfig(image_size=32, patch_size=8, width=64, depth=3, num_heads=4, mlp_dim=128)


@functools.lru_cache(maxsize=None)
def hf_model(model_type: str):
  """A small random HF vision model in eval mode (cached: built once per session)."""
  torch.manual_seed(0)
  if model_type == "clip":
    model = transformers.CLIPVisionModel(
        transformers.CLIPVisionConfig(**SMALL, intermediate_size=128))
  elif model_type == "siglip":
    model = transformers.SiglipVisionModel(
        transformers.SiglipVisionConfig(**SMALL, intermediate_size=128))
  else:
    model = transformers.Dinov2Model(transformers.Dinov2Config(**SMALL, mlp_ratio=2))
  # HF initialises biases to 0 and norms / layer scales to 1; perturb every
  # tensor so a transposed or misplaced one cannot go unnoticed.
  with torch.no_grad():
    for param in model.parameters():
      param.add_(0.05 * torch.randn_like(param))
  return model.eval()


def state_dict(model) -> dict[str, np.ndarray]:
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def images(size: int, batch: int = 2, seed: int = 0) -> np.ndarray:
  """Already-normalised float32 images [B, size, size, 3]."""
  return np.random.default_rng(seed).normal(size=(batch, size, size, 3)).astype(np.float32)


def run_hf(model, x: np.ndarray):
  with torch.no_grad():
    return model(pixel_values=torch.from_numpy(x.transpose(0, 3, 1, 2)),
                 output_hidden_states=True)


def run_ours(config: VitConfig, params, x: np.ndarray) -> np.ndarray:
  return np.asarray(jax.jit(VisionTransformer(config).apply)({"params": params}, x))


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
  assert ours.shape == ref.shape, (ours.shape, ref.shape)
  return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


@pytest.mark.parametrize("feature_layer", [-1, -2])
def test_clip_matches_hf(feature_layer):
  model = hf_model("clip")
  config = vit_config_from_hf(model.config, "clip", feature_layer=feature_layer)
  assert (config.activation, config.class_token, config.pre_norm, config.patch_bias) == (
      "quick_gelu", True, True, False)
  params = convert_hf_vision(state_dict(model), config, "clip")
  assert params["blocks"]["mlp"]["fc1"]["kernel"].shape[0] == 3 + feature_layer + 1
  x = images(32)
  ref = run_hf(model, x).hidden_states[feature_layer][:, 1:].numpy()  # Drop the class token.
  assert rel_err(run_ours(config, params, x), ref) <= TOL


def test_siglip_matches_hf():
  model = hf_model("siglip")
  config = vit_config_from_hf(model.config, "siglip")
  assert (config.activation, config.class_token, config.final_norm) == ("gelu_tanh", False, True)
  params = convert_hf_vision(state_dict(model), config, "siglip")
  x = images(32)
  ref = run_hf(model, x).last_hidden_state.numpy()
  assert rel_err(run_ours(config, params, x), ref) <= TOL


# HF's Dinov2Embeddings.interpolate_pos_encoding (transformers 5.x) resizes the
# patch grid with F.interpolate(size=(new, new), mode="bicubic",
# align_corners=False) in float32, i.e. plain bicubic at the target size, so
# the whole model can be compared at a resolution it was not trained for
# (32 px = 4x4 grid trained; 48 px = 6x6 grid).
@pytest.mark.parametrize("image_size", [32, 48])
def test_dinov2_matches_hf(image_size):
  model = hf_model("dinov2")
  config = vit_config_from_hf(model.config, "dinov2", image_size=image_size)
  assert (config.trained_grid_size, config.grid_size) == (4, image_size // 8)
  assert config.layer_scale_init is not None and config.image_std[0] == pytest.approx(0.229)
  params = convert_hf_vision(state_dict(model), config, "dinov2")
  x = images(image_size)
  ref = run_hf(model, x).last_hidden_state[:, 1:].numpy()
  assert rel_err(run_ours(config, params, x), ref) <= TOL


def test_dinov2_legacy_key_names():
  """Hub checkpoints name DINOv2's attention attention.attention.{query,key,value}."""
  model = hf_model("dinov2")
  config = vit_config_from_hf(model.config, "dinov2")
  legacy = {}
  for key, value in state_dict(model).items():
    key = re.sub(r"\.attention\.([qkv])_proj\.",
                 lambda m: ".attention.attention." + {"q": "query", "k": "key", "v": "value"}[
                     m.group(1)] + ".", key)
    legacy[key.replace(".attention.o_proj.", ".attention.output.dense.")] = value
  assert any(".attention.attention.query." in k for k in legacy)
  new = convert_hf_vision(state_dict(model), config, "dinov2")
  old = convert_hf_vision(legacy, config, "dinov2")
  jax.tree.map(np.testing.assert_array_equal, new, old)


@pytest.mark.parametrize("old,new", [(7, 5), (4, 6)])
def test_resize_position_grid_matches_torch_bicubic(old, new):
  pos = np.random.default_rng(1).normal(size=(old * old, 16)).astype(np.float32)
  grid = torch.from_numpy(pos.reshape(1, old, old, 16).transpose(0, 3, 1, 2))
  ref = torch.nn.functional.interpolate(grid, size=(new, new), mode="bicubic",
                                        align_corners=False)
  ref = ref.numpy().transpose(0, 2, 3, 1).reshape(new * new, 16)
  ours = np.asarray(resize_position_grid(pos, new))
  np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(resize_position_grid(pos, old)), pos)


def test_block_stack_is_scanned():
  config = dataclasses.replace(TINY_VIT, feature_layer=-2, layer_scale_init=0.5)
  model = VisionTransformer(config)
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)  # Abstract: shapes and names.
  boxed = jax.tree.leaves(variables["params"]["blocks"],
                          is_leaf=lambda v: isinstance(v, nn.LogicallyPartitioned))
  for leaf in boxed:
    assert leaf.names[0] == "layers" and leaf.value.shape[0] == config.num_layers_built == 2
  assert "final_norm" not in variables["params"]  # Not the last block's output.
  # One scan in the program rather than an unrolled copy per layer.
  jaxpr = str(jax.make_jaxpr(model.apply)(nn.unbox(variables), x))
  assert jaxpr.count("scan[") == 1
  check_tree_matches(nn.unbox(variables)["params"], expected_param_shapes(config))


def test_converter_names_mismatched_missing_and_unexpected_tensors():
  model = hf_model("clip")
  config = vit_config_from_hf(model.config, "clip")
  bad = state_dict(model)
  bad["encoder.layers.1.mlp.fc1.weight"] = bad["encoder.layers.1.mlp.fc1.weight"][:-1]
  message = "encoder.layers.1.mlp.fc1.weight: shape (127, 64)"
  with pytest.raises(ValueError, match=re.escape(message)):
    convert_hf_vision(bad, config, "clip")

  bad = state_dict(model)
  del bad["pre_layrnorm.bias"]
  bad["encoder.layers.7.mlp.fc1.weight"] = bad["encoder.layers.0.mlp.fc1.weight"]
  with pytest.raises(ValueError) as error:
    convert_hf_vision(bad, config, "clip")
  message = str(error.value)
  assert re.search(r"missing keys:\n  pre_layrnorm\.bias", message), message
  assert re.search(r"unexpected keys:\n  encoder\.layers\.7\.mlp\.fc1\.weight", message), message

  # A config that does not match the checkpoint (width 32): names the tensor.
  narrow = vit_config_from_hf(model.config, "clip", width=32, mlp_dim=64)
  with pytest.raises(ValueError, match=re.escape("embeddings.patch_embedding.weight: shape")):
    convert_hf_vision(state_dict(model), narrow, "clip")


def test_normalize_images():
  raw = np.random.default_rng(2).integers(0, 256, size=(2, 4, 4, 3), dtype=np.uint8)
  out = np.asarray(normalize_images(raw, TINY_VIT))
  ref = (raw / 255.0 - np.array(TINY_VIT.image_mean)) / np.array(TINY_VIT.image_std)
  assert out.dtype == np.float32
  np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)


def test_sharded_remat_matches_single_device():
  """Under a data x fsdp x tensor mesh with remat, the output is unchanged."""
  config = dataclasses.replace(TINY_VIT, remat_policy="full", final_norm=True)
  model = VisionTransformer(config)
  x = images(32, batch=4)
  # Random values of the right shapes: cheaper than compiling model.init.
  rng = np.random.default_rng(3)
  params = jax.tree.map(lambda s: rng.normal(scale=0.2, size=s.shape).astype(np.float32),
                        nn.unbox(jax.eval_shape(model.init, jax.random.key(0), x)))
  plain = VisionTransformer(dataclasses.replace(config, remat_policy="none"))
  expected = np.asarray(jax.jit(plain.apply)(params, x))
  mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  with use_mesh(mesh):
    shardings = params_shardings(jax.eval_shape(model.init, jax.random.key(0), x), mesh)
    sharded = jax.device_put(params, shardings)
    out = np.asarray(jax.jit(model.apply)(sharded, x))
  assert sharded["params"]["blocks"]["mlp"]["fc1"]["kernel"].sharding.spec == P(
      None, "fsdp", "tensor")
  assert rel_err(out, expected) <= TOL
