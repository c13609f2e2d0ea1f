"""Derivatives beyond the first: backprop differentiates through the solver to any order (checked against
central differences in float64); the checkpoint and the reversible gradient give backprop's second
derivatives and torch.func transforms; the adjoint and the gradients of times and event times, whose
gradients carry no graph of their own, refuse a second derivative with a clear error instead of giving a
silently wrong one, and so does a torch.func transform of the adjoint."""

import pytest
import torch

import neuralode

W = torch.tensor([[0.3, -0.6, 0.2], [0.5, 0.1, -0.4], [-0.2, 0.7, 0.3]], dtype=torch.float64)
T = torch.tensor([0.0, 0.6, 1.2], dtype=torch.float64)
Y0 = torch.tensor([0.4, -0.3, 0.8], dtype=torch.float64)


def field(t, y):
    return torch.tanh(y @ W) * torch.cos(t) - 0.1 * y


def final(y0, gradient="backprop", **kw):
    sol = neuralode.solve(field, y0, T, gradient=gradient, params=(), rtol=1e-10, atol=1e-12, **kw)
    return sol.ys[-1]


def loss(y0):
    return final(y0).pow(3).sum()


def grad_of_loss(y0):
    y = y0.clone().requires_grad_()
    return torch.autograd.grad(loss(y), y)[0]


def test_backprop_hessian_vector_product_matches_central_differences():
    v = torch.tensor([0.2, -1.0, 0.5], dtype=torch.float64)
    y = Y0.clone().requires_grad_()
    (g,) = torch.autograd.grad(loss(y), y, create_graph=True)
    (hv,) = torch.autograd.grad(g @ v, y)
    eps = 1e-5
    fd = (grad_of_loss(Y0 + eps * v) - grad_of_loss(Y0 - eps * v)) / (2 * eps)
    torch.testing.assert_close(hv, fd, rtol=1e-6, atol=1e-8)


