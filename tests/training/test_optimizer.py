"""Optimizer: schedule values by hand, MM1's lr law, the weight-decay mask on
the tiny model's real tree, one AdamW step by hand, frozen parts without
state, config validation."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import mm1_3b, mm1_7b, mm1_30b, tiny
from mm1_jax import config_lib
from mm1_jax.models import accounting
from mm1_jax.typed_config import ConfigError
from mm1_jax.training import optimizer as opt


def test_schedule_matches_hand_formulas_at_key_steps():
  config = opt.OptimizerConfig(learning_rate=1e-3, warmup_steps=100, end_lr_fraction=0.1)
  schedule = opt.learning_rate_schedule(config, num_steps=1100)
  peak, end = 1e-3, 1e-4
  cosine = lambda step: end + (peak - end) * 0.5 * (1 + math.cos(math.pi * (step - 100) / 1000))
  expected = {0: 0.0, 50: peak / 2, 100: peak, 600: (peak + end) / 2, 850: cosine(850),
              1100: end, 5000: end}
  for step, lr in expected.items():
    np.testing.assert_allclose(float(schedule(step)), lr, rtol=1e-5, atol=1e-12, err_msg=step)


def test_schedule_decay_steps_overrides_num_steps_and_jits():
  config = opt.OptimizerConfig(learning_rate=2.0, warmup_steps=0, decay_steps=10,
                               end_lr_fraction=0.0)
  schedule = jax.jit(opt.learning_rate_schedule(config, num_steps=1000))
  np.testing.assert_allclose(float(schedule(jnp.int32(0))), 2.0)
  np.testing.assert_allclose(float(schedule(jnp.int32(5))), 1.0, rtol=1e-6)
  np.testing.assert_allclose(float(schedule(jnp.int32(10))), 0.0, atol=1e-7)
  np.testing.assert_allclose(float(schedule(jnp.int32(500))), 0.0, atol=1e-7)


def test_lr_law_formula_and_schedule_peak():
  for n in (1e6, 3e8, 1.2e9):
    assert opt.mm1_lr_law(int(n)) == pytest.approx(math.exp(-0.4214 * math.log(n) - 0.5535))
  config = opt.OptimizerConfig(lr_law=True, warmup_steps=10)
  schedule = opt.learning_rate_schedule(config, 100, num_non_embedding_params=10**9)
  assert float(schedule(10)) == pytest.approx(opt.mm1_lr_law(10**9), rel=1e-6)
  with pytest.raises(ConfigError, match="optimizer.lr_law"):
    opt.learning_rate_schedule(config, 100)


@pytest.mark.parametrize("module, paper_lr", [(mm1_3b, 6e-5), (mm1_7b, 4e-5), (mm1_30b, 2e-5)])
def test_lr_law_gives_the_papers_rates(module, paper_lr):
  counts = accounting.count_params(config_lib.mm1_config(module.get_config()))
  assert opt.mm1_lr_law(counts.non_embedding_llm) == pytest.approx(paper_lr, rel=0.25)


@pytest.fixture(scope="module")
def tiny_params():
  return accounting.abstract_params(config_lib.mm1_config(tiny.get_config()))


def _mask_by_path(params, **kw):
  flat = jax.tree_util.tree_flatten_with_path(opt.weight_decay_mask(params, **kw))[0]
  return {jax.tree_util.keystr(path): value for path, value in flat}


def test_weight_decay_mask_on_the_tiny_models_tree(tiny_params):
  mask = _mask_by_path(tiny_params)
  assert len(mask) == len(jax.tree.leaves(tiny_params))
  no_decay = [
      "['llm']['embedder']['embedding']", "['llm']['final_norm']['scale']",
      "['llm']['blocks']['layer_0']['attn_norm']['scale']",
      "['llm']['blocks']['layer_1']['mlp_norm']['scale']",
      "['encoder']['blocks']['norm1']['bias']", "['encoder']['blocks']['norm1']['scale']",
      "['encoder']['blocks']['attn']['query']['bias']", "['encoder']['pre_norm']['scale']",
      "['encoder']['pos_embed']", "['encoder']['class_token']", "['connector']['pos_embed']",
      "['connector']['readout_0']['bias']", "['connector']['s1']['b1']['norm1']['scale']"]
  decay = [
      "['llm']['lm_head']['kernel']", "['llm']['blocks']['layer_0']['attn']['query']['kernel']",
      "['llm']['blocks']['layer_0']['attn']['out']['kernel']",
      "['llm']['blocks']['layer_0']['mlp']['gate']['kernel']",
      "['llm']['blocks']['layer_1']['moe']['gate']", "['llm']['blocks']['layer_1']['moe']['up']",
      "['llm']['blocks']['layer_1']['moe']['down']",
      "['llm']['blocks']['layer_1']['moe']['router']['kernel']",
      "['encoder']['blocks']['mlp']['fc1']['kernel']", "['encoder']['patch_embed']['kernel']",
      "['connector']['readout_1']['kernel']", "['connector']['s1']['b1']['conv2']['kernel']"]
  assert [p for p in no_decay if mask[p]] == []
  assert [p for p in decay if not mask[p]] == []
  # Everything not named 'kernel' or an expert tensor is excluded.
  for path, value in mask.items():
    expert = "['moe']" in path and path.endswith(("['gate']", "['up']", "['down']"))
    assert value == (path.endswith("['kernel']") or expert), path
  flipped = _mask_by_path(tiny_params, decay_embeddings=True)
  assert flipped["['llm']['embedder']['embedding']"]
  assert {p for p in mask if mask[p] != flipped[p]} == {"['llm']['embedder']['embedding']"}


def test_weight_decay_mask_on_layer_scale_and_attention_pool_queries():
  assert not opt.decays(["encoder", "blocks", "ls1"])
  assert not opt.decays(["encoder", "blocks", "ls2"])
  assert not opt.decays(["connector", "queries"])
  assert not opt.decays(["connector", "norm", "bias"])
  assert opt.decays(["connector", "query", "kernel"])


def _tiny_tree(seed=0):
  """A small params tree with the model's naming (embedding, norm, bias, kernels)."""
  rng = np.random.default_rng(seed)
  r = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  return {"encoder": {"fc": {"kernel": r(3, 4), "bias": r(4)}, "norm": {"scale": r(4)}},
          "connector": {"proj": {"kernel": r(4, 5)}},
          "llm": {"embedder": {"embedding": r(6, 5)}, "lm_head": {"kernel": r(5, 6)},
                  "final_norm": {"scale": r(5)}}}


