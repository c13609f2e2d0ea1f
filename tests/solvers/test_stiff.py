"""Implicit methods for stiff problems — the fixed-grid methods so far: observed
orders, stability where explicit methods fail, exact gradients in every mode, the stiffness hint."""

import math

import pytest
import torch

import neuralode as node
from neuralode.solvers.implicit import IMPLICIT_TABLEAUS, NewtonError

METHODS = sorted(IMPLICIT_TABLEAUS)


def _linear(lam):
    # y' = λ (y − cos t) − sin t, exact y = cos t + (y0 − 1) e^{λ t}
    def f(t, y):
        return lam * (y - torch.cos(t)) - torch.sin(t)

    def exact(t, y0):
        return math.cos(t) + (y0 - 1) * math.exp(lam * t)

    return f, exact


@pytest.mark.parametrize("method", METHODS)
def test_observed_order_matches_theory(method):
    f, exact = _linear(-2.0)
    y0 = torch.tensor([[2.0], [0.5]], dtype=torch.float64)
    order = IMPLICIT_TABLEAUS[method].order
    hs = [0.4, 0.2, 0.1] if order >= 5 else [0.2, 0.1, 0.05]
    errs = []
    for h in hs:
        ys = node.odeint(f, y0, torch.tensor([0.0, 2.0], dtype=torch.float64), method=method, options={"step_size": h})
        errs.append(float((ys[-1] - exact(2.0, y0)).abs().max()))
    observed = math.log2(errs[-2] / errs[-1])
    assert abs(observed - order) <= 0.3, (method, errs, observed)


@pytest.mark.parametrize("method", ["implicit_euler", "radauIIA5", "trbdf2", "sdirk2"])
def test_l_stable_methods_take_steps_explicit_methods_cannot(method):
    f, exact = _linear(-1000.0)
    y0 = torch.tensor([[2.0]], dtype=torch.float64)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    try:  # h·λ = −50 is far outside rk4's stability region: the solution explodes
        blown = node.odeint(f, y0, t, method="rk4", options={"step_size": 0.05})
        assert abs(float(blown[-1, 0, 0])) > 1e6
    except node.NonFiniteStateError:
        pass
    ys = node.odeint(f, y0, t, method=method, options={"step_size": 0.05})
    assert abs(float(ys[-1, 0, 0]) - exact(1.0, 2.0)) < 1e-3


def _central_differences(loss, param: torch.Tensor, eps: float) -> torch.Tensor:
    fd = torch.zeros_like(param)
    with torch.no_grad():
        for i in range(param.numel()):
            param[i] += eps
            lp = float(loss())
            param[i] -= 2 * eps
            lm = float(loss())
            param[i] += eps
            fd[i] = (lp - lm) / (2 * eps)
    return fd


class _Mild(torch.nn.Module):
    """A mildly stiff nonlinear system with three parameters (rates 1 and 10)."""

    def __init__(self):
        super().__init__()
        self.k = torch.nn.Parameter(torch.tensor([1.0, 10.0, 0.3], dtype=torch.float64))

    def forward(self, t, y):
        a, b, c = self.k
        return torch.stack([-a * y[:, 0] + c * y[:, 1] ** 2, -b * (y[:, 1] - torch.sin(y[:, 0]))], 1)


