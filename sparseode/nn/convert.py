"""``sparsify`` and ``densify``: swap pruned ``nn.Linear`` layers for ``SparseLinear`` and back.

Vector fields of ``sparseode.models`` get more than a layer swap: a ``ConcatLinear`` becomes a
``FoldedConcatLinear`` (time column folded into the bias, no concatenation per step), a
``ConcatSquashLinear`` keeps its gates dense and sparsifies its main weight, and an
``MLPVectorField`` with sparse layers becomes a ``SparseMLPField`` that fuses bias and
activation into the kernels.
"""
from __future__ import annotations

import warnings
from typing import Callable

from torch import Tensor, nn
from torch.nn.utils import prune as torch_prune

from sparseode.models.vector_field import ConcatLinear, ConcatSquashLinear, MLPVectorField
from sparseode.nn.autoformat import choose_format
from sparseode.models.forward_mode import effective_weight
from sparseode.nn.field import FoldedConcatLinear, SparseMLPField
from sparseode.nn.sparse_linear import SparseLinear, pruning_mask
from sparseode.ops.layout import FORMATS

SPARSIFY_FORMATS = ("auto",) + FORMATS
FilterFn = Callable[[str, nn.Module], bool]


class _Converter:
    """The conversion settings of one ``sparsify`` call."""

    def __init__(self, format: str, backend: str, block: tuple[int, int], filter_fn: FilterFn | None,
                 max_density: float, batch_hint: int) -> None:
        self.format, self.backend, self.block = format, backend, block
        self.filter_fn, self.max_density, self.batch_hint = filter_fn, max_density, batch_hint

    def mask(self, name: str, linear: nn.Linear) -> Tensor | None:
        """The kept mask of ``linear`` when it should be converted, else None."""
        if self.filter_fn is not None and not self.filter_fn(name, linear):
            return None
        mask = pruning_mask(linear)
        if mask is None:
            mask = linear.weight.detach() != 0
            if mask.numel() and float(mask.float().mean()) > self.max_density:
                return None
        return mask

    def convert(self, linear: nn.Linear, mask: Tensor, name: str = "") -> SparseLinear | None:
        """``SparseLinear`` of ``linear`` in the chosen format, or None where dense is faster.
        A layer that ``block`` does not tile gets CSR instead of BSR, with a warning."""
        fmt = self.format
        bh, bw = self.block
        if fmt == "bsr" and (linear.out_features % bh or linear.in_features % bw):
            warnings.warn(f"block {self.block} does not tile layer {name or 'of shape'} "
                          f"({linear.out_features}, {linear.in_features}): storing it as CSR", stacklevel=4)
            fmt = "csr"
        if fmt == "auto":
            fmt = choose_format(effective_weight(linear).detach(), mask, backend=self.backend, block=self.block,
                                batch=self.batch_hint)
            if fmt == "dense":
                return None
        return SparseLinear.from_dense(linear, mask, format=fmt, backend=self.backend, block=self.block)


def _children(model: nn.Module):
    """(parent, attribute, qualified name, child) for every submodule, parents first."""
    for parent_name, parent in model.named_modules():
        for attr, child in list(parent.named_children()):
            yield parent, attr, f"{parent_name}.{attr}" if parent_name else attr, child


def _fold_concat_layers(model: nn.Module, conv: _Converter) -> None:
    for parent, attr, name, child in list(_children(model)):
        if not isinstance(child, ConcatLinear):
            continue
        if conv.mask(f"{name}.linear", child.linear) is None:
            continue
        # None where dense is faster: the layer (and its prune mask) stays as it is
        folded = FoldedConcatLinear.from_concat(child, lambda lin, m: conv.convert(lin, m, name))
        if folded is not None:
            setattr(parent, attr, folded)


