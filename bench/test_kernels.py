"""CPU kernel cases: ``y = x W^T + b`` of a pruned 256x256 layer at batch 1024, float32, no grad.

Variants of each case (one benchmark group): ``dense`` (``F.linear`` with the masked weight),
``torch.sparse`` (CSR, ``torch.sparse.mm``) and ``sparseode`` (``SparseLinear`` on the C++ CPU
kernels: CSR for unstructured masks, BSR for 16x16 blocks). Same cases as the target rows of
bench/cpu_kernels.py, whose masks this reuses.
"""
from __future__ import annotations

import functools
from typing import Callable

import pytest
import torch
from torch.nn import functional as F

from cpu_kernels import make_case
from suite import QUICK, assert_close

# (batch, hidden, density, structure)
CASES = [(33, 32, 0.1, "unstructured"), (33, 32, 0.1, "block16")] if QUICK else [
    (1024, 256, 0.1, "unstructured"), (1024, 256, 0.02, "unstructured"),
    (1024, 256, 0.1, "block16"), (1024, 256, 0.02, "block16"),
]
VARIANTS = ("dense", "torch.sparse", "sparseode")


def case_name(case: tuple) -> str:
    batch, hidden, density, structure = case
    return f"linear b{batch} h{hidden} d{density:.2f} {structure}"


@functools.lru_cache(maxsize=None)
def problem(case: tuple) -> tuple[dict[str, Callable[[], torch.Tensor]], torch.Tensor]:
    """({variant: forward closure}, the dense product) of one case; built once for its variants."""
    w, b, x, layer, w_csr = make_case(*case, torch.Generator().manual_seed(0))
    closures = {
        "dense": lambda: F.linear(x, w, b),
        "torch.sparse": lambda: torch.sparse.mm(w_csr, x.t()).t() + b,
        "sparseode": lambda: layer(x),
    }
    return closures, F.linear(x, w, b)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", CASES, ids=case_name)
def test_linear_forward(benchmark, case, variant):
    closures, want = problem(case)
    fn = closures[variant]
    with torch.no_grad():
        assert_close(fn(), want, f"{variant} at {case_name(case)}")
        benchmark.group = case_name(case)
        benchmark.extra_info["variant"] = variant
        benchmark(fn)
