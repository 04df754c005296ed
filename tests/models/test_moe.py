"""MoeFeedForward: both dispatch paths against each other, a dense MLP,
Hugging Face's MixtralSparseMoeBlock, and NumPy counts of the GShard priority
and of the auxiliary losses. Tiny float32 sizes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mm1_jax.models.config import DecoderConfig, MoeConfig
from mm1_jax.models.layers import GatedMlp
from mm1_jax.models.moe import MoeFeedForward, capacity
from mm1_jax.sharding import LOGICAL_AXIS_RULES, make_mesh, use_mesh

D, F, B, T = 16, 32, 2, 12
DISPATCHES = ("capacity", "dropless")


def make_config(dispatch, num_experts=8, top_k=2, capacity_factor=None):
  # Default capacity factor E / k gives C = T: nothing can drop.
  capacity_factor = num_experts / top_k if capacity_factor is None else capacity_factor
  return DecoderConfig(width=D, mlp_dim=F, moe=MoeConfig(
      num_experts=num_experts, num_experts_per_token=top_k, dispatch=dispatch,
      capacity_factor=capacity_factor))


def random_params(config, seed):
  """Random float32 params with the module's own tree and shapes.

  Shapes come from eval_shape (no compile); values from NumPy, which is far
  cheaper on a shared CPU than compiling the initialisers.
  """
  rng = np.random.default_rng(seed)
  x = jax.ShapeDtypeStruct((B, T, D), jnp.float32)
  shapes = nn.unbox(jax.eval_shape(MoeFeedForward(config).init, jax.random.key(0), x))["params"]
  # Router scaled up so that routing decisions are far from ties.
  return jax.tree.map(
      lambda a: jnp.asarray(rng.standard_normal(a.shape) / np.sqrt(a.shape[-2])
                            * (3.0 if a.shape == (D, config.moe.num_experts) else 1.0),
                            jnp.float32), shapes)


_APPLY_CACHE = {}


def apply(config, params, x, mask=None):
  """Jitted MoeFeedForward(config).apply, compiled once per config."""
  if config not in _APPLY_CACHE:
    model = MoeFeedForward(config)
    _APPLY_CACHE[config] = jax.jit(lambda p, x, m: model.apply({"params": p}, x, m))
  if mask is None:
    mask = jnp.ones(x.shape[:2], bool)
  return _APPLY_CACHE[config](params, x, mask)


def random_x(seed, batch=B, length=T):
  return jnp.asarray(np.random.default_rng(seed).standard_normal((batch, length, D)), jnp.float32)


def padding_mask():
  mask = np.ones((B, T), dtype=bool)
  mask[0, :3] = False  # Leading padding: would steal slots if it counted.
  mask[1, -4:] = False
  return jnp.asarray(mask)


def silu(v):
  return v / (1.0 + np.exp(-v))


def numpy_routing(params, x, top_k):
  """float64 logits, probs, top-k experts (descending) and renormalised weights."""
  logits = np.asarray(x, np.float64) @ np.asarray(params["router"]["kernel"], np.float64)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  experts = np.argsort(-probs, axis=-1, kind="stable")[..., :top_k]
  weights = np.take_along_axis(probs, experts, -1)
  return logits, probs, experts, weights / weights.sum(-1, keepdims=True)


def numpy_expert(params, e, v):
  g, u, d = (np.asarray(params[n][e], np.float64) for n in ("gate", "up", "down"))
  return (silu(v @ g) * (v @ u)) @ d


def relative_error(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.max(np.abs(a - b)) / np.max(np.abs(b))


def test_param_shapes_and_logical_axes():
  config = make_config("dropless")
  x = jax.ShapeDtypeStruct((B, T, D), jnp.float32)
  boxed = jax.eval_shape(MoeFeedForward(config).init, jax.random.key(0), x)["params"]
  names = {k: v.names for k, v in boxed.items() if k != "router"}
  shapes = {k: v.value.shape for k, v in boxed.items() if k != "router"}
  assert names == {"gate": ("expert", "embed", "mlp"), "up": ("expert", "embed", "mlp"),
                   "down": ("expert", "mlp", "embed")}
  assert shapes == {"gate": (8, D, F), "up": (8, D, F), "down": (8, F, D)}
  assert boxed["router"]["kernel"].value.shape == (D, 8)
  rules = dict(LOGICAL_AXIS_RULES)
  assert all(n in rules for n in boxed["router"]["kernel"].names)


@pytest.mark.parametrize("dispatch", DISPATCHES)
def test_identical_experts_equal_dense_mlp(dispatch):
  config = make_config(dispatch)
  x = random_x(1)
  params = random_params(config, seed=2)
  mlp = GatedMlp(mlp_dim=F)
  # A GatedMlp's params copied into every expert (taken from expert 0).
  mlp_params = {n: {"kernel": params[n][0]} for n in ("gate", "up", "down")}
  for name in ("gate", "up", "down"):
    params[name] = jnp.broadcast_to(mlp_params[name]["kernel"], params[name].shape)
  y, aux = apply(config, params, x)
  expected = jax.jit(mlp.apply)({"params": mlp_params}, x)
  np.testing.assert_allclose(y, expected, atol=1e-5, rtol=1e-5)
  assert float(aux["dropped_fraction"]) == 0.0


@pytest.mark.parametrize("masked", [False, True])
def test_capacity_without_drops_equals_dropless(masked):
  x = random_x(3)
  mask = padding_mask() if masked else None
  params = random_params(make_config("capacity"), seed=4)
  y_cap, aux_cap = apply(make_config("capacity"), params, x, mask)
  y_drop, aux_drop = apply(make_config("dropless"), params, x, mask)
  np.testing.assert_allclose(y_cap, y_drop, atol=1e-5, rtol=1e-5)
  assert float(aux_cap["dropped_fraction"]) == 0.0 == float(aux_drop["dropped_fraction"])
  for key in ("balance_loss", "router_z_loss"):
    np.testing.assert_allclose(aux_cap[key], aux_drop[key], rtol=1e-6)
  if masked:  # Padding gets output 0 on both paths.
    assert np.all(np.asarray(y_cap)[~np.asarray(mask)] == 0)
    assert np.all(np.asarray(y_drop)[~np.asarray(mask)] == 0)


@pytest.mark.parametrize("dispatch", DISPATCHES)
def test_matches_hf_mixtral_sparse_moe_block(dispatch):
  torch = pytest.importorskip("torch")
  from transformers import MixtralConfig
  from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

  config = make_config(dispatch)
  x = random_x(5)
  params = random_params(config, seed=6)
  y, _ = apply(config, params, x)

  hf_config = MixtralConfig(hidden_size=D, intermediate_size=F,
                            num_local_experts=config.moe.num_experts,
                            num_experts_per_tok=config.moe.num_experts_per_token,
                            router_jitter_noise=0.0)
  block = MixtralSparseMoeBlock(hf_config).eval().double()
  as_torch = lambda a: torch.from_numpy(np.asarray(a, np.float64))
  with torch.no_grad():
    # HF keeps torch Linear layout [out, in]: router [E, D]; the experts are
    # fused 3D tensors, gate_up_proj [E, 2F, D] (gate rows first, then up:
    # it is chunked in that order) and down_proj [E, D, F].
    block.gate.weight.copy_(as_torch(params["router"]["kernel"]).T)
    gate_up = np.concatenate([params["gate"], params["up"]], axis=-1)  # [E, D, 2F]
    block.experts.gate_up_proj.copy_(as_torch(gate_up).transpose(1, 2))
    block.experts.down_proj.copy_(as_torch(params["down"]).transpose(1, 2))
    expected = block(as_torch(x)).numpy()
  assert relative_error(y, expected) <= 1e-4


def test_capacity_drops_follow_gshard_priority():
  config = make_config("capacity", capacity_factor=0.5)
  num_experts, top_k = config.moe.num_experts, config.moe.num_experts_per_token
  slots = capacity(config, T)
  assert slots == 2  # ceil(2 * 12 * 0.5 / 8).
  x = random_x(7)
  mask = padding_mask()
  params = random_params(config, seed=8)
  y, aux = apply(config, params, x, mask)

  # NumPy: every real token's 1st choice, in order, before any 2nd choice;
  # an expert that is full drops the assignment; padding takes no slot.
  _, _, experts, weights = numpy_routing(params, x, top_k)
  xs, m = np.asarray(x, np.float64), np.asarray(mask)
  expected = np.zeros((B, T, D))
  total = dropped = 0
  for b in range(B):
    used = np.zeros(num_experts, int)
    for j in range(top_k):
      for t in range(T):
        if not m[b, t]:
          continue
        e = experts[b, t, j]
        total += 1
        if used[e] < slots:
          used[e] += 1
          expected[b, t] += weights[b, t, j] * numpy_expert(params, e, xs[b, t])
        else:
          dropped += 1
  assert 0 < dropped < total
  np.testing.assert_allclose(aux["dropped_fraction"], dropped / total, rtol=1e-6)
  # Kept assignments only (dropped ones add nothing); padding rows are 0.
  np.testing.assert_allclose(y, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dispatch", DISPATCHES)
def test_losses_match_numpy_and_ignore_padding(dispatch):
  config = make_config(dispatch)
  num_experts, top_k = config.moe.num_experts, config.moe.num_experts_per_token
  x = random_x(9)
  mask = padding_mask()
  params = random_params(config, seed=10)
  _, aux = apply(config, params, x, mask)

  logits, probs, experts, _ = numpy_routing(params, x, top_k)
  m = np.asarray(mask)
  counts = np.bincount(experts[m].ravel(), minlength=num_experts)
  f = counts / (m.sum() * top_k)
  p = probs[m].mean(0)
  balance = num_experts * np.sum(f * p)
  lse = np.log(np.exp(logits).sum(-1))
  z_loss = np.mean(lse[m] ** 2)
  np.testing.assert_allclose(aux["balance_loss"], balance, rtol=1e-5)
  np.testing.assert_allclose(aux["router_z_loss"], z_loss, rtol=1e-5)
  for value in aux.values():
    assert value.shape == () and value.dtype == jnp.float32

  # Padding content changes neither the losses nor real tokens' outputs.
  x_noise = jnp.where(mask[..., None], x, 100.0 * random_x(11))
  y1, aux1 = apply(config, params, x, mask)
  y2, aux2 = apply(config, params, x_noise, mask)
  for key in aux1:
    np.testing.assert_allclose(aux1[key], aux2[key], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(y1)[m], np.asarray(y2)[m], atol=1e-6)


@pytest.mark.parametrize("dispatch", DISPATCHES)
def test_gradients_finite_and_nonzero(dispatch):
  # Capacity with drops (factor 0.5) to cover the dropping path too.
  config = make_config(dispatch, capacity_factor=0.5 if dispatch == "capacity" else None)
  model = MoeFeedForward(config)
  x, target, mask = random_x(12), random_x(13), padding_mask()
  params = random_params(config, seed=14)

  def loss_fn(p):
    y, aux = model.apply({"params": p}, x, mask)
    return jnp.sum(y * target) + 0.01 * aux["balance_loss"] + 0.001 * aux["router_z_loss"]

  grads = jax.jit(jax.grad(loss_fn))(params)
  for name, g in (("router", grads["router"]["kernel"]), ("gate", grads["gate"]),
                  ("up", grads["up"]), ("down", grads["down"])):
    g = np.asarray(g)
    assert np.all(np.isfinite(g)), name
    assert np.any(g != 0), name


@pytest.mark.parametrize("dispatch", DISPATCHES)
def test_sharded_jit_matches_unsharded(dispatch):
  # Experts over a 4-way expert axis, batch over data: the constraints and
  # param annotations must resolve, and sharding must not change the numbers.
  config = make_config(dispatch)
  model = MoeFeedForward(config)
  x, mask = random_x(15), padding_mask()
  params = random_params(config, seed=16)
  expected, _ = apply(config, params, x, mask)
  with use_mesh(make_mesh({"data": 2, "expert": 4})):
    y, aux = jax.jit(lambda p, x, m: model.apply({"params": p}, x, m))(params, x, mask)
  np.testing.assert_allclose(y, expected, atol=1e-5, rtol=1e-5)
  assert np.isfinite(float(aux["balance_loss"]))
