"""The environment of the commands tests start: XLA flags without JAX imported."""

import os

# LLVM at -O0: compiling dominates the suite's CPU time (~40% less), and the
# programs run for a few steps only.
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def one_device_env(**extra: str) -> dict[str, str]:
  """This process's environment with one CPU device (a command started from a
  test needs no 8 virtual devices) and fast compiles."""
  return {**os.environ, "XLA_FLAGS": FAST_COMPILE_FLAGS, **extra}
