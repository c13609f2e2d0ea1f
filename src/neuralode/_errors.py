"""Exceptions and solve statuses.

Numerical failure inside the integration loop is first recorded as a :class:`Status` together with the
time at which it happened; at the public boundary it becomes one of the exceptions below (or, on request,
is returned on the solution object).
"""

from __future__ import annotations

import enum
import os
import sys

import torch

__all__ = [
    "Status",
    "SolverError",
    "StepSizeUnderflowError",
    "MaxStepsError",
    "NonFiniteStateError",
]

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep


def caller_stacklevel() -> int:
    """The ``stacklevel`` that points a warning at the user's line: the first frame outside this package and
    torch (the entry points are wrapped, so the depth varies)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and any(p in frame.f_code.co_filename for p in (_PACKAGE_DIR, _TORCH_DIR)):
        frame, level = frame.f_back, level + 1
    return level


class Status(enum.Enum):
    """Outcome of a solve (``Solution.status``; ``SolverError.status``).

    Attributes:
        SUCCESS: every requested time was reached.
        MAX_STEPS: more steps than ``options["max_num_steps"]`` (:class:`MaxStepsError`).
        DT_UNDERFLOW: the adaptive step size became too small to advance (:class:`StepSizeUnderflowError`).
        NONFINITE: the state or ``func``'s output became NaN or infinite (:class:`NonFiniteStateError`).
        EVENT: the solve stopped at an event (``event_fn``).
    """

    SUCCESS = "success"
    MAX_STEPS = "max_num_steps exceeded"
    DT_UNDERFLOW = "step size underflow"
    NONFINITE = "non-finite state"
    EVENT = "terminated by event"


class SolverError(RuntimeError):
    """Base class of numerical failures during a solve.

    Attributes:
        t: the time the solver had reached when it failed (a float), or ``None``.
        status: the :class:`Status` describing the failure.
    """

    status = Status.SUCCESS

    def __init__(self, message: str, t: float | None = None):
        super().__init__(message)
        self.t = t


class StepSizeUnderflowError(SolverError):
    """The adaptive step size fell below what floating point (or ``min_step``) allows."""

    status = Status.DT_UNDERFLOW


class MaxStepsError(SolverError):
    """More steps were attempted than ``max_num_steps`` allows."""

    status = Status.MAX_STEPS


class NonFiniteStateError(SolverError):
    """The state (or ``func``'s output) became NaN or infinite."""

    status = Status.NONFINITE


_EXCEPTIONS = {
    Status.DT_UNDERFLOW: StepSizeUnderflowError,
    Status.MAX_STEPS: MaxStepsError,
    Status.NONFINITE: NonFiniteStateError,
}


def exception_for(status: Status, message: str, t: float | None) -> SolverError:
    return _EXCEPTIONS[status](message, t)
