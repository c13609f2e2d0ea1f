"""Inputs that used to give a wrong number without a word: each now gives the right one or a clear error."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import neuralode
from neuralode import _problem

T01 = torch.tensor([0.0, 1.0], dtype=torch.float64)


def _decay(w):
    return lambda t, y: w * y


# ------------------------------------------------------------------------------------ names and option values


def test_an_unknown_adjoint_method_is_an_error_listing_the_methods():
    w = torch.tensor(-1.0, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match="adjoint_method 'bogus'.*dopri5"):
        neuralode.odeint_adjoint(
            _decay(w), torch.ones(1, dtype=torch.float64), T01, adjoint_params=(w,), adjoint_method="bogus"
        )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(rtol="1e-6"), "`rtol` must be a float or a tensor, got str"),
        (dict(atol=True), "`atol` must be a float or a tensor, got bool"),
        (dict(options=0.1), "`options` must be a dict"),
        (dict(options={1: 2}), "keys of `options`"),
        (dict(options=dict(first_step=-0.1)), r"options\['first_step'\] must be a positive"),
        (dict(options=dict(first_step="0.1")), r"options\['first_step'\] must be a number"),
        (dict(options=dict(max_num_steps=2.5)), r"options\['max_num_steps'\] must be a positive integer"),
        (dict(method="rk4", options=dict(step_size=0.1, interp="quadratic")), r"options\['interp'\] must be one of"),
        (dict(method="rk4", options=dict(step_size=-0.1)), r"options\['step_size'\] must be a positive"),
        (dict(method="rk4", options=dict(step_size=0.1, perturb=1)), r"options\['perturb'\] must be True or False"),
        (dict(method="explicit_adams", options=dict(step_size=0.1, max_order=0)), r"options\['max_order'\]"),
        (dict(method="rodas4", options=dict(jacobian="sparse")), r"options\['jacobian'\] must be one of"),
        (dict(method="scipy_solver", options=dict(solver="rk45")), r"options\['solver'\] must be one of"),
        (dict(options=dict(max_step=0.0)), r"options\['max_step'\] must be a positive"),
        (dict(options=dict(compile=1)), r"options\['compile'\]"),
        (dict(method="Dopri5"), "unknown method 'Dopri5'"),
        (dict(method=5), "`method` must be a method name"),
        (dict(options=dict(interp="linear")), r"unknown option\(s\) \['interp'\] for method 'dopri5'"),
    ],
)
def test_bad_arguments_are_errors_that_name_the_argument(kwargs, match):
    with pytest.raises((TypeError, ValueError), match=match):
        neuralode.odeint(lambda t, y: -y, torch.ones(1, dtype=torch.float64), T01, **kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(adjoint_options=0.1), "`adjoint_options` must be a dict"),
        (dict(adjoint_options=dict(bogus=1)), r"unknown adjoint_options \['bogus'\]"),
        (dict(adjoint_options=dict(norm="semi")), r"adjoint_options\['norm'\] must be 'seminorm'"),
        (dict(adjoint_options=dict(first_step=0.0)), r"adjoint_options\['first_step'\]"),
        (dict(adjoint_method="scipy_solver"), "adjoint_method='scipy_solver'"),
        (dict(adjoint_rtol="1e-3"), "`adjoint_rtol` must be a float"),
        (dict(adjoint_params=torch.ones(2)), "`adjoint_params` must be a sequence of tensors"),
    ],
)
def test_bad_adjoint_arguments_are_errors_at_the_forward(kwargs, match):
    w = torch.tensor(-1.0, dtype=torch.float64, requires_grad=True)
    kwargs.setdefault("adjoint_params", (w,))
    with pytest.raises((TypeError, ValueError), match=match):
        neuralode.odeint_adjoint(_decay(w), torch.ones(1, dtype=torch.float64), T01, **kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(gradient="adjiont"), "`gradient` must be one of"), (dict(method="dopri"), "unknown method 'dopri'")],
)
def test_ode_block_checks_its_arguments_when_built(kwargs, match):
    with pytest.raises(ValueError, match=match):
        neuralode.nn.ODEBlock(torch.nn.Linear(2, 2), **kwargs)


def test_scipy_solver_gives_values_and_refuses_gradients_instead_of_dropping_them():
    y0 = torch.ones(2, dtype=torch.float64, requires_grad=True)
    ys = neuralode.odeint(lambda t, y: -y, y0, T01, method="scipy_solver")  # (values, as torchdiffeq gives them)
    assert ys[-1, 0].item() == pytest.approx(math.exp(-1), rel=1e-5)
    with pytest.raises(RuntimeError, match="scipy_solver' is forward only.*y0"):
        (ys.sum() + y0.sum()).backward()  # (a loss with another term would otherwise train on half a gradient)
    with torch.no_grad():
        ys = neuralode.odeint(lambda t, y: -y, y0, T01, method="scipy_solver")
    assert not ys.requires_grad


# ----------------------------------------------------------------------------------- parameters and gradients


def test_a_parameter_given_twice_gets_its_gradient_once():
    w = torch.tensor(-0.5, dtype=torch.float64, requires_grad=True)
    ys = neuralode.odeint_adjoint(
        _decay(w), torch.ones(1, dtype=torch.float64), T01, adjoint_params=(w, w), rtol=1e-10, atol=1e-12
    )
    ys[-1].sum().backward()
    assert w.grad.item() == pytest.approx(math.exp(-0.5), rel=1e-6)  # d/dw exp(w) at t = 1


@pytest.mark.parametrize("gradient", ["adjoint", "checkpoint"])
def test_parameters_derived_from_one_another_count_each_path_once(gradient):
    a = torch.tensor([0.3, -0.2], dtype=torch.float64, requires_grad=True)
    b = 2 * a  # given as a parameter too, and used by func
    f = lambda t, y: -y * b.sin() + a  # noqa: E731
    ref_a = torch.autograd.grad(
        neuralode.solve(f, torch.ones(2, dtype=torch.float64), T01, rtol=1e-10, atol=1e-12).ys[-1].sum(),
        a,
        retain_graph=True,
    )[0]
    sol = neuralode.solve(
        f, torch.ones(2, dtype=torch.float64), T01, rtol=1e-10, atol=1e-12, gradient=gradient, params=(a, b)
    )
    sol.ys[-1].sum().backward()
    assert torch.allclose(a.grad, ref_a, rtol=1e-6, atol=1e-9)


def test_complex_parameters_get_their_imaginary_gradient_under_the_adjoint():
    k = torch.tensor([0.5 + 2.0j], dtype=torch.complex128, requires_grad=True)
    y0 = torch.ones(1, dtype=torch.complex128)
    ys = neuralode.odeint_adjoint(lambda t, y: -k * y, y0, T01, adjoint_params=(k,), rtol=1e-10, atol=1e-12)
    ys[-1].real.sum().backward()
    want = (-torch.exp(-k.detach())).conj()  # d Re(exp(-k))/dk in PyTorch's convention (conjugate Wirtinger)
    assert torch.allclose(k.grad, want, rtol=1e-6)


def test_adjoint_options_add_to_the_forward_options_with_the_same_method():
    w = torch.tensor(-1.0, dtype=torch.float64, requires_grad=True)
    sol = neuralode.solve(
        _decay(w),
        torch.ones(1, dtype=torch.float64),
        T01,
        method="rk4",
        options=dict(step_size=0.01),
        gradient="adjoint",
        params=(w,),
        adjoint_options=dict(norm="seminorm"),
    )
    sol.ys[-1].sum().backward()
    assert sol.stats.nfe_backward == 4 * 100  # the backward kept step_size=0.01, not one step over [0, 1]
    assert w.grad.item() == pytest.approx(math.exp(-1), rel=1e-8)


# -------------------------------------------------------------------------------------------- half precision


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_states_are_stepped_in_float32_and_handed_back_in_their_dtype(dtype):
    seen = []

    def f(t, y):
        seen.append((t.dtype, y.dtype))
        return -y

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ys = neuralode.odeint(f, torch.ones(1, dtype=dtype), torch.tensor([0.0, 1.0]))
    assert ys.dtype == dtype and set(seen) == {(dtype, dtype)}
    # the state's own rounding (2^-9 relative for bfloat16) is the only error left: stepping in bfloat16 gave 0.89
    assert ys[-1].item() == pytest.approx(math.exp(-1), rel=torch.finfo(dtype).eps)


def test_half_precision_modules_train_through_every_gradient_mode():
    for gradient in ("backprop", "adjoint", "checkpoint"):
        torch.manual_seed(0)
        lin = torch.nn.Linear(3, 3).to(torch.bfloat16)
        f = lambda t, y, lin=lin: torch.tanh(lin(y))  # noqa: E731
        y0 = torch.ones(2, 3, dtype=torch.bfloat16, requires_grad=True)
        sol = neuralode.solve(
            f, y0, torch.tensor([0.0, 0.5]), rtol=1e-2, atol=1e-3, gradient=gradient, params=list(lin.parameters())
        )
        sol.ys[-1].float().sum().backward()
        assert sol.ys.dtype == torch.bfloat16 and y0.grad.dtype == torch.bfloat16
        assert lin.weight.grad is not None and torch.isfinite(lin.weight.grad.float()).all()


def test_a_tolerance_below_the_dtype_resolution_warns_once(monkeypatch):
    monkeypatch.setattr(_problem, "_RTOL_WARNED", set())
    with pytest.warns(UserWarning, match="rtol=1e-10 is below what torch.float32 resolves") as record:
        neuralode.odeint(lambda t, y: -y, torch.ones(1), torch.tensor([0.0, 0.1]), rtol=1e-10, atol=1e-12)
    assert record[0].filename == __file__  # points at the caller's line
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per dtype: a second solve stays silent, and so does float64
        neuralode.odeint(lambda t, y: -y, torch.ones(1), torch.tensor([0.0, 0.1]), rtol=1e-10, atol=1e-12)
        neuralode.odeint(lambda t, y: -y, torch.ones(1, dtype=torch.float64), T01, rtol=1e-10, atol=1e-12)
        neuralode.odeint(lambda t, y: -y, torch.ones(1), torch.tensor([0.0, 0.1]))  # the default 1e-7: fine


# ----------------------------------------------------------------------------------------------------- hints


def test_a_stiff_failure_recommends_the_adaptive_stiff_methods_first():
    mu = 1000.0

    def vdp(t, y):
        return torch.stack([y[1], mu * (1 - y[0] ** 2) * y[1] - y[0]])

    with pytest.raises(neuralode.MaxStepsError) as info:
        neuralode.odeint(
            vdp,
            torch.tensor([2.0, 0.0], dtype=torch.float64),
            torch.tensor([0.0, 1000.0], dtype=torch.float64),
            options=dict(max_num_steps=2000),
        )
    message = str(info.value)
    assert "stiff" in message and message.index("rodas4") < message.index("radauIIA5")


@pytest.mark.parametrize(
    "method, options", [("rk4", {"step_size": 0.1}), ("adaptive_trbdf2", None), ("reversible_heun", None)]
)
def test_compile_with_a_method_without_a_compiled_path_warns_and_runs_eagerly(method, options):
    from neuralode.compiled.cache import _WARNED

    _WARNED.clear()
    y0, t = torch.ones(2, dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match=f"method '{method}' has no compiled path"):
        got = neuralode.solve(lambda t, y: -y, y0, t, method=method, options=options, compile=True).ys
    ref = neuralode.solve(lambda t, y: -y, y0, t, method=method, options=options).ys
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
