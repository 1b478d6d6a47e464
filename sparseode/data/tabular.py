"""The five tabular density benchmarks of the MAF release (Papamakarios et al. 2017), read from a
local folder, with that release's splits and preprocessing (as used by FFJORD and Sparse Flows).

Layout under ``root`` (the release's ``data/`` folder; ``root/data/...`` is accepted too)::

    power/data.npy                 POWER      (N, 8) -> 6 dims
    gas/ethylene_CO.pickle         GAS        pandas DataFrame pickle -> 8 dims (needs pandas)
    hepmass/1000_train.csv         HEPMASS    CSV with a header row, label in column 0 -> 21 dims
    hepmass/1000_test.csv          (signal rows; constant and repeated-value columns dropped)
    miniboone/data.npy             MINIBOONE  (N, 43)
    BSDS300/BSDS300.hdf5           BSDS300    datasets train/validation/test (needs h5py) -> 63 dims

``root`` defaults to the environment variable ``SPARSEODE_DATA``. Nothing is downloaded.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["tabular", "TABULAR_FILES", "DATA_ENV"]

#: Environment variable naming the data root.
DATA_ENV = "SPARSEODE_DATA"

#: Files each dataset needs, relative to the root.
TABULAR_FILES: dict[str, tuple[str, ...]] = {
    "power": ("power/data.npy",),
    "gas": ("gas/ethylene_CO.pickle",),
    "hepmass": ("hepmass/1000_train.csv", "hepmass/1000_test.csv"),
    "miniboone": ("miniboone/data.npy",),
    "bsds300": ("BSDS300/BSDS300.hdf5",),
}

Splits = tuple[np.ndarray, np.ndarray, np.ndarray]


def _split_tail(data: np.ndarray) -> Splits:
    """MAF's split: the last 10% is test, the last 10% of the rest is validation."""
    n_test = int(0.1 * data.shape[0])
    test, rest = data[-n_test:], data[:-n_test]
    n_val = int(0.1 * rest.shape[0])
    return rest[:-n_val], rest[-n_val:], test


def _normalise_by_train_val(train: np.ndarray, val: np.ndarray, test: np.ndarray) -> Splits:
    stack = np.vstack([train, val])
    mu, s = stack.mean(0), stack.std(0)
    return (train - mu) / s, (val - mu) / s, (test - mu) / s


def _power(files: list[Path]) -> Splits:
    data = np.load(files[0])
    if data.ndim != 2 or data.shape[1] != 8:
        raise ValueError(f"{files[0]} must hold an (N, 8) array, got shape {data.shape}")
    data = data.astype(np.float64)
    rng = np.random.RandomState(42)
    rng.shuffle(data)
    n = data.shape[0]
    data = np.delete(np.delete(data, 3, axis=1), 1, axis=1)  # drop reactive power and intensity
    voltage = 0.01 * rng.rand(n, 1)
    gap = 0.001 * rng.rand(n, 1)
    sub_metering = rng.rand(n, 3)
    data = data + np.hstack([gap, voltage, sub_metering, np.zeros((n, 1))])
    return _normalise_by_train_val(*_split_tail(data))


def _gas(files: list[Path]) -> Splits:
    try:
        import pandas as pd
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError(f"GAS is stored as a pandas pickle ({files[0]}); reading it needs pandas "
                          "(pip install pandas)") from None
    frame = pd.read_pickle(files[0])
    missing = {"Meth", "Eth", "Time"} - set(frame.columns)
    if missing:
        raise ValueError(f"{files[0]} lacks the columns {sorted(missing)} of the MAF GAS table")
    data = frame.drop(columns=["Meth", "Eth", "Time"]).to_numpy(dtype=np.float64)
    while True:  # drop the first column correlated > 0.98 with another, until none is
        with np.errstate(invalid="ignore", divide="ignore"):
            corr = np.corrcoef(data, rowvar=False)
        counts = (corr > 0.98).sum(1)
        if not np.any(counts > 1):
            break
        data = np.delete(data, int(np.flatnonzero(counts > 1)[0]), axis=1)
    data = (data - data.mean(0)) / data.std(0, ddof=1)
    return _split_tail(data)


