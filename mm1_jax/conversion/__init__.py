"""Converters from external checkpoints to mm1_jax parameter trees."""
