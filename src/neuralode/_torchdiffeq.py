"""The torchdiffeq-compatible interface: ``odeint``, ``odeint_adjoint``, ``odeint_event`` and ``odeint_dense``,
each a thin layer over :func:`neuralode.solve`."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from ._amp import entry_point
from ._api import _params_of, solve
from ._convert import needs_conversion, solver_problem
from ._errors import Status, exception_for
from ._problem import prepare, run

__all__ = ["odeint", "odeint_adjoint", "odeint_event", "odeint_dense"]


@entry_point
def odeint(
    func: Callable,
    y0: Any,
    t: Any,
    *,
    rtol: Any = 1e-7,
    atol: Any = 1e-9,
    method: str | None = None,
    options: dict | None = None,
    event_fn: Callable | None = None,
):
    """Integrate ``dy/dt = func(t, y)`` and return the solution at ``t`` (torchdiffeq's ``odeint``).

    Gradients flow by backprop through the solver (autograd records every step); use :func:`odeint_adjoint`
    for constant memory, or :func:`solve` for the other gradient modes, statistics and dense output.

    Arguments:
        func: ``func(t, y) -> dy/dt``, ``t`` a 0-d tensor of the state's dtype, the result shaped like ``y``
            (an ``nn.Module`` or any callable).
        y0: the initial state: a floating-point (or complex) tensor of any shape, batch dimensions included,
            or a tuple of such tensors (``func`` then takes and returns tuples).
        t: 1-D tensor of strictly increasing or strictly decreasing times; ``t[0]`` is the initial time.
        rtol, atol: relative and absolute tolerances of the adaptive methods (floats, or tensors broadcastable
            to the state for per-component tolerances).
        method: one of ``neuralode.METHODS`` (default ``"dopri5"``).
        options: method options with torchdiffeq's names, e.g. ``{"step_size": 0.1}`` for fixed-step
            methods, ``{"max_num_steps": 10000, "first_step": 1e-3}`` for adaptive ones.
        event_fn: stop at the first zero crossing of ``event_fn(t, y)`` (see :func:`odeint_event`).

    Returns:
        the solution at every time of ``t``: shape ``(len(t), *y0.shape)``, ``y0``'s dtype and device (a
        tuple of such tensors for a tuple state). With ``event_fn``: ``(event_t, ys)``, where ``ys`` holds the
        state at ``t[0]`` and at the event.

    Raises:
        ValueError: bad input (``t`` not strictly monotonic, an unknown method or option, ...).
        TypeError: ``y0`` or ``t`` not a floating-point tensor, ``func`` returning the wrong shape.
        SolverError: the solve failed: :class:`StepSizeUnderflowError`, :class:`MaxStepsError` or
            :class:`NonFiniteStateError`.

    Example:
        >>> ys = odeint(lambda t, y: -y, torch.ones(2), torch.linspace(0, 1, 3))
        >>> ys.shape
        torch.Size([3, 2])
    """
    if event_fn is not None:
        sol = solve(func, y0, t, method=method, rtol=rtol, atol=atol, options=options, dense=False, event_fn=event_fn)
        return sol.event_t, sol.ys
    if needs_conversion(y0):
        func, y0, rtol, atol, _, conv = solver_problem(func, y0, rtol, atol, None)
        return conv.to_user(odeint(func, y0, t, rtol=rtol, atol=atol, method=method, options=options))
    prob = prepare(func, y0, t, rtol, atol, method, options)
    if prob.t.requires_grad and torch.is_grad_enabled():
        return solve(func, y0, t, method=method, rtol=rtol, atol=atol, options=options, dense=False).ys
    rhs = prob.rhs()
    res = run(prob, rhs, use_event=False)
    if res.status != Status.SUCCESS:
        raise exception_for(res.status, res.message, res.t_fail)
    return prob.unflatten(res.ys)


def odeint_adjoint(
    func: Callable,
    y0: Any,
    t: Any,
    *,
    rtol: Any = 1e-7,
    atol: Any = 1e-9,
    method: str | None = None,
    options: dict | None = None,
    event_fn: Callable | None = None,
    adjoint_rtol: Any = None,
    adjoint_atol: Any = None,
    adjoint_method: str | None = None,
    adjoint_options: dict | None = None,
    adjoint_params: Sequence[torch.Tensor] | None = None,
):
    """``odeint`` with gradients by the adjoint sensitivity method (torchdiffeq's ``odeint_adjoint``).

    The backward pass solves the adjoint ODE backwards in time (Chen et al. 2018, Algorithm 1), so memory does
    not grow with the number of steps; the gradient is the continuous one, accurate to the tolerances. It
    reaches ``y0``, the parameters and every entry of ``t``.

    Arguments:
        func, y0, t, rtol, atol, method, options, event_fn: as for :func:`odeint`. ``func`` must be an
            ``nn.Module`` (its parameters are differentiated) unless ``adjoint_params`` is given.
        adjoint_rtol, adjoint_atol, adjoint_method, adjoint_options: the backward solve (default: the
            forward's); ``adjoint_options={"norm": "seminorm"}`` leaves the parameter gradients out of its
            error control, which usually saves steps.
        adjoint_params: the tensors to differentiate (``()`` when ``func`` has none).

    Returns:
        as :func:`odeint`: shape ``(len(t), *y0.shape)``, or ``(event_t, ys)`` with ``event_fn``.

    Raises:
        TypeError: ``func`` is not an ``nn.Module`` and no ``adjoint_params`` were given, or
            ``adjoint_params`` is not a sequence of tensors; or bad input, as for :func:`odeint`.
        ValueError: bad input, as for :func:`odeint`.
        SolverError: the forward or the backward solve failed.

    Example:
        >>> field = torch.nn.Linear(2, 2)
        >>> ys = odeint_adjoint(lambda t, y: field(y), torch.ones(4, 2), torch.tensor([0.0, 1.0]),
        ...                     adjoint_params=tuple(field.parameters()))
        >>> ys[-1].sum().backward(); field.weight.grad.shape
        torch.Size([2, 2])
    """
    params = _params_of(func, adjoint_params, "adjoint_params")
    sol = solve(
        func,
        y0,
        t,
        method=method,
        rtol=rtol,
        atol=atol,
        options=options,
        gradient="adjoint",
        params=params,
        adjoint_rtol=adjoint_rtol,
        adjoint_atol=adjoint_atol,
        adjoint_method=adjoint_method,
        adjoint_options=adjoint_options,
        dense=False,
        event_fn=event_fn,
    )
    if event_fn is not None:
        return sol.event_t, sol.ys
    return sol.ys


def odeint_event(
    func: Callable,
    y0: Any,
    t0: Any,
    *,
    event_fn: Callable,
    reverse_time: bool = False,
    odeint_interface: Callable = odeint,
    **kwargs,
):
    """Integrate from ``t0`` until ``event_fn(t, y)`` crosses zero (torchdiffeq's ``odeint_event``).

    The crossing is located by root finding on the solver's continuous extension, to a few ulps of ``t``.
    ``event_t`` is differentiable (implicit function theorem) and so is the state at the event.

    Arguments:
        func: ``func(t, y) -> dy/dt``, as for :func:`odeint`.
        y0: the initial state (a tensor of any shape, or a tuple of tensors).
        t0: the initial time (a number or a 0-d / one-element tensor).
        event_fn: ``event_fn(t, y)`` returning a 0-d tensor; the solve stops where it first changes sign.
        reverse_time: integrate towards decreasing ``t``.
        odeint_interface: :func:`odeint` (backprop) or :func:`odeint_adjoint`.
        **kwargs: passed on to ``odeint_interface`` (``rtol``, ``atol``, ``method``, ``options``,
            ``adjoint_params``, ...).

    Returns:
        ``(event_t, ys)``: ``event_t`` a 0-d tensor (float64 when ``t0`` is a Python number), ``ys`` of shape
        ``(2, *y0.shape)`` holding the state at ``t0`` and at the event (a tuple for a tuple state).

    Raises:
        SolverError: the solve failed before the event (e.g. :class:`MaxStepsError` when the event is never
            reached).

    Example:
        >>> t_hit, ys = odeint_event(lambda t, y: -y, torch.tensor([1.0]), 0.0,
        ...                          event_fn=lambda t, y: y[0] - 0.5)
        >>> round(t_hit.item(), 6)   # log 2
        0.693147
    """
    t0 = torch.as_tensor(t0, dtype=torch.float64) if not torch.is_tensor(t0) else t0
    t0 = t0.reshape(-1)[:1]
    t = torch.cat([t0, t0.detach() + (-1.0 if reverse_time else 1.0)])
    return odeint_interface(func, y0, t, event_fn=event_fn, **kwargs)


def odeint_dense(
    func: Callable,
    y0: Any,
    t0: Any,
    t1: Any,
    *,
    rtol: Any = 1e-7,
    atol: Any = 1e-9,
    method: str | None = None,
    options: dict | None = None,
) -> Callable:
    """Solve on ``[t0, t1]`` and return a function ``t -> y(t)`` evaluating the dense output anywhere there.

    Evaluating the returned function costs no evaluations of ``func``: it uses each step's continuous
    extension (4th order for dopri5/tsit5), as ``Solution.interpolate`` does.

    Arguments:
        func, y0, rtol, atol, method, options: as for :func:`odeint`.
        t0, t1: the interval (numbers or 0-d tensors); ``t1 < t0`` integrates backwards.

    Returns:
        a function of ``t`` (a number, a 0-d tensor or a 1-D tensor of times inside ``[t0, t1]``) returning
        the state at ``t``: shape ``y0.shape`` for a scalar time, ``(len(t), *y0.shape)`` for a 1-D tensor.

    Raises:
        SolverError: the solve failed.

    Example:
        >>> y = odeint_dense(lambda t, y: -y, torch.ones(2), 0.0, 1.0)
        >>> y(0.5).shape, y(torch.tensor([0.1, 0.2, 0.3])).shape
        (torch.Size([2]), torch.Size([3, 2]))
    """
    t0 = torch.as_tensor(t0, dtype=torch.float64).reshape(())
    t1 = torch.as_tensor(t1, dtype=torch.float64).reshape(())
    sol = solve(func, y0, torch.stack([t0, t1]), method=method, rtol=rtol, atol=atol, options=options, dense=True)

    def dense_output(t_eval):
        scalar = not torch.is_tensor(t_eval) or t_eval.ndim == 0
        out = sol.interpolate(torch.as_tensor(t_eval).reshape(-1))
        return out[0] if scalar else out

    return dense_output
