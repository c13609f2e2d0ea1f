"""The public interface: layouts, dtypes, directions, events, statistics, failures and bad input."""

import math

import pytest
import torch

import neuralode as nd
from neuralode import MaxStepsError, NonFiniteStateError, StepSizeUnderflowError

D = torch.float64


def decay(t, y):
    return -y


# ---- layouts and dtypes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batch_dimensions_solve_each_sample(dtype):
    k = torch.tensor([[0.5], [1.0], [2.0]], dtype=dtype)
    y0 = torch.ones(3, 4, dtype=dtype)
    t = torch.linspace(0, 1, 5, dtype=dtype)
    ys = nd.odeint(lambda t, y: -k * y, y0, t, rtol=1e-6, atol=1e-8)
    assert ys.shape == (5, 3, 4) and ys.dtype == dtype
    exact = torch.exp(-k[None] * t[:, None, None]).expand(5, 3, 4)
    assert torch.allclose(ys, exact, atol=1e-5 if dtype == torch.float32 else 1e-7)


def test_tuple_state_keeps_its_structure_and_couples_entries():
    # harmonic oscillator as (position, velocity) in a tuple, of different shapes
    def f(t, state):
        x, v = state
        return v, -x

    x0, v0 = torch.ones(2, dtype=D), torch.zeros(2, dtype=D)
    t = torch.linspace(0, math.pi, 4, dtype=D)
    xs, vs = nd.odeint(f, (x0, v0), t, rtol=1e-9, atol=1e-10)
    assert xs.shape == (4, 2) and vs.shape == (4, 2)
    assert torch.allclose(xs[:, 0], torch.cos(t), atol=1e-7)
    assert torch.allclose(vs[:, 1], -torch.sin(t), atol=1e-7)


