"""The gradient modes as objects: ``solve(..., gradient=Adjoint(rtol=1e-6))``.

The strings ``"backprop"``, ``"adjoint"`` and ``"checkpoint"`` (with the keyword arguments ``params``,
``adjoint_rtol``, ``adjoint_atol``, ``adjoint_method`` and ``adjoint_options``) name the same modes;
:func:`resolve_gradient` turns either form into one of these objects, once, where a solve starts.
"""

from __future__ import annotations

import dataclasses
import reprlib
from collections.abc import Mapping
from typing import Any, ClassVar, Sequence, Union

import torch

__all__ = ["Backprop", "Adjoint", "Checkpoint", "Reversible", "GradientMode", "GRADIENT_MODES", "resolve_gradient"]

#: the gradient modes' names, as ``solve(gradient=...)`` takes them
GRADIENT_MODES = ("backprop", "adjoint", "checkpoint", "reversible")


@dataclasses.dataclass(frozen=True)
class Backprop:
    """Gradients by autograd through every operation of the solver (discretise-then-optimise).

    The exact gradient of the discrete solve; autograd keeps every step's graph, so memory grows with the
    number of steps. The same as ``gradient="backprop"``, the default of :func:`neuralode.solve`. It reaches
    every tensor ``func`` uses, so it takes no ``params``.

    Attributes:
        name: ``"backprop"``.

    Example:
        ```python
        import torch
        import neuralode

        k = torch.tensor(1.0, requires_grad=True)
        sol = neuralode.solve(lambda t, y: -k * y, torch.ones(2), torch.tensor([0.0, 1.0]),
                              gradient=neuralode.Backprop())
        sol.ys[-1].sum().backward()
        print(k.grad)  # d/dk 2 exp(-k) at k = 1: -2/e
        ```
    """

    name: ClassVar[str] = "backprop"

    def __repr__(self) -> str:
        return _mode_repr(self)


@dataclasses.dataclass(frozen=True)
class Adjoint:
    """The continuous adjoint (Chen, Rubanova, Bettencourt & Duvenaud 2018, Algorithm 1).

    The forward solve keeps no graph; the backward pass solves the adjoint ODE backwards in time, so memory
    does not grow with the number of steps. The gradient is the continuous one, accurate to the backward
    solve's tolerances. ``gradient=Adjoint()`` is ``gradient="adjoint"``; each field is the keyword argument
    of :func:`neuralode.solve` named in brackets.

    Arguments:
        rtol, atol: the backward solve's tolerances (``adjoint_rtol``, ``adjoint_atol``); None: the forward's.
        method: the backward solve's method (``adjoint_method``); None: the forward's.
        options: the backward solve's options (``adjoint_options``); with the forward's method they add to
            and override the forward's options. ``options["norm"]`` may be ``"seminorm"`` or a callable on the
            scaled error ``(y, a, *parameter integrals)``.
        seminorm: measure the backward step's error on the state and the adjoint only, leaving out the
            parameter integrals (Kidger, Chen & Lyons 2021): usually fewer backward steps. The same as
            ``options=dict(norm="seminorm")``.
        params: the tensors to differentiate (``params``); None: ``func.parameters()`` of an ``nn.Module``
            func.

    Attributes:
        name: ``"adjoint"``.

    Raises:
        ValueError: ``seminorm=True`` together with a ``norm`` in ``options``.
        TypeError: ``seminorm`` is not a bool.

    Example:
        ```python
        import torch
        import neuralode

        field = torch.nn.Linear(2, 2)
        mode = neuralode.Adjoint(rtol=1e-6, seminorm=True, params=tuple(field.parameters()))
        sol = neuralode.solve(lambda t, y: field(y), torch.ones(3, 2), torch.tensor([0.0, 1.0]), gradient=mode)
        sol.ys[-1].square().sum().backward()
        print(field.weight.grad.shape, sol.stats.nfe_backward)
        ```
    """

    rtol: Any = None
    atol: Any = None
    method: str | None = None
    options: Mapping | None = None
    seminorm: bool = False
    params: Sequence[torch.Tensor] | None = None

    name: ClassVar[str] = "adjoint"

    def __repr__(self) -> str:
        return _mode_repr(self)

    def __post_init__(self) -> None:
        if not isinstance(self.seminorm, bool):
            raise TypeError(f"Adjoint(seminorm=...) must be True or False, got {self.seminorm!r}")
        if self.seminorm and isinstance(self.options, Mapping) and "norm" in self.options:
            raise ValueError(
                f"Adjoint(seminorm=True) and Adjoint(options=dict(norm={self.options['norm']!r})) both set the "
                "backward solve's norm: give one of them"
            )

    def backward_options(self) -> Any:
        """The backward solve's options as ``solve(adjoint_options=...)`` takes them: ``options``, with
        ``norm="seminorm"`` added where ``seminorm=True``."""
        if not self.seminorm:
            return self.options
        if self.options is None:
            return {"norm": "seminorm"}
        if isinstance(self.options, Mapping):
            return {**self.options, "norm": "seminorm"}
        return self.options  # (not a dict: the solve says so, naming adjoint_options)


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """The exact gradient of the discrete solve (as :class:`Backprop`), recomputing one step at a time.

    The forward solve keeps states and no graph; the backward pass rebuilds each step's graph from a kept
    state, one step at a time, and backpropagates through it. The same values and gradients as backprop to
    rounding. By default one state is kept per step (memory: one step's graph plus one state per step, no
    recomputation beyond the rebuilt step). With ``checkpoints=N`` at most N states are kept, however many
    steps the solve takes: they are chosen while the solve runs (it does not know its step count in advance)
    and the backward recomputes the others from the nearest kept one, by binomial checkpointing. Fewer
    checkpoints cost more recomputation: about 2–3 extra step evaluations per step with 32–64 checkpoints on
    10,000 steps (``docs/benchmarks.md``). The step grid (a few numbers per step) is always kept, so a
    recomputed step is the forward's step, never a new run of the step-size controller.
    ``gradient=Checkpoint()`` is ``gradient="checkpoint"``.

    Arguments:
        params: the tensors to differentiate (``solve``'s ``params``); None: ``func.parameters()`` of an
            ``nn.Module`` func.
        checkpoints: the most states kept at once (an int ≥ 1, the initial state included; ``solve``'s
            ``checkpoints``), or None for one per step.

    Attributes:
        name: ``"checkpoint"``.

    Example:
        ```python
        import torch
        import neuralode

        k = torch.tensor(1.0, requires_grad=True)
        sol = neuralode.solve(lambda t, y: -k * y, torch.ones(2), torch.tensor([0.0, 1.0]),
                              gradient=neuralode.Checkpoint(params=(k,)))
        sol.ys[-1].sum().backward()
        print(k.grad, sol.stats.checkpoint_bytes)
        ```
    """

    params: Sequence[torch.Tensor] | None = None
    checkpoints: int | None = None

    name: ClassVar[str] = "checkpoint"

    def __repr__(self) -> str:
        return _mode_repr(self)

    def __post_init__(self) -> None:
        n = self.checkpoints
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueError(
                f"`checkpoints` must be a whole number of states of at least 1 (or None: one per step), got {n!r}"
            )


