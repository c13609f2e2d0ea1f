"""Image classification (the ODE-Net classifier): IDX data, the three models, training, the CLI, resume,
the test-time tolerance sweep, distributed training, memory."""

import gzip
import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from neuralode.cli import main
from neuralode.data.images import load_images, read_idx, write_idx
from neuralode.models.classifier import ODENet, ResNet, RKNet, build_classifier, count_parameters
from neuralode.nn import ConcatConv2d

# ----------------------------------------------------------------------------------------------- IDX files


def _idx_bytes(array: np.ndarray, code: int) -> bytes:
    # built by hand from the format description (two zero bytes, type code, ndim, big-endian sizes, data)
    header = struct.pack(">HBB", 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_reads_hand_built_files(tmp_path, compress):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    raw = _idx_bytes(images, 0x08)
    path = tmp_path / ("imgs.gz" if compress else "imgs")
    path.write_bytes(gzip.compress(raw) if compress else raw)
    np.testing.assert_array_equal(read_idx(str(path)), images)
    ints = np.array([[1, -2], [300000, 7]], dtype=np.int32)
    (tmp_path / "ints").write_bytes(_idx_bytes(ints, 0x0C))
    np.testing.assert_array_equal(read_idx(str(tmp_path / "ints")), ints)


def test_write_idx_matches_the_format(tmp_path):
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    write_idx(str(tmp_path / "l"), labels)
    assert (tmp_path / "l").read_bytes() == _idx_bytes(labels, 0x08)


def test_read_idx_rejects_bad_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="two zero bytes"):
        read_idx(str(tmp_path / "bad"))
    short = _idx_bytes(np.zeros((4, 2), np.uint8), 0x08)[:-3]
    (tmp_path / "short").write_bytes(short)
    with pytest.raises(ValueError, match="announces shape"):
        read_idx(str(tmp_path / "short"))


def _write_mnist_like(folder, n_train=40, n_test=20, gz=True):
    rng = np.random.default_rng(0)
    os.makedirs(folder, exist_ok=True)
    suffix = ".gz" if gz else ""
    for split, n in (("train", n_train), ("t10k", n_test)):
        write_idx(
            os.path.join(folder, f"{split}-images-idx3-ubyte{suffix}"),
            rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
        )
        write_idx(os.path.join(folder, f"{split}-labels-idx1-ubyte{suffix}"), rng.integers(0, 10, n, dtype=np.uint8))


def test_load_images_from_an_idx_folder(tmp_path):
    _write_mnist_like(tmp_path / "m", gz=False)
    d = load_images("mnist", str(tmp_path / "m"))
    assert d.x_train.shape == (40, 1, 28, 28) and d.x_test.shape == (20, 1, 28, 28)
    assert d.y_train.dtype == torch.int64 and int(d.y_train.max()) < 10
    assert abs(float(d.x_train.mean())) < 1e-5 and abs(float(d.x_train.std()) - 1) < 1e-3


def test_missing_data_gets_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"train-images-idx3-ubyte.*dataset-fashion-mnist"):
        load_images("fashion-mnist", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="--data-dir"):
        load_images("mnist")
    with pytest.raises(ValueError, match="choose one of"):
        load_images("cifar")


