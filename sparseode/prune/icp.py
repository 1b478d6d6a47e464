"""Information-consistency stopping for intermediate retraining rounds (ICP).

Iterative prune-retrain spends most of its time retraining after every intermediate pruning step
until the network is back to its original performance. Information Consistent Pruning
(Gharatappeh et al., 2025) stops an intermediate round as soon as the pruned network carries
information and gradients through its layers the way the network before pruning did; only the
final round trains to convergence.

:class:`ICP` is the stopping rule (a ``fit`` callback); *how* consistency is measured is a
registry, :data:`ICP_MEASURES` (name → measure class), so that another measure is one entry.

The ``"discrepancy"`` measure (:class:`DiscrepancyMeasure`)
-----------------------------------------------------------
On a fixed probe set ``P`` (a few batches held out from training), for every prunable layer ``l``
(an ``nn.Linear``), with the loss ``L_P(θ) = (1/|P|) Σ_{b∈P} loss_fn(model, b)``:

* information flow ``a_l``: the layer's outputs ``(N_l, out_l)``, stacked over the probe batches
  and, for an ODE model (any submodule with ``method``/``options`` attributes, e.g.
  :class:`~sparseode.models.NeuralODE`, :class:`~sparseode.models.CNF`), over every field
  evaluation of a *fixed-step* solve (``rk4`` with ``n_steps`` steps over the model's time span)
  so that the reference and the pruned network are evaluated at the same times;
* gradient flow ``‖g_l‖``, ``g_l = ∂L_P/∂W_l`` (for a pruned layer, w.r.t. its trainable
  ``weight_orig``, i.e. ``m ⊙ ∂L_P/∂W``).

Recorded once on the reference (the network before the round's pruning), then every
``check_every`` optimiser steps on the pruned network being retrained:

    D_l = ‖a_l^pruned − a_l^ref‖_F / ‖a_l^ref‖_F           (activation discrepancy)
    R_l = ‖g_l^pruned‖_2 / ‖g_l^ref‖_2                     (gradient-norm ratio)

A check is *consistent* when ``max_l D_l < tol_info`` and ``|R_l − 1| ≤ tol_grad`` for every l.

The rule
--------
The round stops at the first check that closes a run of ``patience`` consecutive consistent
checks, but never before ``min_steps`` optimiser steps; or once ``max_epochs`` epochs are spent
(``None``: the fit's own budget). The reason is recorded: ``"consistent"``, ``"max_epochs"``, or
``"budget"`` when the fit ended on its own; ``"recovered"`` when the measure reports the held-out
metric back at the reference's (``values["recovered"]``, the ``"connectivity"`` measure's early exit). Probe solves run with a fixed RNG seed (Hutchinson
probes, etc.) so that every check sees the same noise.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Protocol

import torch
import torch.nn as nn

from sparseode.distributed import gather_rows, mean_over_ranks
from sparseode.losses import LossFn, resolve_loss
from sparseode.pruned import trainable
from sparseode.args import integer, real
from sparseode.prune.layers import FilterFn, prunable_layers

__all__ = [
    "ICP",
    "ICP_MEASURES",
    "register_icp_measure",
    "DiscrepancyMeasure",
    "Snapshot",
    "fixed_step",
]

@contextlib.contextmanager
def fixed_step(model: nn.Module, n_steps: int = 4, method: str = "rk4") -> Iterator[None]:
    """Make every ODE solve inside ``model`` a fixed-step solve for the duration of the block.

    Every submodule with string attribute ``method`` and an ``options`` attribute (``NeuralODE``,
    ``CNF``) gets ``method=method`` and ``options={"step_size": span / n_steps}``, with ``span``
    its integration length (``t_span`` or ``T``, default 1). Restored on exit.
    """
    n_steps = integer(n_steps, "n_steps", low=1)
    saved = []
    for m in model.modules():
        if isinstance(getattr(m, "method", None), str) and hasattr(m, "options"):
            if hasattr(m, "t_span"):
                span = abs(float(m.t_span[1]) - float(m.t_span[0]))
            else:
                span = abs(float(getattr(m, "T", 1.0)))
            saved.append((m, m.method, m.options))
            m.method = method
            m.options = {"step_size": span / n_steps}
    try:
        yield
    finally:
        for m, meth, opts in saved:
            m.method, m.options = meth, opts


@dataclass
class Snapshot:
    """What a measure recorded on one network: per-layer tensors and numbers."""

    activations: dict[str, torch.Tensor] = field(default_factory=dict)
    grad_norms: dict[str, float] = field(default_factory=dict)
    loss: float = math.nan


class ICPMeasure(Protocol):
    """A consistency measure: ``snapshot`` a network, ``compare`` a snapshot to the reference."""

    name: str

    def snapshot(self, model: nn.Module, probe: list[tuple], loss_fn: LossFn) -> Any: ...

    def compare(self, ref: Any, cur: Any) -> tuple[bool, dict[str, Any]]: ...


class DiscrepancyMeasure:
    """Activation discrepancy and gradient-norm ratio per layer (formulas in the module doc).

    Args:
        tol_info: a layer is information-consistent when ``D_l < tol_info``.
        tol_grad: gradient-consistent when ``1 - tol_grad ≤ R_l ≤ 1 + tol_grad``.
        n_steps: fixed ``rk4`` steps of the probe solve for ODE models.
        filter_fn: which ``nn.Linear`` layers are measured (default: all).
        seed: RNG seed used inside every probe solve.
    """

    name = "discrepancy"

    def __init__(
        self,
        tol_info: float = 0.35,
        tol_grad: float = 1.0,
        n_steps: int = 4,
        filter_fn: FilterFn | None = None,
        seed: int = 0,
    ) -> None:
        self.tol_info = real(tol_info, "tol_info", low=0.0, low_open=True)
        self.tol_grad = real(tol_grad, "tol_grad", low=0.0, low_open=True)
        integer(n_steps, "n_steps", low=1)
        integer(seed, "seed")
        self.n_steps = n_steps
        self.filter_fn = filter_fn
        self.seed = seed

    def snapshot(self, model: nn.Module, probe: list[tuple], loss_fn: LossFn) -> Snapshot:
        layers = prunable_layers(model, self.filter_fn)
        if not layers:
            raise ValueError("model has no nn.Linear layer to measure (after filter_fn)")
        acts: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
        handles = []
        for n, m in layers.items():
            handles.append(m.register_forward_hook(
                lambda mod, inp, out, n=n: acts[n].append(out.detach().reshape(-1, out.shape[-1]))))
        weights = [trainable(m) for m in layers.values()]
        grads = [torch.zeros_like(w) for w in weights]
        tot = 0.0
        try:
            with fixed_step(model, self.n_steps), torch.random.fork_rng(devices=[]), torch.enable_grad():
                torch.manual_seed(self.seed)
                for batch in probe:
                    loss = loss_fn(model, batch)
                    tot += float(loss.detach())
                    gs = torch.autograd.grad(loss, weights, allow_unused=True)
                    for a, g in zip(grads, gs):
                        if g is not None:
                            a.add_(g.detach())
        finally:
            for h in handles:
                h.remove()
        # means over every rank's probe batches under torchrun (this process's otherwise)
        *means, loss = mean_over_ranks([*grads, torch.tensor([tot], dtype=torch.float64)], len(probe))
        snap = Snapshot(loss=float(loss))
        for (n, _), g in zip(layers.items(), means):
            snap.activations[n] = gather_rows(torch.cat(acts[n]) if acts[n] else torch.zeros(0))
            snap.grad_norms[n] = float(g.norm())
        return snap

    def compare(self, ref: Snapshot, cur: Snapshot) -> tuple[bool, dict[str, Any]]:
        disc, ratio = {}, {}
        for n, a_ref in ref.activations.items():
            a = cur.activations.get(n)
            if a is None or a.shape != a_ref.shape:
                raise RuntimeError(
                    f"layer {n!r}: probe activations of shape "
                    f"{None if a is None else tuple(a.shape)} cannot be compared with the "
                    f"reference's {tuple(a_ref.shape)} (did the number of field evaluations change?)"
                )
            den = float(a_ref.norm())
            num = float((a - a_ref).norm())
            disc[n] = num / den if den > 0 else (0.0 if num == 0 else math.inf)
            g_ref, g = ref.grad_norms[n], cur.grad_norms[n]
            ratio[n] = g / g_ref if g_ref > 0 else (1.0 if g == 0 else math.inf)
        ok = all(d < self.tol_info for d in disc.values()) and all(
            abs(r - 1.0) <= self.tol_grad for r in ratio.values())
        return ok, {
            "info": disc,
            "grad": ratio,
            "max_info": max(disc.values()),
            "max_grad_dev": max(abs(r - 1.0) for r in ratio.values()),
            "loss": cur.loss,
        }


ICP_MEASURES: dict[str, type] = {}


def register_icp_measure(cls: type) -> type:
    """Add an ICP measure class to :data:`ICP_MEASURES` under ``cls.name``."""
    ICP_MEASURES[cls.name] = cls
    return cls


register_icp_measure(DiscrepancyMeasure)


def _as_batches(probe: Iterable[Any]) -> list[tuple]:
    if isinstance(probe, torch.Tensor):
        probe = [probe]
    out = [tuple(b) if isinstance(b, (tuple, list)) else (b,) for b in probe]
    if not out:
        raise ValueError("probe must hold at least one batch")
    return out


class ICP:
    """The information-consistency stopping rule, a ``fit`` callback.

    Usage (what :func:`sparseode.prune.iterative` does every intermediate round)::

        icp = so.prune.ICP(probe=held_out_batches)
        icp.reference(model)                 # before pruning
        so.prune.apply(model, scores, s)
        icp.start()
        fit(model, callbacks=[icp])          # icp(state) returns True to stop
        icp.reason                           # "consistent" | "max_epochs" | "budget"

    Args:
        measure: a key of :data:`ICP_MEASURES` (``"connectivity"``, the published measure, see
            :mod:`sparseode.prune.connectivity`; ``"discrepancy"``), or a measure object.
        probe: iterable of batches (tuples) held out from training; the same every check.
        loss_fn: ``loss_fn(model, batch) -> scalar``; default ``sparseode.losses.default_loss``.
        patience: consecutive consistent checks needed to stop.
        check_every: optimiser steps between checks.
        min_steps: never stop before this many steps of the round.
        max_epochs: stop after this many epochs of the round (``None``: no cap).
        steps_per_epoch: to convert ``max_epochs`` to steps (default: learned from the first epoch
            change seen in ``state.epoch``).
        **measure_kwargs: the measure's parameters (``tol_info``, ``tol_grad``, ``n_steps``, …).

    The ``"discrepancy"`` measure's defaults (``tol_info=0.35``, ``tol_grad=1.0``, ``patience=1``, ``check_every=10``,
    ``min_steps=20``, ``max_epochs=None``) come from ``python bench/icp.py --calibrate``: the
    25-round magnitude cascade to 90% with every round run to its budget while checking. On the
    gaussians flow the largest layer discrepancy falls from a median 0.41 right after pruning to
    0.15 at the end of the budget, and the gradient ratios from R ≈ 2-4 to R ≈ 0.75-1.3
    (median ``max_l |R_l − 1|`` 1.71 → 0.77); on the concentric classifier D stays near 0.16
    while R swings from 0.04 to 60 (its reference gradient is close to zero). ``tol_info=0.35``
    and ``tol_grad=1.0`` (no layer's gradient above twice the reference's) separate "just pruned"
    from "recovered" on the flow; replayed on the recorded checks they use 36% (flow) and 65%
    (classifier) of the intermediate budget with ``patience=1``, 51% and 84% with
    ``patience=2``, hence ``patience=1`` with a check every 10 steps.

    Attributes:
        reason: why the last round stopped (``None`` while running).
        checks: per check of the current round, ``{"step", "consistent", ...measure values}``.
        rounds: per finished round, ``{"steps", "reason", "checks"}``.
    """

    def __init__(
        self,
        measure: str | ICPMeasure = "connectivity",
        probe: Iterable[Any] | None = None,
        loss_fn: LossFn | None = None,
        *,
        patience: int = 1,
        check_every: int = 10,
        min_steps: int = 20,
        max_epochs: float | None = None,
        steps_per_epoch: int | None = None,
        **measure_kwargs: Any,
    ) -> None:
        if isinstance(measure, str):
            if measure not in ICP_MEASURES:
                raise ValueError(f"unknown measure={measure!r}; choose one of {sorted(ICP_MEASURES)}")
            self.measure = ICP_MEASURES[measure](**measure_kwargs)
        else:
            if measure_kwargs:
                raise TypeError("measure parameters are given to the measure object itself")
            self.measure = measure
        if probe is None:
            raise ValueError("probe must be an iterable of held-out batches, got probe=None")
        for name, v, low in (("patience", patience, 1), ("check_every", check_every, 1), ("min_steps", min_steps, 0)):
            integer(v, name, low=low)
        if max_epochs is not None:
            real(max_epochs, "max_epochs", low=0.0, low_open=True)
        if steps_per_epoch is not None:
            integer(steps_per_epoch, "steps_per_epoch", low=1)
        self.probe = _as_batches(probe)
        self.loss_fn = loss_fn
        self.patience = patience
        self.check_every = check_every
        self.min_steps = min_steps
        self.max_epochs = max_epochs
        self.steps_per_epoch = steps_per_epoch
        self.ref: Any = None
        self._has_ref = False
        self.reason: str | None = None
        self.checks: list[dict[str, Any]] = []
        self.rounds: list[dict[str, Any]] = []
        self._steps = 0
        self._streak = 0
        self._epoch0: int | None = None
        self._last_epoch: int | None = None

    # -- lifecycle -------------------------------------------------------------------------------
    def _loss(self, model: nn.Module) -> LossFn:
        if self.loss_fn is None:
            self.loss_fn = resolve_loss(model, None, "ICP")
        return self.loss_fn

    def reference(self, model: nn.Module) -> None:
        """Record the reference network's flows (call before pruning).

        A measure with ``keep_first_reference`` True (``"connectivity"`` with ``reference="dense"``)
        keeps the first reference recorded: later calls do nothing.
        """
        if self._has_ref and getattr(self.measure, "keep_first_reference", False):
            return
        self.ref = self.measure.snapshot(model, self.probe, self._loss(model))
        self._has_ref = True

    def start(self) -> None:
        """Reset the round's counters (call after pruning, before retraining)."""
        if not self._has_ref:
            raise RuntimeError("ICP.reference(model) must be called before the round starts")
        self.reason, self.checks = None, []
        self._steps, self._streak = 0, 0
        self._epoch0 = self._last_epoch = None

    def finish(self) -> dict[str, Any]:
        """Close the round: record and return ``{"steps", "reason", "checks"}``."""
        rec = {"steps": self._steps, "reason": self.reason or "budget", "checks": self.checks}
        self.reason = rec["reason"]
        self.rounds.append(rec)
        return rec

    def check(self, model: nn.Module) -> tuple[bool, dict[str, Any]]:
        """Measure ``model`` against the reference: ``(consistent, values)``."""
        cur = self.measure.snapshot(model, self.probe, self._loss(model))
        return self.measure.compare(self.ref, cur)

    # -- the callback ----------------------------------------------------------------------------
    def __call__(self, state: Any) -> bool:
        """``fit`` callback, after every optimiser step: True stops the round."""
        if not self._has_ref:
            raise RuntimeError("ICP.reference(model) must be called before training with ICP")
        self._steps += 1
        epoch = getattr(state, "epoch", None)
        if epoch is not None:
            if self._epoch0 is None:
                self._epoch0 = epoch
            elif self.steps_per_epoch is None and epoch != self._last_epoch and self._epoch0 == self._last_epoch:
                self.steps_per_epoch = self._steps - 1  # the first epoch change seen
            self._last_epoch = epoch
        if self.max_epochs is not None:
            spe = self.steps_per_epoch
            if (spe is not None and self._steps >= math.ceil(self.max_epochs * spe)) or (
                epoch is not None and self._epoch0 is not None and epoch - self._epoch0 >= self.max_epochs
            ):
                self.reason = "max_epochs"
                return True
        if self._steps % self.check_every:
            return False
        ok, values = self.check(state.model)
        self._streak = self._streak + 1 if ok else 0
        self.checks.append({"step": self._steps, "consistent": ok, **values})
        if values.get("recovered"):  # the measure saw the validation metric back at the reference's
            self.reason = "recovered"
            return True
        if self._streak >= self.patience and self._steps >= self.min_steps:
            self.reason = "consistent"
            return True
        return False
