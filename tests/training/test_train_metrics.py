"""The console line of the training metrics."""

from mm1_jax.training import metrics


def test_format_duration():
  assert metrics.format_duration(59) == "0m59s"
  assert metrics.format_duration(3600 + 125) == "1h02m"
