"""End-to-end cases: CNF ``log_prob`` (exact trace, no grad) and one training step (NLL backward)
of a 2 -> 64x3 and a 2 -> 256x3 tanh field pruned to density 0.1, batch 1000, fixed-step rk4
(4 steps: 16 function evaluations for every variant).

Variants of each case (one benchmark group), all computing the same function:

  dense            the masked weights folded into plain ``nn.Linear`` layers, FFJORD's autograd trace
  masked           the field as ``torch.nn.utils.prune`` leaves it, autograd trace
  dense+fwd-trace  ``dense`` with sparseode's forward-mode trace (log_prob only: training
                   differentiates through the autograd trace whatever the field)
  torch.sparse     ``torch.sparse`` CSR layers, autograd trace
  sparseode        ``so.sparsify`` (CSR kernels, fused epilogue) with the forward-mode trace

Before timing, each variant's log-likelihoods (log_prob) or loss and bias gradients (training)
are checked against the masked model's. The fields are those of sparseode/benchmark.py
(bench/e2e_solve.py), whose construction this reuses.
"""
from __future__ import annotations

import functools

import pytest
import torch

from suite import QUICK, assert_close, masked_dense, torch_sparse
from sparseode.benchmark import FIELDS, FieldSpec, make_fields, task_fn
from sparseode.models import CNF
from sparseode.nn.convert import sparsify

SPECS = [FieldSpec("tiny16", 2, (16, 16))] if QUICK else [FIELDS["toy64"], FIELDS["wide256"]]
DENSITY = 0.1
BATCH = 50 if QUICK else 1000
STEPS = 1 if QUICK else 4
LOG_PROB_VARIANTS = ("dense", "masked", "dense+fwd-trace", "torch.sparse", "sparseode")
TRAIN_VARIANTS = ("dense", "masked", "torch.sparse", "sparseode")


def field_name(spec: FieldSpec) -> str:
    return f"{spec.dim}->{spec.hidden[0]}x{len(spec.hidden)}"


@functools.lru_cache(maxsize=None)
def models(spec: FieldSpec) -> tuple[dict[str, CNF], torch.Tensor]:
    """({variant: CNF}, x) of one field; every variant holds the same pruned weights."""
    def pruned():  # a fresh copy of the same pruned field (same seed)
        return make_fields(spec, DENSITY)[1][0]

    solver = dict(trace="exact", method="rk4", options={"step_size": 1.0 / STEPS})
    autograd = dict(solver, inference_trace="autograd")
    cnfs = {
        "dense": CNF(masked_dense(pruned()), **autograd),
        "masked": CNF(pruned(), **autograd),
        "dense+fwd-trace": CNF(masked_dense(pruned()), **solver),
        "torch.sparse": CNF(torch_sparse(pruned()), **autograd),
        "sparseode": CNF(sparsify(pruned(), format="csr"), **solver),
    }
    x = torch.randn(BATCH, spec.dim, generator=torch.Generator().manual_seed(0))
    return cnfs, x


def biases_and_loss(cnf: CNF, x: torch.Tensor) -> list[torch.Tensor]:
    """[loss, grad of every bias] of one training step from zero gradients."""
    cnf.zero_grad(set_to_none=True)
    loss = task_fn(cnf, "train_step", x)()
    grads = [p.grad.clone() for name, p in cnf.named_parameters() if name.endswith("bias")]
    cnf.zero_grad(set_to_none=True)
    return [loss.detach(), *grads]


@pytest.mark.parametrize("variant", LOG_PROB_VARIANTS)
@pytest.mark.parametrize("spec", SPECS, ids=field_name)
def test_log_prob(benchmark, spec, variant):
    cnfs, x = models(spec)
    want = task_fn(cnfs["masked"], "log_prob", x)()
    fn = task_fn(cnfs[variant], "log_prob", x)
    assert_close(fn(), want, f"log_prob of {variant}, field {field_name(spec)}")
    benchmark.group = f"CNF log_prob {field_name(spec)} d{DENSITY} b{BATCH}"
    benchmark.extra_info.update(variant=variant, nfe=cnfs[variant].nfe)
    benchmark(fn)


@pytest.mark.parametrize("variant", TRAIN_VARIANTS)
@pytest.mark.parametrize("spec", SPECS, ids=field_name)
def test_train_step(benchmark, spec, variant):
    cnfs, x = models(spec)
    want = biases_and_loss(cnfs["masked"], x)
    got = biases_and_loss(cnfs[variant], x)
    assert len(got) == len(want)
    for k, (g, w) in enumerate(zip(got, want)):
        assert_close(g, w, f"training step of {variant}, field {field_name(spec)}, " + ("loss" if k == 0 else f"bias {k}"))
    benchmark.group = f"CNF train step {field_name(spec)} d{DENSITY} b{BATCH}"
    benchmark.extra_info.update(variant=variant, nfe=cnfs[variant].nfe)
    benchmark(task_fn(cnfs[variant], "train_step", x))
