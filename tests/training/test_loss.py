"""Loss: cross-entropy against optax and a NumPy log-softmax, zero-weight
tokens, z-loss, accuracy, the MoE loss added by total_loss."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mm1_jax.training import loss as loss_lib

B, T, V = 2, 5, 11


def _inputs(seed=0, scale=3.0):
  rng = np.random.default_rng(seed)
  logits = (scale * rng.normal(size=(B, T, V))).astype(np.float32)
  targets = rng.integers(0, V, (B, T)).astype(np.int32)
  weights = np.array([[0, 1, 1, 1, 0], [1, 1, 0, 2, 1]], np.int32)
  return logits, targets, weights


def _numpy_log_softmax(logits):
  x = logits.astype(np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_cross_entropy_matches_optax_and_numpy():
  logits, targets, weights = _inputs()
  loss, metrics = loss_lib.cross_entropy(jnp.asarray(logits), targets, weights)
  per_token = np.asarray(optax.softmax_cross_entropy_with_integer_labels(logits, targets))
  expected = (per_token * weights).sum() / weights.sum()
  np.testing.assert_allclose(float(loss), expected, rtol=1e-6)
  nll = -np.take_along_axis(_numpy_log_softmax(logits), targets[..., None], -1)[..., 0]
  np.testing.assert_allclose(float(metrics["cross_entropy"]), (nll * weights).sum() / weights.sum(),
                             rtol=1e-6)
  assert float(metrics["num_tokens"]) == weights.sum()
  correct = logits.argmax(-1) == targets
  np.testing.assert_allclose(float(metrics["accuracy"]), (correct * weights).sum() / weights.sum(),
                             rtol=1e-6)


def test_zero_weight_tokens_do_not_affect_the_loss():
  logits, targets, weights = _inputs()
  loss, _ = loss_lib.cross_entropy(logits, targets, weights)
  changed_logits, changed_targets = logits.copy(), targets.copy()
  changed_logits[weights == 0] = 1e4 * np.random.default_rng(1).normal(size=(3, V))
  changed_logits[0, 0, 0] = np.inf  # Even a non-finite padding logit.
  changed_targets[weights == 0] = 0
  changed, metrics = loss_lib.cross_entropy(changed_logits, changed_targets, weights,
                                            z_loss_weight=1e-3)
  _, base = loss_lib.cross_entropy(logits, targets, weights, z_loss_weight=1e-3)
  np.testing.assert_allclose(float(metrics["cross_entropy"]), float(loss), rtol=1e-6)
  np.testing.assert_allclose(float(metrics["z_loss"]), float(base["z_loss"]), rtol=1e-6)
  np.testing.assert_allclose(float(changed), float(base["cross_entropy"] + 1e-3 * base["z_loss"]),
                             rtol=1e-6)


def test_all_zero_weights_give_zero_loss_not_nan():
  logits, targets, _ = _inputs()
  loss, metrics = loss_lib.cross_entropy(logits, targets, np.zeros((B, T)), z_loss_weight=1e-4)
  assert float(loss) == 0.0 and float(metrics["num_tokens"]) == 0.0
  assert float(metrics["accuracy"]) == 0.0


def test_z_loss_matches_numpy():
  logits, targets, weights = _inputs(scale=20.0)
  loss, metrics = loss_lib.cross_entropy(logits, targets, weights, z_loss_weight=1e-3)
  x = logits.astype(np.float64)
  log_z = np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1)) + x.max(-1)
  z = (log_z**2 * weights).sum() / weights.sum()
  np.testing.assert_allclose(float(metrics["z_loss"]), z, rtol=1e-5)
  np.testing.assert_allclose(float(loss), float(metrics["cross_entropy"]) + 1e-3 * z, rtol=1e-6)


def test_large_logits_stay_finite():
  logits, targets, weights = _inputs()
  loss, _ = loss_lib.cross_entropy(logits + 1e4, targets, weights, z_loss_weight=1e-4)
  base, _ = loss_lib.cross_entropy(logits, targets, weights)
  assert np.isfinite(float(loss))
  # A shift of every logit leaves the cross-entropy unchanged (float32 rounding at 1e4).
  _, shifted = loss_lib.cross_entropy(logits + 1e4, targets, weights)
  np.testing.assert_allclose(float(shifted["cross_entropy"]), float(base), atol=2e-3)


def test_total_loss_adds_moe_loss_and_reports_aux():
  logits, targets, weights = _inputs()
  batch = {"decoder_target_tokens": targets, "decoder_loss_weights": weights}
  aux = {"balance_loss": jnp.float32(1.5), "router_z_loss": jnp.float32(2.0),
         "dropped_fraction": jnp.float32(0.25), "moe_loss": jnp.float32(0.017)}
  loss, metrics = loss_lib.total_loss(jnp.asarray(logits), batch, aux, z_loss_weight=1e-4)
  ce, ce_metrics = loss_lib.cross_entropy(logits, targets, weights, z_loss_weight=1e-4)
  assert float(loss) == pytest.approx(float(ce) + 0.017, rel=1e-6)
  assert float(metrics["loss"]) == pytest.approx(float(loss))
  for key in ("balance_loss", "router_z_loss", "dropped_fraction", "moe_loss"):
    assert float(metrics[key]) == pytest.approx(float(aux[key]))
  for key in ("cross_entropy", "z_loss", "accuracy", "num_tokens"):
    assert float(metrics[key]) == pytest.approx(float(ce_metrics[key]))
