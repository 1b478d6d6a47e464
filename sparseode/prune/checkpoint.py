"""Copying pruned models and loading their checkpoints into unpruned ones."""
from __future__ import annotations

import copy
from typing import Mapping

import torch
import torch.nn as nn
import torch.nn.utils.prune as torch_prune

from sparseode import pruned

__all__ = ["clone", "load_pruned"]


def clone(model: nn.Module) -> nn.Module:
    """``copy.deepcopy`` that also works for pruned models.

    After a forward pass in grad mode the pre-hook leaves ``module.weight = weight_orig * mask``
    as a non-leaf tensor, which ``deepcopy`` refuses; it is recomputed before every call anyway,
    so it is replaced by a detached value first.
    """
    with torch.no_grad():
        for module in model.modules():
            for t in pruned.pruned_tensor_names(module):
                if pruned.is_pruned(module, t):
                    setattr(module, t, pruned.effective(module, t))
    return copy.deepcopy(model)


def load_pruned(model: nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool = True):
    """Load a state dict saved from a pruned model (``…_orig``/``…_mask`` keys) into ``model``.

    Installs the torch pruning layout on every tensor whose ``<name>_mask`` appears in
    ``state_dict`` and is not yet pruned in ``model``, then calls ``model.load_state_dict``.
    Tensors pruned in ``model`` but absent from ``state_dict`` are a key error (under ``strict``).
    """
    modules = dict(model.named_modules())
    for key in state_dict:
        if not key.endswith("_mask"):
            continue
        mod_name, _, t = key[: -len("_mask")].rpartition(".")
        module = modules.get(mod_name)
        if module is None or not hasattr(module, t):
            continue
        if not pruned.is_pruned(module, t):
            torch_prune.identity(module, t)
    return model.load_state_dict(state_dict, strict=strict)
