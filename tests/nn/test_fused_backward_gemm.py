"""The fused field backward's GEMM path: layers at least 32 wide both ways that store at least 35% of
their entries (csrc/cpu/field_backward_cpu.cpp, ``gemm_path``) run their weight gradient and W^T adj
as dense GEMMs on the tile's panels, a CSR layer's weight gradient gathered at its stored positions.
Checked against autograd of the dense reference on both sides of the threshold (densities 0.2 and
0.45, a CSR layer storing every entry, dense 2-D hidden weights), odd widths, partial tiles, batch 1,
every activation and trace mode, float32, two threads, and by gradcheck in float64."""
import importlib.util
from pathlib import Path

import pytest
import torch

from sparseode.nn import fused_field as ff
from sparseode.testing import field_op_args, relative_error


def _sibling(name: str):
    """A test module beside this one (the suite imports test files by path, not as a package)."""
    spec = importlib.util.spec_from_file_location(f"_sibling_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_backward_cases = _sibling("test_fused_field_backward")
_backward_inputs, _check_backward = _backward_cases._backward_inputs, _backward_cases._check_backward

pytestmark = pytest.mark.skipif(not ff.op_available()[0], reason=f"no fused field op: {ff.op_available()[1]}")

# (batch, hidden widths, densities of the hidden-to-hidden layers): one layer under the threshold,
# one over it, one CSR layer storing everything; odd widths; 37 and 70 samples leave partial tiles
CASES = ((37, (41, 37, 45), (0.2, 0.45)), (1, (33, 40), (1.0,)), (70, (64, 33, 64), (0.45, 0.9)))


def _dense_hidden(args):
    """The same arguments with every CSR hidden layer given as dense (n, k) weights."""
    z, probe, weights, patterns, scales, shifts = args
    return z, probe, ff.dense_weights(weights, patterns, z.shape[1]), [], scales, shifts


@pytest.mark.parametrize("activation", ff.FUSED_ACTIVATIONS)
@pytest.mark.parametrize("trace", (0, 1, 2))
def test_gemm_path_matches_dense_autograd(activation, trace):
    for i, (B, widths, dens) in enumerate(CASES):
        time = ("mixed", "concatsquash", "concat")[i]
        args = field_op_args(2, widths, dens, B, time, trace, torch.float64, seed=10 + i)
        inputs, want = _backward_inputs(args, activation, trace, True, True)
        _check_backward(inputs, want, trace, 1e-10)


@pytest.mark.parametrize("trace", (0, 1, 2))
def test_gemm_path_dense_hidden_weights(trace):
    args = _dense_hidden(field_op_args(3, (48, 35, 40), (0.5, 0.1), 29, "concatsquash", trace, torch.float64, seed=3))
    inputs, want = _backward_inputs(args, "tanh", trace, True, True)
    _check_backward(inputs, want, trace, 1e-10)


@pytest.mark.parametrize("trace", (1, 2))
def test_gemm_path_float32(trace):
    args = field_op_args(2, (96, 96, 96), (0.5, 0.35), 300, "mixed", trace, torch.float32, seed=5)
    inputs, want = _backward_inputs(args, "softplus", trace, True, True)
    _check_backward(inputs, want, trace, 1e-5)


def test_gemm_path_split_over_threads():
    # per-chunk dense gradients gathered into per-chunk accumulators, summed after
    args = field_op_args(2, (64, 64), (0.6,), 333, "concat", 1, torch.float64, seed=6)
    inputs, want = _backward_inputs(args, "swish", 1, True, True)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        _check_backward(inputs, want, 1, 1e-10)
    finally:
        torch.set_num_threads(before)


def test_gemm_path_gradcheck():
    z, probe, weights, patterns, scales, shifts = field_op_args(2, (32, 32), (0.5,), 3, "concatsquash", 2,
                                                                torch.float64, seed=7)

    def field(z, probe, w0, w1, w2, s0, c1):
        f, term, _ = torch.ops.sparseode.mlp_field(z, probe, [w0, w1, w2], patterns, [s0, scales[1], scales[2]],
                                                   [shifts[0], c1, shifts[2]], "tanh", 2, True)
        return f, term

    leaves = [t.detach().requires_grad_(True) for t in (z, probe, *weights, scales[0], shifts[1])]
    assert torch.autograd.gradcheck(field, leaves, eps=1e-6, atol=1e-7)


def test_gemm_path_values_near_the_sparse_path():
    # the same layer just under and just over the threshold: both paths agree with the reference,
    # so with each other (a wrong gather would show here as a mismatch at the stored positions)
    for dens in (0.32, 0.38):
        args = field_op_args(2, (50, 50), (dens,), 40, "mixed", 1, torch.float64, seed=8)
        inputs, want = _backward_inputs(args, "sigmoid", 1, True, True)
        gw = torch.ops.sparseode.mlp_field_backward(*inputs)[2][1]
        assert gw.shape == want[3].shape
        assert relative_error(gw, want[3]) < 1e-10


def _gemm_calls(inputs) -> int:
    """Dense matrix products the backward op ran (its GEMM path goes through ATen's mm)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        torch.ops.sparseode.mlp_field_backward(*inputs)
    return sum(e.count for e in prof.key_averages() if e.key in ("aten::addmm_", "aten::mm"))


def test_gemm_path_taken_only_over_the_threshold():
    # 40 samples, one tile per 16/32/64: two GEMMs (weight gradient, W^T adj) per tile on the dense layer
    for dens, uses_gemm in ((0.1, False), (0.6, True)):
        args = field_op_args(2, (40, 40), (dens,), 40, "mixed", 1, torch.float64, seed=9)
        inputs, _ = _backward_inputs(args, "tanh", 1, True, True)
        assert (_gemm_calls(inputs) > 0) == uses_gemm, dens
    narrow = field_op_args(2, (16, 16), (1.0,), 40, "mixed", 1, torch.float64, seed=9)  # under 32 wide
    assert _gemm_calls(_backward_inputs(narrow, "tanh", 1, True, True)[0]) == 0
