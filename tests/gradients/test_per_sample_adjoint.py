"""The adjoint with per-sample stepping: gradients against autograd through the per-sample loop and against
central finite differences in float64."""

import pytest
import torch
from helpers import central_differences

import neuralode as node


def _vdp(mus):
    def f(t, y):
        return torch.stack([y[:, 1], mus * (1 - y[:, 0] ** 2) * y[:, 1] - y[:, 0]], 1)

    return f


class _Field(torch.nn.Module):
    """A small time-dependent MLP field; ``t`` arrives as one time per sample."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.l1 = torch.nn.Linear(3, 16).double()
        self.l2 = torch.nn.Linear(16, 2).double()
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))

    def forward(self, t, y):
        return self.l2(torch.tanh(self.l1(torch.cat([y, t.reshape(-1, 1).expand(y.shape[0], 1)], 1))))


def _grads(loss_of, tensors):
    return torch.autograd.grad(loss_of(), tensors)


@pytest.mark.slow
def test_per_sample_adjoint_matches_finite_differences_and_backprop():
    """A batch of van der Pol oscillators of different stiffness: dL/dμ and dL/dy0 by the per-sample adjoint
    against central differences, and against autograd through the per-sample loop."""
    mus = torch.tensor([0.5, 2.0, 4.0], dtype=torch.float64, requires_grad=True)
    y0 = torch.tensor([[2.0, 0.0], [1.0, 0.5], [0.5, -1.0]], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 0.7, 1.6, 3.0], dtype=torch.float64)
    w = torch.randn(4, 3, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def loss(m, y, **kw):
        return (node.solve(_vdp(m), y, t, rtol=1e-11, atol=1e-11, per_sample=True, **kw).ys * w).sum()

    g_mu, g_y0 = torch.autograd.grad(loss(mus, y0, gradient="adjoint", params=(mus,)), (mus, y0))
    b_mu, b_y0 = torch.autograd.grad(loss(mus, y0), (mus, y0))
    torch.testing.assert_close(g_mu, b_mu, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(g_y0, b_y0, rtol=1e-7, atol=1e-9)
    fd = central_differences(lambda m: loss(m, y0), mus.detach(), 1e-6)
    assert bool(((g_mu - fd).abs() < 1e-6 * fd.abs().clamp(min=1.0)).all()), (g_mu, fd)
    assert float(g_mu.abs().min()) > 1e-2  # every sample's parameter matters: the check is not vacuous


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dopri5", "bosh3", "adaptive_heun"])
def test_per_sample_adjoint_of_a_module_with_per_sample_times(method):
    """nn.Module parameters (found without ``params``), each sample on its own irregular times, gradients
    with respect to y0, the times and the weights; FSAL methods and one without (adaptive_heun)."""
    f = _Field()
    y0 = torch.randn(4, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    times = torch.sort(torch.rand(4, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 2, 1)
    w = torch.randn(5, 4, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    tol = {"dopri5": 1e-10, "bosh3": 1e-8, "adaptive_heun": 1e-6}[method]

    def grads(**kw):
        yy, tt = y0.clone().requires_grad_(True), times.values.clone().requires_grad_(True)
        sol = node.solve(f, yy, tt, method=method, rtol=tol, atol=tol, per_sample=True, **kw)
        return torch.autograd.grad((sol.ys * w).sum(), (yy, tt, *f.parameters())), sol

    adj, sol = grads(gradient="adjoint")
    ref, _ = grads()
    for a, r in zip(adj, ref):
        torch.testing.assert_close(a, r, rtol=tol * 1e4, atol=tol * 10)
    assert sol.stats.nfe_backward > 0 and sol.stats.n_steps_backward > 0


def test_per_sample_adjoint_float32_and_backwards_in_time():
    f = _Field().float()
    y0 = torch.randn(3, 2, generator=torch.Generator().manual_seed(5)).requires_grad_(True)
    t = torch.tensor([1.0, 0.4, -0.5])
    loss_adj = node.solve(f, y0, t, rtol=1e-6, atol=1e-6, per_sample=True, gradient="adjoint").ys.square().sum()
    g_adj = torch.autograd.grad(loss_adj, (y0, *f.parameters()))
    sol_bp = node.solve(f, y0, t, rtol=1e-6, atol=1e-6, per_sample=True)
    g_bp = torch.autograd.grad(sol_bp.ys.square().sum(), (y0, *f.parameters()))
    assert sol_bp.stats.nfe_backward == sol_bp.stats.nfe > 0  # backprop passes back through every call
    for a, r in zip(g_adj, g_bp):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, r, rtol=2e-3, atol=2e-4)


@pytest.mark.parametrize("vmap", [True, False])
def test_per_sample_adjoint_with_compile_runs_forward_and_backward_compiled(monkeypatch, vmap):
    """compile=True: the forward solve (no graph) and every interval's backward solve run in the compiled
    per-sample loop (no warning), and the parameter integral is added per chunk of backward attempts (vmapped
    over them, or one at a time where vmap fails); the backward takes the eager adjoint's steps and its
    gradients (μ, y0, every time) equal the eager adjoint's."""
    import warnings

    from neuralode.compiled import loop as device_loop
    from neuralode.gradients import per_sample_adjoint

    calls = []
    original = device_loop.integrate_device_loop

    def counted(*args, **kwargs):
        calls.append(type(kwargs.get("trace")).__name__)
        return original(*args, **kwargs)

    monkeypatch.setattr(per_sample_adjoint, "integrate_device_loop", counted)
    monkeypatch.setattr(device_loop, "integrate_device_loop", counted)
    monkeypatch.setattr(per_sample_adjoint._Compiled, "CHUNK", 5)  # (several chunks per interval)
    if not vmap:

        def no_vmap(*args, **kwargs):
            raise RuntimeError("vmap unavailable")

        monkeypatch.setattr(torch, "vmap", no_vmap)
    mus = torch.tensor([0.5, 2.0, 4.0], dtype=torch.float64, requires_grad=True)
    y0 = torch.tensor([[2.0, 0.0], [1.0, 0.0], [0.5, -1.0]], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64, requires_grad=True)
    kw = dict(rtol=1e-9, atol=1e-9, per_sample=True, gradient="adjoint", params=(mus,))
    f = _vdp(mus)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sol = node.solve(f, y0, t, compile="aot_eager", **kw)
        g = torch.autograd.grad(sol.ys[1:].square().sum(), [mus, y0, t])
    assert calls == ["NoneType", "_Compiled", "_Compiled"]
    ref_sol = node.solve(f, y0, t, **kw)
    ref = torch.autograd.grad(ref_sol.ys[1:].square().sum(), [mus, y0, t])
    assert sol.stats.n_steps_backward == ref_sol.stats.n_steps_backward > 0
    for a, r in zip(g, ref):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12)


