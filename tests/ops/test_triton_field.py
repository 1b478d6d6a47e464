"""The fused-field Triton kernels (kernels/field.py) against the pure-PyTorch truth
``mlp_field_reference`` and against the CPU op's saved products, through Triton's interpreter on CPU
tensors (tests/conftest.py sets TRITON_INTERPRET=1 without a GPU; on a GPU tests/ops/test_cuda.py's
field cases run the compiled kernel).

Shapes are tiny (each interpreted program is a Python loop) but cover what the kernel branches on:
dense first/last layers, CSR hidden layers of density 0 and 1 and with empty rows, odd widths, a
batch of one and a batch of three tiles over two persistent programs, every activation, the three
time modes (no scale/shift, shift only as `concat` folds time into the bias, scale + shift as
`concatsquash`), the three trace modes, float32 (tl.dot) and float64 (no tl.dot).
"""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from sparseode.nn import fused_field as ff
from sparseode.ops.formats import SparseWeight
from sparseode.testing import field_op_args

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                       reason="these run the kernels on CPU tensors through TRITON_INTERPRET=1"),
    pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning"),  # numpy on exp overflow
]

TIME_MODES = ("none", "concat", "concatsquash")


@pytest.fixture(scope="module")
def launch():
    from sparseode.kernels import field_launch

    return field_launch


def _args(d: int, widths: tuple[int, ...], densities: tuple[float, ...], B: int, time: str, trace: int,
          dtype: torch.dtype = torch.float32, seed: int = 0):
    """Op arguments (sparseode.testing.field_op_args) with row 0 of each CSR layer emptied and the
    state scaled by 2 (wider pre-activations than the CPU op's tests draw)."""
    z, *rest = field_op_args(d, widths, densities, B, time, trace, dtype, seed, empty_row=True)
    return (2 * z, *rest)


def _check(launch, args, activation: str, trace: int, atol: float = 2e-5, rtol: float = 2e-5) -> list:
    f, term, saved = launch.mlp_field(*args, activation, trace, True)
    want_f, want_term = ff.mlp_field_reference(*args, activation, trace)
    torch.testing.assert_close(f, want_f.detach(), atol=atol, rtol=rtol)
    torch.testing.assert_close(term, want_term.detach(), atol=atol, rtol=rtol)
    if trace == 0:
        assert torch.equal(term, torch.zeros_like(term))
    return saved


CASES = [(a, t, TIME_MODES[(i + t) % 3]) for i, a in enumerate(ff.FUSED_ACTIVATIONS) for t in (0, 1, 2)]
CASES += [("tanh", t, time) for t in (0, 1, 2) for time in TIME_MODES if ("tanh", t, time) not in CASES]


@pytest.mark.parametrize("activation,trace,time", CASES, ids=[f"{a}-tr{t}-{m}" for a, t, m in CASES])
def test_field_matches_reference(launch, activation: str, trace: int, time: str) -> None:
    # 3 -> 17 -> 9 -> 3, the CSR layer at density 0.3 with an empty row; 37 samples = 3 tiles
    _check(launch, _args(3, (17, 9), (0.3,), 37, time, trace), activation, trace)


@pytest.mark.parametrize("density", (0.0, 1.0))
@pytest.mark.parametrize("trace", (0, 1, 2))
def test_density_zero_and_one_batch_one(launch, density: float, trace: int) -> None:
    _check(launch, _args(2, (6, 5, 7), (density, density), 1, "concatsquash", trace), "softplus", trace)


def test_wide_state_and_single_layer(launch) -> None:
    # d = 33 > the 32-row chunk of the packing and of the last layer; a field of one dense layer
    _check(launch, _args(33, (40,), (), 5, "concat", 1), "elu", 1, atol=5e-5, rtol=5e-5)
    _check(launch, _args(4, (), (), 20, "concatsquash", 2), "identity", 2)


@pytest.mark.parametrize("trace", (0, 1, 2))
def test_float64(launch, trace: int) -> None:
    _check(launch, _args(3, (11, 8), (0.5,), 19, "concatsquash", trace, torch.float64), "swish", trace,
           atol=1e-12, rtol=1e-12)


