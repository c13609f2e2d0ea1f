"""Gradients of event times: the implicit function theorem at a located zero of ``event_fn``, joint and per
sample, including the event function's own parameters."""

from __future__ import annotations

from typing import Callable

import torch

from ._amp import full_precision
from ._problem import Problem
from .gradients.common import first_order_only

__all__ = ["event_time", "per_sample_event_time", "guard_value"]


class _EventTime(torch.autograd.Function):
    """The event times of a batch of samples (one row each), differentiable by the implicit function theorem.

    With gᵦ(tᵦ*, yᵦ(tᵦ*), θ) = 0: dt*/dθ = −(∂g/∂y · ∂y/∂θ + ∂g/∂θ) / (∂g/∂t + ∂g/∂y · f(t*, y*)) (Chen, Amos &
    Nickel 2021, "Learning neural event functions for ODEs", ICLR; the ∂g/∂θ term through ``guard``). The state
    returned at the event moves with t*, so its total sensitivity is folded in: the state's incoming gradient
    becomes ``grad_y − ψ ∂g/∂y / (∂g/∂t + ∂g/∂y · f)`` with ``ψ = grad_t + grad_y · f``, per sample.
    ``guard_of(t (B,), y (B, n)) -> (B,)`` is the crossing guard (row b depends on sample b only) and
    ``field(t, y) -> (B, n)`` the dynamics; ``mask`` (optional, ``(B,)`` bool): only those samples' times are
    event times, the others pass through."""

    @staticmethod
    def forward(ctx, guard_of, field, t_event, y_event, guard, mask=None):
        ctx.guard_of, ctx.field, ctx.guard_shape = guard_of, field, guard.shape
        ctx.save_for_backward(t_event, y_event, mask)
        return t_event.clone(), y_event.clone()

    @staticmethod
    @full_precision
    def backward(ctx, grad_t: torch.Tensor, grad_y: torch.Tensor):
        first_order_only("", "the event time's gradient")
        t_event, y_event, mask = ctx.saved_tensors
        with torch.enable_grad():
            tt = t_event.detach().to(device=y_event.device, dtype=y_event.dtype).requires_grad_(True)
            yy = y_event.detach().requires_grad_(True)
            dg_dt, dg_dy = torch.autograd.grad(ctx.guard_of(tt, yy).sum(), (tt, yy), allow_unused=True)
        dg_dt = torch.zeros_like(tt) if dg_dt is None else dg_dt
        dg_dy = torch.zeros_like(yy) if dg_dy is None else dg_dy
        with torch.no_grad():
            f = ctx.field(tt.detach(), y_event)
            denom = dg_dt + (dg_dy * f).sum(-1)
            grad_y = torch.zeros_like(y_event) if grad_y is None else grad_y
            psi = (grad_y * f).sum(-1)
            if grad_t is not None:
                psi = psi + grad_t.to(device=yy.device, dtype=yy.dtype)
            if mask is not None:  # (samples without an event: their time is not an event time)
                denom = torch.where(mask, denom, torch.ones_like(denom))
                psi = torch.where(mask, psi, torch.zeros_like(psi))
            gy = grad_y - (psi / denom)[:, None] * dg_dy
        d_guard = (-(psi / denom)).reshape(ctx.guard_shape) if ctx.needs_input_grad[4] else None
        return None, None, None, gy, d_guard, None


def per_sample_event_time(prob: Problem, sign0, comp, t_event, y_event, guard, mask=None) -> tuple:
    """``(t_event, y_event)`` of a per-sample solve (``(B,)`` and ``(B, n)``) with their event-time gradients:
    guard ``comp[b]`` of ``event_fn`` (times ``sign0``, ``(B, k)``) crossed by sample ``b``."""
    B = y_event.shape[0]
    shape = (B, *prob.shape[1:])

    def guard_of(tt, yy):
        return (prob.event_fn(tt, yy.view(shape)).reshape(B, -1) * sign0).gather(1, comp[:, None])[:, 0]

    def field(tt, yy):
        return prob.func(tt, yy.view(shape)).reshape(B, -1)

    return _EventTime.apply(guard_of, field, t_event, y_event, guard, mask)


def event_time(prob: Problem, comp: int, sign: float, t_event, y_event, guard) -> tuple:
    """``(t_event, y_event)`` of a joint solve (0-d and the flat state) with their event-time gradients: entry
    ``comp`` of ``event_fn``'s output, times ``sign``, crossed at ``t_event``."""
    rhs, at = prob.rhs(), float(t_event)

    def guard_of(tt, yy):
        return (prob.event_fn(tt[0], prob.unflatten(yy[0])).reshape(-1)[comp] * sign)[None]

    def field(tt, yy):
        return rhs.at(at, yy[0])[None]

    t1, y1 = _EventTime.apply(guard_of, field, t_event.reshape(1), y_event[None], guard)
    return t1[0], y1[0]


def guard_value(g: Callable, t_event: torch.Tensor, y_event: torch.Tensor) -> torch.Tensor:
    """The event function's value at the located event, as a function of its own parameters only (time and
    state detached): an input of the event-time Functions, through which the implicit function theorem's
    dt*/dθ = −(∂g/∂θ) / (dg/dt) reaches the tensors ``event_fn`` uses (their backward returns −ψ/(dg/dt) for
    it). Zero-sized where nothing ``event_fn`` uses requires grad."""
    if not torch.is_grad_enabled():
        return torch.zeros(0)
    with torch.enable_grad():
        value = g(t_event.detach(), y_event.detach())
    return value if value.requires_grad else torch.zeros(0)
