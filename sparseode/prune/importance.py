"""Importance measures: one score per parameter entry, higher means keep.

Every measure is an entry of the registry :data:`MEASURES` (name → :class:`Measure`). All of them
return ``{logical parameter name: tensor of the parameter's shape}`` for every trainable
parameter of the model. The logical name of a pruned tensor is the name it had before pruning
(``"layers.0.weight"``, not ``"layers.0.weight_orig"``).

Notation, for a trainable parameter ``θ`` (for a pruned tensor, the effective ``θ = θ_orig ⊙ m``)
and the average loss over the first ``n_batches`` batches of ``data``,
``L(θ) = (1/B) Σ_b loss_fn(model, batch_b)``:

* ``g = ∂L/∂θ`` over all trainable parameters (for a pruned tensor the gradient reaching its
  trainable ``θ_orig``, i.e. ``m ⊙ ∂L/∂θ``: a pruned entry has ``θ = 0`` and scores 0 anyway),
* ``Hg = ∂(½‖g‖²)/∂θ`` (Hessian-gradient product by double backprop). It is computed as
  ``(1/B) Σ_b ∂(g_b · sg(g))/∂θ`` with ``g_b`` the gradient of batch ``b``'s loss and ``sg`` a
  stop-gradient: this equals ``H g`` of the average loss exactly.

=============  =========================  ==================================================
method         score                      meaning
=============  =========================  ==================================================
magnitude      ``|θ|``                    weight magnitude
snip           ``|θ ⊙ g|``                loss preservation (SNIP, Lee et al. 2019)
taylor         ``-θ ⊙ g``                 first-order change of L when the entry is removed
                                          (``θ → 0``): ``ΔL ≈ -θ⊙g``. High: removing it raises
                                          the loss (keep); negative: removing it lowers the
                                          loss, so it goes first
grasp          ``θ ⊙ Hg``                 the negative of GraSP's score ``-θ ⊙ Hg`` (Wang et
                                          al. 2020): removing the lowest importance removes
                                          exactly the weights GraSP removes (highest ``-θ⊙Hg``)
grasp_abs      ``|θ ⊙ Hg|``               gradient-norm preservation (the variant recommended
                                          by Lubana & Dick 2021 over GraSP)
lamp           ``θ_u² / Σ_{v: θ_v² ≥ θ_u²} θ_v²``
                                          layer-adaptive magnitude (LAMP, Lee et al. 2021):
                                          the sum runs over the entries of the same tensor at
                                          least as large; one global threshold then prunes
                                          every layer by its own distribution of magnitudes
                                          and never empties a layer
random         ``U(0, 1)``                baseline
=============  =========================  ==================================================

When the model is a neural ODE or CNF the loss is computed through the ODE solve (NLL for a
flow, cross-entropy for a classifier), so gradients and Hessian-gradient products are exact
derivatives of the solver's output (backpropagation through the solver, or the adjoint for the
first-order measures).
"""
from __future__ import annotations

import itertools
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn as nn

from sparseode.distributed import mean_over_ranks
from sparseode.losses import LossFn, resolve_loss
from sparseode.pruned import effective, logical_names
from sparseode.args import integer

__all__ = ["importance", "Measure", "MEASURES", "register_measure", "trainable_parameters", "batches_of",
           "lamp_scores"]


def trainable_parameters(model: nn.Module) -> list[tuple[str, str, nn.Parameter, torch.Tensor]]:
    """``(parameter name, logical name, leaf parameter, effective θ)`` for every trainable one."""
    lnames = logical_names(model)
    modules = dict(model.named_modules())
    out = []
    for pname, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lname = lnames[pname]
        if lname != pname:  # pruned: θ = θ_orig ⊙ mask
            mod_name, _, t = lname.rpartition(".")
            theta = effective(modules[mod_name], t).detach()
        else:
            theta = p.detach()
        out.append((pname, lname, p, theta))
    return out


def batches_of(data: Iterable[Any] | None, n_batches: int, caller: str) -> list[tuple]:
    """The first ``n_batches`` batches of ``data``, each as a tuple (a tensor is one batch)."""
    if data is None:
        raise ValueError(f"{caller} needs data (an iterable of batches), got data=None")
    n_batches = integer(n_batches, "n_batches", low=1)
    if isinstance(data, torch.Tensor):
        data = [data]
    out = []
    for b in itertools.islice(iter(data), n_batches):
        out.append(tuple(b) if isinstance(b, (tuple, list)) else (b,))
    if not out:
        raise ValueError("data yielded no batch")
    return out


