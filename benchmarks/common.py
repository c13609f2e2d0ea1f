"""Shared helpers for the benchmark scripts (they live in the package: ``neuralode.experiments.bench``)."""

from neuralode.experiments.bench import (  # noqa: F401
    Counted,
    MLPField,
    best_time,
    machine,
    median_time,
    save_json,
    torchode_solver,
)
