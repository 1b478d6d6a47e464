"""Sample-quality metrics for the mixture datasets (mode coverage, high-quality samples)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .mixture import GaussianMixture
from .toy import mixture

__all__ = ["mode_coverage", "DEFAULT_KS"]

#: Distances (in component standard deviations) at which the share of high-quality samples is reported.
DEFAULT_KS: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0)


def mode_coverage(
    samples: Tensor | np.ndarray,
    dataset: str | GaussianMixture,
    *,
    ks: Sequence[float] = DEFAULT_KS,
    k_capture: float = 3.0,
    min_share: float = 0.1,
) -> dict[str, Any]:
    """How well samples cover the modes of a mixture dataset.

    Each sample is assigned to the mode with the smallest covariance-normalised (Mahalanobis)
    distance ``|x - mu_k| / sigma_k``. A sample is *high quality at k* when that distance is at
    most ``k``. A mode is *captured* when the high-quality samples (at ``k_capture``) assigned
    to it number at least ``min_share`` times the count the mode should get (``n * w_k``).

    Args:
        samples: ``(n, d)`` points, in the dataset's normalised units (as :func:`toy` returns).
        dataset: a mixture dataset name (its normalised density is used) or a ``GaussianMixture``.
        ks: distances at which to report the share of high-quality samples.
        k_capture: distance for a sample to count towards capturing its mode.
        min_share: fraction of a mode's expected count needed to capture it.

    Returns: a dict with ``n_modes``, ``modes_captured`` (int), ``captured`` (list of bool per
    mode), ``counts`` (high-quality samples per mode at ``k_capture``), ``ks`` and
    ``high_quality`` (share of all samples within each k, same order as ks), and
    ``mode_shares`` (share of all samples assigned to each mode).
    """
    mix = mixture(dataset) if isinstance(dataset, str) else dataset
    if not isinstance(mix, GaussianMixture):
        raise TypeError(f"dataset must be a mixture name or a GaussianMixture, got {type(dataset).__name__}")
    x = torch.as_tensor(samples).detach().to("cpu", torch.float64)
    if x.dim() != 2 or x.shape[1] != mix.dim or x.shape[0] == 0:
        raise ValueError(f"samples must have shape (n, {mix.dim}) with n > 0, got {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("samples contain NaN or inf")
    if any(k <= 0 for k in ks) or k_capture <= 0:
        raise ValueError("ks and k_capture must be positive")
    n = x.shape[0]
    dist = mix.mahalanobis(x)  # (n, K)
    best, mode = dist.min(dim=1)
    high = best <= k_capture
    counts = torch.bincount(mode[high], minlength=mix.n_modes).numpy()
    expected = n * mix.weights
    captured = counts >= min_share * expected
    return {
        "n_modes": mix.n_modes,
        "modes_captured": int(captured.sum()),
        "captured": captured.tolist(),
        "counts": counts.tolist(),
        "ks": [float(k) for k in ks],
        "high_quality": [float((best <= k).double().mean()) for k in ks],
        "mode_shares": (torch.bincount(mode, minlength=mix.n_modes).double() / n).tolist(),
    }
