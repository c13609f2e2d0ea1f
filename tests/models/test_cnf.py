"""Continuous normalizing flows: the trace estimators, log-densities against a closed form, invertibility,
and gradients in every mode."""

import math

import pytest
import torch
from torch import nn

from neuralode.models.cnf import _MLP, CNF, PlanarCNFNet, exact_trace, hutchinson_trace


def _field_and_state(seed=0, dim=3, batch=4, kind="mlp"):
    torch.manual_seed(seed)
    if kind == "mlp":
        net = _MLP(dim, 16, 2).double()
    else:  # the planar CNF; its time slopes start at zero, so give them values to exercise t
        net = PlanarCNFNet(dim, 7).double()
        with torch.no_grad():
            net.theta1.normal_()
    z = torch.randn(batch, dim, dtype=torch.float64, requires_grad=True)
    t = torch.tensor(0.3, dtype=torch.float64)
    return net, z, t


def test_exact_trace_equals_the_trace_of_the_full_jacobian():
    net, z, t = _field_and_state()
    f = net(t, z)
    tr = exact_trace(f, z, create_graph=False)
    for b in range(z.shape[0]):
        J = torch.autograd.functional.jacobian(lambda v: net(t, v[None])[0], z[b].detach())
        assert abs(float(tr[b]) - float(torch.trace(J))) < 1e-12


@pytest.mark.parametrize("kind", ["mlp", "planar"])
@pytest.mark.parametrize("trace", ["exact", "hutchinson"])
def test_the_built_in_nets_forward_mode_field_matches_the_full_jacobian(trace, kind):
    # the built-in MLP carries its own Jacobian–vector products; check f, the trace, the Frobenius norm and
    # Hutchinson's εᵀJε against autograd's full Jacobian, and against the generic (autograd) field
    from neuralode.models.cnf import CNFField

    net, z, t = _field_and_state(seed=2, kind=kind)
    field = CNFField(net, trace=trace)
    z = z.detach()
    with torch.no_grad():
        f, neg_tr, reg = field(t, (z, z[:, 0], torch.zeros(z.shape[0], 2, dtype=z.dtype)))
    for b in range(z.shape[0]):
        J = torch.autograd.functional.jacobian(lambda v: net(t, v[None])[0], z[b])
        torch.testing.assert_close(f[b], net(t, z[b : b + 1])[0], rtol=0, atol=1e-14)
        e = field.eps[b] if trace == "hutchinson" else None
        want_tr = torch.trace(J) if e is None else e @ J @ e
        want_frob = (J**2).sum() if e is None else ((J @ e) ** 2).sum()
        assert abs(float(-neg_tr[b]) - float(want_tr)) < 1e-12
        assert abs(float(reg[b, 0]) - float((f[b] ** 2).sum())) < 1e-12
        assert abs(float(reg[b, 1]) - float(want_frob)) < 1e-12
    generic = CNFField(lambda tt, zz: net(tt, zz), trace=trace)  # a plain callable: the autograd path
    generic.eps = field.eps
    with torch.no_grad():
        _, neg_tr_generic = generic(t, (z, z[:, 0]))
    torch.testing.assert_close(neg_tr_generic, neg_tr, rtol=0, atol=1e-12)


@pytest.mark.parametrize("noise", ["rademacher", "gaussian"])
def test_hutchinson_is_unbiased(noise):
    net, z, t = _field_and_state(seed=1)
    f = net(t, z)
    exact = exact_trace(f, z, create_graph=False).detach()
    draws = []
    for _ in range(4000):
        eps = torch.randn_like(z) if noise == "gaussian" else torch.randint(0, 2, z.shape).double() * 2 - 1
        draws.append(hutchinson_trace(f, z, eps, create_graph=False).detach())
    draws = torch.stack(draws)
    se = draws.std(0) / math.sqrt(len(draws))
    assert bool(((draws.mean(0) - exact).abs() < 3 * se + 1e-12).all()), (draws.mean(0), exact, se)


class _Linear(nn.Module):
    def __init__(self, A):
        super().__init__()
        self.A = nn.Parameter(A)

    def forward(self, t, z):
        return z @ self.A.T


