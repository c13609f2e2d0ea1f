"""Data generated in code (and, later, readers for data that packages ship)."""

from .spirals import cubic_spiral_trajectory

__all__ = ["cubic_spiral_trajectory"]
