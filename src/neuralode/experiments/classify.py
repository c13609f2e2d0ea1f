"""Image classification with an ODE-Net, a ResNet, an RK-Net (Chen et al. 2018, §3 and Table 1) or a DEQ.

``train(...)`` trains one model and writes, in its run folder: ``metrics.json`` / ``metrics.csv`` (one row per
epoch: training loss and error, test loss and error, forward and backward NFE per batch, seconds, peak memory),
``checkpoint.pt`` (each epoch; ``resume=True`` continues from it), ``nfe.png`` and ``error.png``.
``tolerance_sweep(...)`` evaluates a trained ODE-Net at a range of tolerances (NFE, wall time, test error):
the paper's point that accuracy can be traded for speed after training.

Runs under ``torchrun --nproc_per_node=N`` with PyTorch's DistributedDataParallel (gloo on CPU, nccl on GPU):
each process trains on its shard of every epoch and the test error is summed over processes; rank 0 writes.

Peak memory is measured on a training step of the run's batch size, at the end of each epoch, as the most
memory allocated above what was allocated before the step (CUDA: the allocator's peak; CPU: the allocator's
events recorded by the PyTorch profiler). It covers activations, gradients and solver workspace, not the
parameters, optimiser state or data.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from .. import _methods
from ..data.images import ImageData, load_images
from ..models.classifier import build_classifier, count_parameters
from ..models.deq import DEQBlock
from ..nn import ODEBlock
from ._io import CheckpointError, _summary, load_checkpoint, plain, progress, pyplot, run_dir, write_csv, write_json

__all__ = ["ClassifyConfig", "train", "evaluate", "tolerance_sweep", "peak_step_memory", "DEFAULT_TOLERANCES"]

DEFAULT_TOLERANCES = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)


@dataclass
class ClassifyConfig:
    model: str = "odenet"
    dataset: str = "digits"
    data_dir: str | None = None
    epochs: int = 5
    batch_size: int = 128
    test_batch_size: int = 1000
    lr: float = 1e-3
    weight_decay: float = 0.0
    channels: int = 64
    method: str = "dopri5"
    rtol: float = 1e-3
    atol: float = 1e-3
    gradient: str = "adjoint"
    rk_steps: int = 2
    res_blocks: int = 6
    deq_solver: str = "anderson"
    deq_tol: float = 1e-3
    deq_max_iter: int = 30
    jac_reg: float = 0.0
    kinetic: float = 0.0
    jac_fro: float = 0.0
    limit_train: int | None = None
    limit_test: int | None = None
    seed: int = 0
    device: str | None = None
    out_dir: str = "runs/classify"
    extra: dict = field(default_factory=dict)

    def model_kwargs(self) -> dict:
        if self.model == "odenet":
            reg = {k: w for k, w in (("kinetic", self.kinetic), ("jacobian", self.jac_fro)) if w > 0}
            return dict(
                method=self.method, rtol=self.rtol, atol=self.atol, gradient=self.gradient, regularization=reg or None
            )
        if self.model == "rknet":
            return dict(steps=self.rk_steps)
        if self.model == "resnet":
            return dict(blocks=self.res_blocks)
        if self.model == "deq":
            return dict(solver=self.deq_solver, tol=self.deq_tol, max_iter=self.deq_max_iter, jac_reg=self.jac_reg)
        return {}


# --------------------------------------------------------------------------------------------------------
# distributed helpers (a single process is world size 1)


def _dist_env() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return world, rank, local


def _init_distributed(device: torch.device) -> bool:
    world, _, _ = _dist_env()
    if world <= 1:
        return False
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return True


def _all_sum(values: list[float], device: torch.device, distributed: bool) -> list[float]:
    if not distributed:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


# --------------------------------------------------------------------------------------------------------
# memory


def _walk(nodes):
    for n in nodes:
        yield n
        yield from _walk(n.children)


def _cpu_peak(fn) -> float:
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = prof.profiler.kineto_results.experimental_event_tree()
    allocs = sorted((n for n in _walk(events) if n.tag == _EventType.Allocation), key=lambda n: n.start_time_ns)
    if not allocs:
        return 0.0
    first = allocs[0].extra_fields
    base = first.total_allocated - first.alloc_size
    return (max(a.extra_fields.total_allocated for a in allocs) - base) / 2**20


def peak_step_memory(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """MiB allocated at the peak of one forward + backward pass above what was allocated before it.

    Solver caches are emptied first, so that memory a cache would hold counts. The parameters' gradients
    are left as they were.
    """
    _methods._STEPPERS.clear()
    saved = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)

    def step() -> None:
        F.cross_entropy(model(x), y).backward()

    try:
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
            before = torch.cuda.memory_allocated(x.device)
            torch.cuda.reset_peak_memory_stats(x.device)
            step()
            torch.cuda.synchronize(x.device)
            peak = (torch.cuda.max_memory_allocated(x.device) - before) / 2**20
        else:
            peak = _cpu_peak(step)
    finally:
        for p, g in zip(model.parameters(), saved):
            p.grad = g
    return peak


# --------------------------------------------------------------------------------------------------------


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def _ode_blocks(model: torch.nn.Module) -> list[ODEBlock]:
    return [m for m in _unwrap(model).modules() if isinstance(m, ODEBlock)]


def _nfe(model: torch.nn.Module) -> tuple[int, int]:
    """Function evaluations of the last pass, summed over ODE and equilibrium blocks."""
    blocks = [m for m in _unwrap(model).modules() if isinstance(m, (ODEBlock, DEQBlock))]
    return sum(b.nfe_forward for b in blocks), sum(b.nfe_backward for b in blocks)


def _extra_loss(model: torch.nn.Module):
    fn = getattr(_unwrap(model), "extra_loss", None)
    return fn() if callable(fn) else None


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int = 1000,
    device: torch.device | None = None,
    distributed: bool = False,
) -> dict:
    """Test loss, error and forward NFE per batch on ``(x, y)`` (this process's shard when distributed)."""
    model.eval()
    device = device or next(model.parameters()).device
    world, rank, _ = _dist_env() if distributed else (1, 0, 0)
    idx = torch.arange(rank, len(y), world)
    loss_sum = wrong = nfe = batches = 0.0
    t0 = time.perf_counter()
    for start in range(0, len(idx), batch_size):
        sel = idx[start : start + batch_size]
        xb, yb = x[sel].to(device), y[sel].to(device)
        logits = model(xb)
        loss_sum += float(F.cross_entropy(logits, yb, reduction="sum"))
        wrong += float((logits.argmax(1) != yb).sum())
        nfe += _nfe(model)[0]
        batches += 1
    seconds = time.perf_counter() - t0
    loss_sum, wrong, count, nfe, batches = _all_sum(
        [loss_sum, wrong, float(len(idx)), nfe, batches], device, distributed
    )
    model.train()
    return {
        "loss": loss_sum / max(count, 1),
        "error": wrong / max(count, 1),
        "nfe": nfe / max(batches, 1),
        "seconds": seconds,
    }


def _device(name: str | None) -> torch.device:
    if name:
        return torch.device(name)
    if torch.cuda.is_available():
        _, _, local = _dist_env()
        return torch.device("cuda", local % torch.cuda.device_count())
    return torch.device("cpu")


_CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "epoch", "history", "nfe_trace", "config")
# settings that shape the model's parameters: a checkpoint resumes only a run that agrees on them
_SHAPING = (("model", "--model"), ("dataset", "--dataset"), ("channels", "--channels"), ("res_blocks", "res_blocks"))


