"""Per-sample adaptive stepping: each sample takes exactly the steps it would take alone."""

import pytest
import torch

import neuralode as node


def _vdp(mus):
    def f(t, y):
        return torch.stack([y[:, 1], mus * (1 - y[:, 0] ** 2) * y[:, 1] - y[:, 0]], 1)

    return f


def test_each_sample_takes_the_steps_it_would_take_alone():
    mus = torch.tensor([0.5, 1.0, 2.0, 5.0], dtype=torch.float64)
    y0 = torch.tensor([[2.0, 0.0], [1.0, 0.5], [0.1, 0.0], [2.0, -1.0]], dtype=torch.float64)
    t = torch.linspace(0, 7, 40, dtype=torch.float64)
    with torch.no_grad():
        ps = node.solve(_vdp(mus), y0, t, method="dopri5", rtol=1e-6, atol=1e-8, per_sample=True)
        for b in range(4):
            alone = node.solve(_vdp(mus[b : b + 1]), y0[b : b + 1], t, rtol=1e-6, atol=1e-8)
            assert int(ps.sample_stats["n_steps"][b]) == alone.stats.n_steps
            assert int(ps.sample_stats["n_rejected"][b]) == alone.stats.n_rejected
            torch.testing.assert_close(ps.ys[:, b], alone.ys[:, 0], rtol=0, atol=1e-10)
    assert ps.ys.shape == (40, 4, 2)


@pytest.mark.parametrize("method", ["tsit5", "bosh3"])
def test_per_sample_solutions_match_scipy(method):
    scipy_integrate = pytest.importorskip("scipy.integrate")
    mus = torch.tensor([0.5, 3.0], dtype=torch.float64)
    y0 = torch.tensor([[2.0, 0.0], [2.0, 0.0]], dtype=torch.float64)
    t = torch.linspace(0, 5, 11, dtype=torch.float64)
    with torch.no_grad():
        ps = node.solve(_vdp(mus), y0, t, method=method, rtol=1e-8, atol=1e-10, per_sample=True)
    for b, mu in enumerate(mus.tolist()):
        ref = scipy_integrate.solve_ivp(
            lambda _, y, mu=mu: [y[1], mu * (1 - y[0] ** 2) * y[1] - y[0]],
            (0, 5),
            [2.0, 0.0],
            rtol=1e-12,
            atol=1e-12,
            t_eval=t.numpy(),
            method="DOP853",
        )
        assert float((ps.ys[:, b] - torch.from_numpy(ref.y.T)).abs().max()) < 1e-5


def test_per_sample_stepping_saves_evaluations_when_samples_differ():
    mus = torch.linspace(0.5, 5.0, 16, dtype=torch.float64)
    y0 = torch.tensor([[2.0, 0.0]], dtype=torch.float64).repeat(16, 1)
    t = torch.linspace(0, 7, 20, dtype=torch.float64)
    with torch.no_grad():
        joint = node.solve(_vdp(mus), y0, t, rtol=1e-6, atol=1e-8)
        ps = node.solve(_vdp(mus), y0, t, rtol=1e-6, atol=1e-8, per_sample=True)
    assert int(ps.sample_stats["nfe"].sum()) < 0.85 * joint.stats.nfe * 16
    torch.testing.assert_close(ps.ys, joint.ys, rtol=0, atol=1e-4)  # both within tolerance of the truth


