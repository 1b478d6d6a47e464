"""The fused field op's forward kernel paths (csrc/cpu/field_kernels.h) against the dense reference
``mlp_field_reference``: the row loop specialised per activation and per number of column groups
(1 + tangents: one pass per row up to 4 groups, several passes beyond), partial batch tiles, batch
1, state sizes 1, 2, 3 and 6, every trace, non-finite states, and every CPU variant the machine runs
(each in a subprocess, since the variant is chosen once per process)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from sparseode.nn import fused_field as ff
from sparseode.nn.sparse_linear import SparseWeight

pytestmark = pytest.mark.skipif(not ff.op_available()[0], reason=f"no fused field op: {ff.op_available()[1]}")


def op_arguments(d: int, widths: tuple[int, ...], density: float, batch: int, dtype: torch.dtype, trace: int,
                 seed: int = 0, sparse_ends: bool = False) -> tuple:
    """(z, probe, weights, patterns, scales, shifts): dense first and last layers (CSR too with
    ``sparse_ends``), CSR hidden-to-hidden layers of the given density, a scale on every other layer
    and a shift on every layer."""
    g = torch.Generator().manual_seed(seed)
    sizes = (d, *widths, d)
    weights, patterns, scales, shifts = [], [], [], []
    for i, (k, n) in enumerate(zip(sizes[:-1], sizes[1:])):
        w = torch.randn(n, k, generator=g, dtype=dtype) / k ** 0.5
        if sparse_ends or 0 < i < len(sizes) - 2:
            sw = SparseWeight.from_dense(w, torch.rand(n, k, generator=g) < density, format="csr")
            weights.append(sw.values.detach().clone())
            patterns.extend(t.clone() for t in list(sw.pattern)[:5])
        else:
            weights.append(w)
        scales.append(torch.rand(n, generator=g, dtype=dtype) + 0.5 if i % 2 else None)
        shifts.append(torch.randn(n, generator=g, dtype=dtype))
    z = torch.randn(batch, d, generator=g, dtype=dtype) * 2
    probe = torch.randn(batch, d, generator=g, dtype=dtype) if trace == 2 else None
    return z, probe, weights, patterns, scales, shifts


@pytest.mark.parametrize("activation", ff.FUSED_ACTIVATIONS)
@pytest.mark.parametrize("trace", (0, 1, 2))
@pytest.mark.parametrize("d", (1, 2, 3, 6))
def test_forward_matches_reference_float64(activation, trace, d):
    # batch 1, a batch that leaves a partial last tile, and one of several tiles with a partial one
    for batch in (1, 37, 203):
        args = op_arguments(d, (24, 33), 0.3, batch, torch.float64, trace, seed=batch + d)
        f, term, _ = torch.ops.sparseode.mlp_field(*args, activation, trace, False)
        want_f, want_term = ff.mlp_field_reference(*args, activation, trace)
        torch.testing.assert_close(f, want_f, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(term, want_term, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("trace", (0, 1, 2))
@pytest.mark.parametrize("d", (1, 2, 5))
def test_csr_first_and_last_layers(trace, d):
    # a pruned first or last layer takes the CSR row paths instead of the dense first/last kernels
    for batch in (1, 50):
        args = op_arguments(d, (20, 30), 0.5, batch, torch.float64, trace, seed=d, sparse_ends=True)
        f, term, _ = torch.ops.sparseode.mlp_field(*args, "swish", trace, False)
        want_f, want_term = ff.mlp_field_reference(*args, "swish", trace)
        torch.testing.assert_close(f, want_f, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(term, want_term, rtol=1e-10, atol=1e-12)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).detach())


def _float32(args: tuple) -> tuple:
    def cast(t):
        return t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t

    return (cast(args[0]), cast(args[1]), *[[cast(t) for t in lst] for lst in args[2:]])


@pytest.mark.parametrize("activation", ff.FUSED_ACTIVATIONS)
@pytest.mark.parametrize("trace", (0, 1, 2))
@pytest.mark.parametrize("d", (1, 6))
def test_forward_float32_close_to_float64(activation, trace, d):
    # float32 runs the vector tanh (activation.h's rational) on whole vectors: within 1e-5 of float64
    args64 = op_arguments(d, (64, 48), 0.2, 301, torch.float64, trace, seed=d)
    f, term, _ = torch.ops.sparseode.mlp_field(*_float32(args64), activation, trace, False)
    want_f, want_term = ff.mlp_field_reference(*args64, activation, trace)
    assert _rel(f.double(), want_f) < 1e-5
    if trace:
        assert _rel(term.double(), want_term) < 1e-5


@pytest.mark.parametrize("trace", (0, 1, 2))
@pytest.mark.parametrize("d", (1, 2, 6))
def test_saved_products_match_the_layers(trace, d):
    # save=True stores every layer's products W [h | T] for the backward: check the first hidden
    # layer's against the dense product of the input with its weight (tangents: e_i or the probe)
    args = op_arguments(d, (19, 23), 0.4, 45, torch.float64, trace)
    z, probe = args[0], args[1]
    f, term, saved = torch.ops.sparseode.mlp_field(*args, "tanh", trace, True)
    f0, term0, _ = torch.ops.sparseode.mlp_field(*args, "tanh", trace, False)
    torch.testing.assert_close(f, f0, rtol=0, atol=0)
    torch.testing.assert_close(term, term0, rtol=0, atol=0)
    w = args[2][0]  # dense (19, d)
    torch.testing.assert_close(saved[0][:, 0, :], w @ z.t())
    if trace == 1:
        for i in range(d):
            torch.testing.assert_close(saved[0][:, 1 + i, :], w[:, i:i + 1].expand(-1, z.shape[0]))
    elif trace == 2:
        torch.testing.assert_close(saved[0][:, 1, :], w @ probe.t())
    assert saved[-1].shape == (d, 1 + (trace > 0), z.shape[0])
    pre_last = saved[-1][:, 0, :].t()
    torch.testing.assert_close(pre_last + args[5][-1], f)


@pytest.mark.parametrize("trace", (0, 1, 2))
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
def test_nonfinite_states_give_nan_rows_only(trace, dtype):
    args = op_arguments(3, (40, 40), 0.1, 70, dtype, trace)
    z = args[0].clone()
    bad = [0, 5, 33, 69]
    z[0, 1], z[5, 0], z[33, 2], z[69, 0] = float("nan"), float("inf"), float("-inf"), float("nan")
    f, term, _ = torch.ops.sparseode.mlp_field(z, *args[1:], "tanh", trace, False)
    good = [i for i in range(70) if i not in bad]
    assert torch.isnan(f[bad]).all() and torch.isnan(term[bad]).all()
    want_f, want_term = ff.mlp_field_reference(z[good], args[1][good] if args[1] is not None else None,
                                               *args[2:], "tanh", trace)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(f[good], want_f, rtol=tol, atol=tol)
    torch.testing.assert_close(term[good], want_term, rtol=tol, atol=tol)


def test_tanh_rational_within_a_few_ulp_of_torch():
    # the scalar and vector float tanh (activation.h) through the op's identity first layer:
    # a 1 -> 1 field computes tanh(z) in its only hidden layer; the last layer is the identity
    z = torch.linspace(-12, 12, 20001, dtype=torch.float32).reshape(-1, 1)
    z = torch.cat([z, torch.tensor([[1e-30], [-3e-4], [5e-4], [7.9], [-7.91]])])
    one = torch.ones(1, 1)
    f, _, _ = torch.ops.sparseode.mlp_field(z, None, [one, one], [], [None, None], [None, None], "tanh", 0, False)
    want = torch.tanh(z.double())
    ulp = (torch.nextafter(want.float(), torch.tensor(2.0)) - want.float()).abs().double()
    assert float(((f.double() - want).abs() / ulp.clamp_min(1e-45)).max()) <= 8


CHECK = r"""
import torch
from sparseode.nn import fused_field as ff
from sparseode.ops.extension import cpu_capability
import importlib.util, sys
spec = importlib.util.spec_from_file_location("parts", sys.argv[1]); parts = importlib.util.module_from_spec(spec)
spec.loader.exec_module(parts)
worst64 = worst32 = 0.0
for act in ff.FUSED_ACTIVATIONS:
    for trace in (0, 1, 2):
        for d, batch in ((1, 1), (2, 77), (6, 35)):
            args = parts.op_arguments(d, (24, 33), 0.3, batch, torch.float64, trace, seed=d)
            want_f, want_term = ff.mlp_field_reference(*args, act, trace)
            f, term, _ = torch.ops.sparseode.mlp_field(*args, act, trace, False)
            worst64 = max(worst64, parts._rel(f, want_f), parts._rel(term, want_term) if trace else 0.0)
            f, term, _ = torch.ops.sparseode.mlp_field(*parts._float32(args), act, trace, False)
            worst32 = max(worst32, parts._rel(f.double(), want_f),
                          parts._rel(term.double(), want_term) if trace else 0.0)
print("variant", cpu_capability(), "float64", worst64, "float32", worst32)
assert worst64 < 1e-10 and worst32 < 1e-5, (worst64, worst32)
"""


@pytest.mark.parametrize("variant", ("default", "avx2", "avx512"))
def test_every_variant_matches_reference(variant):
    from sparseode.ops.extension import cpu_capability

    if cpu_capability() == "native":
        pytest.skip("sparseode._C was built with SPARSEODE_NATIVE=1: it holds only the native variant")
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    need = {"default": (), "avx2": ("avx2", "fma"), "avx512": ("avx512f", "avx512bw", "avx512vl", "avx512dq")}
    missing = [f for f in need[variant] if f" {f}" not in flags]
    if missing:
        pytest.skip(f"this CPU lacks {', '.join(missing)}")
    env = dict(os.environ, SPARSEODE_CPU_CAPABILITY=variant, OMP_NUM_THREADS="2")
    run = subprocess.run([sys.executable, "-c", CHECK, __file__], env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"variant {variant}" in run.stdout, run.stdout
