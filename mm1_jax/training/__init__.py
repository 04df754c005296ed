"""Training: optimizer and learning-rate schedule, losses."""
