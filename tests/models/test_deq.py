"""Implicit layers (deep equilibrium models): batched Anderson and Broyden solvers, implicit-function-
theorem gradients, memory independent of the iteration count, and the DEQ classifier."""

import json
import math

import pytest
import torch
from torch import nn

from neuralode.cli import main
from neuralode.models.deq import DEQBlock
from neuralode.solvers.fixed_point import FixedPointError, anderson, broyden

SOLVERS = [anderson, broyden]


def _contractive(batch=3, n=12, scale=0.8, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(batch, n, n, generator=g, dtype=torch.float64)
    A = scale * A / torch.linalg.matrix_norm(A, ord=2)[:, None, None]
    b = torch.randn(batch, n, generator=g, dtype=torch.float64)
    return A, b


@pytest.mark.parametrize("solve", SOLVERS)
def test_linear_fixed_point_matches_the_linear_solve(solve):
    A, b = _contractive()
    f = lambda z: torch.bmm(A, z[..., None])[..., 0] + b  # noqa: E731
    z, stats = solve(f, torch.zeros_like(b), tol=1e-10, max_iter=200)
    exact = torch.linalg.solve(torch.eye(12, dtype=torch.float64) - A, b)
    assert stats.converged and stats.residual < 1e-10
    torch.testing.assert_close(z, exact, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("solve", SOLVERS)
def test_nonlinear_fixed_point_to_tolerance_and_faster_than_picard(solve):
    A, b = _contractive(scale=0.95)
    f = lambda z: torch.tanh(torch.bmm(A, z[..., None])[..., 0] + b)  # noqa: E731
    z, stats = solve(f, torch.zeros_like(b), tol=1e-9, max_iter=300)
    res = torch.linalg.vector_norm(f(z) - z, dim=1) / torch.linalg.vector_norm(f(z), dim=1)
    assert stats.converged and float(res.max()) < 1e-8
    picard, zp = 0, torch.zeros_like(b)
    while True:
        fz = f(zp)
        picard += 1
        if float((torch.linalg.vector_norm(fz - zp, dim=1) / torch.linalg.vector_norm(fz, dim=1)).max()) < 1e-9:
            break
        zp = fz
    assert stats.iterations <= picard


@pytest.mark.parametrize("solve", SOLVERS)
def test_non_convergence_names_the_residual(solve):
    A, b = _contractive(scale=0.99)
    f = lambda z: torch.bmm(A, z[..., None])[..., 0] + b  # noqa: E731
    with pytest.warns(RuntimeWarning, match=r"did not converge: relative residual [0-9.e+-]+ > tol=1e-12"):
        _, stats = solve(f, torch.zeros_like(b), tol=1e-12, max_iter=3)
    assert not stats.converged and stats.iterations == 3
    with pytest.raises(FixedPointError, match="relative residual"):
        solve(f, torch.zeros_like(b), tol=1e-12, max_iter=3, on_failure="raise")
    with pytest.raises(ValueError, match="NaN or Inf"):
        solve(f, torch.full_like(b, math.nan))


class _Tanh(nn.Module):
    def __init__(self, n=6, m=4):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.W = nn.Parameter(0.5 * torch.randn(n, n, generator=g, dtype=torch.float64) / math.sqrt(n))
        self.U = nn.Parameter(torch.randn(n, m, generator=g, dtype=torch.float64))
        self.b = nn.Parameter(0.1 * torch.randn(n, generator=g, dtype=torch.float64))

    def forward(self, z, x):
        return torch.tanh(z @ self.W.T + x @ self.U.T + self.b)


def _loss(z):
    w = torch.linspace(-1, 1, z.shape[1], dtype=z.dtype)
    return (z * w).sum() + 0.5 * (z**2).sum()


@pytest.mark.slow
@pytest.mark.parametrize("solver", ["anderson", "broyden"])
def test_implicit_gradients_match_finite_differences(solver):
    func = _Tanh()
    block = DEQBlock(func, solver=solver, tol=1e-12, max_iter=200, state_shape=lambda s: (s[0], 6))
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    _loss(block(x)).backward()
    assert block.nfe_backward > 0
    eps = 1e-6
    for p, name in ((func.W, "W"), (func.U, "U"), (x, "x")):
        grad = p.grad.clone()
        fd = torch.zeros_like(p)
        flat, fdf = p.data.view(-1), fd.view(-1)
        for i in range(flat.numel()):
            old = float(flat[i])
            with torch.no_grad():
                flat[i] = old + eps
                lp = float(_loss(block(x)))
                flat[i] = old - eps
                lm = float(_loss(block(x)))
                flat[i] = old
            fdf[i] = (lp - lm) / (2 * eps)
        torch.testing.assert_close(grad, fd, rtol=1e-6, atol=1e-7, msg=name)


def test_implicit_gradients_match_backprop_through_unrolled_iterations():
    func = _Tanh()
    x = torch.randn(3, 4, dtype=torch.float64)
    block = DEQBlock(func, tol=1e-12, max_iter=200, state_shape=lambda s: (s[0], 6))
    _loss(block(x)).backward()
    implicit = [p.grad.clone() for p in func.parameters()]
    func.zero_grad()
    z = torch.zeros(3, 6, dtype=torch.float64)
    for _ in range(300):  # contraction ~0.5: 300 iterations are converged to machine precision
        z = func(z, x)
    _loss(z).backward()
    for a, b in zip(implicit, (p.grad for p in func.parameters())):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.slow
def test_memory_does_not_grow_with_iterations():
    from neuralode.experiments.classify import _cpu_peak

    torch.manual_seed(0)
    cell = nn.Sequential(nn.Linear(256, 256), nn.Tanh())

    class F(nn.Module):
        def __init__(self):
            super().__init__()
            self.cell = cell

        def forward(self, z, x):
            return 0.5 * self.cell(z) + x

    x = torch.randn(512, 256)

    def peak(iters):
        block = DEQBlock(F(), tol=1e-30, max_iter=iters, on_failure="ignore")
        return _cpu_peak(lambda: block(x).square().sum().backward()), block

    (m10, b10), (m60, b60) = peak(10), peak(60)
    assert b10.nfe_forward == 10 and b60.nfe_forward == 60
    assert m60 < 1.15 * m10, (m10, m60)

    def unrolled(iters):
        def run():
            z = torch.zeros_like(x)
            for _ in range(iters):
                z = F()(z, x)
            z.square().sum().backward()

        return _cpu_peak(run)

    assert unrolled(60) > 3 * m60  # backprop through the iterations keeps every one


@pytest.mark.slow
def test_jacobian_regulariser_estimates_the_frobenius_norm():
    torch.manual_seed(0)
    n = 8
    lin = nn.Linear(n, n).double()

    class F(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = lin

        def forward(self, z, x):
            return 0.3 * self.lin(z) + x

    block = DEQBlock(F(), tol=1e-10, max_iter=100, jac_reg=1.0)
    x = torch.randn(4, n, dtype=torch.float64)
    draws = []
    for _ in range(2000):
        block(x)
        draws.append(float(block.extra_loss.detach()))
    draws = torch.tensor(draws)
    exact = float((0.3 * lin.weight.detach()).pow(2).sum()) / n  # ‖J‖²_F / dim, the same for every sample
    se = float(draws.std()) / math.sqrt(len(draws))
    assert abs(float(draws.mean()) - exact) < 3 * se + 1e-12
    block(x)
    block.extra_loss.backward()
    assert lin.weight.grad is not None and float(lin.weight.grad.abs().sum()) > 0


@pytest.mark.slow
def test_deq_classifier_trains_on_the_built_in_digits(tmp_path):
    out = tmp_path / "deq"
    argv = ["classify", "--model", "deq", "--epochs", "2", "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    hist = json.loads((out / "metrics.json").read_text())["history"]
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    assert hist[-1]["test_error"] < 0.5  # ten classes: chance is 0.9
    assert hist[-1]["nfe_forward"] > 0 and hist[-1]["nfe_backward"] > 0
