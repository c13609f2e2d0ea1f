"""Pieces shared by the gradient modes: statistics, the per-solve record, gradients with respect to the times."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import torch

__all__ = [
    "SolveStats",
    "SolveRecord",
    "time_gradient_wrapper",
    "raise_on_failure",
    "warn_on_drift",
    "vjp",
    "direct_gradients",
    "EAGER_AUG_SECONDS",
    "BackwardFlags",
    "recomputed_backward",
]

#: on CPU, an adjoint backward whose augmented dynamics take this long (seconds) per eager call runs eagerly
#: under ``compile=True`` (joint and per-sample adjoint alike): Inductor's kernels for the vector-Jacobian
#: products of an expensive func (convolutions, GroupNorm) were measured no faster than eager ones
EAGER_AUG_SECONDS = 3e-3


def vjp(outputs, inputs, grad_outputs, *, create_graph: bool = False) -> tuple:
    """``torch.autograd.grad`` for the vector-Jacobian products of a backward pass (adjoint, checkpoint).

    The graph is retained: ``func`` may use tensors computed before the solve from the tensors being
    differentiated (a spline's coefficients from data that requires grad, a weight shared by stacked solves).
    Every product of the backward pass walks that shared history, so none of them may free it; it is freed with
    the tensors that hold it. Unused inputs get ``None``, and so does everything when no output depends on
    anything that requires grad.
    """
    outs = [outputs] if torch.is_tensor(outputs) else list(outputs)
    gos = [grad_outputs] if torch.is_tensor(outputs) or grad_outputs is None else list(grad_outputs)
    if grad_outputs is None:
        gos = [None] * len(outs)
    keep = [i for i, o in enumerate(outs) if o.requires_grad]
    if not keep:  # (func does not depend on what is differentiated: a field of t alone)
        return tuple(None for _ in (inputs if isinstance(inputs, (list, tuple)) else [inputs]))
    return torch.autograd.grad(
        [outs[i] for i in keep],
        inputs,
        [gos[i] for i in keep],
        allow_unused=True,
        retain_graph=True,
        create_graph=create_graph,
    )


def direct_gradients(
    params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None], create_graph: bool = False
) -> list:
    """What a backward pass returns for ``params`` so that every path through ``func`` is counted once.

    The vector-Jacobian products give each parameter its *total* gradient, through all of its uses, including
    those through another parameter computed from it (``params=(a, b)`` with ``b = 2 * a``). Autograd then walks
    the history of each returned parameter, so a path through ``b`` would reach ``a`` twice. The gradient that
    flows into each parameter directly is its total less what autograd adds back through the parameters made
    from it: ``D_x = G_x - Σ_y (∂y/∂x)ᵀ D_y``, solved from the last-made parameter to the first (a parameter
    is made after its ancestors, so its node's sequence number is larger). Leaf parameters have no
    ancestors: with none but leaves, this returns ``grads`` as they are.
    """
    made = [i for i, p in enumerate(params) if p.grad_fn is not None and grads[i] is not None]
    if not made:
        return list(grads)
    out = list(grads)
    for i in sorted(made, key=lambda i: params[i].grad_fn._sequence_nr(), reverse=True):
        others = [j for j, p in enumerate(params) if j != i and p.requires_grad and out[j] is not None]
        if not others:
            continue
        back = torch.autograd.grad(
            params[i],
            [params[j] for j in others],
            out[i],
            allow_unused=True,
            retain_graph=True,
            create_graph=create_graph,
        )
        for j, g in zip(others, back):
            if g is not None:
                out[j] = out[j] - g
    return out


@dataclasses.dataclass
class SolveStats:
    """Cost of a solve. ``nfe_backward`` is filled in by the backward pass.

    Attributes:
        nfe: evaluations of ``func`` in the forward solve (the initial-step heuristic included).
        n_steps: accepted steps.
        n_rejected: rejected steps.
        nfe_backward: evaluations of ``func`` (each with a vector–Jacobian product) in the backward pass;
            for ``backprop`` it is the number of recorded evaluations autograd differentiates through.
        n_steps_backward, n_rejected_backward: the adjoint's backward solve (zero for other modes).
        checkpoint_bytes: what ``gradient="checkpoint"`` keeps between the forward and the backward pass (the
            saved states and step data; zero for other modes).
        methods: with ``method="auto"``, which method ran over which interval of the forward solve: a list of
            ``(name, t_start, t_end)``; empty for other methods.
    """

    nfe: int = 0
    n_steps: int = 0
    n_rejected: int = 0
    nfe_backward: int = 0
    n_steps_backward: int = 0
    n_rejected_backward: int = 0
    checkpoint_bytes: int = 0
    methods: list = dataclasses.field(default_factory=list)

    def __getitem__(self, key: str) -> int:
        return getattr(self, key)

    def as_dict(self) -> dict:
        """The counts as a plain ``dict`` (field name → int), e.g. to log as JSON."""
        return dataclasses.asdict(self)


@dataclasses.dataclass
class SolveRecord:
    """What one solve's forward pass hands back to its caller (``_api``) and on to its backward pass.

    Attributes:
        stats: the solve's :class:`SolveStats`, which the backward pass adds its cost to.
        dense: keep each step's interpolant (joint stepping).
        result: the forward's integration result (``solvers.integrate`` / ``solvers.per_sample``); taken
            (and cleared) by the caller, so that the solve object does not keep the outputs alive.
        nfe: evaluations of ``func`` in the forward (joint stepping).
        next_step: the step size the forward proposed last (the adjoint's first backward step).
        sample_stats: per-sample statistics of a per-sample forward.
        checkpoints: the checkpointed gradient's budget of kept states (None: every state).
    """

    stats: SolveStats
    dense: bool = False
    result: Any = None
    nfe: int = 0
    next_step: float | None = None
    sample_stats: dict | None = None
    checkpoints: int | None = None

    def take_result(self) -> Any:
        """The forward's result, no longer held by the record."""
        res, self.result = self.result, None
        return res


@dataclasses.dataclass
class BackwardFlags:
    """What the compiled adjoint backward decided about one func, kept with its augmented dynamics.

    Attributes:
        eager: whether the backward runs eagerly instead (on CPU, an augmented call of at least
            ``EAGER_AUG_SECONDS``, or a func that ``torch.func`` cannot transform); None until measured.
        no_vmap: the per-sample quadrature integrates one attempt at a time (``torch.vmap`` failed on func).
    """

    eager: bool | None = None
    no_vmap: bool = False


def time_gradient_wrapper(
    t: torch.Tensor,
    y0: torch.Tensor,
    f: Callable[[int, torch.Tensor], torch.Tensor],
    solve: Callable[[torch.Tensor], torch.Tensor],
    batch: int | None = None,
) -> torch.Tensor:
    """Give ``solve`` gradients with respect to every entry of ``t``.

    For the exact flow, ∂y(tᵢ)/∂tᵢ = f(tᵢ, y(tᵢ)) and ∂y(tᵢ)/∂t₀ = -Φ(tᵢ, t₀) f(t₀, y₀). Both are produced by
    autograd from a solve started at ``y0 - δ₀ f(t₀, y₀)`` whose outputs are corrected by ``+ δᵢ f(tᵢ, yᵢ)``,
    where ``δ = t - t.detach()`` is zero in value and one in derivative. The values are untouched.

    ``batch``: per-sample solves of a ``(batch, ...)`` state, ``ys`` of shape ``(m, batch, ...)``, with ``t``
    shared (1-D: a time's gradient sums over the samples) or one row per sample (``(batch, m)``).
    """
    delta = _TimeShift.apply(t - t.detach()).to(device=y0.device, dtype=y0.dtype)  # t may live on the CPU
    if batch is None:  # (m, 1): one time for the whole flat state
        delta = delta.reshape(-1, 1)
    else:  # (m, batch, 1, ...): each sample its own time
        rows = delta if delta.ndim == 2 else delta.expand(batch, -1)
        delta = rows.t().reshape(-1, batch, *([1] * (y0.ndim - 1)))
    f0 = f(0, y0).detach()
    ys = solve(y0 - delta[0] * f0)
    m = ys.shape[0]
    fs = torch.stack([f0] + [f(i, ys[i].detach()).detach() for i in range(1, m)])
    return ys + delta[:m] * fs


def raise_on_failure(res, where: str = "") -> None:
    from .._errors import Status, exception_for

    if res.status not in (Status.SUCCESS, Status.EVENT):
        message = res.message
        if "adjoint" in where:  # the backward solve takes its settings from adjoint_options and has no partial result
            message = (
                message.replace("options['", "adjoint_options['")
                .replace(", loosen rtol/atol, or pass", " or loosen adjoint_rtol/adjoint_atol; or pass")
                .replace("; or pass on_failure='return' to solve() to keep the partial solution", "")
            )
        raise exception_for(res.status, where + message, res.t_fail)


#: when the adjoint's backward re-solve of the state has drifted from the forward solution at an output time
#: by more than DRIFT_WARN[0] relative to the state (RMS of |Δy| / (|y| + atol/rtol), the error control's
#: scale) and by more than DRIFT_WARN[1] times rtol, or by more than DRIFT_WARN[2] (the state is then lost
#: whatever the tolerance), a warning says the gradients are unreliable. Measured
#: (drift, relative and in multiples of rtol): 1e-7 and 1–2 on an MLP field and a harmonic oscillator at
#: rtol 1e-7; 1e-4 and ~1e3 on van der Pol at μ = 2 (gradients then off by ~1e-4); 0.05 and 5e4 on a mildly
#: stiff system with Rosenbrock steps at rtol 1e-6 (gradients within 1e-3); 0.10–0.16 and 100–160 on the
#: ODE-Net at rtol 1e-3 (the paper's setting, which trains well); 0.43 and 4e6 on van der Pol at μ = 8,
#: rtol 1e-7, where the adjoint's dt*/dμ of the first zero crossing is -3e9 against backprop's 0.78
DRIFT_WARN = (0.1, 1e6, 1.0)
_DRIFT_WARNED: set = set()


def warn_on_drift(y_back: torch.Tensor, y_fwd: torch.Tensor, rtol, atol, t_from, t_to, key=None) -> bool:
    """Warn (once per ``key``, e.g. per func; returns True) when the adjoint's backward solve, started from the
    forward solution at ``t_from``, reaches ``t_to`` with a state ``y_back`` far from the forward solution
    ``y_fwd`` there: re-solving a contracting flow backwards amplifies errors, and the adjoint's gradients,
    computed along that drifting state, are then wrong. Rows of a 2-D ``y_back`` are samples (the per-sample
    adjoint), each measured on its own; ``t_from``/``t_to`` are then floats or one per sample."""
    import warnings

    if key is not None and key in _DRIFT_WARNED:
        return True
    with torch.no_grad():
        scaled = (y_back - y_fwd) / (y_fwd.abs() + atol / rtol)
        rows = scaled if scaled.ndim == 2 else scaled.reshape(1, -1)
        drift = rows.square().mean(1).sqrt()
        worst = int(torch.nan_to_num(drift, nan=float("inf")).argmax())
        rel = float(drift[worst])
        factor = rel / float(torch.as_tensor(rtol).max())
    if not ((rel <= DRIFT_WARN[0] or factor <= DRIFT_WARN[1]) and rel <= DRIFT_WARN[2]):  # (NaN included)
        if key is not None:
            _DRIFT_WARNED.add(key)
        sample = f" (sample {worst} of the batch)" if scaled.ndim == 2 else ""
        if isinstance(t_from, (list, tuple)):
            t_from, t_to = t_from[worst], t_to[worst]
        warnings.warn(
            f"the adjoint's backward solve from t={t_from:.6g} to t={t_to:.6g} re-solved the state{sample} "
            f"{rel:.3g} (relative; {factor:.2g}× rtol) away from the forward solution: the dynamics contract too "
            "strongly (dissipative or stiff) for the state to be recovered backwards, and the gradients may be "
            "wrong; use gradient='backprop' or 'checkpoint' for this problem (said once per func)",
            RuntimeWarning,
            stacklevel=4,
        )
        return True
    return False


def recomputed_backward(forward: Callable, y0: torch.Tensor, params: Sequence[torch.Tensor], grad_ys: torch.Tensor):
    """The backward of a checkpointed or reversible solve when autograd asks for a graph of the gradient
    (``create_graph=True``: a Hessian-vector product, a second derivative). Those backward passes rebuild one
    step at a time from states saved without a graph, so their result has no graph to differentiate; instead
    the forward is run again from ``y0`` with its graph (``forward(y0) -> ys``: the same steps, as backprop
    takes them) and differentiated with ``create_graph=True``. Exact to any order, with backprop's memory.
    Returns (the gradient for ``y0`` or None, one per parameter or None)."""
    with torch.enable_grad():
        wrt = [p for p in params if p.requires_grad]
        inputs = ([y0] if y0.requires_grad else []) + wrt
        got = iter(torch.autograd.grad(forward(y0), inputs, grad_ys, create_graph=True, allow_unused=True))
        g0 = next(got) if y0.requires_grad else None
        grads = [next(got) if p.requires_grad else None for p in params]
        if g0 is not None and y0.grad_fn is not None and wrt:
            # a parameter that y0 was computed from got its path through y0 in its total above, and autograd
            # will add it again through the gradient returned for y0: keep only its direct part
            back = torch.autograd.grad(y0, wrt, g0, allow_unused=True, retain_graph=True, create_graph=True)
            it = iter(back)
            grads = [g if not p.requires_grad else _minus(g, next(it)) for p, g in zip(params, grads)]
        grads = direct_gradients(params, grads, create_graph=True)
    out = [torch.zeros_like(p) if p.requires_grad and g is None else g for p, g in zip(params, grads)]
    return g0, out


def _minus(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if b is None:
        return a
    return -b if a is None else a - b


def first_order_only(mode: str, what: str | None = None) -> None:
    """Called first in the backward of an autograd Function whose gradients carry no graph of their own (the
    adjoint's, the checkpoint's, an event time's, the times' shift). Autograd runs that backward with grad mode
    on exactly when the caller asked for ``create_graph=True``; a second derivative through it would come out
    as zero or wrong without a word. Raise instead, saying what supports higher derivatives."""
    if torch.is_grad_enabled():
        what = what or f"gradient={mode!r}"
        raise RuntimeError(
            f"{what} gives first derivatives only: a second derivative through it (backward with "
            "create_graph=True, a Hessian-vector product) would be silently wrong. Use gradient='backprop', "
            "'checkpoint' or 'reversible' (a reversible method), with times and event times that do not require "
            "grad: they differentiate the solver's operations to any order"
        )


class _TimeShift(torch.autograd.Function):
    """The identity on ``t - t.detach()``, whose backward refuses ``create_graph=True``: the times' gradient
    (``time_gradient_wrapper``) is exact to first order only."""

    @staticmethod
    def forward(ctx, delta: torch.Tensor) -> torch.Tensor:
        return delta.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        first_order_only("", "the gradient with respect to t")
        return grad
