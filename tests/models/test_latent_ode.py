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


@pytest.mark.slow
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


def test_rnn_input_is_each_observation_with_the_time_since_the_previous_one():
    torch.manual_seed(0)
    rnn = RNNBaseline(hidden=8)
    t, x, mask = spirals(batch=5)
    inp, packed_mask = rnn.inputs(t, x, mask)
    for b in range(5):
        seen = mask[:, b, 0].bool()
        k = int(seen.sum())
        times = t[seen]
        torch.testing.assert_close(inp[:k, b, :2], x[seen, b])
        torch.testing.assert_close(inp[:k, b, 2], torch.diff(times, prepend=t[:1]))  # time differences
        assert bool((packed_mask[:k, b] == 1).all()) and bool((packed_mask[k:, b] == 0).all())
    # the same values observed with other gaps are read differently
    stretched = rnn.predict(2 * t, x, mask)
    assert not torch.allclose(stretched, rnn.predict(t, x, mask))


def test_rnn_loss_over_packed_observations_equals_the_loss_of_its_predictions():
    torch.manual_seed(0)
    rnn = RNNBaseline(hidden=16)
    t, x, mask = spirals(batch=8)
    mask[:, 3] = 0
    mask[4, 3] = 1  # a sequence whose only observation is not at t[0]
    pred, valid = rnn(t, x, mask)
    m = mask * valid[..., None]
    torch.testing.assert_close(rnn.loss(t, x, mask), ((pred - x) ** 2 * m).sum() / m.sum())


@pytest.mark.parametrize("feedback_gap", [0.0, 0.25, 10.0])
def test_rnn_extrapolation_reads_back_its_predictions_every_feedback_gap(feedback_gap):
    torch.manual_seed(0)
    rnn = RNNBaseline(hidden=8)
    t = torch.arange(30) * 0.1
    t_obs, x, mask = spirals(batch=3, T=30)
    mask[15:] = 0  # observed in the first half only
    pred = rnn.predict(t, x, mask, feedback_gap=feedback_gap)
    # the same predictions follow from observing the predictions at the times the rule feeds back
    x2, mask2 = x.clone(), mask.clone()
    for b in range(3):
        last = int(mask[:, b, 0].nonzero().max())
        for i in range(last + 1, 30):
            if float(t[i] - t[last]) >= feedback_gap:
                x2[i, b], mask2[i, b], last = pred[i, b], 1.0, i
    torch.testing.assert_close(pred[15:], rnn(t, x2, mask2)[0][15:])
    fed = int(mask2[15:, 0, 0].sum())
    assert fed == {0.0: 15, 0.25: 5, 10.0: 0}[feedback_gap]
