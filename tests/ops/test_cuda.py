"""The GPU backends ("cuda": csrc/cuda through sparseode._C, "triton": kernels/) against the float64
reference with CUDA tensors: forward, gradients, the fused epilogue, half types (the DESIGN's rule:
error against float64 at most twice plain PyTorch's at the same precision), NaN/Inf semantics,
misaligned inputs, the split-batch sddmm, opcheck, and a SparseLinear under
``torch.compile(mode="reduce-overhead")`` (CUDA graphs). Everything here skips without a GPU.

tests/conftest.py sets TRITON_INTERPRET=1 unless it is set already, which would send the "triton"
cases through the interpreter: run this file with ``TRITON_INTERPRET=0`` on a GPU machine to test
the compiled Triton kernels (the "triton" cases skip otherwise, saying so).
"""
from __future__ import annotations

import os

import pytest
import torch
from torch import Tensor, nn

from sparseode.nn.sparse_linear import SparseLinear
from sparseode.ops import ACTIVATIONS, reference, sddmm, spmm, spmm_t, use_backend
from sparseode.ops.formats import SparseWeight
from sparseode.testing import Shape, backend_skip_reason, make_mask, opcheck_cases

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]
GPU_BACKENDS = ("cuda", "triton")
HALF = (torch.float16, torch.bfloat16)

# (format, shape); the block of a shape is the BSR block. Blocks of 16/32/64 take the tensor-core
# paths in half precision, (8, 5) the plain ones.
CASES = [
    ("csr", Shape((37,), 129, 203, 0.1, (1, 1), "empty_rows")),
    ("csr", Shape((300,), 256, 64, 0.3, (1, 1))),
    ("masked", Shape((65,), 96, 160, 0.5, (32, 32))),
    ("bsr", Shape((70,), 96, 160, 0.4, (16, 16), "empty_cols")),
    ("bsr", Shape((130,), 128, 128, 0.3, (32, 32))),
    ("bsr", Shape((33,), 128, 192, 0.5, (64, 64))),
    ("bsr", Shape((21,), 48, 40, 0.5, (8, 5))),
]
IDS = [f"{f}-{s.id}" for f, s in CASES]


def _skip(backend: str, fmt: str) -> None:
    why = backend_skip_reason(backend, "cuda")
    if why:
        pytest.skip(why)
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 (tests/conftest.py's default): run with TRITON_INTERPRET=0 to test "
                    "the compiled Triton kernels on the GPU")
    from sparseode.ops import dispatch

    if fmt not in dispatch.get(backend).formats:
        pytest.skip(f"backend {backend!r} has no kernel for {fmt!r} (it runs the reference)")


def _inputs(fmt: str, shape: Shape, dtype: torch.dtype) -> tuple[SparseWeight, Tensor, Tensor]:
    """(weight, x (B, in), bias) on the GPU, fresh random values made in float64 and then cast."""
    mask = make_mask(shape)
    w = torch.randn(shape.out, shape.inp, dtype=torch.float64)
    x = torch.randn(*shape.lead, shape.inp, dtype=torch.float64).reshape(-1, shape.inp)
    b = torch.randn(shape.out, dtype=torch.float64)
    block = shape.block if fmt == "bsr" else (16, 16)
    sw = SparseWeight.from_dense(w.to(dtype), mask, format=fmt, block=block).cuda()
    return sw, x.to("cuda", dtype), b.to("cuda", dtype)


def _three_ops(sw: SparseWeight, x: Tensor, b: Tensor, g: Tensor, backend: str, activation: str = "identity"):
    """spmm, spmm_t and sddmm of one weight, on ``backend``."""
    v, p = sw.values.detach(), sw.pattern
    with use_backend(backend, "cuda"):
        return spmm(x, v, p, b, activation), spmm_t(g, v, p), sddmm(g, x, p)


def _reference_ops(sw: SparseWeight, x: Tensor, b: Tensor, g: Tensor, dtype: torch.dtype, activation: str = "identity"):
    v, p = sw.values.detach().to(dtype), sw.pattern
    x, b, g = x.to(dtype), b.to(dtype), g.to(dtype)
    return reference.spmm(x, v, p, b, activation), reference.spmm_t(g, v, p), reference.sddmm(g, x, p)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("fmt,shape", CASES, ids=IDS)