def _loss(model: nn.Module, loss_fn: LossFn, batch: tuple) -> torch.Tensor:
    loss = loss_fn(model, batch)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ValueError(
            f"loss_fn must return a scalar tensor, got {type(loss).__name__}"
            + (f" of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else "")
        )
    if not loss.requires_grad:
        raise ValueError(
            "loss_fn(model, batch) does not depend on the model's trainable parameters "
            "(no autograd graph): was it computed under torch.no_grad()?"
        )
    return loss.reshape(())


def _grad(model, loss_fn, batches, params) -> list[torch.Tensor]:
    """g = ∂L/∂θ of the mean loss over ``batches``; zeros for parameters the loss does not use."""
    acc = [torch.zeros_like(p) for p in params]
    with torch.enable_grad():
        for batch in batches:
            loss = _loss(model, loss_fn, batch)
            gs = torch.autograd.grad(loss, params, allow_unused=True)
            for a, g in zip(acc, gs):
                if g is not None:
                    a.add_(g.detach())
    return mean_over_ranks(acc, len(batches))  # over every rank's batches under torchrun


_ERROR_NODES = {"Error", "DelayedError", "NotImplemented"}


def _error_node(tensors: Sequence[torch.Tensor]) -> str | None:
    """Name of an autograd node in the graph of ``tensors`` that raises or silently cuts the
    graph when differentiated (``once_differentiable`` functions, missing derivative formulas)."""
    seen: set[Any] = set()
    stack = [t.grad_fn for t in tensors if t is not None and t.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ in _ERROR_NODES:
            return type(node).__name__
        stack.extend(f for f, _ in node.next_functions)
    return None


def _hessian_grad(model, loss_fn, batches, params, method: str) -> list[torch.Tensor]:
    """Hg = ∂(½‖g‖²)/∂θ = H g for the mean loss over ``batches`` (double backprop)."""
    g = _grad(model, loss_fn, batches, params)
    acc = [torch.zeros_like(p) for p in params]
    with torch.enable_grad():
        for batch in batches:
            loss = _loss(model, loss_fn, batch)
            try:
                gb = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
            except RuntimeError as e:
                raise ValueError(
                    f"method={method!r} needs a second derivative of loss_fn with respect to the "
                    f"model's parameters, and the first backward with create_graph=True failed: {e}"
                ) from e
            terms = [(gbi * gi).sum() for gbi, gi in zip(gb, g) if gbi is not None and gbi.requires_grad]
            if not terms:
                raise ValueError(
                    f"method={method!r} needs a second derivative of loss_fn with respect to the "
                    "model's parameters, but the gradient does not depend on them (a model with no "
                    "second derivative: e.g. an adjoint solve, a once-differentiable function, "
                    "a gradient computed under no_grad, or a loss linear in the parameters)"
                )
            bad = _error_node(gb)
            if bad is not None:
                raise ValueError(
                    f"method={method!r} needs a second derivative of loss_fn with respect to the "
                    f"model's parameters, but the model's backward is not differentiable (autograd "
                    f"node {bad!r}, e.g. a function marked @once_differentiable)"
                )
            try:
                hg = torch.autograd.grad(sum(terms), params, allow_unused=True)
            except RuntimeError as e:
                raise ValueError(
                    f"method={method!r} needs a second derivative of loss_fn with respect to the "
                    f"model's parameters, and double backprop through the model failed: {e}"
                ) from e
            for a, h in zip(acc, hg):
                if h is not None:
                    a.add_(h.detach())
    return mean_over_ranks(acc, len(batches))  # over every rank's batches under torchrun


class Measure:
    """An importance measure: ``measure(model, loss_fn, batches, params, thetas) -> scores``.

    ``params`` are the trainable leaves, ``thetas`` the effective values (same order and shapes);
    ``needs_data`` says whether ``loss_fn``/``data`` are required.
    """

    name: str = ""
    needs_data: bool = True

    def __call__(
        self,
        model: nn.Module,
        loss_fn: LossFn | None,
        batches: list[tuple] | None,
        params: list[nn.Parameter],
        thetas: list[torch.Tensor],
        generator: torch.Generator | None = None,
    ) -> list[torch.Tensor]:
        raise NotImplementedError


class _Fn(Measure):
    def __init__(self, name: str, needs_data: bool, fn: Callable[..., list[torch.Tensor]]):
        self.name, self.needs_data, self._fn = name, needs_data, fn

    def __call__(self, model, loss_fn, batches, params, thetas, generator=None):
        return self._fn(model, loss_fn, batches, params, thetas, generator)


MEASURES: dict[str, Measure] = {}


def register_measure(measure: Measure) -> Measure:
    """Add an importance measure to the registry under ``measure.name``."""
    MEASURES[measure.name] = measure
    return measure


def _magnitude(model, loss_fn, batches, params, thetas, gen):
    return [t.abs() for t in thetas]


def lamp_scores(theta: torch.Tensor) -> torch.Tensor:
    """LAMP scores of one tensor (Lee et al. 2021), its shape and dtype: each entry's ``θ_u²``
    over the sum of ``θ_v²`` of the entries at least as large (itself included). The largest entry
    scores 1, so every layer keeps its best weight under one global threshold; equal magnitudes
    score alike; an all-zero tensor scores 0."""
    w2 = theta.detach().to(torch.float64).reshape(-1) ** 2
    ascending, order = torch.sort(w2)
    suffix = ascending.flip(0).cumsum(0).flip(0)  # Σ of the entries from this rank up
    first = torch.searchsorted(ascending, ascending, side="left")  # ties: from the first equal one
    ranked = ascending / suffix[first].clamp_min(torch.finfo(torch.float64).tiny)  # 0/0 -> 0
    out = torch.empty_like(w2)
    out[order] = ranked
    return out.reshape(theta.shape).to(theta.dtype)


def _lamp(model, loss_fn, batches, params, thetas, gen):
    return [lamp_scores(t) for t in thetas]


def _random(model, loss_fn, batches, params, thetas, gen):
    return [torch.rand(t.shape, generator=gen, dtype=torch.float64).to(t) for t in thetas]


def _snip(model, loss_fn, batches, params, thetas, gen):
    return [(t * g).abs() for t, g in zip(thetas, _grad(model, loss_fn, batches, params))]


def _taylor(model, loss_fn, batches, params, thetas, gen):
    # removing θ_i changes the loss by ΔL_i ≈ -θ_i g_i; keep the weights whose removal costs most
    return [-t * g for t, g in zip(thetas, _grad(model, loss_fn, batches, params))]


def _grasp(model, loss_fn, batches, params, thetas, gen):
    hg = _hessian_grad(model, loss_fn, batches, params, "grasp")
    return [t * h for t, h in zip(thetas, hg)]


def _grasp_abs(model, loss_fn, batches, params, thetas, gen):
    hg = _hessian_grad(model, loss_fn, batches, params, "grasp_abs")
    return [(t * h).abs() for t, h in zip(thetas, hg)]


for _m in (
    _Fn("magnitude", False, _magnitude),
    _Fn("snip", True, _snip),
    _Fn("taylor", True, _taylor),
    _Fn("grasp", True, _grasp),
    _Fn("grasp_abs", True, _grasp_abs),
    _Fn("lamp", False, _lamp),
    _Fn("random", False, _random),
):
    register_measure(_m)


def importance(
    model: nn.Module,
    method: str = "magnitude",
    loss_fn: LossFn | None = None,
    data: Iterable[Any] | None = None,
    n_batches: int = 8,
    *,
    seed: int | None = None,
) -> dict[str, torch.Tensor]:
    """Per-parameter importance scores (higher means keep; :func:`apply` removes the lowest).

    Args:
        model: any ``nn.Module`` (a ``sparseode.models`` neural ODE, CNF or classifier, or a
            plain MLP); may already be pruned (masks in the ``torch.nn.utils.prune`` layout).
        method: a key of :data:`MEASURES`: ``"magnitude"``, ``"snip"``, ``"taylor"``,
            ``"grasp"``, ``"grasp_abs"``, ``"lamp"``, ``"random"`` (formulas in the module
            docstring).
        loss_fn: ``loss_fn(model, batch) -> scalar`` (batch a tuple); default
            ``sparseode.losses.default_loss(model)`` (NLL for a CNF, cross-entropy for a
            classifier, through the ODE solve). Unused by data-free methods.
        data: iterable of batches (tuples of tensors); the first ``n_batches`` are used and the
            loss is their mean. Unused by data-free methods.
        n_batches: how many batches to average over.
        seed: seed of the generator for ``"random"`` (default: the global RNG).

    Returns:
        ``{logical name: scores}`` for every trainable parameter, each of the parameter's shape,
        dtype and device (weights of pruned layers under their pre-pruning name, e.g.
        ``"layers.0.weight"``).
    """
    if method not in MEASURES:
        raise ValueError(f"unknown method={method!r}; choose one of {sorted(MEASURES)}")
    measure = MEASURES[method]
    entries = trainable_parameters(model)
    if not entries:
        raise ValueError("model has no trainable parameter")
    params = [e[2] for e in entries]
    thetas = [e[3] for e in entries]
    batches = None
    if measure.needs_data:
        loss_fn = resolve_loss(model, loss_fn, f"importance(method={method!r})")
        batches = batches_of(data, n_batches, f"method={method!r}")
    gen = None
    if seed is not None:
        gen = torch.Generator().manual_seed(integer(seed, "seed"))
    scores = measure(model, loss_fn, batches, params, thetas, gen)
    return {e[1]: s.detach() for e, s in zip(entries, scores)}
