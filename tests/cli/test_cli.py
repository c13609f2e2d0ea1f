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


@pytest.mark.slow
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


@pytest.mark.slow
def test_demo_training_reduces_the_error(tmp_path):
    from neuralode.experiments.dynamics import train

    m = train(iters=80, eval_every=1, out_dir=str(tmp_path), show_progress=False, data_size=300, t_max=10.0)
    losses = [h["train_loss"] for h in m["history"]]
    assert sum(losses[-10:]) < 0.7 * sum(losses[:10]), losses


@pytest.mark.slow
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


@pytest.mark.slow
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


# --------------------------------------------------------------------------------------- argument validation

BAD_VALUES = [
    (["classify", "--batch-size", "0"], "--batch-size"),
    (["classify", "--test-batch-size", "-1"], "--test-batch-size"),
    (["classify", "--channels", "0"], "--channels"),
    (["classify", "--channels", "40"], "--channels"),  # GroupNorm: at most 32 or a multiple of 32
    (["classify", "--epochs", "0"], "--epochs"),
    (["classify", "--limit-train", "0"], "--limit-train"),
    (["classify", "--limit-test", "ten"], "--limit-test"),
    (["classify", "--lr", "0"], "--lr"),
    (["classify", "--tol", "nan"], "--tol"),
    (["classify", "--deq-tol", "-0.001"], "--deq-tol"),
    (["classify", "--deq-max-iter", "0"], "--deq-max-iter"),
    (["classify", "--rk-steps", "0"], "--rk-steps"),
    (["classify", "--kinetic", "-1"], "--kinetic"),
    (["classify", "--tolerances", "1e-3", "0"], "--tolerances"),
    (["classify", "--seed", "-1"], "--seed"),
    (["classify", "--method", "dopri6"], "--method"),
    (["demo", "--iters", "0"], "--iters"),
    (["demo", "--batch-size", "0"], "--batch-size"),
    (["demo", "--batch-time", "1"], "--batch-time"),
    (["dynamics", "--data-size", "0"], "--data-size"),
    (["dynamics", "--trajectories", "0"], "--trajectories"),
    (["dynamics", "--noise", "-0.1"], "--noise"),
    (["flow", "--iters", "0"], "--iters"),
    (["flow", "--eval-every", "0"], "--eval-every"),
    (["flow", "--n-test", "0"], "--n-test"),
    (["flow", "--hidden", "0"], "--hidden"),
    (["flow", "--layers", "-2"], "--layers"),
    (["flow", "--anneal", "1.5"], "--anneal"),
    (["flow", "--factor", "1"], "--factor"),
    (["flow", "--K", "0"], "--K"),
    (["flow", "--tol", "inf"], "--tol"),
    (["augmented", "--iters", "0"], "--iters"),
    (["latent", "--n", "30", "0"], "--n"),
    (["latent", "--n", "101"], "--n"),  # more than the 100 observable times
    (["latent", "--n-spirals", "2"], "--n-spirals"),  # one each for training, validation and test at least
    (["bench", "--threads", "0"], "--threads"),
    (["bench", "--back-to-back", "0"], "--back-to-back"),
    (["bench", "--cases", "huge"], "--cases"),
]


def _one_line_error(capsys, *words):
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "error:" in lines[0] and "Traceback" not in err
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


