"""Retraining a round of :func:`sparseode.prune.iterative` on the sparsified model.

The cascade keeps the model in its masked form (``torch.nn.utils.prune``: ``weight_orig`` and
``weight_mask``): scoring, pruning, rewinding, checkpoints and evaluation all read it. A sparse
round wraps the user's ``fit`` (:class:`SparseRetrain`):

1. ``sparsify`` a copy with the round's pattern (a fixed per-layer plan, no timing, so every rank
   of a DDP job builds the same model): a pruned layer at density at most
   :data:`AUTO_MAX_DENSITY` (0.9; every pruned layer with ``sparse=True``) becomes CSR, the others
   stay masked ``nn.Linear`` layers, which the fused field op also runs;
2. ``fit`` trains that copy (an ``MLPVectorField`` becomes a ``SparseMLPField``: one fused op call
   per evaluation, forward-mode trace, hand-written backward);
3. the trained values are copied back into the masked model: kept entries of ``weight_orig``,
   biases and every other tensor; pruned entries of ``weight_orig`` keep the values they had (a
   sparse layer stores none), and every mask is checked unchanged.

Callbacks (``stop`` rules, the rewinding point, the user's) see the masked model: the ``model`` of
the state they get is brought up to date from the sparse copy when they first read it in a step.

Optimiser state: ``fit`` is called once per round and must build its optimiser (and learning-rate
schedule) from the model it is given, as :func:`sparseode.train.fit` does; so no optimiser state
(Adam moments, momentum) crosses a round in either form, and within a round the sparse copy's
optimiser holds the moments of exactly the kept entries. A masked round's moments of pruned entries
are zero (their gradient is zero), so both forms take the same steps on the kept weights; with
weight decay, AdamW also shrinks a masked round's pruned ``weight_orig`` entries, which nothing
reads. A ``fit`` that keeps one optimiser across calls cannot be used with sparse rounds.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from sparseode.pruned import kept_mask

__all__ = ["SPARSE_CHOICES", "AUTO_MAX_DENSITY", "check_sparse", "auto_sparse", "layer_plan", "copy_back",
           "SparseRetrain"]

SPARSE_CHOICES = (True, False, "auto")
#: ``sparse="auto"`` stores a pruned layer as CSR at or below this density (a mask of all ones and
#: nearly so stays a masked ``nn.Linear``). Measured on the demo's field (2 -> 64x3 tanh, batch 512,
#: exact trace, 1 thread, loaded 2-core machine, C++ backward of the fused op): one training step
#: alone is 0.95x (CSR against masked) at densities 0.8 and 0.5 and 1.4-2.0x at 0.2 and below, but a
#: whole round (its epoch's validation solves too, 4x faster sparse) is faster sparse from 0.8 down:
#: ``bench/cascade.py --sparse on`` ran every round of sparse_flows_12 sparse in 16.8 s against 48.9 s
#: masked, the 0.5 threshold's run 36.1 s against 62.9 s.
AUTO_MAX_DENSITY = 0.9
FitFn = Callable[..., Any]


def check_sparse(sparse: Any) -> bool | str:
    """``sparse`` checked: True, False or ``"auto"``."""
    if isinstance(sparse, bool) or (isinstance(sparse, str) and sparse == "auto"):
        return sparse
    raise ValueError(f"sparse must be True, False or 'auto', got {sparse!r}")


def auto_sparse(model: nn.Module) -> tuple[bool, str]:
    """Whether ``sparse="auto"`` retrains ``model`` sparse, and why (not): where the fused field op
    runs it, i.e. it holds an ``MLPVectorField`` with a fused activation, all on the CPU in
    float32/float64, and the C++ extension with the op is loaded."""
    from sparseode.models.vector_field import MLPVectorField
    from sparseode.nn import fused_field

    fields = [m for m in model.modules() if isinstance(m, MLPVectorField)]
    if not fields:
        return False, "the model holds no MLPVectorField (only fields run through the fused op)"
    ok, why = fused_field.op_available()
    if not ok:
        return False, why
    if any(f.activation not in fused_field.FUSED_ACTIVATIONS for f in fields):
        return False, "a field's activation has no fused kernel"
    params = list(model.parameters())
    if any(p.device.type != "cpu" or p.dtype not in (torch.float32, torch.float64) for p in params):
        return False, "the fused op runs float32/float64 on the CPU only"
    return True, "the fused field op runs the model's fields"


def layer_plan(model: nn.Module, max_density: float) -> dict[str, str]:
    """``sparsify(formats=)`` of a sparse round: a pruned layer (``weight_mask``) at density at most
    ``max_density`` -> ``"csr"``; every other layer sparsify would touch -> ``"dense"``."""
    from sparseode.nn.convert import plan_formats

    modules = dict(model.named_modules())
    plan = {}
    for name in plan_formats(model, format="csr", max_density=0.0):
        mask = kept_mask(modules[name])
        dense = mask is None or mask.numel() == 0 or float(mask.float().mean()) > max_density
        plan[name] = "dense" if dense else "csr"
    return plan


def copy_back(sparse_model: nn.Module, masked: nn.Module) -> None:
    """Copy the values ``sparse_model`` (a trained sparsified copy of ``masked``) computes with
    into ``masked``, in place: see the module doc. Raises RuntimeError when the two do not hold the
    same tensors or a mask differs (a sparse round never changes the pattern)."""
    from sparseode.nn.convert import densify

    src, dst = densify(sparse_model).state_dict(), masked.state_dict()
    if set(src) != set(dst):
        raise RuntimeError(f"sparse retraining: the densified model's tensors {sorted(set(src) ^ set(dst))} "
                           "do not match the masked model's")
    with torch.no_grad():
        for name, t in dst.items():
            s = src[name].to(t.device, t.dtype)
            if name.endswith("_mask"):
                if not torch.equal(s, t):
                    raise RuntimeError(f"sparse retraining changed the mask {name!r}")
            elif name.endswith("_orig") and name[:-5] + "_mask" in dst:
                t.copy_(torch.where(dst[name[:-5] + "_mask"].bool(), s, t))
            else:
                t.copy_(s)


class _MaskedState:
    """A callback's view of the fit state in a sparse round: every attribute of the state, with
    ``model`` the masked model, synchronised from the sparse copy on first access per step."""

    def __init__(self, state: Any, sync: Callable[[int], nn.Module]) -> None:
        self._state, self._sync = state, sync

    def __getattr__(self, name: str) -> Any:
        return getattr(self._state, name)

    @property
    def model(self) -> nn.Module:
        return self._sync(self._state.step)


class SparseRetrain:
    """``fit(model, callbacks=...)`` that trains a sparsified copy of the masked ``model`` and
    copies the result back (see the module doc). ``sparse``: True (every pruned layer CSR) or
    ``"auto"`` (layers at density <= :data:`AUTO_MAX_DENSITY`; a round with none trains the masked
    model itself). ``last_sparse`` says how the latest call trained."""

    def __init__(self, fit: FitFn, sparse: bool | str) -> None:
        self.fit, self.max_density = fit, 1.0 if sparse is True else AUTO_MAX_DENSITY
        self.last_sparse = False

    def __call__(self, model: nn.Module, callbacks: Sequence[Any] = (), **kwargs: Any) -> Any:
        from sparseode.nn.convert import sparsify

        plan = layer_plan(model, self.max_density)
        self.last_sparse = "csr" in plan.values()
        if not self.last_sparse:
            return self.fit(model, callbacks=list(callbacks), **kwargs)
        sparse_model = sparsify(model, format="csr", max_density=0.0, formats=plan)
        synced = [-1]

        def sync(step: int) -> nn.Module:
            if synced[0] != step:
                copy_back(sparse_model, model)
                synced[0] = step
            return model

        wrapped = [(lambda state, cb=cb: cb(_MaskedState(state, sync))) for cb in callbacks]
        result = self.fit(sparse_model, callbacks=wrapped, **kwargs)
        copy_back(sparse_model, model)
        return result
