"""Mixed precision: under torch.autocast, func runs in the autocast dtype and the solver in the state's."""

import pytest
import torch

import neuralode as nd
from neuralode._amp import under_autocast

BF16 = dict(device_type="cpu", dtype=torch.bfloat16)
MODES = ["backprop", "adjoint", "checkpoint"]


class Decay(torch.nn.Module):
    """dy/dt = -k cos(t) y: elementwise, so autocast leaves func itself in float32."""

    def __init__(self):
        super().__init__()
        self.k = torch.nn.Parameter(torch.tensor(1.3))

    def forward(self, t, y):
        return -self.k * torch.cos(t) * y


class MLP(torch.nn.Module):
    def __init__(self, d=4, hidden=32):
        super().__init__()
        self.l1, self.l2 = torch.nn.Linear(d, hidden), torch.nn.Linear(hidden, d)
        self.seen = set()  # dtypes of the first layer's output: what func really ran in

    def forward(self, t, y):
        h = self.l1(y)
        self.seen.add(h.dtype)
        return self.l2(torch.tanh(h))


def grads(func, y0, t, mode, autocast=False, backward_inside=False, **kw):
    """The solve (under autocast or not) and the gradients of a weighted sum of its outputs (computed inside
    the autocast region or, as PyTorch recommends, after it)."""
    x = y0.clone().requires_grad_(True)
    with torch.autocast(**BF16, enabled=autocast):
        sol = nd.solve(func, x, t, gradient=mode, dense=True, **kw)  # (interpolated below)
        w = torch.linspace(-1, 1, sol.ys.numel()).reshape(sol.ys.shape)
        loss = (sol.ys * w).sum()
        if backward_inside:
            return sol, torch.autograd.grad(loss, [x] + list(func.parameters()))
    return sol, torch.autograd.grad(loss, [x] + list(func.parameters()))


@pytest.mark.parametrize("mode", MODES)
def test_solver_arithmetic_stays_in_the_state_dtype(mode):
    # func is elementwise, so any difference under autocast could only come from the solver's own
    # products (stage combinations, interpolation, the backward pass) run in bfloat16: ~1e-2 before the fix
    torch.manual_seed(0)
    f, y0, t = Decay(), torch.randn(64, 8), torch.linspace(0, 2, 7)
    sol_ref, g_ref = grads(f, y0, t, mode)
    sol, g = grads(f, y0, t, mode, autocast=True)
    with torch.autocast(**BF16):
        inside = sol.interpolate(torch.tensor([0.37, 1.41]))
    assert sol.ys.dtype == torch.float32
    torch.testing.assert_close(sol.ys, sol_ref.ys, rtol=0, atol=0)
    torch.testing.assert_close(inside, sol_ref.interpolate(torch.tensor([0.37, 1.41])), rtol=0, atol=0)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert sol.stats.nfe == sol_ref.stats.nfe


def test_odeint_and_per_sample_too():
    torch.manual_seed(1)
    f, y0, t = Decay(), torch.randn(16, 3), torch.linspace(0, 1, 4)
    ref = nd.odeint(f, y0, t)
    ref_ps = nd.solve(lambda tt, y: -1.3 * torch.cos(tt)[:, None] * y, y0, t, per_sample=True).ys
    with torch.autocast(**BF16):
        ys = nd.odeint(f, y0, t)
        ys_ps = nd.solve(lambda tt, y: -1.3 * torch.cos(tt)[:, None] * y, y0, t, per_sample=True).ys
    torch.testing.assert_close(ys, ref, rtol=0, atol=0)
    torch.testing.assert_close(ys_ps, ref_ps, rtol=0, atol=0)


@pytest.mark.parametrize("mode", MODES)
def test_func_runs_in_bfloat16_and_the_result_is_close_to_float32(mode):
    torch.manual_seed(2)
    f, y0, t = MLP(), torch.randn(32, 4), torch.linspace(0, 1, 5)
    sol_ref, g_ref = grads(f, y0, t, mode, rtol=1e-4, atol=1e-5)
    assert f.seen == {torch.float32}
    f.seen.clear()
    sol, g = grads(f, y0, t, mode, autocast=True, rtol=1e-4, atol=1e-5)
    assert f.seen == {torch.bfloat16}  # func ran under the caller's autocast, forward and backward
    assert sol.ys.dtype == torch.float32 and all(gi.dtype == torch.float32 for gi in g)
    # bfloat16 keeps 8 bits of mantissa: the dynamics, and so the solution and gradients, are that close
    scale = sol_ref.ys.abs().max()
    assert (sol.ys - sol_ref.ys).abs().max() < 3e-2 * scale
    for a, b in zip(g, g_ref):
        assert (a - b).norm() < 5e-2 * b.norm()


@pytest.mark.parametrize("mode", ["adjoint", "checkpoint"])
def test_backward_inside_the_autocast_region_and_module_state_untouched(mode):
    # (backprop's backward is autograd's own, which follows the autocast of the thread that calls it; the
    # adjoint's and the checkpoint's backward passes turn it off for their arithmetic)
    torch.manual_seed(3)
    f, y0, t = Decay(), torch.randn(8, 2), torch.linspace(0, 1, 3)
    keys = list(f.state_dict())
    _, g_ref = grads(f, y0, t, mode)
    _, g = grads(f, y0, t, mode, autocast=True, backward_inside=True)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert list(f.state_dict()) == keys and len(list(f.parameters())) == 1
    # one wrapper per (func, autocast, state dtype): compiled caches keyed by the func find it again
    w = under_autocast(f, "cpu", torch.bfloat16, torch.float32)
    assert w is under_autocast(f, "cpu", torch.bfloat16, torch.float32)
    assert [p is q for p, q in zip(w.parameters(), f.parameters())] == [True]


def test_callbacks_and_tuple_states_under_autocast():
    class Osc(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.steps = 0

        def forward(self, t, state):
            x, v = state
            return v, -x

        def callback_accept_step(self, t, y, dt):
            self.steps += 1

    f = Osc()
    x0, v0 = torch.ones(3), torch.zeros(3)
    t = torch.linspace(0, 1.5, 4)
    with torch.autocast(**BF16):
        xs, vs = nd.odeint(f, (x0, v0), t, rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(xs[:, 0], torch.cos(t), rtol=0, atol=1e-6)
    torch.testing.assert_close(vs[:, 0], -torch.sin(t), rtol=0, atol=1e-6)
    assert f.steps > 0


def test_a_func_that_was_wrapped_still_pickles_and_copies():
    # the wrappers kept on func (for the compiled caches) hold closures: they must not travel with it
    import copy
    import io

    torch.manual_seed(4)
    f, y0, t = Decay(), torch.randn(4, 4), torch.linspace(0, 1, 3)
    with torch.autocast(**BF16):
        ys = nd.odeint(f, y0, t)
    zs = nd.odeint(f, torch.complex(y0, -y0), t)  # (a complex solve wraps it too)
    assert f.__dict__["_neuralode_wrappers"]
    buf = io.BytesIO()
    torch.save(f, buf)
    buf.seek(0)
    for g in (torch.load(buf, weights_only=False), copy.deepcopy(f)):
        with torch.autocast(**BF16):
            torch.testing.assert_close(nd.odeint(g, y0, t), ys, rtol=0, atol=0)
        torch.testing.assert_close(nd.odeint(g, torch.complex(y0, -y0), t), zs, rtol=0, atol=0)
