"""A workdir on gs://: every workdir file goes through mm1_jax.paths.

There is no network here, and Orbax's tensorstore cannot write to an
in-memory filesystem, so the programs run on a local workdir under an audit
hook (tests/workdir_io_audit.py) that flags each file event there that
mm1_jax code makes itself instead of through a layer that understands gs://
(etils.epath, Orbax, TensorFlow, clu). Also: paths.py on a local directory,
the launchers passing a gs:// workdir through, and what needs no bucket.
"""

import json
import os
import subprocess
import sys

import orbax.checkpoint as ocp
import pytest

from mm1_jax import convert, paths
from mm1_jax.training import checkpoint
from process_env import one_device_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AUDIT = os.path.join(REPO, "tests", "workdir_io_audit.py")
TIMEOUT_S = 600  # Generous: the machine may be shared.
# The smallest run that checkpoints every step; evaluation uses the same model.
MODEL = ["--config=configs/tiny.py:dense", "--config.data.seq_len=64"]
TRAIN = [*MODEL, "--config.data.batch_size=2", "--config.train.checkpoint_every=1",
         "--config.train.log_every=1", "--config.optimizer.warmup_steps=1",
         "--config.train.peak_tflops=1.0"]


def audited(watched, *program, name="run"):
  """Runs `program` (-m MODULE ARGS... or -c CODE) under the audit hook;
  returns (the finished process, its violations)."""
  report = os.path.join(os.path.dirname(watched), f"{name}.violations.json")
  env = one_device_env(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  result = subprocess.run([sys.executable, AUDIT, report, str(watched), *program], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
  with open(report) as f:
    return result, json.load(f)


def test_paths_write_read_and_append_locally(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert paths.as_path("run/a.json") == tmp_path / "run" / "a.json"  # Absolute.
  written = paths.write_json("run/eval/a.json", {"x": [1, 2]}, indent=2)
  assert written == tmp_path / "run" / "eval" / "a.json"
  assert written.read_text() == '{\n  "x": [\n    1,\n    2\n  ]\n}'
  assert paths.read_json(tmp_path / "run" / "eval" / "a.json") == {"x": [1, 2]}
  log = tmp_path / "new" / "log.jsonl"
  paths.append_lines(log, [])
  assert not log.parent.exists()  # Nothing to append: nothing created.
  paths.append_lines(log, ["1", "2"])
  paths.append_lines(str(log), ["3"])
  assert log.read_text() == "1\n2\n3\n"


def test_remote_paths_stay_uris():
  assert paths.is_remote("gs://bucket/run") and not paths.is_remote("/tmp/run")
  remote = paths.as_path("gs://bucket/run")
  assert os.fspath(remote / "eval" / "step_3.json") == "gs://bucket/run/eval/step_3.json"


def test_the_audit_flags_bypasses_and_passes_the_abstraction(tmp_path):
  """The detector itself: CODE runs as an mm1_jax module."""
  watched = tmp_path / "watched"
  root, outside = str(watched), str(tmp_path / "outside.txt")
  code = f"""
import os
from mm1_jax import paths
paths.write_json(os.path.join({root!r}, "fine", "a.json"), {{"a": 1}})
paths.append_lines(os.path.join({root!r}, "fine", "log.jsonl"), ["x"])
assert paths.read_json(os.path.join({root!r}, "fine", "a.json")) == {{"a": 1}}
open({outside!r}, "w").close()
os.makedirs(os.path.join({root!r}, "bypass"))
with open(os.path.join({root!r}, "bypass", "b.json"), "w") as f:
  f.write("{{}}")
"""
  result, violations = audited(watched, "-c", code)
  assert result.returncode == 0, result.stderr[-3000:]
  assert violations == [
      {"event": "os.mkdir", "path": os.path.join(root, "bypass"),
       "where": "mm1_jax.audit_probe:8"},
      {"event": "open", "path": os.path.join(root, "bypass", "b.json"),
       "where": "mm1_jax.audit_probe:9"}]


def test_train_resume_evaluate_generate_and_convert_keep_to_the_abstraction(tmp_path):
  """What a gs:// workdir needs: no workdir, output or input file touched by
  mm1_jax around paths.py / Orbax / TensorFlow."""
  import numpy as np
  import tensorflow as tf

  watched = tmp_path / "watched"
  workdir, report, converted = watched / "run", watched / "reports" / "eval.json", (
      watched / "converted")
  image = watched / "images" / "shape.png"
  image.parent.mkdir(parents=True)
  image.write_bytes(tf.io.encode_png(np.zeros((8, 8, 3), np.uint8)).numpy())
  programs = {
      "train": ["-m", "mm1_jax.train", *TRAIN, f"--workdir={workdir}",
                "--config.train.num_steps=2"],
      "resume": ["-m", "mm1_jax.train", *TRAIN, f"--workdir={workdir}",
                 "--config.train.num_steps=3"],
      "evaluate": ["-m", "mm1_jax.evaluate", *MODEL, f"--workdir={workdir}", "--shots=0",
                   "--tasks=easy_vqa_caption", "--max_queries=1", "--batch_size=1",
                   "--num_examples=1", f"--output={report}"],
      "generate": ["-m", "mm1_jax.generate", *MODEL, f"--workdir={workdir}", f"--image={image}",
                   "--prompt=<image> Question: What shape is it? Answer:",
                   "--max_new_tokens=2"],
      "convert": ["-m", "mm1_jax.convert", "--source=dinov2_small", f"--output={converted}"],
  }
  found = []
  for name, program in programs.items():
    result, violations = audited(watched, *program, name=name)
    assert result.returncode == 0, f"{name}:\n{result.stderr[-3000:]}"
    found += [f"{name}: {v['where']} {v['event']} {v['path']}" for v in violations]
  assert paths.read_json(report)["step"] == 3
  assert (workdir / "checkpoints" / "3").is_dir()
  assert paths.read_json(converted / convert.COMPONENT_FILE)["component"] == "encoder"
  assert not found, "workdir files accessed around mm1_jax.paths:\n" + "\n".join(found)


def test_params_checkpoints_keep_a_gs_path(monkeypatch):
  """save_params hands Orbax the gs:// path itself (epath's absolute()
  would turn it into a local directory named 'gs:')."""
  saved = []

  class RecordingCheckpointer:
    def __enter__(self):
      return self

    def __exit__(self, *exc):
      return False

    def save(self, path, params):
      saved.append(os.fspath(path))

    def wait_until_finished(self):
      pass

  monkeypatch.setattr(ocp, "StandardCheckpointer", RecordingCheckpointer)
  checkpoint.save_params("gs://bucket/converted", {"llm": {}})
  assert saved == ["gs://bucket/converted"]


def test_convert_refuses_a_gs_source_in_one_line():
  with pytest.raises(ValueError, match=r"^--source=gs://bucket/model: sources must be local "
                                       r"files; copy it to this machine first"):
    convert.convert("gs://bucket/model")


def launch(module, *args):
  return subprocess.run([sys.executable, "-m", module, "--dry_run", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=TIMEOUT_S)


@pytest.mark.parametrize("module", ["launch.local", "launch.gpu_slurm"])
def test_launchers_pass_a_gs_workdir_through(module, tmp_path):
  trainer_args = ["--config=configs/tiny.py", "--workdir=gs://bucket/run"]
  refused = launch(module, "--", *trainer_args)
  assert refused.returncode != 0 and "needs --process_log_dir" in refused.stderr
  result = launch(module, f"--process_log_dir={tmp_path / 'logs'}", "--", *trainer_args)
  assert result.returncode == 0, result.stderr
  assert "--workdir=gs://bucket/run" in result.stdout.split()
  assert not os.path.exists(os.path.join(REPO, "gs:"))  # Never made a local directory.
