"""Small matrix products fused by the compiled path on CPU: the graph rewrite keeps the values of torch's own
``mm``/``addmm`` (float64, every beta/alpha case), touches only small products, and a compiled solve of a small
MLP through it takes the eager solver's steps and values."""

import warnings

import pytest
import torch
from helpers import every_fallback_warns, needs_cxx  # noqa: F401 (an autouse fixture)
from torch.fx.experimental.proxy_tensor import make_fx

import neuralode as node
from neuralode.compiled import small_gemm
from neuralode.compiled.small_gemm import SMALL_GEMM_MACS, SMALL_GEMM_MIN_K, _rewrite

aten = torch.ops.aten


def _targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize(
    "beta, alpha",
    [(1, 1), (0, 1), (2.5, 1), (1, -0.5), (0, 3.0)],
)
def test_rewritten_addmm_and_mm_equal_torch(beta, alpha):
    g = torch.Generator().manual_seed(0)
    bias = torch.randn(20, generator=g, dtype=torch.float64)
    a = torch.randn(5, 16, generator=g, dtype=torch.float64)
    b = torch.randn(16, 20, generator=g, dtype=torch.float64)
    c = torch.randn(20, 4, generator=g, dtype=torch.float64)

    def fn(bias, a, b, c):
        return torch.tanh(torch.addmm(bias, a, b, beta=beta, alpha=alpha)) @ c

    gm = make_fx(fn, tracing_mode="fake")(bias, a, b, c)
    assert aten.addmm.default in _targets(gm) and aten.mm.default in _targets(gm)
    _rewrite(gm.graph)
    gm.recompile()
    assert aten.addmm.default not in _targets(gm) and aten.mm.default not in _targets(gm)
    if beta == 0:  # torch.addmm ignores the bias then, NaN included
        bias = torch.full_like(bias, float("nan"))
    torch.testing.assert_close(gm(bias, a, b, c), fn(bias, a, b, c), rtol=1e-13, atol=1e-13)


def test_large_products_and_short_inner_dimensions_keep_the_library_call():
    m = 64
    k = n = int((SMALL_GEMM_MACS / m) ** 0.5) + 8  # m·k·n just above the threshold
    a, b = torch.randn(m, k), torch.randn(k, n)
    gm = make_fx(lambda a, b: a @ b, tracing_mode="fake")(a, b)
    _rewrite(gm.graph)
    assert aten.mm.default in _targets(gm)
    small = make_fx(lambda a, b: a @ b, tracing_mode="fake")(a[:4, :SMALL_GEMM_MIN_K], b[:SMALL_GEMM_MIN_K, :8])
    _rewrite(small.graph)
    assert aten.mm.default not in _targets(small)
    short = make_fx(lambda a, b: a @ b, tracing_mode="fake")(
        a[:4, : SMALL_GEMM_MIN_K - 1], b[: SMALL_GEMM_MIN_K - 1, :8]
    )
    _rewrite(short.graph)
    assert aten.mm.default in _targets(short)


def test_backend_is_inductor_with_the_rewrite_on_cpu_only():
    assert callable(small_gemm.backend_for("inductor", torch.device("cpu")))
    assert small_gemm.backend_for("aot_eager", torch.device("cpu")) == "aot_eager"
    assert small_gemm.backend_for("inductor", torch.device("meta")) == "inductor"


@needs_cxx
def test_compiled_small_mlp_solve_matches_the_eager_solve():
    """One inductor compilation: a small MLP field (products fused by the rewrite, C++ wrapper)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(2, 32), torch.nn.Tanh(), torch.nn.Linear(32, 2))
    y0 = torch.randn(16, 2)
    t = torch.tensor([0.0, 0.5, 1.0])
    with torch.no_grad():
        eager = node.solve(lambda t, y: net(y), y0, t, rtol=1e-6, atol=1e-6, dense=False)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            comp = node.solve(lambda t, y: net(y), y0, t, rtol=1e-6, atol=1e-6, compile=True)
    fell_back = [str(w.message) for w in caught if "compile=True" in str(w.message)]
    assert not fell_back, fell_back  # a compiled path that fails and falls back to eager is a failure
    assert (comp.stats.nfe, comp.stats.n_steps, comp.stats.n_rejected) == (
        eager.stats.nfe,
        eager.stats.n_steps,
        eager.stats.n_rejected,
    )
    torch.testing.assert_close(comp.ys, eager.ys, rtol=1e-5, atol=1e-6)