def test_sparse_linear_float32_matches_reference(fmt: str, shape: Shape, backend: str) -> None:
    _skip(backend, fmt)
    sw, x, b = _inputs(fmt, shape, torch.float32)
    layer = SparseLinear(sw, b, backend=backend, activation="tanh")
    x = x.reshape(*shape.lead, shape.inp).clone().requires_grad_()
    y = layer(x)
    gy = torch.randn_like(y)
    (y * gy).sum().backward()

    x64 = x.detach().double().requires_grad_()
    v64 = layer.sparse.values.detach().double().requires_grad_()
    b64 = b.double().requires_grad_()
    y64 = reference.spmm(x64.reshape(-1, shape.inp), v64, layer.sparse.pattern, b64, "tanh").reshape(y.shape)
    (y64 * gy.double()).sum().backward()
    for got, want in ((y, y64), (x.grad, x64.grad), (layer.sparse.values.grad, v64.grad), (layer.bias.grad, b64.grad)):
        torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("fmt,shape", CASES, ids=IDS)
def test_half_precision_within_twice_torch_error(fmt: str, shape: Shape, dtype: torch.dtype, backend: str) -> None:
    _skip(backend, fmt)
    sw, x, b = _inputs(fmt, shape, dtype)
    g = torch.randn(x.shape[0], shape.out, device="cuda", dtype=dtype)
    ours = _three_ops(sw, x, b, g, backend, "tanh")
    plain = _reference_ops(sw, x, b, g, dtype, "tanh")
    exact = _reference_ops(sw, x, b, g, torch.float64, "tanh")
    for name, o, p, e in zip(("spmm", "spmm_t", "sddmm"), ours, plain, exact):
        assert o.dtype == dtype
        err, err_torch = (o.double() - e).abs().max().item(), (p.double() - e).abs().max().item()
        assert err <= 2 * err_torch + 1e-6, f"{name}: error {err:.3g} vs torch's {err_torch:.3g}"


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("fmt,shape", [CASES[0], CASES[3], CASES[6]], ids=[IDS[0], IDS[3], IDS[6]])
def test_fused_epilogue(fmt: str, shape: Shape, activation: str, backend: str) -> None:
    _skip(backend, fmt)
    sw, x, b = _inputs(fmt, shape, torch.float32)
    x = 4 * x
    with use_backend(backend, "cuda"):
        y = spmm(x, sw.values.detach(), sw.pattern, b, activation)
    y64 = reference.spmm(x.double(), sw.values.double(), sw.pattern, b.double(), activation)
    torch.testing.assert_close(y.double(), y64, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("fmt,shape", [CASES[0], CASES[2], CASES[3]], ids=[IDS[0], IDS[2], IDS[3]])
def test_nonfinite_inputs_propagate_like_dense(fmt: str, shape: Shape, backend: str) -> None:
    _skip(backend, fmt)
    sw, x, b = _inputs(fmt, shape, torch.float32)
    x[1, 3] = float("inf")
    x[4, -1] = float("nan")
    with use_backend(backend, "cuda"):
        y = spmm(x, sw.values.detach(), sw.pattern, b)
    ref = reference.spmm(x, sw.values.detach(), sw.pattern, b)
    assert torch.equal(y.isnan(), ref.isnan())
    assert torch.equal(y.isinf(), ref.isinf())
    finite = ref.isfinite()
    torch.testing.assert_close(y[finite], ref[finite], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16), ids=str)
@pytest.mark.parametrize("fmt,shape", [CASES[1], CASES[3]], ids=[IDS[1], IDS[3]])
def test_misaligned_inputs(fmt: str, shape: Shape, dtype: torch.dtype, backend: str) -> None:
    """Contiguous operands that start off a 16-byte boundary take the scalar-load paths."""
    _skip(backend, fmt)
    sw, x, b = _inputs(fmt, shape, dtype)
    buf = torch.empty(x.numel() + 1, device="cuda", dtype=dtype)
    shifted = buf[1:].view_as(x)
    shifted.copy_(x)
    g = torch.randn(x.shape[0], shape.out, device="cuda", dtype=dtype)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for got, want in zip(_three_ops(sw, shifted, b, g, backend), _three_ops(sw, x, b, g, "torch")):
        torch.testing.assert_close(got.double(), want.double(), atol=tol, rtol=tol)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("fmt", ("csr", "bsr", "masked"))