def test_backprop_forward_mode_matches_central_differences_and_reverse_mode():
    v = torch.tensor([1.0, 0.5, -0.25], dtype=torch.float64)
    _, jv = torch.func.jvp(final, (Y0,), (v,))
    eps = 1e-6
    with torch.no_grad():
        fd = (final(Y0 + eps * v) - final(Y0 - eps * v)) / (2 * eps)
    torch.testing.assert_close(jv, fd, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(torch.func.jacfwd(final)(Y0), torch.func.jacrev(final)(Y0), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("per_sample", [False, True])
def test_the_adjoint_refuses_a_second_derivative(per_sample):
    f = torch.nn.Linear(3, 3).double()
    y0 = (Y0.repeat(2, 1) if per_sample else Y0).clone().requires_grad_()
    kw = dict(gradient="adjoint", per_sample=per_sample, params=tuple(f.parameters()))
    sol = neuralode.solve(lambda t, y: torch.tanh(f(y)), y0, T, **kw)
    out = sol.ys[-1].pow(2).sum()
    with pytest.raises(RuntimeError, match="gradient='adjoint' gives first derivatives only.*'checkpoint'"):
        torch.autograd.grad(out, y0, create_graph=True)
    sol = neuralode.solve(lambda t, y: torch.tanh(f(y)), y0, T, **kw)
    (g,) = torch.autograd.grad(sol.ys[-1].pow(2).sum(), y0)  # first order: unchanged
    assert torch.isfinite(g).all() and g.abs().sum() > 0


SECOND_ORDER = {
    "checkpoint": dict(gradient="checkpoint"),
    "checkpoint, 2 states": dict(gradient="checkpoint", checkpoints=2),
    "checkpoint per-sample": dict(gradient="checkpoint", per_sample=True),
    "reversible": dict(gradient="reversible", method="reversible_rk"),
    "reversible per-sample": dict(gradient="reversible", method="reversible_rk", per_sample=True),
}


@pytest.mark.parametrize("case", SECOND_ORDER)
def test_hessian_vector_products_through_checkpoint_and_reversible_equal_backprop(case):
    kw = dict(SECOND_ORDER[case])
    per_sample = kw.get("per_sample", False)
    k = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)

    def f(t, y):
        return torch.tanh(y @ W) * torch.cos(t)[..., None] * k - 0.1 * y if per_sample else field(t, y) * k

    y0 = (torch.stack([Y0, 0.5 * Y0]) if per_sample else Y0).clone().requires_grad_()
    v = torch.ones_like(y0)

    def hvp(**mode):
        args = {**{a: b for a, b in kw.items() if not mode or a != "checkpoints"}, **mode}
        sol = neuralode.solve(f, y0, T, params=(k,), rtol=1e-9, atol=1e-11, **args)
        gy, gk = torch.autograd.grad(sol.ys[-1].pow(3).sum(), (y0, k), create_graph=True)
        return torch.autograd.grad((gy * v).sum() + gk, (y0, k))

    ref = hvp(gradient="backprop")
    got = hvp()
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("gradient", ["checkpoint", "reversible"])
def test_torch_func_transforms_of_checkpoint_and_reversible_equal_backprop(gradient):
    kw = dict(method="reversible_rk") if gradient == "reversible" else {}
    v = torch.tensor([1.0, 0.5, -0.25], dtype=torch.float64)
    _, jv = torch.func.jvp(lambda y: final(y, gradient, **kw), (Y0,), (v,))
    _, ref = torch.func.jvp(lambda y: final(y, "backprop", **kw), (Y0,), (v,))
    torch.testing.assert_close(jv, ref, rtol=1e-12, atol=1e-14)
    jac = torch.func.jacrev(lambda y: final(y, gradient, **kw))(Y0)
    torch.testing.assert_close(jac, torch.func.jacfwd(lambda y: final(y, "backprop", **kw))(Y0), rtol=1e-9, atol=1e-11)


def test_torch_func_transforms_of_the_adjoint_say_what_to_use():
    with pytest.raises(RuntimeError, match="gradient='adjoint' does not run under torch.func.*'checkpoint'"):
        torch.func.jvp(lambda y: final(y, "adjoint"), (Y0,), (torch.ones(3, dtype=torch.float64),))
    with pytest.raises(RuntimeError, match="does not run under torch.func"):
        torch.func.jacrev(lambda y: final(y, "adjoint"))(Y0)


def test_second_derivatives_through_times_and_event_times_are_refused():
    t = T.clone().requires_grad_()
    out = neuralode.odeint(field, Y0, t, rtol=1e-10, atol=1e-12)[-1].pow(2).sum()
    (g,) = torch.autograd.grad(out, t)  # first order works
    assert torch.isfinite(g).all()
    out = neuralode.odeint(field, Y0, t, rtol=1e-10, atol=1e-12)[-1].pow(2).sum()
    with pytest.raises(RuntimeError, match="gradient with respect to t gives first derivatives only"):
        torch.autograd.grad(out, t, create_graph=True)
    y0 = torch.tensor([0.0, 1.0], dtype=torch.float64).requires_grad_()
    t0 = torch.tensor(0.0, dtype=torch.float64)
    t_event, _ = neuralode.odeint_event(
        lambda t, y: torch.stack([y[1], -y[0]]), y0, t0, event_fn=lambda t, y: y[0] - 0.5
    )
    with pytest.raises(RuntimeError, match="event time's gradient gives first derivatives only"):
        torch.autograd.grad(t_event, y0, create_graph=True)


@pytest.mark.parametrize("case", ["checkpoint", "checkpoint per-sample", "reversible"])
def test_second_derivatives_count_a_parameter_that_y0_comes_from_once(case):
    kw = dict(SECOND_ORDER[case])
    per_sample = kw.get("per_sample", False)

    def hessian(**mode):
        k = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
        y0 = k * torch.ones((2, 2) if per_sample else (2,), dtype=torch.float64)  # (y0 computed from k)
        args = {**kw, **mode}
        sol = neuralode.solve(lambda t, y: -k * y, y0, T, params=(k,), rtol=1e-10, atol=1e-12, **args)
        (g,) = torch.autograd.grad(sol.ys[-1].pow(2).sum(), k, create_graph=True)
        (h,) = torch.autograd.grad(g, k)
        return g, h

    for a, b in zip(hessian(), hessian(gradient="backprop")):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
