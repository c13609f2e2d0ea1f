"""Gradients of event times: the implicit function theorem at a located zero of ``event_fn``, joint and per
sample, including the event function's own parameters."""

from __future__ import annotations

from typing import Callable

import torch

from ._amp import full_precision
from ._problem import Problem
from .gradients.common import first_order_only

__all__ = ["EventTime", "PerSampleEventTime", "guard_value"]


class PerSampleEventTime(torch.autograd.Function):
    """``EventTime`` for every sample at once: with gᵦ(tᵦ*, yᵦ(tᵦ*)) = 0, the state's incoming gradient gets
    the event time's sensitivity folded in, ``gy = grad_y - ψ ∂g/∂y / (∂g/∂t + ∂g/∂y · f)`` with
    ``ψ = grad_t + grad_y · f``, per sample (row ``b`` of ``event_fn`` depends on sample ``b`` only). ``mask``
    (optional, ``(batch,)`` bool): only those samples' times are event times; the others pass through."""

    @staticmethod
    def forward(ctx, prob: Problem, sign0: torch.Tensor, comp: torch.Tensor, t_event, y_event, guard, mask=None):
        ctx.prob = prob
        ctx.save_for_backward(sign0, comp, t_event, y_event, mask)
        return t_event.clone(), y_event.clone()

    @staticmethod
    @full_precision
    def backward(ctx, grad_t: torch.Tensor, grad_y: torch.Tensor):
        first_order_only("", "the event time's gradient")
        prob = ctx.prob
        sign0, comp, t_event, y_event, mask = ctx.saved_tensors
        B = y_event.shape[0]
        shape = (B, *prob.shape[1:])
        with torch.enable_grad():
            tt = t_event.detach().to(device=y_event.device, dtype=y_event.dtype).requires_grad_(True)
            yy = y_event.detach().requires_grad_(True)
            g = (prob.event_fn(tt, yy.view(shape)).reshape(B, -1) * sign0).gather(1, comp[:, None])
            dg_dt, dg_dy = torch.autograd.grad(g.sum(), (tt, yy), allow_unused=True)
        dg_dt = torch.zeros_like(tt) if dg_dt is None else dg_dt
        dg_dy = torch.zeros_like(yy) if dg_dy is None else dg_dy
        with torch.no_grad():
            f = prob.func(tt.detach(), y_event.view(shape)).reshape(B, -1)
            denom = dg_dt + (dg_dy * f).sum(1)
            grad_y = torch.zeros_like(y_event) if grad_y is None else grad_y
            psi = (grad_y * f).sum(1)
            if grad_t is not None:
                psi = psi + grad_t.to(device=yy.device, dtype=yy.dtype)
            if mask is not None:  # (samples without an event: their time is not an event time)
                denom = torch.where(mask, denom, torch.ones_like(denom))
                psi = torch.where(mask, psi, torch.zeros_like(psi))
            gy = grad_y - (psi / denom)[:, None] * dg_dy
        return None, None, None, None, gy, -(psi / denom) if ctx.needs_input_grad[5] else None, None


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


class EventTime(torch.autograd.Function):
    """Gradient of the event time by the implicit function theorem.

    With g(t*, y(t*), θ) = 0: dt*/dθ = -(∂g/∂y · ∂y/∂θ + ∂g/∂θ) / (∂g/∂t + ∂g/∂y · f(t*, y*)) (Chen, Amos &
    Nickel 2021, "Learning neural event functions for ODEs", ICLR; the ∂g/∂θ term through ``guard``). The
    state returned at the event moves with t*, so its total sensitivity is folded in too.
    """

    @staticmethod
    def forward(ctx, prob: Problem, comp: int, sign: float, t_event: torch.Tensor, y_event: torch.Tensor, guard):
        ctx.prob, ctx.comp, ctx.sign = prob, comp, sign
        ctx.save_for_backward(t_event, y_event)
        return t_event.clone(), y_event.clone()

    @staticmethod
    @full_precision
    def backward(ctx, grad_t: torch.Tensor, grad_y: torch.Tensor):
        first_order_only("", "the event time's gradient")
        prob = ctx.prob
        t_event, y_event = ctx.saved_tensors
        with torch.enable_grad():
            tt = t_event.detach().to(device=y_event.device, dtype=y_event.dtype).requires_grad_(True)
            yy = y_event.detach().requires_grad_(True)
            g = prob.event_fn(tt, prob.unflatten(yy)).reshape(-1)[ctx.comp] * ctx.sign
            dg_dt, dg_dy = torch.autograd.grad(g, (tt, yy), allow_unused=True)
        dg_dt = torch.zeros((), dtype=yy.dtype, device=yy.device) if dg_dt is None else dg_dt
        dg_dy = torch.zeros_like(yy) if dg_dy is None else dg_dy
        with torch.no_grad():
            f = prob.rhs().at(float(t_event), y_event)
            denom = dg_dt + torch.dot(dg_dy, f)
            if grad_y is None:
                grad_y = torch.zeros_like(y_event)
            psi = (0 if grad_t is None else grad_t.to(device=yy.device, dtype=yy.dtype)) + torch.dot(grad_y, f)
            gy = grad_y - psi * dg_dy / denom
        return None, None, None, None, gy, -psi / denom if ctx.needs_input_grad[5] else None