@pytest.mark.skipif(not ff.op_available()[0], reason=f"no CPU fused op: {ff.op_available()[1]}")
@pytest.mark.parametrize("trace", (0, 1, 2))
def test_saved_products_equal_the_cpu_ops(launch, trace: int) -> None:
    # the backward (the same for both devices) reads only these: equal products, equal gradients
    args = _args(3, (12, 10), (0.4,), 21, "concatsquash", trace)
    saved = _check(launch, args, "tanh", trace)
    _, _, cpu_saved = torch.ops.sparseode.mlp_field(*args, "tanh", trace, True)
    assert [s.shape for s in saved] == [s.shape for s in cpu_saved]
    for got, want in zip(saved, cpu_saved):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


def test_no_save_returns_no_products(launch) -> None:
    args = _args(2, (8,), (), 9, "none", 1)
    f, _, saved = launch.mlp_field(*args, "tanh", 1, False)
    assert saved == []
    torch.testing.assert_close(f, ff.mlp_field_reference(*args, "tanh", 1)[0].detach(), atol=2e-5, rtol=2e-5)


def test_nonfinite_state_gives_nan_for_that_sample_only(launch) -> None:
    z, probe, weights, patterns, scales, shifts = _args(3, (9, 9), (0.0,), 6, "concat", 1)
    z[2, 1] = float("inf")
    z[4, 0] = float("nan")
    f, term, _ = launch.mlp_field(z, probe, weights, patterns, scales, shifts, "tanh", 1, False)
    for b in (2, 4):
        assert torch.isnan(f[b]).all() and torch.isnan(term[b])
    ok = [0, 1, 3, 5]
    assert torch.isfinite(f[ok]).all() and torch.isfinite(term[ok]).all()


def test_empty_batch(launch) -> None:
    f, term, saved = launch.mlp_field(*_args(2, (5,), (), 0, "none", 1), "tanh", 1, True)
    assert f.shape == (0, 2) and term.shape == (0,) and [s.shape[-1] for s in saved] == [0, 0]


def test_bad_arguments_name_the_argument(launch) -> None:
    z, probe, weights, patterns, scales, shifts = _args(3, (5, 4), (0.5,), 4, "none", 0)
    with pytest.raises(ValueError, match="activation"):
        launch.mlp_field(z, probe, weights, patterns, scales, shifts, "gelu", 0, False)
    with pytest.raises(ValueError, match="trace"):
        launch.mlp_field(z, probe, weights, patterns, scales, shifts, "tanh", 3, False)
    with pytest.raises(ValueError, match="probe"):
        launch.mlp_field(z, None, weights, patterns, scales, shifts, "tanh", 2, False)
    with pytest.raises(ValueError, match=r"weights\[0\] has 3 input features, expected 2"):
        launch.mlp_field(z[:, :2], probe, weights, patterns, scales, shifts, "tanh", 0, False)
    with pytest.raises(ValueError, match=r"weights\[1\] must match z's dtype"):
        launch.mlp_field(z, probe, [weights[0], weights[1].double(), weights[2]], patterns, scales, shifts,
                         "tanh", 0, False)
    with pytest.raises(ValueError, match=r"shifts\[0\]"):
        launch.mlp_field(z, probe, weights, patterns, scales, [torch.zeros(2), None, None], "tanh", 0, False)
    with pytest.raises(ValueError, match="patterns must hold 5 tensors per CSR layer; layer 1 has none"):
        launch.mlp_field(z, probe, weights, patterns[:4], scales, shifts, "tanh", 0, False)
    with pytest.raises(ValueError, match="patterns holds 6 tensors, the CSR layers use 5"):
        launch.mlp_field(z, probe, weights, patterns + patterns[:1], scales, shifts, "tanh", 0, False)


def test_backward_products_match_dense(launch) -> None:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(13, 9, generator=g)
    mask = torch.rand(13, 9, generator=g) < 0.4
    mask[3] = False  # an empty row of W
    mask[:, 5] = False  # an empty row of W^T
    sw = SparseWeight.from_dense(w, mask, format="csr")
    crow, col, crow_t, col_t, perm = list(sw.pattern)[:5]
    dense = torch.zeros(13, 9).index_put((torch.repeat_interleave(torch.arange(13), crow.diff()), col), sw.values)
    a, c = torch.randn(13, 70, generator=g), torch.randn(9, 70, generator=g)
    got = launch.field_spmm_t_fm(a, sw.values[perm].contiguous(), crow_t, col_t)
    torch.testing.assert_close(got, dense.t() @ a, atol=1e-5, rtol=1e-5)
    got = launch.field_sddmm_fm(a, c, crow, col)
    torch.testing.assert_close(got, (a @ c.t())[mask], atol=1e-5, rtol=1e-5)


