"""AdamW with MM1's learning-rate law, warmup + cosine schedule, weight-decay
mask and frozen parts.

MM1 (arXiv 2403.09611) fits the peak learning rate on 9M..1.2B models:

    eta = exp(-0.4214 * ln(N) - 0.5535),  N = non-embedding LLM parameters

(~6e-5 for 3B, 4e-5 for 7B, 2e-5 for 30B), with weight decay 0.1 * eta, 2000
warmup steps and a cosine decay to 10% of the peak.

Weight decay convention: optax.adamw applies `p -= lr(t) * weight_decay * p`,
i.e. it multiplies the coefficient by the *current* learning rate. MM1's
"weight decay = 0.1 * eta" is therefore `weight_decay=0.1` here, whatever the
peak learning rate (and it follows the schedule, as in the paper's decoupled
AdamW). Do not put 0.1 * eta into `weight_decay`: that would decay by
0.1 * eta^2.

Parameter trees are the *unboxed* ones (`nn.unbox(variables)['params']`).

Frozen parameters get no optimizer state (set_to_zero). Which leaves train:
the parts not in `freeze`, except that a part holding LoRA adapters
(mm1_jax/models/lora.py) trains only its adapters (its base is frozen, as
LoRA means), and adapters train wherever they are. The connector may have
its own peak learning rate (LLaVA's LoRA recipe: 2e-4, the projector 2e-5).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax

from mm1_jax.models.lora import is_adapter
from mm1_jax.typed_config import ConfigError, dataclass_from_dict, to_plain_dict

# Top-level parts of MM1Model's params that `freeze` may name.
PARTS = ("encoder", "connector", "llm")
TRAIN, FROZEN = "train", "frozen"

# Leaf names that never decay: norm scales, biases, ViT layer-scale, learned
# position embeddings / class tokens, attention-pool queries. Decaying these
# pulls them towards 0, which is not a "simpler" model (a norm scale of 0
# kills its layer), so the usual practice (GPT-3, PaLM, big_vision) skips them.
_NO_DECAY_LEAVES = frozenset({"scale", "bias", "ls1", "ls2", "pos_embed", "class_token",
                              "queries"})
# Names that mark the token embedding table (the untied lm_head is a plain
# matrix and decays).
_EMBEDDING_NAMES = frozenset({"embedder", "embedding"})


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """AdamW + schedule. Defaults are MM1's pre-training recipe."""
  learning_rate: float = 1e-4  # Peak; ignored when lr_law is True.
  # Peak lr from MM1's law of the non-embedding LLM parameter count.
  lr_law: bool = False
  warmup_steps: int = 2000  # Linear from 0 to the peak.
  decay_steps: int | None = None  # Cosine ends here; None = the run's num_steps.
  end_lr_fraction: float = 0.1  # Cosine to this fraction of the peak, then constant.
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  # optax convention (multiplied by the current lr): 0.1 gives MM1's 0.1 * eta.
  weight_decay: float = 0.1
  decay_embeddings: bool = False  # Also decay the token embedding table.
  grad_clip_norm: float = 1.0  # Global-norm clipping; 0 = off.
  # Top-level parts whose params get no update and no optimizer state (LoRA
  # adapters in them still train; a part with adapters has its base frozen).
  freeze: tuple[str, ...] = ()
  # Peak learning rate of the connector, on the same schedule; None: learning_rate.
  connector_learning_rate: float | None = None
  # Micro-batches per optimizer step (the train step accumulates gradients).
  grad_accum_steps: int = 1

  def __post_init__(self):
    # ConfigDicts hand over lists; "encoder,connector" is accepted from flags.
    freeze = self.freeze
    if isinstance(freeze, str):
      freeze = [part.strip() for part in freeze.split(",") if part.strip()]
    object.__setattr__(self, "freeze", tuple(freeze))
    validate(self)

  @classmethod
  def from_dict(cls, values: Mapping[str, Any]) -> "OptimizerConfig":
    """From a dict or ConfigDict; unknown keys raise ConfigError naming them."""
    return dataclass_from_dict(cls, to_plain_dict(values), "optimizer")