@pytest.mark.slow
@pytest.mark.parametrize("trace", ["exact", "hutchinson"])
def test_log_prob_of_linear_dynamics_matches_the_gaussian_it_transports(trace):
    # z(T) = e^{AT} z(0), z(0) ~ N(0, I)  ⇒  x ~ N(0, M Mᵀ) with M = e^{AT}
    A = torch.tensor([[0.3, -0.8], [0.5, -0.1]], dtype=torch.float64)
    cnf = CNF(2, net=_Linear(A.clone()), trace=trace, T=1.0, rtol=1e-10, atol=1e-10).double()
    x = torch.randn(6, 2, dtype=torch.float64)
    M = torch.matrix_exp(A)
    ref = torch.distributions.MultivariateNormal(torch.zeros(2, dtype=torch.float64), M @ M.T).log_prob(x)
    # for linear dynamics even one Hutchinson draw is close: εᵀAε differs from tr A, so compare the mean over draws
    draws = torch.stack([cnf.log_prob(x).detach() for _ in range(1 if trace == "exact" else 400)])
    tol = 1e-8 if trace == "exact" else 4 * float(draws.std(0).max()) / math.sqrt(len(draws))
    torch.testing.assert_close(draws.mean(0), ref, rtol=0, atol=tol)


def test_samples_pushed_forward_then_back_return_to_themselves():
    torch.manual_seed(0)
    cnf = CNF(2, hidden=16, layers=2, rtol=1e-9, atol=1e-9).double()
    z0 = torch.randn(5, 2, dtype=torch.float64)
    with torch.no_grad():
        x = cnf.forward_transport(z0)
        back = cnf.inverse(x)
    torch.testing.assert_close(back, z0, rtol=0, atol=1e-6)
    path = cnf.forward_transport(z0, ts=[0.0, 0.5, 1.0])
    assert path.shape == (3, 5, 2)
    torch.testing.assert_close(path[-1], x, rtol=0, atol=1e-7)


def test_log_prob_gradients_agree_in_every_mode():
    torch.manual_seed(0)
    x = torch.randn(8, 2, dtype=torch.float64)
    grads = {}
    for mode in ("backprop", "adjoint", "checkpoint"):
        torch.manual_seed(1)
        cnf = CNF(2, hidden=8, layers=2, rtol=1e-9, atol=1e-9, gradient=mode).double()
        (-cnf.log_prob(x).mean()).backward()
        grads[mode] = torch.cat([p.grad.reshape(-1) for p in cnf.parameters()])
    torch.testing.assert_close(grads["adjoint"], grads["backprop"], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grads["checkpoint"], grads["backprop"], rtol=1e-7, atol=1e-9)


def test_toy_distributions_are_generated_in_code():
    from neuralode.data.toy2d import TOY_2D, sample_2d

    for name in TOY_2D:
        x = sample_2d(name, 500, seed=3)
        assert x.shape == (500, 2) and bool(torch.isfinite(x).all())
        assert 0.2 < float(x.std()) < 3.0, name
        torch.testing.assert_close(x, sample_2d(name, 500, seed=3))
    with pytest.raises(ValueError, match="choose one of"):
        sample_2d("donut", 10)


