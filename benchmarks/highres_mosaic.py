"""Does high-resolution image splitting help where resolution decides? (issue 19)

    python benchmarks/highres_mosaic.py --workdir=/tmp/highres [--splits=none,mm1]
        [--pretrain_steps=300] [--steps=400] [--max_queries=0]

First the tiny model (configs/tiny.py) learns single 64 px easy-vqa images
(--pretrain_steps on easy_vqa_vqa, packed, from scratch). Then, from that
checkpoint, once per --splits value (configs/tiny.py:mosaic), it is tuned the
same --steps on the same mosaic questions in the same order (one example per
sequence): 192 px mosaics of 3 x 3 easy-vqa images, each question about one
named cell (easy_vqa_mosaic_vqa). `none` shows the 64 px encoder the mosaic
downscaled (~21 px per cell); `mm1` splits it into its 3 x 3 cells at full
resolution plus the overview (10 image slots). Each run is then evaluated
0-shot on the test split (python -m mm1_jax.evaluate, every query), and the
script prints VQA accuracy per question kind (colour, shape, yes/no) with 95%
Wilson intervals, next to the question-only prior. Runs and evaluations
already in --workdir are reused (delete a folder to redo it).
"""

from __future__ import annotations

import collections
import json
import math
import os
import subprocess
import sys
import time

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
TASK = "easy_vqa_mosaic_vqa"

flags.DEFINE_string("workdir", None, "Where the runs and their evaluations go.")
flags.DEFINE_list("splits", ["none", "mm1"], "data.image_split variants to compare.")
flags.DEFINE_integer("pretrain_steps", 300, "Steps on single easy-vqa images first.",
                     lower_bound=1)
flags.DEFINE_integer("steps", 400, "Mosaic tuning steps per variant.", lower_bound=1)
flags.DEFINE_integer("max_queries", 0, "Test queries to evaluate (0: all).", lower_bound=0)
FLAGS = flags.FLAGS


def question_kind(prompt: str) -> str:
  if "what color" in prompt:
    return "colour"
  if "what shape" in prompt:
    return "shape"
  return "yes/no"


def wilson(correct: int, total: int, z: float = 1.96) -> tuple[float, float]:
  """The 95% Wilson score interval of a proportion."""
  if not total:
    return (0.0, 0.0)
  p = correct / total
  centre = (p + z * z / (2 * total)) / (1 + z * z / total)
  half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
  return centre - half, centre + half


def run(command: list[str], log_path: str) -> None:
  start = time.perf_counter()
  with open(log_path, "a") as log:
    code = subprocess.call(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
  if code:
    sys.exit(f"{' '.join(command)} failed with exit code {code}; see {log_path}")
  print(f"  {' '.join(command[2:4])} ... {time.perf_counter() - start:.0f} s", flush=True)


def pretrain() -> str:
  """The single-image run every variant starts from."""
  workdir = os.path.join(FLAGS.workdir, "single_image")
  if not os.path.exists(os.path.join(workdir, "done")):
    os.makedirs(workdir, exist_ok=True)
    print(f"single images: training {FLAGS.pretrain_steps} steps on easy_vqa_vqa", flush=True)
    run([sys.executable, "-m", "mm1_jax.train", "--config=configs/tiny.py",
         "--config.data.mixture=easy_vqa_vqa", f"--config.train.num_steps={FLAGS.pretrain_steps}",
         f"--config.train.checkpoint_every={FLAGS.pretrain_steps}", f"--workdir={workdir}"],
        os.path.join(workdir, "benchmark.log"))
    open(os.path.join(workdir, "done"), "w").close()
  return workdir


def train_and_evaluate(split: str, start: str) -> dict:
  workdir = os.path.join(FLAGS.workdir, split)
  config = f"--config=configs/tiny.py:mosaic,split={split},from_workdir={start}"
  overrides = [f"--config.train.num_steps={FLAGS.steps}"]
  report_path = os.path.join(workdir, "mosaic_eval.json")
  if not os.path.exists(report_path):
    os.makedirs(workdir, exist_ok=True)
    log = os.path.join(workdir, "benchmark.log")
    print(f"{split}: training {FLAGS.steps} steps", flush=True)
    run([sys.executable, "-m", "mm1_jax.train", config, f"--workdir={workdir}", *overrides], log)
    run([sys.executable, "-m", "mm1_jax.evaluate", config, f"--workdir={workdir}", *overrides,
         f"--tasks={TASK}", "--shots=0", f"--max_queries={FLAGS.max_queries}",
         "--num_examples=0", f"--output={report_path}"], log)
  with open(report_path) as f:
    return json.load(f)


def main(argv):
  del argv
  from mm1_jax.evaluation import metrics

  rows = collections.OrderedDict()
  prior = None
  start = pretrain()
  for split in FLAGS.splits:
    report = train_and_evaluate(split, start)
    results = report["results"][TASK]
    prior = prior or results.get("question_prior")
    by_kind = collections.defaultdict(lambda: [0, 0])
    for example in results["0shot"]["examples"]:
      correct = metrics.vqa_answer_accuracy(example["prediction"], example["references"]) == 1
      for kind in (question_kind(example["prompt"]), "all"):
        by_kind[kind][0] += int(correct)
        by_kind[kind][1] += 1
    rows[split] = by_kind
  kinds = ["all", "colour", "shape", "yes/no"]
  print(f"\n0-shot VQA accuracy on the {TASK} test split, % [95% Wilson interval] (n)")
  print("| image_split | " + " | ".join(kinds) + " |")
  print("|---|" + "---|" * len(kinds))
  for split, by_kind in rows.items():
    cells = []
    for kind in kinds:
      correct, total = by_kind[kind]
      low, high = wilson(correct, total)
      cells.append(f"{100 * correct / max(total, 1):.1f} [{100 * low:.1f}, {100 * high:.1f}] "
                   f"({total})")
    print(f"| {split} | " + " | ".join(cells) + " |")
  if prior:
    print(f"question-only prior (most frequent train answer per question): "
          f"{100 * prior['vqa_accuracy']:.1f}%")


if __name__ == "__main__":
  flags.mark_flag_as_required("workdir")
  app.run(main)
