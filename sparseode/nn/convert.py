"""``sparsify`` and ``densify``: swap pruned ``nn.Linear`` layers for ``SparseLinear`` and back.

Both return a converted copy and leave their argument untouched; ``inplace=True`` converts the
argument itself (as ``torch.ao.quantization.convert`` does), for models too large to hold twice.

Vector fields of ``sparseode.models`` get more than a layer swap: a ``ConcatLinear`` becomes a
``FoldedConcatLinear`` (time column folded into the bias, no concatenation per step), a
``ConcatSquashLinear`` keeps its gates dense and sparsifies its main weight, and an
``MLPVectorField`` with sparse layers becomes a ``SparseMLPField`` that fuses bias and
activation into the kernels.

A layer is named by the qualified name of the ``nn.Linear`` that holds its weight in the dense
model (``"fields.0.layers.1.linear"`` for the ``ConcatLinear`` at ``fields.0.layers.1``): the
names ``filter_fn`` sees, the keys of :func:`plan_formats`' answer and of ``sparsify(formats=)``.
"""
from __future__ import annotations

import copy
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping

import torch
from torch import Tensor, nn
from torch.nn.utils import prune as torch_prune

from sparseode.args import block_shape
from sparseode.models.vector_field import ConcatLinear, ConcatSquashLinear, MLPVectorField
from sparseode.nn.autoformat import bsr_storage, choose_format, tiles
from sparseode.nn.field import SparseMLPField
from sparseode.nn.folded import FoldedConcatLinear
from sparseode.nn.sparse_linear import SparseLinear
from sparseode.ops.handlers import FORMATS
from sparseode.pruned import effective, kept_mask

SPARSIFY_FORMATS = ("auto",) + FORMATS
#: What a layer may become in a plan: a sparse format, or "dense" (left an ``nn.Linear``).
PLAN_FORMATS = ("dense",) + FORMATS
#: ``format="bsr"`` warns, and ``"auto"`` never picks BSR, when fewer stored entries are kept.
MIN_BSR_OCCUPANCY = 0.5
FilterFn = Callable[[str, nn.Module], bool]
_HERE = os.path.dirname(os.path.abspath(__file__))


