"""Sharded forward passes on 8 virtual CPU devices (set up in conftest.py)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs import tiny
from mm1_jax import config_lib, sharding, testing
from mm1_jax.typed_config import ConfigError
from mm1_jax.models.multimodal import MM1Model

MESHES = {
    "data8": dict(data=8),
    "fsdp8": dict(fsdp=8),
    "data2_tensor4": dict(data=2, tensor=4),
    "data2_expert4": dict(data=2, expert=4),
}


def test_eight_devices():
  assert jax.device_count() == 8


@pytest.fixture(scope="module", params=["dense", "moe"])
def reference(request):
  """Unsharded params, batch and logits of a tiny model, on one device."""
  config = config_lib.mm1_config(tiny.get_config(request.param))
  model = MM1Model(config)
  # Seed 4: every token's k-th and (k+1)-th router probabilities differ by
  # >= 1e-4. Seed 3 had a 1e-7 near-tie, which a sharded reduction order
  # flips to another expert: a different (equally right) model output.
  batch = testing.random_multimodal_batch(config, batch_size=8, length=48, seed=4)
  args = (batch["tokens"], batch["images"], batch["image_mask"])
  abstract = jax.eval_shape(model.init, jax.random.key(0), *args)
  params = jax.jit(lambda: nn.unbox(model.init(jax.random.key(0), *args)))()
  margins = []
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(jax.lax, "top_k", _recording_top_k(jax.lax.top_k, margins))
    logits, _ = jax.jit(model.apply)(params, *args)
    jax.effects_barrier()  # The callbacks have all run.
  if request.param == "moe":
    assert min(m.min() for m in margins) > 1e-5, "router near-tie: pick another batch seed"
  return request.param, model, abstract, params, args, np.asarray(logits)


def _recording_top_k(top_k, margins):
  """jax.lax.top_k that records the gap between the k-th and (k+1)-th values."""
  def recording(x, k):
    ordered = jnp.sort(x, axis=-1)
    jax.debug.callback(lambda gap: margins.append(np.asarray(gap)),
                       ordered[..., -k] - ordered[..., -k - 1])
    return top_k(x, k)
  return recording


def _leaf(tree, *path):
  for key in path:
    tree = tree[key]
  return tree


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_sharded_forward_matches_single_device(reference, mesh_name):
  kind, model, abstract, params, args, expected = reference
  mesh = sharding.make_mesh(MESHES[mesh_name])
  shardings = sharding.params_shardings(abstract, mesh)
  batch_shardings = [
      sharding.logical_sharding(("activation_batch",) + (None,) * (np.ndim(a) - 1), np.shape(a), mesh)
      for a in args]
  with sharding.use_mesh(mesh):
    sharded_params = jax.device_put(params, shardings)
    sharded_args = [jax.device_put(a, s) for a, s in zip(args, batch_shardings)]
    logits, _ = jax.jit(model.apply)(sharded_params, *sharded_args)
    if mesh_name in ("fsdp8", "data2_expert4"):  # Each init compile costs ~8 s on CI.
      # Creating the params directly with their shardings gives the same values.
      initialised = jax.jit(lambda: nn.unbox(model.init(jax.random.key(0), *args)),
                            out_shardings=shardings)()
      jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6),
                   initialised, params)
      assert initialised["params"]["llm"]["embedder"]["embedding"].sharding == (
          shardings["params"]["llm"]["embedder"]["embedding"])
  np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-5, rtol=1e-5)

  # The parameters are really split the way the rules say.
  llm = sharded_params["params"]["llm"]
  query = _leaf(llm, "blocks", "layer_0", "attn", "query", "kernel")  # [layers, embed, heads, hd]
  embedding = _leaf(llm, "embedder", "embedding")  # [vocab, embed]
  spec = lambda a: a.sharding.spec
  if mesh_name == "data8":
    assert all(s is None for s in spec(query)) and all(s is None for s in spec(embedding))
    assert sharded_args[0].sharding.spec == P("data", None)
  elif mesh_name == "fsdp8":
    assert spec(query) == P(None, "fsdp", None, None)
    assert spec(embedding) == P(None, "fsdp")
    assert query.addressable_shards[0].data.shape[1] == query.shape[1] // 8
  elif mesh_name == "data2_tensor4":
    assert spec(query) == P(None, None, "tensor", None)
    assert spec(embedding) == P("tensor", None)
    assert query.addressable_shards[0].data.shape[2] == query.shape[2] // 4
  elif mesh_name == "data2_expert4":
    assert sharded_args[0].sharding.spec == P(("data", "expert"), None)
    if kind == "moe":
      gate = _leaf(llm, "blocks", "layer_1", "moe", "gate")  # [layers, experts, embed, mlp]
      assert spec(gate) == P(None, "expert", None, None)
      assert gate.addressable_shards[0].data.shape[1] == gate.shape[1] // 4


def test_indivisible_dims_stay_replicated():
  mesh = sharding.make_mesh(dict(data=2, tensor=4))
  # 6 kv heads cannot split 4 ways: replicated rather than an error.
  assert sharding.logical_to_spec(("embed", "kv_heads", "head_dim"), (64, 6, 16), mesh) == P(None, None, None)
  assert sharding.logical_to_spec(("embed", "kv_heads", "head_dim"), (64, 8, 16), mesh) == P(None, "tensor", None)


@pytest.mark.parametrize("sizes, message", [
    (dict(data=3), r"multiply to 3 but there are 8 devices"),
    (dict(data=-1, fsdp=3), r"multiply to 3, which does not divide the 8 devices"),
    (dict(data=-1, fsdp=-1), r"only one axis may be -1"),
    (dict(pipeline=2), r"unknown axis \['pipeline'\]"),
])
def test_bad_mesh_sizes_are_named(sizes, message):
  with pytest.raises(ConfigError, match=message):
    sharding.make_mesh(sizes)


def test_minus_one_takes_the_rest():
  mesh = sharding.make_mesh(dict(data=-1, tensor=2))
  assert dict(mesh.shape) == dict(data=4, fsdp=1, tensor=2, expert=1)