def test_cli_reports_missing_data_in_one_line(tmp_path, capsys):
    rc = main(
        ["classify", "--dataset", "mnist", "--data-dir", str(tmp_path), "--no-progress", "--out", str(tmp_path / "run")]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "t10k-labels-idx1-ubyte" in err and "Traceback" not in err


def test_digits_are_built_in():
    d = load_images("digits")
    assert d.x_train.shape == (1437, 1, 8, 8) and d.x_test.shape == (360, 1, 8, 8)
    assert set(d.y_train.tolist()) == set(range(10))


# ---------------------------------------------------------------------------------------------- the models


def _conv(cin, cout, k, bias=True):
    return cin * cout * k * k + (cout if bias else 0)


def test_parameter_counts_match_the_papers_architecture():
    gn = 2 * 64
    stem = _conv(1, 64, 3) + gn + _conv(64, 64, 4) + gn + _conv(64, 64, 4)
    head = gn + 64 * 10 + 10
    ode_func = 2 * _conv(65, 64, 3) + 3 * gn
    res_blocks = 6 * (2 * _conv(64, 64, 3, bias=False) + 2 * gn)
    assert count_parameters(ODENet()) == stem + ode_func + head
    assert count_parameters(RKNet()) == stem + ode_func + head
    assert count_parameters(ResNet()) == stem + res_blocks + head
    # the figures: about 0.21M and 0.58M, and the ODE-Net at most 40% of the ResNet
    assert abs(count_parameters(ODENet()) / 1e6 - 0.21) < 0.01
    assert abs(count_parameters(ResNet()) / 1e6 - 0.58) < 0.01
    assert count_parameters(ODENet()) <= 0.4 * count_parameters(ResNet())


@pytest.mark.parametrize("kind", ["odenet", "resnet", "rknet"])
@pytest.mark.parametrize("size", [8, 28])
def test_output_shapes(kind, size):
    model = build_classifier(kind, channels=16)
    out = model(torch.randn(3, 1, size, size))
    assert out.shape == (3, 10)


def test_concat_conv_equals_a_convolution_of_the_concatenated_time_channel():
    torch.manual_seed(0)
    for k, s, p in ((3, 1, 1), (4, 2, 1), (3, 1, 0)):
        layer = ConcatConv2d(3, 5, k, s, p).double()
        x = torch.randn(2, 3, 7, 7, dtype=torch.float64)
        t = torch.tensor(0.3, dtype=torch.float64)
        ref = F.conv2d(torch.cat([x, t.expand(2, 1, 7, 7)], 1), layer.conv.weight, layer.conv.bias, s, p)
        torch.testing.assert_close(layer(t, x), ref)


@pytest.mark.parametrize("kind", ["odenet", "resnet", "rknet"])
def test_one_training_step_lowers_the_loss_on_a_fixed_batch(kind):
    torch.manual_seed(0)
    d = load_images("digits", limit_train=64)
    model = build_classifier(kind, channels=16)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = d.x_train, d.y_train
    loss0 = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss0.backward()
    opt.step()
    with torch.no_grad():
        loss1 = F.cross_entropy(model(x), y)
    assert float(loss1) < float(loss0.detach())


def test_odenet_records_forward_and_backward_nfe():
    model = ODENet(channels=16)
    model(torch.randn(4, 1, 8, 8)).sum().backward()
    f, b = model.nfe()
    assert f >= 8 and b >= 8  # dopri5: at least one step of six evaluations plus the first


class _Constant(torch.nn.Module):
    """Logits that ignore the image: always the same, so always the same predicted class (their argmax)."""

    def __init__(self, logits):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.as_tensor(logits, dtype=torch.float32))

    def forward(self, x):
        return self.logits.expand(len(x), -1)


def test_evaluate_reports_the_error_and_loss_of_a_known_classifier():
    """A classifier that always predicts class 2, on 10 images of which 3 are of class 2: error 7/10; the
    loss is the mean cross entropy, -log softmax(logits)[label], known in closed form; batches of 4 (the
    last one short) do not change either."""
    from neuralode.experiments.classify import evaluate

    logits = torch.tensor([0.5, -1.0, 2.0, 0.0])
    model = _Constant(logits)
    y = torch.tensor([2, 0, 1, 2, 3, 3, 0, 2, 1, 3])
    x = torch.randn(10, 1, 8, 8)
    logp = torch.log_softmax(logits.double(), 0)
    want_loss = float(-logp[y].mean())
    for batch_size in (4, 10, 1000):
        got = evaluate(model, x, y, batch_size=batch_size)
        assert got["error"] == pytest.approx(0.7, abs=1e-12), batch_size
        assert got["loss"] == pytest.approx(want_loss, rel=1e-6), batch_size
        assert got["nfe"] == 0  # no ODE block
    assert model.training  # evaluate puts the model back in training mode
    # a perfect classifier on one class: error 0
    assert evaluate(_Constant(logits), x[:3], torch.full((3,), 2))["error"] == 0


@pytest.mark.slow
def test_adjoint_training_memory_is_below_backprop_and_does_not_grow_with_the_steps():
    from neuralode.experiments.classify import peak_step_memory

    torch.manual_seed(0)
    x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
    loose = ODENet(channels=32, rtol=1e-2, atol=1e-2)
    tight = ODENet(channels=32, rtol=1e-6, atol=1e-6)
    tight.load_state_dict(loose.state_dict())
    backprop = ODENet(channels=32, gradient="backprop", rtol=1e-6, atol=1e-6)
    backprop.load_state_dict(loose.state_dict())
    m_loose, m_tight, m_bp = (peak_step_memory(m, x, y) for m in (loose, tight, backprop))
    assert tight.nfe()[0] > 2 * loose.nfe()[0]
    assert m_tight < 1.1 * m_loose  # O(1) in the number of steps
    assert m_bp > 1.5 * m_tight


# ------------------------------------------------------------------------------------------------- the CLI


def _classify(tmp_path, *extra):
    out = tmp_path / "run"
    argv = [
        "classify",
        "--limit-train",
        "96",
        "--limit-test",
        "64",
        "--batch-size",
        "32",
        "--channels",
        "16",
        "--no-progress",
        "--out",
        str(out),
        *extra,
    ]
    assert main(argv) == 0
    return out


