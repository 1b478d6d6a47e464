"""Isotropic Gaussian mixtures: the toy densities whose true density and entropy are known."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = ["GaussianMixture"]


@dataclass(frozen=True, eq=False)
class GaussianMixture:
    """A mixture of isotropic Gaussians ``sum_k w_k N(mu_k, sigma_k^2 I)``.

    Attributes (float64 numpy arrays): ``means (K, d)``, ``stds (K,)``, ``weights (K,)`` (sum 1).
    """

    means: np.ndarray
    stds: np.ndarray
    weights: np.ndarray

    def __post_init__(self) -> None:
        means = np.asarray(self.means, dtype=np.float64)
        stds = np.broadcast_to(np.asarray(self.stds, dtype=np.float64), means.shape[:1]).copy()
        weights = np.broadcast_to(np.asarray(self.weights, dtype=np.float64), means.shape[:1]).copy()
        if means.ndim != 2:
            raise ValueError(f"means must have shape (K, d), got {means.shape}")
        if np.any(stds <= 0):
            raise ValueError("stds must be positive")
        if np.any(weights < 0) or weights.sum() <= 0:
            raise ValueError("weights must be non-negative with a positive sum")
        object.__setattr__(self, "means", means)
        object.__setattr__(self, "stds", stds)
        object.__setattr__(self, "weights", weights / weights.sum())

    @property
    def n_modes(self) -> int:
        return self.means.shape[0]

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def mean(self) -> np.ndarray:
        """Population mean ``(d,)``."""
        return self.weights @ self.means

    @property
    def scale(self) -> float:
        """Population isotropic std: ``sqrt(trace(Cov) / d)``."""
        centred = self.means - self.mean
        total = self.weights @ ((centred ** 2).sum(1) + self.dim * self.stds ** 2)
        return float(math.sqrt(total / self.dim))

    def affine(self, shift: np.ndarray, scale: float) -> "GaussianMixture":
        """The mixture of ``(x - shift) / scale`` for ``x`` from this mixture."""
        return GaussianMixture((self.means - np.asarray(shift)) / scale, self.stds / scale, self.weights)

    def normalized(self) -> "GaussianMixture":
        """This mixture shifted by its mean and divided by its isotropic std."""
        return self.affine(self.mean, self.scale)

    def sample(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """``n`` draws: points ``(n, d)`` float64 and component labels ``(n,)`` int64."""
        labels = rng.choice(self.n_modes, size=n, p=self.weights)
        x = self.means[labels] + self.stds[labels, None] * rng.standard_normal((n, self.dim))
        return x, labels.astype(np.int64)

    def log_prob(self, x: Tensor | np.ndarray) -> Tensor:
        """True log density in nats: ``x (..., d)`` -> ``(...,)`` (dtype of a tensor x, else float64)."""
        xt = torch.as_tensor(x)
        dtype = xt.dtype if xt.is_floating_point() else torch.float64
        xt = xt.to(torch.float64)
        if xt.shape[-1] != self.dim:
            raise ValueError(f"x must have shape (..., {self.dim}), got {tuple(xt.shape)}")
        mu = torch.as_tensor(self.means, device=xt.device)
        sd = torch.as_tensor(self.stds, device=xt.device)
        logw = torch.as_tensor(np.log(self.weights), device=xt.device)
        sq = ((xt.unsqueeze(-2) - mu) ** 2).sum(-1)  # (..., K)
        comp = -0.5 * sq / sd ** 2 - self.dim * torch.log(sd) - 0.5 * self.dim * math.log(2 * math.pi)
        return torch.logsumexp(comp + logw, dim=-1).to(dtype)

    def entropy(self, n: int = 1_000_000, seed: int = 0) -> float:
        """Differential entropy in nats, Monte Carlo ``-E[log p(x)]`` over ``n`` draws
        (standard error ~ std(log p) / sqrt(n), about 1e-3 at the default)."""
        x, _ = self.sample(n, np.random.default_rng(seed))
        chunks = [self.log_prob(c) for c in np.array_split(x, max(1, n // 200_000))]
        return float(-torch.cat(chunks).mean())

    def mahalanobis(self, x: Tensor | np.ndarray) -> Tensor:
        """Covariance-normalised distance of each point to each mode: ``(n, d)`` -> ``(n, K)`` float64."""
        xt = torch.as_tensor(x).to(torch.float64)
        mu = torch.as_tensor(self.means)
        return ((xt.unsqueeze(-2) - mu) ** 2).sum(-1).sqrt() / torch.as_tensor(self.stds)
