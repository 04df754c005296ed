"""Run an ablation suite: every variant x seed trained and evaluated, then tables and plots.

    python -m mm1_jax.ablate --suite=configs/ablations/mm1_data.py --workdir=DIR \
        [--seeds=3] [--preset=quick|full]

A suite file (configs/ablations/) names a base experiment, labelled variants
(config overrides), the seeds, the training length and the evaluations
(mm1_jax/ablation/suite.py). Each variant x seed is an ordinary training run
under DIR/runs/<variant>/seed_<n> (`python -m mm1_jax.train`, then `python -m
mm1_jax.evaluate`), one after another on this machine's devices
(mm1_jax/ablation/runner.py); a suite of fine-tuning variants trains its
pretrain run (DIR/pretrain) first and starts every variant from it. Start
the same command again after an interruption: finished runs are skipped and
interrupted ones resume from their checkpoints. One progress line follows the whole suite; each run's own
output goes to its train.log / evaluate.log.

Outputs (mm1_jax/ablation/report.py): DIR/results.json (every metric of every
run), DIR/results.md (a table per metric: mean and 95% interval over seeds
per variant; failed runs with their reasons), DIR/metrics.png and
DIR/loss_curves.png. --preset=quick runs the suite's small version (the
test suite runs one end to end); --seeds=N replaces the suite's seeds by
0..N-1.
"""

from __future__ import annotations

from absl import flags

from mm1_jax import cli

_SUITE = flags.DEFINE_string("suite", None, "Suite file, e.g. configs/ablations/mm1_data.py.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where the runs and the results go.")
_SEEDS = flags.DEFINE_integer("seeds", None, "Seeds per variant (0..N-1); default: the "
                              "suite's own.", lower_bound=1)
_PRESET = flags.DEFINE_enum("preset", "full", ["quick", "full"], "The suite's size.")


def main(argv):
  cli.start(argv)
  import os

  from mm1_jax.ablation import report, runner, suite as suite_lib

  suite = suite_lib.load_suite(_SUITE.value, _PRESET.value)
  if _SEEDS.value is not None:
    suite = suite.with_seeds(_SEEDS.value)
  os.makedirs(_WORKDIR.value, exist_ok=True)
  first = (f"{suite.pretrain.label} ({suite.pretrain.num_steps} steps) first, then "
           if suite.pretrain else "")
  print(f"suite {suite.name} ({_PRESET.value}): {first}{len(suite.variants)} variants x "
        f"{len(suite.seeds)} seeds, {suite.num_steps} steps each; runs under "
        f"{os.path.join(_WORKDIR.value, 'runs')}", flush=True)
  # The tables are rewritten after every run: a long suite can be read while it runs.
  results = runner.run_suite(
      suite, _WORKDIR.value,
      on_result=lambda so_far: report.write(so_far, suite, _PRESET.value, _WORKDIR.value))
  written = report.write(results, suite, _PRESET.value, _WORKDIR.value)
  failed = sum(r["status"] != "done" for r in results)
  print(f"{len(results) - failed} runs done, {failed} failed; wrote "
        + ", ".join(written.values()), flush=True)


if __name__ == "__main__":
  cli.run(main, required=["suite", "workdir"])
