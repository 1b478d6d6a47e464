"""How sparse a model is: pruned weight entries per prunable layer and in total."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch.nn as nn

from sparseode import pruned
from sparseode.prune.layers import FilterFn, prunable_layers

__all__ = ["LayerSparsity", "SparsityReport", "sparsity"]


@dataclass
class LayerSparsity:
    """Pruned entries of one layer's weight: ``pruned`` of ``numel``."""

    pruned: int
    numel: int

    @property
    def sparsity(self) -> float:
        return self.pruned / self.numel if self.numel else 0.0


@dataclass
class SparsityReport:
    """Per-layer and total sparsity (fraction of weight entries whose mask is zero).

    ``float(report)`` is the total; ``str(report)`` a table.
    """

    layers: dict[str, LayerSparsity] = field(default_factory=dict)

    @property
    def pruned(self) -> int:
        return sum(l.pruned for l in self.layers.values())

    @property
    def numel(self) -> int:
        return sum(l.numel for l in self.layers.values())

    @property
    def total(self) -> float:
        return self.pruned / self.numel if self.numel else 0.0

    def __float__(self) -> float:
        return self.total

    def __getitem__(self, name: str) -> float:
        return self.layers[name].sparsity

    def __iter__(self) -> Iterator[str]:
        return iter(self.layers)

    def __str__(self) -> str:
        w = max([len(n) for n in self.layers] + [5])
        lines = [f"{'layer':<{w}}  {'pruned':>8}  {'numel':>8}  sparsity"]
        for n, l in self.layers.items():
            lines.append(f"{n:<{w}}  {l.pruned:>8}  {l.numel:>8}  {l.sparsity:8.4f}")
        lines.append(f"{'total':<{w}}  {self.pruned:>8}  {self.numel:>8}  {self.total:8.4f}")
        return "\n".join(lines)


def sparsity(model: nn.Module, filter_fn: FilterFn | None = None) -> SparsityReport:
    """Sparsity of every ``nn.Linear`` weight of ``model`` (selected by ``filter_fn``) and in total.

    A weight entry counts as pruned when its mask is zero (when no mask is installed, when it is
    exactly zero, so a model whose masks were baked in by :func:`remove` reports the same).
    """
    rep = SparsityReport()
    for name, layer in prunable_layers(model, filter_fn).items():
        mask = pruned.mask(layer)
        zero = (mask == 0) if mask is not None else (layer.weight == 0)
        rep.layers[name] = LayerSparsity(int(zero.sum()), zero.numel())
    return rep
