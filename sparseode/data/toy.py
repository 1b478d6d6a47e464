"""2-D toy densities generated in code (no files), normalised by population mean and std.

Every dataset is a registry entry ``name -> generator(n, rng) -> (n, 2) float64 numpy`` in raw
units. :func:`toy` draws from it and normalises: ``x' = (x - m) / s`` with ``m`` the population
mean and ``s`` the population isotropic std ``sqrt(trace(Cov) / 2)`` (one scale for both axes,
so circles stay circles). For the Gaussian mixtures (``gaussians``, ``gaussians_spiral``,
``8gaussians``) ``m`` and ``s`` are exact and :func:`mixture` gives the true normalised density
(``log_prob``, ``entropy``); for the others they come from a fixed 200,000-point reference draw.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable

import numpy as np
import torch
from sklearn import datasets as skd
from torch import Tensor

from .mixture import GaussianMixture

__all__ = ["toy", "mixture", "true_entropy", "TOY_DATASETS", "MIXTURES", "normalization"]


def _ring(n_modes: int, radius: float, std: float, start: float = 0.0) -> GaussianMixture:
    angles = start + 2 * math.pi * np.arange(n_modes) / n_modes
    means = radius * np.stack([np.cos(angles), np.sin(angles)], 1)
    return GaussianMixture(means, np.full(n_modes, std), np.ones(n_modes))


def _gaussians_spiral() -> GaussianMixture:
    # 10 Gaussians, 6 per turn, radius 4 -> 1 and std 0.3 -> 0.1 along the spiral
    k = np.arange(10)
    angles = 2 * math.pi * (k + 1) / 6
    radii = np.linspace(4.0, 1.0, 10)
    means = radii[:, None] * np.stack([np.cos(angles), np.sin(angles)], 1)
    return GaussianMixture(means, np.linspace(0.3, 0.1, 10), np.ones(10))


#: The Gaussian-mixture datasets in raw units (before normalisation).
MIXTURES: dict[str, GaussianMixture] = {
    "gaussians": _ring(6, 4.0, 0.5),          # 6 Gaussians on a circle of radius 4, std 0.5
    "gaussians_spiral": _gaussians_spiral(),
    "8gaussians": _ring(8, 4.0, 0.5),         # FFJORD's 8 Gaussians
}


def _seed(rng: np.random.Generator) -> int:
    return int(rng.integers(0, 2**31 - 1))


def _spirals(n: int, rng: np.random.Generator, turns_deg: float = 780.0, noise: float = 0.5) -> np.ndarray:
    # two interleaved arms r = angle, uniform jitter (the Sparse Flows "spirals" density)
    def arm(m: int) -> np.ndarray:
        ang = np.sqrt(rng.random((m, 1))) * turns_deg * math.pi / 180
        return np.hstack([-np.cos(ang) * ang, np.sin(ang) * ang]) + rng.random((m, 2)) * noise

    x = np.vstack([arm(n - n // 2), -arm(n // 2)])
    return x[rng.permutation(n)]


def _two_spirals(n: int, rng: np.random.Generator) -> np.ndarray:
    x = _spirals(n, rng, turns_deg=540.0, noise=0.5) / 3
    return x + 0.1 * rng.standard_normal(x.shape)


def _checkerboard(n: int, rng: np.random.Generator) -> np.ndarray:
    x1 = rng.random(n) * 4 - 2
    x2 = rng.random(n) - rng.integers(0, 2, n) * 2 + np.floor(x1) % 2
    return np.stack([x1, x2], 1) * 2


def _rings(n: int, rng: np.random.Generator) -> np.ndarray:
    sizes = [n - 3 * (n // 4)] + [n // 4] * 3
    parts = []
    for size, radius in zip(sizes, (0.25, 0.5, 0.75, 1.0)):
        ang = np.linspace(0, 2 * math.pi, size, endpoint=False)
        parts.append(radius * np.stack([np.cos(ang), np.sin(ang)], 1))
    x = 3.0 * np.vstack(parts)[rng.permutation(n)]
    return x + 0.08 * rng.standard_normal(x.shape)


def _pinwheel(n: int, rng: np.random.Generator) -> np.ndarray:
    n_arms, rate = 5, 0.25
    labels = rng.integers(0, n_arms, n)
    feats = rng.standard_normal((n, 2)) * np.array([0.3, 0.1])
    feats[:, 0] += 1.0
    angles = 2 * math.pi * labels / n_arms + rate * np.exp(feats[:, 0])
    c, s = np.cos(angles), np.sin(angles)
    return 2 * np.stack([c * feats[:, 0] + s * feats[:, 1], -s * feats[:, 0] + c * feats[:, 1]], 1)


def _mixture_gen(name: str) -> Callable[[int, np.random.Generator], np.ndarray]:
    return lambda n, rng: MIXTURES[name].sample(n, rng)[0]


#: Generators in raw units: ``name -> fn(n, rng) -> (n, 2) float64``.
TOY_DATASETS: dict[str, Callable[[int, np.random.Generator], np.ndarray]] = {
    **{name: _mixture_gen(name) for name in MIXTURES},
    "spirals": _spirals,
    "2spirals": _two_spirals,
    "checkerboard": _checkerboard,
    "moons": lambda n, rng: skd.make_moons(n, noise=0.1, random_state=_seed(rng))[0],
    "circles": lambda n, rng: skd.make_circles(n, factor=0.5, noise=0.08, random_state=_seed(rng))[0],
    "rings": _rings,
    "pinwheel": _pinwheel,
    "swissroll": lambda n, rng: skd.make_swiss_roll(n, noise=1.0, random_state=_seed(rng))[0][:, [0, 2]],
}


def _check_name(name: str) -> None:
    if name not in TOY_DATASETS:
        raise ValueError(f"unknown toy dataset name {name!r}; choose from {sorted(TOY_DATASETS)}")


@functools.lru_cache(maxsize=None)
def normalization(name: str) -> tuple[np.ndarray, float]:
    """``(mean (2,), isotropic std)`` used to normalise dataset ``name`` (population values)."""
    _check_name(name)
    if name in MIXTURES:
        return MIXTURES[name].mean, MIXTURES[name].scale
    ref = TOY_DATASETS[name](200_000, np.random.default_rng(20_240_501))
    mean = ref.mean(0)
    return mean, float(np.sqrt(((ref - mean) ** 2).sum(1).mean() / ref.shape[1]))


def toy(name: str, n: int = 10_000, seed: int = 0, *, dtype: torch.dtype = torch.float32,
        normalize: bool = True) -> Tensor:
    """Draw ``n`` points of a 2-D toy density.

    Args:
        name: one of :data:`TOY_DATASETS` (``gaussians``, ``gaussians_spiral``, ``spirals``,
            ``8gaussians``, ``checkerboard``, ``2spirals``, ``moons``, ``circles``, ``rings``,
            ``pinwheel``, ``swissroll``).
        n: number of points.
        seed: seed of the draw (same seed, same points).
        dtype: floating dtype of the result.
        normalize: subtract the population mean and divide by the population isotropic std.

    Returns: ``(n, 2)`` tensor of ``dtype``.
    """
    _check_name(name)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    x = TOY_DATASETS[name](n, np.random.default_rng(seed))
    if normalize:
        mean, scale = normalization(name)
        x = (x - mean) / scale
    return torch.as_tensor(np.ascontiguousarray(x), dtype=dtype)


def mixture(name: str, normalize: bool = True) -> GaussianMixture:
    """The true density of a mixture dataset (after :func:`toy`'s normalisation by default).

    ``mixture("gaussians").log_prob(x)`` is the exact log density of ``toy("gaussians")``.
    """
    if name not in MIXTURES:
        raise ValueError(f"{name!r} is not a mixture dataset with a known density; choose from {sorted(MIXTURES)}")
    return MIXTURES[name].normalized() if normalize else MIXTURES[name]


@functools.lru_cache(maxsize=None)
def true_entropy(name: str, n: int = 1_000_000, seed: int = 0) -> float:
    """Differential entropy (nats) of a normalised mixture dataset, Monte Carlo with ``n`` draws:
    the lowest expected NLL any model can reach on that dataset."""
    return mixture(name).entropy(n=n, seed=seed)