@pytest.mark.parametrize("argv, flag", BAD_VALUES, ids=[" ".join(a) for a, _ in BAD_VALUES])
def test_the_parser_rejects_bad_numbers_in_one_line(argv, flag, capsys):
    from neuralode.cli import build_parser

    with pytest.raises(SystemExit) as exc:  # the parser itself: nothing runs
        build_parser().parse_args(argv)
    assert exc.value.code == 2
    _one_line_error(capsys, f"argument {flag}:", repr(argv[-1]))


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["demo", "--iters", "1", "--data-size", "10", "--batch-time", "10"], "--batch-time"),
        (["dynamics", "--iters", "1", "--data-size", "20", "--hybrid"], "--hybrid"),  # the spiral has no physics
        (
            ["classify", "--model", "resnet", "--sweep", "--epochs", "1", "--limit-train", "16", "--limit-test", "16"],
            "--sweep",
        ),
    ],
)
def test_flags_that_contradict_each_other_stop_before_the_run(argv, flag, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--channels", "4"] if argv[0] == "classify" else argv + ["--no-progress", "--out", str(tmp_path)])
    assert exc.value.code == 2
    _one_line_error(capsys, f"argument {flag}:")


def test_bench_cases_are_the_benchmarks():
    from neuralode.cli import BENCH_CASES
    from neuralode.experiments.bench import CASES

    assert set(BENCH_CASES) == set(CASES)


@pytest.mark.parametrize("command", ["classify", "bench"])
@pytest.mark.parametrize("device", ["cuda", "cuda:0", "tpu", "cpu:x"])
def test_an_unavailable_device_is_refused_naming_the_available_ones(command, device, capsys):
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(SystemExit) as exc:
        main([command, "--device", device])
    assert exc.value.code == 2
    _one_line_error(capsys, "argument --device:", repr(device), "available: cpu")
    from neuralode.cli import build_parser

    assert build_parser().parse_args([command, "--device", "cpu"]).device == "cpu"


def test_an_out_path_under_a_file_is_refused_before_the_run(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    for argv in (["demo", "--iters", "1"], ["classify", "--epochs", "1"], ["bench", "--cases", "tiny"]):
        out = blocker / ("x.json" if argv[0] == "bench" else "run")
        with pytest.raises(SystemExit) as exc:
            main([*argv, "--out", str(out)])
        assert exc.value.code == 2
        _one_line_error(capsys, "argument --out:", str(blocker), "not a folder")
    with pytest.raises(SystemExit):  # the run folder itself a file
        main(["demo", "--iters", "1", "--no-progress", "--out", str(blocker)])
    _one_line_error(capsys, "argument --out:")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes in read-only folders")
def test_an_out_folder_without_write_permission_is_refused(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        with pytest.raises(SystemExit) as exc:
            main(["demo", "--iters", "1", "--no-progress", "--out", str(locked / "run")])
        assert exc.value.code == 2
        _one_line_error(capsys, "argument --out:", "permission")
    finally:
        locked.chmod(0o755)


@pytest.mark.slow
def test_python_dash_m_neuralode_is_the_command(tmp_path):
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "neuralode", "--help"], capture_output=True, text=True, env=env)
    assert run.returncode == 0 and run.stdout.startswith("usage: neuralode") and "classify" in run.stdout
    bad = [sys.executable, "-m", "neuralode", "classify", "--batch-size", "0"]
    run = subprocess.run(bad, capture_output=True, text=True, env=env)
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.count("\n") == 1 and "argument --batch-size" in run.stderr


# ------------------------------------------------------------------------------------------------ checkpoints

TINY = ["--epochs", "1", "--limit-train", "16", "--limit-test", "16", "--batch-size", "16", "--channels", "4"]


class _Payload:
    """Pickles as a call of os.system: what a crafted checkpoint does when loaded with weights_only=False."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _checkpoint_of_another_shape(path):
    """Every key a classify checkpoint has, the configuration of TINY, the weights of a 16-channel model."""
    import dataclasses

    import torch

    from neuralode.experiments.classify import ClassifyConfig
    from neuralode.models.classifier import build_classifier

    model = build_classifier("odenet", 1, 10, 16)
    opt = torch.optim.Adam(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    cfg = dataclasses.asdict(ClassifyConfig(channels=4, epochs=1))
    state = dict(model=model.state_dict(), optimizer=opt.state_dict(), scheduler=sched.state_dict())
    torch.save(dict(state, epoch=1, history=[], nfe_trace=[], config=cfg), path)


def _write(kind, path, marker):
    import torch

    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "garbage":
        path.write_bytes(b"\x80\x02not a checkpoint at all" * 10)
    elif kind == "truncated":
        torch.save({"model": {"w": torch.zeros(100)}}, path)
        path.write_bytes(path.read_bytes()[:200])
    elif kind == "payload":
        torch.save({"model": _Payload(marker), "config": {"model": "odenet"}}, path)
    elif kind == "foreign":  # another program's state dict
        torch.save(torch.nn.Linear(3, 2).state_dict(), path)
    elif kind == "not a dict":
        torch.save([torch.zeros(2)], path)
    elif kind == "another shape":
        _checkpoint_of_another_shape(path)


CHECKPOINTS = ["empty", "garbage", "truncated", "payload", "foreign", "not a dict", "another shape"]


@pytest.mark.parametrize("kind", CHECKPOINTS)
def test_resume_from_an_unusable_checkpoint_is_one_line_naming_it(kind, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    ckpt = run / "checkpoint.pt"
    marker = tmp_path / "PAYLOAD_RAN"
    _write(kind, ckpt, marker)
    rc = main(["classify", "--resume", "--no-progress", "--out", str(run), *TINY])
    assert not marker.exists(), "loading the checkpoint ran code"
    assert rc == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "invalid literal" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("neuralode classify: error: --resume:"), err
    assert str(ckpt) in lines[0]
    if kind == "payload":
        assert "refusing to load" in lines[0] and "system" in lines[0]


def test_a_crafted_checkpoint_runs_no_code_in_the_tolerance_sweep(tmp_path):
    from neuralode.experiments._io import CheckpointError
    from neuralode.experiments.classify import load_trained

    marker = tmp_path / "PAYLOAD_RAN"
    _write("payload", tmp_path / "checkpoint.pt", marker)
    with pytest.raises(CheckpointError, match=r"refusing to load .*checkpoint.pt.*system") as exc:
        load_trained(str(tmp_path))
    assert not marker.exists() and "\n" not in str(exc.value)
    _write("another shape", tmp_path / "checkpoint.pt", marker)
    with pytest.raises(CheckpointError, match="checkpoint.pt"):
        load_trained(str(tmp_path))


def _only_plain_data(obj, where="checkpoint"):
    import torch

    if isinstance(obj, dict):  # state dicts are OrderedDicts: a dict the safe unpickler reads
        for k, v in obj.items():
            assert k is None or type(k) in (bool, int, float, str), (where, k)
            _only_plain_data(v, f"{where}[{k!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _only_plain_data(v, f"{where}[{i}]")
    else:
        assert obj is None or type(obj) in (bool, int, float, str, torch.Tensor), (where, type(obj))


def test_checkpoints_are_data_and_resume_from_them(tmp_path):
    import argparse

    import numpy as np
    import torch

    from neuralode.experiments.classify import ClassifyConfig, load_trained, train

    # whatever a caller puts in the configuration is written as plain data, not as pickled objects
    extra = {
        "score": np.float64(0.5),
        "count": np.int64(3),
        "shape": torch.Size([2, 3]),
        "args": argparse.Namespace(a=1),
    }
    cfg = ClassifyConfig(
        model="resnet", epochs=1, limit_train=16, limit_test=16, batch_size=16, channels=4, out_dir=str(tmp_path),
        extra=extra,
    )  # fmt: skip
    first = train(cfg, show_progress=False)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    _only_plain_data(state)
    assert state["config"]["extra"] == {"score": 0.5, "count": 3, "shape": [2, 3], "args": {"a": 1}}
    cfg.epochs = 2
    second = train(cfg, resume=True, show_progress=False)
    assert [h["epoch"] for h in second["history"]] == [1, 2] and second["history"][0] == first["history"][0]
    model, saved = load_trained(str(tmp_path))
    assert saved.channels == 4 and saved.model == "resnet"


def test_plain_converts_what_the_safe_loader_cannot_read():
    import argparse
    import dataclasses

    import numpy as np
    import torch

    from neuralode.experiments._io import plain

    @dataclasses.dataclass
    class D:
        x: tuple = (1, 2)

    t = torch.ones(2)
    got = plain(
        {
            "a": np.float32(1.5),
            3: (np.bool_(True), None),
            "n": argparse.Namespace(d=D()),
            "t": t,
            "dev": torch.device("cpu"),
        }
    )
    assert got == {"a": 1.5, 3: [True, None], "n": {"d": {"x": [1, 2]}}, "t": t, "dev": "cpu"}
    assert type(got["a"]) is float and type(got[3][0]) is bool


def test_version_is_the_package_version(capsys):
    import neuralode

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"neuralode {neuralode.__version__}"