@pytest.mark.parametrize("method,adjoint_tol", [("radauIIA5", 1e-4), ("gl6", 1e-6), ("trbdf2", 3e-3)])
def test_gradients_in_every_mode_against_finite_differences(method, adjoint_tol):
    func = _Mild()
    y0 = torch.tensor([[1.0, 0.0], [0.5, 1.0]], dtype=torch.float64)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)

    def loss(gradient):
        sol = node.solve(
            func, y0, t, method=method, options={"step_size": 0.05}, gradient=gradient, params=list(func.parameters())
        )
        return (sol.ys**2).sum() + sol.ys[-1, 0, 0]

    grads = {}
    for mode in ("backprop", "checkpoint", "adjoint"):
        func.zero_grad()
        loss(mode).backward()
        grads[mode] = func.k.grad.clone()
    fd = _central_differences(lambda: loss("backprop"), func.k, 1e-6)
    # backprop and checkpoint: the exact derivative of the discrete solve
    torch.testing.assert_close(grads["backprop"], fd, rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(grads["checkpoint"], fd, rtol=1e-7, atol=1e-8)
    # the adjoint: the continuous adjoint solved by the same method, within its discretisation error
    assert float((grads["adjoint"] - fd).abs().max()) < adjoint_tol


def _robertson(t, y):
    y1, y2, y3 = y[..., 0], y[..., 1], y[..., 2]
    return torch.stack([-0.04 * y1 + 1e4 * y2 * y3, 0.04 * y1 - 1e4 * y2 * y3 - 3e7 * y2**2, 3e7 * y2**2], -1)


def test_explicit_failure_on_a_stiff_problem_names_the_implicit_methods():
    y0 = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    with pytest.raises(node.MaxStepsError, match="stiff.*radauIIA5"):
        node.odeint(
            _robertson,
            y0,
            torch.tensor([0.0, 100.0], dtype=torch.float64),
            rtol=1e-6,
            atol=1e-10,
            options={"max_num_steps": 3000},
        )


def test_newton_failure_and_bad_options_are_clear_errors():
    y0 = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    with pytest.raises(NewtonError, match="did not converge in 1 iterations"):
        node.odeint(_robertson, y0, t, method="radauIIA5", options={"step_size": 0.5, "max_iters": 1})
    with pytest.raises(ValueError, match="jacobian='batched' needs a tensor state of shape"):
        node.odeint(_robertson, y0, t, method="radauIIA5", options={"step_size": 0.5, "jacobian": "batched"})
    with pytest.raises(ValueError, match="unknown option|valid"):
        node.odeint(_robertson, y0, t, method="radauIIA5", options={"step_size": 0.5, "bogus": 1})


def test_batched_and_dense_jacobians_give_the_same_solution():
    g = torch.Generator().manual_seed(0)
    y1 = 0.5 + 0.5 * torch.rand(4, generator=g, dtype=torch.float64)
    y0 = torch.stack([y1, torch.zeros_like(y1), 1 - y1], 1)
    t = torch.tensor([0.0, 1e-3], dtype=torch.float64)
    a = node.odeint(_robertson, y0, t, method="radauIIA5", options={"step_size": 1e-4})
    b = node.odeint(_robertson, y0, t, method="radauIIA5", options={"step_size": 1e-4, "jacobian": "dense"})
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert float((a[-1].sum(1) - 1).abs().max()) < 1e-12  # Robertson conserves y1 + y2 + y3


def _radau_robertson(rates, t_eval):
    """scipy's Radau at rtol 1e-12 on one Robertson problem: the reference."""
    scipy_integrate = pytest.importorskip("scipy.integrate")
    k1, k2, k3 = rates

    def f(_, y):
        return [-k1 * y[0] + k2 * y[1] * y[2], k1 * y[0] - k2 * y[1] * y[2] - k3 * y[1] ** 2, k3 * y[1] ** 2]

    return scipy_integrate.solve_ivp(f, (0, 1e5), [1.0, 0, 0], method="Radau", rtol=1e-12, atol=1e-16, t_eval=t_eval)


# ------------------------------------------------------------------------------ adaptive: rosenbrock23


@pytest.mark.slow
def test_rosenbrock23_solves_a_batch_of_robertson_problems_against_scipy_radau():
    pytest.importorskip("scipy.integrate")
    import numpy as np

    rates = torch.tensor([[0.04, 1e4, 3e7], [0.08, 2e4, 1e7], [0.02, 5e3, 5e7]], dtype=torch.float64)

    def batch_rob(t, y):
        k1, k2, k3 = rates[:, 0], rates[:, 1], rates[:, 2]
        y1, y2, y3 = y[:, 0], y[:, 1], y[:, 2]
        return torch.stack([-k1 * y1 + k2 * y2 * y3, k1 * y1 - k2 * y2 * y3 - k3 * y2**2, k3 * y2**2], 1)

    y0 = torch.tensor([[1.0, 0.0, 0.0]] * 3, dtype=torch.float64)
    t = torch.tensor([0.0, 1e-2, 1.0, 100.0, 1e4, 1e5], dtype=torch.float64)
    rtol, atol = 1e-6, 1e-10
    with torch.no_grad():
        sol = node.solve(batch_rob, y0, t, method="rosenbrock23", rtol=rtol, atol=atol)
    for b in range(3):
        ref = _radau_robertson(rates[b].tolist(), t.numpy())
        err = np.abs(sol.ys[:, b].numpy() - ref.y.T) / (atol + rtol * np.abs(ref.y.T))
        # an order-2 pair: the global error is a modest multiple of the local tolerance
        assert err.max() < 100, (b, err.max())
    assert sol.stats.n_steps < 2000  # dopri5 needs far more than max_num_steps here (see above)
    torch.testing.assert_close(sol.ys[-1].sum(1), torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["rosenbrock23", "rodas4", "adaptive_trbdf2"])
def test_rosenbrock_gradients_are_exact_for_the_discrete_solve(method):
    func = _Mild()
    y0 = torch.tensor([[1.0, 0.0], [0.5, 1.0]], dtype=torch.float64)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)

    def loss(gradient):
        sol = node.solve(
            func, y0, t, method=method, rtol=1e-6, atol=1e-8, gradient=gradient, params=list(func.parameters())
        )
        return (sol.ys**2).sum()

    grads = {}
    for mode in ("backprop", "checkpoint", "adjoint"):
        func.zero_grad()
        loss(mode).backward()
        grads[mode] = func.k.grad.clone()
    # finite differences of the same discrete solve need the same steps: compare backprop with checkpoint
    # (both exact for the discrete solve) and both with the adjoint (the continuous gradient) to the tolerance
    torch.testing.assert_close(grads["backprop"], grads["checkpoint"], rtol=1e-9, atol=1e-10)
    assert float((grads["adjoint"] - grads["backprop"]).abs().max()) < 1e-3
    # a step large enough that a change of step sequence is a small part of the difference
    fd = _central_differences(lambda: loss("backprop"), func.k, 1e-4)
    assert float((grads["backprop"] - fd).abs().max()) < 1e-3


