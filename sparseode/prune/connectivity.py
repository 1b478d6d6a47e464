"""ICP as published: inter-layer connectivity and gradient flow (Gharatappeh & Sekeh, 2025).

"Information Consistent Pruning: How to Efficiently Search for Sparse Networks?" (arXiv
2501.15592, code github.com/Sekeh-Lab/InfCoP) stops an intermediate prune-retrain round of
iterative magnitude pruning as soon as the pruned network's *information flow* (connectivity
between consecutive layers) and *gradient flow* are back to those of the reference network.

Information flow: connectivity ``c`` of shape ``(L − 1,)``
---------------------------------------------------------
For the measured layers ``1..L`` in forward order (``nn.Linear`` layers; outputs taken *before*
the activation), on a fixed probe set of ``N`` samples (for an ODE model: every probe sample at
every field evaluation of a fixed-step solve, see below):

    A_l  ∈ R^{N × n_l}                       the layer's outputs, rows = samples
    F_l  = (A_l − mean_N(A_l)) / max(std_N(A_l), 1e-3)     per output unit (column); std is the
                                             population std (divisor N); a dead unit (zero
                                             variance) gives a zero column, never NaN
    C_l  = F_lᵀ F_{l+1} / N  ∈ R^{n_l × n_{l+1}}   (cross-correlations of consecutive layers)
    c_l  = mean(C_l) = (1 / (N n_l n_{l+1})) Σ_i (Σ_a F_l[i, a]) (Σ_b F_{l+1}[i, b])

Gradient flow: ``g`` of shape ``(L,)``
--------------------------------------
    g_l = (1/|P|) Σ_{b∈P} ‖ m_l ⊙ ∂ loss_fn(model, b) / ∂W_l ‖₂

with ``m_l`` the layer's mask (pruned entries excluded; all ones when the layer is dense).

ODE models
----------
For a model containing an ODE solve (``NeuralODE``, ``ODEClassifier``, ``CNF``: any submodule with
string ``method`` and ``options`` attributes) the solves run as fixed-step ``rk4`` solves with
``n_steps`` steps (:func:`sparseode.prune.fixed_step`) so that every network is probed at the same
times, and the connectivity is measured on the *vector field*: the layers of ``model.fields``
(CNF) or ``model.field`` (``NeuralODE``, ``ODEClassifier``), without the time hyper-networks of
``ConcatSquashLinear`` (``nn.Linear`` with one input). Pairs are formed inside each field (a stack
of CNF flows contributes ``L_f − 1`` pairs per field). Stochastic parts of a solve (Hutchinson
probes) are drawn under a fixed seed.

The stopping rule (:class:`ConnectivityMeasure`, registered in ``ICP_MEASURES`` as
``"connectivity"``)
-------------------------------------------------------------------------------------------
A check is consistent when

    ‖c − c_ref‖₂ < eps_info    and    ‖g − g_ref‖₂ / ‖g_ref‖₂ < eps_grad,

with the reference the dense network (``reference="dense"``, as published: the first network
:meth:`ICP.reference` sees) or the network before this round's pruning (``"previous"``). The round
also ends at once, with reason ``"recovered"``, when the probe loss (the probe is held out: a
validation metric the rule can see, lower is better) is back at or below the reference's
(the published early exit: performance back at the reference network's).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import torch.nn as nn

from sparseode.distributed import gather_rows, mean_over_ranks
from sparseode.losses import LossFn, resolve_loss
from sparseode.pruned import mask_or_ones, trainable
from sparseode.args import integer, real
from sparseode.prune.icp import _as_batches, fixed_step, register_icp_measure
from sparseode.prune.layers import FilterFn, prunable_layers

__all__ = ["connectivity", "gradient_flow", "ConnectivityMeasure", "FlowSnapshot", "flow_layers"]

STD_FLOOR = 1e-3


def _is_ode(model: nn.Module) -> bool:
    return any(isinstance(getattr(m, "method", None), str) and hasattr(m, "options") for m in model.modules())


def _field_roots(model: nn.Module) -> list[nn.Module]:
    """The vector fields of an ODE model (``fields`` of a CNF, else ``field``), or ``[model]``."""
    fields = getattr(model, "fields", None)
    if isinstance(fields, (nn.ModuleList, list, tuple)) and len(fields) > 0:
        return list(fields)
    try:
        f = getattr(model, "field", None)
    except AttributeError:  # CNF.field on a stack
        f = None
    if isinstance(f, nn.Module):
        return [f]
    return [model]


def flow_layers(model: nn.Module, filter_fn: FilterFn | None = None) -> list[list[tuple[str, nn.Linear]]]:
    """The layers whose outputs the connectivity measures: one ordered list per chain.

    Plain model: one list, every prunable ``nn.Linear`` (``filter_fn(name, module)``, names as in
    ``model.named_modules()``) in registration order, which must be the forward order. ODE model:
    one list per vector field (see the module doc), time hyper-networks (``in_features == 1``)
    left out.
    """
    layers = prunable_layers(model, filter_fn)
    if not _is_ode(model):
        return [list(layers.items())]
    out = []
    for root in _field_roots(model):
        ids = {id(m) for m in root.modules()}
        out.append([(n, m) for n, m in layers.items() if id(m) in ids and m.in_features > 1])
    return out


@dataclass
class FlowSnapshot:
    """What :class:`ConnectivityMeasure` records on one network.

    ``c``: connectivity ``(L − 1,)`` float64; ``g``: gradient flow ``(L_g,)`` float64 (one entry per
    prunable layer); ``loss``: mean probe loss; ``names``: the prunable layers' names.
    """

    c: torch.Tensor
    g: torch.Tensor
    loss: float = math.nan
    names: list[str] = field(default_factory=list)


def _standardise(a: torch.Tensor) -> torch.Tensor:
    """``(a − mean) / max(std, 1e-3)`` per column, population std: ``(N, n) -> (N, n)``."""
    a = a.to(torch.float64)
    mu = a.mean(0, keepdim=True)
    sd = a.std(0, correction=0, keepdim=True).clamp_min(STD_FLOOR)
    return (a - mu) / sd


def _connectivity_from(outs: list[torch.Tensor]) -> torch.Tensor:
    """``c_l = mean(F_lᵀ F_{l+1} / N)`` for consecutive outputs ``outs[l] (N, n_l)``: ``(len − 1,)``."""
    sums = []
    for a in outs:
        f = _standardise(a)
        sums.append((f.sum(1), f.shape[1]))
    n = outs[0].shape[0]
    return torch.stack([
        (s0 * s1).sum() / (n * k0 * k1) for (s0, k0), (s1, k1) in zip(sums[:-1], sums[1:])
    ])


def _collect(
    model: nn.Module,
    probe: list[tuple],
    loss_fn: LossFn | None,
    *,
    want_c: bool,
    want_g: bool,
    filter_fn: FilterFn | None,
    n_steps: int,
    seed: int,
) -> FlowSnapshot:
    """One pass over the probe: layer outputs (hooks, forward only) and per-batch masked gradients."""
    integer(n_steps, "n_steps", low=1)
    integer(seed, "seed")
    chains = flow_layers(model, filter_fn) if want_c else []
    if want_c and sum(max(len(ch) - 1, 0) for ch in chains) < 1:
        raise ValueError(
            f"connectivity needs at least two consecutive prunable layers in model "
            f"({type(model).__name__}); found {[len(ch) for ch in chains]} (after filter_fn)")
    glayers = prunable_layers(model, filter_fn)
    if want_g and not glayers:
        raise ValueError(f"model ({type(model).__name__}) has no prunable nn.Linear layer (after filter_fn)")
    recording = [True]
    acts: dict[int, list[torch.Tensor]] = {}
    handles = []
    for ch in chains:
        for _, m in ch:
            if id(m) in acts:
                continue
            acts[id(m)] = []

            def hook(mod: nn.Module, inp: Any, out: torch.Tensor, key: int = id(m)) -> None:
                if recording[0]:
                    acts[key].append(out.detach().reshape(-1, out.shape[-1]))

            handles.append(m.register_forward_hook(hook))
    weights = [trainable(m) for m in glayers.values()]
    masks = [mask_or_ones(m).detach() for m in glayers.values()]
    gsum = torch.zeros(len(weights), dtype=torch.float64)
    tot = 0.0
    try:
        with fixed_step(model, n_steps), torch.random.fork_rng(devices=[]), torch.enable_grad():
            torch.manual_seed(seed)
            for batch in probe:
                recording[0] = True
                if want_g:
                    loss = loss_fn(model, batch)  # type: ignore[misc]
                    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                        raise ValueError("loss_fn must return a scalar tensor")
                    tot += float(loss.detach())
                    recording[0] = False  # an adjoint backward calls the field again
                    gs = torch.autograd.grad(loss, weights, allow_unused=True)
                    for i, (g, mk) in enumerate(zip(gs, masks)):
                        if g is not None:
                            gsum[i] += float((g.detach() * mk).to(torch.float64).norm())
                else:
                    model(batch[0])
    finally:
        for h in handles:
            h.remove()
    cs = []
    for ch in chains:
        if len(ch) < 2:
            continue
        outs = [gather_rows(torch.cat(acts[id(m)])) for _, m in ch]  # every rank's probe rows (torchrun)
        rows = {o.shape[0] for o in outs}
        if len(rows) != 1:
            raise RuntimeError(f"layers of one chain saw different numbers of rows {sorted(rows)}; "
                               "are the layers listed in forward order?")
        cs.append(_connectivity_from(outs))
    c = torch.cat(cs) if cs else torch.zeros(0, dtype=torch.float64)
    g, loss = mean_over_ranks([gsum, torch.tensor([tot], dtype=torch.float64)], len(probe))
    return FlowSnapshot(c=c, g=g, loss=float(loss) if want_g else math.nan, names=list(glayers))


def connectivity(
    model: nn.Module,
    probe: Iterable[Any],
    *,
    filter_fn: FilterFn | None = None,
    n_steps: int = 4,
    seed: int = 0,
) -> torch.Tensor:
    """Connectivity of consecutive prunable layers, ``c (L − 1,)`` float64 (formula in the module doc).

    Args:
        model: an MLP-like model (``nn.Linear`` layers registered in forward order) or an ODE model
            (then measured on its vector field(s) along a fixed-step ``rk4`` solve).
        probe: iterable of batches (tuples; a bare tensor is one batch); the model is called on
            ``batch[0]``.
        filter_fn: which ``nn.Linear`` layers count (``filter_fn(name, module) -> bool``).
        n_steps: fixed ``rk4`` steps of the probe solves (ODE models).
        seed: RNG seed inside the probe pass (Hutchinson probes).

    Raises:
        ValueError: empty ``probe``; fewer than two prunable layers in ``model``.
    """
    return _collect(model, _as_batches(probe), None, want_c=True, want_g=False, filter_fn=filter_fn,
                    n_steps=n_steps, seed=seed).c


def gradient_flow(
    model: nn.Module,
    loss_fn: LossFn | None,
    probe: Iterable[Any],
    *,
    filter_fn: FilterFn | None = None,
    n_steps: int = 4,
    seed: int = 0,
) -> torch.Tensor:
    """Gradient flow per prunable layer, ``g (L,)`` float64: ``g_l = mean_b ‖m_l ⊙ ∂loss_b/∂W_l‖₂``.

    Args:
        loss_fn: ``loss_fn(model, batch) -> scalar``; ``None``: ``sparseode.losses.default_loss``.
        probe, filter_fn, n_steps, seed: as for :func:`connectivity`.
    """
    batches = _as_batches(probe)
    loss_fn = resolve_loss(model, loss_fn, "gradient_flow")
    return _collect(model, batches, loss_fn, want_c=False, want_g=True, filter_fn=filter_fn,
                    n_steps=n_steps, seed=seed).g


class ConnectivityMeasure:
    """ICP's published consistency measure: connectivity and gradient flow against a reference.

    Args:
        eps_info: consistent when ``‖c − c_ref‖₂ < eps_info`` (> 0).
        eps_grad: and ``‖g − g_ref‖₂ / ‖g_ref‖₂ < eps_grad`` (> 0).
        reference: ``"dense"`` (keep the first reference recorded: the dense network, as
            published) or ``"previous"`` (the network before the current round's pruning).
        early_exit: also stop a round (reason ``"recovered"``) once the probe loss is at or below
            the reference's.
        n_steps, filter_fn, seed: as for :func:`connectivity`.

    Defaults (``eps_info=0.1``, ``eps_grad=0.5``, ``reference="dense"``, ``early_exit=True``):
    ``eps_info`` in the range the paper used for its CNN runs (0.08-0.15). Measured with
    ``python bench/icp_compare.py --task {flow,clf} --calibrate`` (8-round geometric magnitude
    cascade, every check recorded, no early stop, seed 0): on these small fields ``‖c − c_ref‖₂``
    is small and barely moves during a round — gaussians flow: median 0.031 at the first check
    after pruning, 0.026 at the end of the round's budget (largest 0.084); concentric classifier:
    0.045 → 0.042 (largest 0.056) — so at 0.1 the information test rarely binds and the gradient
    test decides. The relative gradient distance separates on the flow (median 0.73 → 0.58;
    replayed, ``eps_grad=0.5`` uses 54% of the intermediate budget, 1.0 uses 47%), not on the
    classifiers, whose converged dense gradient is tiny (distances 2-30 after pruning, 1.7 at the
    end of the budget: 95% of the budget used at 0.5, 84% at 1.0). ``eps_grad=0.5`` is the
    conservative choice; see the bench's docstring for the head-to-head results.
    """

    name = "connectivity"

    def __init__(
        self,
        eps_info: float = 0.1,
        eps_grad: float = 0.5,
        reference: str = "dense",
        early_exit: bool = True,
        n_steps: int = 4,
        filter_fn: FilterFn | None = None,
        seed: int = 0,
    ) -> None:
        for nm, v in (("eps_info", eps_info), ("eps_grad", eps_grad)):
            real(v, nm, low=0.0, low_open=True)
        integer(n_steps, "n_steps", low=1)
        integer(seed, "seed")
        if reference not in ("dense", "previous"):
            raise ValueError(f"reference must be 'dense' or 'previous', got {reference!r}")
        self.eps_info = float(eps_info)
        self.eps_grad = float(eps_grad)
        self.reference = reference
        self.early_exit = bool(early_exit)
        self.n_steps = n_steps
        self.filter_fn = filter_fn
        self.seed = seed

    @property
    def keep_first_reference(self) -> bool:
        """True when :class:`ICP` should keep the first reference (``reference="dense"``)."""
        return self.reference == "dense"

    def snapshot(self, model: nn.Module, probe: list[tuple], loss_fn: LossFn) -> FlowSnapshot:
        return _collect(model, probe, loss_fn, want_c=True, want_g=True, filter_fn=self.filter_fn,
                        n_steps=self.n_steps, seed=self.seed)

    def compare(self, ref: FlowSnapshot, cur: FlowSnapshot) -> tuple[bool, dict[str, Any]]:
        if ref.c.shape != cur.c.shape or ref.g.shape != cur.g.shape:
            raise RuntimeError(f"flows of shapes c {tuple(cur.c.shape)}, g {tuple(cur.g.shape)} cannot be "
                               f"compared with the reference's c {tuple(ref.c.shape)}, g {tuple(ref.g.shape)}")
        info = float((cur.c - ref.c).norm())
        gref = float(ref.g.norm())
        gdiff = float((cur.g - ref.g).norm())
        grad = gdiff / gref if gref > 0 else (0.0 if gdiff == 0 else math.inf)
        ok = info < self.eps_info and grad < self.eps_grad
        recovered = self.early_exit and cur.loss <= ref.loss
        return ok, {"info": info, "grad": grad, "max_info": info, "max_grad_dev": grad,
                    "loss": cur.loss, "ref_loss": ref.loss, "recovered": recovered,
                    "c": cur.c.tolist(), "g": cur.g.tolist()}


register_icp_measure(ConnectivityMeasure)
