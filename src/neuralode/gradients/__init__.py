"""How gradients flow through a solve.

- ``backprop``: autograd records every operation of the solver (discretise-then-optimise).
- ``adjoint``: the continuous adjoint of Chen et al. (2018), Algorithm 1: a plain solve forward, an augmented
  ODE backwards; memory independent of the number of steps.
- ``checkpoint``: the exact gradient of the discrete solve (as backprop) keeping one state per accepted step
  and recomputing one step's graph at a time.

``solve(gradient=...)`` takes the modes' names or the objects of ``modes`` (``Backprop()``, ``Adjoint(...)``,
``Checkpoint(...)``), which carry their settings. Each mode drives the same integration loop; the loop itself
knows nothing of gradients.
"""

from .adjoint import adjoint_solve
from .checkpoint import checkpoint_solve
from .common import SolveStats, time_gradient_wrapper
from .modes import Adjoint, Backprop, Checkpoint, Reversible

__all__ = [
    "adjoint_solve",
    "checkpoint_solve",
    "SolveStats",
    "time_gradient_wrapper",
    "Backprop",
    "Adjoint",
    "Checkpoint",
    "Reversible",
]
