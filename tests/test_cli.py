"""Every command-line program reports a config or flag error as one line:
`Error: <field>: ...`, a non-zero exit code, no traceback (unless --verbose)."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "--config=configs/tiny.py"


def run(*args, cwd=REPO):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)  # One device: nothing here gets as far as a compile.
  return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                        text=True, timeout=300)


@pytest.mark.parametrize("args, code, error", [
    # A misspelt override names the closest field.
    (["-m", "mm1_jax.train", TINY, "--workdir=WORKDIR", "--config.train.num_step=3"], 2,
     "Error: --config.train.num_step: the config has no field 'num_step'. Did you mean "
     "--config.train.num_steps?"),
    # A value that cannot work, before anything is built or written.
    (["-m", "mm1_jax.train", TINY, "--workdir=WORKDIR", "--config.data.batch_size=0"], 1,
     "Error: data.batch_size: must be >= 1, got 0."),
    (["-m", "mm1_jax.train", TINY, "--workdir=WORKDIR", "--num_processes=0"], 2,
     "Error: flag --num_processes=0: 0 is not a positive integer"),
    (["-m", "mm1_jax.evaluate", TINY, "--workdir=WORKDIR", "--max_queries=-1"], 2,
     "Error: flag --max_queries=-1: -1 is not a non-negative integer"),
    (["-m", "mm1_jax.generate", TINY, "--workdir=WORKDIR", "--prompt=hi",
      "--config.model.llm.num_heads=0"], 1,
     "Error: model.llm.num_heads: must be >= 1, got 0."),
    (["-m", "mm1_jax.summary", TINY, "--config.model.encoder.patch_size=7"], 1,
     "Error: model.encoder.patch_size: patch_size 7 does not divide image_size 64"),
    (["-m", "mm1_jax.summary", TINY, "--memory_analysis", "--mesh=fsdp"], 1,
     "Error: --mesh: expected axis=size items like 'data=2,fsdp=128', got 'fsdp'."),
    (["-m", "mm1_jax.convert", "--source=smollm2", "--output=WORKDIR", "--vocab_size=0"], 2,
     "Error: flag --vocab_size=0: 0 is not a positive integer"),
    (["-m", "launch.local", "--processes=0", "--", TINY, "--workdir=WORKDIR"], 2,
     "Error: flag --processes=0: 0 is not a positive integer"),
])
def test_errors_are_one_line_without_traceback(args, code, error, tmp_path):
  workdir = str(tmp_path / "run")
  result = run(*(arg.replace("WORKDIR", workdir) for arg in args))
  assert result.returncode == code, result.stderr[-2000:]
  errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
  assert len(errors) == 1 and errors[0].startswith(error), result.stderr[-2000:]
  assert "Traceback" not in result.stderr
  assert not os.path.exists(workdir)  # Nothing written.


def test_verbose_shows_the_traceback(tmp_path):
  result = run("-m", "mm1_jax.train", TINY, f"--workdir={tmp_path}",
               "--config.data.batch_size=0", "--verbose")
  assert result.returncode == 1
  assert "Traceback" in result.stderr and "Error: data.batch_size" in result.stderr