def test_long_batch_sddmm_over_few_blocks(fmt: str, dtype: torch.dtype, backend: str) -> None:
    """A small weight and a long batch: the batch is split into partial sums."""
    _skip(backend, fmt)
    shape = Shape((8192,), 64, 64, 0.3, (16, 16))
    sw, x, b = _inputs(fmt, shape, dtype)
    g = torch.randn(x.shape[0], shape.out, device="cuda", dtype=dtype)
    with use_backend(backend, "cuda"):
        out = sddmm(g, x, sw.pattern)
    exact = reference.sddmm(g.double(), x.double(), sw.pattern)
    plain = reference.sddmm(g, x, sw.pattern)
    err, err_torch = (out.double() - exact).abs().max().item(), (plain.double() - exact).abs().max().item()
    assert err <= 2 * err_torch + 1e-4, (err, err_torch)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("fmt,shape", [CASES[0], CASES[2], CASES[3]], ids=[IDS[0], IDS[2], IDS[3]])
def test_opcheck_on_gpu(fmt: str, shape: Shape, backend: str) -> None:
    _skip(backend, fmt)
    sw, x, b = _inputs(fmt, Shape((6,), shape.out, shape.inp, shape.density, shape.block, shape.kind), torch.float32)
    values = sw.values.detach().clone().requires_grad_()
    x.requires_grad_()
    g = torch.randn(6, shape.out, device="cuda", requires_grad=True)
    with use_backend(backend, "cuda"):
        for args in opcheck_cases(fmt, x, values, sw.pattern, b, g):
            torch.library.opcheck(*args)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("fmt", ("csr", "bsr"))
def test_compiled_reduce_overhead(fmt: str, backend: str) -> None:
    """A SparseLinear field step under torch.compile(mode="reduce-overhead"), i.e. captured in a CUDA
    graph and replayed, gives the eager result on fresh inputs."""
    _skip(backend, fmt)
    torch._dynamo.reset()
    lin = nn.Linear(128, 128, device="cuda")
    mask = make_mask(Shape((1,), 128, 128, 0.2, (16, 16))).cuda()
    layer = SparseLinear.from_dense(lin, mask, format=fmt, block=(16, 16), activation="tanh")
    step = torch.compile(layer, mode="reduce-overhead")
    with torch.no_grad(), use_backend(backend, "cuda"):
        for _ in range(4):  # warm-up, capture, replays
            x = torch.randn(512, 128, device="cuda")
            y = step(x).clone()
            torch.testing.assert_close(y, layer(x), atol=1e-5, rtol=1e-5)
            ref = reference.spmm(x.double(), layer.sparse.values.double(), layer.sparse.pattern,
                                 layer.bias.double(), "tanh")
            torch.testing.assert_close(y.double(), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="the compiled Triton kernels need TRITON_INTERPRET=0")
@pytest.mark.parametrize("fmt", ["csr", "bsr", "masked"])
def test_compiled_graph_of_a_triton_layer_holds_its_triton_kernels(fmt):
    """torch.compile sees through the triton_op twins: the AOT graphs of a training step of a
    layer pinned to Triton hold the Triton kernels themselves (triton_kernel_wrapper_functional),
    not an opaque op, and match eager."""
    if backend_skip_reason("triton", "cuda"):
        pytest.skip(backend_skip_reason("triton", "cuda"))
    from torch._dynamo.backends.common import aot_autograd

    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm.code)
        return gm.forward

    torch.manual_seed(0)
    lin = nn.Linear(64, 48).cuda()
    layer = SparseLinear.from_dense(lin, torch.rand(48, 64, device="cuda") < 0.3, format=fmt, backend="triton",
                                    block=(16, 16), activation="tanh")
    x = torch.randn(33, 64, device="cuda")
    step = torch.compile(lambda z: layer(z).pow(2).sum(), fullgraph=True,
                         backend=aot_autograd(fw_compiler=record, bw_compiler=record))
    xc, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
    step(xc).backward()
    got = xc.grad.clone()
    layer(xe).pow(2).sum().backward()
    torch.testing.assert_close(got, xe.grad, atol=1e-4, rtol=1e-4)
    assert graphs and all("triton_kernel_wrapper_functional" in g for g in graphs)
    assert not any(f"sparseode.triton_{fmt}" in g for g in graphs)
