"""``torch.compile`` of a sparsified field: one evaluation ``field(t, x)`` under no_grad of a
2 -> 64x3 and a 2 -> 256x3 tanh field pruned to density 0.1, batch 1000.

Variants of each case (one benchmark group): ``dense`` (masked weights in plain ``nn.Linear``
layers), ``torch.sparse`` (CSR layers), ``sparseode`` (``so.sparsify``, eager) and
``sparseode+compile`` (``torch.compile`` of the sparsified field, inductor; compiled during
the check, so compilation is not timed). Each output is checked against the masked field first.

    pytest bench/ --benchmark-only -k compile
"""
from __future__ import annotations

import functools

import pytest
import torch

from suite import COMPILE_BACKEND, QUICK, assert_close, masked_dense, torch_sparse
from sparseode.benchmark import FIELDS, FieldSpec, make_fields
from sparseode.nn.convert import sparsify

SPECS = [FieldSpec("tiny16", 2, (16, 16))] if QUICK else [FIELDS["toy64"], FIELDS["wide256"]]
DENSITY = 0.1
BATCH = 50 if QUICK else 1000
VARIANTS = ("dense", "torch.sparse", "sparseode", "sparseode+compile")


def field_name(spec: FieldSpec) -> str:
    return f"{spec.dim}->{spec.hidden[0]}x{len(spec.hidden)}"


@functools.lru_cache(maxsize=None)
def fields(spec: FieldSpec) -> tuple[dict[str, torch.nn.Module], torch.Tensor, torch.Tensor]:
    """({variant: field}, t, x) of one case; every field holds the same pruned weights."""
    def pruned():  # a fresh copy of the same pruned field (same seed)
        return make_fields(spec, DENSITY)[1][0]

    sparse = sparsify(pruned(), format="csr")
    variants = {
        "masked": pruned(),
        "dense": masked_dense(pruned()),
        "torch.sparse": torch_sparse(pruned()),
        "sparseode": sparse,
        "sparseode+compile": torch.compile(sparse, backend=COMPILE_BACKEND),
    }
    x = torch.randn(BATCH, spec.dim, generator=torch.Generator().manual_seed(0))
    return variants, torch.tensor(0.5), x


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("spec", SPECS, ids=field_name)
def test_field_eval(benchmark, spec, variant):
    variants, t, x = fields(spec)
    field = variants[variant]
    with torch.no_grad():
        assert_close(field(t, x), variants["masked"](t, x), f"{variant} field {field_name(spec)}")
        benchmark.group = f"compile: field(t, x) {field_name(spec)} d{DENSITY} b{BATCH}"
        benchmark.extra_info["variant"] = variant
        benchmark(field, t, x)
