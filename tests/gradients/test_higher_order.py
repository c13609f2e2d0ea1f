"""Derivatives beyond the first: backprop differentiates through the solver to any order (checked against
central differences in float64); the modes whose gradients carry no graph of their own (adjoint, checkpoint,
the gradients of times and event times) refuse a second derivative with a clear error instead of giving a
silently wrong one, and so do torch.func transforms of the adjoint and the checkpoint."""

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
@pytest.mark.parametrize("gradient", ["adjoint", "checkpoint"])
def test_first_order_modes_refuse_a_second_derivative(gradient, per_sample):
    f = torch.nn.Linear(3, 3).double()
    y0 = (Y0.repeat(2, 1) if per_sample else Y0).clone().requires_grad_()
    kw = dict(gradient=gradient, per_sample=per_sample, params=tuple(f.parameters()))
    sol = neuralode.solve(lambda t, y: torch.tanh(f(y)), y0, T, **kw)
    out = sol.ys[-1].pow(2).sum()
    with pytest.raises(RuntimeError, match=f"gradient='{gradient}' gives first derivatives only"):
        torch.autograd.grad(out, y0, create_graph=True)
    sol = neuralode.solve(lambda t, y: torch.tanh(f(y)), y0, T, **kw)
    (g,) = torch.autograd.grad(sol.ys[-1].pow(2).sum(), y0)  # first order: unchanged
    assert torch.isfinite(g).all() and g.abs().sum() > 0


@pytest.mark.parametrize("gradient", ["adjoint", "checkpoint"])
def test_torch_func_transforms_of_first_order_modes_say_what_to_use(gradient):
    with pytest.raises(RuntimeError, match=f"gradient='{gradient}' does not run under torch.func"):
        torch.func.jvp(lambda y: final(y, gradient), (Y0,), (torch.ones(3, dtype=torch.float64),))
    with pytest.raises(RuntimeError, match="does not run under torch.func"):
        torch.func.jacrev(lambda y: final(y, gradient))(Y0)


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
