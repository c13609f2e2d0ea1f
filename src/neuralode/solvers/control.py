"""Error norms, the initial step heuristic and the step-size controller.

The step computes an error estimate; only this module decides what to do with it.

Error per step (Hairer, Nørsett & Wanner I, eq. II.4.11)::

    ratio = ‖ err / (atol + rtol · max(|y0|, |y1|)) ‖ ≤ 1  ⇒ accept

with ‖·‖ the RMS norm by default. The next step is ``dt · factor`` with (a PI controller in the form of
diffrax's ``PIDController``; ``pcoeff = 0, icoeff = 1`` is torchdiffeq's integral controller, the default)::

    factor = safety · ratio_n^(-(pcoeff + icoeff)/k) · ratio_{n-1}^(pcoeff/k),   k = method order,

clipped to ``[dfactor, ifactor]`` after a rejection and to ``[1, ifactor]`` after an acceptance (an accepted
step never shrinks the next one, as in torchdiffeq).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

__all__ = ["StepController", "rms_norm", "rms_rows", "initial_step", "initial_steps"]

SAFETY = 0.9
IFACTOR = 10.0
DFACTOR = 0.2
#: ratio floor used when an error estimate is exactly zero (avoids 0 ** negative)
_MIN_RATIO = 1e-10


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    """Root mean square of all entries."""
    return torch.linalg.vector_norm(x) / math.sqrt(max(x.numel(), 1))


class StepController:
    """Accept/reject decisions and step-size proposals.

    Works on Python floats here; the formula uses only arithmetic and ``min``/``max`` so that a tensor
    version (per-sample step sizes, a compiled step) is the same expression.
    """

    def __init__(
        self,
        order: int,
        *,
        safety: float = SAFETY,
        ifactor: float = IFACTOR,
        dfactor: float = DFACTOR,
        pcoeff: float = 0.0,
        icoeff: float = 1.0,
        min_step: float = 0.0,
        max_step: float = math.inf,
    ) -> None:
        for name, value in (("safety", safety), ("ifactor", ifactor), ("dfactor", dfactor)):
            if not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
                raise ValueError(f"option `{name}` must be a positive finite number, got {value!r}")
        if safety > 1:
            raise ValueError(
                f"option `safety` must be at most 1, got {safety!r}: above 1, a rejected step can be retried at the "
                "same size forever (the usual values are 0.8-0.9)"
            )
        if dfactor > 1 or ifactor < 1:
            raise ValueError(f"options need dfactor <= 1 <= ifactor, got dfactor={dfactor}, ifactor={ifactor}")
        if not 0 <= min_step <= max_step:
            raise ValueError(f"options need 0 <= min_step <= max_step, got min_step={min_step}, max_step={max_step}")
        self.k = float(order)
        self.safety, self.ifactor, self.dfactor = float(safety), float(ifactor), float(dfactor)
        self.beta1 = (pcoeff + icoeff) / self.k
        self.beta2 = pcoeff / self.k
        self.min_step, self.max_step = float(min_step), float(max_step)
        self.prev_ratio = 1.0

    def reset(self) -> None:
        self.prev_ratio = 1.0

    def next_step(self, dt: float, ratio: float, accepted: bool) -> float:
        """Size of the next attempted step (same sign as ``dt``), given this step's error ratio."""
        r = max(ratio, _MIN_RATIO)
        if accepted:
            if ratio == 0.0:
                factor = self.ifactor
            else:
                factor = self.safety * r ** (-self.beta1) * self.prev_ratio**self.beta2
                factor = min(self.ifactor, max(1.0, factor))
            self.prev_ratio = r
        else:
            factor = min(1.0, max(self.dfactor, self.safety * r ** (-1.0 / self.k)))
        new = abs(dt) * factor
        new = max(min(new, self.max_step), self.min_step)
        return math.copysign(new, dt)


