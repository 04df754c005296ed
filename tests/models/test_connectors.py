"""Tests for mm1_jax.models.connectors.

The C-Abstractor is checked against an independent PyTorch re-implementation
of Honeybee's official one (timm RegStage / Bottleneck with LayerNorm2d, SiLU
and squeeze-excitation, torch AdaptiveAvgPool2d), with our weights copied in.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from jax.sharding import PartitionSpec

from mm1_jax.models import connectors
from mm1_jax.models.config import ConnectorConfig
from mm1_jax.typed_config import ConfigError
from mm1_jax.sharding import LOGICAL_AXIS_RULES, make_mesh, params_shardings, use_mesh

DV, HIDDEN, OUT = 32, 48, 40


# --------------------------------------------------------------------------
# Independent PyTorch reference (NCHW, as in Honeybee / timm).
# --------------------------------------------------------------------------


class TorchLayerNorm2d(torch.nn.LayerNorm):
  """timm's LayerNorm2d: LayerNorm over channels of an NCHW tensor."""

  def __init__(self, channels):
    super().__init__(channels, eps=1e-6)

  def forward(self, x):
    x = x.permute(0, 2, 3, 1)
    x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
    return x.permute(0, 3, 1, 2)


class TorchSE(torch.nn.Module):

  def __init__(self, channels, reduced):
    super().__init__()
    self.fc1 = torch.nn.Conv2d(channels, reduced, 1, bias=True)
    self.fc2 = torch.nn.Conv2d(reduced, channels, 1, bias=True)

  def forward(self, x):
    s = x.mean((2, 3), keepdim=True)
    s = self.fc2(F.silu(self.fc1(s)))
    return x * torch.sigmoid(s)


class TorchBottleneck(torch.nn.Module):
  """RegNet bottleneck, bottle_ratio 1, group_size 1 (depthwise 3x3)."""

  def __init__(self, cin, cout, se_ratio):
    super().__init__()
    self.conv1 = torch.nn.Conv2d(cin, cout, 1, bias=False)
    self.norm1 = TorchLayerNorm2d(cout)
    self.conv2 = torch.nn.Conv2d(cout, cout, 3, padding=1, groups=cout, bias=False)
    self.norm2 = TorchLayerNorm2d(cout)
    self.se = TorchSE(cout, int(round(cin * se_ratio)))
    self.conv3 = torch.nn.Conv2d(cout, cout, 1, bias=False)
    self.norm3 = TorchLayerNorm2d(cout)
    if cin != cout:
      self.downsample = torch.nn.Sequential(torch.nn.Conv2d(cin, cout, 1, bias=False),
                                            TorchLayerNorm2d(cout))
    else:
      self.downsample = torch.nn.Identity()

  def forward(self, x):
    shortcut = x
    x = F.silu(self.norm1(self.conv1(x)))
    x = F.silu(self.norm2(self.conv2(x)))
    x = self.se(x)
    x = self.norm3(self.conv3(x))
    return F.silu(x + self.downsample(shortcut))


class TorchCAbstractor(torch.nn.Module):

  def __init__(self, num_patches, dv, hidden, out, num_queries, depth, mlp_depth, se_ratio):
    super().__init__()
    self.pos_emb = torch.nn.Parameter(torch.zeros(1, num_patches, dv))
    s1 = [TorchBottleneck(dv if i == 0 else hidden, hidden, se_ratio) for i in range(depth)]
    s2 = [TorchBottleneck(hidden, hidden, se_ratio) for _ in range(depth)]
    hw = math.isqrt(num_queries)
    self.net = torch.nn.Sequential(torch.nn.Sequential(*s1), torch.nn.AdaptiveAvgPool2d((hw, hw)),
                                   torch.nn.Sequential(*s2))
    layers = [torch.nn.Linear(hidden, out)]
    for _ in range(1, mlp_depth):
      layers += [torch.nn.SiLU(), torch.nn.Linear(out, out)]
    self.readout = torch.nn.Sequential(*layers)

  def forward(self, x):
    x = x + self.pos_emb
    b, l, d = x.shape
    hw = math.isqrt(l)
    x = x.reshape(b, hw, hw, d).permute(0, 3, 1, 2)  # b (h w) d -> b d h w
    x = self.net(x)
    x = x.flatten(2).transpose(1, 2)  # b d h w -> b (h w) d
    return self.readout(x)


