"""compile=True: the fused step gives the eager solver's steps and values, up to floating-point reassociation."""

import warnings

import pytest
import torch
from helpers import every_fallback_warns, needs_cxx  # noqa: F401 (an autouse fixture)

import neuralode as node


def _vdp(mus):
    def f(t, y):
        return torch.stack([y[..., 1], mus * (1 - y[..., 0] ** 2) * y[..., 1] - y[..., 0]], -1)

    return f


def _problem():
    g = torch.Generator().manual_seed(0)
    mus = 0.5 + 3 * torch.rand(32, generator=g, dtype=torch.float64)
    y0 = torch.randn(32, 2, generator=g, dtype=torch.float64)
    return _vdp(mus), y0, torch.linspace(0, 5, 30, dtype=torch.float64)


@pytest.mark.parametrize(
    "backend, method",
    # every method through aot_eager; one Inductor compilation (the slow one) is enough for CI time
    [
        ("aot_eager", "dopri5"),
        ("aot_eager", "tsit5"),
        ("aot_eager", "bosh3"),
        pytest.param("inductor", "dopri5", marks=needs_cxx),
    ],
)
def test_compiled_solve_matches_the_eager_solve(backend, method):
    f, y0, t = _problem()
    with torch.no_grad():
        eager = node.solve(f, y0, t, method=method, rtol=1e-7, atol=1e-9, dense=False)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            comp = node.solve(f, y0, t, method=method, rtol=1e-7, atol=1e-9, compile=backend)
    _no_fallback(caught)  # a compiled path that fails and falls back to eager is a failure, not a skip
    assert (comp.stats.nfe, comp.stats.n_steps, comp.stats.n_rejected) == (
        eager.stats.nfe,
        eager.stats.n_steps,
        eager.stats.n_rejected,
    )
    torch.testing.assert_close(comp.ys, eager.ys, rtol=1e-10, atol=1e-11)