@dataclasses.dataclass(frozen=True)
class Reversible:
    """The exact gradient of a reversible solve, in memory that does not grow with the number of steps.

    For the algebraically reversible methods (``method="reversible_heun"`` or ``"reversible_rk"``): every
    step can be undone from its end state, so the forward keeps only the final state and the step grid, and
    the backward pass rebuilds each step's start state from the next one, one step at a time. The gradient is
    backprop's through the same method up to the round-off of undoing the steps — unlike the adjoint's, which
    solves a different (continuous) problem backwards and can be far off where the dynamics are not
    reversible in practice. ``gradient=Reversible()`` is ``gradient="reversible"``.

    Arguments:
        params: the tensors to differentiate (``solve``'s ``params``); None: ``func.parameters()`` of an
            ``nn.Module`` func.

    Attributes:
        name: ``"reversible"``.

    Example:
        ```python
        import torch
        import neuralode

        k = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
        sol = neuralode.solve(lambda t, y: -k * y, torch.ones(2, dtype=torch.float64),
                              torch.tensor([0.0, 1.0], dtype=torch.float64), method="reversible_heun",
                              gradient=neuralode.Reversible(params=(k,)))
        sol.ys[-1].sum().backward()
        print(k.grad)  # close to -2 exp(-1)
        ```
    """

    params: Sequence[torch.Tensor] | None = None

    name: ClassVar[str] = "reversible"

    def __repr__(self) -> str:
        return _mode_repr(self)


#: any of the gradient modes
GradientMode = Union[Backprop, Adjoint, Checkpoint, Reversible]

_LEGACY = ("adjoint_rtol", "adjoint_atol", "adjoint_method", "adjoint_options")


