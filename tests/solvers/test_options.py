"""Each option changes behaviour the way the documentation says."""

import pytest
import torch

import neuralode as nd

D = torch.float64


class Recorder(torch.nn.Module):
    """A vector field with every callback recorded."""

    def __init__(self, f):
        super().__init__()
        self.f = f
        self.steps, self.accepted, self.rejected = [], [], []
        self.adjoint_steps = []

    def forward(self, t, y):
        return self.f(t, y)

    def callback_step(self, t0, y0, dt):
        self.steps.append((float(t0), float(dt)))

    def callback_accept_step(self, t0, y0, dt):
        self.accepted.append((float(t0), float(dt)))

    def callback_reject_step(self, t0, y0, dt):
        self.rejected.append((float(t0), float(dt)))

    def callback_step_adjoint(self, t0, y0, dt):
        self.adjoint_steps.append(float(t0))


def test_callbacks_fire_as_often_as_the_statistics_say():
    rec = Recorder(lambda t, y: torch.cos(10 * t) * 10 * y)
    sol = nd.solve(rec, torch.ones(1, dtype=D), torch.tensor([0.0, 3.0], dtype=D), rtol=1e-8, atol=1e-8)
    assert len(rec.accepted) == sol.stats.n_steps
    assert len(rec.rejected) == sol.stats.n_rejected > 0
    assert len(rec.steps) == sol.stats.n_steps + sol.stats.n_rejected


def test_adjoint_callbacks_fire_in_the_backward_solve():
    rec = Recorder(lambda t, y: -y)
    y0 = torch.ones(1, dtype=D, requires_grad=True)
    sol = nd.solve(rec, y0, torch.tensor([0.0, 1.0], dtype=D), gradient="adjoint", params=())
    n_forward = len(rec.steps)
    sol.ys[-1].sum().backward()
    assert len(rec.steps) == n_forward  # the forward callbacks are not called backwards
    assert len(rec.adjoint_steps) == sol.stats.n_steps_backward + sol.stats.n_rejected_backward > 0
    assert rec.adjoint_steps[0] == 1.0  # the backward solve starts at the end


@pytest.mark.parametrize("kind", ["module_attribute", "function_attribute", "submodule"])
def test_callbacks_set_on_the_instance_are_found(kind):
    # callbacks looked up the way attribute access finds them: an instance attribute of a Module, an attribute
    # set on a plain function, a callable submodule
    seen = []
    if kind == "function_attribute":

        def func(t, y):
            return -y

    else:
        func = torch.nn.Module()
        func.forward = lambda t, y: -y
    if kind == "submodule":

        class Cb(torch.nn.Module):
            def forward(self, t0, y0, dt):
                seen.append(float(dt))

        func.callback_accept_step = Cb()
    else:
        func.callback_accept_step = lambda t0, y0, dt: seen.append(float(dt))
    sol = nd.solve(func, torch.ones(1, dtype=D), torch.tensor([0.0, 1.0], dtype=D))
    assert len(seen) == sol.stats.n_steps > 0


def test_zero_error_steps_grow_by_ifactor_exactly():
    rec = Recorder(lambda t, y: torch.ones_like(y))  # every RK method is exact: error estimate 0
    nd.solve(
        rec, torch.zeros(1, dtype=D), torch.tensor([0.0, 100.0], dtype=D), options={"first_step": 0.01, "ifactor": 3.0}
    )
    dts = [dt for _, dt in rec.steps[:5]]
    assert dts == pytest.approx([0.01 * 3**k for k in range(5)], rel=1e-12)


@pytest.mark.parametrize("dfactor", [0.2, 0.5])
def test_hopeless_step_shrinks_by_dfactor(dfactor):
    rec = Recorder(lambda t, y: -1000 * y)
    nd.solve(
        rec,
        torch.ones(1, dtype=D),
        torch.tensor([0.0, 1.0], dtype=D),
        options={"first_step": 1.0, "dfactor": dfactor},
        rtol=1e-8,
        atol=1e-10,
    )
    assert rec.rejected[0][1] == 1.0
    assert rec.steps[1][1] == pytest.approx(dfactor)