def _per_sample_eager_and_compiled(f, y0, t):
    """Per-sample solves, eager and through the compiled loop (which must not fall back)."""
    with torch.no_grad():
        eager = node.solve(f, y0, t, rtol=1e-7, atol=1e-9, per_sample=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            comp = node.solve(f, y0, t, rtol=1e-7, atol=1e-9, per_sample=True, compile="aot_eager")
    _no_fallback(caught)
    return eager, comp


def _no_fallback(caught):
    bad = [w for w in caught if "compile=True" in str(w.message)]
    assert not bad, bad[0].message


@pytest.mark.parametrize("gradient", ["backprop", "checkpoint"])
def test_gradients_through_the_compiled_step_equal_the_eager_ones(gradient, monkeypatch):
    """Backprop through the compiled step; checkpointing records its accepted steps and rebuilds each through
    the compiled step again."""
    from neuralode.gradients import checkpoint

    replays = []
    real = checkpoint._compiled_replay
    monkeypatch.setattr(checkpoint, "_compiled_replay", lambda *a: replays.append(real(*a)) or replays[-1])
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2)).double()
    y0 = torch.randn(8, 2, dtype=torch.float64)
    t = torch.linspace(0, 1, 4, dtype=torch.float64)
    grads, values = [], []
    for mode in (False, "aot_eager"):
        net.zero_grad()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sol = node.solve(
                lambda t, y: net(y),
                y0,
                t,
                rtol=1e-8,
                atol=1e-9,
                compile=mode,
                gradient=gradient,
                params=list(net.parameters()),
                dense=False,
            )
        _no_fallback(caught)
        sol.ys.pow(2).sum().backward()
        values.append(sol.ys.detach())
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
        if gradient == "backprop":
            assert sol.stats.nfe_backward == sol.stats.nfe
    torch.testing.assert_close(values[1], values[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-10, atol=1e-12)
    if gradient == "checkpoint":  # (eager, then compiled)
        assert len(replays) == 2 and replays[0] is None and replays[1] is not None


def test_compile_falls_back_to_eager_with_a_warning_where_unsupported():
    f, y0, t = _problem()
    y0 = y0.clone().requires_grad_(True)
    with pytest.warns(RuntimeWarning, match="compile=True does not support tuple states"):
        sol = node.solve(lambda t, y: (f(t, y[0]),), (y0,), t, rtol=1e-7, atol=1e-9, compile="aot_eager")
    ref = node.solve(f, y0, t, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(sol.ys[0], ref.ys)
    sol.ys[0][-1].sum().backward()
    assert y0.grad is not None


@pytest.mark.parametrize("backwards", [False, True])
def test_per_sample_compiled_loop_takes_each_samples_own_steps(backwards):
    f, y0, t = _problem()
    if backwards:  # van der Pol repels in reverse time: a damped oscillator with per-sample frequencies
        w = torch.linspace(0.5, 4.0, y0.shape[0], dtype=torch.float64)

        def f(t, y):
            return torch.stack([w * y[..., 1], -w * y[..., 0] - 0.1 * y[..., 1]], -1)

        t = t.flip(0)
    eager, comp = _per_sample_eager_and_compiled(f, y0, t)
    for k in ("n_steps", "n_rejected", "nfe"):
        assert torch.equal(comp.sample_stats[k], eager.sample_stats[k]), k
    assert comp.stats.nfe == eager.stats.nfe
    torch.testing.assert_close(comp.ys, eager.ys, rtol=1e-10, atol=1e-11)


def test_device_loop_matches_scipy_when_many_outputs_fall_in_one_step():
    """Many requested times inside each step: they come from the recorded continuous extension, the steps are
    the eager solver's, and the values are right (scipy's DOP853 at rtol 1e-12 as the reference)."""
    scipy_integrate = pytest.importorskip("scipy.integrate")
    y0 = torch.tensor([[1.0, 0.0], [0.5, 0.5]], dtype=torch.float64)

    def f(t, y):  # harmonic oscillator with slow damping: smooth, big steps
        return torch.stack([y[..., 1], -y[..., 0] - 0.1 * y[..., 1]], -1)

    t = torch.linspace(0, 10, 2000, dtype=torch.float64)
    with torch.no_grad():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            comp = node.solve(f, y0, t, rtol=1e-8, atol=1e-10, compile="aot_eager")
            per = node.solve(f, y0, t, rtol=1e-8, atol=1e-10, compile="aot_eager", per_sample=True)
        eager = node.solve(f, y0, t, rtol=1e-8, atol=1e-10)
    _no_fallback(caught)
    assert (comp.stats.n_steps, comp.stats.nfe) == (eager.stats.n_steps, eager.stats.nfe)
    assert eager.stats.n_steps < len(t) / 10  # so that many requested times fall in each step
    ref = scipy_integrate.solve_ivp(
        lambda s, z: [z[1], -z[0] - 0.1 * z[1], z[3], -z[2] - 0.1 * z[3]],
        (0, 10),
        y0.flatten().tolist(),
        t_eval=t.numpy(),
        method="DOP853",
        rtol=1e-12,
        atol=1e-12,
    ).y.T.reshape(-1, 2, 2)
    ref = torch.from_numpy(ref)
    for sol in (comp, per, eager):
        assert float((sol.ys - ref).abs().max()) < 1e-6


def test_device_loop_reports_max_num_steps_and_underflow():
    f, y0, t = _problem()
    with torch.no_grad():
        with pytest.raises(node.MaxStepsError, match="max_num_steps"):
            node.solve(f, y0, t, compile="aot_eager", options={"max_num_steps": 10})
        sol = node.solve(f, y0, t, compile="aot_eager", options={"max_num_steps": 10}, on_failure="return")
        assert sol.stats.n_steps + sol.stats.n_rejected == 10 and sol.ys.shape[0] < len(t)

        def blowup(t, y):  # y' = y², y(0) = 1: the solution ends at t = 1
            return y * y

        with pytest.raises(node.StepSizeUnderflowError, match="underflow"):
            node.solve(
                blowup,
                torch.ones(4, 1, dtype=torch.float64),
                torch.tensor([0.0, 2.0], dtype=torch.float64),
                compile="aot_eager",
                per_sample=True,
            )


@pytest.mark.parametrize("gradient", ["adjoint", "backprop"])
def test_an_ode_block_is_compiled_once_not_every_training_iteration(gradient):
    from neuralode.compiled import loop as device_loop
    from neuralode.compiled import step as compiled
    from neuralode.nn import ODEBlock

    class Field(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))

        def forward(self, t, y):
            return self.net(y)

    torch.manual_seed(0)
    block = ODEBlock(Field(), gradient=gradient, compile="aot_eager")
    x = torch.randn(8, 3)
    sizes = []
    for _ in range(3):
        block(x).pow(2).sum().backward()
        sizes.append((len(device_loop._CACHE), len(compiled._CACHE)))
    assert sizes[0] == sizes[1] == sizes[2]  # later iterations reuse what the first one compiled
    fn = device_loop._CACHE.owned_by(block.func) + compiled._CACHE.owned_by(block.func)
    assert fn, "the block's field has a compiled entry"


@pytest.mark.parametrize("per_sample", [False, True])
def test_device_loop_names_a_state_that_turns_nan(per_sample):
    def f(t, y):  # NaN from t = 0.5 on (per-sample stepping passes one time per sample)
        t = t if t.ndim == 0 else t[:, None]
        return torch.where(t < 0.5, -y, torch.full_like(y, float("nan")))

    y0 = torch.ones(4, 2, dtype=torch.float64)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    with torch.no_grad(), pytest.raises(node.NonFiniteStateError, match=r"NaN or Inf just after t=0\.[45]"):
        node.solve(f, y0, t, compile="aot_eager", per_sample=per_sample)


def test_per_sample_compiled_loop_on_wide_states():
    """Samples of 16 entries (the loop keeps them row-major, unlike the 2-entry van der Pol states)."""
    torch.manual_seed(0)
    A = torch.randn(16, 16, dtype=torch.float64) / 4 - torch.eye(16, dtype=torch.float64)
    rates = torch.linspace(0.5, 3.0, 6, dtype=torch.float64)

    def f(t, y):
        return rates[:, None] * torch.tanh(y @ A.T)

    y0 = torch.randn(6, 16, dtype=torch.float64)
    t = torch.linspace(0, 2, 7, dtype=torch.float64)
    eager, comp = _per_sample_eager_and_compiled(f, y0, t)
    assert torch.equal(comp.sample_stats["n_steps"], eager.sample_stats["n_steps"])
    assert len(set(eager.sample_stats["n_steps"].tolist())) > 1  # the samples really step differently
    torch.testing.assert_close(comp.ys, eager.ys, rtol=1e-10, atol=1e-11)


@pytest.mark.parametrize("norm", [None, "seminorm"])
def test_adjoint_backward_in_the_compiled_loop_equals_the_eager_adjoint(norm):
    """compile=True runs the adjoint's backward solve (func and its vector-Jacobian products by torch.func)
    in the fused loop: the same steps and, up to reassociation, the same gradients as the eager adjoint."""
    from neuralode.compiled import loop as device_loop
    from neuralode.gradients import adjoint

    class Field(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))

        def forward(self, t, y):
            return self.net(y) * torch.cos(t)

    torch.manual_seed(0)
    field = Field().double()
    y0 = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 0.4, 1.1, 1.5], dtype=torch.float64, requires_grad=True)
    got = []
    for mode in (False, "aot_eager"):
        field.zero_grad()
        y0.grad = t.grad = None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sol = node.solve(
                field,
                y0,
                t,
                rtol=1e-8,
                atol=1e-9,
                gradient="adjoint",
                adjoint_options=None if norm is None else {"norm": norm},
                compile=mode,
            )
            (sol.ys**2).sum().backward()
        _no_fallback(caught)
        s = sol.stats
        got.append(
            (
                (s.nfe_backward, s.n_steps_backward, s.n_rejected_backward),
                [y0.grad, t.grad] + [p.grad for p in field.parameters()],
            )
        )
    assert got[1][0] == got[0][0]
    for g_comp, g_eager in zip(got[1][1], got[0][1]):
        torch.testing.assert_close(g_comp, g_eager, rtol=1e-10, atol=1e-12)
    augs = [v[0] for v in adjoint._AUG_CACHE.owned_by(field)]
    assert augs and device_loop._CACHE.owned_by(augs[0]), "the backward ran compiled"


