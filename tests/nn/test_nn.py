"""The ODE block and its layers."""

import pytest
import torch

import neuralode as node
from neuralode.nn import ConcatConv2d, ConcatLinear, ConvODEFunc, MLPODEFunc, ODEBlock


def test_block_returns_the_solution_at_the_end_time():
    func = MLPODEFunc(3, 16).double()
    block = ODEBlock(func, t=(0.0, 0.7), rtol=1e-9, atol=1e-9, gradient="backprop")
    x = torch.randn(5, 3, dtype=torch.float64)
    expected = node.odeint(func, x, torch.tensor([0.0, 0.7], dtype=torch.float64), rtol=1e-9, atol=1e-9)[-1]
    assert torch.allclose(block(x), expected, atol=1e-12)


@pytest.mark.parametrize("gradient", ["adjoint", "backprop", "checkpoint"])
def test_block_records_forward_and_backward_cost(gradient):
    block = ODEBlock(MLPODEFunc(3, 16), gradient=gradient)
    out = block(torch.randn(4, 3))
    assert block.nfe_forward > 0 and block.nfe_backward == 0
    out.square().sum().backward()
    assert block.nfe_backward > 0
    assert all(p.grad is not None for p in block.parameters())


def test_gradient_modes_agree_in_the_block():
    torch.manual_seed(0)
    func = MLPODEFunc(3, 16).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    grads = {}
    for mode in ("backprop", "checkpoint", "adjoint"):
        func.zero_grad()
        ODEBlock(func, gradient=mode, rtol=1e-8, atol=1e-8)(x).square().sum().backward()
        grads[mode] = torch.cat([p.grad.reshape(-1) for p in func.parameters()])
    assert torch.allclose(grads["backprop"], grads["checkpoint"], atol=1e-10)
    assert torch.allclose(grads["backprop"], grads["adjoint"], atol=1e-6)


def test_concat_layers_see_time():
    conv, lin = ConcatConv2d(2, 4), ConcatLinear(3, 5)
    x, v = torch.randn(2, 2, 6, 6), torch.randn(7, 3)
    assert conv(torch.tensor(0.0), x).shape == (2, 4, 6, 6) and lin(torch.tensor(0.0), v).shape == (7, 5)
    assert not torch.allclose(conv(torch.tensor(0.0), x), conv(torch.tensor(1.0), x))
    assert not torch.allclose(lin(torch.tensor(0.0), v), lin(torch.tensor(1.0), v))


def test_conv_odefunc_preserves_shape_and_has_the_papers_size():
    func = ConvODEFunc(64)
    x = torch.randn(2, 64, 7, 7)
    assert func(torch.tensor(0.5), x).shape == x.shape
    # two 3×3 convolutions from 65 to 64 channels plus three GroupNorm(64): the ODE-Net's ODE part
    assert sum(p.numel() for p in func.parameters()) == 2 * (65 * 64 * 9 + 64) + 3 * 128


def test_conv_block_trains_one_step():
    torch.manual_seed(0)
    block = ODEBlock(ConvODEFunc(8, groups=4), rtol=1e-3, atol=1e-3)
    head = torch.nn.Linear(8, 2)
    x = torch.randn(16, 8, 5, 5)
    y = torch.randint(0, 2, (16,))
    opt = torch.optim.SGD(list(block.parameters()) + list(head.parameters()), lr=0.5)

    def loss_fn():
        return torch.nn.functional.cross_entropy(head(block(x).mean((2, 3))), y)

    before = loss_fn().item()
    for _ in range(3):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
    assert loss_fn().item() < before


class _Field(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, t, h):
        return self.net(h)


