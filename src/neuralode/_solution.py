"""What a solve returns: :class:`Solution`."""

from __future__ import annotations

import bisect
from typing import Any

import torch

from ._amp import entry_point
from ._errors import Status
from .solvers.per_sample import PerSampleDense

__all__ = ["Solution"]


class Solution:
    """The result of :func:`solve`.

    Attributes:
        ts: the requested times that were reached (all of them unless the solve failed and
            ``on_failure="return"`` was given).
        ys: the solution at ``ts``, shape ``(len(ts), *y0.shape)`` (a tuple for tuple states).
        stats: :class:`~neuralode.gradients.common.SolveStats` (``nfe``, ``n_steps``, ``n_rejected``, and
            ``nfe_backward`` once a backward pass has run).
        status: :class:`~neuralode.Status`; ``message`` says what went wrong, ``t_fail`` where.
        event_t: the event time when ``event_fn`` was given.
    """

    def __init__(self, ts, ys, stats, status, message, t_fail, segments, prob, event_t=None) -> None:
        self.ts, self.ys, self.stats = ts, ys, stats
        self.status, self.message, self.t_fail = status, message, t_fail
        self.event_t = event_t
        self._segments = segments
        self._prob = prob

    @property
    def success(self) -> bool:
        """Whether the solve reached every requested time (``status`` is ``Status.SUCCESS``).

        Always true with ``on_failure="raise"`` (a failure raises instead); with ``on_failure="return"`` a
        false value means ``ts``/``ys`` stop at the last time reached and ``message``/``t_fail`` say why.
        """
        return self.status == Status.SUCCESS

    @entry_point
    def interpolate(self, t_new) -> Any:
        """The dense output at any times inside the solved interval (shape ``(len(t_new), *y0.shape)``).

        Uses each step's continuous extension (or cubic Hermite), so it costs no evaluations of ``func``. After a
        per-sample solve ``t_new`` may also be ``(batch, K)``, each sample's own times inside its own interval.
        """
        if self._segments is None:
            if self._prob is not None and self._prob.method == "auto" and hasattr(self, "sample_stats"):
                raise RuntimeError(
                    "per-sample solves with method='auto' keep no dense output; ask for the times you need in `t`"
                )
            if self._prob is not None and self._prob.options.get("compile"):
                raise RuntimeError(
                    "this solution keeps no dense output: the compiled solver (compile=True) does not keep its "
                    "steps; solve without compile=True to interpolate"
                )
            raise RuntimeError(
                "this solution keeps no dense output: call solve(..., dense=True) (gradient='adjoint' and "
                "compile=True keep none by default, so that memory does not grow with the number of steps)"
            )
        if isinstance(self._segments, PerSampleDense):  # per-sample solve: (K,) or (batch, K) times
            ys = self._segments(t_new)
            return self._prob.unflatten(ys.reshape(ys.shape[0], -1))
        if not self._segments:
            raise RuntimeError("no step was taken (a single requested time): nothing to interpolate")
        t_list = torch.as_tensor(t_new, dtype=torch.float64).detach().cpu().reshape(-1).tolist()
        segs = self._segments
        direction = 1.0 if segs[-1].t1 >= segs[0].t0 else -1.0
        lo, hi = sorted((segs[0].t0, segs[-1].t1))
        starts = [direction * s.t0 for s in segs]
        rows = []
        for tq in t_list:
            if not (lo <= tq <= hi):
                raise ValueError(f"`t_new` holds {tq}, outside the solved interval [{lo}, {hi}]")
            k = max(0, min(len(segs) - 1, bisect.bisect_right(starts, direction * tq) - 1))
            rows.append(segs[k]([tq])[0])
        return self._prob.unflatten(torch.stack(rows))