def test_safety_scales_the_next_step_as_the_formula_predicts():
    # after the same first (accepted) step, the next step is dt * safety * r^(-1/5): proportional to safety
    second = {}
    for safety in (0.9, 0.6):
        rec = Recorder(lambda t, y: torch.cos(t) * y)
        nd.solve(
            rec,
            torch.ones(1, dtype=D),
            torch.tensor([0.0, 1.0], dtype=D),
            rtol=1e-6,
            atol=1e-9,
            options={"first_step": 0.05, "safety": safety},
        )
        assert rec.accepted[0][1] == 0.05
        second[safety] = rec.steps[1][1]
    assert second[0.6] / second[0.9] == pytest.approx(0.6 / 0.9, rel=1e-12)


def test_pi_controller_coefficients_change_the_step_sequence():
    f = lambda t, y: torch.cos(3 * t) * y
    a = nd.solve(f, torch.ones(1, dtype=D), torch.tensor([0.0, 10.0], dtype=D))
    b = nd.solve(f, torch.ones(1, dtype=D), torch.tensor([0.0, 10.0], dtype=D), options={"pcoeff": 0.4, "icoeff": 0.3})
    assert a.stats.n_steps != b.stats.n_steps
    assert torch.allclose(a.ys, b.ys, rtol=1e-5)


def test_grid_constructor_steps_exactly_on_its_grid():
    grid = torch.tensor([0.0, 0.1, 0.35, 0.4, 0.9, 1.0], dtype=D)
    rec = Recorder(lambda t, y: -y)
    nd.odeint(
        rec,
        torch.ones(1, dtype=D),
        torch.tensor([0.0, 1.0], dtype=D),
        method="rk4",
        options={"grid_constructor": lambda func, y0, t: grid},
    )
    assert [t0 for t0, _ in rec.steps] == grid[:-1].tolist()
    assert [dt for _, dt in rec.steps] == pytest.approx((grid[1:] - grid[:-1]).tolist())


def test_step_size_and_grid_constructor_are_mutually_exclusive():
    with pytest.raises(ValueError, match="mutually exclusive"):
        nd.odeint(
            lambda t, y: -y,
            torch.ones(1),
            torch.tensor([0.0, 1.0]),
            method="euler",
            options={"step_size": 0.1, "grid_constructor": lambda f, y, t: t},
        )


@pytest.mark.parametrize("method", ["euler", "midpoint", "rk4", "heun3"])
def test_perturb_makes_a_fixed_solver_exact_on_a_jump_at_a_grid_point(method):
    # jumps at t = 1, and the value at 1 itself belongs to the left piece: a step starting at 1 that
    # evaluates exactly there sees the wrong piece unless it evaluates just after the grid point
    f = lambda t, y: torch.where(t <= 1.0, torch.ones_like(y), 2 * torch.ones_like(y))
    t = torch.tensor([0.0, 2.0], dtype=D)
    exact = 3.0
    plain = nd.odeint(f, torch.zeros(1, dtype=D), t, method=method, options={"step_size": 0.5})
    pert = nd.odeint(f, torch.zeros(1, dtype=D), t, method=method, options={"step_size": 0.5, "perturb": True})
    assert float(pert[-1]) == pytest.approx(exact, abs=1e-14)
    if method != "midpoint":  # midpoint's update uses only its middle stage, which never sits on the jump
        assert abs(float(plain[-1]) - exact) > 1e-3
    if method == "rk4":  # rk4 also evaluates at the end of a step: the right-continuous jump needs "just before"
        g = lambda t, y: torch.where(t < 1.0, torch.ones_like(y), 2 * torch.ones_like(y))
        pert = nd.odeint(g, torch.zeros(1, dtype=D), t, method=method, options={"step_size": 0.5, "perturb": True})
        assert float(pert[-1]) == pytest.approx(exact, abs=1e-14)