@pytest.mark.slow
def test_flow_cli_runs_end_to_end(tmp_path):
    import json

    from neuralode.cli import main

    out = tmp_path / "flow"
    argv = [
        "flow",
        "--data",
        "8gaussians",
        "--iters",
        "4",
        "--eval-every",
        "2",
        "--n-test",
        "200",
        "--batch-size",
        "64",
        "--hidden",
        "8",
        "--layers",
        "2",
        "--no-progress",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert len(m["history"]) == 2 and m["history"][-1]["nfe_forward"] > 0 and m["history"][-1]["nfe_backward"] > 0
    assert math.isfinite(m["test_nll"])
    for name in ("metrics.csv", "density.png", "transport.png"):
        assert (out / name).stat().st_size > 0
    ref = tmp_path / "ref"
    tiny = argv[argv.index("--n-test") : -2]  # the same small model and data sizes
    short = ["--iters", "2", "--factor", "2", "--eval-every", "1"]
    assert main(["flow", "--nll-reference", *short, *tiny, "--out", str(ref)]) == 0
    table = (ref / "table.md").read_text()
    assert all(f"| {d} |" in table for d in ("circles", "moons", "8gaussians"))
    assert (ref / "curves.png").stat().st_size > 0


@pytest.mark.slow
def test_a_short_flow_fit_beats_the_best_gaussian(tmp_path):
    from neuralode.experiments.flow import train_flow

    m = train_flow(
        "8gaussians",
        iters=150,
        batch_size=256,
        hidden=32,
        layers=2,
        lr=5e-3,
        tol=1e-4,
        n_test=1000,
        eval_every=150,
        out_dir="/tmp/neuralode-test-flow",
        show_progress=False,
    )
    assert m["test_nll"] < m["gaussian_nll"] - 0.1, (m["test_nll"], m["gaussian_nll"])


def test_planar_flow_log_determinant_matches_autograd():
    from neuralode.models.planar import PlanarFlow

    torch.manual_seed(0)
    flow = PlanarFlow(2, K=4).double()
    with torch.no_grad():
        flow.u.mul_(20)  # large u: û's correction must keep the layers invertible
        flow.w.mul_(10)
    z = torch.randn(5, 2, dtype=torch.float64)
    _, logdet = flow.transform(z)
    for i in range(5):
        J = torch.autograd.functional.jacobian(lambda v: flow.transform(v[None])[0][0], z[i])
        assert abs(float(torch.linalg.slogdet(J)[1]) - float(logdet[i].detach())) < 1e-9


def test_cnf_density_of_its_own_samples_agrees_forward_and_backward():
    torch.manual_seed(0)
    cnf = CNF(2, hidden=8, layers=2, rtol=1e-9, atol=1e-9).double()
    with torch.no_grad():
        x, lq = cnf.sample_with_log_prob(6)
        torch.testing.assert_close(cnf.log_prob(x), lq, rtol=0, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("which", ["planar", "cnf", "planar_cnf"])
def test_density_matching_lowers_the_reverse_kl(which):
    from neuralode.data.potentials import log_target
    from neuralode.models.planar import PlanarFlow

    torch.manual_seed(0)
    if which == "planar":
        model = PlanarFlow(2, K=8)
    elif which == "planar_cnf":
        model = CNF(2, net=PlanarCNFNet(2, 8), rtol=1e-4, atol=1e-4, gradient="backprop")
    else:
        model = CNF(2, hidden=8, layers=2, rtol=1e-4, atol=1e-4, gradient="backprop")
    opt = torch.optim.Adam(model.parameters(), 1e-2)

    def kl(n=512):  # KL(q ‖ p) − log Z, estimated on samples
        x, lq = model.sample_with_log_prob(n)
        return (lq - log_target("U2", x)).mean()

    torch.manual_seed(1)
    before = float(kl(2000).detach())
    for _ in range(60):
        loss = kl(256)
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.manual_seed(1)
    after = float(kl(2000).detach())
    assert after < before - 0.2, (before, after)


@pytest.mark.parametrize("model", ["cnf", "planar_cnf", "planar"])
def test_density_matching_cli_runs(tmp_path, model):
    import json

    from neuralode.cli import main

    out = tmp_path / model
    argv = [
        "flow",
        "--target",
        "U1",
        "--model",
        model,
        "--iters",
        "6",
        "--hidden",
        "8",
        "--K",
        "4",
        "--width",
        "3",
        "--batch-size",
        "64",
        "--no-progress",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["model"] == model and math.isfinite(m["kl"]) and (out / "match.png").stat().st_size > 0
    assert model != "planar_cnf" or m["parameters"] == 3 * 10  # (w, u ∈ R², b) × (value, slope in t)


@pytest.mark.slow
@pytest.mark.parametrize("trace", ["exact", "hutchinson"])
def test_regularisers_integrate_kinetic_energy_and_jacobian_norm(trace):
    """Linear dynamics f = A z: ∫‖A z(t)‖² dt along z(t) = e^{A(t−T)} x (flowing data back to the base),
    checked against the trapezoid rule on the analytic path; ‖∂f/∂z‖_F² = ‖A‖_F² at every time, so its
    integral is T‖A‖_F² (exactly for the exact trace, in expectation for Hutchinson). log p is unchanged."""
    A = torch.tensor([[0.3, -0.8], [0.5, -0.1]], dtype=torch.float64)
    x = torch.randn(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    plain = CNF(2, net=_Linear(A.clone()), trace=trace, rtol=1e-10, atol=1e-10).double()
    reg = CNF(2, net=_Linear(A.clone()), trace=trace, rtol=1e-10, atol=1e-10, regularization={"kinetic": 1.0}).double()
    ts = torch.linspace(0, 1, 20001, dtype=torch.float64)
    path = torch.stack([x @ torch.matrix_exp(A * (s - 1.0)).T for s in ts])  # (T, batch, 2)
    speed2 = (path @ A.T).pow(2).sum(-1)
    kinetic_ref = torch.trapezoid(speed2, ts, dim=0).mean()
    torch.manual_seed(0)
    lp_reg = reg.log_prob(x)
    torch.testing.assert_close(reg.reg_loss, kinetic_ref, rtol=1e-6, atol=0)
    if trace == "exact":
        torch.testing.assert_close(lp_reg, plain.log_prob(x), rtol=0, atol=1e-9)
    jac = CNF(2, net=_Linear(A.clone()), trace=trace, rtol=1e-10, atol=1e-10, regularization={"jacobian": 1.0})
    jac = jac.double()
    draws = torch.stack([(jac.log_prob(x), jac.reg_loss)[1].detach() for _ in range(1 if trace == "exact" else 300)])
    frob = float(A.pow(2).sum())
    tol = 1e-8 if trace == "exact" else 4 * float(draws.std()) / math.sqrt(len(draws))
    assert abs(float(draws.mean()) - frob) < tol, (float(draws.mean()), frob)
    jac.eval()  # not training: no regulariser, the plain (z, log p) solve
    jac.log_prob(x)
    assert jac.reg_loss is None


def test_regularisation_keys_are_checked():
    with pytest.raises(ValueError, match="regularization keys"):
        CNF(2, regularization={"kinetc": 1.0})


@pytest.mark.slow
def test_density_matching_table_compares_at_equal_parameter_count(tmp_path):
    from neuralode.experiments.flow import match_table

    rows = match_table(targets=("U1",), iters=3, hidden=8, layers=2, out_dir=str(tmp_path), show_progress=False)
    cnf, planar_cnf, planar = rows
    assert [r["model"] for r in rows] == ["cnf", "planar_cnf", "planar"]
    assert abs(cnf["parameters"] - planar["parameters"]) <= 5  # K = CNF parameters / 5, rounded
    assert abs(cnf["parameters"] - planar_cnf["parameters"]) <= 10  # width = CNF parameters / 10, rounded
    assert (tmp_path / "table.md").read_text().count("| U1 |") == 1


@pytest.mark.slow
def test_density_matching_table_resumes_from_finished_runs(tmp_path, monkeypatch):
    from neuralode.experiments import flow

    first = flow.match_table(targets=("U1",), iters=2, hidden=4, layers=1, out_dir=str(tmp_path), show_progress=False)

    def no_training(**kwargs):
        raise AssertionError(f"retrained {kwargs['model']} although its run was on disk")

    monkeypatch.setattr(flow, "match_density", no_training)
    again = flow.match_table(targets=("U1",), iters=2, hidden=4, layers=1, out_dir=str(tmp_path), show_progress=False)
    assert [r["kl"] for r in again] == [r["kl"] for r in first]
    with pytest.raises(AssertionError, match="retrained"):  # other settings are not taken from disk
        flow.match_table(targets=("U1",), iters=3, hidden=4, layers=1, out_dir=str(tmp_path), show_progress=False)


@pytest.mark.slow
def test_nll_reference_table_compares_the_default_with_a_longer_run_and_resumes(tmp_path, monkeypatch):
    import json

    from neuralode.experiments import flow

    kw = dict(iters=2, factor=2, out_dir=str(tmp_path), show_progress=False, hidden=4, layers=1, n_test=100)
    kw.update(batch_size=32, eval_every=1)
    (row,) = flow.nll_reference(datasets=("moons",), **kw)
    runs = {n: json.load(open(tmp_path / f"moons_{n}" / "metrics.json")) for n in (2, 4)}
    assert [len(runs[n]["history"]) for n in (2, 4)] == [2, 4]  # the reference really ran twice as long
    assert row["gap"] == pytest.approx(runs[2]["test_nll"] - runs[4]["test_nll"])
    assert (tmp_path / "table.md").read_text().count("| moons |") == 1

    def no_training(**kwargs):
        raise AssertionError("retrained a finished run")

    monkeypatch.setattr(flow, "train_flow", no_training)
    (again,) = flow.nll_reference(datasets=("moons",), **kw)
    assert again == row


def test_target_normaliser_matches_the_closed_form_for_u2():
    """U2 with the |z1| ≤ 4 wall integrates in closed form: over z2 a Gaussian of width 0.4 whatever z1, over
    z1 the box plus two Gaussian half-tails of width 0.05."""
    from neuralode.data.potentials import WALL_AT, WALL_WIDTH, log_normalizer

    exact = math.log(math.sqrt(2 * math.pi) * 0.4 * (2 * WALL_AT + WALL_WIDTH * math.sqrt(2 * math.pi)))
    assert abs(log_normalizer("U2") - exact) < 1e-6


def test_match_density_reports_a_non_negative_kl_for_the_base_itself(tmp_path):
    """KL(q ‖ p) ≥ 0 for any q: the estimate (with the quadrature log Z) must not fall below 0 beyond noise."""
    from neuralode.experiments.flow import match_density

    m = match_density(target="U1", model="planar", K=2, iters=2, out_dir=str(tmp_path), show_progress=False)
    assert m["kl"] > -3 * m["kl_se"] and m["kl_se"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("name", ["8gaussians", "circles", "moons"])
def test_true_density_of_a_toy_dataset_integrates_to_one_and_matches_its_sampler(name):
    from neuralode.data.toy2d import log_density_2d, sample_2d

    xs = torch.linspace(-4, 4, 401, dtype=torch.float64)
    X, Y = torch.meshgrid(xs, xs, indexing="ij")
    grid = torch.stack([X.reshape(-1), Y.reshape(-1)], 1)
    dens = log_density_2d(name, grid, n_quad=1000).exp().reshape(401, 401)
    cell = float(xs[1] - xs[0]) ** 2
    assert abs(float(dens.sum()) * cell - 1) < 1e-6
    # the probability of unit boxes by the density (midpoint rule) against the fraction of the sampler's draws
    x = sample_2d(name, 100_000, seed=3, dtype=torch.float64)
    mid = (torch.arange(200, dtype=torch.float64) + 0.5) / 200
    for lo0, lo1 in [(-1.0, -1.0), (0.0, 0.0), (-2.0, 0.5), (0.5, -1.5)]:
        M0, M1 = torch.meshgrid(lo0 + mid, lo1 + mid, indexing="ij")
        p = float(log_density_2d(name, torch.stack([M0.reshape(-1), M1.reshape(-1)], 1), n_quad=1000).exp().mean())
        hit = (x[:, 0] >= lo0) & (x[:, 0] < lo0 + 1) & (x[:, 1] >= lo1) & (x[:, 1] < lo1 + 1)
        freq = float(hit.double().mean())
        se = math.sqrt(max(p * (1 - p), 1e-12) / len(x))
        assert abs(freq - p) < 4 * se + 1e-3, (lo0, lo1, freq, p)


@pytest.mark.slow
def test_toy_entropies_match_thin_shape_formulas():
    # well-separated Gaussians / thin rings and curves: H ≈ log(mass split) + log(length) + ½ log(2πeσ²)
    from neuralode.data.toy2d import entropy_2d

    half_log_gauss = lambda s: 0.5 * math.log(2 * math.pi * math.e * s**2)  # noqa: E731
    want = {
        "8gaussians": math.log(8) + 2 * half_log_gauss(0.1 / 1.414),
        "circles": math.log(2) + 0.5 * (math.log(2 * math.pi) + math.log(4 * math.pi)) + half_log_gauss(0.08),
        "moons": math.log(2 * math.pi * 1.5) + half_log_gauss(0.075),
    }
    for name, h in want.items():
        got, se = entropy_2d(name, n=40_000)
        assert abs(got - h) < 0.03 + 3 * se, (name, got, h)
