"""The gradient modes as objects (``neuralode.Backprop``, ``Adjoint``, ``Checkpoint``): each gives bit for bit
the values, gradients and costs of the string form with the same keyword arguments, each field reaches the
solve, and conflicting or mistyped arguments are refused with messages naming them. Small float64 problems."""

import dataclasses
import inspect
import math
import re
import textwrap
import types
from pathlib import Path

import pytest
import torch

import neuralode as node
from neuralode.nn import ODEBlock

F64 = torch.float64
T = torch.tensor([0.0, 0.4, 1.0], dtype=F64)


def _leaves():
    g = torch.Generator().manual_seed(3)
    W = (0.8 * torch.randn(2, 2, generator=g, dtype=F64)).requires_grad_(True)
    k = torch.tensor(1.3, dtype=F64, requires_grad=True)
    return W, k


def _problem(per_sample: bool):
    """(func, y0, t, W, k): a closure over two leaves; per-sample: a batch of three, each its own time."""
    W, k = _leaves()

    def f(t, y):
        tt = t.reshape(-1, 1) if per_sample else t
        return k * torch.tanh(y @ W.T) - 0.3 * y * torch.cos(tt)

    y0 = torch.tensor([[1.0, -0.5], [0.3, 0.9], [-1.2, 0.2]], dtype=F64)
    y0 = (y0 if per_sample else y0[0]).clone().requires_grad_(True)
    return f, y0, T.clone().requires_grad_(True), W, k


def _run(per_sample: bool, gradient, method: str = "dopri5", **kw):
    """Values, gradients (y0, t, W, k; None where none reaches) and costs of one solve with its backward."""
    f, y0, t, W, k = _problem(per_sample)
    if isinstance(gradient, types.FunctionType):  # (an object naming the problem's own tensors)
        gradient = gradient(W, k)
    kw = {key: (v(W, k) if isinstance(v, types.FunctionType) else v) for key, v in kw.items()}
    sol = node.solve(
        f, y0, t, method=method, rtol=1e-6, atol=1e-8, gradient=gradient, per_sample=per_sample, dense=False, **kw
    )
    loss = (sol.ys[1:] ** 2).sum() + sol.ys[-1].sum()
    grads = torch.autograd.grad(loss, [y0, t, W, k], allow_unused=True)
    return sol.ys.detach(), grads, sol.stats.as_dict()


def _assert_identical(a, b):
    ys_a, g_a, s_a = a
    ys_b, g_b, s_b = b
    assert torch.equal(ys_a, ys_b)
    for x, y in zip(g_a, g_b):
        assert (x is None) == (y is None)
        if x is not None:
            assert torch.equal(x, y)
    assert s_a == s_b


both = pytest.mark.parametrize("per_sample", [False, True], ids=["joint", "per_sample"])

# (string gradient, its keyword arguments, the object): params are given as functions of the problem's leaves
CASES = {
    "backprop": ("backprop", {}, node.Backprop()),
    "adjoint": ("adjoint", dict(params=lambda W, k: (W, k)), lambda W, k: node.Adjoint(params=(W, k))),
    "checkpoint": ("checkpoint", dict(params=lambda W, k: (W, k)), lambda W, k: node.Checkpoint(params=(W, k))),
    "adjoint_settings": (
        "adjoint",
        dict(params=lambda W, k: (W, k), adjoint_rtol=1e-4, adjoint_atol=1e-6, adjoint_method="bosh3"),
        lambda W, k: node.Adjoint(rtol=1e-4, atol=1e-6, method="bosh3", params=(W, k)),
    ),
    "adjoint_options": (
        "adjoint",
        dict(params=lambda W, k: (W, k), adjoint_options=dict(max_num_steps=500, safety=0.8)),
        lambda W, k: node.Adjoint(options=dict(max_num_steps=500, safety=0.8), params=(W, k)),
    ),
    "adjoint_seminorm": (
        "adjoint",
        dict(params=lambda W, k: (W, k), adjoint_options=dict(norm="seminorm")),
        lambda W, k: node.Adjoint(seminorm=True, params=(W, k)),
    ),
    "adjoint_params": ("adjoint", dict(params=lambda W, k: (W,)), lambda W, k: node.Adjoint(params=(W,))),
    "checkpoint_params": ("checkpoint", dict(params=lambda W, k: (k,)), lambda W, k: node.Checkpoint(params=(k,))),
}


