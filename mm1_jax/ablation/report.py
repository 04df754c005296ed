"""A suite's outputs: results.json, results.md (mean and 95% interval per variant), plots.

    DIR/results.json      every run: variant, seed, status (done / failed + reason),
                          metrics, losses
    DIR/results.md        an overview (variants x headline metrics: mean +- the 95%
                          interval's half-width), then one table per metric: per
                          variant the mean over seeds, its 95% confidence interval
                          (Student t over seeds; none for one seed) and each seed's
                          value; failed runs listed with reasons
    DIR/metrics.png       a bar per variant and metric, error bars = the 95% intervals
    DIR/loss_curves.png   training loss of every variant (mean over seeds) against step
"""

from __future__ import annotations

import collections
import json
import math
import os
from typing import Sequence

import numpy as np

from mm1_jax.ablation.suite import Suite

# Two-sided 95% Student t quantiles t_{0.975, df}, df = 1..30 (standard tables).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
# Metrics where lower is better (the tables say so).
LOWER_IS_BETTER = ("final_loss", "perplexity", "cross_entropy")
COST_PREFIX = "cost/"  # What a run cost (runner.cost_metrics): neither better nor worse.
# The overview's columns: each task's main score, perplexity, the final loss, the costs.
HEADLINE = ("cider", "vqa_accuracy", "perplexity", "final_loss", "trainable_params_M",
            "step_time_s", "peak_memory_GiB")


def mean_interval(values: Sequence[float]) -> tuple[float, float | None]:
  """(mean, half-width of its 95% t interval); half-width None for one value."""
  values = np.asarray(values, np.float64)
  mean = float(values.mean())
  if len(values) < 2:
    return mean, None
  df = len(values) - 1
  t = _T975[df - 1] if df <= len(_T975) else 1.96
  return mean, float(t * values.std(ddof=1) / math.sqrt(len(values)))


def metric_table(results: Sequence[dict], suite: Suite) -> dict[str, dict[str, list[float]]]:
  """{metric: {variant label: [value per done seed, in seed order]}}."""
  table: dict[str, dict[str, list[float]]] = collections.defaultdict(
      lambda: {v.label: [] for v in suite.variants})
  for result in sorted(results, key=lambda r: r["seed"]):
    if result.get("status") != "done":
      continue
    for name, value in result["metrics"].items():
      table[name][result["variant"]].append(value)
  return dict(sorted(table.items()))


def _format(value: float) -> str:
  return f"{value:.4g}"


def _mean_text(values: Sequence[float]) -> str:
  if not values:
    return "-"
  mean, half = mean_interval(values)
  return _format(mean) + ("" if half is None else f" ± {_format(half)}")


def overview(results: Sequence[dict], suite: Suite) -> list[str]:
  """Markdown lines: variants x HEADLINE metrics (question-prior baselines
  left to their own tables), mean ± the 95% interval's half-width."""
  table = {metric: by_variant for metric, by_variant in metric_table(results, suite).items()
           if metric.rsplit("/", 1)[-1] in HEADLINE and "/question_prior/" not in metric}
  if not table:
    return []
  lines = ["## Overview", "", "| variant | " + " | ".join(table) + " |",
           "|---|" + "---|" * len(table)]
  for variant in suite.variants:
    lines.append(f"| {variant.label} | "
                 + " | ".join(_mean_text(by_variant[variant.label])
                              for by_variant in table.values()) + " |")
  return lines + [""]


def markdown(results: Sequence[dict], suite: Suite, preset: str) -> str:
  lines = [f"# Ablation suite `{suite.name}` ({preset} preset)", ""]
  if suite.description:
    lines += [suite.description, ""]
  done = sum(r.get("status") == "done" for r in results)
  start = ""
  if suite.pretrain is not None:
    start = (f"Every variant starts from one {suite.pretrain.label} run (`{suite.pretrain.base}`"
             f", {suite.pretrain.num_steps} steps, seed 0). ")
  lines += [f"{start}Base `{suite.base}`, {suite.num_steps} steps, seeds {list(suite.seeds)}; "
            f"{done} of {len(results)} runs done. Mean over seeds with its 95% confidence "
            "interval (Student t; none with one seed).", ""]
  lines += overview(results, suite)
  for metric, by_variant in metric_table(results, suite).items():
    if metric.startswith(COST_PREFIX):
      better = "cost"
    elif metric.rsplit("/", 1)[-1] in LOWER_IS_BETTER:
      better = "lower is better"
    else:
      better = "higher is better"
    lines += [f"## {metric} ({better})", "", "| variant | mean | 95% interval | n | per seed |",
              "|---|---|---|---|---|"]
    for label, values in by_variant.items():
      if not values:
        lines.append(f"| {label} | - | - | 0 | |")
        continue
      mean, half = mean_interval(values)
      interval = "-" if half is None else f"[{_format(mean - half)}, {_format(mean + half)}]"
      lines.append(f"| {label} | {_format(mean)} | {interval} | {len(values)} | "
                   f"{', '.join(_format(v) for v in values)} |")
    lines.append("")
  failed = [r for r in results if r.get("status") != "done"]
  if failed:
    lines += ["## Failed or pending runs", "", "| variant | seed | reason |", "|---|---|---|"]
    lines += [f"| {r['variant']} | {r['seed']} | {r.get('reason', 'not run')} |" for r in failed]
    lines.append("")
  return "\n".join(lines)


