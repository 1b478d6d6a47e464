"""The autograd of the per-layer ops: in C++ (csrc/autograd_ops.cpp) when sparseode._C is built, in
Python (sparseode/ops/library.py) when it is not. Both paths write the same formulas; here they
are run on the same inputs, on the same (reference) kernels, and their first and second
derivatives compared. gradcheck/gradgradcheck and opcheck of every op: test_primitives.py,
test_opcheck.py."""
import json
import subprocess
import sys

import pytest
import torch

from sparseode.ops import library
from sparseode.testing import backend_skip_reason

# First and second derivatives of every op of every format, in float64, on the reference kernels.
_DERIVATIVES = r"""
import json, sys, warnings
if sys.argv[1] == "python":
    sys.modules["sparseode._C"] = None  # as if never built: the Python formulas register
warnings.simplefilter("ignore")
import torch
from sparseode.ops import SparseWeight, library, use_backend

out = {"cpp_autograd": [library.kernel_registered(n, "Autograd") and "autograd_ops.cpp" in
                        torch._C._dispatch_dump(f"sparseode::{n}") for n in library.SCHEMAS]}
gen = torch.Generator().manual_seed(0)
rand = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)
for fmt in ("masked", "csr", "bsr"):
    w = rand(8, 6)
    sw = SparseWeight.from_dense(w, torch.rand(8, 6, generator=gen) < 0.5, format=fmt, block=(2, 3))
    pattern = tuple(sw.pattern)
    v = sw.values.detach()
    cases = {
        "spmm": (library.op(fmt, "spmm"), [rand(5, 6), v, rand(8)], lambda a: (a[0], a[1], *pattern, a[2], "tanh")),
        "spmm_fm": (library.op(fmt, "spmm_fm"), [rand(6, 5), v, rand(8)],
                    lambda a: (a[0], a[1], *pattern, a[2], "softplus", 3)),
        "spmm_t": (library.op(fmt, "spmm_t"), [rand(5, 8), v], lambda a: (a[0], a[1], *pattern)),
        "sddmm": (library.op(fmt, "sddmm"), [rand(5, 8), rand(5, 6)], lambda a: (a[0], a[1], *pattern)),
    }
    for prim, (op, inputs, args) in cases.items():
        inputs = [t.clone().requires_grad_() for t in inputs]
        with use_backend("torch", "cpu"):
            y = op(*args(inputs))
            first = torch.autograd.grad((y * rand(*y.shape)).sum(), inputs, create_graph=True)
            second = torch.autograd.grad(sum((g * rand(*g.shape)).sum() for g in first), inputs)
        out[f"{fmt}_{prim}"] = [t.tolist() for t in (y, *first, *second)]
print(json.dumps(out))
"""


def _derivatives(path: str) -> dict:
    done = subprocess.run([sys.executable, "-c", _DERIVATIVES, path], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_cpp_and_python_autograd_give_the_same_first_and_second_derivatives():
    if backend_skip_reason("cpu"):
        pytest.skip(backend_skip_reason("cpu"))
    cpp, python = _derivatives("cpp"), _derivatives("python")
    assert all(cpp.pop("cpp_autograd")), "with sparseode._C built, every op's autograd is the C++ one"
    assert not any(python.pop("cpp_autograd"))
    assert cpp.keys() == python.keys() and len(cpp) == len(library.SCHEMAS)
    for name in cpp:
        for got, want in zip(cpp[name], python[name]):
            torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), torch.tensor(want, dtype=torch.float64),
                                       rtol=1e-12, atol=1e-12, msg=name)


def test_cpp_autograd_marks_only_what_needs_a_gradient():
    """A forward whose only differentiable input is the weight returns no input gradient and
    leaves x untouched (the C++ node asks needs_input_grad before calling a kernel)."""
    if backend_skip_reason("cpu"):
        pytest.skip(backend_skip_reason("cpu"))
    from sparseode.ops import SparseWeight

    sw = SparseWeight.from_dense(torch.randn(4, 3), format="csr")
    x = torch.randn(2, 3)
    y = library.op("csr", "spmm")(x, sw.values, *sw.pattern, None, "relu")
    assert y.grad_fn is not None and "SpmmFunction" in y.grad_fn.name()  # the C++ node
    (gv,) = torch.autograd.grad(y.sum(), sw.values)
    want = ((y > 0).to(y.dtype).t() @ x)[sw.kept_mask()]
    torch.testing.assert_close(gv, want)
    assert x.grad is None


def test_inference_records_nothing_and_forward_mode_tangents_are_refused():
    """Under no_grad the op goes straight to its kernel (no node); a torch.autograd.forward_ad
    tangent is a clear error rather than silently dropped (the ops have no forward formula)."""
    if backend_skip_reason("cpu"):
        pytest.skip(backend_skip_reason("cpu"))
    import torch.autograd.forward_ad as fwAD

    from sparseode.ops import SparseWeight, reference

    sw = SparseWeight.from_dense(torch.randn(4, 3), format="csr")
    x = torch.randn(2, 3)
    spmm = library.op("csr", "spmm")
    with torch.no_grad():
        y = spmm(x, sw.values, *sw.pattern, None, "tanh")
    assert y.grad_fn is None
    torch.testing.assert_close(y, reference.spmm(x, sw.values.detach(), sw.pattern, None, "tanh"))
    with fwAD.dual_level(), pytest.raises(RuntimeError, match="argument x carries a forward-mode tangent"):
        spmm(fwAD.make_dual(x, torch.randn(2, 3)), sw.values.detach(), *sw.pattern, None, "tanh")
