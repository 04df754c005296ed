"""An ablation suite: one base experiment, labelled variants, seeds, a length, evaluations.

A suite is a short Python file (configs/ablations/NAME.py) with
`get_suite(preset)` returning a Suite:

    def get_suite(preset="full"):
      return suite.Suite(
          name="mm1_data",
          base="configs/tiny.py:dense",
          variants=(suite.Variant("caption only", {"data.mixture": "mm1_caption_only"}),
                    suite.Variant("interleaved only", {"data.mixture": "mm1_interleaved_only"})),
          num_steps=300 if preset == "full" else 4,
          seeds=(0, 1) if preset == "full" else (0,),
          fewshot=(("easy_vqa_caption", (0,)), ("easy_vqa_vqa", (4, 8))),
          perplexity_tasks=("shakespeare_text",),
          max_queries=200)

Each variant x seed is one ordinary run: `python -m mm1_jax.train
--config=BASE` with the variant's overrides (as --config.KEY=VALUE flags),
train.seed and data.seed set to the seed and train.num_steps to num_steps,
then `python -m mm1_jax.evaluate` of its last checkpoint.

A suite of fine-tuning variants (full vs LoRA, SFT mixtures) starts them all
from one checkpoint: `pretrain=Pretrain("configs/tiny.py:dense", 300)` trains
that run once (seed 0) before the grid, and every variant gets its workdir as
init_from.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
from typing import Any, Mapping

from mm1_jax.typed_config import ConfigError

PRESETS = ("quick", "full")


@dataclasses.dataclass(frozen=True)
class Variant:
  """label: how tables and plots name it; overrides: config key -> value."""
  label: str
  overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def slug(self) -> str:
    """The label as a folder name ("LoRA r=8" -> "lora_r_8")."""
    return re.sub(r"[^a-z0-9]+", "_", self.label.lower()).strip("_")


@dataclasses.dataclass(frozen=True)
class Pretrain:
  """The run every variant starts from (their init_from), trained once.

  base: a config file (with its argument); overrides: config key -> value;
  label: how progress lines and tables name it.
  """
  base: str
  num_steps: int
  overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  label: str = "stage 1"

  @property
  def variant(self) -> Variant:
    return Variant(self.label, self.overrides)


PROMPT_FORMATS = ("fewshot", "chat")


@dataclasses.dataclass(frozen=True)
class Suite:
  """What to run and how to score it (module docstring).

  base: a config file, optionally with its argument ("configs/tiny.py:dense").
  overrides: applied to every variant (before the variant's own).
  fewshot: (task, shot counts) pairs for mm1_jax.evaluate; perplexity_tasks:
  text tasks scored by held-out perplexity; max_queries: queries per
  few-shot setting and sequences per perplexity task (0: all);
  prompt_format: how the evaluator asks ("chat": the run's chat template,
  0 shots only); pretrain: a run trained once that every variant starts from.
  """
  name: str
  base: str
  variants: tuple[Variant, ...]
  num_steps: int
  seeds: tuple[int, ...] = (0,)
  overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  fewshot: tuple[tuple[str, tuple[int, ...]], ...] = ()
  perplexity_tasks: tuple[str, ...] = ()
  max_queries: int = 100
  prompt_format: str = "fewshot"
  pretrain: Pretrain | None = None
  description: str = ""

  def __post_init__(self):
    if not self.variants:
      raise ConfigError(f"suite {self.name!r}: no variants; list at least one Variant.")
    slugs = [v.slug for v in self.variants]
    duplicates = sorted({s for s in slugs if slugs.count(s) > 1})
    if duplicates or not all(slugs):
      raise ConfigError(f"suite {self.name!r}: variant labels must be distinct and contain "
                        f"letters or digits; these collide as folder names: "
                        f"{duplicates or [v.label for v in self.variants if not v.slug]}.")
    if self.num_steps < 1:
      raise ConfigError(f"suite {self.name!r}: num_steps must be >= 1, got {self.num_steps}.")
    if not self.seeds or len(set(self.seeds)) != len(self.seeds):
      raise ConfigError(f"suite {self.name!r}: seeds must be distinct and at least one, got "
                        f"{self.seeds!r}.")
    if self.prompt_format not in PROMPT_FORMATS:
      raise ConfigError(f"suite {self.name!r}: unknown prompt_format {self.prompt_format!r}; "
                        f"use one of {PROMPT_FORMATS}.")
    if self.prompt_format == "chat" and any(shots != (0,) for _, shots in self.fewshot):
      raise ConfigError(f"suite {self.name!r}: prompt_format 'chat' asks 0-shot only; got "
                        f"fewshot {self.fewshot!r} (give shots (0,)).")
    if self.pretrain is not None and self.pretrain.num_steps < 1:
      raise ConfigError(f"suite {self.name!r}: pretrain.num_steps must be >= 1, got "
                        f"{self.pretrain.num_steps}.")
    if not self.fewshot and not self.perplexity_tasks:
      raise ConfigError(f"suite {self.name!r}: nothing to evaluate; give fewshot tasks or "
                        "perplexity_tasks.")

  @property
  def config_file(self) -> str:
    return self.base.split(":", 1)[0]

  def with_seeds(self, num_seeds: int) -> "Suite":
    """The suite with seeds 0 .. num_seeds-1 (the --seeds flag)."""
    if num_seeds < 1:
      raise ConfigError(f"--seeds: must be >= 1, got {num_seeds}.")
    return dataclasses.replace(self, seeds=tuple(range(num_seeds)))


def load_suite(path: str, preset: str = "full") -> Suite:
  """The Suite of a suite file's get_suite(preset), or get_suite(preset, arg)
  for "FILE:ARG" (e.g. configs/ablations/mm1_data.py:emoji)."""
  if preset not in PRESETS:
    raise ConfigError(f"--preset: unknown preset {preset!r}; use one of {PRESETS}.")
  path, _, arg = path.partition(":")
  if not os.path.isfile(path):
    raise ConfigError(f"--suite: {path} is not a file; name a suite file, e.g. "
                      "configs/ablations/mm1_data.py.")
  spec = importlib.util.spec_from_file_location(f"ablation_suite_{os.path.basename(path)[:-3]}",
                                                path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_suite"):
    raise ConfigError(f"--suite: {path} has no get_suite(preset) function.")
  suite = module.get_suite(preset, arg) if arg else module.get_suite(preset)
  if not isinstance(suite, Suite):
    raise ConfigError(f"--suite: {path}'s get_suite returned {type(suite).__name__}, not a "
                      "mm1_jax.ablation.suite.Suite.")
  return suite