def test_adjoint_backward_stays_eager_with_a_warning_for_foreign_parameters():
    torch.manual_seed(0)
    w = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    y0 = torch.randn(4, 3, dtype=torch.float64)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    grads = []
    for mode in (False, "aot_eager"):
        w.grad = None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sol = node.solve(
                lambda t, y: torch.tanh(y @ w), y0, t, gradient="adjoint", params=[w], rtol=1e-8, compile=mode
            )
            sol.ys[-1].sum().backward()
        grads.append(w.grad.clone())
    assert any("backward solve runs eagerly" in str(c.message) for c in caught)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("with_params", [True, False])
def test_adjoint_backward_of_a_closure_compiled_with_the_seminorm(with_params):
    """A closure's parameters (torch.func cannot substitute them): with the seminorm, or none to integrate, the
    compiled loop solves [y, a] and a quadrature adds dL/dθ over its accepted steps; the steps are the eager
    backward's and the gradients equal its to rounding."""
    from neuralode.compiled import loop as device_loop
    from neuralode.gradients import adjoint

    torch.manual_seed(2)
    w = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    y0 = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 0.5, 1.3], dtype=torch.float64)

    def f(tt, y):
        return torch.tanh(y @ w) * (1 + 0.5 * torch.sin(tt))

    got = []
    for mode in (False, "aot_eager"):
        w.grad = y0.grad = None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sol = node.solve(
                f,
                y0,
                t,
                gradient="adjoint",
                params=[w] if with_params else [],
                adjoint_options={"norm": "seminorm"} if with_params else None,
                rtol=1e-8,
                atol=1e-9,
                compile=mode,
            )
            (sol.ys**2).sum().backward()
        _no_fallback(caught)
        got.append(((sol.stats.n_steps_backward, sol.stats.n_rejected_backward), y0.grad.clone(), w.grad))
    assert got[1][0] == got[0][0]
    torch.testing.assert_close(got[1][1], got[0][1], rtol=1e-10, atol=1e-12)
    if with_params:
        torch.testing.assert_close(got[1][2], got[0][2], rtol=1e-10, atol=1e-12)
    else:
        assert got[0][2] is None and got[1][2] is None
    augs = [v[0] for v in adjoint._AUG_CACHE.owned_by(f)]
    assert augs and device_loop._CACHE.owned_by(augs[0]), "the backward ran compiled"