def _robertson_batch(rates):
    def f(t, y):
        k1, k2, k3 = rates[:, 0], rates[:, 1], rates[:, 2]
        y1, y2, y3 = y[:, 0], y[:, 1], y[:, 2]
        return torch.stack([-k1 * y1 + k2 * y2 * y3, k1 * y1 - k2 * y2 * y3 - k3 * y2**2, k3 * y2**2], 1)

    return f


def _three_robertson_problems():
    rates = torch.tensor([[0.04, 1e4, 3e7], [0.08, 2e4, 1e7], [0.02, 5e3, 5e7]], dtype=torch.float64)
    y0 = torch.tensor([[1.0, 0.0, 0.0]] * 3, dtype=torch.float64)
    t = torch.tensor([0.0, 1e-3, 1e-2, 1.0, 100.0, 1e4, 1e5], dtype=torch.float64)
    return rates, y0, t


def _assert_within_radau(ys: torch.Tensor, rates, t, rtol: float, atol: float, bound: float) -> None:
    import numpy as np

    for b in range(len(rates)):
        ref = _radau_robertson(rates[b].tolist(), t.numpy())
        err = np.abs(ys[:, b].numpy() - ref.y.T) / (atol + rtol * np.abs(ref.y.T))
        assert err.max() < bound, (b, err.max())


@pytest.mark.slow
def test_rodas4_robertson_batch_within_the_tolerance_of_scipy_radau():
    pytest.importorskip("scipy.integrate")
    rates, y0, t = _three_robertson_problems()
    rtol, atol = 1e-6, 1e-10
    with torch.no_grad():
        sol = node.solve(_robertson_batch(rates), y0, t, method="rodas4", rtol=rtol, atol=atol)
    _assert_within_radau(sol.ys, rates, t, rtol, atol, 2)


@pytest.mark.slow
def test_rodas4_van_der_pol_mu_1000_batch_against_scipy_radau():
    scipy_integrate = pytest.importorskip("scipy.integrate")
    import numpy as np

    mus = torch.tensor([1000.0, 500.0], dtype=torch.float64)

    def vdp(t, y):
        return torch.stack([y[:, 1], mus * (1 - y[:, 0] ** 2) * y[:, 1] - y[:, 0]], 1)

    y0 = torch.tensor([[2.0, 0.0]] * 2, dtype=torch.float64)
    t = torch.linspace(0, 3000, 7, dtype=torch.float64)
    rtol, atol = 1e-6, 1e-8
    with torch.no_grad():
        sol = node.solve(vdp, y0, t, method="rodas4", rtol=rtol, atol=atol)
    for b, mu in enumerate(mus.tolist()):
        ref = scipy_integrate.solve_ivp(
            lambda _, y, mu=mu: [y[1], mu * (1 - y[0] ** 2) * y[1] - y[0]],
            (0, 3000),
            [2.0, 0.0],
            method="Radau",
            rtol=1e-10,  # 1e4 times tighter than the solve under test
            atol=1e-10,
            t_eval=t.numpy(),
        )
        err = np.abs(sol.ys[:, b].numpy() - ref.y.T) / (atol + rtol * np.abs(ref.y.T))
        assert err.max() < 20, (mu, err.max())


