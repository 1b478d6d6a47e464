"""2-D toy classification sets (the Sparse Flows / torchdyn node-classification tasks)."""
from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from sklearn import datasets as skd
from torch import Tensor

__all__ = ["classification", "CLASSIFICATION_DATASETS"]

Generator = Callable[[int, np.random.Generator, float], tuple[np.ndarray, np.ndarray]]


def _concentric(n: int, rng: np.random.Generator, noise: float) -> tuple[np.ndarray, np.ndarray]:
    # class 0 on the circle of radius 0.75, class 1 on radius 1.5, Gaussian noise of std `noise`
    y = np.zeros(n, dtype=np.int64)
    y[n // 2:] = 1
    radius = np.where(y == 0, 0.75, 1.5)
    ang = rng.uniform(0, 2 * math.pi, n)
    x = radius[:, None] * np.stack([np.cos(ang), np.sin(ang)], 1) + noise * rng.standard_normal((n, 2))
    return x, y


def _moons(n: int, rng: np.random.Generator, noise: float) -> tuple[np.ndarray, np.ndarray]:
    x, y = skd.make_moons(n, noise=noise, shuffle=False, random_state=int(rng.integers(0, 2**31 - 1)))
    return x, y.astype(np.int64)


def _spirals(n: int, rng: np.random.Generator, noise: float) -> tuple[np.ndarray, np.ndarray]:
    # two interleaved arms (class 0 and 1), r = angle up to 780 degrees, uniform jitter, scaled by 1/5
    def arm(m: int) -> np.ndarray:
        ang = np.sqrt(rng.random((m, 1))) * 780 * math.pi / 180
        return np.hstack([-np.cos(ang) * ang, np.sin(ang) * ang]) + rng.random((m, 2)) * noise

    n0 = n - n // 2
    x = np.vstack([arm(n0), -arm(n // 2)]) / 5.0
    y = np.r_[np.zeros(n0, dtype=np.int64), np.ones(n // 2, dtype=np.int64)]
    return x, y


#: ``name -> (generator, default noise)``.
CLASSIFICATION_DATASETS: dict[str, tuple[Generator, float]] = {
    "concentric": (_concentric, 0.1),
    "moons": (_moons, 0.1),
    "spirals": (_spirals, 0.9),
}


def classification(name: str, n: int = 1024, seed: int = 0, *, noise: float | None = None,
                   dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """Draw a 2-D two-class toy set.

    Args:
        name: ``"concentric"`` (circles of radius 0.75 and 1.5, Gaussian noise 0.1),
            ``"moons"`` (scikit-learn's, noise 0.1) or ``"spirals"`` (two arms, noise 0.9, /5).
        n: number of points (classes balanced, shuffled).
        seed: seed of the draw.
        noise: overrides the dataset's default noise level.
        dtype: floating dtype of X.

    Returns: ``X (n, 2)`` of ``dtype`` and labels ``y (n,)`` int64 in {0, 1}.
    """
    if name not in CLASSIFICATION_DATASETS:
        raise ValueError(f"unknown classification dataset name {name!r}; choose from {sorted(CLASSIFICATION_DATASETS)}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"n must be an int >= 2, got {n!r}")
    gen, default_noise = CLASSIFICATION_DATASETS[name]
    noise = default_noise if noise is None else float(noise)
    if noise < 0:
        raise ValueError(f"noise must be >= 0, got {noise}")
    rng = np.random.default_rng(seed)
    x, y = gen(n, rng, noise)
    perm = rng.permutation(n)
    return torch.as_tensor(x[perm], dtype=dtype), torch.as_tensor(y[perm], dtype=torch.int64)