def _convert_linears(model: nn.Module, conv: _Converter) -> None:
    for parent, attr, name, child in list(_children(model)):
        if not isinstance(child, nn.Linear):
            continue
        if isinstance(parent, ConcatSquashLinear) and attr != "linear":
            continue  # gates and hyper-biases see only t: they stay dense
        if isinstance(parent, ConcatLinear):
            continue  # handled (or deliberately left dense) by _fold_concat_layers
        mask = conv.mask(name, child)
        sparse = conv.convert(child, mask, name) if mask is not None else None
        if sparse is not None:
            setattr(parent, attr, sparse)


def _wrap_fields(model: nn.Module) -> None:
    for parent, attr, _name, child in list(_children(model)):
        if isinstance(child, MLPVectorField) and any(
                isinstance(m, (SparseLinear, FoldedConcatLinear)) for m in child.modules()):
            setattr(parent, attr, SparseMLPField(child))


def sparsify(model: nn.Module, format: str = "auto", backend: str = "auto", block: tuple[int, int] = (16, 16),
             filter_fn: FilterFn | None = None, max_density: float = 0.5, batch_hint: int = 1024) -> nn.Module:
    """Replace pruned ``nn.Linear`` layers of ``model`` by :class:`SparseLinear`, in place.

    A layer is converted when it carries a ``torch.nn.utils.prune`` mask (``weight_mask``), or when
    the share of nonzeros in its weight is at most ``max_density``; ``filter_fn(name, module)``
    can exclude layers. ``format="auto"`` times dense, CSR and BSR on the layer (batch
    ``batch_hint``) and keeps the layer as it is where sparse would be slower. Vector fields of
    ``sparseode.models`` are converted as described in this module's docstring. Returns ``model``
    (or the new module when ``model`` itself is an ``nn.Linear`` or ``MLPVectorField``).
    """
    if format not in SPARSIFY_FORMATS:
        raise ValueError(f"format must be one of {', '.join(SPARSIFY_FORMATS)}; got {format!r}")
    if not 0.0 <= max_density <= 1.0:
        raise ValueError(f"max_density must lie in [0, 1], got {max_density}")
    if isinstance(model, (nn.Linear, MLPVectorField)):
        holder = nn.ModuleList([model])
        sparsify(holder, format, backend, block, filter_fn, max_density, batch_hint)
        return holder[0]
    conv = _Converter(format, backend, block, filter_fn, max_density, batch_hint)
    _fold_concat_layers(model, conv)
    _convert_linears(model, conv)
    _wrap_fields(model)
    return model


def _to_linear(layer: SparseLinear) -> nn.Module:
    linear = layer.to_linear()
    if layer.from_pruned:
        # Restore torch.nn.utils.prune's parametrisation: weight_orig, weight_mask and the pre-hook.
        torch_prune.custom_from_mask(linear, "weight", layer.sparse.kept_mask())
    return linear


def _densify_module(module: nn.Module) -> nn.Module:
    if isinstance(module, SparseLinear):
        return _to_linear(module)
    if isinstance(module, FoldedConcatLinear):
        inner = module.inner
        concat = module.to_concat()
        if isinstance(inner, SparseLinear) and inner.from_pruned:
            mask = inner.sparse.kept_mask()
            full = nn.functional.pad(mask, (0, 1))
            full[:, -1] = module.time_mask
            torch_prune.custom_from_mask(concat.linear, "weight", full)
        return concat
    if isinstance(module, SparseMLPField):
        return module.to_dense()
    return module


def densify(model: nn.Module) -> nn.Module:
    """Inverse of :func:`sparsify`: every ``SparseLinear`` becomes an ``nn.Linear`` with the same
    weight and bias (and its ``torch.nn.utils.prune`` mask back where it had one), folded concat
    layers and sparse fields become ``ConcatLinear`` and ``MLPVectorField`` again. In place;
    returns ``model`` (or the new module when ``model`` itself is converted)."""
    top = _densify_module(model)
    if top is not model:
        return densify(top) if top is not None else top
    for parent, attr, _name, child in list(_children(model)):
        new = _densify_module(child)
        if new is not child:
            setattr(parent, attr, new)
            densify(new)
    return model