def _hand_adamw(params, grads_list, lrs, b1, b2, eps, wd, clip, mask):
  """NumPy AdamW (+ global-norm clipping, decay mask), float64."""
  p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
  mu = jax.tree.map(np.zeros_like, p)
  nu = jax.tree.map(np.zeros_like, p)
  for t, (grads, lr) in enumerate(zip(grads_list, lrs), start=1):
    g = jax.tree.map(lambda x: np.asarray(x, np.float64), grads)
    norm = math.sqrt(sum(float(np.sum(x**2)) for x in jax.tree.leaves(g)))
    if clip and norm > clip:
      g = jax.tree.map(lambda x: x * clip / norm, g)
    mu = jax.tree.map(lambda m, x: b1 * m + (1 - b1) * x, mu, g)
    nu = jax.tree.map(lambda v, x: b2 * v + (1 - b2) * x**2, nu, g)
    def step(x, m, v, decay):
      update = (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
      return x - lr * (update + (wd * x if decay else 0.0))
    p = jax.tree.map(step, p, mu, nu, mask)
  return p


@pytest.mark.parametrize("clip", [0.0, 0.5])
def test_adamw_steps_match_hand_written_update(clip):
  params = _tiny_tree()
  grads_list = [jax.tree.map(lambda x, s=s: x * 0.3 + s, _tiny_tree(seed=s + 1))
                for s in range(3)]
  config = opt.OptimizerConfig(learning_rate=1e-2, warmup_steps=2, decay_steps=5,
                               weight_decay=0.3, grad_clip_norm=clip)
  tx, schedule = opt.make_optimizer(config, params, num_steps=100)
  state = tx.init(params)
  new = params
  for grads in grads_list:
    updates, state = tx.update(grads, state, new)
    new = jax.tree.map(lambda p, u: p + u, new, updates)
  lrs = [float(schedule(step)) for step in range(3)]
  assert lrs[0] == 0.0 and lrs[1] == pytest.approx(5e-3)
  expected = _hand_adamw(params, grads_list, lrs, 0.9, 0.95, 1e-8, 0.3, clip,
                         opt.weight_decay_mask(params))
  for got, want in zip(jax.tree.leaves(new), jax.tree.leaves(expected)):
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-6, rtol=0)