def _require(ok: bool, field: str, message: str) -> None:
  if not ok:
    raise ConfigError(f"optimizer.{field}: {message}")


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def validate(config: OptimizerConfig) -> None:
  """Raises ConfigError naming the first optimizer field that cannot work."""
  c = config
  _require(c.learning_rate > 0, "learning_rate", f"must be > 0, got {c.learning_rate}.")
  _require(_is_int(c.warmup_steps) and c.warmup_steps >= 0, "warmup_steps",
           f"must be an integer >= 0, got {c.warmup_steps!r}.")
  if c.decay_steps is not None:
    _require(_is_int(c.decay_steps) and c.decay_steps >= max(c.warmup_steps, 1), "decay_steps",
             f"must be an integer >= warmup_steps ({c.warmup_steps}) and >= 1, or None "
             f"(= the run's num_steps), got {c.decay_steps!r}.")
  _require(0.0 <= c.end_lr_fraction <= 1.0, "end_lr_fraction",
           f"must be in [0, 1], got {c.end_lr_fraction}.")
  _require(0.0 <= c.b1 < 1.0, "b1", f"must be in [0, 1), got {c.b1}.")
  _require(0.0 <= c.b2 < 1.0, "b2", f"must be in [0, 1), got {c.b2}.")
  _require(c.eps > 0, "eps", f"must be > 0, got {c.eps}.")
  _require(c.weight_decay >= 0, "weight_decay", f"must be >= 0, got {c.weight_decay}.")
  _require(c.grad_clip_norm >= 0, "grad_clip_norm",
           f"must be >= 0 (0 = no clipping), got {c.grad_clip_norm}.")
  unknown = [part for part in c.freeze if part not in PARTS]
  _require(not unknown, "freeze", f"parts must be among {PARTS}, got {unknown}.")
  _require(len(set(c.freeze)) < len(PARTS), "freeze",
           f"freezes every part {c.freeze}; nothing would train.")
  _require(_is_int(c.grad_accum_steps) and c.grad_accum_steps >= 1, "grad_accum_steps",
           f"must be an integer >= 1, got {c.grad_accum_steps!r}.")
  if c.connector_learning_rate is not None:
    _require(c.connector_learning_rate > 0, "connector_learning_rate",
             f"must be > 0 (or unset: learning_rate), got {c.connector_learning_rate}.")
    _require("connector" not in c.freeze, "connector_learning_rate",
             f"{c.connector_learning_rate} is set but optimizer.freeze={c.freeze} freezes the "
             "connector; unset one of them.")


def mm1_lr_law(num_non_embedding_params: int) -> float:
  """MM1's peak learning rate: exp(-0.4214 * ln(N) - 0.5535)."""
  if num_non_embedding_params <= 0:
    raise ValueError(f"the lr law needs N > 0 parameters, got {num_non_embedding_params}.")
  return math.exp(-0.4214 * math.log(num_non_embedding_params) - 0.5535)


def peak_learning_rate(config: OptimizerConfig, num_non_embedding_params: int | None) -> float:
  """config.learning_rate, or the MM1 law of N when config.lr_law."""
  if not config.lr_law:
    return config.learning_rate
  _require(num_non_embedding_params is not None, "lr_law",
           "needs the non-embedding parameter count (accounting.count_params(...)"
           ".non_embedding_llm).")
  return mm1_lr_law(num_non_embedding_params)


