"""Latent ODE: masks, the ELBO, and the RNN baseline, on tiny data."""

import math

import pytest
import torch

from neuralode.models import LatentODE, RNNBaseline


def spirals(batch=16, T=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.linspace(0, 2, T)
    direction = torch.where(torch.rand(batch, generator=g) < 0.5, -1.0, 1.0)
    phase = 2 * math.pi * torch.rand(batch, generator=g)
    theta = direction[None] * 2 * t[:, None] + phase[None]
    r = 1 + 0.3 * t[:, None]
    x = torch.stack([r * torch.cos(theta), r * torch.sin(theta)], -1)  # (T, B, 2)
    mask = (torch.rand(T, batch, 1, generator=g) < 0.6).float().expand(T, batch, 2).clone()
    mask[0] = 1
    return t, x, mask


@pytest.mark.parametrize("encoder", ["gru", "odernn"])
def test_loss_does_not_depend_on_values_at_unobserved_times(encoder):
    torch.manual_seed(0)
    model = LatentODE(encoder=encoder)
    t, x, mask = spirals()
    x2 = torch.where(mask.bool(), x, torch.randn_like(x) * 100)  # garbage where not observed
    torch.manual_seed(1)
    e1, _ = model.elbo(t, x, mask)
    torch.manual_seed(1)
    e2, _ = model.elbo(t, x2, mask)
    assert torch.allclose(e1, e2)
    rnn = RNNBaseline()
    assert torch.allclose(rnn.loss(t, x, mask), rnn.loss(t, x2, mask))


def test_sequences_observed_at_different_times_are_encoded_independently():
    torch.manual_seed(0)
    model = LatentODE()
    t, x, mask = spirals(batch=4)
    mean_all, _ = model.encoder(t, x, mask)
    mean_one, _ = model.encoder(t, x[:, 2:3], mask[:, 2:3])
    assert torch.allclose(mean_all[2:3], mean_one, atol=1e-6)


@pytest.mark.parametrize("encoder", ["gru", "odernn"])
def test_elbo_improves_over_a_few_iterations(encoder):
    torch.manual_seed(0)
    model = LatentODE(encoder=encoder)
    t, x, mask = spirals(batch=32)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    values = []
    for _ in range(25):
        opt.zero_grad()
        elbo, _ = model.elbo(t, x, mask)
        (-elbo).backward()
        opt.step()
        values.append(elbo.item())
    assert sum(values[-5:]) / 5 > sum(values[:5]) / 5
    assert model.last_stats.nfe > 0


def test_rnn_baseline_learns_one_step_prediction():
    torch.manual_seed(0)
    rnn = RNNBaseline(hidden=32)
    t, x, mask = spirals(batch=32)
    opt = torch.optim.Adam(rnn.parameters(), lr=1e-2)
    first = rnn.loss(t, x, mask).item()
    for _ in range(40):
        opt.zero_grad()
        loss = rnn.loss(t, x, mask)
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first
    assert rnn.predict(t, x, mask).shape == x.shape


def test_prediction_extends_past_the_observations():
    model = LatentODE()
    t, x, mask = spirals(batch=3)
    t_query = torch.linspace(0, 4, 40)
    assert model.predict(t, x, mask, t_query).shape == (40, 3, 2)


def test_unknown_encoder_is_rejected():
    with pytest.raises(ValueError, match="`encoder` must be 'gru' or 'odernn'"):
        LatentODE(encoder="lstm")