@both
@pytest.mark.parametrize("case", sorted(CASES))
def test_the_object_gives_bit_for_bit_what_the_string_and_keywords_give(case, per_sample):
    name, kw, obj = CASES[case]
    _assert_identical(_run(per_sample, obj), _run(per_sample, name, **kw))


@both
def test_every_adjoint_field_reaches_the_backward_solve(per_sample):
    """Each setting changes the backward (so that the equalities above are not those of settings ignored on
    both sides), and the forward is the same whatever the backward's settings."""
    ps = dict(params=lambda W, k: (W, k))
    base = _run(per_sample, lambda W, k: node.Adjoint(params=(W, k)))
    for change in (dict(rtol=1e-3), dict(atol=1e-3), dict(method="bosh3"), dict(options=dict(safety=0.5))):
        got = _run(per_sample, lambda W, k, c=change: node.Adjoint(params=(W, k), **c))
        assert torch.equal(got[0], base[0]), change
        assert got[2]["nfe_backward"] != base[2]["nfe_backward"], change
        legacy = {f"adjoint_{key}": v for key, v in change.items()}
        _assert_identical(got, _run(per_sample, "adjoint", **ps, **legacy))


@both
def test_params_choose_the_tensors_differentiated(per_sample):
    for mode in (node.Adjoint, node.Checkpoint):
        _, (_, _, gW, gk), _ = _run(per_sample, lambda W, k, m=mode: m(params=(W,)))
        assert gW is not None and gk is None
        _, (_, _, gW, gk), _ = _run(per_sample, lambda W, k, m=mode: m(params=(k,)))
        assert gW is None and gk is not None


class _MLP(torch.nn.Module):
    def __init__(self, width: int = 32) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.l1, self.l2 = torch.nn.Linear(2, width).double(), torch.nn.Linear(width, 2).double()
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=F64) / p.shape[-1] ** 0.5)

    def forward(self, t, y):
        return self.l2(torch.tanh(self.l1(y)))


def _mlp_backward(gradient, **kw):
    field = _MLP(16)
    y0 = torch.tensor([[1.0, -0.5], [0.3, 0.9]], dtype=F64, requires_grad=True)
    t = torch.linspace(0.0, 1.0, 5, dtype=F64)
    sol = node.solve(field, y0, t, rtol=1e-7, atol=1e-9, gradient=gradient, **kw)
    grads = torch.autograd.grad(sol.ys.square().sum(), [y0, *field.parameters()])
    return sol.stats, grads


def test_seminorm_is_the_seminorm_option_and_saves_backward_evaluations():
    semi, g_semi = _mlp_backward(node.Adjoint(seminorm=True))
    legacy, g_legacy = _mlp_backward("adjoint", adjoint_options=dict(norm="seminorm"))
    assert semi == legacy
    assert all(torch.equal(a, b) for a, b in zip(g_semi, g_legacy))
    full, g_full = _mlp_backward(node.Adjoint())
    assert semi.nfe == full.nfe and semi.nfe_backward < full.nfe_backward, (semi, full)
    for a, b in zip(g_semi, g_full):  # (the same gradient, to the tolerances)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # (seminorm with the other options, which it adds to)
    more, _ = _mlp_backward(node.Adjoint(seminorm=True, options=dict(max_num_steps=1000)))
    assert more == semi


def test_the_default_dense_output_follows_the_mode():
    f, y0, t, W, k = _problem(False)
    t = t.detach()
    with pytest.raises(RuntimeError, match="keeps no dense output"):
        node.solve(f, y0, t, gradient=node.Adjoint(params=(W, k))).interpolate([0.5])
    for mode in (node.Backprop(), node.Checkpoint(params=(W, k))):
        assert node.solve(f, y0, t, gradient=mode).interpolate([0.5]).shape == (1, 2)
    assert node.solve(f, y0, t, gradient=node.Adjoint(params=(W, k)), dense=True).interpolate([0.5]).shape == (1, 2)