def test_gradients_through_per_sample_stepping():
    mus = torch.tensor([0.5, 2.0], dtype=torch.float64, requires_grad=True)
    y0 = torch.tensor([[2.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    t = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)
    ps = node.solve(_vdp(mus), y0, t, rtol=1e-8, atol=1e-10, per_sample=True)
    ps.ys[-1].sum().backward()
    for b in range(2):
        mu = mus.detach()[b : b + 1].clone().requires_grad_(True)
        alone = node.solve(_vdp(mu), y0[b : b + 1], t, rtol=1e-8, atol=1e-10)
        alone.ys[-1].sum().backward()
        torch.testing.assert_close(mus.grad[b : b + 1], mu.grad, rtol=1e-8, atol=1e-10)


def test_per_sample_bad_input_is_a_clear_error():
    y0 = torch.tensor([1.0, 2.0])
    t = torch.tensor([0.0, 1.0])
    with pytest.raises(ValueError, match=r"shape \(batch, ...\)"):
        node.solve(lambda t, y: -y, y0, t, per_sample=True)
    with pytest.raises(ValueError, match="adaptive"):
        node.solve(lambda t, y: -y, y0[None], t, method="rk4", options={"step_size": 0.1}, per_sample=True)


def test_per_sample_backwards_in_time_matches_the_joint_solve_of_each_sample():
    mus = torch.tensor([0.5, 3.0], dtype=torch.float64)
    y0 = torch.tensor([[2.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    t = torch.linspace(3, 0, 13, dtype=torch.float64)
    with torch.no_grad():
        ps = node.solve(_vdp(mus), y0, t, rtol=1e-7, atol=1e-9, per_sample=True)
        for b in range(2):
            alone = node.solve(_vdp(mus[b : b + 1]), y0[b : b + 1], t, rtol=1e-7, atol=1e-9)
            assert int(ps.sample_stats["n_steps"][b]) == alone.stats.n_steps
            torch.testing.assert_close(ps.ys[:, b], alone.ys[:, 0], rtol=0, atol=1e-10)


def _own_times(direction: float) -> torch.Tensor:
    """Four rows of irregular times, each with its own start and end (all increasing or all decreasing)."""
    g = torch.Generator().manual_seed(3)
    starts = torch.tensor([0.0, 0.7, -1.3, 2.0], dtype=torch.float64)
    gaps = 0.05 + torch.rand(4, 6, generator=g, dtype=torch.float64)
    return torch.cat([starts[:, None], starts[:, None] + direction * gaps.cumsum(1)], 1)


@pytest.mark.parametrize("direction", [1.0, -1.0])
def test_per_sample_output_times_each_sample_solved_on_its_own_times(direction):
    """t of shape (batch, m): every sample starts at its own t[b, 0] and is reported at its own times, taking
    the steps that the joint solver takes for that sample alone on those times."""
    mus = torch.tensor([0.5, 1.0, 2.0, 5.0], dtype=torch.float64)
    # inside the limit cycle, so that the backward solves (towards the repelling cycle's inside) stay bounded
    y0 = torch.tensor([[0.5, 0.0], [0.2, 0.3], [0.1, 0.0], [0.3, -0.2]], dtype=torch.float64)
    t = _own_times(direction)
    with torch.no_grad():
        ps = node.solve(_vdp(mus), y0, t, rtol=1e-7, atol=1e-9, per_sample=True)
        assert ps.ys.shape == (7, 4, 2) and ps.ts.shape == (4, 7)
        for b in range(4):
            alone = node.solve(_vdp(mus[b : b + 1]), y0[b : b + 1], t[b], rtol=1e-7, atol=1e-9)
            assert int(ps.sample_stats["n_steps"][b]) == alone.stats.n_steps
            assert int(ps.sample_stats["n_rejected"][b]) == alone.stats.n_rejected
            torch.testing.assert_close(ps.ys[:, b], alone.ys[:, 0], rtol=0, atol=1e-10)


def test_per_sample_output_times_match_scipy():
    scipy_integrate = pytest.importorskip("scipy.integrate")
    mus = torch.tensor([0.5, 1.0, 2.0, 5.0], dtype=torch.float64)
    y0 = torch.tensor([[2.0, 0.0], [1.0, 0.5], [0.1, 0.0], [2.0, -1.0]], dtype=torch.float64)
    t = _own_times(1.0)
    with torch.no_grad():
        ps = node.solve(_vdp(mus), y0, t, method="tsit5", rtol=1e-9, atol=1e-11, per_sample=True)
    for b, mu in enumerate(mus.tolist()):
        ref = scipy_integrate.solve_ivp(
            lambda _, y, mu=mu: [y[1], mu * (1 - y[0] ** 2) * y[1] - y[0]],
            (float(t[b, 0]), float(t[b, -1])),
            y0[b].tolist(),
            rtol=1e-12,
            atol=1e-12,
            t_eval=t[b].numpy(),
            method="DOP853",
        )
        assert float((ps.ys[:, b] - torch.from_numpy(ref.y.T)).abs().max()) < 1e-7


@pytest.mark.slow
@pytest.mark.parametrize("rows", [False, True])
def test_time_gradients_of_per_sample_solves_match_finite_differences(rows):
    """dL/dt for shared (1-D) and per-sample (2-D) times, against central differences in float64."""
    mus = torch.tensor([0.5, 2.0], dtype=torch.float64)
    y0 = torch.tensor([[2.0, 0.0], [1.0, 0.5]], dtype=torch.float64, requires_grad=True)
    t = _own_times(1.0)[:2, :4].clone() if rows else torch.tensor([0.2, 0.9, 1.5, 2.4], dtype=torch.float64)
    w = torch.randn(4, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def loss(tt, yy):
        return (node.solve(_vdp(mus), yy, tt, rtol=1e-11, atol=1e-12, per_sample=True).ys * w).sum()

    tg = t.clone().requires_grad_(True)
    gt, gy = torch.autograd.grad(loss(tg, y0), (tg, y0))
    eps = 1e-6
    with torch.no_grad():
        fd = torch.zeros_like(t)
        for i in range(t.numel()):
            d = torch.zeros(t.numel(), dtype=torch.float64)
            d[i] = eps
            d = d.view(t.shape)
            fd.view(-1)[i] = (loss(t + d, y0) - loss(t - d, y0)) / (2 * eps)
    torch.testing.assert_close(gt, fd, rtol=1e-5, atol=1e-6)
    assert float(gt.abs().max()) > 0.1  # the check is not vacuous
    # the state's gradient is unchanged by the time-gradient correction (values are untouched too)
    gy_plain = torch.autograd.grad(loss(t, y0), y0)[0]
    torch.testing.assert_close(gy, gy_plain, rtol=1e-9, atol=1e-12)


def test_per_sample_output_times_bad_input_is_a_clear_error():
    f = _vdp(torch.tensor([1.0, 2.0], dtype=torch.float64))
    y0 = torch.zeros(2, 2, dtype=torch.float64)
    t = torch.tensor([[0.0, 1.0], [0.5, 2.0]], dtype=torch.float64)
    with pytest.raises(ValueError, match=r"`t` must be 1-D.*per_sample=True"):
        node.solve(f, y0, t)
    with pytest.raises(ValueError, match=r"one row per sample.*\(3, \.\.\.\)"):
        node.solve(f, y0, torch.zeros(3, 2, dtype=torch.float64) + torch.arange(2.0), per_sample=True)
    with pytest.raises(ValueError, match=r"all increase or all decrease.*t\[1\]"):
        node.solve(f, y0, torch.tensor([[0.0, 1.0], [2.0, 0.5]], dtype=torch.float64), per_sample=True)
    with pytest.raises(ValueError, match=r"`t\[1\]` must be strictly increasing.*t\[1\]\[2\]"):
        node.solve(f, y0, torch.tensor([[0.0, 1.0, 2.0], [0.0, 1.0, 1.0]], dtype=torch.float64), per_sample=True)
    with pytest.raises(ValueError, match=r"`t\[0\]` must be finite"):
        node.solve(f, y0, torch.tensor([[0.0, float("nan")], [0.0, 1.0]], dtype=torch.float64), per_sample=True)
    with pytest.raises(ValueError, match="tuple state"):
        node.solve(lambda t, y: y, (y0, y0), t, per_sample=True)


@pytest.mark.parametrize("method", ["dopri5", "fehlberg2", "adaptive_heun"])
def test_per_sample_backprop_with_compile_runs_each_attempt_compiled(monkeypatch, method):
    """compile=True with backprop through the per-sample loop: each attempt's stages and error ratio are one
    compiled function and autograd runs through it; steps, values, dense output and gradients (of a closure's
    tensor too) equal the eager loop's, for FSAL methods and not."""
    from neuralode.solvers import per_sample

    made = []
    real = per_sample.compiled_attempt
    monkeypatch.setattr(per_sample, "compiled_attempt", lambda *a: made.append(a[5]) or real(*a))
    mus = torch.tensor([0.5, 2.0, 4.0], dtype=torch.float64, requires_grad=True)
    y0 = torch.tensor([[2.0, 0.0], [1.0, 0.5], [0.5, -1.0]], dtype=torch.float64, requires_grad=True)
    t = torch.linspace(0, 3, 7, dtype=torch.float64)
    w = torch.randn(7, 3, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    ts = torch.tensor([0.1, 1.25, 2.9], dtype=torch.float64)
    f = _vdp(mus)
    got = {}
    for mode in (False, "aot_eager"):
        sol = node.solve(f, y0, t, method=method, rtol=1e-5, atol=1e-7, per_sample=True, compile=mode, dense=True)
        got[mode] = (sol.ys.detach(), sol.interpolate(ts).detach(), *torch.autograd.grad((sol.ys * w).sum(), [mus, y0]))
        got[mode] += (sol.sample_stats["n_steps"], sol.sample_stats["nfe"])
        if mode:
            assert sol.stats.nfe_backward == sol.stats.nfe
    assert made == ["aot_eager"]
    for a, b in zip(got[False], got["aot_eager"]):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("rows", [False, True])
def test_per_sample_dense_output_is_each_samples_own_interpolant(rows):
    """sol.interpolate after a per-sample solve: each sample's continuous extension, the same as the joint
    solver's interpolant for that sample alone (same steps), and close to scipy at tight tolerance."""
    scipy_integrate = pytest.importorskip("scipy.integrate")
    mus = torch.tensor([0.5, 1.0, 2.0, 5.0], dtype=torch.float64)
    y0 = torch.tensor([[0.5, 0.0], [0.2, 0.3], [0.1, 0.0], [0.3, -0.2]], dtype=torch.float64)
    t = _own_times(1.0) if rows else torch.linspace(0.0, 3.0, 5, dtype=torch.float64)
    with torch.no_grad():
        ps = node.solve(_vdp(mus), y0, t, rtol=1e-8, atol=1e-10, per_sample=True)
        g = torch.Generator().manual_seed(1)
        tb = t if rows else t.expand(4, -1)
        u = torch.rand(4, 9, generator=g, dtype=torch.float64)
        tq = tb[:, :1] + u * (tb[:, -1:] - tb[:, :1])  # (4, 9) inside each sample's interval
        got = ps.interpolate(tq)
        assert got.shape == (9, 4, 2)
        torch.testing.assert_close(ps.interpolate(t), ps.ys, rtol=0, atol=1e-12)  # at the requested times
        for b in range(4):
            alone = node.solve(_vdp(mus[b : b + 1]), y0[b : b + 1], tb[b], rtol=1e-8, atol=1e-10)
            torch.testing.assert_close(got[:, b], alone.interpolate(tq[b])[:, 0], rtol=0, atol=1e-10)
            ref = scipy_integrate.solve_ivp(
                lambda _, y, mu=float(mus[b]): [y[1], mu * (1 - y[0] ** 2) * y[1] - y[0]],
                (float(tb[b, 0]), float(tb[b, -1])),
                y0[b].tolist(),
                rtol=1e-12,
                atol=1e-12,
                dense_output=True,
                method="DOP853",
            )
            assert float((got[:, b] - torch.from_numpy(ref.sol(tq[b].numpy()).T)).abs().max()) < 1e-6
        if not rows:  # 1-D times are every sample's
            torch.testing.assert_close(ps.interpolate(tq[0]), ps.interpolate(tq[:1].expand(4, -1)), rtol=0, atol=0)
        with pytest.raises(ValueError, match=r"outside its solved interval"):
            ps.interpolate(tb[:, -1:] + 0.1)
        with pytest.raises(ValueError, match=r"shape \(4, K\)"):
            ps.interpolate(torch.zeros(3, 2, dtype=torch.float64))
        nodense = node.solve(_vdp(mus), y0, t, rtol=1e-8, atol=1e-10, per_sample=True, dense=False)
        with pytest.raises(RuntimeError, match="dense=True"):
            nodense.interpolate(tq)


def test_per_sample_nan_names_the_sample_and_the_time():
    """A sample whose func output turns NaN at t = 0.5, and one whose y0 holds a NaN: NonFiniteStateError naming
    the sample (not a step-size underflow), as the joint solver says for its state."""

    def f(t, y):
        out = -y.clone()
        out[1] = torch.where(t[1] > 0.5, torch.tensor(float("nan"), dtype=y.dtype), out[1])
        return out

    with pytest.raises(node.NonFiniteStateError, match=r"sample 1 of the batch became NaN or Inf just after t=0\.5"):
        node.solve(
            f, torch.ones(3, 2, dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64), per_sample=True
        )
    y0 = torch.tensor([[1.0, float("nan")], [1.0, 1.0]], dtype=torch.float64)
    with pytest.raises(node.NonFiniteStateError, match="sample 0 .* check that sample's y0"):
        node.solve(lambda t, y: -y, y0, torch.tensor([0.0, 1.0], dtype=torch.float64), per_sample=True)