def test_registered_as_the_ops_cuda_kernels() -> None:
    if not ff.op_available()[0]:
        pytest.skip(f"no fused op: {ff.op_available()[1]}")
    from sparseode.kernels import field_register

    field_register.register()  # importing fused_field registered them already: the same names again
    assert {"mlp_field", "mlp_field_backward"} <= set(field_register.registered())
    for op in ("mlp_field", "mlp_field_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"sparseode::{op}", "CUDA")
    assert ff._fused_devices() == ("cpu", "cuda")  # so a field on CUDA states takes the fused op


def _reference_grads(args, activation: str, trace: int, gf, gtr):
    """Autograd of mlp_field_reference: d(<gf, f> + <gtr, term>) / d(z, weights, scales, shifts, probe)."""
    z, probe, weights, patterns, scales, shifts = args
    leaves = [z, *weights, *(s for s in scales if s is not None), *(c for c in shifts if c is not None)]
    if probe is not None:
        leaves.append(probe)
    leaves = [t.detach().requires_grad_(True) for t in leaves]
    it = iter(leaves)
    z_, weights_ = next(it), [next(it) for _ in weights]
    scales_ = [next(it) if s is not None else None for s in scales]
    shifts_ = [next(it) if c is not None else None for c in shifts]
    probe_ = next(it) if probe is not None else None
    f, term = ff.mlp_field_reference(z_, probe_, weights_, patterns, scales_, shifts_, activation, trace)
    loss = (f * gf).sum() if gf is not None else 0
    loss = loss + ((term * gtr).sum() if gtr is not None else 0)
    return torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True)


BACKWARD_CASES = [(a, (i % 3), TIME_MODES[(i + 1) % 3]) for i, a in enumerate(ff.FUSED_ACTIVATIONS)]
BACKWARD_CASES += [("tanh", t, "concatsquash") for t in (0, 1, 2) if ("tanh", t, "concatsquash") not in BACKWARD_CASES]


@pytest.mark.parametrize("activation,trace,time", BACKWARD_CASES,
                         ids=[f"{a}-tr{t}-{m}" for a, t, m in BACKWARD_CASES])
def test_gpu_backward_matches_autograd_of_reference(launch, activation: str, trace: int, time: str) -> None:
    # the CUDA kernel of mlp_field_backward (torch ops + the Triton products), here on CPU tensors
    from sparseode.kernels.field_backward import mlp_field_backward

    args = _args(3, (14, 11), (0.4,), 23, time, trace, torch.float64)
    g = torch.Generator().manual_seed(5)
    gf = torch.randn(23, 3, generator=g, dtype=torch.float64)
    gtr = torch.randn(23, generator=g, dtype=torch.float64) if trace else None
    _, _, saved = launch.mlp_field(*args, activation, trace, True)
    gz, gprobe, gw, gs, gc = mlp_field_backward(*args, saved, gf, gtr, activation, trace)
    z, probe, weights, patterns, scales, shifts = args
    want = list(_reference_grads(args, activation, trace, gf, gtr))
    got = [gz, *gw, *(x for x, s in zip(gs, scales) if s is not None), *(x for x, c in zip(gc, shifts) if c is not None)]
    if probe is not None:
        got.append(gprobe)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9)
    assert all(x.shape == (0,) for x, s in zip(gs, scales) if s is None)
    assert gprobe.shape == ((23, 3) if trace == 2 else (0,))


@pytest.mark.parametrize("which", ("no grad_trace", "no grad_f"))
def test_gpu_backward_with_one_output_gradient(launch, which: str) -> None:
    from sparseode.kernels.field_backward import mlp_field_backward

    args = _args(2, (9, 7), (0.5,), 10, "concat", 1, torch.float64)
    gf = None if which == "no grad_f" else torch.randn(10, 2, dtype=torch.float64)
    gtr = None if which == "no grad_trace" else torch.randn(10, dtype=torch.float64)
    _, _, saved = launch.mlp_field(*args, "softplus", 1, True)
    gz, _, gw, _, gc = mlp_field_backward(*args, saved, gf, gtr, "softplus", 1)
    want = _reference_grads(args, "softplus", 1, gf, gtr)
    torch.testing.assert_close(gz, want[0], atol=1e-10, rtol=1e-9)
    for a, b in zip(gw, want[1:4]):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9)
