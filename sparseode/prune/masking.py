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
reaches the effective weight.

How weight entries group into units is a granularity (:mod:`sparseode.prune.granularity`).
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.utils.prune as torch_prune

from sparseode import pruned
from sparseode.prune.args import block_shape, check_sparsity
from sparseode.prune.granularity import GRANULARITIES, Granularity
from sparseode.prune.importance import importance
from sparseode.prune.layers import FilterFn, neuron_chains, prunable_layers

__all__ = ["apply", "remove", "SCOPES"]

SCOPES = ("global", "layer")


def _set_mask(module: nn.Module, name: str, mask: torch.Tensor) -> None:
    """Compose ``mask`` into ``module.<name>``'s mask (installing the torch layout if needed)."""
    mask = mask.to(device=getattr(module, name).device)
    buf = pruned.mask(module, name)
    if buf is not None:
        buf.mul_(mask.to(buf.dtype))  # in place: every hook reads the buffer at call time
    else:
        torch_prune.custom_from_mask(module, name, mask)
    with torch.no_grad():
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


def apply(
    model: nn.Module,
    scores: Mapping[str, torch.Tensor] | str,
    sparsity: float,
    granularity: str = "weight",
    block: int | Sequence[int] = (16, 16),
    scope: str | None = None,
    filter_fn: FilterFn | None = None,
) -> nn.Module:
    """Prune the lowest-scoring units of ``model``'s linear layers to ``sparsity``; in place.

    Args:
        model: any ``nn.Module``; its ``nn.Linear`` weights (selected by ``filter_fn``) are pruned.
        scores: ``{"<layer>.weight": (out, in) tensor}`` (higher = keep), e.g. from
            :func:`sparseode.prune.importance`; a method name computes data-free scores
            (``"magnitude"``, ``"random"``).
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

    Masks compose: units already pruned (mask zero over the whole unit) are counted first and
    never revived, so pruning again only removes more, and a ``sparsity`` below the current one
    leaves the model as it is. Ties are broken by position (stable sort): deterministic.

    Returns:
        ``model``, with ``weight_orig``/``weight_mask``/pre-hook on every prunable layer.
    """
    gran, scope = _check_choice(granularity, scope)
    s = check_sparsity(sparsity)
    blk = block_shape(block)
    if isinstance(scores, str):
        scores = importance(model, scores)

    layers = prunable_layers(model, filter_fn)
    if not layers:
        raise ValueError("model has no prunable nn.Linear layer (after filter_fn)")
    for name, layer in layers.items():
        gran.check(name, layer.weight, blk)

    if granularity == "neuron":
        _apply_neuron(model, layers, scores, s, gran, blk)
        return model

    units = []  # (name, layer, unit scores, already pruned)
    for name, layer in layers.items():
        w = pruned.effective(layer)
        u, pr = gran.unit_scores(_layer_scores(scores, name, w), pruned.mask_or_ones(layer), blk)
        units.append((name, layer, u, pr))

    if scope == "global":
        all_s = torch.cat([u.to(torch.float64).cpu() for _, _, u, _ in units])
        all_p = torch.cat([p.cpu() for _, _, _, p in units])
        keep = _select_lowest(all_s, all_p, round(s * all_s.numel()))
        keeps = torch.split(keep, [u.numel() for _, _, u, _ in units])
    else:
        keeps = [_select_lowest(u.cpu(), p.cpu(), round(s * u.numel())) for _, _, u, p in units]

    for (name, layer, _, _), kp in zip(units, keeps):
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
