"""Inductor on CPU with small matrix products written as loops the compiler can fuse.

``torch.compile`` on CPU keeps every ``mm``/``addmm`` as a call into the BLAS library ("extern kernel").
For the small vector fields of many neural-ODE problems (a 2-D state, 32 hidden units, a batch of 16)
each such call costs several microseconds of fixed overhead for a few thousand multiply–adds, and a fused
solver step makes dozens of them: they, not the arithmetic, set the step's time. Products of at most
``SMALL_GEMM_MACS`` multiply–adds over an inner dimension of at least ``SMALL_GEMM_MIN_K`` are rewritten
into a broadcast multiply and a sum, which Inductor fuses with the surrounding pointwise code (bias,
activation, stage combination) into its own vectorised C++ loops. Larger products keep the library call,
which is faster there.

The rewrite is a graph pass on the post-autograd graph of every forward and backward graph Inductor
lowers (``post_grad_custom_pre_pass``, a ``CustomGraphPass``); its ``uuid`` (a hash of this file) enters
Inductor's cache keys, so the on-disk cache still serves these graphs and never mixes them with graphs
compiled without the pass.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable

import torch

__all__ = ["SMALL_GEMM_MACS", "SMALL_GEMM_MIN_K", "backend_for"]

#: products with at most this many multiply–adds (m·k·n) are fused instead of calling BLAS
SMALL_GEMM_MACS = 1 << 16
#: ... and an inner (summed) dimension at least this long. The fused sum is vectorised along that dimension,
#: contiguous in both operands; for a short one Inductor vectorises along the output's columns, which are
#: strided in ``W.t()``, gives up, and runs the whole fused kernel (activation included) in scalar code: a
#: (64×2)·(2×64) product with tanh ran 2.6× slower than the BLAS call it replaced
SMALL_GEMM_MIN_K = 16

_aten = torch.ops.aten


def _is_small(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.device.type == "cpu"
        and a.dim() == 2
        and b.dim() == 2
        and a.dtype == b.dtype
        and a.is_floating_point()
        and a.shape[1] >= SMALL_GEMM_MIN_K
        and a.shape[0] * a.shape[1] * b.shape[1] <= SMALL_GEMM_MACS
    )


def _emit(graph: torch.fx.Graph, fake, target, args: tuple, fn: Callable) -> torch.fx.Node:
    """A new node ``target(*args)`` with its fake value in ``meta["val"]`` (Inductor's lowering reads it)."""
    new = graph.call_function(target, args)
    with fake:
        new.meta["val"] = fn(*[x.meta["val"] if isinstance(x, torch.fx.Node) else x for x in args])
    return new


def _rewrite(graph: torch.fx.Graph) -> None:
    """Replace small ``aten.mm``/``aten.addmm`` nodes of a post-autograd graph by broadcast-and-sum nodes."""
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in (_aten.mm.default, _aten.addmm.default):
            continue
        addmm = node.target is _aten.addmm.default
        if addmm:
            bias, a, b = node.args[:3]
            beta, alpha = node.kwargs.get("beta", 1), node.kwargs.get("alpha", 1)
        else:
            (a, b), bias, beta, alpha = node.args[:2], None, 0, 1
        av, bv = a.meta.get("val"), b.meta.get("val")
        if not (isinstance(av, torch.Tensor) and isinstance(bv, torch.Tensor) and _is_small(av, bv)):
            continue
        emit = functools.partial(_emit, graph, getattr(av, "fake_mode", None) or contextlib.nullcontext())

        with graph.inserting_before(node):
            au = emit(_aten.unsqueeze.default, (a, 2), _aten.unsqueeze.default)
            bu = emit(_aten.unsqueeze.default, (b, 0), _aten.unsqueeze.default)
            prod = emit(_aten.mul.Tensor, (au, bu), _aten.mul.Tensor)
            out = emit(_aten.sum.dim_IntList, (prod, [1]), _aten.sum.dim_IntList)
            if alpha != 1:
                out = emit(_aten.mul.Tensor, (out, alpha), _aten.mul.Tensor)
            if addmm and beta != 0:
                if beta != 1:
                    bias = emit(_aten.mul.Tensor, (bias, beta), _aten.mul.Tensor)
                out = emit(_aten.add.Tensor, (out, bias), _aten.add.Tensor)
        node.replace_all_uses_with(out)
        graph.erase_node(node)


@functools.lru_cache(maxsize=None)
def _backend(cpp_wrapper: bool, pointwise_cat: bool = False) -> Callable:
    from torch._inductor.compile_fx import compile_fx
    from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

    class SmallGemmPass(CustomGraphPass):
        """The rewrite, run by Inductor on every forward and backward graph before lowering; its uuid
        enters Inductor's cache keys, so cached graphs with and without it never mix."""

        def __call__(self, graph: torch.fx.Graph) -> None:
            _rewrite(graph)

        def uuid(self) -> str:
            return f"{get_hash_for_files((__file__,)).hex()}-{SMALL_GEMM_MACS}-{SMALL_GEMM_MIN_K}"

    patches = {"post_grad_custom_pre_pass": SmallGemmPass()}
    if cpp_wrapper:
        patches["cpp_wrapper"] = True
    if pointwise_cat:
        patches["force_pointwise_cat"] = True

    def inductor_small_gemm(gm: torch.fx.GraphModule, example_inputs):
        return compile_fx(gm, example_inputs, config_patches=patches)

    return inductor_small_gemm


def backend_for(
    backend: str | Callable, device: torch.device, cpp_wrapper: bool = False, pointwise_cat: bool = False
) -> str | Callable:
    """The ``torch.compile`` backend to use: Inductor with small products fused on CPU, else as given.

    ``cpp_wrapper``: Inductor's C++ wrapper, which calls the generated kernels from C++ rather than from
    Python. A fused solver loop is a hundred small kernels, each a few microseconds of Python call
    overhead otherwise; the price is a longer first compile.

    ``pointwise_cat``: lower ``torch.cat``/``torch.stack`` as pointwise code that its consumers read, rather
    than as a buffer each input writes its slice of (Inductor's CPU default). For the per-sample loop's
    transposed state: a func that stacks its ``(batch, d)`` output for a small ``d`` otherwise writes a buffer
    with stride ``d`` that every later stage reads back through transposes and masked (length-``d``) vector
    loads. Van der Pol, batch 256: 350 → 290 µs per compiled call, 10.1 → 8.6 ms per solve (one process);
    for joint stepping it was slower (310 → 400 µs), so only the per-sample loop asks for it.
    """
    if backend == "inductor" and torch.device(device).type == "cpu":
        try:
            return _backend(cpp_wrapper, pointwise_cat)
        except Exception:  # noqa: BLE001 - an Inductor without these hooks: plain Inductor
            return backend
    return backend
