"""Shared pieces of the pytest-benchmark suite (bench/test_*.py): the quick switch, the
torch.sparse baseline layer and the checks every case runs before it is timed.

``SPARSEODE_BENCH_QUICK=1`` shrinks every case to tiny shapes (tests/test_bench_suite.py runs the
suite that way with ``--benchmark-disable``, so the cases cannot rot); timings at those shapes
mean nothing.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor, nn
from torch.nn.utils import prune as torch_prune

QUICK = os.environ.get("SPARSEODE_BENCH_QUICK", "") == "1"

#: ``torch.compile`` backend of the compiled variants; in quick mode ``aot_eager`` (the same graph
#: capture through the ops' fake kernels, without inductor's minute of C++ code generation).
COMPILE_BACKEND = "aot_eager" if QUICK else "inductor"


class TorchSparseLinear(nn.Module):
    """``y = x W^T + b`` with W a ``torch.sparse_csr`` parameter (torch.sparse.mm forward and
    backward): the baseline a user gets from torch alone.

    Shapes: ``x (..., in_features)`` float32 -> ``(..., out_features)``.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach()  # after torch_prune.remove: the masked weight
        self.weight = nn.Parameter(weight.to_sparse_csr())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, x.shape[-1])
        y = torch.sparse.mm(self.weight, flat.t()).t()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], y.shape[-1])


def pruned_layers(model: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, layer) of every ``nn.Linear`` that carries a prune mask."""
    return [(parent, attr, child) for parent in model.modules() for attr, child in parent.named_children()
            if isinstance(child, nn.Linear) and hasattr(child, "weight_mask")]


def masked_dense(pruned: nn.Module) -> nn.Module:
    """``pruned`` with every mask folded into a plain dense weight (``prune.remove``, in place):
    the same function as the masked model, at the cost of the dense one. (A pruned model cannot
    be deep-copied: its ``weight`` is computed, not a leaf; pass a freshly built one.)"""
    for _, _, layer in pruned_layers(pruned):
        torch_prune.remove(layer, "weight")
    return pruned


def torch_sparse(pruned: nn.Module) -> nn.Module:
    """``pruned`` with every pruned ``nn.Linear`` replaced by a :class:`TorchSparseLinear` (in place)."""
    for parent, attr, layer in pruned_layers(pruned):
        torch_prune.remove(layer, "weight")
        setattr(parent, attr, TorchSparseLinear(layer))
    return pruned


def assert_close(got: Tensor, want: Tensor, what: str) -> None:
    """The check every variant passes before it is timed (float32 tolerances)."""
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=lambda m: f"{what}: {m}")