def test_attempts_per_compiled_call_follow_the_cost_of_func():
    from neuralode.compiled.loop import _UNROLL, _choose_unroll, _unroll_key

    def cheap(t, y):
        return y

    def costly(t, y):
        return y

    shape = torch.Size([2, 3])
    assert _choose_unroll(cheap, shape, torch.float32, torch.device("cpu"), [4e-4, 3e-4], 6) == 4
    assert _choose_unroll(cheap, shape, torch.float32, torch.device("cpu"), [2e-5, 1e-5], 6, True) == 4
    # a cheap func: eight attempts per call on a long solve (many initial steps over the span), four on a short one
    assert _choose_unroll(lambda t, y: y, shape, torch.float32, torch.device("cpu"), [2e-5, 1e-5], 6, False, 500) == 8
    assert _choose_unroll(lambda t, y: y, shape, torch.float32, torch.device("cpu"), [2e-5, 1e-5], 6, False, 20) == 4
    # a solve of a step or two (the adjoint's backward segments): no attempts to throw away
    assert _choose_unroll(lambda t, y: y, shape, torch.float32, torch.device("cpu"), [], 6, False, 1.5) == 1
    assert _choose_unroll(lambda t, y: y, shape, torch.float32, torch.device("cpu"), [], 6, False, 5) == 2
    assert _choose_unroll(costly, shape, torch.float32, torch.device("cpu"), [5e-3, 4e-3], 6) == 1
    # decided once per func: a later, faster timing does not compile a second loop
    assert _choose_unroll(costly, shape, torch.float32, torch.device("cpu"), [1e-5], 6) == 1
    # no timed call (f0 and first_step given): large states count as expensive
    assert _choose_unroll(lambda t, y: y, shape, torch.float32, torch.device("cpu"), [], 1 << 20) == 1
    # the starting step is compiled only for a func whose calls were timed cheap
    cpu = torch.device("cpu")
    assert _UNROLL.get(_unroll_key(cheap, shape, torch.float32, cpu, False), cheap)[1] is True
    assert _UNROLL.get(_unroll_key(costly, shape, torch.float32, cpu, False), costly)[1] is False


