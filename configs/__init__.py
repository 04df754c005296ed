"""Experiment configs: each file's get_config(arg) describes one experiment."""
