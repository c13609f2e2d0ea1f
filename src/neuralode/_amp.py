"""The public solvers' boundary (``entry_point``), and mixed precision: a solve called under
``torch.autocast`` runs ``func`` under that autocast, and everything the solver itself computes (stage
combinations, error norms, interpolation, the adjoint's and checkpoint's backward arithmetic) in the state's
dtype.

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

from ._wrap import cached_wrapper

_DEVICE_TYPES = ("cpu", "cuda", "xpu", "mps", "hpu")
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
        if _any_enabled is not None and not _any_enabled():  # (the common case, in ~0.2 µs)
            return fn(*args, **kwargs)
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


def under_autocast(func: Callable, device_type: str, amp_dtype: torch.dtype, dtype: torch.dtype) -> Callable:
    """``func`` run under autocast (``device_type``, ``amp_dtype``), its output cast to ``dtype``; one wrapper
    per func and setting (``_wrap``)."""

    def call(f, t, y):
        with torch.autocast(device_type, dtype=amp_dtype):
            out = f(t, y)
        return _cast(out, dtype)

    return cached_wrapper(func, ("autocast", device_type, amp_dtype, dtype), call)


def entry_point(fn: Callable) -> Callable:
    """The public solvers' boundary: autocast off for the solver's own arithmetic (``full_precision``), and
    not traced when the caller's model is ``torch.compile``-d. Dynamo cannot capture an adaptive loop (its
    accept/reject decisions read the device, and its stage buffers are written in place: tracing it failed in
    AOT autograd for backprop), so it breaks its graph here and the solve runs eagerly, func included, between
    the compiled graphs of the layers around it. ``compile=True`` is how to compile the solver itself (its
    compiled functions still compile inside: ``torch.compiler.disable`` does not reach an explicit
    ``torch.compile``). Not compiling, the boundary costs about 1.5 µs a call."""
    return torch.compiler.disable(full_precision(fn))