PROPORTIONS = ("/vqa_accuracy", "/exact_match")


def _question_prior(metric: str, table: dict[str, dict[str, list[float]]]) -> float | None:
  """The question-only baseline of a VQA metric's task (the same for every run)."""
  task, _, name = metric.partition("/")
  name = name.rpartition("/")[2]
  by_variant = table.get(f"{task}/question_prior/{name}")
  if not by_variant or "/question_prior/" in metric:
    return None
  values = [value for values in by_variant.values() for value in values]
  return float(np.mean(values)) if values else None


def plot_metrics(results: Sequence[dict], suite: Suite, path: str) -> None:
  """One bar chart per metric (a panel each), error bars = 95% intervals;
  proportions on [0, 1] with the task's question-only prior as a dashed line."""
  import matplotlib
  matplotlib.use("Agg")  # Headless.
  import matplotlib.pyplot as plt

  table = metric_table(results, suite)
  # A question prior is drawn as a line on its task's panels, not as bars.
  panels = {metric: by_variant for metric, by_variant in table.items()
            if "/question_prior/" not in metric}
  if not panels:
    return
  columns = min(3, len(panels))
  rows = math.ceil(len(panels) / columns)
  figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.2 * rows), squeeze=False)
  labels = [v.label for v in suite.variants]
  for axis, (metric, by_variant) in zip(axes.flat, panels.items()):
    means, errors = [], []
    for label in labels:
      values = by_variant[label]
      mean, half = mean_interval(values) if values else (np.nan, None)
      means.append(mean)
      errors.append(half or 0.0)
    axis.bar(range(len(labels)), means, yerr=errors, capsize=3, color="tab:blue", alpha=0.8)
    if metric.endswith("/perplexity"):  # Spans orders of magnitude across mixtures.
      axis.set_yscale("log", nonpositive="clip")
    if metric.endswith(PROPORTIONS):  # Two seeds' t intervals overshoot [0, 1].
      axis.set_ylim(0.0, 1.0)
      prior = _question_prior(metric, table)
      if prior is not None:
        axis.axhline(prior, color="tab:red", linestyle="--", linewidth=1)
        axis.text(len(labels) - 0.5, prior, "question prior", color="tab:red", fontsize=6,
                  ha="right", va="bottom")
    axis.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=7)
    axis.set_title(metric, fontsize=8)
    axis.tick_params(axis="y", labelsize=7)
  for axis in list(axes.flat)[len(panels):]:
    axis.axis("off")
  figure.suptitle(f"{suite.name}: mean over seeds, 95% intervals", fontsize=9)
  figure.tight_layout()
  figure.savefig(path, dpi=80)
  plt.close(figure)


def plot_losses(results: Sequence[dict], suite: Suite, path: str) -> None:
  """Training loss against step, one line per variant (mean over its seeds)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  figure, axis = plt.subplots(figsize=(6, 3.6))
  for variant in suite.variants:
    curves = [dict(r["losses"]) for r in results
              if r.get("status") == "done" and r["variant"] == variant.label and r["losses"]]
    if not curves:
      continue
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    axis.plot(steps, [np.mean([c[s] for c in curves]) for s in steps], label=variant.label,
              linewidth=1)
  axis.set_xlabel("step")
  axis.set_ylabel("training loss")
  axis.set_yscale("log")
  axis.legend(fontsize=7)
  axis.set_title(f"{suite.name}: training loss (mean over seeds)", fontsize=9)
  figure.tight_layout()
  figure.savefig(path, dpi=80)
  plt.close(figure)


def write(results: Sequence[dict], suite: Suite, preset: str, workdir: str) -> dict[str, str]:
  """Writes results.json, results.md and the plots; returns their paths."""
  paths = {name: os.path.join(workdir, name)
           for name in ("results.json", "results.md", "metrics.png", "loss_curves.png")}
  with open(paths["results.json"], "w") as f:
    json.dump({"suite": suite.name, "preset": preset, "base": suite.base,
               "num_steps": suite.num_steps, "seeds": list(suite.seeds),
               "pretrain": suite.pretrain and {"label": suite.pretrain.label,
                                               "base": suite.pretrain.base,
                                               "num_steps": suite.pretrain.num_steps,
                                               "overrides": dict(suite.pretrain.overrides)},
               "variants": [{"label": v.label, "overrides": dict(v.overrides)}
                            for v in suite.variants],
               "runs": list(results)}, f, indent=1)
  with open(paths["results.md"], "w") as f:
    f.write(markdown(results, suite, preset))
  plot_metrics(results, suite, paths["metrics.png"])
  plot_losses(results, suite, paths["loss_curves.png"])
  return paths
