"""Pruning masks: apply, compose, report and remove them.

Masks are stored exactly the way :mod:`torch.nn.utils.prune` stores them: the trainable
tensor becomes ``<name>_orig`` (an ``nn.Parameter``), the mask is the buffer ``<name>_mask``
(same shape and dtype, entries 0 or 1), and a forward pre-hook recomputes
``module.<name> = <name>_orig * <name>_mask`` before every call. Models pruned by
``torch.nn.utils.prune`` (or anything that follows the same layout) are therefore understood
here, and models pruned here can be handled by ``torch.nn.utils.prune`` (e.g. ``prune.remove``).

Because the forward pass always multiplies by the mask, the gradient reaching ``weight_orig`` is
``mask ⊙ ∂L/∂weight``: pruned entries get exactly zero gradient, and whatever an optimiser does
to ``weight_orig`` at a pruned entry (AdamW's decoupled weight decay, stale momentum) never
reaches the effective weight.

Granularities are a registry (:data:`GRANULARITIES`, name → :class:`Granularity`):

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

import math
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.utils.prune as torch_prune

__all__ = [
    "apply",
    "remove",
    "sparsity",
    "masks",
    "prunable_layers",
    "neuron_chains",
    "load_pruned",
    "clone",
    "SparsityReport",
    "LayerSparsity",
    "Granularity",
    "GRANULARITIES",
    "register_granularity",
]

FilterFn = Callable[[str, nn.Module], bool]


# ----------------------------------------------------------------------------------------------
# Reading the torch.nn.utils.prune layout
# ----------------------------------------------------------------------------------------------
def pruned_tensor_names(module: nn.Module) -> list[str]:
    """Names of the tensors of ``module`` (not of its children) under a pruning hook."""
    names = []
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, torch_prune.BasePruningMethod):
            names.append(hook._tensor_name)
    return names


def is_pruned(module: nn.Module, name: str = "weight") -> bool:
    """True when ``module.<name>`` is reparametrised as ``<name>_orig * <name>_mask``."""
    return name in pruned_tensor_names(module) and hasattr(module, name + "_mask")


def effective(module: nn.Module, name: str = "weight") -> torch.Tensor:
    """The tensor the module computes with: ``orig * mask`` if pruned, else the parameter.

    Computed afresh (``module.<name>`` itself is only refreshed by the pre-hook at the next call).
    """
    if is_pruned(module, name):
        return getattr(module, name + "_orig") * getattr(module, name + "_mask")
    return getattr(module, name)


def trainable_tensor(module: nn.Module, name: str = "weight") -> nn.Parameter:
    """The leaf parameter an optimiser updates: ``<name>_orig`` if pruned, else ``<name>``."""
    if is_pruned(module, name):
        return getattr(module, name + "_orig")
    return getattr(module, name)


def get_mask(module: nn.Module, name: str = "weight") -> torch.Tensor:
    """The mask of ``module.<name>`` (all ones when not pruned), shape of the tensor."""
    if is_pruned(module, name):
        return getattr(module, name + "_mask")
    return torch.ones_like(getattr(module, name))


def logical_names(model: nn.Module) -> dict[str, str]:
    """Map every parameter name of ``model`` to its logical name (``…weight_orig`` → ``…weight``)."""
    out: dict[str, str] = {}
    for mod_name, module in model.named_modules():
        pruned = set(pruned_tensor_names(module))
        for p_name, _ in module.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if p_name.endswith("_orig") and p_name[: -len("_orig")] in pruned:
                lname = p_name[: -len("_orig")]
                out[full] = f"{mod_name}.{lname}" if mod_name else lname
            else:
                out[full] = full
    return out


def _set_mask(module: nn.Module, name: str, mask: torch.Tensor) -> None:
    """Compose ``mask`` into ``module.<name>``'s mask (installing the torch layout if needed)."""
    mask = mask.to(device=getattr(module, name).device)
    if is_pruned(module, name):
        buf = getattr(module, name + "_mask")
        buf.mul_(mask.to(buf.dtype))  # in place: every hook reads the buffer at call time
    else:
        torch_prune.custom_from_mask(module, name, mask)
    with torch.no_grad():
        # refresh the attribute now (the pre-hook refreshes it again before every call)
        orig = getattr(module, name + "_orig")
        setattr(module, name, orig * getattr(module, name + "_mask"))


def masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """All masks in ``model``: logical tensor name (``"layers.0.weight"``) → mask buffer."""
    out = {}
    for mod_name, module in model.named_modules():
        for t in pruned_tensor_names(module):
            if hasattr(module, t + "_mask"):
                out[f"{mod_name}.{t}" if mod_name else t] = getattr(module, t + "_mask")
    return out


# ----------------------------------------------------------------------------------------------
# Which layers are prunable, and how neurons chain
# ----------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------
# Granularities
# ----------------------------------------------------------------------------------------------
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


SCOPES = ("global", "layer")


# ----------------------------------------------------------------------------------------------
# apply
# ----------------------------------------------------------------------------------------------
def _check_sparsity(sparsity: float, arg: str = "sparsity") -> float:
    try:
        s = float(sparsity)
    except (TypeError, ValueError):
        raise TypeError(f"{arg} must be a number in [0, 1), got {sparsity!r}") from None
    if not (0.0 <= s < 1.0) or math.isnan(s):
        raise ValueError(f"{arg} must lie in [0, 1), got {sparsity!r}")
    return s


