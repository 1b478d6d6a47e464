"""Weight densities of neuron pruning, and the unit keep ratios that reach given weight densities.

``granularity="neuron"`` prunes the same fraction ``s`` of output units in every non-last layer of
each chain (:func:`sparseode.prune.neuron_chains`): ``round(s * out_features)`` units of a layer go,
with its rows and the matching input columns of the next layer. A cascade written in weight keep
ratios (what a report's sparsity means) therefore needs unit keep ratios, and the weight density
of a unit fraction follows from the layer shapes alone.
"""
from __future__ import annotations

import math
from typing import Sequence

from torch import nn

from sparseode.prune.layers import FilterFn, neuron_chains, prunable_layers

__all__ = ["neuron_density", "neuron_schedule"]


def neuron_density(model: nn.Module, unit_keep: float, filter_fn: FilterFn | None = None) -> float:
    """Kept fraction of the prunable weights after neuron pruning keeps ``unit_keep`` of the units.

    Counted from the shapes of ``model``'s prunable ``nn.Linear`` layers as :func:`sparseode.prune.apply`
    masks them (``granularity="neuron"``, amount ``1 - unit_keep``), ignoring masks already set.
    """
    layers = prunable_layers(model, filter_fn)
    if not layers:
        raise ValueError("model has no prunable nn.Linear layers")
    s = 1.0 - unit_keep
    kept_rows = {id(m): m.out_features for m in layers.values()}
    kept_cols = {id(m): m.in_features for m in layers.values()}
    prunable = set(kept_rows)
    for chain in neuron_chains(model):
        for a, b in zip(chain[:-1], chain[1:]):
            if id(a) not in prunable:
                continue
            gone = round(s * a.out_features)
            kept_rows[id(a)] = a.out_features - gone
            if id(b) in prunable:
                kept_cols[id(b)] = b.in_features - gone
    total = sum(m.weight.numel() for m in layers.values())
    return sum(kept_rows[k] * kept_cols[k] for k in prunable) / total


def neuron_schedule(model: nn.Module, keeps: Sequence[float], filter_fn: FilterFn | None = None) -> list[float]:
    """Unit keep ratios for ``iterative(granularity="neuron", schedule=...)`` whose weight densities
    are nearest to the weight keep ratios ``keeps`` (non-increasing, in (0, 1]).

    Raises ``ValueError`` when two rounds would give the same units (the layers are too narrow for
    that step) or when the model has no neuron chains.
    """
    keeps = [float(k) for k in keeps]
    if not keeps or any(not math.isfinite(k) or not 0.0 < k <= 1.0 for k in keeps):
        raise ValueError(f"keeps must be weight keep ratios in (0, 1], got {keeps}")
    if any(b > a for a, b in zip(keeps, keeps[1:])):
        raise ValueError(f"keeps must be non-increasing, got {keeps}")
    widths = [a.out_features for chain in neuron_chains(model) for a in chain[:-1]]
    if not widths:
        raise ValueError("model has no neuron chains (consecutive linear layers) to prune units from")
    # every distinct unit count of the widest layer; narrower layers round the same fraction
    widest = max(widths)
    candidates = [(u / widest, neuron_density(model, u / widest, filter_fn)) for u in range(1, widest + 1)]
    out: list[float] = []
    for k in keeps:
        unit_keep, _ = min(candidates, key=lambda c: (abs(c[1] - k), -c[0]))
        if out and unit_keep >= out[-1]:
            raise ValueError(f"weight keep ratio {k:g} needs the same units as the round before "
                             f"(unit keep {out[-1]:g}): the layers are too narrow for that step")
        out.append(unit_keep)
    return out