def _t(array):
  return torch.from_numpy(np.array(array, dtype=np.float32))


def _copy_conv1x1(conv, p):
  conv.weight.data = _t(p["kernel"]).T[:, :, None, None].contiguous()
  if conv.bias is not None:
    conv.bias.data = _t(p["bias"])


def _copy_norm(norm, p):
  norm.weight.data = _t(p["scale"])
  norm.bias.data = _t(p["bias"])


def _copy_block(block, p):
  _copy_conv1x1(block.conv1, p["conv1"])
  _copy_norm(block.norm1, p["norm1"])
  # Flax depthwise kernel [3, 3, 1, C] -> torch [C, 1, 3, 3].
  block.conv2.weight.data = _t(p["conv2"]["kernel"]).permute(3, 2, 0, 1).contiguous()
  _copy_norm(block.norm2, p["norm2"])
  _copy_conv1x1(block.se.fc1, p["se"]["fc1"])
  _copy_conv1x1(block.se.fc2, p["se"]["fc2"])
  _copy_conv1x1(block.conv3, p["conv3"])
  _copy_norm(block.norm3, p["norm3"])
  if isinstance(block.downsample, torch.nn.Sequential):
    _copy_conv1x1(block.downsample[0], p["shortcut_conv"])
    _copy_norm(block.downsample[1], p["shortcut_norm"])
  else:
    assert "shortcut_conv" not in p


def _copy_cabstractor(model, params):
  model.pos_emb.data = _t(params["pos_embed"])[None]
  for stage, name in ((model.net[0], "s1"), (model.net[2], "s2")):
    for i, block in enumerate(stage):
      _copy_block(block, params[name][f"b{i + 1}"])
  linears = [m for m in model.readout if isinstance(m, torch.nn.Linear)]
  for i, linear in enumerate(linears):
    linear.weight.data = _t(params[f"readout_{i}"]["kernel"]).T.contiguous()
    linear.bias.data = _t(params[f"readout_{i}"]["bias"])


# --------------------------------------------------------------------------
# Helpers.
# --------------------------------------------------------------------------


def _abstract(module, x):
  """Boxed (logically partitioned) abstract variables: shapes without compiling."""
  return jax.eval_shape(module.init, jax.random.PRNGKey(0), x)


def _random_params(module, x, seed=0):
  """Random float32 params of `module`'s structure, drawn with numpy.

  Jitted init spends most of its compile time on the random initialisers
  (many seconds on a busy CPU), so tests that compare against references fill
  the parameters themselves. Norm scales near 1, biases small but non-zero,
  kernels ~ 1/sqrt(fan_in), so no ones/zeros init can hide a mix-up.
  """
  rng = np.random.default_rng(seed)
  abstract = nn.unbox(_abstract(module, x))["params"]

  def fill(path, leaf):
    name = path[-1].key
    noise = rng.normal(size=leaf.shape)
    if name == "scale":
      value = 1.0 + 0.1 * noise
    elif name == "bias":
      value = 0.1 * noise
    elif leaf.ndim == 4:  # Depthwise conv [3, 3, 1, C].
      value = noise / 3.0
    else:
      value = noise / math.sqrt(leaf.shape[0])
    return jnp.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, abstract)


def _normal(shape, seed=0):
  # numpy inputs: eager jax.random ops each cost a compile on CPU.
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _rel_err(ours, ref):
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  return np.max(np.abs(ours - ref)) / np.max(np.abs(ref))


def _config(kind, num_image_tokens, **kw):
  return ConnectorConfig(kind=kind, num_image_tokens=num_image_tokens, hidden_dim=HIDDEN, **kw)


# --------------------------------------------------------------------------
# Tests.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("grid,out", [(27, 12), (7, 3), (7, 4), (6, 3), (24, 12), (5, 5),
                                      (9, 7), (16, 1), (3, 5)])
