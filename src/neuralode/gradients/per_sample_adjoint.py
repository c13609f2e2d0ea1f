"""The adjoint method with per-sample stepping (``solve(..., per_sample=True, gradient="adjoint")``).

Forward: the per-sample loop without a graph. Backward: from each output time to the one before, every sample
solves its own augmented system ``[y, a]`` (``dy/dt = f``, ``da/dt = -aᵀ ∂f/∂y``) with its own steps, error
control on ``y`` and ``a`` per sample. The parameters are shared by the samples, so their integral
``dL/dθ = ∫ aᵀ ∂f/∂θ dt`` cannot be a per-sample state without one copy of θ per sample; it is summed along
the way instead, as the augmented Runge–Kutta step would add it (``g += h Σᵢ bᵢ (-aᵢᵀ ∂f/∂θ)(stage i)``), over
each sample's accepted steps only. That is the joint adjoint with the seminorm of Kidger, Chen & Lyons (2021):
the parameter integral never enters the error estimate.

Cost per backward attempt: the stages' evaluations with their state VJPs (as the joint adjoint), plus the
start point evaluated again where the step before had rejections (otherwise the FSAL stage's graph serves
it), and one pass of parameter VJPs through the step's retained stage graphs, weighted by each sample's step
and acceptance. Memory: one step's graphs, not the trajectory.

With ``compile=True`` (FSAL methods) each interval's backward solve runs in the compiled per-sample loop
(``compiled.loop``), the augmented dynamics traced into it by ``torch.func.vjp``; the loop streams its attempts
to ``_Compiled``, which adds the parameter integral per chunk of attempts (their stages recomputed without a
graph, then one backward pass through ``func`` at the weighted stages, vmapped over the chunk). The steps are
the eager backward's; the cost is the stages once more, and the memory one chunk of attempts' states.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, Sequence

import torch

from .._amp import full_precision
from ..compiled.cache import CompileCache
from ..compiled.loop import integrate_device_loop
from ..compiled.loop import supports as device_loop_supports
from ..solvers.per_sample import integrate_per_sample
from ..solvers.runge_kutta import combo, tableau_floats
from .common import (
    EAGER_AUG_SECONDS,
    BackwardFlags,
    SolveRecord,
    SolveStats,
    direct_gradients,
    first_order_only,
    raise_on_failure,
    vjp,
    warn_on_drift,
)

__all__ = ["per_sample_adjoint_solve", "PerSampleAdjointConfig"]


@dataclasses.dataclass(frozen=True)
class PerSampleAdjointConfig:
    """The per-sample adjoint's backward solves (``_api._per_sample_adjoint_config``).

    Attributes:
        method: the backward's adaptive Runge–Kutta stepper (``RungeKutta``, dense).
        ctrl: its step-size controller (the integral controller of the per-sample loop).
        rtol, atol: scalar tolerances of each sample's state and adjoint.
        max_num_steps: the most steps of each interval's backward solve.
        first_step: the first step of each interval (None: Hairer's initial step per sample).
        t_out: the output times (a list, or one list per sample).
        backend: the ``torch.compile`` backend of the compiled backward (None: eager).
    """

    method: Any
    ctrl: Any
    rtol: float
    atol: float
    max_num_steps: int
    first_step: float | None
    t_out: list
    backend: str | None = None


class _Augmented:
    """The augmented dynamics ``(t (B,), [y, a] (B, 2d)) -> [f, -aᵀ∂f/∂y]`` for the per-sample loop, and its
    ``quadrature`` hooks: between ``begin`` and ``end`` (one attempted step) the evaluations are that step's
    stages 1, 2, …; stages with a nonzero weight ``bᵢ`` keep their graph until ``end`` adds their parameter
    VJPs, weighted by the accepted samples' steps, to ``g``."""

    def __init__(
        self, func: Callable, shape: torch.Size, wrt: Sequence[torch.Tensor], b: Sequence[float], fsal: bool
    ) -> None:
        self.func, self.shape, self.wrt, self.b = func, shape, list(wrt), list(b)
        # FSAL: the last stage is the next step's first; when every sample still stepping accepted, its graph
        # serves the next step's parameter VJP instead of a fresh evaluation
        self.last = len(self.b) - 1 if fsal and self.wrt else None
        self.carry: tuple | None = None  # (output with its graph, a) of the last accepted stage
        self.B, self.d = shape[0], math.prod(shape[1:])
        self.g = [torch.zeros_like(p) for p in self.wrt]
        self.calls = 0
        self.stage: int | None = None  # the stage being evaluated, None outside an attempt
        self.pending: list = []  # (stage, output with its graph, a)

    def _split(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return z[:, : self.d].reshape(self.shape), z[:, self.d :].reshape(self.shape)

    def __call__(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        y, a = self._split(z.detach())
        i = self.stage
        last = i is not None and i == self.last
        keep = last or (i is not None and i < len(self.b) and self.b[i] != 0 and bool(self.wrt))
        with torch.enable_grad():
            y_ = y.requires_grad_(True)
            out = self.func(t, y_)
            if out.shape != y.shape:
                raise ValueError(f"func returned shape {tuple(out.shape)} for a state of shape {tuple(y.shape)}")
            (vy,) = (
                torch.autograd.grad(out, y_, a, retain_graph=keep, allow_unused=True) if out.requires_grad else (None,)
            )
        if last:
            self.carry = (out, a)
        elif keep:
            self.pending.append((i, out, a))
        if i is not None:
            self.stage = i + 1
        vy = torch.zeros_like(a) if vy is None else vy
        return torch.cat([out.detach().reshape(self.B, self.d), vy.reshape(self.B, self.d).neg_()], 1)

    def begin(self, t: torch.Tensor, z: torch.Tensor) -> None:
        self.stage, self.pending = 1, []
        carry, self.carry = self.carry, None
        if carry is not None and self.b[0] != 0:
            self.pending.append((0, *carry))
        elif self.wrt and self.b[0] != 0:
            # the step's first stage is the previous step's last (or the start's) value, reused without its
            # graph: evaluate it again for the parameter VJP
            y, a = self._split(z.detach())
            self.calls += 1
            with torch.enable_grad():
                self.pending.append((0, self.func(t.to(z.dtype), y), a))

    def end(self, accept: torch.Tensor, dt: torch.Tensor) -> None:
        pending, self.pending, self.stage = self.pending, [], None
        if self.carry is not None and not bool((accept | (dt == 0)).all()):
            self.carry = None  # a sample still stepping was rejected: its next first stage is not this one
        if not pending or not bool(accept.any()):
            return
        w = torch.where(accept, dt, torch.zeros_like(dt)).to(pending[0][2].dtype)
        w = w.view(self.B, *([1] * (len(self.shape) - 1)))
        # g += h Σᵢ bᵢ (-aᵢᵀ ∂f/∂θ): one backward pass through the step's stage graphs
        grads = vjp([out for _, out, _ in pending], self.wrt, [(-self.b[i]) * w * a for i, _, a in pending])
        for acc, gr in zip(self.g, grads):
            if gr is not None:
                acc.add_(gr)


_AUG_CACHE = CompileCache("per_sample_adjoint_dynamics", 32)


class _Compiled:
    """The backward solves in the compiled per-sample loop (``compile=True``): the augmented dynamics
    ``[y, a] -> [f, -aᵀ∂f/∂y]`` (``torch.func.vjp``) traced into its fused attempts, which stream their
    attempts here (``append``). The parameter integral is then added per chunk of attempts: each accepted
    attempt's stages recomputed without a graph, and one backward pass through ``func`` at the stages with a
    nonzero weight, ``Σᵢ bᵢ Σᵦ (-hᵦ) aᵢᵦᵀ f(yᵢᵦ)`` differentiated in θ (``torch.vmap`` over the chunk's
    attempts; one attempt at a time where ``func`` does not vectorise). Memory: one chunk of attempts'
    states."""

    CHUNK = 256  # attempts per quadrature pass, at most
    CHUNK_BYTES = 64 * 2**20  # and their states' bytes

    def __init__(self, func: Callable, shape: torch.Size, wrt: Sequence[torch.Tensor], method, dtype, device):
        self.wrt = list(wrt)
        key = (id(func), tuple(shape), dtype, str(device))
        hit = _AUG_CACHE.get(key, func)  # (one aug per func: the compiled loop is cached per aug)
        if hit is None:
            hit = _AUG_CACHE.put(key, (_make_aug(func, shape), BackwardFlags()), func)
        self.aug, self.flags = hit
        self.quad = _make_quadrature(func, self.aug, shape, method)
        self.S_used = self.quad.stages_used
        self.g = [torch.zeros_like(p) for p in self.wrt]
        self.calls = 0
        self.pending: list = []  # attempts (of any interval: each record stands alone) not yet integrated
        self.nbytes = 0

    def worth(self, z: torch.Tensor, t_out, rows: bool) -> bool:
        """Whether to run compiled: on CPU, an expensive func (one eager augmented call ≥ 3 ms, e.g.
        convolutions) keeps the eager backward, as the joint adjoint does (``common.EAGER_AUG_SECONDS``);
        decided once per func."""
        if self.flags.eager is None:
            self.flags.eager = False
            if z.device.type == "cpu":
                t = torch.tensor([row[-1] for row in t_out] if rows else [t_out[-1]] * z.shape[0], dtype=z.dtype)
                try:
                    with torch.no_grad():
                        self.aug(t, z)  # (a first call pays one-time setup)
                        start = time.perf_counter()
                        self.aug(t, z)
                    self.flags.eager = time.perf_counter() - start >= EAGER_AUG_SECONDS
                except Exception as exc:  # (a func torch.func cannot transform: the eager backward serves it)
                    from ..compiled.step import _warn_once

                    why = f"{type(exc).__name__}: {exc}"
                    _warn_once(f"compile=True: the per-sample adjoint's backward runs eagerly ({why})")
                    self.flags.eager = True
        return not self.flags.eager

    def append(self, record: tuple) -> None:
        self.pending.append(record)
        self.nbytes += record[2].numel() * record[2].element_size()
        if len(self.pending) >= self.CHUNK or self.nbytes >= self.CHUNK_BYTES:
            self.flush()

    def flush(self) -> None:
        pending, self.pending, self.nbytes = self.pending, [], 0
        if not (self.wrt and pending):
            return
        moved = torch.stack([r[3].any() for r in pending]).tolist()  # (one host read per chunk)
        recs = [r for r, k in zip(pending, moved) if k]
        if not recs:
            return
        self.calls += len(recs) * self.S_used
        with torch.enable_grad():
            if not self.flags.no_vmap:
                try:
                    L = torch.vmap(self.quad)(*(torch.stack([r[i] for r in recs]) for i in range(4))).sum()
                    self._add(vjp(L, self.wrt, None))
                    return
                except Exception:  # (an op vmap does not batch: one attempt at a time from now on)
                    self.flags.no_vmap = True
            for r in recs:
                self._add(vjp(self.quad(*r[:4]), self.wrt, None))

    def _add(self, grads) -> None:
        for acc, gr in zip(self.g, grads):
            if gr is not None:
                acc.add_(gr)


def _make_aug(func: Callable, shape: torch.Size) -> Callable:
    """``(t (B,), [y, a] (B, 2d)) -> [f, -aᵀ∂f/∂y]``, traceable by ``torch.compile``."""
    B, d = shape[0], math.prod(shape[1:])

    def aug(t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        y, a = z[:, :d].reshape(shape), z[:, d:].reshape(shape)
        out, pull = torch.func.vjp(lambda yy: func(t, yy), y)
        (vy,) = pull(a)
        return torch.cat([out.reshape(B, d), vy.reshape(B, d).neg()], 1)

    return aug


def _make_quadrature(func: Callable, aug: Callable, shape: torch.Size, method) -> Callable:
    """``(t, dt, z, accept) -> L`` whose gradient in θ is the attempt's share of the parameter integral,
    ``Σᵢ bᵢ Σᵦ (-hᵦ accepted) aᵢᵦᵀ ∂f/∂θ(tᵢᵦ, yᵢᵦ)``; the stages are recomputed without a graph."""
    tab = method.tableau
    A, c, b, _ = tableau_floats(tab)
    last = max(i for i, v in enumerate(b) if v != 0)  # stages past the last weighted one are not needed
    B, d = shape[0], math.prod(shape[1:])

    def quad(t: torch.Tensor, dt: torch.Tensor, z: torch.Tensor, accept: torch.Tensor) -> torch.Tensor:
        dtype = z.dtype
        with torch.no_grad():
            h = dt.to(dtype)[:, None]
            K, Z = [aug(t.to(dtype), z)], [z]
            for i in range(1, last + 1):
                Z.append(z + h * combo(A[i][:i], K))
                if i < last:
                    K.append(aug((t + c[i] * dt).to(dtype), Z[i]))
        w = torch.where(accept, dt, torch.zeros_like(dt)).to(dtype)[:, None]
        L = None
        for i in range(last + 1):
            if b[i] != 0:
                f = func((t + c[i] * dt).to(dtype), Z[i][:, :d].reshape(shape)).reshape(B, d)
                term = (-b[i]) * (w * Z[i][:, d:] * f).sum()
                L = term if L is None else L + term
        return L

    quad.stages_used = 2 * last + 1 - sum(v == 0 for v in b[: last + 1])  # aug calls and weighted func calls
    return quad


class _PerSampleAdjoint(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        func: Callable,
        forward: Callable,
        cfg: PerSampleAdjointConfig,
        record: SolveRecord,
        y0: torch.Tensor,
        *params: torch.Tensor,
    ):
        with torch.no_grad():
            res, sample_stats = forward(y0.detach())
        record.result, record.sample_stats = res, sample_stats
        ys = res.ys.view(-1, *y0.shape)
        ctx.func, ctx.cfg, ctx.stats = func, cfg, record.stats
        ctx.save_for_backward(ys, *params)
        return ys

    @staticmethod
    @full_precision
    def backward(ctx, grad_ys: torch.Tensor):
        first_order_only("adjoint")
        func, cfg = ctx.func, ctx.cfg
        ys, *params = ctx.saved_tensors
        stats: SolveStats = ctx.stats
        wrt = [p for p in params if p.requires_grad]
        shape = ys.shape[1:]
        B, m = shape[0], ys.shape[0]
        d = math.prod(shape[1:])
        method = cfg.method
        aug = _Augmented(func, shape, wrt, method.tableau.b, method.fsal)
        t_out = cfg.t_out
        rows = isinstance(t_out[0], (list, tuple))
        a = grad_ys[-1]
        # each interval starts with Hairer's initial step per sample (two calls), unless first_step is given:
        # carrying the step sizes over from the interval before was measured to cost more evaluations as
        # often as it saved some (a step cut short to land on an output time proposes a short next step)
        drift_warned = False

        def t_out_of(k: int):  # (for messages: each sample's own times where it has them)
            return [row[k] for row in t_out] if rows else t_out[k]

        fused, use_fused = None, False
        if cfg.backend and device_loop_supports(method, cfg.ctrl):
            fused = _Compiled(func, shape, wrt, method, grad_ys.dtype, grad_ys.device)
            use_fused = fused.worth(torch.cat([ys[-1].reshape(B, d), a.reshape(B, d)], 1), t_out, rows)
        for k in range(m - 1, 0, -1):
            interval = [[row[k], row[k - 1]] for row in t_out] if rows else [t_out[k], t_out[k - 1]]
            z0 = torch.cat([ys[k].reshape(B, d), a.reshape(B, d)], 1)
            aug.carry = None  # (a new interval: its first step starts from a fresh evaluation)
            got = None
            if use_fused:
                saved = ([x.clone() for x in fused.g], list(fused.pending), fused.nbytes)
                with torch.no_grad():
                    got = integrate_device_loop(
                        fused.aug,
                        z0,
                        torch.Size([B, 2 * d]),
                        interval,
                        method,
                        cfg.ctrl,
                        per_sample=True,
                        rtol=cfg.rtol,
                        atol=cfg.atol,
                        first_step=cfg.first_step,
                        max_num_steps=cfg.max_num_steps,
                        backend=cfg.backend,
                        trace=fused,
                    )
                if got is None:  # (compiling failed, warned: the eager backward from here on)
                    (fused.g, fused.pending, fused.nbytes), use_fused = saved, False
                else:
                    res = got[0]
                    fused.calls += got[1]["calls"]
            if got is None:
                with torch.no_grad():
                    res, _ = integrate_per_sample(
                        aug,
                        z0,
                        interval,
                        method,
                        cfg.ctrl,
                        rtol=cfg.rtol,
                        atol=cfg.atol,
                        first_step=cfg.first_step,
                        max_num_steps=cfg.max_num_steps,
                        quadrature=aug,
                    )
            where = f"in the per-sample adjoint's backward solve over output interval {k}: "
            raise_on_failure(res, where)
            stats.n_steps_backward += res.n_steps  # (the most of any sample, as the forward counts)
            stats.n_rejected_backward += res.n_rejected
            z1 = res.ys[-1].view(B, 2 * d)
            if not drift_warned:  # (once per backward pass)
                drift_warned = warn_on_drift(
                    z1[:, :d],
                    ys[k - 1].reshape(B, d),
                    cfg.rtol,
                    cfg.atol,
                    t_out_of(k),
                    t_out_of(k - 1),
                    key=id(func),
                )
            a = z1[:, d:].reshape(shape) + grad_ys[k - 1]
        stats.nfe_backward += aug.calls
        if fused is not None:  # (the compiled backward's share)
            fused.flush()
            stats.nfe_backward += fused.calls
            for acc, gr in zip(aug.g, fused.g):
                acc.add_(gr)
        grads = iter(aug.g)
        p_grads = [next(grads) if p.requires_grad else None for p in params]
        return (None, None, None, None, a, *direct_gradients(params, p_grads))


def per_sample_adjoint_solve(
    func: Callable,
    forward: Callable,
    y0: torch.Tensor,
    params: Sequence[torch.Tensor],
    cfg: PerSampleAdjointConfig,
    record: SolveRecord,
) -> torch.Tensor:
    """``ys (m, batch, ...)`` from ``forward(y0) -> (result, per-sample statistics)`` (a solve without a graph),
    differentiated by the per-sample adjoint, whose backward solves ``cfg`` describes. The forward's result and
    statistics are left in ``record.result`` and ``record.sample_stats``; the backward adds its cost to
    ``record.stats``."""
    return _PerSampleAdjoint.apply(func, forward, cfg, record, y0, *params)
