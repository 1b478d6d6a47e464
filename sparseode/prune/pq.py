"""The PQ index and the sparsity-adaptive pruning ratio of SAP (Diao et al., ICLR 2023).

Diao, Wang, Zhang, Yang, Ding, Tarokh, "Pruning Deep Neural Networks from a Sparsity
Perspective", ICLR 2023 (arXiv 2302.05601; reference code
github.com/diaoenmao/Pruning-Deep-Neural-Networks-from-a-Sparsity-Perspective,
``src/modules/sparsity_index.py`` and ``src/modules/compression.py``).

PQ index of the ``d`` retained weights ``w ∈ R^d`` (pruned entries are left out, ``0 < p < q``):

    I(w) = 1 − d^{1/q − 1/p} ‖w‖_p / ‖w‖_q            ∈ [0, 1 − d^{1/q − 1/p}]

``I = 0`` when all magnitudes are equal, larger when ``w`` is sparser (compressible).

Sparsity-informed adaptive pruning (SAP), one round: the number of weights worth retaining is
bounded by

    r = ⌈ d (1 + η_r)^{−q/(q−p)} (1 − I(w))^{qp/(q−p)} ⌉,

and the round prunes

    c = ⌊ d · min(γ (1 − r/d), β) ⌋        (clamped at 0 below)

of the ``d`` retained weights (smallest magnitudes), keeping ``d − c``. Hyperparameters: the norms
``p < q``, ``η_r ≥ 0`` (tolerance of the bound: larger prunes more), ``γ > 0`` (how much of the
room to use per round), ``β ∈ (0, 1]`` (cap on the per-round pruning ratio). Defaults
``p=0.5, q=1.0, η_r=0.0, γ=1.0`` are the paper's main setting; ``β=0.9`` the reference code's
config default.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from sparseode.pruned import mask_or_ones, trainable
from sparseode.args import real
from sparseode.prune.layers import FilterFn, prunable_layers

__all__ = ["pq_index", "pq_prune_count", "pq_keep_ratio", "pq_next_keep", "check_pq_params"]


def check_pq_params(p: float, q: float, gamma: float, eta_r: float, beta: float) -> None:
    """Raise naming the argument unless all are finite real numbers with ``0 < p < q``, ``γ > 0``,
    ``η_r ≥ 0``, ``0 < β ≤ 1`` (``TypeError`` for a non-number, ``ValueError`` out of range)."""
    p = real(p, "p", low=0.0, low_open=True)
    real(q, "q", low=p, low_open=True)
    real(gamma, "gamma", low=0.0, low_open=True)
    real(eta_r, "eta_r", low=0.0)
    real(beta, "beta", low=0.0, high=1.0, low_open=True)


def _retained(w: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    w = w.detach().reshape(-1).to(torch.float64)
    if mask is not None:
        if mask.numel() != w.numel():
            raise ValueError(f"mask must have {w.numel()} entries like w, got shape {tuple(mask.shape)}")
        w = w[mask.detach().reshape(-1) != 0]
    return w


def pq_index(w: torch.Tensor, p: float = 0.5, q: float = 1.0, mask: torch.Tensor | None = None) -> float:
    """``I(w) = 1 − d^{1/q − 1/p} ‖w‖_p / ‖w‖_q`` over the retained entries (``mask != 0``), ``d`` of them.

    Args:
        w: weights, any shape. mask: same number of entries; ``None``: all retained.

    Raises:
        ValueError: bad ``p``/``q``; no retained entry; all retained entries zero.
    """
    check_pq_params(p, q, 1.0, 0.0, 1.0)
    v = _retained(w, mask)
    d = v.numel()
    if d == 0:
        raise ValueError("w has no retained entry (mask is all zeros)")
    a = v.abs()
    nq = float(a.pow(q).sum() ** (1.0 / q))
    if nq == 0:
        raise ValueError("the PQ index is undefined for all-zero weights w")
    # ‖a‖_p = max(a) (Σ (a/max)^p)^{1/p}, stable for p < 1
    m = float(a.max())
    np_ = m * float((a / m).pow(p).sum()) ** (1.0 / p)
    return 1.0 - d ** (1.0 / q - 1.0 / p) * np_ / nq


def pq_prune_count(
    w: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    p: float = 0.5,
    q: float = 1.0,
    gamma: float = 1.0,
    eta_r: float = 0.0,
    beta: float = 0.9,
) -> tuple[int, int, float]:
    """SAP's count for one round: ``(c, d, I)`` — prune ``c`` of the ``d`` retained weights.

    ``r = ⌈d (1+η_r)^{−q/(q−p)} (1−I)^{qp/(q−p)}⌉``, ``c = ⌊d · clamp(γ(1 − r/d), 0, β)⌋``.
    """
    check_pq_params(p, q, gamma, eta_r, beta)
    v = _retained(w, mask)
    d = v.numel()
    i = pq_index(v, p, q)
    r = d * (1.0 + eta_r) ** (-q / (q - p)) * max(1.0 - i, 0.0) ** (q * p / (q - p))
    r = math.ceil(r - 1e-9 * d)  # ceil, robust to rounding just above an integer
    ratio = min(max(gamma * (1.0 - r / d), 0.0), beta)
    return int(math.floor(d * ratio + 1e-9)), d, i


def pq_keep_ratio(w: torch.Tensor, mask: torch.Tensor | None = None, **params: float) -> float:
    """Fraction of the retained weights SAP keeps this round: ``(d − c) / d`` (see :func:`pq_prune_count`)."""
    c, d, _ = pq_prune_count(w, mask, **params)
    return (d - c) / d


def pq_next_keep(model: nn.Module, filter_fn: FilterFn | None = None, **params: float) -> float:
    """The next round's keep ratio *of all prunable weights* under SAP, pooled over every layer.

    With ``D`` prunable weights (``nn.Linear`` weights, ``filter_fn``) of which ``d`` are retained:
    ``(d − c) / D``, ``c`` from :func:`pq_prune_count` on the retained weights of all layers.
    """
    layers = prunable_layers(model, filter_fn)
    if not layers:
        raise ValueError("model has no prunable nn.Linear layer (after filter_fn)")
    # the trainable tensor times the mask: ``module.weight`` of a pruned layer is only refreshed by
    # the next forward, so it may lag the last optimiser step
    ms = torch.cat([mask_or_ones(m).detach().reshape(-1) for m in layers.values()])
    ws = torch.cat([trainable(m).detach().reshape(-1) for m in layers.values()]) * ms
    c, d, _ = pq_prune_count(ws, ms, **params)
    return (d - c) / ws.numel()