def _recomputed_test_metrics(out, shards=1):
    """Test error and mean loss of the model saved in ``out``, recomputed here with plain argmax and cross
    entropy on the run's test slice; ``shards``: the processes' interleaved shards, each solved as one batch
    (an adaptive solve's steps depend on the batch), summed as the run sums them."""
    from neuralode.experiments.classify import load_trained

    model, cfg = load_trained(str(out))
    data = load_images(cfg.dataset, cfg.data_dir, cfg.limit_train, cfg.limit_test)
    model.eval()
    wrong = loss = 0.0
    with torch.no_grad():
        for rank in range(shards):
            x, y = data.x_test[rank::shards], data.y_test[rank::shards]
            logits = model(x)
            wrong += float((logits.argmax(1) != y).sum())
            loss += float(F.cross_entropy(logits.double(), y, reduction="sum"))
    n = len(data.y_test)
    return wrong / n, loss / n


@pytest.mark.slow
def test_cli_trains_writes_metrics_plots_and_resumes(tmp_path):
    out = _classify(tmp_path, "--epochs", "1")
    first = json.loads((out / "metrics.json").read_text())
    assert first["parameters"] > 0 and len(first["history"]) == 1
    row = first["history"][0]
    # the test metrics are those of the epoch's model (saved in the checkpoint), recomputed independently
    error, loss = _recomputed_test_metrics(out)
    assert row["test_error"] == pytest.approx(error, abs=1e-12) and row["test_loss"] == pytest.approx(loss, rel=1e-5)
    assert 0 <= row["train_error"] <= 1 and row["train_loss"] > 0 and row["seconds"] > 0
    assert row["nfe_forward"] > 0 and row["nfe_backward"] > 0 and row["peak_memory_mib"] > 0
    for name in ("metrics.csv", "nfe.png", "error.png", "checkpoint.pt"):
        assert (out / name).stat().st_size > 0
    _classify(tmp_path, "--epochs", "2", "--resume")
    second = json.loads((out / "metrics.json").read_text())
    assert [h["epoch"] for h in second["history"]] == [1, 2]
    assert second["history"][0] == first["history"][0]  # epoch 1 was not redone
    assert second["test_error"] == second["history"][1]["test_error"]
    assert second["test_error"] == pytest.approx(_recomputed_test_metrics(out)[0], abs=1e-12)


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path, capsys):
    rc = main(["classify", "--resume", "--no-progress", "--out", str(tmp_path / "none")])
    assert rc == 2 and "no checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("model", ["resnet", "rknet"])
def test_cli_trains_the_baselines(tmp_path, model):
    out = _classify(tmp_path, "--epochs", "1", "--model", model)
    m = json.loads((out / "metrics.json").read_text())
    error, loss = _recomputed_test_metrics(out)
    assert m["model"] == model and m["history"][0]["test_error"] == pytest.approx(error, abs=1e-12)
    assert m["history"][0]["test_loss"] == pytest.approx(loss, rel=1e-5)


def test_tolerance_sweep_trades_evaluations_for_accuracy(tmp_path):
    out = _classify(tmp_path, "--epochs", "1", "--sweep", "--tolerances", "1e-1", "1e-3", "1e-5")
    rows = json.loads((out / "sweep.json").read_text())["rows"]
    nfe = [r["nfe_forward"] for r in rows]
    assert nfe[0] < nfe[1] < nfe[2], nfe
    # at the training tolerance (1e-3) the sweep evaluates the trained model as training did
    history = json.loads((out / "metrics.json").read_text())["history"]
    assert rows[1]["tolerance"] == 1e-3 and rows[1]["test_error"] == history[-1]["test_error"]
    assert rows[1]["test_error"] == pytest.approx(_recomputed_test_metrics(out)[0], abs=1e-12)
    assert (out / "sweep.png").stat().st_size > 0 and (out / "sweep.csv").exists()


@pytest.mark.slow
def test_classify_runs_under_torchrun_with_two_processes(tmp_path):
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "neuralode.cli",
        "classify",
        "--limit-train",
        "64",
        "--limit-test",
        "32",
        "--batch-size",
        "16",
        "--channels",
        "8",
        "--epochs",
        "1",
        "--no-progress",
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["processes"] == 2
    # each process saw half of every epoch; the test error is over the whole test slice, summed over both
    # processes' shards
    error, loss = _recomputed_test_metrics(out, shards=2)
    assert m["history"][0]["test_error"] == pytest.approx(error, abs=1e-12)
    assert m["history"][0]["test_loss"] == pytest.approx(loss, rel=1e-5)
    assert m["history"][0]["nfe_forward"] > 0
