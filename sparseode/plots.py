"""Figures saved to files: flow density on a grid and samples next to the data, training curves.

Uses matplotlib's object API with the Agg canvas only (no pyplot, no global backend change, no
display needed). matplotlib is imported when this module is, never by ``sparseode.models``.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

__all__ = ["density_grid", "plot_flow", "plot_density", "plot_samples", "plot_training"]

LogProb = Callable[[Tensor], Tensor]


def _log_prob_fn(model_or_fn: Any) -> LogProb:
    fn = getattr(model_or_fn, "log_prob", model_or_fn)
    if not callable(fn):
        raise TypeError(f"expected a model with log_prob or a callable x -> log p(x), got {type(model_or_fn).__name__}")
    return fn


def _like(model_or_fn: Any) -> tuple[torch.dtype, torch.device]:
    params = getattr(model_or_fn, "parameters", None)
    p = next(params(), None) if callable(params) else None
    return (p.dtype, p.device) if p is not None else (torch.float32, torch.device("cpu"))


def density_grid(
    model_or_log_prob: Any,
    lim: float | tuple[float, float, float, float] = 3.0,
    n: int = 100,
    batch_size: int = 4096,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Evaluate a 2-D log density on an ``n x n`` grid (no gradients).

    Args:
        model_or_log_prob: a model with ``log_prob`` or a callable ``(m, 2) -> (m,)``.
        lim: half-width of a square ``[-lim, lim]^2`` or ``(xmin, xmax, ymin, ymax)``.
        n: points per axis.
        batch_size: points per call.

    Returns: ``xs (n,)``, ``ys (n,)``, ``logp (n, n)`` float64 numpy with ``logp[i, j]`` at
    ``(xs[j], ys[i])`` (rows are y, as ``imshow(origin="lower")`` expects).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"n must be an int >= 2, got {n!r}")
    x0, x1, y0, y1 = (-lim, lim, -lim, lim) if isinstance(lim, (int, float)) else lim
    fn = _log_prob_fn(model_or_log_prob)
    dtype, device = _like(model_or_log_prob)
    xs, ys = np.linspace(x0, x1, n), np.linspace(y0, y1, n)
    gx, gy = np.meshgrid(xs, ys)
    pts = torch.as_tensor(np.stack([gx.ravel(), gy.ravel()], 1), dtype=dtype, device=device)
    with torch.no_grad():
        out = torch.cat([fn(pts[i:i + batch_size]).reshape(-1) for i in range(0, len(pts), batch_size)])
    return xs, ys, out.double().cpu().numpy().reshape(n, n)


def _new_figure(ncols: int, size: float = 4.0) -> Figure:
    fig = Figure(figsize=(size * ncols, size), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def _np(x: Tensor | np.ndarray) -> np.ndarray:
    arr = x.detach().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"points must have shape (n, 2), got {arr.shape}")
    return arr


def _scatter(ax: Any, pts: np.ndarray, title: str, extent: tuple[float, float, float, float]) -> None:
    ax.scatter(pts[:, 0], pts[:, 1], s=1, alpha=0.5, linewidths=0)
    ax.set_xlim(extent[0], extent[1])
    ax.set_ylim(extent[2], extent[3])
    ax.set_aspect("equal")
    ax.set_title(title)


def _density(ax: Any, xs: np.ndarray, ys: np.ndarray, logp: np.ndarray, title: str) -> None:
    ax.imshow(np.exp(logp), origin="lower", extent=(xs[0], xs[-1], ys[0], ys[-1]), cmap="viridis", aspect="equal")
    ax.set_title(title)


def _extent(lim: float | tuple[float, float, float, float]) -> tuple[float, float, float, float]:
    return (-lim, lim, -lim, lim) if isinstance(lim, (int, float)) else tuple(lim)  # type: ignore[return-value]


def plot_flow(
    model: Any,
    data: Tensor | np.ndarray,
    path: str | Path,
    *,
    samples: Tensor | np.ndarray | None = None,
    n_samples: int = 2000,
    lim: float | tuple[float, float, float, float] = 3.0,
    grid: int = 100,
    true_density: Any = None,
) -> Path:
    """The picture people look at for a 2-D flow: data, model density, model samples (and the
    true density if given), side by side, saved to ``path`` (PNG/PDF/SVG by suffix).

    Args:
        model: a flow with ``log_prob`` and ``sample`` (e.g. ``CNF``).
        data: ``(n, 2)`` data points.
        samples: ``(m, 2)`` model samples; drawn with ``model.sample(n_samples)`` if None.
        lim, grid: plotting window and grid resolution of the density.
        true_density: optional model/callable with the true ``log_prob`` (e.g. ``data.mixture(name)``).

    Returns: the path written.
    """
    extent = _extent(lim)
    if samples is None:
        with torch.no_grad():
            samples = model.sample(n_samples)
    panels = 4 if true_density is not None else 3
    fig = _new_figure(panels)
    axes = fig.subplots(1, panels)
    _scatter(axes[0], _np(data), "data", extent)
    i = 1
    if true_density is not None:
        _density(axes[i], *density_grid(true_density, extent, grid), "true density")
        i += 1
    _density(axes[i], *density_grid(model, extent, grid), "model density")
    _scatter(axes[i + 1], _np(samples), "model samples", extent)
    return _save(fig, path)


def plot_density(model_or_log_prob: Any, path: str | Path, *,
                 lim: float | tuple[float, float, float, float] = 3.0, grid: int = 100,
                 title: str = "density") -> Path:
    """One panel: ``exp(log p)`` on a grid. Returns the path written."""
    fig = _new_figure(1)
    _density(fig.subplots(1, 1), *density_grid(model_or_log_prob, _extent(lim), grid), title)
    return _save(fig, path)


def plot_samples(samples: Tensor | np.ndarray, path: str | Path, *, data: Tensor | np.ndarray | None = None,
                 lim: float | tuple[float, float, float, float] = 3.0) -> Path:
    """Sample scatter, next to the data scatter when ``data`` is given. Returns the path written."""
    extent = _extent(lim)
    panels = 2 if data is not None else 1
    fig = _new_figure(panels)
    axes = np.atleast_1d(fig.subplots(1, panels))
    if data is not None:
        _scatter(axes[0], _np(data), "data", extent)
    _scatter(axes[-1], _np(samples), "samples", extent)
    return _save(fig, path)


def plot_training(history: Sequence[Mapping[str, Any]] | Any, path: str | Path, *,
                  keys: Sequence[str] = ("loss", "val"), nfe: bool = True) -> Path:
    """Training curves from ``FitResult.history`` (or the result itself): ``keys`` against the
    epoch in one panel, NFE per step in a second one when recorded. Returns the path written."""
    history = getattr(history, "history", history)
    if not history:
        raise ValueError("history is empty")
    epochs = [h.get("epoch", i) for i, h in enumerate(history)]

    def series(key: str) -> list[float]:
        return [float(h[key]) if h.get(key) is not None else math.nan for h in history]

    has_nfe = nfe and any(h.get("nfe") is not None for h in history)
    fig = _new_figure(2 if has_nfe else 1, size=4.5)
    axes = np.atleast_1d(fig.subplots(1, 2 if has_nfe else 1))
    for key in keys:
        values = series(key)
        if not all(math.isnan(v) for v in values):
            axes[0].plot(epochs, values, marker="o", markersize=3, label=key)
    axes[0].set_xlabel("epoch")
    axes[0].set_ylabel("loss")
    axes[0].legend()
    if has_nfe:
        axes[1].plot(epochs, series("nfe"), marker="o", markersize=3, color="tab:red")
        axes[1].set_xlabel("epoch")
        axes[1].set_ylabel("NFE per step")
    return _save(fig, path)