def _read_csv(path: Path) -> np.ndarray:
    with open(path) as f:
        header = f.readline()
    n_cols = len(header.split(","))
    data = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.float64, ndmin=2)
    if data.shape[1] != n_cols:
        raise ValueError(f"{path}: {data.shape[1]} columns in the rows but {n_cols} in the header")
    return data


def _hepmass(files: list[Path]) -> Splits:
    train, test = _read_csv(files[0]), _read_csv(files[1])
    # signal only (label 1 in column 0), drop the label; the test file's last column is dropped
    train = train[train[:, 0] == 1][:, 1:]
    test = test[test[:, 0] == 1][:, 1:-1]
    mu, s = train.mean(0), train.std(0, ddof=1)
    constant = s == 0  # the mass column of the 1000_* files; MAF's 21 dimensions exclude it
    s = np.where(constant, 1.0, s)
    train = (train - mu) / s
    test = (test - mu[: test.shape[1]]) / s[: test.shape[1]]
    # drop features whose smallest value recurs more than 5 times (MAF's rule, kept as it is)
    drop = {i for i, col in enumerate(train.T) if constant[i] or np.count_nonzero(col == col.min()) > 5}
    train = train[:, [i for i in range(train.shape[1]) if i not in drop]]
    test = test[:, [i for i in range(test.shape[1]) if i not in drop]]
    if train.shape[1] != test.shape[1]:
        raise ValueError(f"HEPMASS: train keeps {train.shape[1]} features but test {test.shape[1]}; "
                         f"{files[1]} does not match the MAF layout")
    n_val = int(0.1 * train.shape[0])
    return train[:-n_val], train[-n_val:], test


def _miniboone(files: list[Path]) -> Splits:
    data = np.load(files[0]).astype(np.float64)
    if data.ndim != 2:
        raise ValueError(f"{files[0]} must hold a 2-D array, got shape {data.shape}")
    return _normalise_by_train_val(*_split_tail(data))


def _bsds300(files: list[Path]) -> Splits:
    try:
        import h5py
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError(f"BSDS300 is stored as HDF5 ({files[0]}); reading it needs h5py "
                          "(pip install h5py)") from None
    with h5py.File(files[0], "r") as f:
        missing = {"train", "validation", "test"} - set(f.keys())
        if missing:
            raise ValueError(f"{files[0]} lacks the datasets {sorted(missing)}")
        return f["train"][:], f["validation"][:], f["test"][:]


_LOADERS: dict[str, Callable[[list[Path]], Splits]] = {
    "power": _power, "gas": _gas, "hepmass": _hepmass, "miniboone": _miniboone, "bsds300": _bsds300,
}


def _resolve_root(root: str | os.PathLike | None) -> Path:
    if root is None:
        root = os.environ.get(DATA_ENV)
        if not root:
            raise FileNotFoundError(f"no data root: pass root=... or set {DATA_ENV} to the folder holding "
                                    f"power/, gas/, hepmass/, miniboone/ and BSDS300/ (the MAF release's data/)")
    return Path(root).expanduser()


def tabular(name: str, root: str | os.PathLike | None = None, *,
            dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor, Tensor]:
    """Load a MAF tabular benchmark with its standard splits and preprocessing.

    Args:
        name: ``"power"``, ``"gas"``, ``"hepmass"``, ``"miniboone"`` or ``"bsds300"`` (any case).
        root: the folder holding the dataset folders (or their parent ``data/``); defaults to
            ``$SPARSEODE_DATA``.
        dtype: floating dtype of the result (MAF used float32).

    Returns: ``(train, val, test)``, each ``(n_split, d)`` of ``dtype``.

    Raises:
        ValueError: unknown name. FileNotFoundError: a file is missing (the message names it).
    """
    key = str(name).lower()
    if key not in _LOADERS:
        raise ValueError(f"unknown tabular dataset name {name!r}; choose from {sorted(_LOADERS)}")
    base = _resolve_root(root)
    if not (base / TABULAR_FILES[key][0]).exists() and (base / "data" / TABULAR_FILES[key][0]).exists():
        base = base / "data"
    files = [base / rel for rel in TABULAR_FILES[key]]
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"{key}: missing file {f} (expected the MAF release layout "
                                    f"{', '.join(TABULAR_FILES[key])} under {base})")
    splits = _LOADERS[key](files)
    return tuple(torch.as_tensor(np.ascontiguousarray(s), dtype=dtype) for s in splits)  # type: ignore[return-value]
