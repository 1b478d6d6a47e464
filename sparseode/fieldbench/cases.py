"""The models of one benchmark case: a pruned field (or stack of fields) in its three forms.

* ``dense``: ``MLPVectorField`` with the pruned weights baked in (the masked dense model, plain
  ``nn.Linear`` layers). Its CNF traces by autograd, as FFJORD does: baseline A (for the field
  forward, plain dense torch). It is also the reference every other form's values and gradients
  are checked against.
* ``ours_dense``: the same dense layers run through this product's fused field op (forward-mode
  trace, hand-written backward): baseline B, what the product's path gains without sparsity.
* ``sparse``: ``sparsify(format="csr")`` of the pruned field, through the fused op.

Only the hidden-to-hidden layers are pruned (magnitude, per layer, to ``density``); the d-wide
first and last layers and the concatsquash gates stay dense, as in a pruned FFJORD field.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from sparseode.benchmark import FIELDS, FieldSpec
from sparseode.models import CNF, MLPVectorField
from sparseode.nn import fused_field
from sparseode.nn.convert import sparsify
from sparseode.nn.field import SparseMLPField

#: The forms of a case, in the order they are timed; the first is the reference.
FORMS = ("dense", "ours_dense", "sparse")


def hidden_linears(field: nn.Module) -> list[nn.Linear]:
    """The hidden-to-hidden ``nn.Linear`` layers of an ``MLPVectorField`` (what is pruned)."""
    linears = [m for n, m in field.named_modules()
               if isinstance(m, nn.Linear) and not n.endswith(("gate", "hyper_bias"))]
    return linears[1:-1]


def field_macs(field: nn.Module) -> tuple[int, int]:
    """(dense, kept) multiply-adds per state of every linear map in ``field`` (gates included)."""
    dense = kept = 0
    for module in field.modules():
        if isinstance(module, nn.Linear):
            dense += module.weight.numel()
            kept += int(module.weight_mask.sum()) if hasattr(module, "weight_mask") else int(
                (module.weight != 0).sum())
    return dense, kept


@dataclass
class Case:
    """One (field, density): its three forms as lists of fields (one per stacked flow)."""

    spec: FieldSpec
    density: float
    dense: list[nn.Module]
    ours_dense: list[nn.Module]
    sparse: list[nn.Module]
    flop_ratio: float

    def fields(self, form: str) -> list[nn.Module]:
        return getattr(self, form)

    def cnf(self, form: str, steps: int) -> CNF:
        """The form's CNF: exact trace, fixed-step rk4 with ``steps`` steps per flow (NFE 4 x steps
        per flow, the same for every form); the dense form traces by autograd (FFJORD, A)."""
        trace = "autograd" if form == "dense" else "forward"
        return CNF(self.fields(form), trace="exact", method="rk4", options={"step_size": 1.0 / steps},
                   inference_trace=trace)


def build_case(spec: FieldSpec | str, density: float, seed: int = 0) -> Case:
    """The three forms of ``spec`` pruned to ``density`` (0 < density <= 1), same weights."""
    spec = FIELDS[spec] if isinstance(spec, str) else spec
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density!r}")
    dense, ours, sparse = [], [], []
    dense_macs = kept_macs = 0
    for k in range(spec.flows):
        torch.manual_seed(seed + k)
        field = MLPVectorField(spec.dim, spec.hidden, time=spec.time, activation="tanh")
        for layer in hidden_linears(field):
            torch_prune.l1_unstructured(layer, "weight", amount=1.0 - density)
        a, b = field_macs(field)
        dense_macs, kept_macs = dense_macs + a, kept_macs + b
        sparse.append(sparsify(field, format="csr", backend="cpu"))
        for layer in hidden_linears(field):
            torch_prune.remove(layer, "weight")
        dense.append(field)
        ours.append(SparseMLPField(copy.deepcopy(field)))
    for form, fields in (("ours_dense", ours), ("sparse", sparse)):
        for field in fields:
            why = fused_field.unsupported_reason(field)
            if why is not None:
                raise RuntimeError(f"the {form} form of {spec.name} would not run the fused field op: {why}")
    return Case(spec, density, dense, ours, sparse, dense_macs / max(kept_macs, 1))