@pytest.mark.slow
def test_augmented_ode_fits_the_reflection_that_a_plain_ode_cannot():
    """Dupont et al. (2019): g(x) = −x on {−1, 1}. A plain 1-D flow preserves order, so its best MSE is 1
    (both points sent to 0); one extra zero dimension lets the flow rotate the points past each other."""
    from neuralode.nn import ODEBlock

    x = torch.tensor([[-1.0], [1.0]])
    losses = {}
    for aug in (0, 1):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(1 + aug, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1 + aug))

        block = ODEBlock(_Field(net), augment_dim=aug, gradient="backprop")
        opt = torch.optim.Adam(block.parameters(), 1e-2)
        for _ in range(300):
            out = block(x)
            assert out.shape == (2, 1 + aug)
            loss = ((out[:, :1] + x) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        losses[aug] = float(loss.detach())
    assert losses[0] > 0.5 and losses[1] < 1e-3, losses


class _Linear(torch.nn.Module):
    def __init__(self, A):
        super().__init__()
        self.A = torch.nn.Parameter(A.clone())

    def forward(self, t, h):
        return h @ self.A.T


@pytest.mark.slow
def test_kinetic_regulariser_is_the_integral_of_the_squared_speed_in_every_mode():
    from neuralode.nn import ODEBlock

    A = torch.tensor([[-0.5, 1.0], [-1.0, -0.2]], dtype=torch.float64)
    h0 = torch.tensor([[1.0, 0.0], [0.3, -2.0]], dtype=torch.float64)
    # independent reference: the exact flow e^{At} h0, the integrand |A h(t)|², the trapezoid rule on 20001 points
    ts = torch.linspace(0, 1, 20001, dtype=torch.float64)
    hs = torch.stack([torch.matrix_exp(A * t) @ h0.T for t in ts])
    exact = torch.trapezoid(torch.einsum("ij,tjb->tib", A, hs).pow(2).sum(1), ts, dim=0).mean()
    grads = []
    for mode in ("backprop", "adjoint", "checkpoint"):
        block = ODEBlock(_Linear(A), regularization={"kinetic": 1.0}, rtol=1e-10, atol=1e-10, gradient=mode)
        block(h0)
        assert abs(float(block.reg_loss.detach()) - float(exact)) < 1e-7
        block.reg_loss.backward()
        grads.append(block.func.A.grad.clone())
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(grads[2], grads[0], rtol=1e-6, atol=1e-8)
    block.eval()
    block(h0)
    assert block.reg_loss is None  # evaluation solves the plain dynamics


@pytest.mark.slow
def test_jacobian_regulariser_is_an_unbiased_estimate_of_the_frobenius_norm():
    from neuralode.nn import ODEBlock

    torch.manual_seed(0)
    A = torch.tensor([[-0.5, 1.0], [-1.0, -0.2]], dtype=torch.float64)
    h0 = torch.randn(8, 2, dtype=torch.float64)
    block = ODEBlock(_Linear(A), regularization={"jacobian": 1.0}, rtol=1e-8, atol=1e-8)
    draws = []
    for _ in range(300):
        block(h0)
        draws.append(float(block.reg_loss.detach()))
    draws = torch.tensor(draws)
    se = float(draws.std()) / len(draws) ** 0.5
    assert abs(float(draws.mean()) - float((A**2).sum())) < 3 * se  # ∫0^1 ‖A‖²_F dt


@pytest.mark.parametrize("gradient", ["adjoint", "backprop", "checkpoint"])
def test_a_torch_compiled_model_runs_its_ode_block_eagerly_with_the_same_result(gradient):
    # Dynamo cannot capture an adaptive loop: before the solvers broke the graph at their entry, tracing the
    # backprop solve failed in AOT autograd (an in-place write to a view made without grad), and the other
    # modes took 4-30 s to trace. With the break the layers around the block compile and the solve runs eagerly.
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 8), ODEBlock(MLPODEFunc(8, 16), gradient=gradient), torch.nn.Linear(8, 2)
    )
    x = torch.randn(16, 4)
    ref = model(x)
    ref.square().sum().backward()
    g_ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model, backend="aot_eager")
    out = compiled(x)
    out.square().sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-7)
    for p, g in zip(model.parameters(), g_ref):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-6)
    assert model[1].nfe_forward > 0 and model[1].nfe_backward > 0


def test_our_compile_inside_a_torch_compiled_model():
    torch.manual_seed(1)
    block = ODEBlock(MLPODEFunc(4, 16), gradient="backprop", compile="aot_eager")
    x = torch.randn(8, 4)
    ref = ODEBlock(block.func, gradient="backprop")(x)
    out = torch.compile(torch.nn.Sequential(block), backend="aot_eager")(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_block_keeps_float64_times():
    # times given as float64 stay float64 (they were rounded to float32: 0.1 became 0.10000000149)
    lin = torch.nn.Linear(1, 1, bias=False).double()
    with torch.no_grad():
        lin.weight.fill_(-1.0)
    t = torch.tensor([0.0, 0.1, 0.7], dtype=torch.float64)
    block = ODEBlock(MLPFree(lin), t=t, return_all=True, rtol=1e-12, atol=1e-12, gradient="backprop").double()
    out = block(torch.ones(2, 1, dtype=torch.float64))
    torch.testing.assert_close(out[:, 0, 0], torch.exp(-t), rtol=1e-10, atol=0)
    assert ODEBlock(MLPFree(lin)).t.dtype == torch.get_default_dtype()


class MLPFree(torch.nn.Module):
    def __init__(self, lin):
        super().__init__()
        self.lin = lin

    def forward(self, t, y):
        return self.lin(y)
