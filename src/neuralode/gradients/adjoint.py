"""The adjoint sensitivity method (Chen, Rubanova, Bettencourt & Duvenaud 2018, Algorithm 1).

Forward: a plain solve without a graph. Backward: the augmented state ``[y, a, g]`` with

    dy/dt = f(t, y, θ),   da/dt = -aᵀ ∂f/∂y,   dg/dt = -aᵀ ∂f/∂θ

is solved from each observation time to the one before, starting from the forward solution there; the
adjoint ``a`` jumps by the incoming gradient at every observation. Gradients with respect to the times are
``dL/dtᵢ = ∂L/∂yᵢ · f(tᵢ, yᵢ)`` and ``dL/dt₀ = -a(t₀)·f(t₀, y₀)``. Memory does not grow with the number of steps.

The seminorm (Kidger, Chen & Lyons 2021, "Hey, that's not an ODE") measures the backward step's error on
``y`` and ``a`` only, ignoring the parameter integrals ``g``, which never feed back into the dynamics.
"""

from __future__ import annotations

import dataclasses
import functools
import time
import types
from typing import Any, Callable, Sequence

import torch

from .._amp import full_precision
from .._problem import Problem, run, valid_options
from ..compiled.cache import CompileCache, backend_of
from ..solvers.integrate import _callbacks, block_rms_max
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

__all__ = ["adjoint_solve", "AdjointConfig", "CALLBACK_NAMES"]

CALLBACK_NAMES = ("callback_step", "callback_accept_step", "callback_reject_step")


@dataclasses.dataclass(frozen=True)
class AdjointConfig:
    """The adjoint's backward solve, its settings checked and defaulted (``_api._adjoint_config``).

    Attributes:
        rtol, atol: tolerances of the state and the adjoint (floats or per-component tensors).
        method: the method's name.
        options: its options (``norm`` taken out).
        norm: None (the default: RMS of each block, the max over the blocks), ``"seminorm"`` or a callable.
        compile: the forward's ``compile`` setting (False, True or a backend name): where it is set, the
            backward solve runs in the compiled device loop where it can.
    """

    rtol: Any
    atol: Any
    method: str
    options: dict
    norm: Any = None
    compile: bool | str = False


def _real_size(p: torch.Tensor) -> int:
    """Entries of ``p``'s parameter integral in the (real) augmented state: a complex entry takes two."""
    return p.numel() * (2 if p.is_complex() else 1)


def _as_real_flat(v: torch.Tensor) -> torch.Tensor:
    return (torch.view_as_real(v) if v.is_complex() else v).reshape(-1)