def _save_checkpoint(path: str, state: dict) -> None:
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def train(
    cfg: ClassifyConfig, *, resume: bool = False, show_progress: bool = True, data: ImageData | None = None
) -> dict:
    """Train ``cfg.model`` on ``cfg.dataset``; returns the metrics written to ``metrics.json``."""
    device = _device(cfg.device)
    distributed = _init_distributed(device)
    world, rank, _ = _dist_env() if distributed else (1, 0, 0)
    main = rank == 0
    out = run_dir(cfg.out_dir) if main else cfg.out_dir
    ckpt_path = os.path.join(cfg.out_dir, "checkpoint.pt")

    data = data or load_images(cfg.dataset, cfg.data_dir, cfg.limit_train, cfg.limit_test)
    torch.manual_seed(cfg.seed)
    model = build_classifier(cfg.model, data.image_shape[0], data.classes, cfg.channels, **cfg.model_kwargs())
    model.to(device)
    n_params = count_parameters(model)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(math.ceil(len(data.y_train) / world) / cfg.batch_size)
    total_steps = max(cfg.epochs * steps_per_epoch, 1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / total_steps))
    )
    history: list[dict] = []
    nfe_trace: list[dict] = []
    start_epoch = 0
    if resume:
        if not os.path.exists(ckpt_path):
            raise FileNotFoundError(
                f"--resume: no checkpoint at {ckpt_path!r}; run without --resume first "
                "(or name the run folder with --out)"
            )
        try:
            state = load_checkpoint(ckpt_path, map_location=device, keys=_CHECKPOINT_KEYS, kind="neuralode classify")
        except CheckpointError as exc:
            raise CheckpointError(f"--resume: {exc}; train without --resume or choose another --out") from None
        saved = state["config"]
        if not isinstance(saved, dict):
            raise CheckpointError(f"--resume: {ckpt_path} is not a neuralode classify checkpoint (no configuration)")
        differ = [(flag, saved.get(k), getattr(cfg, k)) for k, flag in _SHAPING if saved.get(k) != getattr(cfg, k)]
        if differ:
            raise CheckpointError(
                f"--resume: {ckpt_path} was trained with {' '.join(f'{f} {a}' for f, a, _ in differ)}, not "
                f"{' '.join(f'{f} {b}' for f, _, b in differ)}; pass the same settings or choose another --out"
            )
        try:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            history, nfe_trace = list(state["history"]), list(state["nfe_trace"])
            start_epoch = int(state["epoch"])
        except (RuntimeError, ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
            # load_state_dict's first line is a heading: the first line that is not names the problem
            lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip() and not ln.strip().endswith(":")]
            raise CheckpointError(
                f"--resume: {ckpt_path} does not fit --model {cfg.model} --channels {cfg.channels} --dataset "
                f"{cfg.dataset} ({lines[0][:200] if lines else type(exc).__name__}); train without --resume or "
                "choose another --out"
            ) from None
    if distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net: torch.nn.Module = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    else:
        net = model
    if main:
        print(
            f"{cfg.model}: {n_params:,} parameters; {data.name}: {len(data.y_train)} train / "
            f"{len(data.y_test)} test images {tuple(data.image_shape)}; {world} process(es) on {device}"
        )

    config = plain(asdict(cfg))  # for the checkpoint and metrics.json: whatever ``extra`` holds, as plain data
    x_train, y_train = data.x_train, data.y_train
    mem_x, mem_y = x_train[: cfg.batch_size].to(device), y_train[: cfg.batch_size].to(device)
    for epoch in range(start_epoch, cfg.epochs):
        net.train()
        g = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
        perm = torch.randperm(len(y_train), generator=g)[rank::world]
        t0 = time.perf_counter()
        loss_sum = wrong = seen = nfe_f = nfe_b = 0.0
        batches = range(0, len(perm), cfg.batch_size)
        bar = progress(
            batches,
            total=len(batches),
            desc=f"{cfg.model} epoch {epoch + 1}/{cfg.epochs}",
            enabled=show_progress and main,
        )
        for it, start in enumerate(bar):
            sel = perm[start : start + cfg.batch_size]
            xb, yb = x_train[sel].to(device, non_blocking=True), y_train[sel].to(device, non_blocking=True)
            logits = net(xb)
            loss = F.cross_entropy(logits, yb)
            extra = _extra_loss(net)  # e.g. the DEQ's Jacobian regulariser
            opt.zero_grad(set_to_none=True)
            (loss if extra is None else loss + extra).backward()
            opt.step()
            sched.step()
            f, b = _nfe(net)
            nfe_f += f
            nfe_b += b
            loss_sum += float(loss.detach()) * len(sel)
            wrong += float((logits.argmax(1) != yb).sum())
            seen += len(sel)
            if main and (it % 10 == 0 or it == len(batches) - 1):
                nfe_trace.append({"iteration": epoch * steps_per_epoch + it, "nfe_forward": f, "nfe_backward": b})
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{float(loss.detach()):.3f}", nfe=f"{f}/{b}")
            elif main and (it + 1) % 100 == 0:  # no progress bar (logs): a line now and then
                print(
                    f"  epoch {epoch + 1} batch {it + 1}/{len(batches)} loss {float(loss.detach()):.4f} "
                    f"nfe {f}/{b} {time.perf_counter() - t0:.0f}s",
                    flush=True,
                )
        seconds = time.perf_counter() - t0
        loss_sum, wrong, seen, nfe_f, nfe_b, n_batches = _all_sum(
            [loss_sum, wrong, seen, nfe_f, nfe_b, float(len(batches))], device, distributed
        )
        test = evaluate(net, data.x_test, data.y_test, cfg.test_batch_size, device, distributed)
        # every process runs the measured step (under DDP its gradient all-reduce must happen everywhere)
        peak = peak_step_memory(net, mem_x, mem_y)
        row = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / seen,
            "train_error": wrong / seen,
            "test_loss": test["loss"],
            "test_error": test["error"],
            "nfe_forward": nfe_f / n_batches,
            "nfe_backward": nfe_b / n_batches,
            "nfe_test": test["nfe"],
            "seconds": seconds,
            "peak_memory_mib": peak,
            "lr": opt.param_groups[0]["lr"],
        }
        history.append(row)
        if main:
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
            _save_checkpoint(
                ckpt_path,
                {
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(),
                    # plain data only, so that loading it needs no code (torch.load with weights_only=True)
                    "epoch": epoch + 1,
                    "history": plain(history),
                    "nfe_trace": plain(nfe_trace),
                    "config": config,
                },
            )
    metrics = {
        "model": cfg.model,
        "dataset": data.name,
        "parameters": n_params,
        "processes": world,
        "device": str(device),
        "config": config,
        "history": history,
    }
    if history:
        last = history[-1]
        metrics.update(
            test_error=last["test_error"],
            seconds_per_epoch=sum(h["seconds"] for h in history) / len(history),
            peak_memory_mib=max(h["peak_memory_mib"] for h in history),
            nfe_forward=last["nfe_forward"],
            nfe_backward=last["nfe_backward"],
        )
    if main:
        write_json(os.path.join(out, "metrics.json"), metrics)
        write_csv(os.path.join(out, "metrics.csv"), history)
        write_csv(os.path.join(out, "nfe_trace.csv"), nfe_trace)
        _plot_training(out, cfg.model, history, nfe_trace)
    return metrics


