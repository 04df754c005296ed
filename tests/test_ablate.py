"""The ablation harness: a quick suite end to end, resumed, its tables equal to its runs;
intervals against scipy; a failing run reported, not fatal."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from scipy import stats

from mm1_jax.ablation import report, runner
from mm1_jax.ablation.suite import Suite, Variant, load_suite
from mm1_jax.typed_config import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUITE = "configs/ablations/mm1_data.py"
# The quick preset's first variant alone (each run is a train and an evaluate
# command, ~2 minutes of the suite's time); tables of several variants are
# checked on failed runs, which cost no training.
ONE_RUN_SUITE = """
import dataclasses

from configs.ablations import mm1_data

def get_suite(preset="quick"):
  suite = mm1_data.get_suite("quick")
  return dataclasses.replace(suite, variants=suite.variants[:1])
"""


def ablate(workdir, suite_path):
  return subprocess.run([sys.executable, "-m", "mm1_jax.ablate", f"--suite={suite_path}",
                         f"--workdir={workdir}", "--preset=quick"],
                        cwd=REPO, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def suite_dir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("ablation")
  suite_path = workdir / "one_run_suite.py"
  suite_path.write_text(ONE_RUN_SUITE)
  result = ablate(workdir / "suite", suite_path)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir / "suite", suite_path, result.stdout


def table_rows(markdown, metric):
  """{variant: (mean, per-seed text)} of one metric's table in results.md."""
  section = markdown.split(f"## {metric} ")[1].split("\n## ")[0]
  rows = {}
  for line in section.splitlines():
    cells = [c.strip() for c in line.strip("|").split("|")]
    if len(cells) == 5 and cells[0] not in ("variant", "---"):
      rows[cells[0]] = (cells[1], cells[4])
  return rows


def test_a_suite_writes_tables_and_plots_of_its_runs(suite_dir):
  workdir, suite_path, stdout = suite_dir
  assert re.search(r"suite: 0/1 runs done \| caption only \(seed 0\): train step \d+/2", stdout)
  assert "suite: 1/1 runs done | caption only (seed 0): done" in stdout
  with open(workdir / "results.json") as f:
    results = json.load(f)
  assert [r["variant"] for r in results["runs"]] == ["caption only"]
  markdown = (workdir / "results.md").read_text()
  for run in results["runs"]:
    assert run["status"] == "done" and run["step"] == 2
    # What the table holds is what the run wrote.
    with open(os.path.join(run["directory"], "result.json")) as f:
      assert json.load(f)["metrics"] == run["metrics"]
    metrics = run["metrics"]
    assert {"train/final_loss", "easy_vqa_caption/0shot/cider",
            "shakespeare_text/perplexity/perplexity"} <= set(metrics)
    for metric in ("train/final_loss", "shakespeare_text/perplexity/perplexity"):
      mean, per_seed = table_rows(markdown, metric)[run["variant"]]
      assert mean == per_seed == report._format(metrics[metric])
  assert "## shakespeare_text/perplexity/perplexity (lower is better)" in markdown
  for name in ("metrics.png", "loss_curves.png"):
    with Image.open(workdir / name) as image:
      assert image.size[0] > 300 and image.size[1] > 200


def test_a_second_start_skips_finished_runs(suite_dir):
  workdir, suite_path, _ = suite_dir
  result_files = sorted(workdir.glob("runs/*/seed_0/result.json"))
  before = [path.stat().st_mtime_ns for path in result_files]
  result = ablate(workdir, suite_path)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.count("done before (skipped)") == 1
  assert [path.stat().st_mtime_ns for path in result_files] == before


def test_a_failing_run_is_reported_and_the_suite_goes_on(tmp_path, monkeypatch):
  suite = Suite(name="broken", base="configs/tiny.py:dense", num_steps=2,
                overrides={"optimizer.warmup_steps": 1},
                variants=(Variant("bad connector", {"model.connector.kind": "bogus"}),
                          Variant("bad mixture", {"data.mixture": "no_such_mixture"})),
                perplexity_tasks=("shakespeare_text",))
  monkeypatch.chdir(REPO)  # The suite's base config path is relative to it.
  results = runner.run_suite(suite, str(tmp_path), out=open(os.devnull, "w"))
  assert [r["status"] for r in results] == ["failed", "failed"]
  assert "model.connector.kind" in results[0]["reason"] and "bogus" in results[0]["reason"]
  assert "no_such_mixture" in results[1]["reason"]
  markdown = report.markdown(results, suite, "quick")
  assert "| bad connector | 0 | train: Error: model.connector.kind" in markdown


@pytest.mark.parametrize("values", [[1.0, 2.0, 4.0], [0.3, 0.5], [2.0] * 5 + [3.0]])
def test_intervals_are_student_t(values):
  mean, half = report.mean_interval(values)
  sem = stats.sem(values)
  low, high = stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=sem)
  assert mean == pytest.approx(np.mean(values))
  assert mean - half == pytest.approx(low, rel=1e-3) and mean + half == pytest.approx(high,
                                                                                    rel=1e-3)
  assert report.mean_interval([5.0]) == (5.0, None)


def test_bad_suites_are_refused(tmp_path):
  with pytest.raises(ConfigError, match="collide"):
    Suite(name="x", base="configs/tiny.py", num_steps=1, perplexity_tasks=("shakespeare_text",),
          variants=(Variant("LoRA r=8"), Variant("lora r 8")))
  with pytest.raises(ConfigError, match="nothing to evaluate"):
    Suite(name="x", base="configs/tiny.py", num_steps=1, variants=(Variant("a"),))
  with pytest.raises(ConfigError, match="--preset: unknown preset 'huge'"):
    load_suite(os.path.join(REPO, SUITE), "huge")
  path = tmp_path / "no_suite.py"
  path.write_text("x = 1\n")
  with pytest.raises(ConfigError, match="has no get_suite"):
    load_suite(str(path))


@pytest.mark.parametrize("path", ["configs/ablations/mm1_data.py",
                                  "configs/ablations/mm1_data.py:emoji",
                                  "configs/ablations/mm1_encoder.py",
                                  "configs/ablations/mm1_encoder.py:emoji"])
@pytest.mark.parametrize("preset", ["quick", "full"])
def test_bundled_suites_name_what_is_registered(path, preset):
  from mm1_jax.data import tasks
  suite = load_suite(os.path.join(REPO, path), preset)
  assert len(suite.variants) == 2 if preset == "quick" else len(suite.variants) >= 6
  for variant in suite.variants:
    mixture = {**suite.overrides, **variant.overrides}.get("data.mixture")
    if mixture:
      tasks.get_task_or_mixture(mixture)
  for task, _ in suite.fewshot:
    tasks.get_task_or_mixture(task)
  with pytest.raises(ValueError, match="unknown dataset 'coco'"):
    load_suite(os.path.join(REPO, path.split(":")[0]) + ":coco", preset)
