"""Checkpointing in a memory budget: which states an adaptive solve keeps, and how its backward pass rebuilds
the others.

The forward pass does not know how many steps it will take, so the states it keeps are chosen online: a new
state is always kept, and once ``budget`` states are held one of them is given up by the dynamic rule of Wang,
Moin & Iaccarino (2009), "Minimal repetition dynamic checkpointing algorithm for unsteady adjoint calculation",
SIAM J. Sci. Comput. 31(4):2549–2567: every checkpoint has a level; the initial state's is infinite; when a
checkpoint is overwritten without anything dispensable, the new one gets the old level plus one and every
checkpoint with a lower level than the old one becomes dispensable; a dispensable slot (the most recent one
first) is reused at level zero.

The backward pass walks the gaps between kept states from the last, and reverses each with the slots the
later gaps have freed, by binomial checkpointing (Griewank 1992, "Achieving logarithmic growth of temporal
and spatial complexity in reverse automatic differentiation", Optim. Methods Softw. 1(1):35–54; Griewank &
Walther 2000, "Algorithm 799: revolve", ACM TOMS 26(1):19–45): with ``c`` slots, ``β(c, r) = C(c + r, c)`` steps
can be reversed advancing each step at most ``r`` times, by advancing ``β(c, r − 1)`` steps, keeping that state
and reversing the rest with ``c − 1`` slots before the first part with ``c``.

The grid of accepted steps (a few numbers per step) is always kept, so a recomputed step is the forward's step
with its size and position, never a new run of the step-size controller.
"""

from __future__ import annotations

import math
from typing import Callable, Generic, TypeVar

import torch

__all__ = ["OnlineCheckpoints", "reverse_steps"]

T = TypeVar("T")


class OnlineCheckpoints(Generic[T]):
    """At most ``budget`` states of a sequence of unknown length: ``add(i, state)`` for i = 0, 1, 2, …"""

    def __init__(self, budget: int) -> None:
        if budget < 1:
            raise ValueError(f"the checkpoint budget must be at least 1, got {budget}")
        self.budget = budget
        self.states: dict[int, T] = {}
        self._level: dict[int, float] = {}
        self._dispensable: set[int] = set()

    def add(self, i: int, state: T) -> None:
        if i == 0 or self.budget == 1:
            if i == 0:
                self.states[0], self._level[0] = state, math.inf
            return
        if len(self.states) < self.budget:
            self.states[i], self._level[i] = state, 0
            return
        if self._dispensable:
            old = max(self._dispensable)
            self._dispensable.discard(old)
            level = 0
        else:
            old = max(self.states)
            if old == 0:  # (budget 1: only the initial state)
                return
            level = self._level[old] + 1
            self._dispensable.update(k for k, lv in self._level.items() if lv < self._level[old] and k != old)
        del self.states[old], self._level[old]
        self.states[i], self._level[i] = state, level


def _beta(c: int, r: int) -> int:
    return math.comb(c + r, c)


def reverse_steps(
    n: int,
    states: dict[int, T],
    budget: int,
    advance: Callable[[int, T], T],
    pull: Callable[[int, T], None],
) -> None:
    """Call ``pull(i, y_i)`` for i = n − 1, …, 0, where ``y_{i+1} = advance(i, y_i)`` and ``states`` holds
    ``y_i`` for some i (0 among them). ``states`` is consumed; at most ``budget`` states are held at once,
    besides the input and output of the step being taken."""
    keys = sorted(states)
    if not keys or keys[0] != 0:
        raise ValueError("reverse_steps: the initial state must be among the checkpoints")
    ends = keys[1:] + [n]
    for k in reversed(range(len(keys))):
        lo, hi = keys[k], ends[k]
        if hi > lo:
            _reverse(lo, hi, states.pop(lo), max(budget - k, 1), advance, pull)
        else:
            states.pop(lo)


def _reverse(lo: int, hi: int, y_lo, c: int, advance, pull) -> None:
    """Reverse steps lo … hi − 1 from ``y_lo`` holding at most ``c`` states (``y_lo`` among them)."""
    while hi > lo:
        length = hi - lo
        if length <= c + 1 or c == 1:
            if length <= c + 1:  # every state fits: advance once, then pull in reverse
                ys = [y_lo]
                for i in range(lo, hi - 1):
                    ys.append(advance(i, ys[-1]))
                for i in reversed(range(lo, hi)):
                    pull(i, ys.pop())
                return
            for i in reversed(range(lo, hi)):  # one slot: from y_lo again for every step
                y = y_lo
                for k in range(lo, i):
                    y = advance(k, y)
                pull(i, y)
            return
        r = 1
        while _beta(c, r) < length:
            r += 1
        j = max(1, min(_beta(c, r - 1), length - 1))
        y = y_lo
        for k in range(lo, lo + j):
            y = advance(k, y)
        _reverse(lo + j, hi, y, c - 1, advance, pull)
        hi = lo + j


class BudgetTrace:
    """The trace list of a checkpointed forward solve (``run(..., trace=)``, the per-sample loops): every record
    is kept, with its state (at position ``at``) replaced by None unless :class:`OnlineCheckpoints` keeps it;
    ``budget`` None keeps every state. Record 0 keeps its state (the initial state is always kept)."""

    def __init__(self, budget: int | None, at: int = 2) -> None:
        self.budget, self.at = budget, at
        self.records: list = []
        self.kept: OnlineCheckpoints = OnlineCheckpoints(budget if budget is not None else 1)
        self.all_states: dict[int, object] | None = {} if budget is None else None
        self.held_bytes = self.peak_bytes = 0

    def append(self, record: tuple) -> None:
        i, y = len(self.records), record[self.at]
        if torch.is_tensor(y) and y._base is not None and y._base.numel() > y.numel():
            y = y.clone()  # (a view into the compiled loop's block of attempts would keep the whole block)
            record = record[: self.at] + (y,) + record[self.at + 1 :]
        if i:
            record = record[: self.at] + (None,) + record[self.at + 1 :]
        self.records.append(record)
        if self.all_states is not None:
            self.all_states[i] = y
        else:
            before = set(self.kept.states)
            self.kept.add(i, y)
            if i not in self.kept.states:
                return
            gone = before - set(self.kept.states)
            self.held_bytes -= len(gone) * _nbytes(y)
        self.held_bytes += _nbytes(y)
        self.peak_bytes = max(self.peak_bytes, self.held_bytes)

    def extend(self, records) -> None:
        for r in records:
            self.append(r)

    def clear(self) -> None:
        self.__init__(self.budget, self.at)

    def states(self) -> dict:
        """The kept states by record index (to hand to :func:`reverse_steps`)."""
        return dict(self.all_states if self.all_states is not None else self.kept.states)

    def grid_bytes(self) -> int:
        """What the records hold besides the states (step times, sizes, flags)."""
        return sum(_nbytes(x) for r in self.records[1:] for x in r)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i):
        return self.records[i]

    def __iter__(self):
        return iter(self.records)

    def __bool__(self) -> bool:
        return bool(self.records)


def _nbytes(x) -> int:
    return x.numel() * x.element_size() if hasattr(x, "element_size") else 8 * (x is not None)
