"""Numerical references shared by the tests."""

import pytest
import torch


def central_differences(f, x: torch.Tensor, eps: float) -> torch.Tensor:
    """``(f(x + eps e_i) - f(x - eps e_i)) / (2 eps)`` for every entry ``i`` of ``x``: the derivative of the
    scalar ``f`` by central differences (in ``x``'s dtype; float64 for a reference), shaped like ``x``."""
    out = torch.empty_like(x)
    with torch.no_grad():
        for i in range(x.numel()):
            e = torch.zeros_like(x).view(-1)
            e[i] = eps
            e = e.view_as(x)
            out.view(-1)[i] = (f(x + e) - f(x - e)) / (2 * eps)
    return out


def _inductor_finds_no_cxx_compiler() -> bool:
    """Inductor builds its CPU kernels with a C++ compiler; True where its own search finds none."""
    from torch._inductor.cpp_builder import get_cpp_compiler
    from torch._inductor.exc import InvalidCxxCompiler

    try:
        get_cpp_compiler()
    except InvalidCxxCompiler:
        return True
    return False


#: the one condition under which an Inductor test may skip: every other failure of the compiled path fails
needs_cxx = pytest.mark.skipif(
    _inductor_finds_no_cxx_compiler(),
    reason="no C++ compiler for Inductor's CPU kernels (cpp_builder.get_cpp_compiler)",
)


@pytest.fixture(autouse=True)
def every_fallback_warns():
    """The compiled path warns once per message when it falls back to eager: each test (of a module importing
    this fixture) must see its own fallback, not find it silenced by an earlier test's."""
    from neuralode.compiled import step as compiled

    saved = set(compiled._WARNED)
    compiled._WARNED.clear()
    yield
    compiled._WARNED.clear()
    compiled._WARNED.update(saved)
