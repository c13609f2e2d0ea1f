"""States solved in another dtype than the user's, with ``func`` still seeing the user's.

- **Complex states** are solved as real ones with the real and imaginary parts side by side
  (``torch.view_as_real``): a complex ``y0`` of shape ``s`` becomes a real state of shape ``(*s, 2)``. Error
  control treats the real and imaginary parts as separate components (the RMS norm over the ``2·numel`` reals,
  each scaled by its own magnitude), where torchdiffeq and scipy take the modulus of each entry: the same
  tolerance asks for about the same accuracy, but the step sequences differ a little.
- **Half-precision states** (bfloat16, float16) are stepped in float32, as autocast users expect: ``func``
  still receives the state (and the time) in the state's dtype and may return it, but the stage sums, the
  error estimate and the time bookkeeping are float32, whose rounding does not swamp the tolerance (stepping in
  bfloat16 returned y(1) = 0.89 for exp(-1) = 0.37 at the default tolerances). The solution is handed back in
  the state's dtype.

``event_fn`` and callbacks see the state in the user's layout, and gradients pass through the conversions to
``y0``, ``t`` and func's parameters in every mode.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ._problem import warn_unresolvable_rtol
from ._wrap import cached_wrapper

#: dtypes stepped in float32 (their unit roundoff, 2^-8 and 2^-11, is above the usual tolerances)
LOW_PRECISION = (torch.bfloat16, torch.float16)


def _converted(dtype: torch.dtype) -> bool:
    return dtype.is_complex or dtype in LOW_PRECISION


def needs_conversion(y0: Any) -> bool:
    """Whether ``y0`` (a tensor or a tuple of them) has an entry that is solved in another dtype."""
    if torch.is_tensor(y0):
        return _converted(y0.dtype)
    return isinstance(y0, (tuple, list)) and any(torch.is_tensor(y) and _converted(y.dtype) for y in y0)


def _solver_side(x: Any) -> Any:
    if not torch.is_tensor(x):
        return x
    if x.is_complex():
        return torch.view_as_real(x)
    return x.float() if x.dtype in LOW_PRECISION else x


class _Converter:
    """Both directions for one state layout (a tensor, or a tuple with some complex entries). Holds only each
    entry's dtype, so that a cached wrapper keeps no state alive."""

    def __init__(self, y0: Any):
        self.tuple = not torch.is_tensor(y0)
        self.dtypes = tuple(y.dtype for y in y0) if self.tuple else (y0.dtype,)

    def to_solver(self, y: Any) -> Any:
        return tuple(_solver_side(v) for v in y) if self.tuple else _solver_side(y)

    def time(self, t: Any) -> Any:
        """The time ``func`` sees: in a half-precision state's dtype (a time-conditioned layer concatenates it
        with the state), else as the solver has it."""
        low = next((dt for dt in self.dtypes if dt in LOW_PRECISION), None)
        return t.to(low) if low is not None and torch.is_tensor(t) and t.is_floating_point() else t

    def to_user(self, y: Any) -> Any:
        """A solver-side state (or a stack of them, leading dimensions first) back in the user's layout."""
        if self.tuple:
            return tuple(_back(v, dt) for v, dt in zip(y, self.dtypes))
        return _back(y, self.dtypes[0])

    def func_output(self, out: Any) -> Any:
        if self.tuple:
            if not isinstance(out, (tuple, list)):
                return out  # (the usual checks say what is wrong)
            return tuple(_forth(o, dt) for o, dt in zip(out, self.dtypes))
        return _forth(out, self.dtypes[0])


def _back(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A solver-side tensor back as the user's entry it stands for."""
    if dtype.is_complex:
        return torch.view_as_complex(x.contiguous())
    return x.to(dtype) if dtype in LOW_PRECISION else x


def _forth(o: Any, dtype: torch.dtype) -> Any:
    """func's output for an entry of dtype ``dtype``, on the solver's side."""
    if not torch.is_tensor(o):
        return o
    if dtype in LOW_PRECISION:
        return o.float() if o.dtype == dtype else o  # (another dtype: the usual checks say what is wrong)
    if not dtype.is_complex:
        return o
    if not o.is_complex() and o.is_floating_point():  # a real derivative of a complex state: imaginary part 0
        o = o.to(dtype)
    return torch.view_as_real(o) if o.is_complex() else o


def solver_problem(func: Callable, y0: Any, rtol: Any, atol: Any, event_fn: Callable | None):
    """The problem the solver sees for one with complex or half-precision entries, and the converter back:
    ``(func, y0, rtol, atol, event_fn, converter)``. ``func`` and its callbacks see the state in the user's
    layout and dtype."""
    conv = _Converter(y0)
    for dtype in conv.dtypes:
        if dtype in LOW_PRECISION:
            warn_unresolvable_rtol(rtol, dtype)

    def call(f, t, y):
        return conv.func_output(f(conv.time(t), conv.to_user(y)))

    def adapt(name, value):  # callbacks get the state in the user's layout; a complex Jacobian does not fit
        if name == "jacobian":  # the solver-side state's, so Rosenbrock methods compute their own
            return None
        return lambda t, y, *args: value(conv.time(t), conv.to_user(y), *args)

    # (the converter holds only each entry's dtype, so the key determines call and adapt)
    wrapped = cached_wrapper(func, ("convert", conv.dtypes, conv.tuple), call, adapt)
    # the precision func computes in: the implicit methods' Newton iterations cannot converge below its rounding
    low = [dt for dt in conv.dtypes if dt in LOW_PRECISION]
    object.__setattr__(wrapped, "eval_dtype", low[0] if low else None)
    event = None if event_fn is None else (lambda t, y: event_fn(conv.time(t), conv.to_user(y)))
    return wrapped, conv.to_solver(y0), _tol(rtol, conv), _tol(atol, conv), event, conv


def _tol(tol: Any, conv: _Converter) -> Any:
    """Per-component tolerances: the real and imaginary parts of an entry share its tolerance."""

    def one(t: Any, dtype: torch.dtype) -> Any:
        return t.unsqueeze(-1) if torch.is_tensor(t) and t.ndim > 0 and dtype.is_complex else t

    if conv.tuple and isinstance(tol, (tuple, list)):
        return type(tol)(one(t, dt) for t, dt in zip(tol, conv.dtypes))
    if conv.tuple:
        return tol
    return one(tol, conv.dtypes[0])


class ConvertedSolution:
    """A :class:`Solution` of the solver-side problem, seen in the user's layout (``ys`` and ``interpolate``)."""

    def __init__(self, sol: Any, conv: _Converter):
        self._sol, self._conv = sol, conv
        self.ys = conv.to_user(sol.ys)

    def interpolate(self, t_new) -> Any:
        return self._conv.to_user(self._sol.interpolate(t_new))

    def __getattr__(self, name: str) -> Any:  # ts, stats, status, message, t_fail, event_t, sample_stats ...
        return getattr(self._sol, name)

    def __repr__(self) -> str:
        return f"ConvertedSolution({self._sol!r})"
