"""``sparsify`` and ``densify``: swap pruned ``nn.Linear`` layers for ``SparseLinear`` and back."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from sparseode.nn.autoformat import choose_format
from sparseode.nn.sparse_linear import SparseLinear, pruning_mask
from sparseode.ops.layout import FORMATS

SPARSIFY_FORMATS = ("auto",) + FORMATS


def _candidates(model: nn.Module, filter_fn: Callable[[str, nn.Module], bool] | None, max_density: float):
    """(parent, attribute, qualified name, linear, mask) for each layer to convert."""
    for parent_name, parent in model.named_modules():
        for attr, child in parent.named_children():
            if not isinstance(child, nn.Linear):
                continue
            name = f"{parent_name}.{attr}" if parent_name else attr
            if filter_fn is not None and not filter_fn(name, child):
                continue
            mask = pruning_mask(child)
            if mask is None:
                mask = child.weight.detach() != 0
                if mask.numel() and float(mask.float().mean()) > max_density:
                    continue
            yield parent, attr, name, child, mask


def sparsify(model: nn.Module, format: str = "auto", backend: str = "auto", block: tuple[int, int] = (16, 16),
             filter_fn: Callable[[str, nn.Module], bool] | None = None, max_density: float = 0.5,
             batch_hint: int = 1024) -> nn.Module:
    """Replace pruned ``nn.Linear`` layers of ``model`` by :class:`SparseLinear`, in place.

    A layer is converted when it carries a ``torch.nn.utils.prune`` mask (``weight_mask``), or when
    the share of nonzeros in its weight is at most ``max_density``; ``filter_fn(name, module)``
    can exclude layers. ``format="auto"`` times dense, CSR and BSR on the layer (batch
    ``batch_hint``) and keeps the layer as it is where sparse would be slower. Returns ``model``
    (or the new module when ``model`` itself is an ``nn.Linear``).
    """
    if format not in SPARSIFY_FORMATS:
        raise ValueError(f"format must be one of {', '.join(SPARSIFY_FORMATS)}; got {format!r}")
    if not 0.0 <= max_density <= 1.0:
        raise ValueError(f"max_density must lie in [0, 1], got {max_density}")
    if isinstance(model, nn.Linear):
        holder = nn.Sequential(model)
        sparsify(holder, format, backend, block, filter_fn, max_density, batch_hint)
        return holder[0]
    for parent, attr, _name, linear, mask in list(_candidates(model, filter_fn, max_density)):
        fmt = format
        if fmt == "auto":
            fmt = choose_format(linear.weight.detach(), mask, backend=backend, block=block, batch=batch_hint)
            if fmt == "dense":
                continue
        setattr(parent, attr, SparseLinear.from_dense(linear, mask, format=fmt, backend=backend, block=block))
    return model


def _to_linear(layer: SparseLinear) -> nn.Module:
    linear = layer.to_linear()
    if layer.from_pruned:
        # Restore torch.nn.utils.prune's parametrisation: weight_orig, weight_mask and the pre-hook.
        torch_prune.custom_from_mask(linear, "weight", layer.sparse.kept_mask())
    return linear


def densify(model: nn.Module) -> nn.Module:
    """Inverse of :func:`sparsify`: every ``SparseLinear`` becomes an ``nn.Linear`` with the same
    weight and bias (and its ``torch.nn.utils.prune`` mask back where it had one). In place;
    returns ``model`` (or the new module when ``model`` itself is a ``SparseLinear``)."""
    if isinstance(model, SparseLinear):
        return _to_linear(model)
    for parent in list(model.modules()):
        for attr, child in list(parent.named_children()):
            if isinstance(child, SparseLinear):
                setattr(parent, attr, _to_linear(child))
    return model
