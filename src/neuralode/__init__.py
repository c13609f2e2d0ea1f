"""neuralode: neural ordinary differential equations in PyTorch.

The public API (everything else is private)::

    ys = neuralode.odeint(func, y0, t, rtol=1e-7, atol=1e-9, method="dopri5", options=None)
    ys = neuralode.odeint_adjoint(func, y0, t, ...)
    t_event, ys = neuralode.odeint_event(func, y0, t0, event_fn=...)
    sol = neuralode.solve(func, y0, t, method="tsit5", gradient="adjoint")
"""

from . import compiled, models, nn  # subpackages: neuralode.nn.ODEBlock, neuralode.models.LatentODE
from ._api import solve
from ._errors import MaxStepsError, NonFiniteStateError, SolverError, Status, StepSizeUnderflowError
from ._hybrid import Event
from ._methods import METHODS, register_method
from ._solution import Solution
from ._torchdiffeq import odeint, odeint_adjoint, odeint_dense, odeint_event
from .gradients.common import SolveStats
from .gradients.modes import Adjoint, Backprop, Checkpoint, Reversible
from .solvers.tableaus import ButcherTableau

__version__ = "0.1.0"

__all__ = [
    "nn",
    "models",
    "compiled",
    "odeint",
    "odeint_adjoint",
    "odeint_event",
    "odeint_dense",
    "solve",
    "Solution",
    "SolveStats",
    "Backprop",
    "Adjoint",
    "Checkpoint",
    "Reversible",
    "Event",
    "METHODS",
    "register_method",
    "ButcherTableau",
    "Status",
    "SolverError",
    "StepSizeUnderflowError",
    "MaxStepsError",
    "NonFiniteStateError",
]
