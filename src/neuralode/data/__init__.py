"""Data generated in code (and readers for data that packages ship)."""

from .systems import SYSTEMS, System, observe

__all__ = ["SYSTEMS", "System", "observe"]