def resolve_gradient(
    gradient: Any,
    *,
    params: Sequence[torch.Tensor] | None = None,
    adjoint_rtol: Any = None,
    adjoint_atol: Any = None,
    adjoint_method: str | None = None,
    adjoint_options: Any = None,
    checkpoints: int | None = None,
) -> GradientMode:
    """``solve``'s ``gradient`` and its keyword arguments as one gradient-mode object.

    A string takes the keyword arguments as it always has: ``"adjoint"`` all of them, ``"checkpoint"``
    ``params`` only, ``"backprop"`` none (the others are ignored). An object takes a keyword argument only
    where it leaves the matching field unset: the same setting given both ways, or an ``adjoint_*`` argument
    with a mode other than :class:`Adjoint`, is a ValueError naming both. ``params`` is ignored with
    :class:`Backprop`, as with ``"backprop"`` (it differentiates whatever ``func`` uses). ``checkpoints``
    goes with ``"checkpoint"`` or :class:`Checkpoint` only (a ValueError otherwise).
    """
    if checkpoints is not None and not (
        gradient == "checkpoint" if isinstance(gradient, str) else isinstance(gradient, Checkpoint)
    ):
        raise ValueError(
            f'`checkpoints={checkpoints!r}` sets the budget of gradient="checkpoint", but gradient='
            f'{gradient!r}: pass gradient="checkpoint" with it, or leave checkpoints out'
        )
    legacy = dict(
        adjoint_rtol=adjoint_rtol,
        adjoint_atol=adjoint_atol,
        adjoint_method=adjoint_method,
        adjoint_options=adjoint_options,
    )
    if isinstance(gradient, str):
        if gradient not in GRADIENT_MODES:
            raise ValueError(f"`gradient` must be one of {GRADIENT_MODES}, got {gradient!r}")
        if gradient == "adjoint":
            return Adjoint(
                rtol=adjoint_rtol, atol=adjoint_atol, method=adjoint_method, options=adjoint_options, params=params
            )
        if gradient == "checkpoint":
            return Checkpoint(params=params, checkpoints=checkpoints)
        if gradient == "reversible":
            return Reversible(params=params)
        return Backprop()
    if not isinstance(gradient, (Backprop, Adjoint, Checkpoint, Reversible)):
        got = (
            f"the class {gradient.__name__} itself (pass an instance: {gradient.__name__}())"
            if any(gradient is cls for cls in (Backprop, Adjoint, Checkpoint, Reversible))
            else f"{type(gradient).__name__} {reprlib.repr(gradient)}"
        )
        raise TypeError(
            f"`gradient` must be one of the strings {GRADIENT_MODES} or a neuralode.Backprop, neuralode.Adjoint, "
            f"neuralode.Checkpoint or neuralode.Reversible object, got {got}"
        )
    given = [k for k in _LEGACY if legacy[k] is not None]
    if not isinstance(gradient, Adjoint):
        if given:
            raise ValueError(
                f"`{given[0]}` and gradient={_short(gradient)} both given: the adjoint_* arguments set the "
                "adjoint's backward solve, which this gradient mode does not run; leave them out, or pass "
                "gradient=neuralode.Adjoint(...)"
            )
        if isinstance(gradient, (Checkpoint, Reversible)):
            for arg, value in (("params", params), ("checkpoints", checkpoints)):
                if value is not None:
                    if getattr(gradient, arg) is not None:
                        raise _twice(arg, arg, gradient)
                    gradient = dataclasses.replace(gradient, **{arg: value})
        return gradient
    fields = dict(adjoint_rtol="rtol", adjoint_atol="atol", adjoint_method="method", adjoint_options="options")
    updates: dict = {}
    for arg in given:
        if getattr(gradient, fields[arg]) is not None:
            raise _twice(arg, fields[arg], gradient)
        updates[fields[arg]] = legacy[arg]
    if params is not None:
        if gradient.params is not None:
            raise _twice("params", "params", gradient)
        updates["params"] = params
    if gradient.seminorm and isinstance(adjoint_options, Mapping) and "norm" in adjoint_options:
        raise ValueError(
            f"`adjoint_options` sets norm={adjoint_options['norm']!r} and gradient=Adjoint(seminorm=True) sets "
            "the seminorm: give one of them"
        )
    return dataclasses.replace(gradient, **updates) if updates else gradient


def _mode_repr(mode: GradientMode) -> str:
    """``Adjoint(rtol=1e-06, params=(2 tensors))``: the fields set, tensors counted rather than printed."""
    parts = []
    for f in dataclasses.fields(mode):
        value = getattr(mode, f.name)
        if value is f.default:
            continue
        if f.name == "params" and isinstance(value, (list, tuple)):
            text = f"({len(value)} tensor{'s' if len(value) != 1 else ''})"
        elif torch.is_tensor(value):
            text = f"tensor of shape {tuple(value.shape)}" if value.ndim else repr(value.item())
        else:
            text = repr(value)
        parts.append(f"{f.name}={text}")
    return f"{type(mode).__name__}({', '.join(parts)})"


def _short(mode: GradientMode) -> str:
    """``Adjoint(rtol=..., params=...)``: the fields set, without their values (tensors print long)."""
    set_ = [
        f.name
        for f in dataclasses.fields(mode)
        if not (getattr(mode, f.name) is None or getattr(mode, f.name) is False)
    ]
    return f"{type(mode).__name__}({', '.join(name + '=...' for name in set_)})"


def _twice(arg: str, field: str, mode: GradientMode) -> ValueError:
    return ValueError(
        f"`{arg}` and gradient={_short(mode)} both given: they set the same thing ({type(mode).__name__}.{field}); "
        "give one of them"
    )
