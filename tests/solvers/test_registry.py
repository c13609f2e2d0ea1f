"""The method registry: a method registered from outside the package runs through every path a built-in
explicit method does, and a hand-entered copy of a built-in tableau reproduces it exactly."""

import math
import warnings
from fractions import Fraction

import pytest
import torch

import neuralode
from neuralode._methods import get_method, method_names

F = Fraction


def _bosh3_copy(name: str) -> neuralode.ButcherTableau:
    """Bogacki & Shampine (1989), Appl. Math. Lett. 2(4) 321-325: the 3(2) pair, entered by hand."""
    b = (F(2, 9), F(1, 3), F(4, 9), F(0))
    b_hat = (F(7, 24), F(1, 4), F(1, 3), F(1, 8))
    return neuralode.ButcherTableau(
        name,
        c=(0.0, 0.5, 0.75, 1.0),
        a=((), (0.5,), (0.0, 0.75), tuple(float(x) for x in b[:3])),
        b=tuple(float(x) for x in b),
        order=3,
        b_err=tuple(float(x) - float(y) for x, y in zip(b, b_hat)),
    )


# Ralston (1962), Math. Comp. 16(80) 431-437: the third-order method of minimum error bound
RALSTON3 = neuralode.ButcherTableau(
    "test_ralston3",
    c=(0.0, 0.5, 0.75),
    a=((), (0.5,), (0.0, 0.75)),
    b=(2 / 9, 1 / 3, 4 / 9),
    order=3,
)


@pytest.fixture(scope="module")
def bosh3_copy():
    entry = neuralode.register_method(_bosh3_copy("test_bosh3_copy"), replace=True)
    return entry.name


class _Field(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))

    def forward(self, t, y):
        return self.net(y) * torch.cos(t).reshape(-1, 1)  # (t is (batch,) per sample)


def _field():
    torch.manual_seed(0)
    return _Field().double()


def _y0():
    return torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


T = torch.linspace(0, 1.5, 7, dtype=torch.float64)


def test_registered_method_is_listed_and_described(bosh3_copy):
    assert bosh3_copy in neuralode.METHODS and bosh3_copy in tuple(neuralode.METHODS)
    entry = get_method(bosh3_copy)
    assert entry.adaptive and entry.per_sample and entry.order == 3 and entry.kind == "explicit"
    assert bosh3_copy in method_names(per_sample=True)
    assert not get_method("test_ralston3" if "test_ralston3" in neuralode.METHODS else "rk4").adaptive


@pytest.mark.parametrize("gradient", ["backprop", "adjoint", "checkpoint"])
@pytest.mark.parametrize("per_sample", [False, True])
def test_copy_of_bosh3_reproduces_bosh3_exactly(bosh3_copy, gradient, per_sample):
    """Same steps, same values and the same gradients as the built-in bosh3, on every gradient mode, joint and
    per-sample stepping."""
    f = _field()
    out = {}
    for method in ("bosh3", bosh3_copy):
        y0 = _y0().requires_grad_()
        sol = neuralode.solve(f, y0, T, method=method, rtol=1e-6, atol=1e-8, gradient=gradient, per_sample=per_sample)
        loss = sol.ys.pow(2).sum()
        grads = torch.autograd.grad(loss, [y0, *f.parameters()])
        out[method] = (sol, grads)
    (a, ga), (b, gb) = out["bosh3"], out[bosh3_copy]
    assert (a.stats.nfe, a.stats.n_steps, a.stats.n_rejected) == (b.stats.nfe, b.stats.n_steps, b.stats.n_rejected)
    assert torch.equal(a.ys, b.ys)
    for x, y in zip(ga, gb):
        assert torch.equal(x, y)


def test_copy_of_bosh3_events_and_dense_output(bosh3_copy):
    f = _field()
    y0 = _y0()[0]

    def event(t, y):
        return y[0] - 10.0 if y.ndim == 1 else y[..., 0] - 10.0

    sols = {m: neuralode.solve(lambda t, y: -y + 1.0, y0, T, method=m, dense=True) for m in ("bosh3", bosh3_copy)}
    t_new = torch.linspace(0.1, 1.4, 11, dtype=torch.float64)
    assert torch.equal(sols["bosh3"].interpolate(t_new), sols[bosh3_copy].interpolate(t_new))
    ev = {
        m: neuralode.odeint_event(
            lambda t, y: torch.ones_like(y), y0, torch.tensor(0.0, dtype=torch.float64), event_fn=event, method=m
        )
        for m in ("bosh3", bosh3_copy)
    }
    t_exact = 10.0 - float(y0[0])  # y0 + t hits 10
    assert ev["bosh3"][0] == ev[bosh3_copy][0]
    assert abs(float(ev[bosh3_copy][0]) - t_exact) < 1e-6
    del f


def test_copy_of_bosh3_compiled(bosh3_copy):
    f = _field()
    y0 = _y0()
    with torch.no_grad():
        eager = neuralode.solve(f, y0, T, method="bosh3", rtol=1e-6, atol=1e-8, dense=False)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            comp = neuralode.solve(f, y0, T, method=bosh3_copy, rtol=1e-6, atol=1e-8, compile="aot_eager")
    assert not [w for w in caught if "compile=True" in str(w.message)]
    assert comp.stats.n_steps == eager.stats.n_steps
    torch.testing.assert_close(comp.ys, eager.ys, rtol=1e-10, atol=1e-11)


def test_fixed_step_registered_method_converges_at_its_order():
    """Ralston's method from outside the package: third order on y' = -y (error ratio 8 when h halves)."""
    neuralode.register_method(RALSTON3, replace=True)
    errs = []
    for h in (0.1, 0.05, 0.025):
        y = neuralode.odeint(
            lambda t, y: -y,
            torch.ones(1, dtype=torch.float64),
            torch.tensor([0.0, 1.0], dtype=torch.float64),
            method="test_ralston3",
            options=dict(step_size=h),
        )
        errs.append(abs(float(y[-1, 0]) - math.exp(-1)))
    orders = [math.log2(errs[i] / errs[i + 1]) for i in range(2)]
    assert all(abs(p - 3) < 0.1 for p in orders), orders
    assert "test_ralston3" in neuralode.METHODS and not get_method("test_ralston3").per_sample
    with pytest.raises(ValueError, match="per_sample=True needs an adaptive"):
        neuralode.solve(lambda t, y: -y, _y0(), T, method="test_ralston3", per_sample=True)


def test_register_method_refuses_what_it_cannot_do():
    with pytest.raises(TypeError, match="ButcherTableau"):
        neuralode.register_method("dopri5")
    with pytest.raises(ValueError, match="built in"):
        neuralode.register_method(_bosh3_copy("bosh3"))
    neuralode.register_method(_bosh3_copy("test_bosh3_twice"), replace=True)
    with pytest.raises(ValueError, match="replace=True"):
        neuralode.register_method(_bosh3_copy("test_bosh3_twice"))
    with pytest.raises(ValueError, match="unknown method 'no_such_method'"):
        neuralode.odeint(lambda t, y: -y, torch.ones(1), torch.tensor([0.0, 1.0]), method="no_such_method")