@pytest.mark.parametrize("name", ["backprop", "adjoint", "checkpoint"])
def test_events_and_complex_states_take_the_object_as_the_string(name):
    W, k = _leaves()
    mode = {"backprop": node.Backprop(), "adjoint": node.Adjoint(params=(k,)), "checkpoint": node.Checkpoint((k,))}

    def event_run(gradient, **kw):
        y0 = torch.tensor([1.0, 0.2], dtype=F64, requires_grad=True)
        sol = node.solve(
            lambda t, y: -k * y, y0, T, gradient=gradient, event_fn=lambda t, y: y[0] - 0.5, rtol=1e-8, **kw
        )
        return (sol.event_t.detach(), torch.autograd.grad(sol.event_t + sol.ys[-1].sum(), [y0, k]))

    def complex_run(gradient, **kw):
        y0 = torch.tensor([1.0 + 0.5j, -0.3j], dtype=torch.complex128, requires_grad=True)
        sol = node.solve(lambda t, y: (1j - k) * y, y0, T, gradient=gradient, rtol=1e-8, **kw)
        return (sol.ys.detach(), torch.autograd.grad(sol.ys[-1].abs().square().sum(), [y0, k]))

    params = {} if name == "backprop" else dict(params=(k,))
    for run in (event_run, complex_run):
        (v_obj, g_obj), (v_str, g_str) = run(mode[name]), run(name, **params)
        assert torch.equal(v_obj, v_str)
        assert all(torch.equal(a, b) for a, b in zip(g_obj, g_str))


def test_an_object_takes_a_keyword_argument_for_a_field_it_leaves_unset():
    """``solve(gradient=Adjoint(rtol=...), params=...)``: the keyword fills the unset field."""
    ps = dict(params=lambda W, k: (W, k))
    want = _run(False, lambda W, k: node.Adjoint(rtol=1e-4, method="bosh3", params=(W, k)))
    _assert_identical(_run(False, node.Adjoint(rtol=1e-4), adjoint_method="bosh3", **ps), want)
    _assert_identical(_run(True, node.Checkpoint(), **ps), _run(True, "checkpoint", **ps))
    _assert_identical(_run(False, node.Backprop(), **ps), _run(False, "backprop"))  # (params: ignored, as ever)


def _solve_with(gradient, **kw):
    f, y0, _, W, k = _problem(False)
    if isinstance(gradient, types.FunctionType):
        gradient = gradient(W, k)
    return node.solve(f, y0, T, gradient=gradient, **kw)


@pytest.mark.parametrize(
    ("gradient", "kw", "names"),
    [
        (node.Adjoint(rtol=1e-6), dict(adjoint_rtol=1e-3), ["adjoint_rtol", "Adjoint(rtol=...)"]),
        (node.Adjoint(atol=1e-6), dict(adjoint_atol=1e-3), ["adjoint_atol", "Adjoint(atol=...)"]),
        (node.Adjoint(method="tsit5"), dict(adjoint_method="bosh3"), ["adjoint_method", "Adjoint(method=...)"]),
        (node.Adjoint(options={}), dict(adjoint_options={}), ["adjoint_options", "Adjoint(options=...)"]),
        (
            lambda W, k: node.Adjoint(params=(W,)),
            dict(params=(torch.ones(1),)),
            ["`params`", "Adjoint(params=...)"],
        ),
        (
            lambda W, k: node.Checkpoint(params=(W,)),
            dict(params=(torch.ones(1),)),
            ["`params`", "Checkpoint(params=...)"],
        ),
        (node.Checkpoint(), dict(adjoint_rtol=1e-3), ["adjoint_rtol", "Checkpoint()"]),
        (node.Backprop(), dict(adjoint_options=dict(norm="seminorm")), ["adjoint_options", "Backprop()"]),
        (node.Backprop(), dict(adjoint_method="bosh3"), ["adjoint_method", "Backprop()"]),
        (
            node.Adjoint(seminorm=True),
            dict(adjoint_options=dict(norm="seminorm")),
            ["adjoint_options", "Adjoint(seminorm=True)"],
        ),
    ],
)
def test_an_object_and_a_keyword_setting_the_same_thing_are_refused(gradient, kw, names):
    with pytest.raises(ValueError) as info:
        _solve_with(gradient, **kw)
    for name in names:
        assert name in str(info.value), str(info.value)