def test_jump_t_lets_an_adaptive_solver_cross_a_discontinuity_cheaply():
    f = lambda t, y: torch.where(t < 1.0, torch.ones_like(y), -3 * torch.ones_like(y))
    t = torch.tensor([0.0, 2.0], dtype=D)
    plain = nd.solve(f, torch.zeros(1, dtype=D), t, rtol=1e-10, atol=1e-10)
    jump = nd.solve(f, torch.zeros(1, dtype=D), t, rtol=1e-10, atol=1e-10, options={"jump_t": torch.tensor([1.0])})
    assert float(jump.ys[-1]) == pytest.approx(-2.0, abs=1e-12)
    assert jump.stats.n_rejected < plain.stats.n_rejected
    assert jump.stats.nfe < plain.stats.nfe


def test_step_t_points_are_stepped_on():
    rec = Recorder(lambda t, y: -y)
    marks = [0.123, 0.777]
    nd.odeint(rec, torch.ones(1, dtype=D), torch.tensor([0.0, 1.0], dtype=D), options={"step_t": marks})
    starts = [t0 for t0, _ in rec.accepted]
    assert all(m in starts for m in marks)


def test_user_norm_is_used_and_receives_the_tuple():
    seen = []

    def norm(x):
        seen.append(type(x))
        return max(v.abs().max() for v in x)  # max norm: stricter than RMS

    f = lambda t, s: (s[1], -s[0])
    y0 = (torch.ones(3, dtype=D), torch.zeros(3, dtype=D))
    t = torch.tensor([0.0, 5.0], dtype=D)
    a = nd.solve(f, y0, t, options={"norm": norm}, rtol=1e-6, atol=1e-6)
    b = nd.solve(f, y0, t, rtol=1e-6, atol=1e-6)
    assert seen and all(s is tuple for s in seen)
    assert a.stats.n_steps >= b.stats.n_steps


def test_first_step_is_used():
    rec = Recorder(lambda t, y: -y)
    nd.odeint(rec, torch.ones(1, dtype=D), torch.tensor([0.0, 1.0], dtype=D), options={"first_step": 0.0123})
    assert rec.steps[0][1] == pytest.approx(0.0123)


def test_time_dtype_option_is_accepted_and_validated():
    nd.odeint(lambda t, y: -y, torch.ones(1), torch.tensor([0.0, 1.0]), options={"dtype": torch.float32})
    with pytest.raises(ValueError, match="option `dtype`"):
        nd.odeint(lambda t, y: -y, torch.ones(1), torch.tensor([0.0, 1.0]), options={"dtype": torch.int32})


def test_fixed_adams_is_the_implicit_adams_alias():
    t = torch.linspace(0, 1, 5, dtype=D)
    a = nd.odeint(lambda t, y: -y * y, torch.ones(1, dtype=D), t, method="fixed_adams", options={"step_size": 0.05})
    b = nd.odeint(lambda t, y: -y * y, torch.ones(1, dtype=D), t, method="implicit_adams", options={"step_size": 0.05})
    assert torch.equal(a, b)


def test_implicit_adams_max_iters_bounds_the_corrector():
    calls = []

    def f(t, y):
        calls.append(1)
        return -y * y

    nd.odeint(
        f,
        torch.ones(1, dtype=D),
        torch.tensor([0.0, 1.0], dtype=D),
        method="implicit_adams",
        options={"step_size": 0.1, "max_iters": 1},
        rtol=0.0,
        atol=0.0,
    )
    one = len(calls)
    calls.clear()
    nd.odeint(
        f,
        torch.ones(1, dtype=D),
        torch.tensor([0.0, 1.0], dtype=D),
        method="implicit_adams",
        options={"step_size": 0.1, "max_iters": 3},
        rtol=0.0,
        atol=0.0,
    )
    # ten steps, the first three by RK4 (max_order 4 needs three past values): seven Adams steps, each
    # with one more evaluation per extra corrector iteration (tolerance 0 never declares convergence)
    assert len(calls) - one == 7 * 2