def test_time_and_state_dtypes_may_differ_and_func_sees_state_dtype():
    seen = []

    def f(t, y):
        seen.append(t.dtype)
        return -y

    ys = nd.odeint(f, torch.ones(2, dtype=torch.float32), torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert ys.dtype == torch.float32 and set(seen) == {torch.float32}


def test_backwards_integration_when_t_decreases():
    t = torch.tensor([2.0, 1.0, 0.0], dtype=D)
    ys = nd.odeint(decay, torch.tensor([math.exp(-2.0)], dtype=D), t, rtol=1e-10, atol=1e-12)
    assert torch.allclose(ys[:, 0], torch.exp(-t), rtol=1e-8)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dopri5", "rk4", "explicit_adams"])
def test_backward_then_forward_returns_to_start(method):
    f = lambda t, y: torch.stack([y[1], -torch.sin(y[0])])  # pendulum
    y0 = torch.tensor([1.0, 0.0], dtype=D)
    opts = None if method == "dopri5" else {"step_size": 1e-3}
    y1 = nd.odeint(f, y0, torch.tensor([0.0, 3.0], dtype=D), method=method, options=opts, rtol=1e-10, atol=1e-12)[-1]
    back = nd.odeint(f, y1, torch.tensor([3.0, 0.0], dtype=D), method=method, options=opts, rtol=1e-10, atol=1e-12)[-1]
    assert torch.allclose(back, y0, atol=1e-8)


def test_single_time_returns_y0():
    ys = nd.odeint(decay, torch.ones(3), torch.tensor([0.5]))
    assert ys.shape == (1, 3) and torch.equal(ys[0], torch.ones(3))


def test_first_row_is_y0_exactly():
    y0 = torch.randn(5, dtype=D)
    assert torch.equal(nd.odeint(decay, y0, torch.tensor([0.0, 1.0], dtype=D))[0], y0)


# ---- statistics and dense output -------------------------------------------------------------------------


def test_stats_count_every_function_evaluation():
    calls = []

    def f(t, y):
        calls.append(1)
        return -y

    sol = nd.solve(f, torch.ones(2, dtype=D), torch.linspace(0, 5, 4, dtype=D), dense=False)
    assert sol.stats.nfe == len(calls)
    # dopri5 (FSAL): 6 new evaluations per attempted step, plus f(t0) and the initial-step probe
    assert sol.stats.nfe == 6 * (sol.stats.n_steps + sol.stats.n_rejected) + 2


def test_requested_times_do_not_force_steps():
    few = nd.solve(decay, torch.ones(1, dtype=D), torch.tensor([0.0, 10.0], dtype=D))
    many = nd.solve(decay, torch.ones(1, dtype=D), torch.linspace(0, 10, 200, dtype=D))
    assert many.stats.n_steps == few.stats.n_steps
    assert torch.allclose(many.ys[:, 0], torch.exp(-torch.linspace(0, 10, 200, dtype=D)), rtol=1e-6)


def test_solution_interpolate_between_requested_times():
    sol = nd.solve(decay, torch.ones(1, dtype=D), torch.tensor([0.0, 4.0], dtype=D), rtol=1e-9, atol=1e-12)
    tq = torch.tensor([0.1, 1.7, 3.99], dtype=D)
    assert torch.allclose(sol.interpolate(tq)[:, 0], torch.exp(-tq), rtol=1e-7)
    with pytest.raises(ValueError, match="outside the solved interval"):
        sol.interpolate(torch.tensor([5.0]))


def test_odeint_dense_returns_a_callable():
    fn = nd.odeint_dense(decay, torch.ones(1, dtype=D), torch.tensor(0.0), torch.tensor(2.0), rtol=1e-9, atol=1e-12)
    assert abs(float(fn(torch.tensor(1.3))[0]) - math.exp(-1.3)) < 1e-7


def test_scipy_solver_matches_analytic_solution():
    pytest.importorskip("scipy")
    t = torch.linspace(0, 2, 5, dtype=D)
    ys = nd.odeint(
        decay, torch.ones(2, dtype=D), t, method="scipy_solver", options={"solver": "DOP853"}, rtol=1e-10, atol=1e-12
    )
    assert torch.allclose(ys[:, 0], torch.exp(-t), rtol=1e-8)


# ---- events ----------------------------------------------------------------------------------------------


def test_event_time_of_a_falling_ball_matches_the_formula():
    g, h0 = 9.81, 10.0
    f = lambda t, y: torch.stack([y[1], torch.full_like(y[1], -g)])
    t_ev, ys = nd.odeint_event(
        f,
        torch.tensor([h0, 0.0], dtype=D),
        torch.tensor(0.0, dtype=D),
        event_fn=lambda t, y: y[0],
        rtol=1e-10,
        atol=1e-12,
    )
    assert abs(float(t_ev) - math.sqrt(2 * h0 / g)) < 1e-10
    assert ys.shape == (2, 2) and abs(float(ys[-1, 0])) < 1e-9


@pytest.mark.parametrize("method,options", [("tsit5", None), ("rk4", {"step_size": 0.01})])
def test_event_through_odeint_event_fn_form(method, options):
    t_ev, ys = nd.odeint(
        lambda t, y: torch.ones_like(y),
        torch.tensor([0.0], dtype=D),
        torch.tensor([0.0], dtype=D),
        event_fn=lambda t, y: y[0] - 0.737,
        method=method,
        options=options,
    )
    assert abs(float(t_ev) - 0.737) < 1e-9


def test_event_in_reverse_time():
    t_ev, _ = nd.odeint_event(
        lambda t, y: torch.ones_like(y),
        torch.tensor([0.0], dtype=D),
        torch.tensor(0.0, dtype=D),
        event_fn=lambda t, y: y[0] + 0.5,
        reverse_time=True,
    )
    assert abs(float(t_ev) + 0.5) < 1e-9


def test_first_of_several_events_is_found():
    f = lambda t, y: torch.ones_like(y)
    t_ev, _ = nd.odeint_event(
        f,
        torch.tensor([0.0], dtype=D),
        torch.tensor(0.0, dtype=D),
        event_fn=lambda t, y: torch.stack([y[0] - 2.0, y[0] - 0.3]),
    )
    assert abs(float(t_ev) - 0.3) < 1e-9


# ---- failures --------------------------------------------------------------------------------------------


def test_step_size_underflow_names_the_time_and_suggests_remedies():
    # y' = y², y(0) = 1 blows up at t = 1
    with pytest.raises(StepSizeUnderflowError, match=r"step size underflow at t=(0\.99|1\.0)") as info:
        nd.odeint(lambda t, y: y * y, torch.ones(1, dtype=D), torch.tensor([0.0, 2.0], dtype=D))
    assert "stiff" in str(info.value) and info.value.t == pytest.approx(1.0, abs=1e-2)


def test_max_num_steps_says_how_far_it_got_and_partial_solution_can_be_returned():
    f = lambda t, y: torch.cos(50 * t) * 50 * y
    t = torch.linspace(0, 10, 11, dtype=D)
    with pytest.raises(MaxStepsError, match="max_num_steps=50 exceeded at t="):
        nd.odeint(f, torch.ones(1, dtype=D), t, options={"max_num_steps": 50})
    sol = nd.solve(f, torch.ones(1, dtype=D), t, options={"max_num_steps": 50}, on_failure="return")
    assert sol.status == nd.Status.MAX_STEPS and not sol.success
    assert 0 < len(sol.ts) < len(t) and sol.ys.shape[0] == len(sol.ts)
    assert torch.allclose(sol.ys[:, 0], torch.exp(torch.sin(50 * sol.ts)), rtol=1e-5)


def test_nan_from_func_is_reported_with_its_time():
    f = lambda t, y: torch.where(t > 0.5, torch.full_like(y, float("nan")), -y)
    with pytest.raises(NonFiniteStateError, match=r"NaN or Inf just after t=0\.5"):
        nd.odeint(f, torch.ones(1, dtype=D), torch.tensor([0.0, 1.0], dtype=D))


def test_nan_in_y0_is_reported():
    with pytest.raises(NonFiniteStateError, match="check y0"):
        nd.odeint(decay, torch.tensor([float("nan")], dtype=D), torch.tensor([0.0, 1.0], dtype=D))


def test_nan_in_fixed_step_solve_is_reported_with_an_interval():
    with pytest.raises(NonFiniteStateError, match="between t="):
        nd.odeint(
            lambda t, y: y * y,
            torch.ones(1, dtype=D),
            torch.linspace(0, 10, 6, dtype=D),
            method="euler",
            options={"step_size": 0.5},
        )


@pytest.mark.parametrize(
    "t,match",
    [
        ([0.0, 1.0, 1.0], r"strictly increasing or strictly decreasing; t\[2\] = 1 follows t\[1\] = 1"),
        ([0.0, 2.0, 1.0], r"t\[2\] = 1 follows"),
        ([[0.0, 1.0]], "must be 1-D"),
        ([0.0, float("inf")], "must be finite"),
    ],
)
def test_bad_times_are_rejected_with_the_offending_entry(t, match):
    with pytest.raises(ValueError, match=match):
        nd.odeint(decay, torch.ones(1), torch.tensor(t))


def test_integer_times_are_rejected():
    with pytest.raises(TypeError, match="`t` must be a floating point tensor"):
        nd.odeint(decay, torch.ones(1), torch.tensor([0, 1]))


def test_integer_state_is_rejected():
    with pytest.raises(TypeError, match="`y0` must be a floating point tensor"):
        nd.odeint(decay, torch.ones(1, dtype=torch.int64), torch.tensor([0.0, 1.0]))


def test_func_returning_the_wrong_shape_is_named():
    with pytest.raises(ValueError, match=r"`func` returned shape \(3,\) but the state `y0` has shape \(2,\)"):
        nd.odeint(lambda t, y: torch.ones(3), torch.ones(2), torch.tensor([0.0, 1.0]))


def test_func_returning_the_wrong_dtype_is_named():
    with pytest.raises(TypeError, match="`func` returned dtype torch.float64 but `y0` has dtype torch.float32"):
        nd.odeint(lambda t, y: -y.double(), torch.ones(2), torch.tensor([0.0, 1.0]))


def test_mixed_tuple_dtypes_are_rejected():
    with pytest.raises(TypeError, match="share a dtype"):
        nd.odeint(lambda t, s: s, (torch.ones(1), torch.ones(1, dtype=D)), torch.tensor([0.0, 1.0]))


def test_unknown_method_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown method 'rk45'; valid methods: dopri5, tsit5"):
        nd.odeint(decay, torch.ones(1), torch.tensor([0.0, 1.0]), method="rk45")


def test_unknown_option_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['stepsize'\] for method 'rk4'; valid options"):
        nd.odeint(decay, torch.ones(1), torch.tensor([0.0, 1.0]), method="rk4", options={"stepsize": 0.1})


def test_negative_tolerance_is_rejected():
    with pytest.raises(ValueError, match="`rtol` must be finite and non-negative"):
        nd.odeint(decay, torch.ones(1), torch.tensor([0.0, 1.0]), rtol=-1.0)


def test_tolerance_tensor_of_wrong_shape_is_rejected():
    with pytest.raises(ValueError, match="`atol` of shape \\(3,\\) does not broadcast"):
        nd.odeint(decay, torch.ones(2), torch.tensor([0.0, 1.0]), atol=torch.ones(3))


def test_min_step_is_a_floor_at_which_steps_are_accepted_as_in_torchdiffeq():
    """torchdiffeq's min_step: no step below it (but to land on an output time), and a step at it is accepted
    whatever its error estimate; joint, per-sample and compiled loops alike."""

    def f(t, y):
        return torch.cos(100 * t) * 100 * y

    t = torch.tensor([0.0, 1.0], dtype=D)
    free = nd.solve(f, torch.ones(1, dtype=D), t)
    floor = nd.solve(f, torch.ones(1, dtype=D), t, options={"min_step": 0.05})
    assert free.stats.n_steps > 100 and floor.stats.n_steps <= 21

    def f_rows(t, y):  # (t: one time per sample)
        return torch.cos(100 * t)[:, None] * 100 * y

    per_sample = nd.solve(f_rows, torch.ones(2, 1, dtype=D), t, options={"min_step": 0.05}, per_sample=True)
    assert per_sample.sample_stats["n_steps"].tolist() == [floor.stats.n_steps] * 2
    torch.testing.assert_close(per_sample.ys[:, 0], floor.ys, rtol=1e-12, atol=1e-12)


def test_max_step_caps_the_step():
    sol = nd.solve(decay, torch.ones(1, dtype=D), torch.tensor([0.0, 10.0], dtype=D), options={"max_step": 0.5})
    assert sol.stats.n_steps >= 20


def test_vmap_over_a_solve_gets_a_clear_error_and_jacrev_works():
    net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
    y0, t = torch.randn(5, 3, dtype=D), torch.linspace(0, 1, 3, dtype=D)
    with pytest.raises(RuntimeError, match="cannot run under torch.func.vmap.*per_sample=True"):
        torch.func.vmap(lambda y: nd.odeint(lambda tt, x: net(x), y, t)[-1])(y0)
    with pytest.raises(RuntimeError, match="cannot run under torch.func.vmap"):  # batched through func only
        torch.func.vmap(lambda k: nd.odeint(lambda tt, x: -k * x, y0[0], t)[-1])(torch.rand(4, dtype=D))
    # function transforms that do not batch work: the Jacobian of y(1) against y(0), by central differences
    J = torch.func.jacrev(lambda y: nd.odeint(lambda tt, x: net(x), y, t, rtol=1e-10, atol=1e-10)[-1])(y0[0])
    eps, fd = 1e-6, torch.empty(3, 3, dtype=D)
    for j in range(3):
        e = torch.zeros(3, dtype=D)
        e[j] = eps
        hi = nd.odeint(lambda tt, x: net(x), y0[0] + e, t, rtol=1e-10, atol=1e-10)[-1]
        lo = nd.odeint(lambda tt, x: net(x), y0[0] - e, t, rtol=1e-10, atol=1e-10)[-1]
        fd[:, j] = (hi - lo) / (2 * eps)
    torch.testing.assert_close(J.detach(), fd.detach(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("grad", [False, True])
def test_min_step_in_the_compiled_loops_as_in_the_eager_one(grad):
    """compile=True: without gradients the whole loop is compiled, with backprop each step is; both keep the
    floor and accept at it as the eager loop does."""

    def f(t, y):
        return torch.cos(100 * t) * 100 * y

    t = torch.tensor([0.0, 1.0], dtype=D)
    y0 = torch.ones(1, dtype=D, requires_grad=grad)
    eager = nd.solve(f, y0, t, options={"min_step": 0.05})
    with torch.set_grad_enabled(grad):
        compiled = nd.solve(f, y0, t, options={"min_step": 0.05}, compile="aot_eager")
    assert compiled.stats.n_steps == eager.stats.n_steps
    torch.testing.assert_close(compiled.ys, eager.ys, rtol=1e-12, atol=1e-12)
