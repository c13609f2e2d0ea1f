"""Run folders: metrics as JSON and CSV, plots as PNG."""

from __future__ import annotations

import csv
import json
import os
import re
from typing import Iterable


def run_dir(path: str) -> str:
    os.makedirs(path, exist_ok=True)
    return path


def write_json(path: str, obj) -> None:
    with open(path, "w") as fh:
        json.dump(obj, fh, indent=2)


def write_csv(path: str, rows: Iterable[dict]) -> None:
    rows = list(rows)
    if not rows:
        return
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def pyplot():
    """matplotlib's pyplot with a file-only backend, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - the experiments extra installs it
        return None
    return plt


def progress(iterable, total: int | None = None, desc: str = "", enabled: bool = True):
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return iterable
    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: empty, corrupted, not data only, or written for another model."""


def _summary(exc: BaseException, limit: int = 150) -> str:
    """The first sentence of an exception's message, for a one-line report."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    text = text.split(". ")[0].rstrip(".")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def plain(obj):
    """``obj`` as tensors and plain data (dict, list, str, int, float, bool, None), which
    ``torch.load(weights_only=True)`` reads back without running code; anything else becomes plain data or text."""
    import argparse
    import dataclasses

    import torch

    if obj is None or type(obj) in (bool, int, float, str):
        return obj
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, int):  # subclasses (IntEnum, numpy's on some platforms) pickle as their class
        return int(obj)
    if isinstance(obj, float):  # numpy.float64 is a float subclass
        return float(obj)
    if isinstance(obj, str):
        return str(obj)
    if isinstance(obj, (torch.device, torch.dtype)):
        return str(obj)
    if type(obj).__module__ == "numpy" and hasattr(obj, "tolist"):  # numpy scalars and arrays
        return plain(obj.tolist())
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return plain(dataclasses.asdict(obj))
    if isinstance(obj, argparse.Namespace):
        return plain(vars(obj))
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            key = plain(k)
            out[key if key is None or type(key) in (bool, int, float, str) else str(k)] = plain(v)
        return out
    if isinstance(obj, (list, tuple, set, frozenset)):  # torch.Size is a tuple
        return [plain(v) for v in obj]
    return str(obj)


def load_checkpoint(path: str, *, map_location=None, keys: tuple[str, ...] = (), kind: str = "neuralode") -> dict:
    """The dict saved at ``path``, read as data only (``weights_only=True``: a crafted file cannot run code).

    Raises ``CheckpointError``, one line naming the file, when it is empty, unreadable, corrupted, holds
    anything but tensors and plain data, is not a dict or lacks one of ``keys``.
    """
    import warnings

    import torch

    if os.path.isdir(path):
        raise CheckpointError(f"{path} is a folder, not a checkpoint file")
    try:
        size = os.path.getsize(path)
    except OSError as exc:
        raise CheckpointError(f"cannot read the checkpoint {path}: {exc.strerror or exc}") from None
    if size == 0:
        raise CheckpointError(f"the checkpoint {path} is empty")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols of foreign files: the error says it
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location=map_location, weights_only=True)
    except OSError as exc:
        raise CheckpointError(f"cannot read the checkpoint {path}: {exc.strerror or exc}") from None
    except Exception as exc:  # a damaged or hostile file can make the unpickler raise almost anything
        text = str(exc)
        code = re.search(r"GLOBAL\s+([\w.]+)", text)  # the safe unpickler names the Python object it refused
        if code:
            raise CheckpointError(
                f"refusing to load {path}: it calls or builds Python objects ({code.group(1)}), while {kind} "
                "checkpoints hold only tensors and plain data (a file from another program, or a crafted one)"
            ) from None
        detail = "" if "weights only load failed" in text.lower() else f": {type(exc).__name__}: {_summary(exc)}"
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint (corrupted, truncated or another format){detail}"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not a {kind} checkpoint: it holds a {type(state).__name__}, not a dict")
    missing = [k for k in keys if k not in state]
    if missing:
        raise CheckpointError(f"{path} is not a {kind} checkpoint: no {', '.join(repr(k) for k in missing)} in it")
    return state