class _RobertsonWithJacobian:
    """Robertson's kinetics with an analytic Jacobian (the ``func.jacobian`` hook), one block per sample."""

    def __init__(self, bad_shape=False):
        self.bad_shape = bad_shape

    def __call__(self, t, y):
        return _robertson(t, y)

    def jacobian(self, t, y):
        y2, y3 = y[:, 1], y[:, 2]
        z = torch.zeros_like(y2)
        J = torch.stack(
            [
                torch.stack([-0.04 + z, 1e4 * y3, 1e4 * y2], 1),
                torch.stack([0.04 + z, -1e4 * y3 - 6e7 * y2, -1e4 * y2], 1),
                torch.stack([z, 6e7 * y2, z], 1),
            ],
            1,
        )
        return J[:, :2] if self.bad_shape else J


@pytest.mark.parametrize("method,options", [("rodas4", {}), ("radauIIA5", {"step_size": 1e-4})])
def test_an_analytic_jacobian_hook_gives_the_autograd_solution(method, options):
    y0 = torch.tensor([[1.0, 0.0, 0.0], [0.9, 0.0, 0.1]], dtype=torch.float64)
    t = torch.tensor([0.0, 1e-3], dtype=torch.float64)
    with torch.no_grad():
        a = node.odeint(_robertson, y0, t, method=method, rtol=1e-8, atol=1e-12, options=options)
        b = node.odeint(_RobertsonWithJacobian(), y0, t, method=method, rtol=1e-8, atol=1e-12, options=options)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-14)
    with pytest.raises(ValueError, match="func.jacobian returned shape"):
        node.odeint(_RobertsonWithJacobian(bad_shape=True), y0, t, method=method, options=options)


def test_adaptive_trbdf2_solves_robertson_against_scipy_radau():
    import numpy as np

    y0 = torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64)
    t = torch.tensor([0.0, 1e-3, 1e-2, 1.0, 100.0, 1e4, 1e5], dtype=torch.float64)
    rtol, atol = 1e-4, 1e-8
    with torch.no_grad():
        sol = node.solve(_robertson, y0, t, method="adaptive_trbdf2", rtol=rtol, atol=atol)
    ref = _radau_robertson((0.04, 1e4, 3e7), t.numpy())
    err = np.abs(sol.ys[:, 0].numpy() - ref.y.T) / (atol + rtol * np.abs(ref.y.T))
    assert err.max() < 50, err.max()  # an order-2 pair: a modest multiple of the local tolerance
    assert sol.stats.n_steps < 300


# ------------------------------------------------------------------------------ rodas4, compile=True