def learning_rate_schedule(config: OptimizerConfig, num_steps: int,
                           num_non_embedding_params: int | None = None) -> optax.Schedule:
  """step -> lr: linear 0 -> peak over warmup_steps, cosine to
  end_lr_fraction * peak at decay_steps (default num_steps), constant after.

  With warmup, step 0 has lr 0 (optax evaluates the schedule at the update
  count before incrementing it, so the first update is a no-op).
  """
  peak = peak_learning_rate(config, num_non_embedding_params)
  end = config.end_lr_fraction * peak
  warmup = config.warmup_steps
  decay_steps = num_steps if config.decay_steps is None else config.decay_steps
  _require(decay_steps >= max(warmup, 1), "warmup_steps",
           f"{warmup} warmup steps do not fit in the {decay_steps} decay steps "
           f"(decay_steps, or the run's num_steps when decay_steps is None); lower it.")
  cosine_steps = max(decay_steps - warmup, 1)

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = peak * step / max(warmup, 1)
    progress = jnp.clip((step - warmup) / cosine_steps, 0.0, 1.0)
    cosine = end + (peak - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
    return jnp.where(step < warmup, warm, cosine)

  return schedule


def _path_names(path) -> list[str]:
  """Key names of a tree path (dict keys and attribute names)."""
  return [str(getattr(key, "key", getattr(key, "name", key))) for key in path]


def decays(names: list[str], decay_embeddings: bool = False) -> bool:
  """Whether the leaf at this path of names gets weight decay."""
  leaf, modules = names[-1], names[:-1]
  if leaf in _NO_DECAY_LEAVES or any("norm" in module for module in modules):
    return False
  if _EMBEDDING_NAMES & set(names):
    return decay_embeddings
  return True


def weight_decay_mask(params: Any, decay_embeddings: bool = False) -> Any:
  """Tree of bools like params: True for the matrices that decay.

  Decided by names, not ndim: scanned layer stacks give biases and norm
  scales a leading layer axis, so "ndim >= 2" would wrongly decay them.
  Decays kernels of attention, MLPs, convs, routers, the expert tensors
  ('gate'/'up'/'down' under 'moe') and the untied 'lm_head'; not norms,
  biases, layer-scales, position embeddings, class tokens, attention-pool
  queries, nor (unless decay_embeddings) the token embedding.
  """
  return jax.tree_util.tree_map_with_path(
      lambda path, _: decays(_path_names(path), decay_embeddings), params)


def partition_labels(params: Mapping[str, Any], freeze: tuple[str, ...] = ()) -> Any:
  """Tree like params of 'train' | 'frozen', per leaf: LoRA adapters train;
  other leaves are frozen in the parts listed in `freeze` and in the parts
  that hold adapters (LoRA freezes their base), and train elsewhere."""
  unknown = sorted(set(freeze) - set(params))
  if unknown:
    raise ConfigError(f"optimizer.freeze: {unknown} not in the params' parts {sorted(params)}.")
  adapted = {_path_names(path)[0] for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]
             if is_adapter(_path_names(path))}
  frozen_base = set(freeze) | adapted

  def label(path, _):
    names = _path_names(path)
    return TRAIN if is_adapter(names) or names[0] not in frozen_base else FROZEN

  # tree_map keeps params' own containers (dict or FrozenDict), as optax needs.
  return jax.tree_util.tree_map_with_path(label, params)


def connector_mask(params: Any) -> Any:
  """Tree of bools like params: True for the connector's leaves."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: _path_names(path)[0] == "connector", params)


def make_optimizer(config: OptimizerConfig, params: Any, num_steps: int,
                   num_non_embedding_params: int | None = None
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(optimizer, schedule) for these params.

  Trained leaves (partition_labels): global-norm clipping (over the trained
  gradients only) then AdamW with the schedule and the weight-decay mask;
  the connector's updates are then scaled by connector_learning_rate / peak
  when that is set (the same schedule at another peak; weight decay, which
  optax multiplies by the learning rate, follows). Frozen leaves:
  set_to_zero, which keeps no state, so they cost no Adam moments.
  params may be abstract (ShapeDtypeStructs): only their tree is read.
  """
  schedule = learning_rate_schedule(config, num_steps, num_non_embedding_params)
  # A callable mask: multi_transform hands AdamW the params with frozen leaves
  # masked out, and the mask is rebuilt on that tree.
  mask = functools.partial(weight_decay_mask, decay_embeddings=config.decay_embeddings)
  train = [optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps,
                       weight_decay=config.weight_decay, mask=mask)]
  if config.grad_clip_norm > 0:
    train.insert(0, optax.clip_by_global_norm(config.grad_clip_norm))
  if config.connector_learning_rate is not None:
    ratio = config.connector_learning_rate / peak_learning_rate(config, num_non_embedding_params)
    train.append(optax.masked(optax.scale(ratio), connector_mask))
  optimizer = optax.multi_transform(
      {TRAIN: optax.chain(*train), FROZEN: optax.set_to_zero()},
      partition_labels(params, config.freeze))
  return optimizer, schedule