def test_adaptive_pool_matches_torch(grid, out):
  x = np.random.default_rng(grid * 100 + out).normal(size=(2, grid, grid, 5)).astype(np.float32)
  ours = connectors.adaptive_avg_pool2d(jnp.asarray(x), out)
  ref = F.adaptive_avg_pool2d(torch.from_numpy(x).permute(0, 3, 1, 2), (out, out))
  ref = ref.permute(0, 2, 3, 1).numpy()
  assert ours.shape == (2, out, out, 5)
  np.testing.assert_allclose(np.asarray(ours), ref, rtol=1e-5, atol=1e-6)


def test_adaptive_pool_matrix_bins():
  # 27 -> 12: bins overlap (27/12 is not an integer); each row still averages.
  matrix = connectors.adaptive_pool_matrix(27, 12)
  np.testing.assert_allclose(matrix.sum(axis=1), 1.0, rtol=1e-6)
  np.testing.assert_array_equal(np.nonzero(matrix[0])[0], [0, 1, 2])  # [0, ceil(27/12) = 3)
  np.testing.assert_array_equal(np.nonzero(matrix[1])[0], [2, 3, 4])  # [floor(27/12), ceil(54/12))
  np.testing.assert_array_equal(np.nonzero(matrix[11])[0], [24, 25, 26])
  with pytest.raises(ValueError):
    connectors.adaptive_pool_matrix(3, 0)


@pytest.mark.parametrize("num_patches,num_tokens,hidden,depth,mlp_depth", [
    (36, 9, HIDDEN, 3, 2),   # 6 -> 3, divisible; projection shortcut in the first block.
    (49, 16, HIDDEN, 2, 3),  # 7 -> 4, overlapping bins; deeper readout.
    (49, 9, DV, 1, 1),       # 7 -> 3; hidden == Dv, so every shortcut is the identity.
])
def test_cabstractor_matches_torch_reference(num_patches, num_tokens, hidden, depth, mlp_depth):
  config = ConnectorConfig(kind="c_abstractor", num_image_tokens=num_tokens, hidden_dim=hidden,
                           depth=depth, mlp_depth=mlp_depth, se_ratio=0.25)
  module = connectors.CAbstractor(config=config, out_dim=OUT)
  x = np.random.default_rng(0).normal(size=(2, num_patches, DV)).astype(np.float32)
  params = _random_params(module, jnp.asarray(x))
  ours = jax.jit(module.apply)({"params": params}, jnp.asarray(x))

  ref_model = TorchCAbstractor(num_patches, DV, hidden, OUT, num_tokens, depth, mlp_depth, 0.25)
  _copy_cabstractor(ref_model, jax.tree.map(np.asarray, params))
  n_ours = sum(p.size for p in jax.tree.leaves(params))
  n_ref = sum(p.numel() for p in ref_model.parameters())
  assert n_ours == n_ref  # Same parameter set: nothing extra, nothing missing.
  with torch.no_grad():
    ref = ref_model(torch.from_numpy(x)).numpy()

  assert ours.shape == (2, num_tokens, OUT) and ours.dtype == jnp.float32
  assert _rel_err(ours, ref) <= 1e-4


def test_cabstractor_se_width_uses_block_input():
  # timm sizes the squeeze-excitation from the block's input width.
  config = _config("c_abstractor", 9, depth=2)
  params = jax.eval_shape(connectors.CAbstractor(config, OUT).init, jax.random.PRNGKey(0),
                          jnp.zeros((1, 36, DV)))["params"]
  params = nn.unbox(params)
  assert params["s1"]["b1"]["se"]["fc1"]["kernel"].shape == (HIDDEN, round(0.25 * DV))
  assert params["s1"]["b2"]["se"]["fc1"]["kernel"].shape == (HIDDEN, round(0.25 * HIDDEN))
  assert params["s1"]["b2"].keys() >= {"conv1", "conv2", "conv3"}
  assert "shortcut_conv" in params["s1"]["b1"] and "shortcut_conv" not in params["s1"]["b2"]
  assert params["s1"]["b1"]["conv2"]["kernel"].shape == (3, 3, 1, HIDDEN)


CONFIGS = {
    "c_abstractor": (_config("c_abstractor", 9, depth=1), 36),
    "avg_pool": (_config("avg_pool", 9), 49),
    "attn_pool": (_config("attn_pool", 5, num_heads=4), 36),
    "mlp": (_config("mlp", 16), 16),
}


