"""GPU-only checks of what the first GPU run must test rather than find (skipped without a GPU;
bench/gpu_run.sh runs them): the fused field op on CUDA tensors (its compiled Triton kernel) against
``mlp_field_reference`` and its gradients against the CPU op's, and the CUDA C++ feature-major
kernel and non-finite pass (csrc/cuda/spmm_fm_cuda.cu, nonfinite.cuh) against the reference."""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from sparseode.nn import fused_field as ff
from sparseode.ops import reference
from sparseode.ops.formats import SparseWeight
from sparseode.ops.select import default

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                       reason="TRITON_INTERPRET=1 hides the compiled Triton kernels"),
]


def _field_args(trace: int, device: str, dtype: torch.dtype = torch.float32, B: int = 777):
    g = torch.Generator().manual_seed(0)
    sizes = (3, 96, 80, 3)
    weights, patterns, scales, shifts = [], [], [], []
    for i, (k, n) in enumerate(zip(sizes[:-1], sizes[1:])):
        w = torch.randn(n, k, generator=g, dtype=dtype) / k ** 0.5
        if i == 1:
            mask = torch.rand(n, k, generator=g) < 0.1
            mask[:5] = False
            sw = SparseWeight.from_dense(w, mask, format="csr")
            weights.append(sw.values.detach().clone())
            patterns.extend(t.clone() for t in list(sw.pattern)[:5])
        else:
            weights.append(w)
        scales.append(torch.rand(n, generator=g, dtype=dtype) + 0.5)
        shifts.append(torch.randn(n, generator=g, dtype=dtype))
    z = torch.randn(B, 3, generator=g, dtype=dtype)
    probe = torch.randn(B, 3, generator=g, dtype=dtype) if trace == 2 else None
    move = lambda t: t.to(device) if t is not None else None  # noqa: E731
    return (move(z), move(probe), [move(w) for w in weights], [move(p) for p in patterns],
            [move(s) for s in scales], [move(c) for c in shifts])


@pytest.fixture(autouse=True, scope="module")
def _registered():
    if not ff.op_available()[0]:
        pytest.skip(f"no fused field op: {ff.op_available()[1]}")
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    from sparseode.kernels import field_register

    field_register.register()


@pytest.mark.parametrize("activation", ff.FUSED_ACTIVATIONS)
@pytest.mark.parametrize("trace", (0, 1, 2))
def test_field_op_on_cuda_matches_reference(activation: str, trace: int) -> None:
    args = _field_args(trace, "cuda")
    f, term, saved = torch.ops.sparseode.mlp_field(*args, activation, trace, True)
    want_f, want_term = ff.mlp_field_reference(*args, activation, trace)
    torch.testing.assert_close(f, want_f.detach(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(term, want_term.detach(), atol=1e-4, rtol=1e-4)
    cpu = _field_args(trace, "cpu")
    _, _, cpu_saved = torch.ops.sparseode.mlp_field(*cpu, activation, trace, True)
    for got, want in zip(saved, cpu_saved):
        torch.testing.assert_close(got.cpu(), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("trace", (0, 1, 2))
def test_field_gradients_on_cuda_equal_the_cpu_ops(trace: int) -> None:
    grads = {}
    for device in ("cpu", "cuda"):
        z, probe, weights, patterns, scales, shifts = _field_args(trace, device, B=129)
        leaves = [z, *weights, *scales, *shifts] + ([probe] if probe is not None else [])
        for t in leaves:
            t.requires_grad_(True)
        f, term, _ = torch.ops.sparseode.mlp_field(z, probe, weights, patterns, scales, shifts, "tanh", trace, True)
        loss = (f * f).sum() + (term * term).sum()
        grads[device] = torch.autograd.grad(loss, leaves)
    for got, want in zip(grads["cuda"], grads["cpu"]):
        torch.testing.assert_close(got.cpu(), want, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(default("cuda") != "cuda", reason="sparseode._C was built without the CUDA kernels")
@pytest.mark.parametrize("block", ((1, 1), (16, 16), (8, 4)), ids=("csr", "bsr16", "bsr8x4"))
def test_cuda_spmm_fm_matches_reference_with_nonfinite(block: tuple[int, int]) -> None:
    fmt = "csr" if block == (1, 1) else "bsr"
    g = torch.Generator().manual_seed(0)
    n, k, B = 48, 64, 300
    mask = torch.rand(n, k, generator=g) < 0.2
    mask[:8] = False  # empty rows
    if fmt == "bsr":
        mask = mask.reshape(n // block[0], block[0], k // block[1], block[1]).any(3).any(1)
        mask = mask.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    w = torch.randn(n, k, generator=g)
    sw = SparseWeight.from_dense(w, mask, format=fmt, block=block if fmt == "bsr" else (16, 16)).cuda()
    xT = torch.randn(k, B, generator=g).cuda()
    xT[5, 7] = float("inf")
    xT[k - 1, 200] = float("nan")
    bias = torch.randn(n, generator=g).cuda()
    name = f"{fmt}_spmm_fm"
    got = getattr(torch.ops.sparseode, name)(xT, sw.values, *sw.pattern, bias, "tanh", 150)
    want = reference.spmm_fm(xT, sw.values, sw.pattern, bias, "tanh", 150)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, equal_nan=True)
    assert torch.equal(got.isnan(), want.isnan())
