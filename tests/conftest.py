"""Test session set-up: 8 virtual CPU devices, before JAX is imported.

Compiling dominates the suite's CPU time, so every test and every command
it starts (they inherit the environment) compiles with LLVM at -O0
(process_env.py) and shares one persistent compilation cache for the run:
a program compiled again (the same tiny model in another test or process)
is read back instead. Both are set only where the caller did not set them.
"""

import atexit
import os
import shutil
import tempfile

from process_env import FAST_COMPILE_FLAGS

os.environ.setdefault("JAX_PLATFORMS", "cpu")
xla_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in xla_flags:
  xla_flags += " --xla_force_host_platform_device_count=8"
if "xla_backend_optimization_level" not in xla_flags:
  xla_flags += " " + FAST_COMPILE_FLAGS
os.environ["XLA_FLAGS"] = xla_flags.strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# The controller (or a run without xdist) makes the cache; xdist workers and
# the commands tests start inherit it. Removed when the controller exits.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="mm1_jax_test_jit_cache_")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)

import jax  # noqa: E402  (must come after XLA_FLAGS)

jax.config.update("jax_default_matmul_precision", "highest")

# The files that take longest (minutes each: real training processes, 8-device
# compiles) start first, so the two xdist workers (`--dist loadfile`) finish
# together instead of one running them alone at the end.
SLOW_FILES_FIRST = (
    "tests/launch/test_launch_local.py",
    "tests/test_train.py",
    "tests/training/test_trainer.py",
    "tests/test_workdir_io.py",
    "tests/training/test_lora_training.py",
    "tests/test_ablate.py",
)


def pytest_collection_modifyitems(config, items):
  rank = {path: index for index, path in enumerate(SLOW_FILES_FIRST)}
  relative = lambda item: os.path.relpath(str(item.path), str(config.rootpath))
  # A stable sort: the other files, and the tests in each file, keep their order.
  items.sort(key=lambda item: rank.get(relative(item), len(rank)))