def _from_real(seg: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """A segment of the parameter integral back in ``p``'s shape (and complex, where ``p`` is)."""
    return torch.view_as_complex(seg.reshape(*p.shape, 2)) if p.is_complex() else seg.view_as(p)


class _AdjointSolve(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        prob: Problem,
        cfg: AdjointConfig,
        record: SolveRecord,
        y0: torch.Tensor,
        t: torch.Tensor,
        *params: torch.Tensor,
    ):
        rhs = prob.rhs()
        with torch.no_grad():
            res = run(prob, rhs, y0=y0.detach(), keep_segments=record.dense, use_event=False)
        record.result = res
        record.next_step = res.next_step
        record.nfe = rhs.nfe
        # the backward pass needs the problem's settings, not its initial state: keep a stand-in of the same
        # shape, dtype and device (one element of memory) so that the graph does not hold y0 alive
        ctx.prob = dataclasses.replace(prob, y0=prob.y0.new_zeros(()).expand(prob.y0.shape))
        ctx.cfg, ctx.record = cfg, record
        ctx.save_for_backward(res.ys, t, *params)
        return res.ys

    @staticmethod
    @full_precision
    def backward(ctx, grad_ys: torch.Tensor):
        first_order_only("adjoint")
        prob, cfg, record = ctx.prob, ctx.cfg, ctx.record
        ys, t, *params = ctx.saved_tensors
        stats: SolveStats = record.stats
        wrt = [p for p in params if p.requires_grad]
        m, n = ys.shape
        t_out = prob.t_out[:m]
        rhs_plain = prob.rhs()
        sizes = [_real_size(p) for p in wrt]
        n_g = sum(sizes)
        dtype = ys.dtype

        def aug_func(tt: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
            y, a = z[:n], z[n : 2 * n]
            # an implicit method differentiates the augmented dynamics itself (its Newton Jacobian): then the
            # vector-Jacobian products are built on the graph (second derivatives of func)
            graph = z.requires_grad
            with torch.enable_grad():
                y_ = y if graph else y.detach().requires_grad_(True)
                f = rhs_plain(tt, y_)
                vjps = vjp(f, [y_] + wrt, -a, create_graph=graph)
            parts = [f if graph else f.detach(), vjps[0] if vjps[0] is not None else torch.zeros_like(a)]
            for p, v in zip(wrt, vjps[1:]):
                parts.append(_as_real_flat(v).to(dtype) if v is not None else z.new_zeros(_real_size(p)))
            return torch.cat(parts)

        def aug_into(tt: torch.Tensor, z: torch.Tensor, out: torch.Tensor) -> None:
            y, a = z[:n], z[n : 2 * n]
            with torch.enable_grad():
                y_ = y.detach().requires_grad_(True)
                f = rhs_plain(tt, y_)
                vjps = vjp(f, [y_] + wrt, a)  # negated below, in place
            out[:n].copy_(f.detach())
            del f
            if vjps[0] is None:
                out[n : 2 * n].zero_()
            else:
                out[n : 2 * n].copy_(vjps[0])
            start = 2 * n
            for p, v in zip(wrt, vjps[1:]):
                seg = out[start : start + _real_size(p)]
                seg.zero_() if v is None else seg.copy_(_as_real_flat(v))
                start += _real_size(p)
            out[n:].neg_()  # d a/dt = -a ∂f/∂y, d g/dt = -a ∂f/∂θ

        aug_prob_rhs = _flat_rhs(aug_func, 2 * n + n_g, dtype, ys.device)
        aug_prob_rhs.into = aug_into
        rtol, atol = _aug_tol(cfg.rtol, n, n_g), _aug_tol(cfg.atol, n, n_g)
        norm = _aug_norm(cfg.norm, prob, n, wrt, ys.device)
        callbacks = _adjoint_callbacks(prob.func)

        a = grad_ys[-1]  # read only (copied into the augmented state)
        # first step of each backward segment: the step size the solver was taking where that segment starts
        # (the forward's last proposal, then each backward segment's), instead of the initial-step heuristic
        # and its extra evaluation
        options = dict(cfg.options)
        adaptive = "first_step" in valid_options(cfg.method) and "step_size" not in options
        carry_step = adaptive and options.get("first_step") is None
        h = record.next_step if carry_step else None
        g = torch.zeros(n_g, dtype=dtype, device=ys.device)
        t_grad = torch.zeros(m, dtype=dtype, device=ys.device) if t.requires_grad else None
        fused = _compiled_segment(prob, cfg, stats, wrt, n, ys) if cfg.compile and m > 1 else None
        # (kept apart: its quadrature holds a share of dL/dθ even if a later segment falls back to eager)
        closure = fused if isinstance(fused, _ClosureSegment) else None
        drift_warned = False
        for i in range(m - 1, 0, -1):
            if t_grad is not None:
                with torch.no_grad():
                    t_grad[i] = torch.dot(rhs_plain.at(t_out[i], ys[i]), grad_ys[i])
            res = None
            if fused is not None:
                with torch.no_grad():
                    z0 = torch.cat([ys[i], a, g])
                    f0 = functools.partial(aug_func, torch.scalar_tensor(t_out[i], dtype=dtype, device=z0.device), z0)
                    res = fused(z0, f0, t_out[i], t_out[i - 1], None if h is None else abs(h))
                if res is None:  # compiling failed (warned) or func is too expensive: eager from here on
                    fused = None
                else:
                    stats.nfe_backward += res.nfe
            if res is None:
                with torch.no_grad():
                    res = run(
                        prob,
                        aug_prob_rhs,
                        y0=torch.cat([ys[i], a, g]),
                        t_out=[t_out[i], t_out[i - 1]],
                        rtol=rtol,
                        atol=atol,
                        norm=norm,
                        method=cfg.method,
                        options=options if h is None else {**options, "first_step": abs(h)},
                        callbacks=callbacks,
                        use_event=False,
                    )
            raise_on_failure(res, f"in the adjoint's backward solve from t={t_out[i]:.6g} to t={t_out[i - 1]:.6g}: ")
            stats.n_steps_backward += res.n_steps
            stats.n_rejected_backward += res.n_rejected
            if carry_step and res.next_step is not None:
                h = res.next_step
            z1 = res.ys[-1]
            if adaptive and not drift_warned:  # (once per backward pass; fixed steps honour no tolerance)
                drift_warned = warn_on_drift(
                    z1[:n], ys[i - 1], cfg.rtol, cfg.atol, t_out[i], t_out[i - 1], key=id(prob.func)
                )
            # copies, not views: a view would keep the whole augmented output (the state part included)
            # alive for as long as the caller holds the gradients
            a, g = z1[n : 2 * n].clone(), z1[2 * n :].clone()
            del z1, res
            if i == 1 and t_grad is not None:
                with torch.no_grad():
                    t_grad[0] = -torch.dot(rhs_plain.at(t_out[0], ys[0]), a)
            a.add_(grad_ys[i - 1])  # a is this function's own copy
        if m == 1:
            a = grad_ys[0]
        if closure is not None and (extra := closure.finish()) is not None:  # its parameter quadrature
            g = g + extra
        stats.nfe_backward += rhs_plain.nfe  # every augmented evaluation calls func once through rhs_plain
        p_grads: list[Any] = []
        offsets = iter(torch.split(g, sizes) if sizes else [])
        for p in params:
            p_grads.append(_from_real(next(offsets), p).to(p.dtype) if p.requires_grad else None)
        if t_grad is not None:
            t_grad = t_grad.to(device=t.device, dtype=t.dtype)
            if len(t) > m:
                t_grad = torch.cat([t_grad, t_grad.new_zeros(len(t) - m)])
        return (None, None, None, a, t_grad, *direct_gradients(params, p_grads))


_AUG_CACHE = CompileCache("adjoint_dynamics", 64)


def _compiled_segment(
    prob: Problem, cfg: AdjointConfig, stats: SolveStats, wrt: Sequence[torch.Tensor], n: int, ys: torch.Tensor
):
    """The backward solve in the compiled device loop (``compile=True``): the augmented dynamics, ``func``
    and its vector-Jacobian products by ``torch.func.vjp``, traced into the fused step. Returns
    ``segment(z0, f0, t_from, t_to, first_step) -> result`` (``f0``: a call giving the dynamics at z0), or
    None, with a one-line warning, where this solve needs what the compiled backward does not do (then the
    eager backward runs). ``segment`` returns None where compiling failed or (on CPU) the dynamics are too
    expensive for the compiled loop to pay."""
    from .._methods import DEFAULT_MAX_NUM_STEPS, get_method, make_controller, stepper
    from ..compiled.loop import integrate_device_loop
    from ..compiled.loop import supports as device_loop_supports
    from ..compiled.step import _warn_once

    module, method, options = prob.func, cfg.method, cfg.options
    names = None
    if isinstance(module, torch.nn.Module):
        by_id = {id(p): name for name, p in module.named_parameters()}
        names = tuple(by_id.get(id(p)) for p in wrt)
    why = None
    if not get_method(method).per_sample:
        why = f"the method {method!r}"
    elif prob.shapes is not None:
        why = "tuple states"
    elif not (isinstance(cfg.rtol, float) and isinstance(cfg.atol, float)):
        why = "tensor tolerances"
    elif cfg.norm not in (None, "seminorm") or {"step_t", "jump_t"} & set(options):
        why = "adjoint norms other than the default and 'seminorm', or step_t/jump_t"
    elif (names is None or None in names) and wrt and cfg.norm != "seminorm":
        why = (
            "parameters that are not the nn.Module func's own, with the default adjoint norm (pass "
            "adjoint_options=dict(norm='seminorm') to run such a backward compiled)"
        )
    elif any(p.dtype != ys.dtype for p in wrt):
        why = "parameters of another dtype than the state"
    elif any(getattr(module, name + "_adjoint", None) is not None for name in CALLBACK_NAMES):
        why = "callbacks"
    rk = ctrl = None
    if why is None:
        rk = stepper(method, 1, ys.dtype, ys.device, "dense")
        ctrl = make_controller(get_method(method).order, options)
        if not device_loop_supports(rk, ctrl):
            why = f"the method {method!r} with these controller options"
    if why is not None:
        _warn_once(f"compile=True: the adjoint's backward solve runs eagerly ({why} not supported compiled)")
        return None
    if names is None or None in names:  # a closure's parameters (or none): [y, a] compiled, θ by quadrature
        return _ClosureSegment(prob, cfg, stats, wrt, n, ys, rk, ctrl)
    sizes = [p.numel() for p in wrt]
    width = 2 * n + sum(sizes)
    starts = [0, n] + [2 * n + sum(sizes[:j]) for j in range(len(sizes))]
    blocks = tuple(zip(starts, [n, n] + sizes))
    if cfg.norm == "seminorm":
        blocks = blocks[:2]
    key = (id(module), names, prob.shape, ys.dtype, str(ys.device))
    hit = _AUG_CACHE.get(key, module)
    if hit is None:
        hit = _AUG_CACHE.put(key, (_make_aug(module, names, prob.shape, n), BackwardFlags()), module)
    aug, speed = hit
    if speed.eager:
        return None
    backend = backend_of(cfg.compile)
    max_steps = int(options.get("max_num_steps", DEFAULT_MAX_NUM_STEPS))

    def segment(z0: torch.Tensor, f0: Callable, t_from: float, t_to: float, first_step: float | None):
        # f0: the augmented dynamics at the segment's start, evaluated eagerly (and counted) by the caller
        f0 = _timed_start(f0, speed, ys.device)
        if f0 is None:
            return None
        got = integrate_device_loop(
            aug,
            z0.reshape(1, -1),
            torch.Size([1, width]),
            [t_from, t_to],
            rk,
            ctrl,
            per_sample=False,
            rtol=cfg.rtol,
            atol=cfg.atol,
            first_step=first_step if options.get("first_step") is None else options["first_step"],
            max_num_steps=max_steps,
            backend=backend,
            f0=f0.reshape(1, -1),
            norm_blocks=blocks,
        )
        if got is None:
            return None
        res, counts = got
        res.nfe = int(counts["nfe"][0])
        return res

    return segment


def _timed_start(f0: Callable, speed: BackwardFlags, device: torch.device) -> torch.Tensor | None:
    """The augmented dynamics at a segment's start (``f0()``), or None where the backward should stay eager.
    An expensive func (convolutions: milliseconds per call) leaves the loop's own overhead negligible, and on
    CPU Inductor's kernels for its vector-Jacobian products were measured slower than eager ones (GroupNorm's
    backward), so such a backward stays eager; decided once per func, by timing this first call."""
    if speed.eager is not None or device.type != "cpu":
        return f0()
    start = time.perf_counter()
    out = f0()
    speed.eager = time.perf_counter() - start >= EAGER_AUG_SECONDS
    return None if speed.eager else out


class _ClosureSegment:
    """The compiled backward of a func whose parameters autograd can reach but ``torch.func`` cannot (a
    closure, or parameters not the module's own), with the seminorm: the device loop solves ``[y, a]`` only
    (``dy/dt = f``, ``da/dt = -aᵀ∂f/∂y``, ``torch.func.vjp`` in ``y``, the parameters constants of the trace),
    error-controlled on both, and streams its attempts to the per-sample adjoint's quadrature
    (``per_sample_adjoint._Compiled`` with one sample), which adds ``dL/dθ = Σ h Σᵢ bᵢ (-aᵢᵀ ∂f/∂θ)`` over the
    accepted steps as the eager seminorm backward does inside its steps. The steps are the eager seminorm
    backward's. ``finish()`` returns the parameter integral (flat) and counts its evaluations."""

    def __init__(self, prob: Problem, cfg: AdjointConfig, stats: SolveStats, wrt, n: int, ys: torch.Tensor, rk, ctrl):
        from .._methods import DEFAULT_MAX_NUM_STEPS
        from .per_sample_adjoint import _Compiled

        func, shape = prob.func, prob.shape
        self.n, self.rk, self.ctrl, self.cfg, self.stats = n, rk, ctrl, cfg, stats
        key = (id(func), "closure", shape, ys.dtype, str(ys.device))
        hit = _AUG_CACHE.get(key, func)
        if hit is None:
            hit = _AUG_CACHE.put(key, (_make_state_aug(func, shape, n), BackwardFlags()), func)
        self.aug, self.speed = hit

        def one_sample(t1: torch.Tensor, y1: torch.Tensor) -> torch.Tensor:  # (1,) times, (1, n) states
            return func(t1.reshape(()), y1.reshape(shape)).reshape(1, n)

        self.quad = _Compiled(one_sample, torch.Size([1, n]), wrt, rk, ys.dtype, ys.device) if wrt else None
        self.backend = backend_of(cfg.compile)
        self.max_steps = int(cfg.options.get("max_num_steps", DEFAULT_MAX_NUM_STEPS))

    def __call__(self, z0: torch.Tensor, f0: Callable, t_from: float, t_to: float, first_step: float | None):
        from ..compiled.loop import integrate_device_loop

        n = self.n
        f0 = _timed_start(f0, self.speed, z0.device)
        if f0 is None:
            return None
        options = self.cfg.options
        got = integrate_device_loop(
            self.aug,
            z0[: 2 * n].reshape(1, -1),
            torch.Size([1, 2 * n]),
            [t_from, t_to],
            self.rk,
            self.ctrl,
            per_sample=False,
            rtol=self.cfg.rtol,
            atol=self.cfg.atol,
            first_step=first_step if options.get("first_step") is None else options["first_step"],
            max_num_steps=self.max_steps,
            backend=self.backend,
            f0=f0[: 2 * n].reshape(1, -1),
            norm_blocks=((0, n), (n, n)),
            trace=self.quad,
        )
        if got is None:
            return None
        res, counts = got
        res.nfe = int(counts["nfe"][0])
        # the parameter part passes through unchanged: the quadrature keeps its own sum (finish)
        res.ys = torch.cat([res.ys, z0[2 * n :].expand(res.ys.shape[0], -1)], 1)
        return res

    def finish(self) -> torch.Tensor | None:
        if self.quad is None:
            return None
        self.quad.flush()
        self.stats.nfe_backward += self.quad.calls
        return torch.cat([g.reshape(-1) for g in self.quad.g])


def _make_state_aug(func: Callable, shape: torch.Size, n: int) -> Callable:
    """``[y, a]`` ↦ ``[f, -aᵀ∂f/∂y]`` on a ``(1, 2n)`` state, traceable by ``torch.compile``."""
    from torch.func import vjp

    def aug(tt: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        y, a = z[:, :n].reshape(shape), z[:, n : 2 * n].reshape(shape)
        out, pull = vjp(lambda yy: func(tt, yy), y)
        (vy,) = pull(a)
        return torch.cat([out.reshape(1, -1), vy.reshape(1, -1).neg()], 1)

    return aug


def _make_aug(module: torch.nn.Module, names: tuple, shape: torch.Size, n: int) -> Callable:
    """``[y, a, g]`` ↦ ``[f, -aᵀ∂f/∂y, -aᵀ∂f/∂θ]`` on a ``(1, width)`` state, traceable by ``torch.compile``."""
    from torch.func import functional_call, vjp

    def aug(tt: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        y, a = z[:, :n].reshape(shape), z[:, n : 2 * n].reshape(shape)

        def f(yy, *ps):
            return functional_call(module, dict(zip(names, ps)), (tt, yy))

        out, pull = vjp(f, y, *(module.get_parameter(name) for name in names))
        grads = pull(a)
        return torch.cat([out.reshape(1, -1)] + [(-v).reshape(1, -1) for v in grads], 1)

    return aug


def _flat_rhs(func: Callable, size: int, dtype: torch.dtype, device: torch.device):
    from ..solvers.integrate import RHS

    return RHS(func, torch.Size([size]), dtype, device)


def _aug_tol(tol: Any, n: int, n_g: int):
    if torch.is_tensor(tol):
        return torch.cat([tol, tol, tol.min().expand(n_g)])
    return tol


def _aug_norm(norm: Any, prob: Problem, n: int, wrt: Sequence[torch.Tensor], device) -> Callable | None:
    if norm is None:
        return block_rms_max([n, n] + [_real_size(p) for p in wrt], device)
    if norm == "seminorm":
        return block_rms_max([n, n], device)
    if callable(norm):
        sizes = [_real_size(p) for p in wrt]

        def user(x: torch.Tensor) -> torch.Tensor:
            y, a, g = x[:n], x[n : 2 * n], x[2 * n :]
            gs = [_from_real(gi, p) for gi, p in zip(torch.split(g, sizes), wrt)] if sizes else []
            return torch.as_tensor(norm((prob.unflatten(y), prob.unflatten(a), *gs)))

        return user
    raise ValueError(f"adjoint_options['norm'] must be 'seminorm' or a callable, got {norm!r}")


def _adjoint_callbacks(func: Any):
    got = _callbacks(func, [name + "_adjoint" for name in CALLBACK_NAMES])
    return types.SimpleNamespace(**{name: cb for name, cb in zip(CALLBACK_NAMES, got) if cb is not None})


def adjoint_solve(
    prob: Problem,
    y0: torch.Tensor,
    t: torch.Tensor,
    params: Sequence[torch.Tensor],
    cfg: AdjointConfig,
    record: SolveRecord,
) -> torch.Tensor:
    """Solve ``prob`` with adjoint gradients. ``cfg``: the backward solve's settings (already defaulted);
    ``record``: the forward leaves its result, evaluations and last proposed step there, and the backward
    adds its cost to ``record.stats``."""
    return _AdjointSolve.apply(prob, cfg, record, y0, t, *params)
