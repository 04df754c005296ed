"""Token cross-entropy with optional logit z-loss, plus the model's MoE loss.

All means are over loss weights (the batch's decoder_loss_weights: 0 on
prompts, image placeholders and padding), so a batch's loss is the mean over
the tokens actually trained on, whatever the packing.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from mm1_jax.models.moe import MOE_METRICS


def _weighted_mean(values: jax.Array, weights: jax.Array, total: jax.Array) -> jax.Array:
  """sum(weights * values) / total, for [B, T] values and weights; total is
  sum(weights), replaced by 1 when it is 0.

  jnp.where, not a product alone: a non-finite value on a zero-weight token
  (e.g. padding) must not turn the sum into NaN.
  """
  return jnp.sum(jnp.where(weights > 0, weights * values, 0.0)) / total


def cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array,
                  z_loss_weight: float = 0.0) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Weighted mean token cross-entropy (+ z_loss_weight * mean logsumexp^2).

  logits: [B, T, V] (computed in float32); targets: int [B, T];
  weights: [B, T] (any numeric dtype). Returns (loss scalar, metrics) with
  metrics 'cross_entropy', 'z_loss' (before z_loss_weight), 'accuracy'
  (weighted argmax accuracy) and 'num_tokens' (sum of weights). An all-zero
  weight batch gives loss 0, not NaN.
  """
  logits = logits.astype(jnp.float32)
  weights = weights.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)  # [B, T]
  # One-hot contraction rather than a gather: it stays a local reduction when
  # the vocab axis of the logits is sharded.
  target_logits = jnp.sum(logits * jax.nn.one_hot(targets, logits.shape[-1], dtype=logits.dtype),
                          axis=-1)
  token_loss = log_z - target_logits  # -log_softmax(logits)[target], [B, T]

  num_tokens = jnp.sum(weights)
  total = jnp.where(num_tokens > 0, num_tokens, 1.0)  # Guard an all-padding batch.
  ce = _weighted_mean(token_loss, weights, total)
  z_loss = _weighted_mean(jnp.square(log_z), weights, total)
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  metrics = {"cross_entropy": ce, "z_loss": z_loss,
             "accuracy": _weighted_mean(correct, weights, total), "num_tokens": num_tokens}
  return ce + z_loss_weight * z_loss, metrics


def total_loss(logits: jax.Array, batch: Mapping[str, Any], aux: Mapping[str, jax.Array],
               z_loss_weight: float = 0.0) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Cross-entropy (+ z-loss) + aux['moe_loss'] (already weighted by the model).

  logits: [B, T, V]; batch: decoder_target_tokens int [B, T] and
  decoder_loss_weights [B, T]; aux: MM1Model's second output. Returns
  (loss scalar, metrics) with 'loss', 'moe_loss', the cross_entropy metrics
  and the MoE statistics present in aux.
  """
  loss, metrics = cross_entropy(logits, batch["decoder_target_tokens"],
                                batch["decoder_loss_weights"], z_loss_weight)
  moe_loss = jnp.asarray(aux.get("moe_loss", 0.0), jnp.float32)
  loss = loss + moe_loss
  metrics.update({key: aux[key] for key in MOE_METRICS if key in aux})
  metrics.update(loss=loss, moe_loss=moe_loss)
  return loss, metrics