def test_per_sample_adjoint_bad_input_is_a_clear_error():
    mus = torch.tensor([0.5, 2.0], dtype=torch.float64, requires_grad=True)
    y0 = torch.tensor([[2.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    kw = dict(per_sample=True, gradient="adjoint")
    with pytest.raises(TypeError, match="params"):
        node.solve(_vdp(mus), y0, t, **kw)  # a closure: its tensors must be named
    with pytest.raises(ValueError, match="adaptive Runge–Kutta adjoint_method"):
        node.solve(_vdp(mus), y0, t, params=(mus,), adjoint_method="rk4", **kw)
    with pytest.raises(ValueError, match="scalar adjoint_rtol"):
        node.solve(_vdp(mus), y0, t, params=(mus,), adjoint_rtol=torch.tensor([1e-6, 1e-6]), **kw)
    with pytest.raises(ValueError, match="adjoint_options\\['norm'\\] must be 'seminorm' or a callable"):
        node.solve(_vdp(mus), y0, t, params=(mus,), adjoint_options={"norm": "rms"}, **kw)
    with pytest.raises(ValueError, match="leave adjoint_options\\['norm'\\] unset"):
        node.solve(_vdp(mus), y0, t, params=(mus,), adjoint_options={"norm": lambda x: x.abs().max()}, **kw)
    with pytest.raises(node.MaxStepsError, match="adjoint"):
        sol = node.solve(_vdp(mus), y0, t, params=(mus,), adjoint_options={"max_num_steps": 2}, **kw)
        sol.ys.sum().backward()


def test_time_concatenating_layers_take_one_time_per_sample():
    """ConcatLinear and ConcatConv2d with a (batch,) time: row b is the layer at sample b's own time."""
    from neuralode.nn.layers import ConcatConv2d, ConcatLinear

    g = torch.Generator().manual_seed(6)
    t = torch.tensor([0.1, 0.7, -2.0], dtype=torch.float64)
    for layer, x in [
        (ConcatLinear(3, 5).double(), torch.randn(3, 3, generator=g, dtype=torch.float64)),
        (ConcatConv2d(2, 4).double(), torch.randn(3, 2, 5, 5, generator=g, dtype=torch.float64)),
    ]:
        out = layer(t, x)
        for b in range(3):
            torch.testing.assert_close(out[b : b + 1], layer(t[b], x[b : b + 1]), rtol=1e-12, atol=1e-12)


@pytest.mark.slow
def test_ode_block_with_per_sample_stepping():
    """ODEBlock(per_sample=True) on the ODE-Net's convolutional dynamics (inputs of very different scales): each
    sample's output is within tolerance of a tight solve of that sample alone, in about the steps the block
    takes on it alone (the same up to rounding; but this field rejects about as many steps as it accepts, so
    rounding flips a few borderline acceptances), and the adjoint's gradients (ODEBlock's default) are backprop's."""
    from neuralode.nn import ConvODEFunc, MLPODEFunc, ODEBlock

    torch.manual_seed(0)
    func = ConvODEFunc(4, groups=2).double()
    x = torch.randn(3, 4, 4, 4, dtype=torch.float64) * torch.tensor([0.1, 1.0, 5.0], dtype=torch.float64).view(
        3, 1, 1, 1
    )
    kw = dict(rtol=1e-8, atol=1e-8)
    block = ODEBlock(func, per_sample=True, **kw)
    out = block(x)
    alone = ODEBlock(func, **kw)
    tight = ODEBlock(func, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        for b in range(3):
            # (GroupNorm on 4×4 maps amplifies local errors: both solves are ~1e-5 from the tight one)
            torch.testing.assert_close(out[b : b + 1], tight(x[b : b + 1]), rtol=0, atol=1e-4)
            alone(x[b : b + 1])
            assert abs(int(block.sample_stats["n_steps"][b]) - alone.stats.n_steps) <= 0.15 * alone.stats.n_steps
        assert len(set(block.sample_stats["n_steps"].tolist())) > 1  # the samples took different steps
    # gradients (the adjoint, ODEBlock's default, against backprop) on a well-conditioned MLP field: the
    # convolutional one above amplifies errors so much that every gradient mode differs from the others by
    # ~1e-3 at rtol 1e-8, joint or per sample
    mlp = MLPODEFunc(3, 16).double()
    h = torch.randn(5, 3, generator=torch.Generator().manual_seed(7), dtype=torch.float64) * 2
    w = torch.randn(5, 3, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    grads = []
    for gradient in ("adjoint", "backprop"):
        blk = ODEBlock(mlp, per_sample=True, gradient=gradient, rtol=1e-10, atol=1e-10)
        grads.append(torch.autograd.grad((blk(h) * w).sum(), tuple(mlp.parameters())))
    for a, r in zip(*grads):
        torch.testing.assert_close(a, r, rtol=1e-6, atol=1e-9)
    with pytest.raises(ValueError, match="regularization does not combine with per_sample"):
        ODEBlock(func, per_sample=True, regularization={"kinetic": 0.1})


def _vdp_module(mu: float):
    class VdP(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mu = torch.nn.Parameter(torch.tensor(mu, dtype=torch.float64))

        def forward(self, t, y):
            return torch.stack([y[..., 1], self.mu * (1 - y[..., 0] ** 2) * y[..., 1] - y[..., 0]], -1)

    return VdP()


def test_adjoints_warn_when_the_backward_state_drifts_from_the_forward_one():
    """Van der Pol at μ = 8 contracts onto its limit cycle so strongly that re-solving the state backwards
    drifts 40% away from the forward solution (elsewhere it blows up, and the backward solve fails): both
    adjoints then say so (their dL/dμ is off by orders of magnitude, against backprop's); on a healthy problem
    they stay silent."""
    import warnings

    from neuralode.gradients import common

    f = _vdp_module(8.0)
    y0 = torch.tensor([2.0, 0.0], dtype=torch.float64)
    t = torch.tensor([0.0, 7.4], dtype=torch.float64)
    common._DRIFT_WARNED.discard(id(f))
    with pytest.warns(RuntimeWarning, match=r"re-solved the state 0.[3-9]\d* \(relative; [\d.e+]+× rtol\) away"):
        sol = node.solve(f, y0, t, gradient="adjoint", rtol=1e-7, atol=1e-7)
        torch.autograd.grad(sol.ys[-1, 0], f.mu)
    with warnings.catch_warnings():  # said once per func: training loops are not flooded
        warnings.simplefilter("error")
        sol = node.solve(f, y0, t, gradient="adjoint", rtol=1e-7, atol=1e-7)
        torch.autograd.grad(sol.ys[-1, 0], f.mu)
    common._DRIFT_WARNED.discard(id(f))  # (said once per func)
    with pytest.warns(RuntimeWarning, match=r"re-solved the state \(sample \d of the batch\)"):
        sol = node.solve(f, torch.stack([y0, y0]), t, gradient="adjoint", per_sample=True, rtol=1e-7, atol=1e-7)
        torch.autograd.grad(sol.ys[-1, :, 0].sum(), f.mu)
    g_bp = torch.autograd.grad(node.solve(f, y0, t, rtol=1e-7, atol=1e-7).ys[-1, 0], f.mu)[0]
    assert abs(float(g_bp)) < 100  # what backprop finds: a modest sensitivity
    healthy = _vdp_module(0.0)  # a harmonic oscillator: nothing contracts
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for per_sample in (False, True):
            y = torch.stack([y0, y0]) if per_sample else y0
            sol = node.solve(healthy, y, t, gradient="adjoint", per_sample=per_sample, rtol=1e-7, atol=1e-7)
            torch.autograd.grad(sol.ys.sum(), healthy.mu)


def test_per_sample_adjoint_with_compile_falls_back_where_func_cannot_be_transformed(monkeypatch):
    """Where torch.func cannot transform func (here: an augmented call that raises), the compiled per-sample
    adjoint says so once and the eager backward gives the gradients."""
    from neuralode.compiled import step as compiled
    from neuralode.gradients import per_sample_adjoint

    def broken(func, shape):
        def aug(t, z):
            raise RuntimeError("not transformable")

        return aug

    monkeypatch.setattr(per_sample_adjoint, "_make_aug", broken)
    compiled._WARNED.discard(next((w for w in compiled._WARNED if "per-sample adjoint" in w), ""))
    mus = torch.tensor([0.5, 2.0], dtype=torch.float64, requires_grad=True)
    y0 = torch.tensor([[2.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    t = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)
    kw = dict(rtol=1e-8, atol=1e-8, per_sample=True, gradient="adjoint", params=(mus,))
    f = _vdp(mus)
    sol = node.solve(f, y0, t, compile="aot_eager", **kw)
    with pytest.warns(RuntimeWarning, match="per-sample adjoint's backward runs eagerly"):
        g = torch.autograd.grad(sol.ys[-1].sum(), mus)[0]
    ref = torch.autograd.grad(node.solve(f, y0, t, **kw).ys[-1].sum(), mus)[0]
    torch.testing.assert_close(g, ref, rtol=1e-10, atol=1e-12)
