"""Complex states: solved as real ones with the real and imaginary parts side by side (``torch.view_as_real``).

A complex ``y0`` of shape ``s`` becomes a real state of shape ``(*s, 2)``; ``func`` still sees and returns
complex tensors (a wrapper converts both ways), ``event_fn`` sees complex states, and the solution comes back
complex. Error control treats the real and imaginary parts as separate components (the RMS norm over the
``2·numel`` reals, each scaled by its own magnitude), where torchdiffeq and scipy take the modulus of each
entry: the same tolerance asks for about the same accuracy, but the step sequences differ a little.
Gradients pass through the views to ``y0``, ``t`` and func's parameters in every mode.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ._wrap import cached_wrapper


def is_complex_state(y0: Any) -> bool:
    if torch.is_tensor(y0):
        return y0.is_complex()
    return isinstance(y0, (tuple, list)) and any(torch.is_tensor(y) and y.is_complex() for y in y0)


def _real(x: Any) -> Any:
    return torch.view_as_real(x) if torch.is_tensor(x) and x.is_complex() else x


class _Converter:
    """Both directions for one state layout (a tensor, or a tuple with some complex entries). Holds only each
    entry's dtype, so that a cached wrapper keeps no state alive."""

    def __init__(self, y0: Any):
        self.tuple = not torch.is_tensor(y0)
        self.dtypes = tuple(y.dtype for y in y0) if self.tuple else (y0.dtype,)

    def to_real(self, y: Any) -> Any:
        return tuple(_real(v) for v in y) if self.tuple else _real(y)

    def to_complex(self, y: Any) -> Any:
        """A real state (or a stack of them, leading dimensions first) back in the user's layout."""
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
    """A real ``(..., 2)`` tensor back as the complex tensor it stands for (entries that were complex)."""
    return torch.view_as_complex(x.contiguous()) if dtype.is_complex else x


def _forth(o: Any, dtype: torch.dtype) -> Any:
    if not (torch.is_tensor(o) and dtype.is_complex):
        return o
    if not o.is_complex() and o.is_floating_point():  # a real derivative of a complex state: imaginary part 0
        o = o.to(dtype)
    return torch.view_as_real(o) if o.is_complex() else o


def real_problem(func: Callable, y0: Any, rtol: Any, atol: Any, event_fn: Callable | None):
    """The real problem standing for a complex one, and the converter back: ``(func, y0, rtol, atol,
    event_fn, converter)``. ``func`` and its callbacks see the state in the user's (complex) layout."""
    conv = _Converter(y0)

    def call(f, t, y):
        return conv.func_output(f(t, conv.to_complex(y)))

    def adapt(name, value):  # callbacks get the state in the user's layout; a complex Jacobian does not fit
        if name == "jacobian":  # the real view's, so Rosenbrock methods compute their own
            return None
        return lambda t, y, *args: value(t, conv.to_complex(y), *args)

    # (the converter holds only each entry's dtype, so the key determines call and adapt)
    wrapped = cached_wrapper(func, ("complex", conv.dtypes, conv.tuple), call, adapt)
    event = None if event_fn is None else (lambda t, y: event_fn(t, conv.to_complex(y)))
    return wrapped, conv.to_real(y0), _tol(rtol, conv), _tol(atol, conv), event, conv


def _tol(tol: Any, conv: _Converter) -> Any:
    """Per-component tolerances: the real and imaginary parts of an entry share its tolerance."""

    def one(t: Any, dtype: torch.dtype) -> Any:
        return t.unsqueeze(-1) if torch.is_tensor(t) and t.ndim > 0 and dtype.is_complex else t

    if conv.tuple and isinstance(tol, (tuple, list)):
        return type(tol)(one(t, dt) for t, dt in zip(tol, conv.dtypes))
    if conv.tuple:
        return tol
    return one(tol, conv.dtypes[0])


class ComplexSolution:
    """A :class:`Solution` of the real problem, seen in the complex layout (``ys`` and ``interpolate``)."""

    def __init__(self, sol: Any, conv: _Converter):
        self._sol, self._conv = sol, conv
        self.ys = conv.to_complex(sol.ys)

    def interpolate(self, t_new) -> Any:
        return self._conv.to_complex(self._sol.interpolate(t_new))

    def __getattr__(self, name: str) -> Any:  # ts, stats, status, message, t_fail, event_t, sample_stats ...
        return getattr(self._sol, name)

    def __repr__(self) -> str:
        return f"ComplexSolution({self._sol!r})"