def initial_step(
    func: Callable[[float, torch.Tensor], torch.Tensor],
    t0: float,
    y0: torch.Tensor,
    f0: torch.Tensor,
    direction: float,
    order: int,
    rtol,
    atol,
    norm: Callable[[torch.Tensor], float],
    y0_abs: torch.Tensor | None = None,
    tol_shift: torch.Tensor | None = None,
) -> tuple[float, int]:
    """Hairer's starting step (HNW I, §II.4 "Starting step size"); costs one evaluation of ``func``.

    ``order`` is the power of h in the local error estimate (p for a pair of orders p(p-1); the controller's
    exponent is 1/order), and the step solves ``h^order · max(d1, d2) = 0.01``, as Hairer's codes do (HINIT
    in DOPRI5 and DOP853, IORD = 5 and 8); scipy and torchdiffeq use the same exponent, so the first step is
    theirs.

    ``y0_abs`` (|y0|) and ``tol_shift`` (atol/rtol as a 0-d tensor) may be passed where the caller has them.

    Returns:
        (step size with the sign of ``direction``, number of function evaluations used)
    """
    # scale = atol + rtol·|y0|. With scalar tolerances it is built as |y0| + atol/rtol and the 1/rtol
    # folded into the (float) norms afterwards: tensor ⊕ Python scalar is a slow path in eager PyTorch on
    # CPU (about twice a tensor ⊕ 0-d tensor), and this runs once per solve.
    if isinstance(rtol, float) and isinstance(atol, float) and rtol > 0:
        if tol_shift is None:
            tol_shift = torch.scalar_tensor(atol / rtol, dtype=y0.dtype, device=y0.device)
        scale = y0.abs().add_(tol_shift) if y0_abs is None else torch.add(y0_abs, tol_shift)
        unit = 1.0 / rtol
    else:
        scale = (y0.abs() if y0_abs is None else y0_abs).mul(rtol).add_(atol)
        unit = 1.0
    d0 = norm(y0 / scale) * unit
    d1 = norm(f0 / scale) * unit  # (the norm may be a user's callable: kept as two calls)
    h0 = 1e-6 if (d0 < 1e-5 or d1 < 1e-5) else 0.01 * d0 / d1
    y1 = torch.add(y0, f0, alpha=direction * h0)
    f1 = func(t0 + direction * h0, y1)
    d2 = norm(torch.sub(f1, f0).div_(scale)) * unit / h0
    if max(d1, d2) <= 1e-15:
        h1 = max(1e-6, h0 * 1e-3)
    else:
        h1 = (0.01 / max(d1, d2)) ** (1.0 / order)
    h = min(100 * h0, h1)
    if not math.isfinite(h) or h <= 0:
        h = 1e-6
    return direction * h, 1


def rms_rows(x: torch.Tensor) -> torch.Tensor:
    """Per-sample RMS norm of a (batch, d) tensor, in float64 as the joint loop's Python floats."""
    return (torch.linalg.vector_norm(x, dim=1) / math.sqrt(max(x.shape[1], 1))).double()


def initial_steps(
    f, t, y, f0, direction: float, order: int, rtol: float, atol: float, fold_rtol: bool = False
) -> torch.Tensor:
    """Hairer's starting step (``initial_step``) for each row of ``y`` (batch, d) on its own;
    ``f(t (batch,) float64, y)`` evaluates the batch. Positive step sizes, float64. Written in tensor
    operations only, so that the compiled loop traces it as it is.

    ``fold_rtol``: build the scale as ``|y| + atol/rtol`` and fold ``1/rtol`` into the norms, as
    :func:`initial_step` does with scalar tolerances (one row: the joint solve's first step, to the bit);
    otherwise ``atol + rtol·|y|``, as the per-sample loop does."""
    dtype = y.dtype
    unit = 1.0 / rtol if fold_rtol else 1.0
    scale = y.abs() + atol / rtol if fold_rtol else y.abs() * rtol + atol
    d0, d1 = rms_rows(y / scale) * unit, rms_rows(f0 / scale) * unit
    h0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), torch.full_like(d0, 1e-6), 0.01 * d0 / d1)
    f1 = f(t + direction * h0, y + (direction * h0).to(dtype)[:, None] * f0)
    d2 = rms_rows((f1 - f0) / scale) * unit / h0
    dmax = torch.maximum(d1, d2)
    h1 = torch.where(dmax <= 1e-15, torch.clamp(h0 * 1e-3, min=1e-6), (0.01 / dmax) ** (1.0 / order))
    dt = torch.minimum(100 * h0, h1)
    return torch.where(torch.isfinite(dt) & (dt > 0), dt, torch.full_like(dt, 1e-6))