@pytest.mark.parametrize("kind", sorted(CONFIGS))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_shapes_dtypes_and_axis_names(kind, dtype):
  config, num_patches = CONFIGS[kind]
  module = connectors.build_connector(config, OUT, dtype=dtype, param_dtype="float32")
  assert isinstance(module, connectors.CONNECTORS[kind])
  x = _normal((2, num_patches, DV))
  out = jax.jit(module.apply)({"params": _random_params(module, x)}, x)
  assert out.shape == (2, config.num_image_tokens, OUT)
  assert out.dtype == jnp.dtype(dtype)
  assert np.isfinite(np.asarray(out, np.float32)).all()

  # Every parameter is annotated, with one known logical name (or None) per
  # dimension and no name twice (Flax rejects that under a mesh).
  known = {name for name, _ in LOGICAL_AXIS_RULES}
  boxed = _abstract(module, x)
  leaves = jax.tree.leaves(boxed, is_leaf=lambda v: isinstance(v, nn.LogicallyPartitioned))
  for leaf in leaves:
    assert isinstance(leaf, nn.LogicallyPartitioned)
    names = [n for n in leaf.names if n is not None]
    assert len(leaf.names) == leaf.value.ndim, leaf.names
    assert set(names) <= known and len(set(names)) == len(names), leaf.names
    assert leaf.value.dtype == jnp.float32


def test_bfloat16_cabstractor_tracks_float32():
  config = _config("c_abstractor", 9, depth=1)
  module32 = connectors.CAbstractor(config, OUT)
  module16 = connectors.CAbstractor(config, OUT, dtype="bfloat16")
  x = _normal((2, 36, DV))
  params = {"params": _random_params(module32, x)}
  out32 = jax.jit(module32.apply)(params, x)
  out16 = jax.jit(module16.apply)(params, x)
  assert out16.dtype == jnp.bfloat16
  assert _rel_err(np.asarray(out16, np.float32), out32) < 5e-2


def test_mlp_connector_matches_numpy():
  config = _config("mlp", 16)
  module = connectors.MlpConnector(config, OUT)
  x = np.random.default_rng(3).normal(size=(2, 16, DV)).astype(np.float32)
  params = _random_params(module, jnp.asarray(x))
  ours = np.asarray(module.apply({"params": params}, jnp.asarray(x)))

  p = jax.tree.map(lambda v: np.asarray(v, np.float64), params["mlp"])
  h = x.astype(np.float64) @ p["fc1"]["kernel"] + p["fc1"]["bias"]
  erf = np.vectorize(math.erf)
  h = 0.5 * h * (1.0 + erf(h / math.sqrt(2.0)))  # Exact (erf) GELU, as LLaVA's nn.GELU().
  ref = h @ p["fc2"]["kernel"] + p["fc2"]["bias"]
  assert ours.shape == (2, 16, OUT)
  np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)


def test_avg_pool_connector_matches_manual():
  config = _config("avg_pool", 9)
  module = connectors.AveragePooling(config, OUT)
  x = np.random.default_rng(4).normal(size=(2, 36, DV)).astype(np.float32)
  params = _random_params(module, jnp.asarray(x))
  ours = np.asarray(module.apply({"params": params}, jnp.asarray(x)))
  # 6 -> 3: plain 2x2 mean pooling, token order row-major.
  pooled = x.reshape(2, 3, 2, 3, 2, DV).mean(axis=(2, 4)).reshape(2, 9, DV)
  ref = pooled @ np.asarray(params["proj"]["kernel"]) + np.asarray(params["proj"]["bias"])
  np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)


def test_attention_pooling_is_permutation_invariant():
  config = _config("attn_pool", 6, num_heads=4)
  module = connectors.AttentionPooling(config, OUT)
  x = _normal((2, 25, DV), seed=5)
  params = _random_params(module, x)
  apply = jax.jit(module.apply)
  out = np.asarray(apply({"params": params}, x))
  perm = np.random.default_rng(0).permutation(25)
  np.testing.assert_allclose(np.asarray(apply({"params": params}, x[:, perm])), out,
                             rtol=1e-5, atol=1e-5)
  # ... while it does depend on the content: changing one patch moves the output
  # (by noise: a constant shift across channels would vanish in the LayerNorm).
  x_changed = x.copy()
  x_changed[:, 3] += _normal((DV,), seed=6)
  changed = np.asarray(apply({"params": params}, x_changed))
  assert np.abs(changed - out).max() > 1e-3
  # Different queries see different mixtures (not M copies of one token).
  assert np.abs(out[:, 0] - out[:, 1]).max() > 1e-3


