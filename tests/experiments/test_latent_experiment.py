"""The latent-ODE experiment's data and metric (the Table 2 run itself is an experiment, not a test)."""

import math

import torch

from neuralode.experiments import latent
from neuralode.experiments.latent import (
    _fit,
    _observe,
    _split,
    compare,
    evaluate,
    feedback_gaps,
    select_rnn,
    spiral_dataset,
)
from neuralode.models import RNNBaseline


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


def test_training_validation_and_test_spirals_are_disjoint():
    noisy = torch.arange(30.0)[None, :, None]
    train, val, test = _split(noisy, n_test=6, n_val=4)
    ids = [set(part[0, :, 0].tolist()) for part in (train, val, test)]
    assert [len(i) for i in ids] == [20, 4, 6] and len(set.union(*ids)) == 30


def test_rnn_settings_are_chosen_on_validation_spirals_only(monkeypatch):
    _, _, noisy = spiral_dataset(n_spirals=30, seed=0)
    val = _split(noisy, n_test=6, n_val=4)[1]
    scored = []
    real = latent.evaluate

    def spy(net, model, t, x, *args, **kwargs):
        scored.append(x)
        return real(net, model, t, x, *args, **kwargs)

    monkeypatch.setattr(latent, "evaluate", spy)
    sel = select_rnn(
        n_obs=10, iters=2, hidden_sizes=(4, 6), lrs=(1e-3, 1e-2), n_spirals=30, n_test=6, n_val=4, show_progress=False
    )
    gaps = feedback_gaps(spiral_dataset(n_spirals=2)[0], 10)
    assert len(scored) == 4 * len(gaps) and all(torch.equal(x, val) for x in scored)  # never the test spirals
    assert len(sel["grid"]) == 4 * len(gaps) and {g["feedback_gap"] for g in sel["grid"]} == set(gaps)
    best = min(sel["grid"], key=lambda g: g["validation_rmse_extrapolation"])
    assert (sel["hidden"], sel["lr"], sel["feedback_gap"]) == (best["hidden"], best["lr"], best["feedback_gap"])
    assert sel["_net"].hidden == best["hidden"]


def test_feedback_gaps_are_multiples_of_the_mean_training_gap_in_whole_query_steps():
    t = spiral_dataset(n_spirals=2)[0]  # 0.1 apart, a window of 100 times
    assert feedback_gaps(t, 100) == [0.0, 0.15]  # every step, every second step
    assert feedback_gaps(t, 30) == [0.0, 0.15, 0.25, 0.65]  # mean gap 9.9 / 29 = 0.34: 2, 3, 7 steps


def test_a_time_budget_trains_until_the_budget_is_spent():
    t, _, noisy = spiral_dataset(n_spirals=10)
    net = RNNBaseline(hidden=4)
    kw = dict(n_obs=10, batch_size=4, lr=1e-2, noise=0.1, seed=0, show_progress=False)
    fit = _fit(net, "rnn", t, noisy, iters=3, time_budget=0.2, **kw)
    assert fit["train_seconds"] >= 0.2 and fit["iters"] > 3  # iters only sizes the schedule without a budget
    assert _fit(net, "rnn", t, noisy, iters=3, **kw)["iters"] == 3


def test_the_rnn_is_reported_at_equal_iterations_and_at_the_latent_odes_wall_time():
    lat, rnn, nets = compare(
        n_obs=10,
        iters=2,
        encoder="gru",
        n_spirals=30,
        n_test=6,
        n_val=4,
        rnn_hidden=(4,),
        rnn_lr=(1e-2,),
        show_progress=False,
    )
    assert lat["model"] == "latent_ode" and rnn["model"] == "rnn" and lat["iters"] == rnn["iters"] == 2
    assert rnn["latent_ode_train_seconds"] == lat["train_seconds"]
    assert rnn["train_seconds_at_latent_ode_wall_time"] >= lat["train_seconds"]
    assert rnn["iters_at_latent_ode_wall_time"] >= 1
    for key in ("rmse_extrapolation", "rmse_extrapolation_at_latent_ode_wall_time", "validation_rmse_extrapolation"):
        assert rnn[key] > 0
    assert (rnn["hidden"], rnn["lr"]) == (4, 1e-2) and nets["rnn"][0].hidden == 4