@pytest.mark.parametrize("d", [1, 2, 3, 5])
def test_unrolled_small_lu_solves_like_lapack(d):
    from neuralode.compiled.rosenbrock import small_lu, small_lu_solve

    g = torch.Generator().manual_seed(d)
    A = torch.randn(64, d, d, generator=g, dtype=torch.float64)
    if d > 1:
        A[::4, 0, 0] = 0.0  # a zero leading entry: solvable only with a row exchange
        A[1::4, :, 0] = torch.tensor([1e-12] + [1.0] * (d - 1), dtype=torch.float64)  # tiny pivot candidate
    b = torch.randn(64, d, generator=g, dtype=torch.float64)
    x = small_lu_solve(small_lu(A), b)
    ref = torch.linalg.solve(A, b)
    torch.testing.assert_close(x, ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("small", [True, False])
def test_compiled_rodas4_step_function_equals_the_eager_step(small, monkeypatch):
    """The function that compile=True compiles, run uncompiled, against the eager stepper on one step; both the
    unrolled elimination and the LAPACK branch (forced by lowering SMALL_D)."""
    from neuralode.compiled import rosenbrock as rc
    from neuralode.solvers.integrate import RHS
    from neuralode.solvers.rosenbrock import RODAS4, Rosenbrock

    if not small:
        monkeypatch.setattr(rc, "SMALL_D", 0)
    rates = torch.tensor([[0.04, 1e4, 3e7], [0.08, 2e4, 1e7]], dtype=torch.float64)
    f = _robertson_batch(rates)
    y = torch.tensor([[0.9, 1e-5, 0.1], [0.8, 2e-5, 0.2]], dtype=torch.float64)
    t, h = 3.0, 0.05
    rhs = RHS(f, y.shape, y.dtype, y.device)
    eager = Rosenbrock(RODAS4, 6, torch.float64, y.device, batch=2)
    buf = eager.new_buffer()
    f0 = rhs.at(t, y.reshape(-1))
    buf.set(0, f0)
    y1, e = eager.step(rhs, t, h, y.reshape(-1), buf)
    step = rc._make_step(f, RODAS4, y.shape, 2, torch.float64)
    tt, hh = (torch.tensor(v, dtype=torch.float64) for v in (t, h))
    y1c, ec, slope, f1 = step(tt, hh, y.reshape(-1), f0)
    torch.testing.assert_close(y1c, y1, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(ec, e, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(slope, (y1 - y.reshape(-1)) / h, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(f1, f(None, y1.view(2, 3)).reshape(-1), rtol=1e-12, atol=1e-15)


def test_rodas4_compile_true_matches_eager_and_scipy_radau():
    pytest.importorskip("scipy.integrate")
    rates, y0, t = _three_robertson_problems()
    rtol, atol = 1e-6, 1e-10
    f = _robertson_batch(rates)
    with torch.no_grad():
        eager = node.solve(f, y0, t, method="rodas4", rtol=rtol, atol=atol)
        comp = node.solve(f, y0, t, method="rodas4", rtol=rtol, atol=atol, options={"compile": True})
    assert comp.stats.n_steps == eager.stats.n_steps and comp.stats.n_rejected == eager.stats.n_rejected
    torch.testing.assert_close(comp.ys, eager.ys, rtol=1e-7, atol=1e-12)
    _assert_within_radau(comp.ys, rates, t, rtol, atol, 2)


def test_rodas4_compile_true_with_a_graph_falls_back_to_the_eager_step_with_a_warning():
    rates = torch.tensor([[0.04, 1e4, 3e7]], dtype=torch.float64, requires_grad=True)
    y0 = torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 1e-2], dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="compile=True for rodas4"):
        ys = node.odeint(_robertson_batch(rates), y0, t, method="rodas4", options={"compile": True})
    ys[-1].sum().backward()
    assert y0.grad is not None and torch.isfinite(y0.grad).all()


@pytest.mark.parametrize("method, options", [("adaptive_trbdf2", None), ("radauIIA5", {"step_size": 0.05})])
def test_jacobians_are_kept_across_steps_without_changing_the_solution(method, options, monkeypatch):
    """Newton's method keeps a Jacobian while it converges quickly with it: fewer Jacobians than steps, and
    the solution agrees with one that recomputes the Jacobian every step (REUSE_ITERS = 0)."""
    from neuralode.solvers.implicit import ImplicitRK

    calls = {"n": 0}
    original = ImplicitRK._jacobian

    def counted(self, *a, **k):
        calls["n"] += 1
        return original(self, *a, **k)

    monkeypatch.setattr(ImplicitRK, "_jacobian", counted)
    if method == "adaptive_trbdf2":
        f, y0 = _robertson, torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64)
        t = torch.tensor([0.0, 1e-2, 1.0, 100.0, 1e5], dtype=torch.float64)
    else:
        f, y0 = _linear(-500.0)[0], torch.tensor([[2.0], [0.5]], dtype=torch.float64)
        t = torch.tensor([0.0, 1.0, 3.0], dtype=torch.float64)
    results = {}
    for reuse in (0, ImplicitRK.REUSE_ITERS):
        monkeypatch.setattr(ImplicitRK, "REUSE_ITERS", reuse)
        calls["n"] = 0
        with torch.no_grad():
            sol = node.solve(f, y0, t, method=method, rtol=1e-4, atol=1e-8, options=options)
        results[reuse] = (sol, calls["n"])
    fresh, kept = results[0], results[ImplicitRK.REUSE_ITERS]
    assert fresh[1] >= fresh[0].stats.n_steps  # the reference recomputes every step
    assert kept[1] < 0.8 * kept[0].stats.n_steps, (kept[1], kept[0].stats.n_steps)
    torch.testing.assert_close(kept[0].ys, fresh[0].ys, rtol=5e-4, atol=1e-7)