def test_attention_pooling_matches_torch_multihead_attention():
  heads, num_tokens = 4, 6
  config = _config("attn_pool", num_tokens, num_heads=heads)
  module = connectors.AttentionPooling(config, OUT)
  x = np.random.default_rng(6).normal(size=(2, 25, DV)).astype(np.float32)
  params = jax.tree.map(np.asarray, _random_params(module, jnp.asarray(x)))
  ours = np.asarray(module.apply({"params": params}, jnp.asarray(x)))

  mha = torch.nn.MultiheadAttention(DV, heads, batch_first=True)
  flat = lambda name: _t(params[name]["kernel"].reshape(DV, DV)).T
  mha.in_proj_weight.data = torch.cat([flat("query"), flat("key"), flat("value")])
  mha.in_proj_bias.data = torch.cat([_t(params[n]["bias"].reshape(DV))
                                     for n in ("query", "key", "value")])
  mha.out_proj.weight.data = _t(params["out"]["kernel"].reshape(DV, DV)).T.contiguous()
  mha.out_proj.bias.data = _t(params["out"]["bias"])
  with torch.no_grad():
    kv = F.layer_norm(torch.from_numpy(x), (DV,), _t(params["norm"]["scale"]),
                      _t(params["norm"]["bias"]), eps=1e-5)
    queries = _t(params["queries"])[None].expand(2, -1, -1)
    pooled, _ = mha(queries, kv, kv, need_weights=False)
    ref = pooled @ _t(params["proj"]["kernel"]) + _t(params["proj"]["bias"])
  assert _rel_err(ours, ref.numpy()) <= 1e-4


def test_cabstractor_under_a_mesh():
  # Tracing init inside a mesh applies Flax's logical constraints (which reject
  # malformed names); params sharded from the annotations then run through the
  # activation constraints on 4 of the virtual devices. eval_shape keeps the slow
  # compile of the random initialisers out of the test.
  config = _config("c_abstractor", 4, depth=1)
  module = connectors.CAbstractor(config, OUT)
  x = _normal((4, 16, DV))
  params = _random_params(module, x)
  mesh = make_mesh({"fsdp": 2, "tensor": 2}, devices=jax.devices()[:4])
  with use_mesh(mesh):
    shardings = params_shardings(_abstract(module, x), mesh)["params"]
    params = jax.device_put(params, shardings)
    out = jax.jit(module.apply)({"params": params}, x)
  assert params["s1"]["b1"]["conv1"]["kernel"].sharding.spec == PartitionSpec("fsdp", "tensor")
  assert out.shape == (4, 4, OUT)
  assert np.isfinite(np.asarray(out)).all()


def test_real_initialisers():
  # Only the small avg-pool connector is initialised for real: jitted random
  # initialisers compile slowly on CPU.
  module = connectors.AveragePooling(_config("avg_pool", 4), OUT)
  params = nn.unbox(jax.jit(module.init)(jax.random.PRNGKey(0), jnp.zeros((1, 16, DV))))["params"]
  assert params["proj"]["kernel"].shape == (DV, OUT)
  assert 0.5 / math.sqrt(DV) < float(jnp.std(params["proj"]["kernel"])) < 1.5 / math.sqrt(DV)
  np.testing.assert_array_equal(np.asarray(params["proj"]["bias"]), 0.0)


def test_build_connector_rejects_unknown_kind():
  with pytest.raises(ConfigError, match="kind"):
    connectors.build_connector(ConnectorConfig(kind="perceiver"), OUT)


def test_mlp_connector_rejects_token_mismatch():
  module = connectors.MlpConnector(_config("mlp", 9), OUT)
  with pytest.raises(ValueError, match="num_image_tokens"):
    module.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, DV)))
