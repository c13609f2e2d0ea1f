"""Experiments: functions with every hyperparameter a keyword argument; the CLI is a thin layer on top."""
