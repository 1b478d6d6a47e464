"""Pruning masks: turn scores into masks (``apply``), and bake them in (``remove``).

Masks are stored exactly the way :mod:`torch.nn.utils.prune` stores them (read through
:mod:`sparseode.pruned`): the trainable tensor becomes ``<name>_orig`` (an ``nn.Parameter``), the
mask is the buffer ``<name>_mask`` (same shape and dtype, entries 0 or 1), and a forward pre-hook
recomputes ``module.<name> = <name>_orig * <name>_mask`` before every call. Models pruned by
``torch.nn.utils.prune`` (or anything that follows the same layout) are therefore understood
here, and models pruned here can be handled by ``torch.nn.utils.prune`` (e.g. ``prune.remove``).

Because the forward pass always multiplies by the mask, the gradient reaching ``weight_orig`` is
``mask ⊙ ∂L/∂weight``: pruned entries get exactly zero gradient, and whatever an optimiser does
to ``weight_orig`` at a pruned entry (AdamW's decoupled weight decay, stale momentum) never
reaches the effective weight. :func:`apply` zeroes ``weight_orig`` where it prunes (the value is
never used again: scores and masks read ``weight_orig ⊙ mask``), so a pruned entry stays zero
under a fresh optimiser; ``torch.nn.utils.prune`` itself keeps the old values there.

How weight entries group into units is a granularity (:mod:`sparseode.prune.granularity`).
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.utils.prune as torch_prune

from sparseode import pruned
from sparseode.args import block_shape, check_sparsity, fraction
from sparseode.prune.granularity import GRANULARITIES, Granularity
from sparseode.prune.importance import importance
from sparseode.prune.layers import FilterFn, neuron_chains, prunable_layers

__all__ = ["apply", "remove", "SCOPES"]

SCOPES = ("global", "layer")
MinDensity = Union[float, Mapping[str, float]]
KeepDense = Union[Sequence[str], FilterFn]


def _set_mask(module: nn.Module, name: str, mask: torch.Tensor) -> None:
    """Compose ``mask`` into ``module.<name>``'s mask (installing the torch layout if needed) and
    zero ``<name>_orig`` where the mask prunes: the model then holds nothing it does not compute
    with, so a sparse copy that stores only kept weights loses no value (``densify(sparsify(m))``
    equals ``m`` in every state-dict entry)."""
    mask = mask.to(device=getattr(module, name).device)
    buf = pruned.mask(module, name)
    if buf is not None:
        buf.mul_(mask.to(buf.dtype))  # in place: every hook reads the buffer at call time
    else:
        torch_prune.custom_from_mask(module, name, mask)
    with torch.no_grad():
        orig = getattr(module, name + "_orig")
        orig.mul_(pruned.mask(module, name).to(orig.dtype))
        # refresh the attribute now (the pre-hook refreshes it again before every call)
        setattr(module, name, pruned.effective(module, name))


def _select_lowest(scores: torch.Tensor, pruned_units: torch.Tensor, k: int) -> torch.Tensor:
    """Keep vector (bool) removing exactly ``max(k, #pruned)`` units: already-pruned ones first,
    then the lowest scores; ties broken by position (stable sort), so the result is deterministic.
    """
    s = scores.detach().to(torch.float64).clone()
    if torch.isnan(s).any():
        raise ValueError("scores contain NaN")
    s[pruned_units] = -math.inf
    k = max(k, int(pruned_units.sum()))
    order = torch.sort(s, stable=True).indices
    keep = torch.ones_like(pruned_units)
    keep[order[:k]] = False
    return keep


def _layer_scores(
    scores: Mapping[str, torch.Tensor], name: str, weight: torch.Tensor
) -> torch.Tensor:
    key = f"{name}.weight" if name else "weight"
    if key not in scores:
        raise KeyError(
            f"scores has no entry {key!r} for prunable layer {name!r}; scores must map every "
            f"prunable layer's weight name to a tensor of its shape (see so.prune.importance)"
        )
    s = scores[key]
    if tuple(s.shape) != tuple(weight.shape):
        raise ValueError(
            f"scores[{key!r}] has shape {tuple(s.shape)}, expected the weight's {tuple(weight.shape)}"
        )
    return s.detach().to(weight.device)


def _check_choice(granularity: str, scope: str | None) -> tuple[Granularity, str]:
    """The granularity object and the scope (default per granularity), both checked."""
    if granularity not in GRANULARITIES:
        raise ValueError(
            f"unknown granularity={granularity!r}; choose one of {sorted(GRANULARITIES)}"
        )
    if scope is None:
        scope = "layer" if granularity == "neuron" else "global"
    if scope not in SCOPES:
        raise ValueError(f"unknown scope={scope!r}; choose one of {list(SCOPES)}")
    if granularity == "neuron" and scope != "layer":
        raise ValueError(
            "scope='global' is not defined for granularity='neuron' (the same fraction of units "
            "is removed in every layer); use scope='layer' or leave scope=None"
        )
    return GRANULARITIES[granularity], scope


def _dense_names(layers: Mapping[str, nn.Module], keep_dense: KeepDense | None) -> set[str]:
    """Names of the prunable layers ``keep_dense`` selects (a list of names or a filter)."""
    if keep_dense is None:
        return set()
    if callable(keep_dense):
        return {n for n, m in layers.items() if keep_dense(n, m)}
    if isinstance(keep_dense, str):
        raise TypeError(f"keep_dense must be a list of layer names or a filter, got the string "
                        f"{keep_dense!r}; write [{keep_dense!r}] for one layer")
    names = set(keep_dense)
    unknown = sorted(names - set(layers))
    if unknown:
        raise ValueError(f"keep_dense names {unknown}, which are not prunable layers of the model "
                         f"(prunable, after filter_fn: {list(layers)})")
    return names


def _floors(
    layers: Mapping[str, nn.Module], min_density: MinDensity | None, dense: set[str]
) -> dict[str, float]:
    """The least share of its units every prunable layer keeps: ``min_density``, 1 if kept dense."""
    if isinstance(min_density, Mapping):
        unknown = sorted(set(min_density) - set(layers))
        if unknown:
            raise ValueError(f"min_density names {unknown}, which are not prunable layers of the "
                             f"model (prunable, after filter_fn: {list(layers)})")
        floors = dict.fromkeys(layers, 0.0)
        floors.update({n: fraction(d, f"min_density[{n!r}]") for n, d in min_density.items()})
    else:
        d = 0.0 if min_density is None else fraction(min_density, "min_density")
        floors = dict.fromkeys(layers, d)
    floors.update(dict.fromkeys(dense, 1.0))
    return floors


def _protect(u: torch.Tensor, pr: torch.Tensor, floor: float) -> tuple[torch.Tensor, int]:
    """Unit scores (float64, CPU) with the ``ceil(floor·U)`` best still-kept units set to +inf
    (never removed), and how many were protected (fewer when fewer are left: no unit revives)."""
    s = u.detach().to(torch.float64).cpu().clone()
    pr = pr.cpu()
    need = min(math.ceil(floor * s.numel() - 1e-9), int((~pr).sum()))
    if need > 0:
        # the units _select_lowest would remove last: highest scores, later position on ties
        order = torch.sort(torch.where(pr, -math.inf, s), stable=True).indices
        s[order[-need:]] = math.inf
    return s, need


def _keep_vectors(units: list[tuple], s: float, scope: str, floors: Mapping[str, float]) -> list[torch.Tensor]:
    """Per layer, which units stay (bool), for ``units = [(name, layer, scores, pruned)]``."""
    protected = [_protect(u, p, floors[name]) for name, _, u, p in units]
    pruned_units = [p.cpu() for _, _, _, p in units]
    if scope == "layer":
        return [_select_lowest(ps, p, min(round(s * ps.numel()), ps.numel() - need))
                for (ps, need), p in zip(protected, pruned_units)]
    total = sum(ps.numel() for ps, _ in protected)
    kept = sum(need for _, need in protected)
    k = round(s * total)
    if k > total - kept:
        raise ValueError(
            f"sparsity={s} removes {k} of {total} units, but min_density/keep_dense keep {kept} of "
            f"them: at most sparsity {(total - kept) / total:.4f} is reachable with these floors")
    keep = _select_lowest(torch.cat([ps for ps, _ in protected]), torch.cat(pruned_units), k)
    return list(torch.split(keep, [ps.numel() for ps, _ in protected]))


def apply(
    model: nn.Module,
    scores: Mapping[str, torch.Tensor] | str,
    sparsity: float,
    granularity: str = "weight",
    block: int | Sequence[int] = (16, 16),
    scope: str | None = None,
    filter_fn: FilterFn | None = None,
    *,
    min_density: MinDensity | None = None,
    keep_dense: KeepDense | None = None,
) -> nn.Module:
    """Prune the lowest-scoring units of ``model``'s linear layers to ``sparsity``; in place.

    Args:
        model: any ``nn.Module``; its ``nn.Linear`` weights (selected by ``filter_fn``) are pruned.
        scores: ``{"<layer>.weight": (out, in) tensor}`` (higher = keep), e.g. from
            :func:`sparseode.prune.importance`; a method name computes data-free scores
            (``"magnitude"``, ``"lamp"``, ``"random"``).
        sparsity: real number in ``[0, 1)``, the fraction of units removed: with
            ``scope="global"``, ``k = round(sparsity · U_total)`` units over all prunable layers
            (one threshold); with ``scope="layer"``, ``round(sparsity · U_layer)`` in every layer.
            For ``"neuron"``, the fraction of output units removed in every non-last layer of a
            chain.
        granularity: a key of :data:`GRANULARITIES` (``"weight"``, ``"neuron"``, ``"block"``).
        block: ``(rows, cols)`` (or an int) of the blocks, for ``granularity="block"``; must tile
            every prunable layer.
        scope: ``"global"`` or ``"layer"``; default ``"global"`` (``"layer"`` for ``"neuron"``,
            which only exists per layer).
        filter_fn: ``filter_fn(name, module) -> bool`` selects prunable layers (default: all).
        min_density: the least share of its units every layer keeps (a number in ``[0, 1]``), or
            ``{layer name: share}`` for some layers: each keeps its ``ceil(share · U_layer)``
            best-scoring units. With ``scope="global"`` the other layers give up more units so the
            total still reaches ``sparsity`` (``ValueError`` when the floors make that impossible);
            with ``scope="layer"`` a layer stops at its floor.
        keep_dense: layers not pruned (names, or a filter ``keep_dense(name, module) -> bool``):
            they get no mask, and count in the total of ``scope="global"`` (the other layers are
            pruned more so that all prunable layers together reach ``sparsity``).

    Masks compose: units already pruned (mask zero over the whole unit) are counted first and
    never revived, so pruning again only removes more, and a ``sparsity`` below the current one
    leaves the model as it is. Ties are broken by position (stable sort): deterministic.

    Returns:
        ``model``, with ``weight_orig``/``weight_mask``/pre-hook on every prunable layer not kept
        dense.
    """
    gran, scope = _check_choice(granularity, scope)
    s = check_sparsity(sparsity)
    blk = block_shape(block)
    layers = prunable_layers(model, filter_fn)
    if not layers:
        raise ValueError("model has no prunable nn.Linear layer (after filter_fn)")
    dense = _dense_names(layers, keep_dense)
    floors = _floors(layers, min_density, dense)
    for name, layer in layers.items():
        gran.check(name, layer.weight, blk)
    if isinstance(scores, str):
        scores = importance(model, scores)

    if granularity == "neuron" and (min_density is not None or keep_dense is not None):
        raise ValueError("min_density and keep_dense are not defined for granularity='neuron' "
                         "(its chains prune every layer alike); exclude layers with filter_fn")
    if granularity == "neuron":
        _apply_neuron(model, layers, scores, s, gran, blk)
        return model

    units = []  # (name, layer, unit scores, already pruned)
    for name, layer in layers.items():
        w = pruned.effective(layer)
        sc = torch.zeros_like(w) if name in dense else _layer_scores(scores, name, w)
        u, pr = gran.unit_scores(sc, pruned.mask_or_ones(layer), blk)
        units.append((name, layer, u, pr))

    for (name, layer, _, _), kp in zip(units, _keep_vectors(units, s, scope, floors)):
        if name in dense:
            continue  # nothing new is removed there, and an unpruned layer stays without a mask
        w = pruned.effective(layer)
        _set_mask(layer, "weight", gran.expand(kp, w.shape, blk).to(w.dtype))
    return model


def _apply_neuron(model, layers, scores, s, gran, blk) -> None:
    chains = neuron_chains(model)
    prunable_ids = {id(m) for m in layers.values()}
    names = {id(m): n for n, m in layers.items()}
    for chain in chains:
        for a, b in zip(chain[:-1], chain[1:]):
            if id(a) not in prunable_ids:
                continue
            w = pruned.effective(a)
            sc = _layer_scores(scores, names[id(a)], w)
            u, pr = gran.unit_scores(sc, pruned.mask_or_ones(a), blk)
            keep = _select_lowest(u.cpu(), pr.cpu(), round(s * u.numel()))
            _set_mask(a, "weight", gran.expand(keep, w.shape, blk).to(w.dtype))
            # carry into the next layer's input columns [0, out_a)
            wb = pruned.trainable(b)
            col = torch.ones(wb.shape, dtype=wb.dtype)
            col[:, : a.out_features] = keep[None, :].to(wb.dtype)
            _set_mask(b, "weight", col)
    # every other prunable layer gets an (identity) mask so that the layout is uniform
    for layer in layers.values():
        if not pruned.is_pruned(layer):
            _set_mask(layer, "weight", torch.ones_like(layer.weight))


def remove(model: nn.Module) -> nn.Module:
    """Bake every mask in ``model`` into its tensor (``weight = weight_orig * weight_mask``) and
    drop the reparametrisation (``torch.nn.utils.prune.remove`` on every pruned tensor); in place.
    Pruned entries stay exactly zero."""
    for module in model.modules():
        for t in pruned.pruned_tensor_names(module):
            torch_prune.remove(module, t)
    return model
