"""Mixed precision: a solve called under ``torch.autocast`` runs ``func`` under that autocast, and everything
the solver itself computes (stage combinations, error norms, interpolation, the adjoint's and checkpoint's
backward arithmetic) in the state's dtype.

Left alone, autocast would run the solver's ``addmm``/``tensordot`` stage and interpolation arithmetic in
bfloat16/float16 (on one problem an error of 1e-2 where 1e-7 was asked), and ``func``'s half-precision output
would not match the state's dtype. So the entry points (``solve``, ``odeint``, ``Solution.interpolate``, the
gradient modes' backward passes) turn autocast off for their own work, remember what the caller had on, and
``prepare`` wraps ``func`` so that it alone runs under the caller's autocast and hands back its output cast
to the state's dtype — the state, its error control and its gradients stay in full precision.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Any, Callable

import torch

_DEVICE_TYPES = ("cpu", "cuda", "xpu", "mps", "hpu")
#: attributes the solvers look up on ``func`` (callbacks, a user-supplied Jacobian), passed through a wrapper
_PASSED_THROUGH = tuple(
    n + s for n in ("callback_step", "callback_accept_step", "callback_reject_step") for s in ("", "_adjoint")
) + ("jacobian",)
#: {device type: autocast dtype} that the outermost entry point found on (a solve nested in another sees it)
_CALLER: contextvars.ContextVar[dict | None] = contextvars.ContextVar("neuralode_caller_autocast", default=None)
_any_enabled = getattr(torch._C, "_is_any_autocast_enabled", None)


def _enabled() -> dict:
    if _any_enabled is not None and not _any_enabled():
        return {}
    on = {}
    for dt in _DEVICE_TYPES:
        try:
            if torch.is_autocast_enabled(dt):
                on[dt] = torch.get_autocast_dtype(dt)
        except RuntimeError:  # a device type this build does not know
            pass
    return on


def full_precision(fn: Callable) -> Callable:
    """Run ``fn`` with autocast off, remembering the caller's autocast for ``caller_autocast``."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        on = _enabled()
        if not on:
            return fn(*args, **kwargs)
        token = _CALLER.set({**(_CALLER.get() or {}), **on})
        try:
            with contextlib.ExitStack() as stack:
                for dt in on:
                    stack.enter_context(torch.autocast(dt, enabled=False))
                return fn(*args, **kwargs)
        finally:
            _CALLER.reset(token)

    return wrapper


def caller_autocast(device_type: str) -> torch.dtype | None:
    """The autocast dtype the caller of the current solve had on for ``device_type``, or None."""
    caller = _CALLER.get()
    return None if caller is None else caller.get(device_type)


def _cast(out: Any, dtype: torch.dtype) -> Any:
    if torch.is_tensor(out):
        return out.to(dtype) if out.is_floating_point() and out.dtype != dtype else out
    if isinstance(out, (tuple, list)):
        return type(out)(_cast(o, dtype) for o in out)
    return out  # (anything else: the usual checks say what is wrong)


def _pass_through(wrapper: Any, func: Any) -> None:
    for name in _PASSED_THROUGH:
        value = getattr(func, name, None)
        if value is not None:
            object.__setattr__(wrapper, name, value)


class _AutocastModule(torch.nn.Module):
    """An ``nn.Module`` func under autocast; its parameters stay the module's own (as ``func.<name>``)."""

    def __init__(self, func: torch.nn.Module, device_type: str, amp_dtype: torch.dtype, dtype: torch.dtype):
        super().__init__()
        self.func = func
        self.device_type, self.amp_dtype, self.dtype = device_type, amp_dtype, dtype
        _pass_through(self, func)

    def forward(self, t, y):
        with torch.autocast(self.device_type, dtype=self.amp_dtype):
            out = self.func(t, y)
        return _cast(out, self.dtype)


class _AutocastFunc:
    """Any other callable func under autocast."""

    def __init__(self, func: Callable, device_type: str, amp_dtype: torch.dtype, dtype: torch.dtype):
        self.func = func
        self.device_type, self.amp_dtype, self.dtype = device_type, amp_dtype, dtype
        _pass_through(self, func)

    def __call__(self, t, y):
        with torch.autocast(self.device_type, dtype=self.amp_dtype):
            out = self.func(t, y)
        return _cast(out, self.dtype)


def under_autocast(func: Callable, device_type: str, amp_dtype: torch.dtype, dtype: torch.dtype) -> Callable:
    """``func`` wrapped to run under autocast with its output in ``dtype``. The wrapper is kept on ``func``
    (outside ``nn.Module``'s registries, so state dicts and ``parameters()`` do not see it), so that the
    compiled solver's caches, keyed by the func, find it again on the next solve."""
    key = (device_type, amp_dtype, dtype)
    cache = func.__dict__.get("_neuralode_autocast") if hasattr(func, "__dict__") else None
    if cache is not None and key in cache:
        return cache[key]
    cls = _AutocastModule if isinstance(func, torch.nn.Module) else _AutocastFunc
    wrapped = cls(func, device_type, amp_dtype, dtype)
    try:
        if cache is None:
            cache = {}
            object.__setattr__(func, "_neuralode_autocast", cache)
        cache[key] = wrapped
    except (AttributeError, TypeError):  # (a bound method, or a class with __slots__: a new wrapper per solve)
        pass
    return wrapped
