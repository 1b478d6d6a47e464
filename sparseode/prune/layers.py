"""Which layers of a model are prunable, and how their neurons chain (for neuron pruning)."""
from __future__ import annotations

from typing import Callable

import torch.nn as nn

__all__ = ["FilterFn", "prunable_layers", "neuron_chains"]

FilterFn = Callable[[str, nn.Module], bool]


def prunable_layers(model: nn.Module, filter_fn: FilterFn | None = None) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` layers of ``model`` in registration order, optionally filtered.

    Args:
        filter_fn: ``filter_fn(name, module) -> bool``; a layer is prunable when it returns True.
            Default: every ``nn.Linear`` (no layer excluded).
    """
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and (filter_fn is None or filter_fn(name, module)):
            out[name] = module
    return out


def _main_linear(child: nn.Module) -> nn.Linear | None:
    """The one linear map a chain element applies to the state, or None if not a simple wrapper.

    ``nn.Linear`` itself; a wrapper (e.g. ``ConcatLinear``, ``ConcatSquashLinear``) whose linear
    descendants are exactly one with ``in_features > 1`` plus any number of time hyper-networks
    (``in_features == 1``).
    """
    if isinstance(child, nn.Linear):
        return child
    if isinstance(getattr(child, "linear", None), nn.Linear):  # ConcatLinear, ConcatSquashLinear
        return child.linear
    lins = [m for m in child.modules() if isinstance(m, nn.Linear)]
    mains = [m for m in lins if m.in_features > 1]
    if len(mains) == 1:
        return mains[0]
    return None


def neuron_chains(model: nn.Module) -> list[list[nn.Linear]]:
    """Chains of consecutive linear layers whose outputs feed the next layer's inputs.

    A module may define ``prune_chains() -> list[list[nn.Linear]]`` to declare its chains.
    Otherwise chains are read from every ``nn.Sequential`` / ``nn.ModuleList``: its children in
    order, each an ``nn.Linear`` or a wrapper around one main ``nn.Linear`` (see
    :func:`_main_linear`); activations and other parameter-free children are skipped, any other
    child (a sub-network) ends the chain. Layer ``B`` follows ``A`` only if
    ``B.in_features >= A.out_features``; ``A``'s outputs are ``B``'s input columns
    ``[0, A.out_features)`` (extra columns, such as a concatenated time, come last).
    """
    chains: list[list[nn.Linear]] = []
    claimed: set[int] = set()
    for module in model.modules():
        declared = getattr(module, "prune_chains", None)
        if callable(declared):
            for chain in declared():
                chain = [m for m in chain if id(m) not in claimed]
                claimed.update(id(m) for m in chain)
                if chain:
                    chains.append(list(chain))
    for module in model.modules():
        if not isinstance(module, (nn.Sequential, nn.ModuleList)):
            continue
        current: list[nn.Linear] = []
        for child in module.children():
            lin = _main_linear(child)
            if lin is None:
                if any(True for _ in child.parameters()):
                    if len(current) > 1:
                        chains.append(current)
                    current = []
                continue
            if id(lin) in claimed:
                if len(current) > 1:
                    chains.append(current)
                current = []
                continue
            if current and lin.in_features < current[-1].out_features:
                if len(current) > 1:
                    chains.append(current)
                current = []
            current.append(lin)
        if len(current) > 1:
            chains.append(current)
        for chain in chains:
            claimed.update(id(m) for m in chain)
    return chains