def test_adjoint_seminorm_and_user_norm_options():
    class F(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 2).double()

        def forward(self, t, y):
            return torch.tanh(self.lin(y))

    f = F()
    y0 = torch.randn(2, dtype=D)
    t = torch.tensor([0.0, 1.0], dtype=D)
    grads = []
    for opts in (None, {"norm": "seminorm"}, {"norm": lambda x: max(v.abs().max() for v in x)}):
        f.zero_grad()
        nd.odeint_adjoint(f, y0, t, adjoint_options=opts, rtol=1e-9, atol=1e-10)[-1].sum().backward()
        grads.append(f.lin.weight.grad.clone())
    for g in grads[1:]:
        assert torch.allclose(g, grads[0], atol=1e-7)
    with pytest.raises(ValueError, match="seminorm' or a callable"):
        nd.odeint_adjoint(f, y0, t, adjoint_options={"norm": "l2"})[-1].sum().backward()


@pytest.mark.parametrize(
    "options, match",
    [
        ({"safety": 2.0}, "`safety` must be at most 1"),  # would retry one rejected step size forever
        ({"safety": 0.0}, "`safety` must be a positive"),
        ({"first_step": 0.0}, r"options\['first_step'\] must be a positive finite"),
        ({"first_step": float("nan")}, r"options\['first_step'\] must be a positive finite"),
        ({"first_step": -0.1}, r"options\['first_step'\] must be a positive finite"),  # the direction follows t
        ({"first_step": torch.tensor(0.1)}, None),  # a 0-d tensor is a number
        ({"max_num_steps": 0}, r"options\['max_num_steps'\] must be a positive integer"),
        ({"max_num_steps": 2.5}, r"options\['max_num_steps'\] must be a positive integer"),
        ({"max_num_steps": float("inf")}, r"options\['max_num_steps'\] must be a positive integer"),
    ],
)
def test_step_options_are_checked_before_the_solve(options, match):
    calls = []

    def f(t, y):
        calls.append(1)
        return -y

    y0, t = torch.ones(2, dtype=D), torch.tensor([0.0, 1.0], dtype=D)
    if match is None:
        ys = nd.odeint(f, y0, t, options=options)
        torch.testing.assert_close(ys[-1], y0 * torch.exp(-t[-1]), rtol=1e-6, atol=0)
        with pytest.raises(TypeError, match=r"options\['first_step'\] must be a number, got str"):
            nd.odeint(f, y0, t, options={"first_step": "0.1"})
        return
    with pytest.raises(ValueError, match=match):
        nd.odeint(f, y0, t, options=options)
    assert not calls  # rejected up front, not after a hundred thousand rejected steps


def test_adjoint_step_options_are_checked_at_the_forward_and_named_in_backward_failures():
    torch.manual_seed(0)
    lin = torch.nn.Linear(2, 2).double()
    y0 = torch.randn(3, 2, dtype=D, requires_grad=True)
    t = torch.linspace(0, 1, 5, dtype=D)
    for bad, match in (
        ({"safety": 2.0}, "`safety` must be at most 1"),
        ({"first_step": 0.0}, r"adjoint_options\['first_step'\]"),
    ):
        with pytest.raises(ValueError, match=match):  # raised by solve(), before any backward pass
            nd.solve(lambda t, y: lin(y), y0, t, gradient="adjoint", params=lin.parameters(), adjoint_options=bad)
    sol = nd.solve(
        lambda t, y: lin(y), y0, t, gradient="adjoint", params=lin.parameters(), adjoint_options={"max_num_steps": 1}
    )
    with pytest.raises(nd.MaxStepsError, match=r"adjoint's backward solve.*Raise adjoint_options\['max_num_steps'\]"):
        sol.ys.sum().backward()
