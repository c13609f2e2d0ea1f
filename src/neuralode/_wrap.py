"""A func standing for the user's, for the conversions done at the boundary (autocast, complex states).

The wrapper is an ``nn.Module`` when the func is one (its parameters stay the func's own, as ``func.<name>``,
so that gradient modes and ``torch.func.functional_call`` find them), passes through the attributes the
solvers look up on a func (callbacks, a user Jacobian), and is kept on the func (outside ``nn.Module``'s
registries, so state dicts and ``parameters()`` do not see it): the compiled solvers' caches, keyed by the
func, then find the same wrapper on the next solve instead of compiling again.
"""

from __future__ import annotations

from typing import Callable

import torch

CALLBACKS = tuple(
    n + s for n in ("callback_step", "callback_accept_step", "callback_reject_step") for s in ("", "_adjoint")
)
_PASSED_THROUGH = CALLBACKS + ("jacobian",)


class _ModuleWrapper(torch.nn.Module):
    def __init__(self, func: torch.nn.Module, call: Callable, adapt: Callable):
        super().__init__()
        self.func = func
        object.__setattr__(self, "_call", call)
        object.__setattr__(self, "_adapt", adapt)

    def forward(self, t, y):
        return self._call(self.func, t, y)


class _FuncWrapper:
    def __init__(self, func: Callable, call: Callable, adapt: Callable):
        self.func, self._call, self._adapt = func, call, adapt

    def __call__(self, t, y):
        return self._call(self.func, t, y)


def _passed_through(name: str) -> property:
    """The func's attribute ``name`` as ``adapt`` makes it, looked up at each solve (None where it has none)."""

    def get(self):
        value = getattr(self.func, name, None)
        return None if value is None else self._adapt(name, value)

    return property(get)


for _cls in (_ModuleWrapper, _FuncWrapper):
    for _name in _PASSED_THROUGH:
        setattr(_cls, _name, _passed_through(_name))


class _Cache(dict):
    """The wrappers kept on a func. Not part of its state: pickled (``torch.save(model)``) and deep-copied as
    empty, since a wrapper holds closures and the func itself (a copy makes its own on its first solve)."""

    def __reduce__(self):
        return (_Cache, ())

    def __deepcopy__(self, memo):
        return _Cache()


def cached_wrapper(func: Callable, key: tuple, call: Callable, adapt: Callable = lambda name, value: value) -> Callable:
    """A func computing ``call(func, t, y)``, with ``func``'s looked-up attributes as ``adapt(name, value)``;
    one per ``(func, key)``: ``key`` must determine ``call`` and ``adapt``."""
    cache = func.__dict__.get("_neuralode_wrappers") if hasattr(func, "__dict__") else None
    if cache is not None and key in cache:
        return cache[key]
    cls = _ModuleWrapper if isinstance(func, torch.nn.Module) else _FuncWrapper
    wrapped = cls(func, call, adapt)
    try:
        if cache is None:
            cache = _Cache()
            object.__setattr__(func, "_neuralode_wrappers", cache)
        cache[key] = wrapped
    except (AttributeError, TypeError):  # (a bound method, or a class with __slots__: a new wrapper per solve)
        pass
    return wrapped
