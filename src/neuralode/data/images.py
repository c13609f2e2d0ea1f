"""Image classification data: an IDX reader (the MNIST file format, raw or gzip) and the built-in datasets.

Datasets (none is downloaded):
- ``digits``: scikit-learn's 1,797 real 8×8 handwritten digits (ships with scikit-learn), split 1,437 / 360.
- ``fashion-mnist``: 60k/10k 28×28 images from IDX files; found by default in
  ``/usr/share/datasets/fashion-mnist`` (Debian package ``dataset-fashion-mnist``).
- ``mnist``: 60k/10k 28×28 images from IDX files in a ``data_dir`` the user names.

The IDX format (LeCun et al., http://yann.lecun.com/exdb/mnist/): two zero bytes, a type code (0x08 for
unsigned bytes), the number of dimensions, then one big-endian 32-bit size per dimension, then the data.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["read_idx", "write_idx", "ImageData", "load_images", "DATASETS", "FASHION_MNIST_DIR"]

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

# type code -> numpy dtype (big-endian where it matters), per the IDX format description.
_IDX_TYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_IDX_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09}

DATASETS = ("digits", "fashion-mnist", "mnist")
_SPLITS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _open(path: str):
    with open(path, "rb") as fh:
        magic = fh.read(2)
    return gzip.open(path, "rb") if magic == b"\x1f\x8b" else open(path, "rb")


def read_idx(path: str) -> np.ndarray:
    """Read one IDX file (raw or gzip-compressed, told apart by its first bytes) into a numpy array."""
    with _open(path) as fh:
        data = fh.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path!r} is not an IDX file: it must start with two zero bytes")
    code, ndim = data[2], data[3]
    if code not in _IDX_TYPES:
        raise ValueError(
            f"{path!r}: unknown IDX type code 0x{code:02x} (expected one of "
            f"{', '.join(f'0x{c:02x}' for c in _IDX_TYPES)})"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path!r}: truncated IDX header ({ndim} dimensions announced)")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = _IDX_TYPES[code]
    count = int(np.prod(shape)) if shape else 1
    expected = header + count * dtype.itemsize
    if len(data) != expected:
        raise ValueError(
            f"{path!r}: the header announces shape {shape} ({expected} bytes in all) but the file "
            f"holds {len(data)} bytes"
        )
    return np.frombuffer(data, dtype=dtype, count=count, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def write_idx(path: str, array: np.ndarray, compress: bool | None = None) -> None:
    """Write an unsigned- or signed-byte array as an IDX file (gzip when ``compress`` or the name ends in .gz)."""
    array = np.ascontiguousarray(array)
    if array.dtype not in _IDX_CODES:
        raise TypeError(f"write_idx writes uint8 or int8 arrays, not {array.dtype}")
    head = bytes([0, 0, _IDX_CODES[array.dtype], array.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    payload = head + array.tobytes()
    if compress is None:
        compress = path.endswith(".gz")
    with gzip.open(path, "wb") if compress else open(path, "wb") as fh:
        fh.write(payload)


@dataclass
class ImageData:
    """Images as float tensors ``(n, 1, H, W)`` scaled to [0, 1] and normalised by the training set's mean and
    standard deviation; labels as int64 ``(n,)``."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: int = 10

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


def _find(data_dir: str, stem: str) -> str | None:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        path = os.path.join(data_dir, name)
        if os.path.isfile(path):
            return path
    return None


def _load_idx_dir(name: str, data_dir: str) -> tuple[np.ndarray, ...]:
    how = {
        "fashion-mnist": "install the Debian package `dataset-fashion-mnist` (apt-get install dataset-fashion-mnist), "
        "or pass --data-dir with the four IDX files from https://github.com/zalandoresearch/fashion-mnist",
        "mnist": "pass --data-dir naming a folder with the four MNIST IDX files (raw or .gz)",
    }[name]
    out, missing = [], []
    for split in ("train", "test"):
        for stem in _SPLITS[split]:
            path = _find(data_dir, stem)
            if path is None:
                missing.append(stem + "[.gz]")
            else:
                out.append(path)
    if missing:
        raise FileNotFoundError(f"dataset {name!r}: no {', '.join(missing)} in {data_dir!r}; {how}")
    arrays = [read_idx(p) for p in out]
    xtr, ytr, xte, yte = arrays
    for x, y, split in ((xtr, ytr, "train"), (xte, yte, "test")):
        if x.ndim != 3 or y.ndim != 1 or x.shape[0] != y.shape[0]:
            raise ValueError(
                f"dataset {name!r} in {data_dir!r}: {split} images {x.shape} and labels {y.shape} "
                "do not match (expected (n, H, W) and (n,))"
            )
    return xtr, ytr, xte, yte


def _digits() -> tuple[np.ndarray, ...]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - the experiments extra installs it
        raise ImportError(
            "the built-in 'digits' dataset needs scikit-learn: pip install 'neuralode[experiments]'"
        ) from exc
    d = load_digits()
    x = (d.images * (255.0 / 16.0)).round().astype(np.uint8)
    y = d.target.astype(np.int64)
    perm = np.random.default_rng(0).permutation(len(y))  # a fixed split, the same on every machine
    n_test = 360
    te, tr = perm[:n_test], perm[n_test:]
    return x[tr], y[tr], x[te], y[te]


def load_images(
    name: str = "digits",
    data_dir: str | None = None,
    limit_train: int | None = None,
    limit_test: int | None = None,
) -> ImageData:
    """Load a dataset by name (see the module docstring); ``limit_*`` keep the first n examples of a split."""
    if name not in DATASETS:
        raise ValueError(f"dataset={name!r} is not known; choose one of {', '.join(DATASETS)}")
    if name == "digits":
        xtr, ytr, xte, yte = _digits()
    else:
        if data_dir is None:
            if name == "mnist":
                raise FileNotFoundError(
                    "dataset 'mnist' needs --data-dir naming a folder with the four MNIST IDX "
                    "files (train-images-idx3-ubyte, train-labels-idx1-ubyte, "
                    "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte; raw or .gz)"
                )
            data_dir = FASHION_MNIST_DIR
        xtr, ytr, xte, yte = _load_idx_dir(name, data_dir)
    if limit_train is not None:
        xtr, ytr = xtr[:limit_train], ytr[:limit_train]
    if limit_test is not None:
        xte, yte = xte[:limit_test], yte[:limit_test]
    xtr_f = torch.from_numpy(xtr.astype(np.float32) / 255.0).unsqueeze(1)
    xte_f = torch.from_numpy(xte.astype(np.float32) / 255.0).unsqueeze(1)
    mean, std = xtr_f.mean(), xtr_f.std().clamp_min(1e-6)
    return ImageData(
        name,
        (xtr_f - mean) / std,
        torch.from_numpy(ytr.astype(np.int64)),
        (xte_f - mean) / std,
        torch.from_numpy(yte.astype(np.int64)),
    )