def _caller_level() -> int:
    """``warnings.warn``'s stacklevel of the first caller outside this package folder (the user)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_HERE):
        frame, level = frame.f_back, level + 1
    return level


@dataclass(frozen=True)
class LayerSpec:
    """How one layer is stored: ``format`` (one of :data:`PLAN_FORMATS`), BSR ``block``, ``backend``."""

    format: str
    block: tuple[int, int] = (16, 16)
    backend: str = "auto"


@dataclass
class _Site:
    """A convertible layer: ``parent.attr`` is an ``nn.Linear`` or a ``ConcatLinear``; ``name``
    the qualified name of its weight's ``nn.Linear``; ``weight``/``mask`` (out, in) the part
    that would be stored sparse (without a ``ConcatLinear``'s time column)."""

    parent: nn.Module
    attr: str
    name: str
    layer: nn.Module
    weight: Tensor
    mask: Tensor


def _children(model: nn.Module) -> Iterator[tuple[nn.Module, str, str, nn.Module]]:
    """(parent, attribute, qualified name, child) for every submodule, parents first."""
    for parent_name, parent in model.named_modules():
        for attr, child in list(parent.named_children()):
            yield parent, attr, f"{parent_name}.{attr}" if parent_name else attr, child


def _candidates(model: nn.Module) -> Iterator[tuple[nn.Module, str, str, nn.Module, nn.Linear]]:
    """(parent, attr, weight name, layer, its nn.Linear) for every layer sparsify may convert."""
    for parent, attr, name, child in list(_children(model)):
        if isinstance(child, ConcatLinear):
            yield parent, attr, f"{name}.linear", child, child.linear
        elif isinstance(child, nn.Linear):
            if isinstance(parent, ConcatLinear):
                continue  # converted with its ConcatLinear
            if isinstance(parent, ConcatSquashLinear) and attr != "linear":
                continue  # gates and hyper-biases see only t: they stay dense
            yield parent, attr, name, child, child


class _Converter:
    """The conversion settings of one ``sparsify`` call; ``specs`` fix the layers they name."""

    def __init__(self, format: str, backend: str, block: tuple[int, int], filter_fn: FilterFn | None,
                 max_density: float, batch_hint: int, specs: Mapping[str, LayerSpec], only_specs: bool = False):
        self.format, self.backend, self.block = format, backend, block
        self.filter_fn, self.max_density, self.batch_hint = filter_fn, max_density, batch_hint
        self.specs, self.only_specs = specs, only_specs

    def sites(self, holder: nn.ModuleList) -> list[_Site]:
        """The layers to convert of the model in ``holder`` (a one-module list; read only)."""
        found, names = [], set()
        for parent, attr, held_name, layer, linear in _candidates(holder):
            name = held_name[2:] if held_name.startswith("0.") else ""  # the name within the model
            names.add(name)
            mask = kept_mask(linear)
            weight = effective(linear).detach()
            if self.only_specs and name not in self.specs:
                continue
            if name not in self.specs:
                if self.filter_fn is not None and not self.filter_fn(name, linear):
                    continue
                if mask is None and weight.numel() and float((weight != 0).float().mean()) > self.max_density:
                    continue
            mask = weight != 0 if mask is None else mask
            if isinstance(layer, ConcatLinear):  # the time column stays dense
                weight, mask = weight[:, :layer.in_features], mask[:, :layer.in_features]
            found.append(_Site(parent, attr, name, layer, weight, mask))
        unknown = sorted(set(self.specs) - names)
        if unknown:
            raise ValueError(f"formats names layers the model does not have: {unknown}; its layers are "
                             f"{sorted(names)}")
        return found

    def decide(self, site: _Site) -> LayerSpec:
        """The storage of ``site``: its spec, else ``format`` (timed per layer for "auto")."""
        spec = self.specs.get(site.name) or LayerSpec(self.format, self.block, self.backend)
        fmt, block = spec.format, spec.block
        if fmt == "bsr" and not tiles(site.weight.shape, block):
            warnings.warn(f"block {block} does not tile layer {site.name} of shape {tuple(site.weight.shape)}: "
                          "storing it as CSR", stacklevel=_caller_level())
            fmt = "csr"
        if fmt == "auto":
            fmt = choose_format(site.weight, site.mask, backend=spec.backend, block=block, batch=self.batch_hint,
                                min_bsr_occupancy=MIN_BSR_OCCUPANCY)
        if fmt == "bsr":
            stored, kept = bsr_storage(site.mask, block)
            if stored and kept < MIN_BSR_OCCUPANCY * stored:
                warnings.warn(f"format='bsr' on layer {site.name}: its {block[0]}x{block[1]} blocks are mostly "
                              f"empty, so BSR stores {stored} values for {kept} kept weights ({kept / stored:.0%} "
                              "of the stored entries); an unstructured mask runs better as format='csr' (or "
                              "'auto'), a block mask comes from prune.apply(..., granularity='block')",
                              stacklevel=_caller_level())
        return LayerSpec(fmt, block, spec.backend)

    @staticmethod
    def convert(site: _Site, spec: LayerSpec) -> nn.Module:
        """The sparse replacement of ``site`` stored as ``spec`` (not "dense")."""
        def sparse(linear: nn.Linear, mask: Tensor) -> SparseLinear:
            return SparseLinear.from_dense(linear, mask, format=spec.format, backend=spec.backend, block=spec.block)

        if not isinstance(site.layer, ConcatLinear):
            return sparse(site.layer, site.mask)
        folded = FoldedConcatLinear.from_concat(site.layer, sparse)
        # from_concat hands over an unpruned Linear of the state columns: remember the prune mask,
        # or densify would give back a plain weight that training revives
        folded.inner.from_pruned = kept_mask(site.layer.linear) is not None
        return folded


def _wrap_fields(model: nn.Module) -> None:
    for parent, attr, _name, child in list(_children(model)):
        if isinstance(child, MLPVectorField) and any(
                isinstance(m, (SparseLinear, FoldedConcatLinear)) for m in child.modules()):
            setattr(parent, attr, SparseMLPField(child))


def _copy(model: nn.Module) -> nn.Module:
    """``copy.deepcopy`` of ``model`` without touching it. A pruned layer that ran in grad mode
    holds ``weight = weight_orig * weight_mask`` as a non-leaf tensor, which deepcopy refuses; the
    copy gets a detached value instead (its pre-hook recomputes it before every call)."""
    memo: dict[int, object] = {}
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, Tensor) and value.grad_fn is not None:
                memo[id(value)] = value.detach().clone()
    return copy.deepcopy(model, memo)


def _top_level(model: nn.Module, convert: Callable[[nn.ModuleList], object]) -> nn.Module:
    """Run ``convert`` on a holder of ``model``, so ``model`` itself may be replaced too."""
    holder = nn.ModuleList([model])
    # building modules draws initial weights: keep the caller's random stream as it was
    with torch.random.fork_rng(devices=[]):
        convert(holder)
    return holder[0]


def _check_args(format: str, max_density: float, formats: Mapping[str, str] | None) -> None:
    if format not in SPARSIFY_FORMATS:
        raise ValueError(f"format must be one of {', '.join(SPARSIFY_FORMATS)}; got {format!r}")
    if isinstance(max_density, bool) or not isinstance(max_density, (int, float)) or not 0 <= max_density <= 1:
        raise ValueError(f"max_density must be a number in [0, 1], got {max_density!r}")
    for name, fmt in (formats or {}).items():
        if fmt not in PLAN_FORMATS:
            raise ValueError(f"formats[{name!r}] must be one of {', '.join(PLAN_FORMATS)}; got {fmt!r}")


def _converter(format, backend, block, filter_fn, max_density, batch_hint, formats) -> _Converter:
    _check_args(format, max_density, formats)
    block = block_shape(block)
    specs = {name: LayerSpec(fmt, block, backend) for name, fmt in (formats or {}).items()}
    return _Converter(format, backend, block, filter_fn, max_density, batch_hint, specs)


