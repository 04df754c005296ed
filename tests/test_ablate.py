"""The ablation harness: a quick suite end to end, resumed, its tables equal to its runs and
its costs to the trainer's count; intervals against scipy; a failing run reported, not
fatal; a suite's pretrain run trained first and every variant started from it."""

import dataclasses
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
from mm1_jax.ablation.suite import Pretrain, Suite, Variant, load_suite
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


def tiny_dense_parameters():
  import jax
  from configs import tiny
  from mm1_jax import config_lib
  from mm1_jax.models.multimodal import MM1Model
  model = config_lib.mm1_config(tiny.get_config("dense"))
  size = model.encoder.image_size
  shapes = jax.eval_shape(
      MM1Model(model).init, jax.random.key(0), np.zeros((1, 8), np.int32),
      np.zeros((1, model.max_images, size, size, 3), np.uint8),
      np.zeros((1, model.max_images), bool))
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(shapes["params"]))


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
            "shakespeare_text/perplexity/perplexity", "cost/trainable_params_M",
            "cost/peak_memory_GiB"} <= set(metrics)
    # 2 steps logged every 10: no window timed, so no step time.
    assert "cost/step_time_s" not in metrics
    with open(os.path.join(run["directory"], "train_summary.json")) as f:
      summary = json.load(f)
    assert summary["step"] == 2 and summary["memory_measure"] == "host peak resident memory"
    # Every parameter of the dense tiny model trains (nothing frozen in pre-training).
    assert summary["trainable_parameters"] == tiny_dense_parameters()
    assert metrics["cost/trainable_params_M"] == summary["trainable_parameters"] / 1e6
    assert 0.2 < metrics["cost/peak_memory_GiB"] < 16
    for metric in ("train/final_loss", "shakespeare_text/perplexity/perplexity"):
      mean, per_seed = table_rows(markdown, metric)[run["variant"]]
      assert mean == per_seed == report._format(metrics[metric])
  assert "## shakespeare_text/perplexity/perplexity (lower is better)" in markdown
  # The overview: one row per variant, the headline metrics as columns (one seed: no ±).
  overview = markdown.split("## Overview\n")[1].split("\n## ")[0].strip().splitlines()
  header = [c.strip() for c in overview[0].strip("|").split("|")]
  assert header == ["variant", "cost/peak_memory_GiB", "cost/trainable_params_M",
                    "easy_vqa_caption/0shot/cider", "shakespeare_text/perplexity/perplexity",
                    "train/final_loss"]
  row = [c.strip() for c in overview[2].strip("|").split("|")]
  metrics = results["runs"][0]["metrics"]
  assert row == ["caption only"] + [report._format(metrics[name]) for name in header[1:]]
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


def test_variants_start_from_the_pretrain_run(tmp_path, monkeypatch):
  suite = Suite(name="from_stage_1", base="configs/tiny.py:dense,sft", num_steps=2,
                pretrain=Pretrain("configs/tiny.py:dense", 3, {"optimizer.warmup_steps": 1}),
                variants=(Variant("full"), Variant("LoRA r=8", {"model.lora.rank": 8})),
                seeds=(0, 1), fewshot=(("easy_vqa_vqa", (0,)),), prompt_format="chat")
  pretrain = runner.pretrain_run(suite, str(tmp_path))
  assert pretrain.directory == str(tmp_path / "pretrain") and pretrain.name == "stage 1"
  assert runner.config_flags(suite, pretrain) == [
      "--config=configs/tiny.py:dense", "--config.optimizer.warmup_steps=1",
      "--config.train.num_steps=3", "--config.train.seed=0", "--config.data.seed=0"]
  runs = runner.runs_of(suite, str(tmp_path))
  assert [(r.variant.label, r.seed) for r in runs] == [("full", 0), ("LoRA r=8", 0),
                                                       ("full", 1), ("LoRA r=8", 1)]
  for run in runs:
    flags = runner.config_flags(suite, run)
    assert flags[:2] == ["--config=configs/tiny.py:dense,sft",
                         f"--config.init_from={tmp_path / 'pretrain'}"]
    assert f"--config.train.seed={run.seed}" in flags
  ((_, command),) = runner.evaluate_commands(suite, runs[0])
  assert "--prompt_format=chat" in command and "--shots=0" in command

  # A pretrain run that fails fails every variant, with its reason; none is started.
  broken = dataclasses.replace(
      suite, pretrain=Pretrain("configs/tiny.py:dense", 3, {"model.connector.kind": "bogus"}))
  monkeypatch.chdir(REPO)
  results = runner.run_suite(broken, str(tmp_path), out=open(os.devnull, "w"))
  assert [r["status"] for r in results] == ["failed"] * 4
  assert all(r["reason"].startswith("stage 1 failed: train: Error: model.connector.kind")
             for r in results)
  assert not (tmp_path / "runs").exists()
  with pytest.raises(ConfigError, match="prompt_format 'chat' asks 0-shot only"):
    dataclasses.replace(suite, fewshot=(("easy_vqa_vqa", (0, 4)),))


