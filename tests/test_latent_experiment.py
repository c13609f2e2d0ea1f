"""The latent-ODE experiment's data and metric (the Table 2 run itself is an experiment, not a test)."""

import math

import torch

from neuralode.experiments.latent import _observe, evaluate, spiral_dataset


def test_spirals_turn_both_ways_along_archimedean_spirals():
    t, clean, noisy = spiral_dataset(n_spirals=10, noise=0.1, seed=1)
    assert clean.shape == (200, 10, 2) and t[0] == 0 and abs(float(t[-1]) - 19.9) < 1e-5
    angle = torch.atan2(clean[..., 1], clean[..., 0])
    step = torch.remainder(angle[1] - angle[0] + math.pi, 2 * math.pi) - math.pi
    assert bool((step[0::2] < 0).all()) and bool((step[1::2] > 0).all())  # clockwise, counter-clockwise
    torch.testing.assert_close(step.abs(), torch.full((10,), 0.1), atol=1e-5, rtol=0)  # one radian per time unit
    radius = clean.norm(dim=-1)  # r = 0.5 + 0.05 s: grows by 0.05 per time unit from a start in [0.5, 2]
    torch.testing.assert_close(radius - radius[0], (0.05 * t)[:, None].expand(-1, 10), atol=1e-5, rtol=0)
    assert bool((radius[0] >= 0.5).all()) and bool((radius[0] <= 2.0).all())
    assert 0.08 < float((noisy - clean).std()) < 0.12


def test_each_sequence_observes_n_random_times_including_the_first():
    mask = _observe(100, 30, 64, torch.Generator().manual_seed(0))
    assert mask.shape == (100, 64, 1)
    assert bool((mask.sum(0) == 30).all()) and bool((mask[0] == 1).all())
    assert not torch.equal(mask[:, 0], mask[:, 1])  # sequences have their own times


def test_rmse_of_a_perfect_predictor_is_the_noise_level():
    t, clean, noisy = spiral_dataset(n_spirals=200, noise=0.1, seed=2)

    class Oracle:
        def predict(self, t_obs, x, mask, t_query):
            return clean

    ev = evaluate(Oracle(), "latent_ode", t, noisy, window=100, n_obs=30, seed=0)
    assert abs(ev["rmse_interpolation"] - 0.1) < 0.005 and abs(ev["rmse_extrapolation"] - 0.1) < 0.005
