"""Granularities of pruning: how a layer's weight entries group into units that are kept or removed.

A registry (:data:`GRANULARITIES`, name → :class:`Granularity`):

* ``"weight"``: every weight entry is a unit (unstructured pruning).
* ``"block"``: the weight ``(out, in)`` is tiled by ``block = (br, bc)`` blocks (the BSR block
  of the sparse kernels); a block's score is the sum of its entries' scores.
* ``"neuron"``: the output units of every layer of a chain (consecutive linear layers of an MLP)
  except the chain's last layer; unit ``i``'s score is ``|Σ_j s_ij|`` (the ℓ1 norm of the unit's
  summed score: for non-negative measures the ℓ1 norm of its row of scores; for signed measures
  the group first-order estimate of Molchanov et al. 2019). The same fraction of units is removed
  in every layer and each removed unit's input column in the next layer is masked too, as in
  filter pruning of flows.
"""
from __future__ import annotations

import torch

__all__ = ["Granularity", "GRANULARITIES", "register_granularity"]


class Granularity:
    """How weights group into pruning units.

    ``unit_scores(score, mask) -> (scores (U,), pruned (U,) bool)`` reduces a layer's
    ``(out, in)`` score tensor to one score per unit and says which units are already fully
    pruned; ``expand(keep (U,) bool, shape) -> (out, in)`` turns a per-unit keep vector back into
    a weight mask.
    """

    name: str = ""

    def check(self, layer_name: str, weight: torch.Tensor, block: tuple[int, int]) -> None:
        pass

    def unit_scores(
        self, score: torch.Tensor, mask: torch.Tensor, block: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def expand(self, keep: torch.Tensor, shape: torch.Size, block: tuple[int, int]) -> torch.Tensor:
        raise NotImplementedError


class WeightGranularity(Granularity):
    """Unstructured: one unit per weight entry (``U = out·in``)."""

    name = "weight"

    def unit_scores(self, score, mask, block):
        return score.reshape(-1), mask.reshape(-1) == 0

    def expand(self, keep, shape, block):
        return keep.reshape(shape)


class BlockGranularity(Granularity):
    """Blocks ``(br, bc)`` tiling ``(out, in)``: ``U = (out/br)·(in/bc)``, score = block sum."""

    name = "block"

    def check(self, layer_name, weight, block):
        out_f, in_f = weight.shape
        br, bc = block
        if out_f % br or in_f % bc:
            raise ValueError(
                f"block={tuple(block)} does not tile layer {layer_name!r} with weight shape "
                f"{tuple(weight.shape)} (out={out_f} must be a multiple of {br}, in={in_f} a "
                f"multiple of {bc}); choose another block or exclude the layer with filter_fn"
            )

    @staticmethod
    def _blocks(t: torch.Tensor, block):
        out_f, in_f = t.shape
        br, bc = block
        return t.reshape(out_f // br, br, in_f // bc, bc).permute(0, 2, 1, 3)  # (R, C, br, bc)

    def unit_scores(self, score, mask, block):
        s = self._blocks(score, block).sum(dim=(-1, -2)).reshape(-1)
        pruned = (self._blocks(mask, block) == 0).all(dim=-1).all(dim=-1).reshape(-1)
        return s, pruned

    def expand(self, keep, shape, block):
        out_f, in_f = shape
        br, bc = block
        k = keep.reshape(out_f // br, in_f // bc)
        return k.repeat_interleave(br, 0).repeat_interleave(bc, 1)


class NeuronGranularity(Granularity):
    """Output units: ``U = out``, score ``|Σ_j s_ij|``; a unit is pruned when its row is zero."""

    name = "neuron"

    def unit_scores(self, score, mask, block):
        return score.sum(dim=1).abs(), (mask == 0).all(dim=1)

    def expand(self, keep, shape, block):
        return keep[:, None].expand(shape).clone()


GRANULARITIES: dict[str, Granularity] = {}


def register_granularity(g: Granularity) -> Granularity:
    """Add a granularity to the registry under ``g.name``."""
    GRANULARITIES[g.name] = g
    return g


for _g in (WeightGranularity(), BlockGranularity(), NeuronGranularity()):
    register_granularity(_g)
