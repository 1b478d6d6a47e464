"""Sample-quality metrics for the mixture datasets: lenient and strict mode coverage.

Both metrics assign each sample to the mode with the smallest covariance-normalised
(Mahalanobis) distance ``r = |x - mu_k| / sigma_k``.

* **Lenient** (``modes_captured``): a mode is *captured* when at least ``min_share`` (10%) of the
  samples it should get lie within ``k_capture`` stds of it. Any density that reaches every mode a
  little passes: a standard normal captures 6/6 modes of ``gaussians``.
* **Strict** (``strict_ok``): a sample is *held* by its nearest mode when ``r <= core_radius``
  (2 stds) and *off-mode* when ``r > strict_radius`` (3 stds: near no mode). Mode ``k`` holds the
  share ``held_k`` of all samples; the true mixture puts ``true_k = w_k * P(|z| <= core_radius)``
  there (``z ~ N(0, I_d)``; 0.865 w_k at radius 2 in 2-D), so ``ratio_k = held_k / true_k`` is 1 in
  expectation for samples of the true mixture. The verdict passes when every
  ``ratio_k >= min_ratio`` (80%) and ``off_mode <= max_off_mode`` (5%; the true mixture has 1.1%
  at radius 3 in 2-D; the dense 4x64 flow of ``bench/prune_flows.py``, 0.03 nats above the entropy
  floor of ``gaussians``, has 3.8%).
  A dropped mode has ratio ~0; two neighbours merged into one component at their midpoint leave
  both below ``min_ratio`` (the merged mass sits >= 3 stds from each, outside their cores) and
  much of it off-mode; a standard normal puts most mass off-mode: all fail. The ratios use the
  smaller core radius because at 3 stds the merged component of ``8gaussians`` (whose means are
  6.1 stds apart) would still fill 83% of both neighbours' balls; modes 20% wider than true pass,
  40% wider fail.

The strict metric needs modes that are *separated at the radius*: the balls of radius
``strict_radius * sigma_k`` around the means must not overlap, i.e.
``|mu_i - mu_j| >= strict_radius * (sigma_i + sigma_j)`` for every pair, else a sample could be
near two modes and ``true_k`` would be wrong; a mixture (or radius) that violates it is
refused with an error giving the largest radius that works. The three mixture datasets
(``gaussians``, ``8gaussians``, ``gaussians_spiral``) are separated up to radius 4.0, 3.06 and 4.29.
The other toy datasets (``spirals``, ``moons``, ``checkerboard``, ...) are not mixtures with known
modes: :func:`mode_coverage` refuses them (``mixture(name)`` raises).

Noise: with ``n`` samples and ``K`` equal modes a ratio has relative standard error about
``sqrt(K / (0.865 n))``; use ``n >= 300 K`` (2000 for 6 modes: ~6%, over three standard errors
from 0.8).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypedDict

import numpy as np
import torch
from torch import Tensor

from sparseode.args import fraction, real

from .mixture import GaussianMixture
from .toy import mixture

__all__ = ["mode_coverage", "ModeCoverage", "describe_modes", "DEFAULT_KS"]

#: Distances (in component standard deviations) at which the share of high-quality samples is reported.
DEFAULT_KS: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0)


class ModeCoverage(TypedDict):
    """What :func:`mode_coverage` returns (a plain dict: JSON-serialisable, compares by value).

    Lists run over the mixture's modes in order. Shares are fractions of *all* samples.
    """

    n_modes: int
    # lenient
    modes_captured: int          # modes with >= min_share of their expected count within k_capture
    captured: list[bool]
    counts: list[int]            # samples within k_capture of each mode (nearest mode)
    ks: list[float]
    high_quality: list[float]    # share of samples within each k of their nearest mode
    mode_shares: list[float]     # share of samples whose nearest mode is each mode (any distance)
    # strict
    core_radius: float
    strict_radius: float
    min_ratio: float
    max_off_mode: float
    weights: list[float]         # true mixture weights w_k
    held_shares: list[float]     # share of samples within core_radius of each mode
    true_shares: list[float]     # w_k * P(|z| <= core_radius): the true mixture's held_shares
    share_ratios: list[float]    # held_shares / true_shares
    off_mode: float              # share of samples within strict_radius of no mode
    true_off_mode: float         # the true mixture's off_mode: 1 - P(|z| <= strict_radius)
    modes_held: int              # modes with share_ratio >= min_ratio
    strict_ok: bool              # modes_held == n_modes and off_mode <= max_off_mode


def _mixture(dataset: str | GaussianMixture) -> GaussianMixture:
    if isinstance(dataset, str):
        return mixture(dataset)
    if not isinstance(dataset, GaussianMixture):
        raise TypeError(f"dataset must be a mixture name or a GaussianMixture, got {type(dataset).__name__}")
    return dataset


def _samples(samples: Tensor | np.ndarray, dim: int) -> Tensor:
    x = torch.as_tensor(samples).detach()
    if not x.is_floating_point():
        raise TypeError(f"samples must be floating point, got dtype {x.dtype}")
    if x.dim() != 2 or x.shape[1] != dim or x.shape[0] == 0:
        raise ValueError(f"samples must have shape (n, {dim}) with n > 0, got {tuple(x.shape)}")
    x = x.to("cpu", torch.float64)
    if not torch.isfinite(x).all():
        raise ValueError("samples contain NaN or inf")
    return x


def _inside_share(dim: int, radius: float) -> float:
    """``P(|z| <= radius)`` for ``z ~ N(0, I_dim)``: the chi-square CDF ``gammainc(d/2, r^2/2)``."""
    return float(torch.special.gammainc(torch.tensor(dim / 2, dtype=torch.float64),
                                        torch.tensor(radius * radius / 2, dtype=torch.float64)))


def _check_separated(mix: GaussianMixture, radius: float) -> None:
    if np.any(mix.weights <= 0):
        raise ValueError("the strict mode metric needs every mixture weight > 0 (a mode of weight 0 has no share)")
    if mix.n_modes < 2:
        return
    gap = np.linalg.norm(mix.means[:, None] - mix.means[None], axis=-1) / (mix.stds[:, None] + mix.stds[None])
    np.fill_diagonal(gap, np.inf)
    if gap.min() < radius:
        i, j = np.unravel_index(np.argmin(gap), gap.shape)
        raise ValueError(
            f"modes {i} and {j} of the mixture overlap at strict_radius={radius:g}: the strict mode metric "
            f"needs |mu_i - mu_j| >= strict_radius * (sigma_i + sigma_j); use strict_radius <= {gap.min():.3g}")


def _strict(best: Tensor, mode: Tensor, mix: GaussianMixture, core_radius: float, radius: float,
            min_ratio: float, max_off_mode: float) -> dict[str, Any]:
    n = best.shape[0]
    held = best <= core_radius
    held_shares = torch.bincount(mode[held], minlength=mix.n_modes).double().numpy() / n
    true_shares = mix.weights * _inside_share(mix.dim, core_radius)
    ratios = held_shares / true_shares
    off_mode = float((best > radius).double().mean())
    modes_held = int((ratios >= min_ratio).sum())
    return {
        "core_radius": core_radius, "strict_radius": radius, "min_ratio": min_ratio,
        "max_off_mode": max_off_mode, "weights": mix.weights.tolist(), "held_shares": held_shares.tolist(),
        "true_shares": true_shares.tolist(), "share_ratios": ratios.tolist(), "off_mode": off_mode,
        "true_off_mode": 1.0 - _inside_share(mix.dim, radius), "modes_held": modes_held,
        "strict_ok": modes_held == mix.n_modes and off_mode <= max_off_mode,
    }


def mode_coverage(
    samples: Tensor | np.ndarray,
    dataset: str | GaussianMixture,
    *,
    ks: Sequence[float] = DEFAULT_KS,
    k_capture: float = 3.0,
    min_share: float = 0.1,
    core_radius: float = 2.0,
    strict_radius: float = 3.0,
    min_ratio: float = 0.8,
    max_off_mode: float = 0.05,
) -> ModeCoverage:
    """How well samples cover the modes of a mixture dataset: the lenient and the strict metric
    (see the module docstring for both definitions).

    Args:
        samples: ``(n, d)`` floating points (any float dtype, tensor or array), finite, in the
            dataset's normalised units (as :func:`toy` returns).
        dataset: a mixture dataset name (its normalised density is used) or a ``GaussianMixture``.
        ks: distances (stds, > 0) at which to report the share of high-quality samples.
        k_capture: lenient: distance (stds, > 0) for a sample to count towards capturing its mode.
        min_share: lenient: fraction in [0, 1] of a mode's expected count needed to capture it.
        core_radius: strict: distance (stds, > 0, <= strict_radius) within which a sample is
            held by its mode, for the per-mode share ratios.
        strict_radius: strict: distance (stds, > 0) beyond which (from every mode) a sample is
            off-mode; the mixture's modes must be separated at it.
        min_ratio: strict: in (0, 1], the least ``held / true`` share every mode must reach.
        max_off_mode: strict: in [0, 1], the largest share of samples allowed near no mode; at
            least the true mixture's own off-mode share (1.1% at radius 3 in 2-D).

    Returns: a :class:`ModeCoverage` dict (field meanings there).

    Raises:
        TypeError: non-float samples, a non-numeric argument or a dataset of the wrong type.
        ValueError: bad shape, NaN/inf, an argument out of range, a dataset that is not a
            mixture, or modes that overlap at ``strict_radius``.
    """
    mix = _mixture(dataset)
    x = _samples(samples, mix.dim)
    ks = [real(k, f"ks[{i}]", low=0.0, low_open=True) for i, k in enumerate(ks)]
    k_capture = real(k_capture, "k_capture", low=0.0, low_open=True)
    min_share = fraction(min_share, "min_share")
    strict_radius = real(strict_radius, "strict_radius", low=0.0, low_open=True)
    core_radius = real(core_radius, "core_radius", low=0.0, high=strict_radius, low_open=True)
    min_ratio = real(min_ratio, "min_ratio", low=0.0, high=1.0, low_open=True)
    max_off_mode = fraction(max_off_mode, "max_off_mode")
    _check_separated(mix, strict_radius)
    true_off = 1.0 - _inside_share(mix.dim, strict_radius)
    if max_off_mode < true_off:
        raise ValueError(f"max_off_mode={max_off_mode:g} is below the true mixture's own off-mode share "
                         f"{true_off:.3g} at strict_radius={strict_radius:g}: no samples could pass")

    n = x.shape[0]
    best, mode = mix.mahalanobis(x).min(dim=1)  # (n,) distance to and index of the nearest mode
    high = best <= k_capture
    counts = torch.bincount(mode[high], minlength=mix.n_modes).numpy()
    captured = counts >= min_share * n * mix.weights
    return ModeCoverage(
        n_modes=mix.n_modes,
        modes_captured=int(captured.sum()),
        captured=captured.tolist(),
        counts=counts.tolist(),
        ks=ks,
        high_quality=[float((best <= k).double().mean()) for k in ks],
        mode_shares=(torch.bincount(mode, minlength=mix.n_modes).double() / n).tolist(),
        **_strict(best, mode, mix, core_radius, strict_radius, min_ratio, max_off_mode),
    )


def describe_modes(coverage: ModeCoverage) -> str:
    """One line for reports: the strict verdict with its numbers, then the lenient count, e.g.
    ``strict modes: 6/6 hold >= 80% of their true share (lowest 0.97), off-mode 1.1% (max 5.0%): pass;
    lenient 6/6 captured``."""
    lowest = min(coverage["share_ratios"])
    verdict = "pass" if coverage["strict_ok"] else "FAIL"
    return (f"strict modes: {coverage['modes_held']}/{coverage['n_modes']} hold >= "
            f"{coverage['min_ratio']:.0%} of their true share (lowest {lowest:.2f}), "
            f"off-mode {coverage['off_mode']:.1%} (max {coverage['max_off_mode']:.1%}): {verdict}; "
            f"lenient {coverage['modes_captured']}/{coverage['n_modes']} captured")