def _apply(holder: nn.ModuleList, conv: _Converter) -> None:
    """Convert the layers of the model in ``holder`` in place, as ``conv`` decides."""
    for site in conv.sites(holder):
        spec = conv.decide(site)
        if spec.format != "dense":
            setattr(site.parent, site.attr, conv.convert(site, spec))
    _wrap_fields(holder)


def sparsify(model: nn.Module, format: str = "auto", backend: str = "auto", block: tuple[int, int] = (16, 16),
             filter_fn: FilterFn | None = None, max_density: float = 0.5, batch_hint: int = 1024, *,
             formats: Mapping[str, str] | None = None, inplace: bool = False) -> nn.Module:
    """A copy of ``model`` with its pruned ``nn.Linear`` layers replaced by :class:`SparseLinear`.

    A layer is converted when it carries a ``torch.nn.utils.prune`` mask (``weight_mask``), or when
    the share of nonzeros in its weight is at most ``max_density``; ``filter_fn(name, module)``
    can exclude layers. ``format="auto"`` times dense, CSR and BSR on the layer (batch
    ``batch_hint``) and keeps the layer as it is where sparse would be slower; it never picks BSR
    for a mask whose blocks are mostly empty, and ``format="bsr"`` warns there. ``formats`` maps
    layer names (see the module docstring) to one of :data:`PLAN_FORMATS` and fixes those layers'
    format whatever ``format``, ``filter_fn`` and ``max_density`` say: pass
    :func:`plan_formats`' answer, computed once (say on rank 0 of a DDP job) and shared, to get
    the same model everywhere. Vector fields are converted as the module docstring says.

    ``model`` is left as it was unless ``inplace=True``. Returns the converted model (a new module
    also with ``inplace=True`` when ``model`` itself is an ``nn.Linear`` or an ``MLPVectorField``).
    """
    conv = _converter(format, backend, block, filter_fn, max_density, batch_hint, formats)
    return _top_level(model if inplace else _copy(model), lambda holder: _apply(holder, conv))


def sparsify_as(model: nn.Module, specs: Mapping[str, LayerSpec]) -> nn.Module:
    """Convert exactly the layers ``specs`` names, as it says, in place (``so.load`` rebuilds a
    saved sparse model this way). Returns the converted model."""
    for name, spec in specs.items():
        if spec.format not in PLAN_FORMATS:
            raise ValueError(f"layer {name!r}: format must be one of {', '.join(PLAN_FORMATS)}; got {spec.format!r}")
    conv = _Converter("auto", "auto", (16, 16), None, 1.0, 1024, dict(specs), only_specs=True)
    return _top_level(model, lambda holder: _apply(holder, conv))


def plan_formats(model: nn.Module, format: str = "auto", backend: str = "auto", block: tuple[int, int] = (16, 16),
                 filter_fn: FilterFn | None = None, max_density: float = 0.5,
                 batch_hint: int = 1024) -> dict[str, str]:
    """What :func:`sparsify` with these arguments would make of each layer it converts: layer
    name -> ``"dense"``, ``"masked"``, ``"csr"`` or ``"bsr"``. Leaves ``model`` as it is.

    ``format="auto"`` measures, so two processes may decide differently; ``sparsify(model,
    formats=plan_formats(model))`` on every process, with one process's plan, builds one model.
    """
    conv = _converter(format, backend, block, filter_fn, max_density, batch_hint, None)
    with torch.random.fork_rng(devices=[]):  # timing draws random inputs
        return {site.name: conv.decide(site).format for site in conv.sites(nn.ModuleList([model]))}


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


def _densify_children(model: nn.Module) -> None:
    """Densify ``model``'s submodules in place, children before parents: a sparse field's layers
    are unfolded (their masks restored) before the field itself becomes an ``MLPVectorField``."""
    for attr, child in list(model.named_children()):
        if not isinstance(child, (SparseLinear, FoldedConcatLinear)):  # converted whole
            _densify_children(child)
        new = _densify_module(child)
        if new is not child:
            setattr(model, attr, new)


def densify(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Inverse of :func:`sparsify`: every ``SparseLinear`` becomes an ``nn.Linear`` with the same
    weight and bias (and its ``torch.nn.utils.prune`` mask back where it had one), folded concat
    layers and sparse fields become ``ConcatLinear`` and ``MLPVectorField`` again.

    A sparse layer stores only the kept weights, so a restored ``weight_orig`` holds zeros where
    the mask prunes. For a model pruned by :mod:`sparseode.prune` that is what it held (``apply``
    and ``rewind_to`` leave zeros there): ``densify(sparsify(m))`` equals ``m`` in every
    state-dict key and value. A model pruned by ``torch.nn.utils.prune`` directly keeps the old
    values at pruned positions, which it never computes with; they come back as zeros (what
    ``torch.nn.utils.prune.remove`` would bake in), everything the model computes with, and every
    mask, exactly. So does a pruned entry an optimiser moved with momentum from before the pruning. ``model`` is left as it was unless
    ``inplace=True``; returns the dense model.
    """
    return _top_level(model if inplace else _copy(model), _densify_children)
