"""Reading the ``torch.nn.utils.prune`` layout: the one place models, nn and prune ask it.

A tensor ``module.<name>`` pruned by ``torch.nn.utils.prune`` (or by :mod:`sparseode.prune`,
which uses the same layout) is reparametrised: the trainable tensor is the parameter
``<name>_orig``, the mask is the buffer ``<name>_mask`` (same shape and dtype, entries 0 or 1),
and a forward pre-hook (a ``BasePruningMethod``) sets ``module.<name> = <name>_orig * <name>_mask``
before every call. ``module.<name>`` is therefore stale between an update of ``<name>_orig`` and
the next call; :func:`effective` computes the product afresh.

This module imports only torch, so every layer of the package may use it.
"""
from __future__ import annotations

import torch
import torch.nn.utils.prune as torch_prune
from torch import Tensor, nn

__all__ = [
    "pruned_tensor_names",
    "is_pruned",
    "mask",
    "kept_mask",
    "mask_or_ones",
    "effective",
    "trainable",
    "logical_names",
    "masks",
]


def pruned_tensor_names(module: nn.Module) -> list[str]:
    """Names of the tensors of ``module`` itself (not of its children) under a pruning hook."""
    return [
        hook._tensor_name
        for hook in module._forward_pre_hooks.values()
        if isinstance(hook, torch_prune.BasePruningMethod)
    ]


def is_pruned(module: nn.Module, name: str = "weight") -> bool:
    """True when ``module.<name>`` is reparametrised as ``<name>_orig * <name>_mask``."""
    return (
        name in pruned_tensor_names(module)
        and hasattr(module, name + "_orig")
        and hasattr(module, name + "_mask")
    )


def mask(module: nn.Module, name: str = "weight") -> Tensor | None:
    """The mask buffer ``<name>_mask`` (the tensor's shape and dtype, 0/1), or None if unpruned.

    The buffer itself, not a copy: writing into it changes what the module computes with.
    """
    return getattr(module, name + "_mask") if is_pruned(module, name) else None


def kept_mask(module: nn.Module, name: str = "weight") -> Tensor | None:
    """Which entries of ``module.<name>`` are kept, as a new bool tensor, or None if unpruned."""
    m = mask(module, name)
    return None if m is None else m.bool()


def mask_or_ones(module: nn.Module, name: str = "weight") -> Tensor:
    """The mask buffer of ``module.<name>``, or all ones of the tensor's shape and dtype if unpruned."""
    m = mask(module, name)
    return m if m is not None else torch.ones_like(getattr(module, name))


def effective(module: nn.Module, name: str = "weight") -> Tensor:
    """The tensor the module computes with: ``<name>_orig * <name>_mask`` if pruned, else
    ``module.<name>``. Computed afresh and differentiable with respect to ``<name>_orig``."""
    if is_pruned(module, name):
        return getattr(module, name + "_orig") * getattr(module, name + "_mask")
    return getattr(module, name)


def trainable(module: nn.Module, name: str = "weight") -> nn.Parameter:
    """The leaf parameter an optimiser updates: ``<name>_orig`` if pruned, else ``<name>``."""
    return getattr(module, name + "_orig") if is_pruned(module, name) else getattr(module, name)


def logical_names(model: nn.Module) -> dict[str, str]:
    """Every parameter name of ``model`` → its logical name (``"0.weight_orig"`` → ``"0.weight"``)."""
    out: dict[str, str] = {}
    for mod_name, module in model.named_modules():
        pruned = {t for t in pruned_tensor_names(module) if is_pruned(module, t)}
        for p_name, _ in module.named_parameters(recurse=False):
            logical = p_name[: -len("_orig")] if p_name.endswith("_orig") else p_name
            if logical not in pruned:
                logical = p_name
            out[f"{mod_name}.{p_name}" if mod_name else p_name] = (
                f"{mod_name}.{logical}" if mod_name else logical
            )
    return out


def masks(model: nn.Module) -> dict[str, Tensor]:
    """Every mask in ``model``: logical tensor name (``"layers.0.weight"``) → its mask buffer."""
    out = {}
    for mod_name, module in model.named_modules():
        for t in pruned_tensor_names(module):
            if is_pruned(module, t):
                out[f"{mod_name}.{t}" if mod_name else t] = getattr(module, t + "_mask")
    return out