def test_seminorm_and_a_norm_option_are_refused_together():
    with pytest.raises(ValueError, match=r"seminorm=True.*options=dict\(norm='seminorm'\)"):
        node.Adjoint(seminorm=True, options=dict(norm="seminorm"))
    with pytest.raises(ValueError, match=r"seminorm=True.*norm="):
        node.Adjoint(seminorm=True, options=dict(norm=lambda x: x[0].abs().max()))
    with pytest.raises(TypeError, match="seminorm"):
        node.Adjoint(seminorm="yes")


@pytest.mark.parametrize("bad", [3, None, node.Adjoint, {"mode": "adjoint"}])
def test_a_gradient_of_the_wrong_type_names_the_strings_and_the_classes(bad):
    with pytest.raises(TypeError) as info:
        _solve_with(bad)
    message = str(info.value)
    for name in ("`gradient`", "'backprop'", "'adjoint'", "'checkpoint'", "Backprop", "Adjoint", "Checkpoint"):
        assert name in message, message
    if bad is node.Adjoint:
        assert "Adjoint()" in message, message
    with pytest.raises(TypeError, match="`gradient` must be one of the strings"):
        ODEBlock(_MLP(), gradient=bad)


def test_an_unknown_name_keeps_its_message():
    with pytest.raises(
        ValueError, match=r"`gradient` must be one of \('backprop', 'adjoint', 'checkpoint', 'reversible'\)"
    ):
        _solve_with("adjiont")
    with pytest.raises(ValueError, match="method='scipy_solver' is forward only.*gradient='checkpoint'"):
        node.solve(
            lambda t, y: -y, torch.ones(2, dtype=F64), T, method="scipy_solver", gradient=node.Checkpoint(params=())
        )


def test_the_adjoint_of_a_scipy_solve_runs_its_backward_with_a_neuralode_method():
    k = torch.tensor(0.7, dtype=F64, requires_grad=True)
    y0 = torch.ones(2, dtype=F64, requires_grad=True)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    sol = node.solve(lambda t, y: -k * y, y0, t, method="scipy_solver", gradient=node.Adjoint(params=(k,)))
    gy, gk = torch.autograd.grad(sol.ys[-1].sum(), (y0, k))
    torch.testing.assert_close(gy, torch.full((2,), math.exp(-0.7), dtype=F64), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gk, torch.tensor(-2 * math.exp(-0.7), dtype=F64), rtol=1e-5, atol=1e-7)


def _block_run(per_sample: bool = False, **kw):
    block = ODEBlock(_MLP(8), t=(0.0, 1.0), rtol=1e-6, atol=1e-8, per_sample=per_sample, **kw)
    h = torch.tensor([[1.0, -0.5], [0.3, 0.9]], dtype=F64, requires_grad=True)
    out = block(h)
    grads = torch.autograd.grad(out.square().sum(), [h, *block.func.parameters()])
    return out.detach(), grads, block.stats.as_dict(), block


@both
def test_ode_block_takes_the_objects(per_sample):
    pairs = [
        (node.Adjoint(seminorm=True), dict(gradient="adjoint", adjoint_options=dict(norm="seminorm"))),
        (node.Adjoint(), dict(gradient="adjoint")),
        (node.Checkpoint(), dict(gradient="checkpoint")),
        (node.Backprop(), dict(gradient="backprop")),
    ]
    for mode, str_kw in pairs:
        got = _block_run(per_sample, gradient=mode)
        _assert_identical(got[:3], _block_run(per_sample, **str_kw)[:3])
        assert f"gradient={mode!r}" in repr(got[3])
    # a setting the block has no keyword argument for reaches the backward solve
    base = _block_run(per_sample, gradient=node.Adjoint(seminorm=True))
    loose = _block_run(per_sample, gradient=node.Adjoint(rtol=1e-3, seminorm=True))
    assert torch.equal(loose[0], base[0]) and loose[2]["nfe_backward"] < base[2]["nfe_backward"]
    # the object's own params win over the block's default (its func's parameters)
    field = _MLP(8)
    block = ODEBlock(
        field, gradient=node.Adjoint(params=(field.l2.weight,)), rtol=1e-6, atol=1e-8, per_sample=per_sample
    )
    grads = torch.autograd.grad(block(torch.ones(2, 2, dtype=F64)).sum(), list(field.parameters()), allow_unused=True)
    assert [g is not None for g in grads] == [False, False, True, False]