def test_direct_calls_of_the_compiled_loop_change_nothing(monkeypatch):
    """The compiled loop calls its compiled entry without TorchDynamo's frame hook (guards checked by hand for a
    solve's first two calls, skipped after): same steps, statistics and values, bit for bit, as Dynamo's calls."""
    from neuralode.compiled import loop as device_loop

    f, y0, t = _problem()
    direct_calls = []
    real_call = device_loop.DirectCall.__call__

    def spy(self, *args):
        direct_calls.append(1)
        return real_call(self, *args)

    monkeypatch.setattr(device_loop.DirectCall, "__call__", spy)
    runs = []
    # a fresh func: the first solve compiles (Dynamo runs its first two calls), the second is Dynamo's
    # throughout, the third calls directly throughout (its guards checked by hand on the first two calls)
    for no_direct in (False, True, False):
        monkeypatch.setattr(device_loop, "_NO_DIRECT", no_direct)
        before = len(direct_calls)
        with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sol = node.solve(f, y0, t, rtol=1e-7, atol=1e-9, per_sample=True, compile="aot_eager")
        _no_fallback(caught)
        runs.append((sol, len(direct_calls) - before))
    (first, n_first), (guarded, n_guarded), (third, n_third) = runs
    assert n_guarded == 0 and n_first > 0 and n_third == n_first + 2
    for sol in (first, third):
        assert torch.equal(sol.ys, guarded.ys)
        for k in ("n_steps", "n_rejected", "nfe"):
            assert torch.equal(sol.sample_stats[k], guarded.sample_stats[k]), k


