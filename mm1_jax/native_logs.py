"""Known harmless lines of native (C++) libraries, filtered from stderr.

TensorFlow's C++ runtime writes to file descriptor 2 directly, past Python's
logging, so the only way to keep its known noise off a researcher's console
is to capture the descriptor around the code that triggers it and pass on
every other line. Only short, bounded stretches are captured (never a whole
run): a crash inside one still prints, after the stretch.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile

# TensorFlow's start-up on every CPU machine: INFO lines, and the ERROR of its
# CUDA probe on a machine without an NVIDIA driver.
STARTUP_NOISE = re.compile(
    r"(^WARNING: All log messages before absl::InitializeLog\(\) is called"
    r"|^I0000 .*\] "
    r"|cuda_platform\.cc:\d+\] failed call to cuInit"
    r"|^To enable the following instructions: .* rebuild TensorFlow)")

# Closing a training stream: TFDS caches the small bundled datasets in memory
# and tf.data warns, per cached dataset, that a repeated stream stopped before
# reading the cache to its end, which is what stopping at num_steps means.
PARTIAL_CACHE_READ = re.compile(
    r"cache_dataset_ops\.cc:\d+\] The calling iterator did not fully read the dataset being "
    r"cached")


@contextlib.contextmanager
def filtered(noise: re.Pattern, enabled: bool = True):
  """Captures file descriptor 2 inside the block, then prints every captured
  line that `noise` does not match (real warnings and errors stay)."""
  if not enabled:
    yield
    return
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as captured:
    os.dup2(captured.fileno(), 2)
    try:
      yield
    finally:
      os.dup2(saved, 2)
      os.close(saved)
      captured.seek(0)
      for line in captured.read().decode(errors="replace").splitlines():
        if not noise.search(line):
          print(line, file=sys.stderr)
