"""The command line runs end to end on tiny settings and writes its metrics and plots."""

import json
import os

import pytest

from neuralode.cli import main


def test_demo_writes_metrics_and_plots(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--iters", "4", "--no-progress", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["iters"] == 4 and metrics["history"][-1]["nfe_forward"] > 0
    assert metrics["history"][-1]["nfe_backward"] > 0
    for name in ("metrics.csv", "loss.png", "trajectories.png", "phase.png"):
        assert (out / name).stat().st_size > 0


@pytest.mark.parametrize("system", ["pendulum", "falling", "lotka_volterra"])
def test_dynamics_cli_runs_each_system_with_irregular_noisy_data(tmp_path, system):
    out = tmp_path / system
    argv = [
        "dynamics",
        "--system",
        system,
        "--hybrid",
        "--iters",
        "3",
        "--data-size",
        "60",
        "--noise",
        "0.01",
        "--irregular",
        "--no-progress",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["physical_parameters"]) and (out / "phase.png").exists()


def test_demo_training_reduces_the_error(tmp_path):
    from neuralode.experiments.dynamics import train

    m = train(iters=80, eval_every=1, out_dir=str(tmp_path), show_progress=False, data_size=300, t_max=10.0)
    losses = [h["train_loss"] for h in m["history"]]
    assert sum(losses[-10:]) < 0.7 * sum(losses[:10]), losses


def test_bench_runs_and_writes_json(tmp_path):
    pytest.importorskip("torchdiffeq")
    out = tmp_path / "bench.json"
    assert main(["bench", "--cases", "tiny", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    libs = {r["library"] for r in rows}
    assert {"neuralode", "torchdiffeq"} <= libs
    assert all(r["overhead"] > 0 and r["nfe"] > 0 for r in rows)
    assert os.path.exists(str(out).replace(".json", ".png"))


def test_unknown_subcommand_exits_with_usage():
    with pytest.raises(SystemExit):
        main(["nonsense"])


def test_latent_cli_writes_its_table_and_plots(tmp_path):
    out = tmp_path / "latent"
    argv = ["latent", "--n", "30", "--iters", "3", "--n-spirals", "40", "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert {r["model"] for r in rows} == {"rnn", "latent_ode"}
    assert all(r["rmse_extrapolation"] > 0 for r in rows)
    for name in ("results.csv", "table.md", "spirals.png", "prior_samples.png"):
        assert (out / name).stat().st_size > 0


def test_augmented_cli_writes_metrics_and_plots(tmp_path):
    from neuralode.cli import main

    out = tmp_path / "aug"
    assert main(["augmented", "--iters", "5", "--out", str(out), "--no-progress"]) == 0
    import json

    runs = json.loads((out / "metrics.json").read_text())["runs"]
    assert [r["augment_dim"] for r in runs] == [0, 1]
    assert all(len(r["history"]) == 5 and r["history"][-1]["nfe_forward"] > 0 for r in runs)
    assert (out / "training.png").exists() and (out / "features.png").exists()


def test_concentric_circles_have_the_stated_radii_and_labels():
    import torch

    from neuralode.experiments.augmented import concentric_circles

    x, y = concentric_circles(1000, generator=torch.Generator().manual_seed(0))
    r = x.norm(dim=1)
    assert bool((r[y < 0] < 0.5).all()) and bool(((r[y > 0] > 1.0) & (r[y > 0] < 1.5)).all())
    assert int((y < 0).sum()) == 500
    # uniform in area: half of the disk's points lie within radius 0.5/√2
    assert abs(float((r[y < 0] < 0.5 / 2**0.5).float().mean()) - 0.5) < 0.06
