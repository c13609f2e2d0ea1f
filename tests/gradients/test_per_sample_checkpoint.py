"""Checkpointed gradients with per-sample stepping: against autograd through the per-sample loop (the same
discrete gradient), central finite differences in float64, and an analytic gradient; memory: the forward
keeps no graph."""

import math

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

    def __init__(self, dtype=torch.float64) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.l1 = torch.nn.Linear(3, 16).to(dtype)
        self.l2 = torch.nn.Linear(16, 2).to(dtype)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=dtype))

    def forward(self, t, y):
        return self.l2(torch.tanh(self.l1(torch.cat([y, t.reshape(-1, 1).expand(y.shape[0], 1)], 1))))


@pytest.mark.parametrize(
    "method, tol", [("dopri5", 1e-6), ("bosh3", 1e-6), ("adaptive_heun", 1e-4), ("fehlberg2", 1e-5)]
)
def test_per_sample_checkpoint_equals_backprop_through_the_loop(method, tol):
    """Same steps, same discrete gradient: dL/dθ and dL/dy0 equal autograd's through the per-sample loop to
    rounding, on a batch with rejected steps and several outputs per step (FSAL and non-FSAL methods); and
    each sample's dL/dy0 equals autograd's through the joint solver's loop run on that sample alone (which
    takes the same steps, with its own step code)."""
    field = _Field()
    y0 = torch.tensor([[1.0, 0.0], [0.3, -2.0], [2.0, 1.0]], dtype=torch.float64, requires_grad=True)
    t = torch.linspace(0, 3, 25, dtype=torch.float64)
    w = torch.randn(25, 3, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    params = list(field.parameters())

    def run(gradient):
        sol = node.solve(field, y0, t, method=method, rtol=tol, atol=tol / 100, per_sample=True, gradient=gradient)
        return sol, torch.autograd.grad((sol.ys * w).sum(), [y0, *params])

    ck, g_ck = run("checkpoint")
    bp, g_bp = run("backprop")
    assert int(ck.sample_stats["n_rejected"].sum()) > 0
    torch.testing.assert_close(ck.ys, bp.ys, rtol=0, atol=0)
    for a, b in zip(g_ck, g_bp):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    assert all(float(g.abs().max()) > 1e-3 for g in g_ck)
    for b in range(3):
        x = y0.detach()[b : b + 1].clone().requires_grad_(True)
        alone = node.solve(field, x, t, method=method, rtol=tol, atol=tol / 100)
        assert alone.stats.n_steps == int(ck.sample_stats["n_steps"][b])
        (g_alone,) = torch.autograd.grad((alone.ys * w[:, b : b + 1]).sum(), [x])
        torch.testing.assert_close(g_ck[0][b : b + 1], g_alone, rtol=1e-9, atol=1e-11)
    # the backward re-evaluates the forward's calls, plus a first stage per attempt where some sample accepted
    assert ck.stats.nfe_backward >= ck.stats.nfe


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dopri5", "dopri8"])
def test_per_sample_checkpoint_matches_finite_differences_with_per_sample_times(method):
    """van der Pol oscillators of different stiffness, each on its own output times, float64: dL/dμ and
    dL/dy0 against central differences of the solve (an FSAL method and one that is not)."""
    mus = torch.tensor([0.5, 2.0, 4.0], dtype=torch.float64, requires_grad=True)
    y0 = torch.tensor([[2.0, 0.0], [1.0, 0.5], [0.5, -1.0]], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([[0.0, 0.7, 1.6, 3.0], [0.5, 1.0, 1.2, 2.0], [0.0, 0.1, 2.5, 2.6]], dtype=torch.float64)
    w = torch.randn(4, 3, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def loss(m, y, **kw):
        sol = node.solve(_vdp(m), y, t, method=method, rtol=1e-11, atol=1e-11, per_sample=True, **kw)
        return (sol.ys * w).sum()

    g_mu, g_y0 = torch.autograd.grad(loss(mus, y0, gradient="checkpoint", params=(mus,)), (mus, y0))
    eps = 1e-4  # (truncation ~eps² ~ 1e-8; the solve's own error over eps, as steps change, ~1e-11 / eps)
    for g, fd in (
        (g_mu, central_differences(lambda m: loss(m, y0), mus.detach(), eps)),
        (g_y0, central_differences(lambda y: loss(mus, y), y0.detach(), eps)),
    ):
        assert bool(((g - fd).abs() < 1e-6 * fd.abs().clamp(min=1.0)).all()), (g, fd)
    assert float(g_mu.abs().min()) > 1e-2


def test_per_sample_checkpoint_float32_backwards_in_time_and_time_gradients():
    field = _Field(torch.float32)
    y0 = torch.tensor([[1.0, 0.0], [0.3, -2.0]], requires_grad=True)
    t = torch.tensor([2.0, 1.5, 0.2], requires_grad=True)
    params = list(field.parameters())

    def grads(gradient):
        sol = node.solve(field, y0, t, rtol=1e-5, atol=1e-6, per_sample=True, gradient=gradient)
        return torch.autograd.grad(sol.ys[1:].square().sum(), [y0, t, *params])

    for a, b in zip(grads("checkpoint"), grads("backprop")):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_per_sample_checkpoint_keeps_no_graph_of_the_steps():
    """The forward saves nothing for backward but y0 and the parameters (plain backprop saves every stage's
    activations); and a rejected attempt whose stages were NaN does not reach the gradient (the analytic
    one: y(5) = y0 e^(-5θ))."""
    theta = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)

    def f(t, y):  # NaN where |y| > 1.2: sample 0's first attempt (first_step 5) fails and is rejected, while
        return -theta * y + torch.where(y.abs() > 1.2, math.nan, 0.0)  # sample 1 (y = 0 throughout) accepts it

    y0 = torch.tensor([[1.0], [0.0]], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 5.0], dtype=torch.float64)
    saved: dict[str, int] = {"checkpoint": 0, "backprop": 0}
    results = {}
    for gradient in saved:

        def pack(x, gradient=gradient):
            saved[gradient] += x.numel()
            return x

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            sol = node.solve(
                f,
                y0,
                t,
                rtol=1e-9,
                atol=1e-12,
                per_sample=True,
                gradient=gradient,
                params=(theta,),
                options={"first_step": 5.0},
            )
        assert int(sol.sample_stats["n_rejected"][0]) > 0 and int(sol.sample_stats["n_steps"][1]) == 1
        results[gradient] = torch.autograd.grad(sol.ys[-1].sum(), [theta, y0])
    assert saved["checkpoint"] <= 1 + y0.numel() < 100 < saved["backprop"]
    g_theta, g_y0 = results["checkpoint"]
    e = math.exp(-5.0)
    torch.testing.assert_close(g_theta, torch.tensor(-5 * e, dtype=torch.float64), rtol=1e-6, atol=0)
    # sample 1 takes one step of h = 5: y(5) = R(-5) y0 with dopri5's stability polynomial
    # R(z) = Σ_{k≤5} z^k/k! + z⁶/600 (Hairer & Wanner II, §IV.2), its gradient (not e⁻⁵)
    r = sum((-5.0) ** k / math.factorial(k) for k in range(6)) + (-5.0) ** 6 / 600
    torch.testing.assert_close(g_y0, torch.tensor([[e], [r]], dtype=torch.float64), rtol=1e-6, atol=0)


def test_per_sample_checkpoint_with_events_and_in_an_ode_block():
    """Events: each sample's state at its own event and the event times, gradients equal to backprop's. The
    block: ``ODEBlock(per_sample=True, gradient="checkpoint")`` trains like the backprop block."""
    mus = torch.tensor([0.5, 2.0], dtype=torch.float64, requires_grad=True)
    y0 = torch.tensor([[2.0, 0.0], [1.0, 0.5]], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 10.0], dtype=torch.float64)

    def event(t, y):
        return y[:, 0] + 0.5

    def grads(gradient):
        sol = node.solve(
            _vdp(mus),
            y0,
            t,
            rtol=1e-9,
            atol=1e-11,
            per_sample=True,
            event_fn=event,
            gradient=gradient,
            params=(mus,),
        )
        return torch.autograd.grad(sol.ys[-1].sum() + sol.event_t.sum(), [mus, y0])

    for a, b in zip(grads("checkpoint"), grads("backprop")):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)

    from neuralode.nn import ODEBlock

    field = _Field()
    x = torch.tensor([[1.0, 0.0], [0.3, -2.0], [2.0, 1.0]], dtype=torch.float64)
    got = []
    for gradient in ("checkpoint", "backprop"):
        block = ODEBlock(field, t=(0.0, 1.0), per_sample=True, gradient=gradient, rtol=1e-7, atol=1e-9)
        got.append(torch.autograd.grad(block(x).square().sum(), list(field.parameters())))
    for a, b in zip(*got):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_per_sample_checkpoint_with_compile_runs_the_forward_loop_and_the_replay_compiled(monkeypatch):
    """compile=True: the forward solve runs in the compiled per-sample loop, which records the same trace,
    and the replayed attempts run through torch.compile; values and gradients equal the eager ones."""
    from neuralode.compiled import loop as device_loop
    from neuralode.solvers import per_sample

    loops, replays = [], []
    real_loop, real_compiled = device_loop.integrate_device_loop, per_sample._compiled

    def spy_loop(*args, **kw):
        loops.append(kw.get("trace") is not None)
        return real_loop(*args, **kw)

    def spy_compiled(*args, **kw):
        replays.append(args[-1])
        return real_compiled(*args, **kw)

    monkeypatch.setattr(device_loop, "integrate_device_loop", spy_loop)
    monkeypatch.setattr(per_sample, "_compiled", spy_compiled)
    mus = torch.tensor([0.5, 2.0, 4.0], dtype=torch.float64, requires_grad=True)
    y0 = torch.tensor([[2.0, 0.0], [1.0, 0.5], [0.5, -1.0]], dtype=torch.float64, requires_grad=True)
    t = torch.linspace(0, 3, 9, dtype=torch.float64)
    w = torch.randn(9, 3, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    f = _vdp(mus)
    got = {}
    for compile in (False, "aot_eager"):
        sol = node.solve(
            f, y0, t, rtol=1e-7, atol=1e-9, per_sample=True, gradient="checkpoint", params=(mus,), compile=compile
        )
        got[compile] = (sol.ys.detach(), *torch.autograd.grad((sol.ys * w).sum(), [mus, y0]))
        assert sol.stats.checkpoint_bytes > 0
    assert loops == [True] and replays == ["aot_eager"]
    for a, b in zip(got[False], got["aot_eager"]):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12)