@pytest.mark.parametrize("values", [[1.0, 2.0, 4.0], [0.3, 0.5], [2.0] * 5 + [3.0]])
def test_intervals_are_student_t(values):
  mean, half = report.mean_interval(values)
  sem = stats.sem(values)
  low, high = stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=sem)
  assert mean == pytest.approx(np.mean(values))
  assert mean - half == pytest.approx(low, rel=1e-3) and mean + half == pytest.approx(high,
                                                                                    rel=1e-3)
  assert report.mean_interval([5.0]) == (5.0, None)


def test_vqa_panels_carry_their_tasks_question_prior():
  table = {"vqa/4shot/vqa_accuracy": {"a": [0.1, 0.2]},
           "vqa/question_prior/vqa_accuracy": {"a": [0.67, 0.67], "b": [0.67]},
           "caption/0shot/cider": {"a": [4.0]}}
  assert report._question_prior("vqa/4shot/vqa_accuracy", table) == pytest.approx(0.67)
  assert report._question_prior("vqa/4shot/exact_match", table) is None  # No exact-match prior.
  assert report._question_prior("vqa/question_prior/vqa_accuracy", table) is None
  assert report._question_prior("caption/0shot/cider", table) is None


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


@pytest.mark.parametrize("path,full_variants", [
    ("configs/ablations/mm1_data.py", 6), ("configs/ablations/mm1_data.py:emoji", 6),
    ("configs/ablations/mm1_encoder.py", 10), ("configs/ablations/mm1_encoder.py:emoji", 10),
    ("configs/ablations/mm1_encoder.py:mosaic", 3),
    ("configs/ablations/mm1_encoder.py:mosaic_long", 3),
    ("configs/ablations/llava_peft.py", 4), ("configs/ablations/llava_mixing.py", 2)])
@pytest.mark.parametrize("preset", ["quick", "full"])
def test_bundled_suites_name_what_is_registered(path, full_variants, preset):
  """Every run of a bundled suite is a valid experiment over registered tasks."""
  import importlib.util
  from mm1_jax.data import tasks
  from mm1_jax.experiment import Experiment
  suite = load_suite(os.path.join(REPO, path), preset)
  assert len(suite.variants) == (2 if preset == "quick" else full_variants)
  stages = [(suite.base, suite.num_steps, {**suite.overrides, **variant.overrides})
            for variant in suite.variants]
  if suite.pretrain:
    stages.append((suite.pretrain.base, suite.pretrain.num_steps, suite.pretrain.overrides))
  for base, num_steps, overrides in stages:
    config_file, _, arg = base.partition(":")
    spec = importlib.util.spec_from_file_location("suite_base", os.path.join(REPO, config_file))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(arg or None)
    for key, value in {**overrides, "train.num_steps": num_steps}.items():
      *parents, leaf = key.split(".")
      section = config
      for parent in parents:
        section = section[parent]
      section[leaf] = value
    Experiment.from_config(config, num_devices=1, check_init_from=False)
    tasks.get_task_or_mixture(config.data.mixture)
  for task in [task for task, _ in suite.fewshot] + list(suite.perplexity_tasks):
    tasks.get_task_or_mixture(task)
  if ":" in path:
    with pytest.raises(ValueError, match="unknown dataset 'coco'"):
      load_suite(os.path.join(REPO, path.split(":")[0]) + ":coco", preset)
