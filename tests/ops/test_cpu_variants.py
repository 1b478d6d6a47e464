"""Every CPU kernel variant of sparseode._C (csrc/cpu/dispatch.h) that this CPU can run gives the
reference answer (sparseode.ops.reference).

Each variant runs in a subprocess with SPARSEODE_CPU_CAPABILITY set, since the dispatcher reads it
once. A variant the CPU lacks is skipped, naming the missing CPU flags; the CPU's flags are read from
/proc/cpuinfo, so a dispatcher that wrongly refuses a variant the CPU has fails the test.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sparseode.ops.extension import cpu_capability, load

pytestmark = pytest.mark.skipif(not load()[0], reason="sparseode._C is not built")

# The CPU flags (as /proc/cpuinfo spells them) each variant needs: dispatch.cpp checks the same.
NEEDS = {
    "default": (),
    "avx2": ("avx2", "fma"),
    "avx512": ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq"),
}

# Runs in the subprocess: every primitive of the csr and bsr formats on random inputs of odd sizes,
# density 0 and 1 included, against the reference; prints the variant that ran.
CHECK = r"""
import sys
import torch
from sparseode.ops import SparseWeight, active_backend, reference, sddmm, spmm, spmm_fm, spmm_t
from sparseode.ops.extension import cpu_capability

assert active_backend("cpu") == "cpu", active_backend("cpu")
gen = torch.Generator().manual_seed(0)
CASES = [  # batch, out N, in K, format, block, density
    (1, 1, 1, "csr", (1, 1), 1.0), (33, 257, 63, "csr", (1, 1), 0.2), (130, 3, 1000, "csr", (1, 1), 0.3),
    (5, 17, 9, "csr", (1, 1), 0.0), (70, 48, 64, "bsr", (16, 16), 0.3), (9, 24, 20, "bsr", (4, 5), 0.5),
    (257, 32, 32, "bsr", (8, 8), 1.0), (3, 16, 48, "bsr", (16, 16), 0.0),
]
failures = []
for dtype, tol in ((torch.float32, 1e-4), (torch.float64, 1e-10)):
    for B, N, K, fmt, (bh, bw), density in CASES:
        kept = torch.rand(N // bh, K // bw, generator=gen) < density
        mask = kept.repeat_interleave(bh, 0).repeat_interleave(bw, 1)
        w = torch.randn(N, K, generator=gen, dtype=dtype) * mask
        sw = SparseWeight.from_dense(w, mask, format=fmt, block=(bh, bw))
        v, p = sw.values, sw.pattern
        x = torch.randn(B, K, generator=gen, dtype=dtype)
        g = torch.randn(B, N, generator=gen, dtype=dtype)
        bias = torch.randn(N, generator=gen, dtype=dtype)
        act_cols = (B + 1) // 2
        pairs = {
            "spmm": (spmm(x, v, p, bias, "tanh"), reference.spmm(x, v, p, bias, "tanh")),
            "spmm_fm": (spmm_fm(x.t().contiguous(), v, p, bias, "softplus", act_cols),
                        reference.spmm_fm(x.t().contiguous(), v, p, bias, "softplus", act_cols)),
            "spmm_t": (spmm_t(g, v, p), reference.spmm_t(g, v, p)),
            "sddmm": (sddmm(g, x, p), reference.sddmm(g, x, p)),
        }
        for name, (got, want) in pairs.items():
            if got.shape != want.shape or not torch.allclose(got, want, rtol=tol, atol=tol * 10):
                err = (got - want).abs().max().item() if got.shape == want.shape else "shape"
                failures.append(f"{name} {fmt} {B}x{K}->{N} block {bh}x{bw} d={density} {dtype}: {err}")
print("variant", cpu_capability())
if failures:
    sys.exit("mismatches:\n" + "\n".join(failures))
"""


def _cpu_flags() -> set[str] | None:
    info = Path("/proc/cpuinfo")
    if not info.exists():
        return None
    for line in info.read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return None


def _run(code: str, capability: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, SPARSEODE_CPU_CAPABILITY=capability, OMP_NUM_THREADS="2")
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("variant", list(NEEDS))
def test_variant_matches_reference(variant: str) -> None:
    if cpu_capability() == "native":
        pytest.skip("sparseode._C was built with SPARSEODE_NATIVE=1: it holds only the native variant")
    flags = _cpu_flags()
    if flags is None and variant != "default":
        pytest.skip("no /proc/cpuinfo to tell which instruction sets this CPU has")
    missing = [f for f in NEEDS[variant] if f not in (flags or set())]
    if missing:
        pytest.skip(f"this CPU lacks {', '.join(missing)}, which the {variant} variant needs")
    run = _run(CHECK, variant)
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"variant {variant}" in run.stdout, run.stdout + run.stderr


def test_bad_capability_is_a_clear_error() -> None:
    run = _run("import torch, sparseode._C; torch.ops.sparseode.cpu_capability()", "avx9000")
    assert run.returncode != 0
    assert "SPARSEODE_CPU_CAPABILITY must be one of default, avx2, avx512" in run.stderr
    assert "'avx9000'" in run.stderr


def test_info_names_the_variant() -> None:
    if cpu_capability() == "native":
        pytest.skip("sparseode._C was built with SPARSEODE_NATIVE=1")
    run = _run("from sparseode.cli import main; main(['info'])", "default")
    assert run.returncode == 0, run.stderr
    assert "CPU kernel variant: default" in run.stdout, run.stdout


def test_no_wide_code_outside_the_variants() -> None:
    # A shared inline function compiled inside the AVX2/AVX-512 variant and kept by the linker would
    # run on every CPU: csrc/tests/check_variant_symbols.py finds any in the built extension.
    import importlib.util
    import shutil

    import sparseode._C

    if cpu_capability() == "native":
        pytest.skip("sparseode._C was built with SPARSEODE_NATIVE=1: any function may use the build CPU's ISA")
    if shutil.which("objdump") is None:
        pytest.skip("objdump (binutils) is not installed")
    script = Path(__file__).resolve().parents[2] / "csrc" / "tests" / "check_variant_symbols.py"
    spec = importlib.util.spec_from_file_location("check_variant_symbols", script)
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    binary = sparseode._C.__file__
    assert len(check.wide_functions(binary)) > 0, "no AVX code at all: the wide variants were not built"
    assert check.leaked(binary) == []