def _plot_training(out: str, name: str, history: list[dict], nfe_trace: list[dict]) -> None:
    plt = pyplot()
    if plt is None or not history:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    if nfe_trace:
        its = [r["iteration"] for r in nfe_trace]
        ax.plot(its, [r["nfe_forward"] for r in nfe_trace], label="forward")
        ax.plot(its, [r["nfe_backward"] for r in nfe_trace], label="backward")
    ax.set_xlabel("training iteration")
    ax.set_ylabel("function evaluations per batch")
    ax.set_title(f"{name}: NFE over training")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "nfe.png"), dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    ep = [h["epoch"] for h in history]
    ax.plot(ep, [100 * h["train_error"] for h in history], "o-", label="train error")
    ax.plot(ep, [100 * h["test_error"] for h in history], "s-", label="test error")
    ax.set_xlabel("epoch")
    ax.set_ylabel("error (%)")
    ax.set_title(f"{name}: error over training")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "error.png"), dpi=120)
    plt.close(fig)


def load_trained(run: str, device: str | None = None) -> tuple[torch.nn.Module, ClassifyConfig]:
    """The model saved in a run folder's ``checkpoint.pt`` and its configuration."""
    path = os.path.join(run, "checkpoint.pt")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path!r}: train first with `neuralode classify --out {run}`")
    state = load_checkpoint(path, map_location=_device(device), keys=("model", "config"), kind="neuralode classify")
    try:
        cfg = ClassifyConfig(**dict(state["config"]))
        data_shape = state["model"]["stem.0.weight"].shape[1]
        classes = state["model"]["head.4.weight"].shape[0]
        model = build_classifier(cfg.model, data_shape, classes, cfg.channels, **cfg.model_kwargs())
        model.load_state_dict(state["model"])
    except (RuntimeError, ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
        raise CheckpointError(
            f"{path} is not a checkpoint of a neuralode classify run ({type(exc).__name__}: {_summary(exc)})"
        ) from None
    return model.to(_device(device)), cfg


def tolerance_sweep(
    run: str,
    tolerances=DEFAULT_TOLERANCES,
    *,
    data: ImageData | None = None,
    device: str | None = None,
    method: str | None = None,
    show_progress: bool = True,
) -> list[dict]:
    """Evaluate the ODE-Net saved in ``run`` at each tolerance (rtol = atol): NFE per batch, wall seconds for
    the test set, test error. Writes ``sweep.json``, ``sweep.csv`` and ``sweep.png`` in ``run``."""
    model, cfg = load_trained(run, device)
    blocks = _ode_blocks(model)
    if not blocks or cfg.model != "odenet":
        raise ValueError(
            f"the run in {run!r} is a {cfg.model!r}: the tolerance sweep needs an adaptive ODE-Net "
            "(train with --model odenet)"
        )
    data = data or load_images(cfg.dataset, cfg.data_dir, cfg.limit_train, cfg.limit_test)
    rows = []
    for tol in progress(list(tolerances), desc="tolerance sweep", enabled=show_progress):
        for b in blocks:
            b.rtol = b.atol = float(tol)
            if method:
                b.method = method
        res = evaluate(model, data.x_test, data.y_test, cfg.test_batch_size)
        rows.append(
            {
                "tolerance": float(tol),
                "nfe_forward": res["nfe"],
                "seconds": res["seconds"],
                "test_error": res["error"],
                "test_loss": res["loss"],
            }
        )
        print(f"tol={tol:.0e}  NFE={res['nfe']:.1f}  seconds={res['seconds']:.2f}  test error={res['error']:.4f}")
    write_json(os.path.join(run, "sweep.json"), {"trained_at": {"rtol": cfg.rtol, "atol": cfg.atol}, "rows": rows})
    write_csv(os.path.join(run, "sweep.csv"), rows)
    plt = pyplot()
    if plt is not None:
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
        tols = [r["tolerance"] for r in rows]
        for ax, key, label in zip(
            axes, ("nfe_forward", "seconds", "test_error"), ("NFE per batch", "test-set seconds", "test error")
        ):
            ax.semilogx(tols, [r[key] for r in rows], "o-")
            ax.axvline(cfg.rtol, color="gray", ls=":", label="training tolerance")
            ax.set_xlabel("rtol = atol")
            ax.set_ylabel(label)
            ax.invert_xaxis()
        axes[0].legend()
        fig.suptitle("ODE-Net evaluated at other tolerances after training")
        fig.tight_layout()
        fig.savefig(os.path.join(run, "sweep.png"), dpi=120)
        plt.close(fig)
    return rows