def test_ode_block_refuses_conflicting_settings_when_built():
    with pytest.raises(ValueError, match=r"adjoint_options.*Backprop\(\)"):
        ODEBlock(_MLP(), gradient=node.Backprop(), adjoint_options=dict(norm="seminorm"))
    with pytest.raises(ValueError, match=r"adjoint_options.*Adjoint\(options=\.\.\.\)"):
        ODEBlock(_MLP(), gradient=node.Adjoint(options={}), adjoint_options={})
    ODEBlock(_MLP(), gradient="backprop", adjoint_options=dict(norm="seminorm"))  # (the string form: ignored)


def test_the_modes_are_small_frozen_public_values():
    assert [node.Backprop.name, node.Adjoint.name, node.Checkpoint.name] == ["backprop", "adjoint", "checkpoint"]
    assert node.Adjoint().name == "adjoint"
    from neuralode import gradients

    for cls in (node.Backprop, node.Adjoint, node.Checkpoint):
        assert cls.__name__ in node.__all__ and cls.__name__ in gradients.__all__
        assert getattr(gradients, cls.__name__) is cls
    with pytest.raises(dataclasses.FrozenInstanceError):
        node.Adjoint().rtol = 1e-3
    assert node.Adjoint(rtol=1e-4) == node.Adjoint(rtol=1e-4) != node.Adjoint()
    W, _ = _leaves()
    assert repr(node.Adjoint(rtol=1e-4, params=(W,))) == "Adjoint(rtol=0.0001, params=(1 tensor))"
    assert repr(node.Checkpoint()) == "Checkpoint()" and repr(node.Backprop()) == "Backprop()"


@pytest.mark.parametrize("cls", ["Backprop", "Adjoint", "Checkpoint"])
def test_the_docstring_examples_run(cls, capsys):
    doc = inspect.getdoc(getattr(node, cls))
    blocks = re.findall(r"```python\n(.*?)```", doc, flags=re.S)
    assert blocks and "Example:" in doc
    for src in map(textwrap.dedent, blocks):
        exec(compile(src, f"{cls} docstring", "exec"), {"__name__": "__main__"})
    assert capsys.readouterr().out


def _imports_of(path: Path) -> set:
    """The neuralode modules a file imports, at its top level or inside functions (relative imports resolved)."""
    import ast

    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    package = parts[:-1]  # (a package's __init__ and a module alike: relative imports start from the folder)
    out = set()
    for stmt in ast.walk(ast.parse(path.read_text())):
        if isinstance(stmt, ast.Import):
            out |= {a.name for a in stmt.names}
        elif isinstance(stmt, ast.ImportFrom):
            base = package[: len(package) - stmt.level + 1] if stmt.level else []
            mod = ".".join(base + ([stmt.module] if stmt.module else []))
            out |= {mod} | {f"{mod}.{a.name}" for a in stmt.names}
    return {m for m in out if m.startswith("neuralode")}


SRC = Path(node.__file__).parent


def test_no_gradients_module_imports_a_module_that_imports_it_back():
    modules = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    deps = {name: _imports_of(path) & set(modules) - {name} for name, path in modules.items()}
    assert "neuralode.gradients.per_sample_adjoint" in deps["neuralode.gradients.adjoint"]  # (the scan sees lazy ones)
    cycles = [(a, b) for a in deps if a.startswith("neuralode.gradients") for b in deps[a] if a in deps[b]]
    assert not cycles, cycles


def test_cnf_takes_a_gradient_mode_object_with_its_own_params():
    """The CNF passes its field's parameters unless the mode names its own (then those, and no conflict)."""
    from neuralode.models import CNF

    torch.manual_seed(0)
    flow = CNF(2, hidden=8, layers=1, gradient=node.Adjoint(rtol=1e-5, atol=1e-7)).double()
    x = torch.randn(5, 2, dtype=torch.float64)
    flow.log_prob(x).sum().backward()
    grads = [p.grad.clone() for p in flow.parameters()]
    flow.zero_grad()
    chosen = tuple(flow.parameters())
    flow.gradient = node.Adjoint(rtol=1e-5, atol=1e-7, params=chosen)
    flow.log_prob(x).sum().backward()
    for a, p in zip(grads, flow.parameters()):
        assert torch.equal(a, p.grad)