def _check_block(block: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(block, int):
        block = (block, block)
    try:
        br, bc = (int(b) for b in block)
    except (TypeError, ValueError):
        raise ValueError(f"block must be an int or a pair (rows, cols), got {block!r}") from None
    if br < 1 or bc < 1:
        raise ValueError(f"block must be positive, got {tuple(block)!r}")
    return br, bc


def _select_lowest(scores: torch.Tensor, pruned: torch.Tensor, k: int) -> torch.Tensor:
    """Keep vector (bool) removing exactly ``max(k, #pruned)`` units: already-pruned ones first,
    then the lowest scores; ties broken by position (stable sort), so the result is deterministic.
    """
    s = scores.detach().to(torch.float64).clone()
    if torch.isnan(s).any():
        raise ValueError("scores contain NaN")
    s[pruned] = -math.inf
    k = max(k, int(pruned.sum()))
    order = torch.sort(s, stable=True).indices
    keep = torch.ones_like(pruned)
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
        sparsity: fraction in ``[0, 1)`` of units removed: with ``scope="global"``,
            ``k = round(sparsity · U_total)`` units over all prunable layers (one threshold);
            with ``scope="layer"``, ``round(sparsity · U_layer)`` in every layer. For
            ``"neuron"``, the fraction of output units removed in every non-last layer of a chain.
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
    if granularity not in GRANULARITIES:
        raise ValueError(
            f"unknown granularity={granularity!r}; choose one of {sorted(GRANULARITIES)}"
        )
    gran = GRANULARITIES[granularity]
    if scope is None:
        scope = "layer" if granularity == "neuron" else "global"
    if scope not in SCOPES:
        raise ValueError(f"unknown scope={scope!r}; choose one of {list(SCOPES)}")
    if granularity == "neuron" and scope != "layer":
        raise ValueError(
            "scope='global' is not defined for granularity='neuron' (the same fraction of units "
            "is removed in every layer); use scope='layer' or leave scope=None"
        )
    s = _check_sparsity(sparsity)
    blk = _check_block(block)
    if isinstance(scores, str):
        from sparseode.prune.importance import importance

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
        w = effective(layer)
        sc = _layer_scores(scores, name, w)
        u, pr = gran.unit_scores(sc, get_mask(layer), blk)
        units.append((name, layer, u, pr))

    if scope == "global":
        all_s = torch.cat([u.to(torch.float64).cpu() for _, _, u, _ in units])
        all_p = torch.cat([p.cpu() for _, _, _, p in units])
        keep = _select_lowest(all_s, all_p, round(s * all_s.numel()))
        keeps = torch.split(keep, [u.numel() for _, _, u, _ in units])
    else:
        keeps = [_select_lowest(u.cpu(), p.cpu(), round(s * u.numel())) for _, _, u, p in units]

    for (name, layer, _, _), kp in zip(units, keeps):
        w = effective(layer)
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
            w = effective(a)
            sc = _layer_scores(scores, names[id(a)], w)
            u, pr = gran.unit_scores(sc, get_mask(a), blk)
            keep = _select_lowest(u.cpu(), pr.cpu(), round(s * u.numel()))
            _set_mask(a, "weight", gran.expand(keep, w.shape, blk).to(w.dtype))
            # carry into the next layer's input columns [0, out_a)
            wb = b.weight if not is_pruned(b) else getattr(b, "weight_orig")
            col = torch.ones(wb.shape, dtype=wb.dtype)
            col[:, : a.out_features] = keep[None, :].to(wb.dtype)
            _set_mask(b, "weight", col)
    # every other prunable layer gets an (identity) mask so that the layout is uniform
    for layer in layers.values():
        if not is_pruned(layer):
            _set_mask(layer, "weight", torch.ones_like(layer.weight))


# ----------------------------------------------------------------------------------------------
# remove, sparsity report, loading pruned checkpoints
# ----------------------------------------------------------------------------------------------
def remove(model: nn.Module) -> nn.Module:
    """Bake every mask in ``model`` into its tensor (``weight = weight_orig * weight_mask``) and
    drop the reparametrisation (``torch.nn.utils.prune.remove`` on every pruned tensor); in place.
    Pruned entries stay exactly zero."""
    for module in model.modules():
        for t in pruned_tensor_names(module):
            torch_prune.remove(module, t)
    return model


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
        if is_pruned(layer):
            n = int((get_mask(layer) == 0).sum())
        else:
            n = int((layer.weight == 0).sum())
        rep.layers[name] = LayerSparsity(n, get_mask(layer).numel())
    return rep


def clone(model: nn.Module) -> nn.Module:
    """``copy.deepcopy`` that also works for pruned models.

    After a forward pass in grad mode the pre-hook leaves ``module.weight = weight_orig * mask``
    as a non-leaf tensor, which ``deepcopy`` refuses; it is recomputed before every call anyway,
    so it is replaced by a detached value first.
    """
    import copy

    with torch.no_grad():
        for module in model.modules():
            for t in pruned_tensor_names(module):
                if hasattr(module, t + "_orig") and hasattr(module, t + "_mask"):
                    setattr(module, t, getattr(module, t + "_orig") * getattr(module, t + "_mask"))
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
        if not is_pruned(module, t):
            torch_prune.identity(module, t)
    return model.load_state_dict(state_dict, strict=strict)