def test_frozen_encoder_is_unchanged_and_has_no_optimizer_state():
  params = _tiny_tree()
  config = opt.OptimizerConfig(learning_rate=1e-2, warmup_steps=0, freeze=("encoder",))
  tx, _ = opt.make_optimizer(config, params, num_steps=10)
  state = tx.init(params)
  new = params
  for seed in range(3):
    updates, state = jax.jit(tx.update)(_tiny_tree(seed + 7), state, new)
    new = jax.tree.map(lambda p, u: p + u, new, updates)
  for got, want in zip(jax.tree.leaves(new["encoder"]), jax.tree.leaves(params["encoder"])):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  assert not np.allclose(new["llm"]["lm_head"]["kernel"], params["llm"]["lm_head"]["kernel"])
  size = lambda tree: sum(x.size for x in jax.tree.leaves(tree))
  trained = size(params["connector"]) + size(params["llm"])
  state_arrays = [x for x in jax.tree.leaves(state) if x.ndim > 0]
  # Two Adam moments for the trained params only; scalars are step counts.
  assert sum(x.size for x in state_arrays) == 2 * trained
  assert sum(x.size for x in jax.tree.leaves(state) if x.ndim == 0) <= 2
  frozen_state = state.inner_states[opt.FROZEN]
  assert jax.tree.leaves(frozen_state) == []


def test_partition_labels_by_top_level_part():
  labels = opt.partition_labels(_tiny_tree(), ("encoder", "llm"))
  assert set(jax.tree.leaves(labels["encoder"])) == {"frozen"}
  assert set(jax.tree.leaves(labels["llm"])) == {"frozen"}
  assert set(jax.tree.leaves(labels["connector"])) == {"train"}


@pytest.mark.parametrize("values, field", [
    (dict(learning_rate=0.0), "optimizer.learning_rate"),
    (dict(warmup_steps=-1), "optimizer.warmup_steps"),
    (dict(decay_steps=10, warmup_steps=20), "optimizer.decay_steps"),
    (dict(end_lr_fraction=1.5), "optimizer.end_lr_fraction"),
    (dict(b2=1.0), "optimizer.b2"),
    (dict(eps=0.0), "optimizer.eps"),
    (dict(weight_decay=-0.1), "optimizer.weight_decay"),
    (dict(grad_clip_norm=-1.0), "optimizer.grad_clip_norm"),
    (dict(freeze=("vision",)), "optimizer.freeze"),
    (dict(freeze=("encoder", "connector", "llm")), "optimizer.freeze"),
    (dict(grad_accum_steps=0), "optimizer.grad_accum_steps"),
    (dict(lerning_rate=1e-3), "optimizer.lerning_rate"),
])
def test_bad_config_fields_raise_naming_them(values, field):
  with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
    opt.OptimizerConfig.from_dict(values)


def test_from_dict_accepts_config_dict_and_freeze_string():
  config = opt.OptimizerConfig.from_dict(
      config_lib.ml_collections.ConfigDict(dict(freeze="encoder, connector", lr_law=True)))
  assert config.freeze == ("encoder", "connector") and config.lr_law
  assert opt.OptimizerConfig.from_dict(dict(freeze=["llm"])).freeze == ("llm",)
  with pytest.raises(ConfigError, match="optimizer.warmup_steps"):
    opt.learning_rate_schedule(opt.OptimizerConfig(warmup_steps=2000), num_steps=100)


def test_state_of_the_real_tiny_tree_skips_frozen_parts(tiny_params):
  size = lambda tree: sum(math.prod(x.shape) for x in jax.tree.leaves(tree))
  for freeze in ((), ("encoder",), ("encoder", "llm")):
    config = opt.OptimizerConfig(freeze=freeze, warmup_steps=10)
    tx, _ = opt.make_optimizer(config, tiny_params, num_steps=100)
    state = jax.eval_shape(tx.init, tiny_params)  # Shapes only, nothing allocated.
    trained = sum(size(tiny_params[part]) for part in opt.PARTS if part not in freeze)
    assert sum(size(x) for x in jax.tree.leaves(state) if x.shape) == 2 * trained, freeze