def test_direct_calls_respect_the_guards_when_func_changes():
    """A Python attribute that func reads is a guarded constant of the compiled loop: after it changes, the
    solve must see the new value (Dynamo recompiles; a direct call into the old entry would be silently
    wrong). Reference: the analytic solution y0·exp(-k t)."""

    class Decay(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.k = 1.0

        def forward(self, t, y):
            return -self.k * y

    f = Decay()
    y0 = torch.linspace(0.5, 1.5, 8, dtype=torch.float64)[:, None].repeat(1, 2)
    t = torch.linspace(0, 3, 12, dtype=torch.float64)
    for k in (1.0, 1.0, 2.0, 2.0):
        f.k = k
        with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sol = node.solve(f, y0, t, rtol=1e-9, atol=1e-11, compile="aot_eager")
        _no_fallback(caught)
        assert sol.stats.n_steps > 8  # several compiled calls
        exact = y0[None] * torch.exp(-k * t)[:, None, None]
        torch.testing.assert_close(sol.ys, exact, rtol=1e-7, atol=1e-9)


def test_direct_call_only_for_a_single_compiled_entry_whose_guards_pass():
    from neuralode.compiled.loop import DirectCall
    from neuralode.compiled.step import fresh_code

    scale = {"s": 2.0}

    def g(x, y):
        return x.sin() * y * scale["s"], x + 1

    fn = torch.compile(fresh_code(g), backend="aot_eager", dynamic=False, fullgraph=True)
    x, y = torch.randn(3), torch.randn(3)
    assert DirectCall.of(fn) is None  # nothing compiled yet
    fn(x, y)
    direct = DirectCall.of(fn)
    assert direct is not None and direct.passes((x, y))
    for a, b in zip(direct(x, y), g(x, y)):
        torch.testing.assert_close(a, b)
    assert not direct.passes((torch.randn(4), torch.randn(4)))  # another shape
    assert not direct.passes((x.double(), y.double()))  # another dtype
    scale["s"] = 3.0
    assert not direct.passes((x, y))  # a value the graph baked in
    scale["s"] = 2.0
    with torch.no_grad():
        assert not direct.passes((x, y))  # grad mode is guarded too
    with torch.compiler.set_stance("force_eager"):  # the user's stance is obeyed, not bypassed
        assert DirectCall.of(fn) is None
    fn(torch.randn(4), torch.randn(4))  # a second entry: which one applies is for Dynamo to say
    assert DirectCall.of(fn) is None
    assert DirectCall.of(g) is None  # not a compiled function


@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("direction", [1.0, -1.0])
def test_compiled_starting_step_equals_the_eager_one(per_sample, direction):
    """The device loop's compiled starting step (used from a func's second solve on) is Hairer's, as the eager
    ``control.initial_step`` (joint) and ``control.initial_steps`` compute it."""
    import math

    from neuralode.compiled.loop import _init_step
    from neuralode.solvers.control import initial_step, initial_steps

    f, y0, _ = _problem()
    G = y0.shape[0] if per_sample else 1
    y = y0.reshape(G, -1)
    shape = y0.shape
    t = torch.full((G,), 0.5, dtype=torch.float64)
    order, rtol, atol, max_step = 5, 1e-6, 1e-8, 0.3

    def F(tt, yy):
        return f(tt if per_sample else tt[0], yy.reshape(shape)).reshape(yy.shape)

    with torch.no_grad():
        k0 = F(t, y)
        init = _init_step(f, shape, G, y.shape[1], per_sample, direction, order, rtol, atol, max_step,
                          torch.float64, torch.device("cpu"), "aot_eager")  # fmt: skip
        got = init(t, y, k0)
        if per_sample:
            want = initial_steps(F, t, y, k0, direction, order, rtol, atol).clamp(max=max_step) * direction
        else:
            h, _ = initial_step(
                lambda tt, yy: F(torch.full((1,), tt, dtype=torch.float64), yy),
                0.5, y, k0, direction, order, rtol, atol,
                lambda x: float(torch.linalg.vector_norm(x)) / math.sqrt(x.numel()),
            )  # fmt: skip
            want = torch.full((1,), math.copysign(min(abs(h), max_step), direction), dtype=torch.float64)
    assert got.shape == (G,) and bool((got * direction > 0).all())
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    assert bool((got.abs() < max_step).any())  # the clamp is not all that was tested


@pytest.mark.parametrize("direction", [1.0, -1.0])
def test_per_sample_output_times_in_the_compiled_loop(direction, monkeypatch):
    """t of shape (batch, m), each sample its own start, end and irregular times: the compiled loop takes the
    eager per-sample loop's steps and gives its values. The recorded attempts are evaluated and dropped after
    every call, so a record that some sample still needs must not be dropped (samples end at different
    times: one that is done early must not hold the others' outputs back, nor lose theirs)."""
    from neuralode.compiled import loop as device_loop

    monkeypatch.setattr(device_loop, "_RECORD_BYTES", 0)
    mus = torch.tensor([0.5, 1.0, 2.0, 4.0, 1.5], dtype=torch.float64)
    y0 = torch.tensor([[0.5, 0.0], [0.2, 0.3], [0.1, 0.0], [0.3, -0.2], [0.4, 0.1]], dtype=torch.float64)
    g = torch.Generator().manual_seed(5)
    starts = torch.tensor([0.0, 0.7, -1.3, 2.0, 0.1], dtype=torch.float64)
    gaps = (0.02 + torch.rand(5, 11, generator=g, dtype=torch.float64)) * torch.tensor([[0.3], [1], [0.5], [1], [0.1]])
    t = torch.cat([starts[:, None], starts[:, None] + direction * gaps.cumsum(1)], 1)

    def f(tt, y):
        assert tt.shape == (5,)
        return torch.stack([y[:, 1], mus * (1 - y[:, 0] ** 2) * y[:, 1] - y[:, 0]], 1)

    eager, comp = _per_sample_eager_and_compiled(f, y0, t)
    assert comp.ys.shape == (12, 5, 2) and torch.equal(comp.ts, t)
    for k in ("n_steps", "n_rejected", "nfe"):
        assert torch.equal(comp.sample_stats[k], eager.sample_stats[k]), k
    torch.testing.assert_close(comp.ys, eager.ys, rtol=0, atol=1e-12)


def test_interpolate_after_a_compiled_solve_says_why_it_cannot():
    f, y0, t = _problem()
    with torch.no_grad():
        sol = node.solve(f, y0, t, rtol=1e-7, atol=1e-9, compile="aot_eager")
    with pytest.raises(RuntimeError, match=r"compiled solver \(compile=True\) does not keep its steps"):
        sol.interpolate(t[:1])


@pytest.mark.parametrize("per_sample", [False, True])
def test_compiled_solves_keep_dense_output_when_asked(per_sample):
    """dense=True with compile=True: the compiled loop keeps every attempt's continuous extension (no graph:
    the device loop; backprop: the compiled step), and interpolate() equals the eager solver's."""
    f, y0, t = _problem()
    ts = torch.tensor([0.05, 0.33, 0.9, 1.7], dtype=torch.float64) * float(t[-1]) / 2
    kw = dict(rtol=1e-7, atol=1e-9, per_sample=per_sample)
    ref = node.solve(f, y0, t, **kw).interpolate(ts)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            got = node.solve(f, y0, t, compile="aot_eager", dense=True, **kw).interpolate(ts)
        x = y0.clone().requires_grad_(True)
        graph = node.solve(f, x, t, compile="aot_eager", dense=True, **kw).interpolate(ts)
    _no_fallback(caught)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(graph.detach(), ref, rtol=1e-10, atol=1e-12)
    assert graph.requires_grad
