"""Analysis of pruned flows: loss-curvature spectrum and mode coverage over sparsity.

Hessian (as in the flow-pruning study, Liebenwein et al. 2021, which relates the flatness of the
loss around pruned flows to their generalisation). With ``L(θ)`` the mean of ``loss_fn`` over the
first ``n_batches`` batches and ``θ`` restricted to the *unpruned* trainable coordinates (a pruned
coordinate is fixed at zero, so the loss is a function of the others only), let ``P`` be the
0/1 diagonal projection onto them and ``H = P ∇²L P`` (pruned rows and columns zero):

* top eigenvalue: power iteration ``v ← Hv/‖Hv‖`` (the eigenvalue of largest magnitude, as
  PyHessian reports), or Lanczos with full reorthogonalisation (the extreme Ritz values of the
  ``m×m`` tridiagonal matrix; with ``m`` equal to the dimension these are exact);
* trace by Hutchinson: ``tr(H) ≈ (1/K) Σ_k v_kᵀ H v_k`` with Rademacher ``v_k`` supported on the
  unpruned coordinates.

``Hv`` is a Hessian-vector product by double backprop, through the ODE solve for ODE models.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.nn as nn

from sparseode.losses import LossFn, resolve_loss
from sparseode.pruned import logical_names, masks
from sparseode.prune.checkpoint import clone, load_pruned
from sparseode.args import integer, real
from sparseode.prune.importance import batches_of
from sparseode.prune.report import sparsity

__all__ = ["hessian_spectrum", "HessianSpectrum", "mode_coverage"]


@dataclass
class HessianSpectrum:
    """``top_eigenvalue`` (largest magnitude), ``eigenvalues`` (the extreme Ritz/power values
    found, descending), ``trace`` (Hutchinson) with its standard error, ``dim`` (unpruned
    coordinates), ``iterations`` used."""

    top_eigenvalue: float
    trace: float
    trace_stderr: float
    dim: int
    eigenvalues: list[float] = field(default_factory=list)
    iterations: int = 0


def _restricted_params(model: nn.Module, params: str) -> tuple[list[nn.Parameter], list[torch.Tensor]]:
    lnames = logical_names(model)
    mk = masks(model)
    ps, ms = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        ln = lnames[n]
        if params == "weights" and not ln.endswith("weight"):
            continue
        ps.append(p)
        ms.append(mk[ln].to(p.dtype) if ln in mk else torch.ones_like(p))
    if not ps:
        raise ValueError(f"model has no trainable parameter for params={params!r}")
    return ps, ms


HVP = Callable[[list[torch.Tensor]], list[torch.Tensor]]


def _hvp(model: nn.Module, loss_fn: LossFn, batches: list[tuple], ps: list[nn.Parameter],
         ms: list[torch.Tensor]) -> HVP:
    """``v ↦ P ∇²L P v`` for the mean loss over ``batches`` (double backprop per batch)."""

    def hvp(vs: list[torch.Tensor]) -> list[torch.Tensor]:
        acc = [torch.zeros_like(p) for p in ps]
        with torch.enable_grad():
            for b in batches:
                loss = loss_fn(model, b)
                gs = torch.autograd.grad(loss, ps, create_graph=True, allow_unused=True)
                dot = sum((g * v).sum() for g, v in zip(gs, vs) if g is not None and g.requires_grad)
                if not torch.is_tensor(dot):
                    continue
                hv = torch.autograd.grad(dot, ps, allow_unused=True)
                for a, h in zip(acc, hv):
                    if h is not None:
                        a.add_(h.detach())
        return [a * m / len(batches) for a, m in zip(acc, ms)]

    return hvp


def _dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return float(sum((x * y).sum() for x, y in zip(a, b)))


def _random(ps: list[nn.Parameter], ms: list[torch.Tensor], gen: torch.Generator, kind: str) -> list[torch.Tensor]:
    """A random vector on the unpruned coordinates: standard ``"normal"`` or ``"rademacher"`` ±1."""
    out = []
    for p, m in zip(ps, ms):
        if kind == "normal":
            r = torch.randn(p.shape, generator=gen, dtype=torch.float64)
        else:
            r = torch.randint(0, 2, p.shape, generator=gen).to(torch.float64) * 2 - 1
        out.append(r.to(p) * m)
    return out


def _normalized(v: list[torch.Tensor]) -> list[torch.Tensor]:
    n = math.sqrt(_dot(v, v))
    return [x / n for x in v]


def _power(hvp: HVP, v: list[torch.Tensor], n_iter: int, tol: float) -> tuple[float, int]:
    """Eigenvalue of largest magnitude by power iteration from ``v``; ``(value, iterations)``."""
    v = _normalized(v)
    top, iters = 0.0, 0
    for iters in range(1, n_iter + 1):
        hv = hvp(v)
        lam = _dot(v, hv)
        nrm = math.sqrt(_dot(hv, hv))
        if nrm == 0:
            return 0.0, iters
        v = [x / nrm for x in hv]
        converged = iters > 1 and abs(lam - top) <= tol * max(abs(top), 1e-12)
        top = lam
        if converged:
            break
    return top, iters


def _lanczos(hvp: HVP, q: list[torch.Tensor], m: int) -> tuple[list[float], int]:
    """Ritz values (descending) of ``m`` Lanczos steps from ``q`` with full reorthogonalisation."""
    Q = [_normalized(q)]
    alpha: list[float] = []
    beta: list[float] = []
    for j in range(m):
        w = hvp(Q[j])
        a = _dot(w, Q[j])
        alpha.append(a)
        for _ in range(2):  # reorthogonalise twice, for stability
            for qi in Q:
                c = _dot(w, qi)
                w = [x - c * y for x, y in zip(w, qi)]
        if j == m - 1:
            break
        b = math.sqrt(max(_dot(w, w), 0.0))
        if b < 1e-10 * max(1.0, abs(a)):
            break
        beta.append(b)
        Q.append([x / b for x in w])
    k = len(alpha)
    T = torch.diag(torch.tensor(alpha, dtype=torch.float64))
    if k > 1:
        off = torch.tensor(beta[: k - 1], dtype=torch.float64)
        T += torch.diag(off, 1) + torch.diag(off, -1)
    return sorted(torch.linalg.eigvalsh(T).tolist(), reverse=True), k


def _hutchinson(hvp: HVP, probes: list[list[torch.Tensor]]) -> tuple[float, float]:
    """Trace estimate ``mean_k v_kᵀ H v_k`` and its standard error (nan for one probe)."""
    t = torch.tensor([_dot(v, hvp(v)) for v in probes], dtype=torch.float64)
    se = float(t.std() / math.sqrt(len(probes))) if len(probes) > 1 else math.nan
    return float(t.mean()), se


def hessian_spectrum(
    model: nn.Module,
    loss_fn: LossFn | None = None,
    data: Iterable[Any] | None = None,
    n_batches: int = 1,
    *,
    method: str = "power",
    n_iter: int = 20,
    tol: float = 1e-4,
    n_hutchinson: int = 20,
    params: str = "all",
    seed: int = 0,
) -> HessianSpectrum:
    """Top Hessian eigenvalue and trace of the loss over the unpruned weights.

    Args:
        model: any model (pruned in the torch layout or not).
        loss_fn: ``loss_fn(model, batch) -> scalar`` (default ``sparseode.losses.default_loss``).
        data: iterable of batches; the first ``n_batches`` are averaged.
        method: ``"power"`` (power iteration, stops when the eigenvalue changes by less than
            ``tol`` relatively) or ``"lanczos"`` (``n_iter`` Lanczos steps).
        n_iter: iterations of either method (an int >= 1).
        tol: relative tolerance of the power iteration (a real number > 0).
        n_hutchinson: Rademacher probes of the trace estimate (an int >= 0; 0 skips the trace).
        params: ``"all"`` trainable parameters or only ``"weights"``.
        seed: seed of the start vector and probes.

    Returns:
        :class:`HessianSpectrum`.
    """
    if method not in ("power", "lanczos"):
        raise ValueError(f"unknown method={method!r}; choose 'power' or 'lanczos'")
    if params not in ("all", "weights"):
        raise ValueError(f"params must be 'all' or 'weights', got {params!r}")
    n_iter = integer(n_iter, "n_iter", low=1)
    tol = real(tol, "tol", low=0.0, low_open=True)
    n_hutchinson = integer(n_hutchinson, "n_hutchinson", low=0)
    gen = torch.Generator().manual_seed(integer(seed, "seed"))
    loss_fn = resolve_loss(model, loss_fn, "hessian_spectrum")
    batches = batches_of(data, n_batches, "hessian_spectrum")
    ps, ms = _restricted_params(model, params)
    dim = int(sum(float(m.sum()) for m in ms))
    hvp = _hvp(model, loss_fn, batches, ps, ms)

    eigs: list[float] = []
    top, iters = 0.0, 0
    if dim > 0 and method == "power":
        top, iters = _power(hvp, _random(ps, ms, gen, "normal"), n_iter, tol)
        eigs = [top]
    elif dim > 0:
        eigs, iters = _lanczos(hvp, _random(ps, ms, gen, "normal"), min(n_iter, dim))
        top = max(eigs, key=abs)
    tr, se = math.nan, math.nan
    if n_hutchinson > 0 and dim > 0:
        tr, se = _hutchinson(hvp, [_random(ps, ms, gen, "rademacher") for _ in range(n_hutchinson)])
    return HessianSpectrum(top_eigenvalue=float(top), trace=tr, trace_stderr=se, dim=dim,
                           eigenvalues=eigs, iterations=iters)


def mode_coverage(
    model: nn.Module,
    checkpoints: Sequence[Mapping[str, torch.Tensor]],
    dataset: str,
    n_samples: int = 2000,
    *,
    sample_fn: Callable[[nn.Module, int], torch.Tensor] | None = None,
    seed: int = 0,
    **coverage_kwargs: Any,
) -> list[dict[str, Any]]:
    """Mode coverage of a flow at every checkpoint of a pruning history (modes vs sparsity).

    Each checkpoint (e.g. ``history.checkpoints``) is loaded into a copy of ``model``; ``n_samples``
    samples are drawn (``sample_fn(model, n)``, default ``model.sample(n)``) and scored with
    ``sparseode.data.mode_coverage(samples, dataset, **coverage_kwargs)``.

    Returns:
        one dict per checkpoint: ``{"sparsity": float, "coverage": <mode_coverage's result>}``;
        the coverage holds the lenient (``modes_captured``) and strict (``strict_ok``,
        ``share_ratios``, ``off_mode``) metrics, see :class:`sparseode.data.ModeCoverage`.
    """
    from sparseode.data import mode_coverage as cover  # numpy and the data sets: on first use

    n_samples = integer(n_samples, "n_samples", low=1)
    integer(seed, "seed")
    sample_fn = sample_fn or (lambda m, n: m.sample(n))
    out = []
    for sd in checkpoints:
        m = clone(model)
        load_pruned(m, sd)
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(seed)
            x = sample_fn(m, n_samples)
        out.append({"sparsity": sparsity(m).total, "coverage": cover(x.detach(), dataset, **coverage_kwargs)})
    return out
