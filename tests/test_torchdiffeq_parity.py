"""The same calls through torchdiffeq and neuralode give the same answers (code ports by changing one
import), and where they differ on purpose the difference is pinned here against torchdiffeq run in the same
test. Skipped when torchdiffeq (a test extra) is not installed."""

import math
import warnings

import pytest
import torch

import neuralode as nd
from neuralode.solvers import integrate as nd_integrate

tdq = pytest.importorskip("torchdiffeq")

D = torch.float64


class Field(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.l1 = torch.nn.Linear(2, 16).double()
        self.l2 = torch.nn.Linear(16, 2).double()

    def forward(self, t, y):
        return self.l2(torch.tanh(self.l1(y))) * (1 + 0.3 * torch.sin(t))


Y0 = torch.tensor([[0.5, -0.3], [1.0, 0.2]], dtype=D)
T = torch.tensor([0.0, 0.4, 1.1, 2.0], dtype=D)


@pytest.mark.parametrize("method", ["euler", "midpoint", "heun2", "heun3", "rk4"])
@pytest.mark.parametrize("interp", ["linear", "cubic"])
def test_fixed_grid_methods_agree_to_rounding(method, interp):
    f = Field()
    opts = {"step_size": 0.07, "interp": interp}
    if method == "heun2" and not hasattr(tdq._impl.fixed_grid, "Heun2"):
        pytest.skip("this torchdiffeq has no heun2")
    a = tdq.odeint(f, Y0, T, method=method, options=dict(opts))
    b = nd.odeint(f, Y0, T, method=method, options=dict(opts))
    assert torch.allclose(a, b, rtol=0, atol=1e-12), float((a - b).abs().max())


@pytest.mark.parametrize("method", ["dopri5", "bosh3", "fehlberg2", "adaptive_heun", "dopri8"])
def test_adaptive_methods_agree_to_tolerance(method):
    f = Field()
    tol = 1e-8 if method not in ("fehlberg2", "adaptive_heun") else 1e-6
    with torch.no_grad():
        a = tdq.odeint(f, Y0, T, method=method, rtol=tol, atol=tol)
        b = nd.odeint(f, Y0, T, method=method, rtol=tol, atol=tol)
        ref = nd.odeint(f, Y0, T, method="dopri8", rtol=1e-13, atol=1e-13)
    err_a, err_b = float((a - ref).abs().max()), float((b - ref).abs().max())
    assert err_b <= 3 * err_a + 10 * tol, (err_a, err_b)


@pytest.mark.parametrize("method", ["explicit_adams", "implicit_adams"])
def test_adams_agree_to_their_accuracy(method):
    f = Field()
    a = tdq.odeint(f, Y0, T, method=method, options={"step_size": 0.01})
    b = nd.odeint(f, Y0, T, method=method, options={"step_size": 0.01})
    assert torch.allclose(a, b, atol=1e-6)


def test_tuple_states_and_backwards_time_agree():
    f = lambda t, s: (s[1], -torch.sin(s[0]))
    y0 = (torch.tensor([1.0], dtype=D), torch.tensor([0.0], dtype=D))
    t = torch.tensor([3.0, 1.5, 0.0], dtype=D)
    a = tdq.odeint(f, y0, t, rtol=1e-10, atol=1e-10)
    b = nd.odeint(f, y0, t, rtol=1e-10, atol=1e-10)
    for x, y in zip(a, b):
        assert torch.allclose(x, y, atol=1e-8)


def test_adjoint_gradients_agree():
    grads = []
    for lib in (tdq, nd):
        f = Field()
        y0 = Y0.clone().requires_grad_(True)
        t = T.clone().requires_grad_(True)
        ys = lib.odeint_adjoint(f, y0, t, rtol=1e-9, atol=1e-10)
        (ys**2).sum().backward()
        grads.append([y0.grad, t.grad] + [p.grad for p in f.parameters()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7), float((a - b).abs().max())


def test_adjoint_seminorm_option_gives_both_the_backprop_gradient():
    grads = []
    for lib, kw in (
        (tdq, dict(adjoint_options=dict(norm="seminorm"))),
        (nd, dict(adjoint_options=dict(norm="seminorm"))),
        (nd, {}),
    ):
        torch.manual_seed(0)
        f = Field()
        y0 = Y0.clone().requires_grad_(True)
        solve = lib.odeint_adjoint if kw else lib.odeint
        solve(f, y0, T, rtol=1e-10, atol=1e-10, **kw)[-1].sum().backward()
        grads.append(torch.cat([y0.grad.reshape(-1)] + [p.grad.reshape(-1) for p in f.parameters()]))
    torch.testing.assert_close(grads[0], grads[2], rtol=1e-6, atol=1e-8)  # (the last: backprop, a reference)
    torch.testing.assert_close(grads[1], grads[2], rtol=1e-6, atol=1e-8)


def test_events_agree():
    f = lambda t, y: torch.stack([y[1], -9.81 * torch.ones_like(y[1])])
    y0 = torch.tensor([5.0, 1.0], dtype=D)
    ev = lambda t, y: y[0]
    ta, ya = tdq.odeint_event(f, y0, torch.tensor(0.0, dtype=D), event_fn=ev, rtol=1e-10, atol=1e-10)
    tb, yb = nd.odeint_event(f, y0, torch.tensor(0.0, dtype=D), event_fn=ev, rtol=1e-10, atol=1e-10)
    exact = (1.0 + math.sqrt(1.0 + 2 * 9.81 * 5.0)) / 9.81
    assert abs(float(ta) - exact) < 1e-7 and abs(float(tb) - exact) < 1e-9
    assert ya.shape == yb.shape


def test_same_nfe_as_torchdiffeq_on_a_short_solve():
    # same controller, same initial-step heuristic: the same steps (neuralode clips the last step to t1
    # where torchdiffeq steps past it, so only solves that end on an accepted step compare exactly)
    counts = []
    for lib in (tdq, nd):
        n = [0]
        f = Field()

        def g(t, y, f=f, n=n):
            n[0] += 1
            return f(t, y)

        with torch.no_grad():
            lib.odeint(g, Y0, torch.tensor([0.0, 0.5], dtype=D), rtol=1e-6, atol=1e-6)
        counts.append(n[0])
    assert abs(counts[0] - counts[1]) <= 6, counts


# --- callbacks a method never calls -------------------------------------------------------------------------


class _WithCallbacks:
    """A field with the named callbacks (counting their calls), for both libraries' attribute lookups."""

    def __init__(self, *names):
        self.calls = dict.fromkeys(names, 0)
        for name in names:
            setattr(self, name, lambda t, y, dt, name=name: self.calls.__setitem__(name, self.calls[name] + 1))

    def __call__(self, t, y):
        return -0.5 * y


def _warned(fn, *args, **kwargs) -> list[str]:
    """The callback warnings that ``fn(*args, **kwargs)`` gives."""
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        fn(*args, **kwargs)
    return [str(w.message) for w in got if "callback" in str(w.message)]


@pytest.mark.parametrize("method", ["euler", "rk4", "explicit_adams", "implicit_adams", "dopri5", "scipy_solver"])
@pytest.mark.parametrize("name", ["callback_step", "callback_accept_step", "callback_reject_step"])
def test_uncalled_callback_warns_where_torchdiffeq_does(method, name, monkeypatch):
    # torchdiffeq warns "Solver ... does not support callbacks ..." for a callback the method never calls: the
    # fixed-grid methods (Adams included) call only callback_step, scipy_solver none, the adaptive ones all
    monkeypatch.setattr(nd_integrate, "_WARNED_CALLBACKS", set())
    opts = {"step_size": 0.1} if method not in ("dopri5", "scipy_solver") else {}
    y0, t = torch.ones(2, dtype=D), torch.tensor([0.0, 1.0], dtype=D)
    got = {}
    for lib in (tdq, nd):
        f = _WithCallbacks(name)
        got[lib] = _warned(lib.odeint, f, y0, t, method=method, options=dict(opts))
        if not got[lib]:  # (a callback the method does call is called)
            assert f.calls[name] > 0 or method == "dopri5" and name == "callback_reject_step"
    assert bool(got[tdq]) == bool(got[nd]), (got[tdq], got[nd])
    if got[nd]:
        assert len(got[nd]) == 1 and name in got[nd][0] and repr(method) in got[nd][0], got[nd]


def test_uncalled_callback_warning_is_given_once(monkeypatch):
    # kept on purpose: torchdiffeq warns at every solve; a training loop solves thousands of times
    monkeypatch.setattr(nd_integrate, "_WARNED_CALLBACKS", set())
    f = _WithCallbacks("callback_accept_step")
    y0, t = torch.ones(2, dtype=D), torch.tensor([0.0, 1.0], dtype=D)

    def solve(lib):
        return _warned(lib.odeint, f, y0, t, method="rk4", options={"step_size": 0.1})

    assert len(solve(tdq)) == 1 and len(solve(tdq)) == 1
    assert len(solve(nd)) == 1 and solve(nd) == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # another method's warning is its own
        with pytest.raises(UserWarning, match="'euler'"):
            nd.odeint(f, y0, t, method="euler", options={"step_size": 0.1})


@pytest.mark.parametrize("name, warns", [("callback_step", False), ("callback_accept_step", True)])
def test_uncalled_adjoint_callback_warns_for_the_adjoint_method(name, warns, monkeypatch):
    # the *_adjoint callbacks are checked against adjoint_method, at the backward pass (torchdiffeq names the
    # callback without its suffix there; neuralode names the attribute the func defines)
    monkeypatch.setattr(nd_integrate, "_WARNED_CALLBACKS", set())
    got = {}
    for lib in (tdq, nd):
        f = Field()
        setattr(f, name + "_adjoint", lambda t, y, dt: None)
        y0 = Y0.clone().requires_grad_(True)
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*callback")  # nothing at the forward pass
            ys = lib.odeint_adjoint(f, y0, T, adjoint_method="rk4", adjoint_options={"step_size": 0.1})
        got[lib] = _warned(ys.sum().backward)
    assert bool(got[tdq]) == bool(got[nd]) == warns, (got[tdq], got[nd])
    if warns:
        assert name + "_adjoint" in got[nd][0] and "adjoint_method 'rk4'" in got[nd][0], got[nd]


# --- dopri8: the same steps ---------------------------------------------------------------------------------


class _VanDerPol(torch.nn.Module):
    def __init__(self, mu):
        super().__init__()
        self.mu, self.attempts = mu, []

    def forward(self, t, y):
        return torch.stack([y[1], self.mu * (1 - y[0] ** 2) * y[1] - y[0]])

    def callback_accept_step(self, t, y, dt):
        self.attempts.append((float(t), float(dt), True))

    def callback_reject_step(self, t, y, dt):
        self.attempts.append((float(t), float(dt), False))


def _attempts(lib, method, mu, tol, t1):
    f = _VanDerPol(mu)
    with torch.no_grad():
        lib.odeint(f, torch.tensor([2.0, 0.0], dtype=D), torch.tensor([0.0, t1], dtype=D), method=method,
                   rtol=tol, atol=tol)  # fmt: skip
    return f.attempts


@pytest.mark.parametrize("method", ["dopri5", "bosh3", "fehlberg2", "adaptive_heun", "dopri8"])
def test_starting_step_is_torchdiffeqs(method):
    # Hairer's starting-step heuristic with h^p · max(d1, d2) = 0.01 for a method of order p (HINIT in DOPRI5
    # and DOP853); with h^(p+1) dopri8's first step here would be 0.11 against torchdiffeq's 0.083
    a, b = (_attempts(lib, method, 1.0, 1e-6, 0.2)[0][1] for lib in (tdq, nd))
    assert b == pytest.approx(a, rel=1e-12)


@pytest.mark.parametrize("mu", [1.0, 2.0, 5.0])
@pytest.mark.parametrize("tol", [1e-6, 1e-7, 1e-8])
def test_dopri8_takes_torchdiffeqs_steps(mu, tol):
    """Same tableau (Prince & Dormand's RK8(7)13M with its 7th-order embedded error estimate, as torchdiffeq:
    not DOP853's combined 5th/3rd-order estimator), same controller and starting step: the same accepted and
    rejected steps up to the last one. There neuralode clips the step to t1, while torchdiffeq steps past t1
    with the full step, which its error test can reject once more."""
    t1 = 6.3
    a, b = _attempts(tdq, "dopri8", mu, tol, t1), _attempts(nd, "dopri8", mu, tol, t1)
    i = 0
    while a[i][0] + a[i][1] < t1 and b[i][0] + b[i][1] < t1:
        assert a[i][2] == b[i][2] and b[i][1] == pytest.approx(a[i][1], rel=1e-5), (i, a[i], b[i])
        i += 1
    assert i > 15
    accepted = [sum(s[2] for s in x) for x in (a, b)]
    rejected = [sum(not s[2] for s in x) for x in (a, b)]
    assert accepted[0] == accepted[1]
    assert rejected[1] <= rejected[0] <= rejected[1] + 1, rejected
    if (mu, tol) in ((1.0, 1e-6), (1.0, 1e-7), (5.0, 1e-6), (5.0, 1e-7)):  # no rejection past t1 there
        assert rejected[0] == rejected[1]


# --- Adams methods ------------------------------------------------------------------------------------------


def _oscillator(t, y):
    return torch.stack([y[1], -y[0]])


def _adams_error(lib, method, n, **opts):
    """Max error against the exact solution cos t, -sin t on [0, 3] with n uniform steps, and the solution."""
    t = torch.linspace(0.0, 3.0, 4, dtype=D)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (torchdiffeq: functional iteration / rk4 fallback warnings)
        ys = lib.odeint(_oscillator, torch.tensor([1.0, 0.0], dtype=D), t, method=method,
                        options={"step_size": 3.0 / n, **opts})  # fmt: skip
    exact = torch.stack([torch.cos(t), -torch.sin(t)], -1)
    return float((ys - exact).abs().max()), ys


def test_implicit_adams_default_order_is_torchdiffeqs():
    """Both raise the order as past values accumulate, up to torchdiffeq's default max_order = 12, and agree to
    their errors; neuralode's start (three RK4 steps, then order 4 upwards, where torchdiffeq starts at orders
    3/4 after two RK4 steps) is the closer to the exact solution. A fixed order 4 would be 6.6e-6 away."""
    err_a, a = _adams_error(tdq, "implicit_adams", 30)
    err_b, b = _adams_error(nd, "implicit_adams", 30)
    err_4, _ = _adams_error(nd, "implicit_adams", 30, max_order=4)
    assert err_b < err_a < 2e-7, (err_a, err_b)
    assert float((a - b).abs().max()) <= err_a + err_b
    assert err_4 > 10 * err_a  # (the default order, not the start or the corrector, is what matters here)


def test_explicit_adams_default_order_is_kept_at_four():
    # kept on purpose: torchdiffeq's default (Adams-Bashforth of order 11) lies outside its small stability
    # region on y'' = -y with h = 0.1 (HNW I §III.3) and diverges; order 4 does not
    err_a, _ = _adams_error(tdq, "explicit_adams", 30)
    err_b, _ = _adams_error(nd, "explicit_adams", 30)
    assert err_a > 1.0 and err_b < 1e-3, (err_a, err_b)


@pytest.mark.parametrize("max_order", [2, 3])
def test_adams_max_order_below_four_keeps_its_order(max_order):
    """torchdiffeq replaces an Adams method with max_order below 4 by rk4 (and warns); neuralode keeps the
    multistep method of that order (one evaluation a step after an RK4 start), as the option asks."""
    with pytest.warns(UserWarning, match="rk4"):
        tdq.odeint(_oscillator, torch.tensor([1.0, 0.0], dtype=D), T, method="explicit_adams",
                   options={"step_size": 0.1, "max_order": max_order})  # fmt: skip
    for method in ("explicit_adams", "implicit_adams"):
        err_a, a = _adams_error(tdq, method, 60, max_order=max_order)
        _, rk4 = _adams_error(tdq, "rk4", 60)
        torch.testing.assert_close(a, rk4, rtol=0, atol=1e-13)
        errs = [_adams_error(nd, method, n, max_order=max_order)[0] for n in (60, 120)]
        assert errs[0] > 10 * err_a  # an order-2/3 method, not rk4
        assert math.log2(errs[0] / errs[1]) == pytest.approx(max_order, abs=0.35), errs
